"""CLI: generate / methods / inspect, including every bad-input path's message."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conceptsmith.cli import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


def test_generate_writes_images_grid_and_manifest(tmp_path):
    out = tmp_path / "gen"
    result = _run("generate", "--model", "builtin:tiny-test", "-p", "a red circle", "-p", "a blue star",
                  "--seeds", "0,1,2", "--out", str(out))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["images"]) == 6
    assert manifest["settings"]["num_inference_steps"] == 2
    assert manifest["base_fingerprint"]
    for record in manifest["images"]:
        assert Image.open(out / record["file"]).size == (16, 16)
    grid = Image.open(out / "grid.png")
    assert grid.size[0] == 3 * 16 and grid.size[1] >= 2 * 16


def test_generate_is_deterministic_per_seed_and_batch_independent(tmp_path):
    first = _run("generate", "-m", "builtin:tiny-test", "-p", "a red circle", "--seeds", "0-1",
                 "--batch-size", "2", "-o", str(tmp_path / "a"))
    second = _run("generate", "-m", "builtin:tiny-test", "-p", "a red circle", "--seeds", "1",
                  "--batch-size", "1", "-o", str(tmp_path / "b"))
    assert first.exit_code == 0 and second.exit_code == 0
    a0 = np.asarray(Image.open(tmp_path / "a" / "000_a-red-circle_s0.png"), dtype=np.int16)
    a1 = np.asarray(Image.open(tmp_path / "a" / "000_a-red-circle_s1.png"), dtype=np.int16)
    b1 = np.asarray(Image.open(tmp_path / "b" / "000_a-red-circle_s1.png"), dtype=np.int16)
    assert np.abs(a1 - b1).max() <= 1  # same seed, other batch size: same image
    assert np.abs(a0 - a1).max() > 1  # other seed: other image


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "-m", "builtin:tiny-test", "--seeds", "0"], "No prompts given"),
        (["generate", "-m", "builtin:tiny-test", "-p", "x", "--seeds", "0,one"], "Seed 'one' is not an integer"),
        (["generate", "-m", "builtin:unknown", "-p", "x"], "Unknown builtin model 'builtin:unknown'"),
        (["generate", "-m", "./missing/model/dir", "-p", "x"], "does not exist"),
        (["generate", "-m", "builtin:tiny-test", "-p", "x", "--dtype", "float8"], "Unknown dtype 'float8'"),
        (["generate", "-m", "builtin:tiny-test", "-p", "x", "--prompts-file", "nope.txt"], "Prompts file 'nope.txt'"),
        (["inspect", "builtin:unknown"], "Unknown builtin model"),
    ],
)
def test_bad_inputs_exit_2_with_a_clear_message(args, message):
    result = _run(*args)
    assert result.exit_code == 2
    assert message in result.output


def test_inspect_reports_layers_and_fingerprint():
    result = _run("inspect", "builtin:tiny-test", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["family"] == "sd1"
    assert report["cross_attention_layers"] == 7 and report["kv_matrices"] == 14
    assert all(layer["d_in"] == 32 for layer in report["layers"])
    assert len(report["fingerprint"]) == 16


def test_methods_lists_builtin_models():
    result = _run("methods")
    assert result.exit_code == 0, result.output
    assert "builtin:tiny-test" in result.output
