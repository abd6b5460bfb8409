"""CLI: generate / methods / inspect, including every bad-input path's message."""

from __future__ import annotations

import json
import os
import time

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


def test_grid_row_labels_run_across_the_empty_tiles_after_them():
    """A row's label (a bench row such as 'joint-lora-all-layers-cutmix @ seed 3') is not cut to one tile."""
    from conceptsmith.grids import image_grid

    tiles = [Image.new("RGB", (32, 32), "gray")] * 6

    def ink_under(grid: Image.Image, tile: int) -> int:
        x, y = (tile % 3) * 32, (tile // 3) * 44 + 32
        return int((np.asarray(grid.crop((x, y, x + 32, y + 12))) < 128).any(axis=-1).sum())

    spanning = image_grid(tiles, columns=3, labels=["a long row label @ seed 3", "", "", "next", "", ""])
    assert ink_under(spanning, 1) > 0 and ink_under(spanning, 2) > 0  # runs over the two empty tiles
    assert ink_under(spanning, 4) == 0  # 'next' fits its own tile
    stopped = image_grid(tiles, columns=3, labels=["a long row label @ seed 3", "b", "", "", "", ""])
    alone = image_grid(tiles, columns=3, labels=["", "b", "", "", "", ""])
    assert ink_under(stopped, 1) == ink_under(alone, 1)  # a labelled neighbour keeps its own strip


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
    attacks = result.output.split("attacks:")[1].split("metrics:")[0]
    assert all(name in attacks for name in ("embedding", "ring_a_bell", "textual_inversion", "unlearndiffatk", "p4d"))
    editors = result.output.split("editors:")[1].split("attacks:")[0]
    assert all(name in editors for name in ("esd", "concept-ablation", "te-unlearn", "advunlearn", "mace"))


def test_generate_applies_edits_in_order_and_records_them(tiny_pipe, tmp_path):
    """--edit changes the images; the manifest names the edit; a mismatched base is refused clearly."""
    import torch

    from conceptsmith.attention import kv_projections
    from conceptsmith.edits import Edit

    pipe, info = tiny_pipe
    name, layer = next(iter(kv_projections(pipe.unet).items()))
    torch.manual_seed(0)
    up, down = torch.randn(layer.out_features, 1), torch.randn(1, layer.in_features)
    edit = Edit.from_weight_deltas("test", ["red"], {}, info.fingerprint, info.family, {f"unet.{name}": (up, down)})
    edit.save(tmp_path / "e.safetensors")
    args = ["generate", "-m", "builtin:tiny-test", "-p", "a red circle", "--seeds", "0"]
    plain = _run(*args, "-o", str(tmp_path / "plain"))
    edited = _run(*args, "--edit", str(tmp_path / "e.safetensors"), "-o", str(tmp_path / "edited"))
    assert plain.exit_code == 0 and edited.exit_code == 0, edited.output
    manifest = json.loads((tmp_path / "edited" / "manifest.json").read_text())
    assert manifest["edits"][0]["method"] == "test"
    a = np.asarray(Image.open(tmp_path / "plain" / "000_a-red-circle_s0.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "edited" / "000_a-red-circle_s0.png"), dtype=np.int16)
    assert np.abs(a - b).max() > 1

    foreign = Edit.from_weight_deltas("test", ["red"], {}, "0000000000000000", info.family, {f"unet.{name}": (up, down)})
    foreign.save(tmp_path / "foreign.safetensors")
    refused = _run(*args, "--edit", str(tmp_path / "foreign.safetensors"), "-o", str(tmp_path / "x"))
    assert refused.exit_code == 2
    assert "0000000000000000" in refused.output and info.fingerprint in refused.output

    missing = _run(*args, "--edit", str(tmp_path / "none.safetensors"), "-o", str(tmp_path / "y"))
    assert missing.exit_code == 2 and "none.safetensors" in missing.output


def test_console_entry_point_mounts_every_command():
    """`python -m conceptsmith.cli --help` (what the console script runs) lists all commands incl. `world`."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "conceptsmith.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("generate", "methods", "inspect", "erase", "customize", "merge", "export", "to-lora", "bench",
                    "evaluate", "world"):
        assert command in result.stdout


def test_world_check_measures_a_candidate_generator():
    from conceptsmith.cli.world import app as world_app

    result = runner.invoke(world_app, ["check", "--model", "builtin:tiny-test", "--only", "two_object", "--seeds", "1",
                                       "--no-eval", "--json"])
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout.strip().splitlines()[-1])  # stdout: a stale logging handler may write to stderr
    assert 0.0 <= measured["gen_two_object_acc"] <= 1.0 and measured["images"] == 8
    assert -1.0 <= measured["text_relation_cos"] < 1.0 and -1.0 <= measured["text_color_cos"] < 1.0
    refused = runner.invoke(world_app, ["check", "--model", "builtin:tiny-test", "--model-card"])
    assert refused.exit_code == 2 and "shipped builtin:shapes" in refused.output


def test_world_train_uses_the_recipe_unless_told_otherwise(monkeypatch, tmp_path):
    """`world train` builds the UNet config from UNetTrainConfig's defaults (the shipped recipe); only options given
    on the command line override them. Its log and training clock live in the cache dir."""
    from conceptsmith.cli.world import app as world_app
    from conceptsmith.world import unet_train

    seen: list = []
    monkeypatch.setenv("CONCEPTSMITH_CACHE", str(tmp_path / "cache"))  # a dir not there yet
    monkeypatch.setattr(unet_train, "train_unet", lambda cfg, **kwargs: seen.append(cfg))
    result = runner.invoke(world_app, ["train", "--stages", "unet", "--out", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    assert seen[-1] == unet_train.UNetTrainConfig(threads=os.cpu_count())  # alone, the stage takes every core
    assert "total wall" in result.output and "unet" in result.output
    result = runner.invoke(world_app, ["train", "--stages", "unet", "--unet-steps", "10", "--no-unet-attention-16",
                                       "--unet-offset-noise", "0", "--threads", "1", "--out", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    assert (seen[-1].steps, seen[-1].attention_16, seen[-1].offset_noise, seen[-1].threads) == (10, False, 0.0, 1)
    assert seen[-1].two_object_share == unet_train.UNetTrainConfig().two_object_share
    assert "stage unet" in (tmp_path / "cache" / "world" / "train.log").read_text()


def test_world_train_budget_hours_gives_the_unet_what_the_clock_has_left(monkeypatch, tmp_path):
    """--budget-hours (default 2.5) hands train_unet a deadline: the budget minus the wall time already on the
    training clock; 0 turns it off; it refuses to run the evaluator after a fitted UNet."""
    from conceptsmith.cli.world import app as world_app
    from conceptsmith.world import stage_clock, unet_train

    monkeypatch.setenv("CONCEPTSMITH_CACHE", str(tmp_path / "cache"))
    stage_clock.clock_dir().mkdir(parents=True)
    stage_clock._write(stage_clock.clock_dir() / "wall-1-1.json", stage_clock.WALL, 3600.0)  # an earlier run's hour
    deadlines: list = []
    monkeypatch.setattr(unet_train, "train_unet", lambda cfg, deadline=None, **kwargs: deadlines.append(deadline))
    before = time.time()
    result = runner.invoke(world_app, ["train", "--stages", "unet", "-o", str(tmp_path / "w")])  # --budget-hours: 2.5
    assert result.exit_code == 0, result.output
    assert before + 1.5 * 3600 - 60 <= deadlines[-1] <= time.time() + 1.5 * 3600
    assert "budget left" in (tmp_path / "cache" / "world" / "train.log").read_text()
    off = runner.invoke(world_app, ["train", "--stages", "unet", "--budget-hours", "0", "-o", str(tmp_path / "w")])
    assert off.exit_code == 0 and deadlines[-1] is None
    refused = runner.invoke(world_app, ["train", "--stages", "unet,evaluator", "--jobs", "1", "--budget-hours", "2",
                                        "-o", str(tmp_path / "w")])
    assert refused.exit_code == 2 and "--jobs 2" in refused.output


class _FakeProcess:
    """Stands in for the evaluator's child process: alive for ``alive_polls`` polls."""

    def __init__(self, alive_polls: int, exitcode: int = 0):
        self.alive_polls, self.exitcode, self.joined = alive_polls, exitcode, False

    def is_alive(self) -> bool:
        self.alive_polls -= 1
        return self.alive_polls >= 0

    def join(self) -> None:
        self.joined = True


def test_world_train_runs_the_evaluator_beside_the_generator(monkeypatch, tmp_path):
    """With --jobs 2 the evaluator stage goes to a second process; the generator's stages get one core, the UNet
    gets the second one once that process is done, and a failed evaluator fails the command."""
    from conceptsmith.cli import world as world_cli
    from conceptsmith.world import unet_train

    monkeypatch.setenv("CONCEPTSMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(world_cli.os, "cpu_count", lambda: 2)
    child = _FakeProcess(alive_polls=1)
    monkeypatch.setattr(world_cli, "_start_evaluator_process", lambda resume, log, out: child)
    threads_seen: list = []

    def fake_unet(cfg, threads_now=None, **kwargs):
        threads_seen.extend([cfg.threads, threads_now(), threads_now()])

    monkeypatch.setattr(unet_train, "train_unet", fake_unet)
    result = runner.invoke(world_cli.app, ["train", "--stages", "unet,evaluator", "-o", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    assert threads_seen == [1, 1, 2] and child.joined
    monkeypatch.setattr(world_cli, "_start_evaluator_process", lambda resume, log, out: _FakeProcess(0, exitcode=3))
    failed = runner.invoke(world_cli.app, ["train", "--stages", "unet,evaluator", "-o", str(tmp_path / "w")])
    assert failed.exit_code == 1 and "exit code 3" in failed.output


def test_stage_clock_sums_spans_over_runs_and_resets(monkeypatch, tmp_path):
    from conceptsmith.world import stage_clock

    monkeypatch.setenv("CONCEPTSMITH_CACHE", str(tmp_path))
    for _ in range(2):  # two resumed runs of the same stage
        with stage_clock.timed("vae", flush_s=0.01):
            time.sleep(0.05)
    with pytest.raises(RuntimeError), stage_clock.timed("unet"):  # a failing stage still records its time
        raise RuntimeError("killed")
    sums = stage_clock.totals()
    assert set(sums) == {"vae", "unet"} and sums["vae"] >= 0.1
    assert "vae" in stage_clock.report() and "total wall" in stage_clock.report()
    stage_clock.reset()
    assert stage_clock.totals() == {}
