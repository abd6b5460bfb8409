"""bench/gpu_check.py: the CPU run on tiny models writes every stage, and failures stop it with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"
STAGES = ["build", "uce_1", "uce_100", "apply", "generate", "revert", "lora", "esd"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_tiny_cpu_run_writes_every_stage(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["stages"]) == STAGES and "failed" not in report
    assert all(stage["seconds"] >= 0 and stage["peak_memory_mb"] is None for stage in report["stages"].values())
    assert report["dtype"] == "float16" and report["device"] == "cpu" and report["gpu"] is None
    assert {"torch", "diffusers", "transformers", "peft", "accelerate", "cuda"} <= set(report["versions"])
    assert report["stages"]["uce_100"]["concepts"] == 100 and report["stages"]["apply"]["modules"] == 20
    assert report["stages"]["generate"]["size"] == 64 and report["stages"]["generate"]["steps"] == 20
    for name in ("lora", "esd"):
        assert report["stages"][name]["train_seconds"] > 0 and report["stages"][name]["mixed_precision"] == "no"
    assert "all stages passed" in proc.stdout


def test_an_unavailable_device_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda:99", "--out", str(tmp_path / "x.json")],
                          env=ENV, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("gpu_check: error: Device 'cuda:99'")
    assert not (tmp_path / "x.json").exists()


def test_a_failing_stage_stops_the_check_and_names_it(tmp_path, monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(REPO))
    from bench.gpu_check import Check

    out = tmp_path / "partial.json"
    report = {"stages": {}}
    check = Check(torch.device("cpu"), report, out)
    assert check.stage("fine", lambda: 3) == 3

    def broken() -> None:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(SystemExit, match="gpu_check: stage 'broken' failed: RuntimeError: CUDA out of memory"):
        check.stage("broken", broken)
    written = json.loads(out.read_text())
    assert list(written["stages"]) == ["fine"] and written["failed"] == {"stage": "broken", "error": "RuntimeError: CUDA out of memory"}
