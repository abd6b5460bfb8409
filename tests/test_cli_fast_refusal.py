"""Every command checks its whole input (paths, numbers, seeds, YAML, templates) before it imports torch: a bad
argument is refused in a fraction of a second with one ``error:`` line and exit code 2.

Each case runs the real command line in a fresh interpreter and reports whether ``torch`` (or diffusers /
transformers) was imported by the time the command exited."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conceptsmith.world.shipped import PIPE_DIR

#: Runs ``conceptsmith ARGS`` as ``python -m conceptsmith`` does and reports the heavy libraries it imported.
PROBE = """
import sys, runpy
sys.argv = ["conceptsmith", *sys.argv[1:]]
try:
    runpy.run_module("conceptsmith", run_name="__main__")
finally:
    print("IMPORTED", sorted({"torch", "diffusers", "transformers"} & set(sys.modules)), file=sys.stderr)
"""

#: A config whose template reads an attribute of its argument (refused by ``validate.check_templates``).
BAD_TEMPLATE = 'method: uce\nparams:\n  templates: ["a photo of {0.__class__}"]\n'

#: ``(id, arguments, a fragment of the expected error line)``; ``{tmp}`` is the test's temporary folder.
CASES = [
    ("merge-missing-edit", ["merge", "/nonexistent/a.safetensors", "/nonexistent/b.safetensors",
                            "-o", "{tmp}/m.safetensors"], "Edit file '/nonexistent/a.safetensors' does not exist"),
    ("merge-weight-nan", ["merge", "{tmp}/a.safetensors", "{tmp}/b.safetensors", "--weight", "nan",
                          "-o", "{tmp}/m.safetensors"], "--weight must be a finite number"),
    ("merge-missing-model", ["merge", "{tmp}/a.safetensors", "{tmp}/b.safetensors", "-m", "/nonexistent/model",
                             "-o", "{tmp}/m.safetensors"], "Model path '/nonexistent/model' does not exist"),
    ("merge-unknown-method", ["merge", "{tmp}/a.safetensors", "{tmp}/b.safetensors", "--method", "bogus",
                              "-o", "{tmp}/m.safetensors"], "Unknown merge method 'bogus'. Available: closed-form"),
    ("export-missing-edit", ["export", "-m", "builtin:shapes", "-e", "/nonexistent.safetensors",
                             "-o", "{tmp}/x.safetensors"], "--edit '/nonexistent.safetensors' does not exist"),
    ("import-missing-file", ["import", "/nonexistent.safetensors", "-m", "builtin:shapes",
                             "-o", "{tmp}/i.safetensors"], "FILE '/nonexistent.safetensors' does not exist"),
    ("export-lora-missing-edit", ["export-lora", "/nonexistent.safetensors", "-o", "{tmp}/l.safetensors"],
     "EDIT '/nonexistent.safetensors' does not exist"),
    ("export-lora-rank-0", ["export-lora", "{tmp}/a.safetensors", "--rank", "0", "-o", "{tmp}/l.safetensors"],
     "--rank must be an integer from 1"),
    ("export-lora-unknown-format", ["export-lora", "{tmp}/a.safetensors", "--format", "bogus",
                                    "-o", "{tmp}/l.safetensors"], "Unknown LoRA format 'bogus'; choose one of diffusers"),
    ("bench-missing-config", ["bench", "/nonexistent.yaml", "--out", "{tmp}/b"],
     "Config file '/nonexistent.yaml' does not exist"),
    ("bench-out-is-a-file", ["bench", "shapes-smoke", "--out", "{tmp}/a.safetensors"], "exists and is not a folder"),
    ("evaluate-missing-config", ["evaluate", "--bench", "/nonexistent.yaml"],
     "Config file '/nonexistent.yaml' does not exist"),
    ("evaluate-missing-edit", ["evaluate", "--bench", "shapes-smoke", "-e", "/nonexistent.safetensors",
                               "--out", "{tmp}/ev"], "--edit '/nonexistent.safetensors' does not exist"),
    ("evaluate-missing-model", ["evaluate", "--bench", "shapes-smoke", "-m", "./nonexistent-model-dir",
                                "--out", "{tmp}/ev"], "Model path './nonexistent-model-dir' does not exist"),
    ("inspect-missing-model", ["inspect", "/nonexistent-model"], "Model path '/nonexistent-model' does not exist"),
    ("inspect-missing-model-config", ["inspect", "/nonexistent/model.yaml"],
     "Config file '/nonexistent/model.yaml' does not exist"),
    ("world-check-seeds-0", ["world", "check", "--seeds", "0", "--grid", "{tmp}/grid.png"],
     "--seeds must be an integer from 1 to 1000, got 0"),
    ("world-check-missing-model", ["world", "check", "--model", "/nonexistent/pipe", "--grid", "{tmp}/grid.png"],
     "Model path '/nonexistent/pipe' does not exist"),
    ("world-check-unknown-metric", ["world", "check", "--only", "shape,bogus", "--grid", "{tmp}/grid.png"],
     "unknown metric(s) ['bogus']; choose from shape, color"),
    # the shipped pipeline folder is not empty and was not made by `world train`: were the guard gone, that check
    # would still refuse it (with another message) before anything is written there
    ("world-train-into-shipped-weights", ["world", "train", "--out", str(PIPE_DIR)],
     "inside the shipped ShapesWorld weights"),
    ("world-train-seed-negative", ["world", "train", "--out", "{tmp}/w", "--seed", "-1"],
     "--seed must be an integer from 0"),
    ("world-train-missing-unet-init", ["world", "train", "--out", "{tmp}/w", "--unet-init", "/nonexistent"],
     "--unet-init '/nonexistent' does not exist"),
    ("generate-steps-0", ["generate", "-m", "builtin:shapes", "-p", "x", "--steps", "0", "-o", "{tmp}/o"],
     "--steps must be an integer from 1 to 1000, got 0"),
    ("generate-missing-edit", ["generate", "-p", "x", "-e", "/nonexistent.safetensors", "-o", "{tmp}/o"],
     "--edit '/nonexistent.safetensors' does not exist"),
    ("generate-edit-scale-nan", ["generate", "-p", "x", "-e", "{tmp}/a.safetensors:nan", "-o", "{tmp}/o"],
     "Edit scale nan in"),
    ("generate-seeds-backwards", ["generate", "-p", "x", "--seeds", "3-1", "-o", "{tmp}/o"],
     "Seed range '3-1' runs backwards"),
    ("generate-missing-model", ["generate", "-m", "/nonexistent/model.safetensors", "-p", "x", "-o", "{tmp}/o"],
     "Model path '/nonexistent/model.safetensors' does not exist"),
    ("erase-seed-negative", ["erase", "-c", "cat", "--method", "uce", "--seed", "-1", "-o", "{tmp}/e.safetensors"],
     "--seed must be an integer from 0"),
    ("erase-missing-config", ["erase", "-c", "cat", "--config", "/nonexistent.yaml", "-o", "{tmp}/e.safetensors"],
     "Config file '/nonexistent.yaml' does not exist"),
    ("erase-bad-template", ["erase", "-c", "cat", "--config", "{tmp}/bad-template.yaml", "-o", "{tmp}/e.safetensors"],
     "has the field {0.__class__}"),
    ("erase-missing-images", ["erase", "-c", "cat", "--method", "uce", "--images", "/nonexistent",
                              "-o", "{tmp}/e.safetensors"], "--images '/nonexistent' does not exist"),
    ("customize-missing-images", ["customize", "-t", "<x>", "--images", "/nonexistent", "--method", "lora",
                                  "-o", "{tmp}/c.safetensors"], "--images '/nonexistent' does not exist"),
    ("customize-seed-negative", ["customize", "-t", "<x>", "--images", "{tmp}", "--method", "lora", "--seed", "-3",
                                 "-o", "{tmp}/c.safetensors"], "--seed must be an integer from 0"),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    """A folder with two (unreadable as edits, never opened) files and a config with a bad template."""
    folder = tmp_path_factory.mktemp("fast-refusal")
    for name in ("a.safetensors", "b.safetensors"):
        (folder / name).write_bytes(b"not read: the command refuses an argument before it loads any edit")
    (folder / "bad-template.yaml").write_text(BAD_TEMPLATE)
    return folder


@pytest.mark.parametrize(("args", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_bad_argument_is_refused_before_torch_is_imported(args, expected, tmp):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CONCEPTSMITH_CACHE": str(tmp / "cache")}
    argv = [arg.replace("{tmp}", str(tmp)) for arg in args]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=60)
    seconds = time.perf_counter() - started
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1, lines
    assert expected in errors[0], errors[0]
    assert "IMPORTED []" in lines, lines  # neither torch nor diffusers / transformers
    assert seconds < 5, f"refusal took {seconds:.1f} s"  # about 0.2 s; importing torch alone takes over 1.5 s
