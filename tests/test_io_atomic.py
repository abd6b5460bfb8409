"""Nothing lost: atomic writes (a failed or killed writer leaves the old file, its temporary is cleaned up), kept
file modes, stale temporaries removed, `generate` and `bench` resuming a stopped run, `world train --out` never
writing into the shipped weights."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conceptsmith import io

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _leftovers(folder: Path) -> list[str]:
    """Hidden temporaries / backups beside the targets."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# -- one file --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interruption", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_writer_failing_midway_leaves_the_old_file_and_no_temporary(tmp_path, interruption):
    target = tmp_path / "results.json"
    target.write_text("old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("ne")
        raise interruption

    with pytest.raises(type(interruption)):
        io.atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and _leftovers(tmp_path) == []
    with pytest.raises(type(interruption)), io.atomic_directory(tmp_path / "weights") as folder:
        (folder / "config.json").write_text("{}")
        raise interruption
    assert not (tmp_path / "weights").exists() and _leftovers(tmp_path) == []


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")
def test_a_write_killed_by_sigkill_leaves_the_old_file_and_the_next_write_removes_its_temporary(tmp_path):
    target = tmp_path / "edit.safetensors"
    target.write_bytes(b"old weights")
    slow_writer = (
        "import sys, time\n"
        "from conceptsmith.io import atomic_write\n"
        "def write(tmp):\n"
        "    with open(tmp, 'wb') as handle:\n"
        "        handle.write(b'half of the new')\n"
        "        handle.flush()\n"
        "        print('writing', flush=True)\n"
        "        time.sleep(120)\n"
        "atomic_write(sys.argv[1], write)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", slow_writer, str(target)], stdout=subprocess.PIPE, text=True,
                               cwd=REPO)
    try:
        assert process.stdout.readline().strip() == "writing"
        (temporary,) = _leftovers(tmp_path)
        assert temporary.startswith(f".edit.safetensors.{process.pid}-") and temporary.endswith(".tmp")
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert target.read_bytes() == b"old weights"  # the killed write never touched the target
    assert _leftovers(tmp_path) == [temporary]  # what SIGKILL leaves behind ...
    io.write_bytes(target, b"new weights")  # ... the next write to the same place removes
    assert target.read_bytes() == b"new weights" and _leftovers(tmp_path) == []


def test_a_replaced_file_keeps_its_mode_and_a_new_one_follows_the_umask(tmp_path):
    for mode in (0o600, 0o755, 0o640):
        target = tmp_path / f"file-{mode:o}.txt"
        target.write_text("old")
        os.chmod(target, mode)
        io.write_text(target, "new")
        assert stat.S_IMODE(target.stat().st_mode) == mode and target.read_text() == "new"
    umask = os.umask(0o027)
    try:
        fresh = io.write_text(tmp_path / "fresh.txt", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640
    folder = tmp_path / "unet"
    folder.mkdir()
    os.chmod(folder, 0o750)
    with io.atomic_directory(folder) as temporary:
        (temporary / "config.json").write_text("{}")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750 and (folder / "config.json").is_file()


def test_a_symbolic_link_stays_a_link_to_the_rewritten_file(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    io.write_json(link, {"new": 1})
    assert link.is_symlink() and json.loads(real.read_text()) == {"new": 1}


def test_stale_temporaries_of_the_same_target_are_removed_and_nothing_else(tmp_path):
    target = tmp_path / "results.json"
    dead = _dead_pid()
    stale = [f".results.json.{dead}-0a1b2c3d.tmp", f".results.json.{dead}.tmp"]  # this and the earlier naming
    live = f".results.json.{os.getpid()}-0a1b2c3d.tmp"  # a write in progress (this process)
    old_live = f".results.json.{os.getppid()}-99999999.tmp"  # alive pid, but a day old: a reused pid
    others = [f".other.json.{dead}-0a1b2c3d.tmp", f".results.json.1.{dead}-0a1b2c3d.tmp", "results.json.tmp"]
    for name in [*stale, live, old_live, *others]:
        (tmp_path / name).write_text("partial")
    stale_dir = tmp_path / f".results.json.{dead}-12345678.tmp"
    stale_dir.mkdir()
    (stale_dir / "weights.bin").write_text("partial")
    day_ago = time.time() - io.STALE_AFTER_S - 60
    os.utime(tmp_path / old_live, (day_ago, day_ago))
    io.write_json(target, {"ok": True})
    assert _leftovers(tmp_path) == sorted([live, others[0], others[1]])
    assert (tmp_path / others[2]).is_file()  # not a temporary's name: a user's file


def test_a_folder_backup_left_between_the_two_renames_is_put_back(tmp_path):
    """A writer killed after moving the old folder aside and before moving the new one in left the target missing:
    the next write to it restores the backup first (then replaces it as usual)."""
    backup = tmp_path / f".vae.{_dead_pid()}-0a1b2c3d.old"
    backup.mkdir()
    (backup / "config.json").write_text("old")
    assert io.remove_stale_temporaries(tmp_path / "vae") == [backup]
    assert (tmp_path / "vae" / "config.json").read_text() == "old" and _leftovers(tmp_path) == []
    with io.atomic_directory(tmp_path / "vae") as folder:
        (folder / "weights.bin").write_text("new")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["weights.bin"] and _leftovers(tmp_path) == []


def test_writers_for_every_format(tmp_path):
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    io.save_numpy(tmp_path / "pool.npy", array)
    assert np.array_equal(np.load(tmp_path / "pool.npy"), array) and not (tmp_path / "pool.npy.npy").exists()
    image = Image.new("RGB", (4, 4), "red")
    io.save_image(tmp_path / "a.png", image)
    io.save_image(tmp_path / "b.jpg", image)
    assert Image.open(tmp_path / "a.png").format == "PNG" and Image.open(tmp_path / "b.jpg").format == "JPEG"
    with pytest.raises(ValueError, match="suffix"):
        io.save_image(tmp_path / "grid", image)
    io.append_jsonl(tmp_path / "rows.jsonl", {"row": 1})
    io.append_jsonl(tmp_path / "rows.jsonl", {"row": np.float32(0.5)}, default=float)
    assert io.read_jsonl(tmp_path / "rows.jsonl") == [{"row": 1}, {"row": 0.5}]
    assert io.read_jsonl(tmp_path / "missing.jsonl") == []
    assert _leftovers(tmp_path) == []


def test_no_direct_writes_left_in_the_package():
    """Every file the library writes goes through conceptsmith.io: the only write calls left write into the
    temporary path or folder io hands them (``tmp`` / ``temporary``) or into memory (``buffer``). Not covered by
    this scan: ``.save(`` (an Edit's save is atomic, a PIL image's must go through io.save_image) and
    append-only logs (``open(..., "a")``)."""
    import re

    direct = re.compile(r"""\bopen\([^)]*["'][wx]b?["']|\.write_text\(|\.write_bytes\(|\btorch\.save\(|\bnp\.save\("""
                        r"""|\bsave_file\(|\.save_pretrained\(|\bos\.(replace|rename)\(|\bshutil\.copy|\bjson\.dump\(""")
    into_temporary = re.compile(r"\b(tmp|temporary|buffer|handle\b.*np\.save)")
    exempt = {  # file: why
        "conceptsmith/cli/errors.py": "a crash report: a new file per crash, written while the command is failing",
    }
    found = []
    for folder in ("conceptsmith", "erasure", "customization", "evaluation"):
        for path in sorted((REPO / folder).rglob("*.py")):
            name = str(path.relative_to(REPO))
            if name in exempt or name == "conceptsmith/io.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0].strip()
                if direct.search(code) and not into_temporary.search(code) and not code.startswith(('"', "f\"")):
                    found.append(f"{name}:{number}: {code}")
    assert found == []


# -- generate: resume a stopped run ----------------------------------------------------------------------------


def _generate(out: Path, *extra: str):
    from conceptsmith.cli import app

    return runner.invoke(app, ["generate", "-m", "builtin:tiny-test", "-p", "a red circle", "-p", "a blue star",
                               "--seeds", "0-2", "--batch-size", "2", "-o", str(out), *extra])


def test_generate_stopped_midway_keeps_its_images_and_a_rerun_makes_only_the_rest(tmp_path, monkeypatch):
    from conceptsmith import generation

    whole = _generate(tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    real_batch = generation._run_batch
    made: list[int] = []

    def stopped_after_one_batch(pipe, batch, settings):
        if made:
            raise KeyboardInterrupt  # Ctrl-C during the second batch
        made.append(len(batch))
        return real_batch(pipe, batch, settings)

    monkeypatch.setattr(generation, "_run_batch", stopped_after_one_batch)
    out = tmp_path / "resumed"
    assert _generate(out).exit_code != 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and len(manifest["images"]) == 2 and len(list(out.glob("*.png"))) == 2
    assert _leftovers(out) == []

    counted: list[int] = []
    monkeypatch.setattr(generation, "_run_batch", lambda pipe, batch, settings: counted.append(len(batch))
                        or real_batch(pipe, batch, settings))
    rerun = _generate(out)
    assert rerun.exit_code == 0, rerun.output
    assert sum(counted) == 4 and "kept 2 images" in rerun.output  # 6 images: 2 kept, 4 made
    assert json.loads((out / "manifest.json").read_text()) == json.loads((tmp_path / "whole" / "manifest.json").read_text())
    for name in sorted(p.name for p in (tmp_path / "whole").glob("*.png")):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name

    # an image changed on disk is made again; other arguments make everything again
    first = json.loads((out / "manifest.json").read_text())["images"][0]["file"]
    Image.new("RGB", (16, 16), "black").save(out / first)
    counted.clear()
    assert _generate(out).exit_code == 0 and sum(counted) == 1
    assert (out / first).read_bytes() == (tmp_path / "whole" / first).read_bytes()
    counted.clear()
    assert _generate(out, "--steps", "1").exit_code == 0 and sum(counted) == 6


# -- bench: finished rows survive a stopped run -----------------------------------------------------------------


def test_bench_stopped_after_a_row_reuses_it_and_gives_the_numbers_of_one_run(tmp_path, monkeypatch, evaluator_file):
    import torch

    from conceptsmith.evaluation import engine, erasure_suite, session

    torch.set_num_threads(1)
    kwargs = dict(model="builtin:tiny-test", evaluator=str(evaluator_file), progress=False, report=False,
                  cache_dir=tmp_path / "cache")
    whole = engine.run_bench("shapes-smoke", tmp_path / "whole", **kwargs)
    real_score = erasure_suite._score
    scored: list[int] = []

    def stopped_at_the_second_row(*args, **kw):
        if scored:
            raise KeyboardInterrupt
        scored.append(1)
        return real_score(*args, **kw)

    monkeypatch.setattr(erasure_suite, "_score", stopped_at_the_second_row)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        engine.run_bench("shapes-smoke", out, **kwargs)
    journal = io.read_jsonl(out / session.ROWS_JOURNAL)
    assert [entry["row"]["method"] for entry in journal] == ["unedited"] and not (out / "results.json").exists()

    scored.clear()
    monkeypatch.setattr(erasure_suite, "_score", lambda *args, **kw: scored.append(1) or real_score(*args, **kw))
    engine.run_bench("shapes-smoke", out, **kwargs)
    assert len(scored) == 1  # only the row the stopped run had not finished
    assert not (out / session.ROWS_JOURNAL).exists()  # results.json holds them all
    written = json.loads((out / "results.json").read_text())
    expected = json.loads(json.dumps(whole.results, default=float))
    for key in ("images", "summary", "summary_by_task"):
        assert written[key] == expected[key], key
    timing = ("edit_seconds",)  # the whole run fitted the edit, the others loaded it from the shared cache
    assert [{k: v for k, v in row.items() if k not in timing} for row in written["rows"]] == [
        {k: v for k, v in row.items() if k not in timing} for row in expected["rows"]
    ]


# -- world train: a new folder, never the shipped weights ------------------------------------------------------


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_world_train_out_refuses_the_shipped_weights_and_folders_it_did_not_make(tmp_path, monkeypatch):
    """The UNet stage (faked: no training) with --out: the shipped folder is refused even with --overwrite, a foreign
    non-empty folder needs --overwrite, a folder an earlier run made resumes; the shipped files are only read."""
    from conceptsmith.cli.world import MARKER, app
    from conceptsmith.world import unet_train
    from conceptsmith.world.pipeline import PIPE_DIR, SHIPPED_DIR

    monkeypatch.setenv("CONCEPTSMITH_CACHE", str(tmp_path / "cache"))
    before = _tree(SHIPPED_DIR)
    trained: list[Path] = []
    monkeypatch.setattr(unet_train, "train_unet", lambda cfg, pipe_dir, **kwargs: trained.append(pipe_dir))

    def train(out: Path, *extra: str):
        return runner.invoke(app, ["train", "--stages", "unet", "--budget-hours", "0", "--out", str(out), *extra])

    for shipped in (SHIPPED_DIR, PIPE_DIR, PIPE_DIR / "unet"):
        refused = train(shipped, "--overwrite")
        assert refused.exit_code == 2 and "shipped ShapesWorld weights" in refused.output, refused.output
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    refused = train(foreign)
    assert refused.exit_code == 2 and "--overwrite" in refused.output and trained == []
    (tmp_path / "a-file").write_text("")
    assert train(tmp_path / "a-file").exit_code == 2
    assert train(foreign, "--overwrite").exit_code == 0 and (foreign / "notes.txt").read_text() == "keep"
    fresh = tmp_path / "runs" / "new"
    assert train(fresh).exit_code == 0 and (fresh / MARKER).is_file()
    resumed = train(fresh)  # made by `world train`: a rerun resumes there without --overwrite
    assert resumed.exit_code == 0, resumed.output
    assert trained == [foreign / "shapes-sd", fresh / "shapes-sd", fresh / "shapes-sd"]
    for part in ("tokenizer", "text_encoder", "vae"):  # what the UNet reads, taken from the shipped pipeline
        for path in (PIPE_DIR / part).iterdir():
            assert (fresh / "shapes-sd" / part / path.name).read_bytes() == path.read_bytes()
    assert _tree(SHIPPED_DIR) == before


def test_world_writers_refuse_the_shipped_folder_and_replace_their_output_whole(tmp_path, tiny_pipe):
    from diffusers import StableDiffusionPipeline

    from conceptsmith.world import clip_train, unet_train, vae_train
    from conceptsmith.world.pipeline import PIPE_DIR, SHIPPED_DIR, save_pipeline

    pipe, _ = tiny_pipe
    parts = dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    refusals = [
        lambda: save_pipeline(PIPE_DIR, **parts),
        lambda: unet_train.export_unet(pipe.unet, PIPE_DIR),
        lambda: unet_train.train_unet(None, PIPE_DIR),
        lambda: vae_train.train_vae(None, PIPE_DIR / "vae"),
        lambda: vae_train.finetune_decoder(PIPE_DIR / "vae"),
        lambda: clip_train.train_text_tower(PIPE_DIR),
        lambda: clip_train.train_evaluator(SHIPPED_DIR),
    ]
    for refused in refusals:
        with pytest.raises(ValueError, match="shipped ShapesWorld weights"):
            refused()
    out = tmp_path / "shapes-sd"
    save_pipeline(out, **parts)
    (out / "unet" / "stray.bin").write_text("from an older export")
    unet_train.export_unet(pipe.unet, out)
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert _leftovers(tmp_path) == [] and _leftovers(out) == []
    loaded = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert loaded.unet.config.cross_attention_dim == pipe.unet.config.cross_attention_dim
