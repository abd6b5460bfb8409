"""Data-parallel training: ``accelerate launch -m conceptsmith customize`` with two CPU processes (torchrun + gloo)
trains under DDP and, with gradient_accumulation_steps a multiple of the processes, gives the one-process run's
edit (each process does its share of the micro-steps with the one-process run's seeds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conceptsmith.edits import Edit

REPO = Path(__file__).resolve().parent.parent
CONFIG = {
    "method": "lora",
    "params": {"steps": 3, "batch_size": 1, "gradient_accumulation_steps": 2, "learning_rate": 1e-3,
               "resolution": 16, "eval_batches": 0, "progress": False, "token": "learn"},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A saved tiny pipeline, four reference images and the training config."""
    from conftest import build_tiny_pipe

    root = tmp_path_factory.mktemp("ddp")
    build_tiny_pipe().save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    (root / "refs").mkdir()
    for index in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "refs" / f"{index}.png")
    (root / "lora.yaml").write_text(json.dumps(CONFIG))  # JSON is YAML
    return root


def arguments(root: Path, out: Path) -> list[str]:
    return ["customize", "--model", str(root / "model"), "--config", str(root / "lora.yaml"), "--token", "<ddp>",
            "--class-word", "toy", "--images", str(root / "refs"), "--device", "cpu", "--out", str(out)]


def test_two_processes_train_under_ddp_and_match_one(inputs, tmp_path):
    from typer.testing import CliRunner

    from conceptsmith.cli import app

    one = CliRunner().invoke(app, arguments(inputs, tmp_path / "one.safetensors"))
    assert one.exit_code == 0, one.output
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "conceptsmith"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    two = subprocess.run([*launch, *arguments(inputs, tmp_path / "two.safetensors")], env=env, capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert two.returncode == 0, two.stderr[-3000:]
    single, ddp = Edit.load(tmp_path / "one.safetensors"), Edit.load(tmp_path / "two.safetensors")
    assert single.metadata["training"]["processes"] == 1 and ddp.metadata["training"]["processes"] == 2
    assert ddp.metadata["losses"] == pytest.approx(single.metadata["losses"], rel=1e-5)
    tensors = {name: t for part in (single.parts or [single]) for name, t in part.tensors.items()}
    trained = {name: t for part in (ddp.parts or [ddp]) for name, t in part.tensors.items()}
    assert tensors.keys() == trained.keys() and len(tensors) > 2
    for name, tensor in tensors.items():
        torch.testing.assert_close(trained[name], tensor, msg=name)
    assert any(not torch.equal(t, torch.zeros_like(t)) for n, t in trained.items() if "lora_B" in n)  # it trained
