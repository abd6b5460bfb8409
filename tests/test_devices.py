"""Devices and precisions: --device / --dtype resolution and its errors, and edits on half-precision pipelines
(a bfloat16 / float16 tiny pipeline on the CPU: a UCE edit and a trained LoRA edit apply, generate, revert bit-exact)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conceptsmith.devices import DeviceError, default_device, resolve_device, resolve_dtype
from conceptsmith.generation import GenerationSettings, generate
from conceptsmith.registry import EditRequest, get_editor
from conceptsmith.training import resolve_mixed_precision

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def gpus(monkeypatch):
    """Pretend ``count`` CUDA GPUs are visible (0: none)."""

    def fake(module: object, name: str, value: object) -> None:
        # wraps(): torch._dynamo, imported lazily, reads these functions' __wrapped__
        monkeypatch.setattr(module, name, functools.wraps(getattr(module, name))(lambda: value))

    def set_count(count: int) -> None:
        fake(torch.cuda, "is_available", count > 0)
        fake(torch.cuda, "device_count", count)

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    fake(torch.backends.mps, "is_available", False)
    return set_count


def test_default_device_prefers_cuda_then_mps_then_cpu(gpus, monkeypatch):
    gpus(0)
    assert default_device() == "cpu" and resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert default_device() == "mps"
    gpus(1)
    assert default_device() == "cuda"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # accelerate launch --cpu
    assert default_device() == "cpu"


def test_cuda_resolves_to_this_process_gpu(gpus, monkeypatch):
    gpus(2)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("CUDA:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "3")  # the fourth process of a launch on a 2-GPU machine, as accelerate deals them
    assert resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"'cuda:2' does not exist: this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_missing_and_unknown_devices_say_what_to_pass(gpus):
    gpus(0)
    with pytest.raises(DeviceError, match=r"'cuda' was requested but no CUDA GPU is visible .* Pass --device cpu"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="'mps' was requested .* pass --device cpu"):
        resolve_device("mps")
    with pytest.raises(DeviceError, match="Unknown device 'gpu'; pass cuda, cuda:N, mps, cpu or auto"):
        resolve_device("gpu")


def test_dtypes():
    assert resolve_dtype(None) is torch.float32
    assert [resolve_dtype(n) for n in ("float32", "float16", "bfloat16", "torch.bfloat16")] == [
        torch.float32, torch.float16, torch.bfloat16, torch.bfloat16]
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(DeviceError, match="Unknown dtype 'float8'; allowed values: float32, float16, bfloat16"):
        resolve_dtype("float8")
    with pytest.raises(DeviceError, match="Unsupported dtype torch.float64"):
        resolve_dtype(torch.float64)


def test_cli_device_and_dtype_errors_are_one_line_with_exit_code_2(gpus, tmp_path):
    from conceptsmith.cli import app

    gpus(0)
    runner = CliRunner()
    (tmp_path / "on-cuda.yaml").write_text("spec: builtin:tiny-test\ndevice: cuda\n")
    for args, message in [
        (["--device", "cuda"], "error: Device 'cuda' was requested but no CUDA GPU is visible"),
        (["--dtype", "half"], "error: Unknown dtype 'half'"),
        (["--model", str(tmp_path / "on-cuda.yaml")], "on-cuda.yaml sets device: cuda. Device 'cuda' was requested"),
    ]:
        result = runner.invoke(app, ["generate", "-m", "builtin:tiny-test", "-p", "a cat", *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_auto_mixed_precision_follows_a_half_precision_model_on_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    cuda = torch.device("cuda", 0)
    assert resolve_mixed_precision("auto", cuda, torch.float16) == "fp16"
    assert resolve_mixed_precision("auto", cuda, torch.bfloat16) == "bf16"
    assert resolve_mixed_precision("auto", cuda, torch.float32) == "bf16"
    assert resolve_mixed_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_mixed_precision("auto", cuda, torch.float32) == "fp16"
    assert resolve_mixed_precision("auto", torch.device("cpu"), torch.float16) == "no"


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.clone() for name in ("unet", "text_encoder")
            for key, value in getattr(pipe, name).state_dict().items()}


def _draw(pipe) -> np.ndarray:
    settings = GenerationSettings(num_inference_steps=1, guidance_scale=2.0, height=16, width=16, batch_size=1)
    [(_, _, image)] = generate(pipe, ["a painting of a cat"], [0], settings, progress=False)
    return np.asarray(image)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_uce_and_lora_edits_apply_generate_and_revert_bit_exactly_in_half_precision(dtype):
    from conftest import build_tiny_pipe

    from conceptsmith.edits import applied_edits

    pipe = build_tiny_pipe(dtype)
    before, plain = _state(pipe), _draw(pipe)
    request = EditRequest(concepts=["cat"], guide="dog")
    uce = get_editor("uce")({}).fit(pipe, request)
    esd = get_editor("esd")({"steps": 2, "trajectories": 1, "ddim_steps": 2, "eval_batches": 0, "progress": False,
                             "mode": "lora", "learning_rate": 1e-2}).fit(pipe, request)
    assert _state(pipe).keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in _state(pipe).items())
    assert uce.kind == "weights" and esd.kind == "lora"
    assert math.isfinite(esd.metadata["training"]["loss_end"])
    uce.apply(pipe)
    esd.apply(pipe)
    edited = _draw(pipe)
    assert not np.array_equal(edited, plain)  # the edits change the image
    assert pipe.unet.dtype == dtype and any("lora_" in name for name, _ in pipe.unet.named_parameters())
    esd.revert(pipe)
    uce.revert(pipe)
    after = _state(pipe)
    assert applied_edits(pipe) == [] and after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    assert np.array_equal(_draw(pipe), plain)


def test_bench_yaml_device_and_dtype(tmp_path):
    """A bench YAML may set device / dtype (validated); images of a half-precision model get their own cache keys."""
    from conftest import build_tiny_pipe

    from conceptsmith.config import ConfigError
    from conceptsmith.evaluation.bench_spec import GenerationConfig
    from conceptsmith.evaluation.cache import ImageCache
    from conceptsmith.evaluation.engine import load_bench

    head = "name: x\nmodel: builtin:tiny-test\nevaluator: e\nseeds: [0]\ntasks: [{name: t, erase: [a]}]\n"
    config = tmp_path / "b.yaml"
    config.write_text(head + "device: cpu\ndtype: bfloat16\n")
    cfg, _ = load_bench(config)
    assert (cfg.device, cfg.dtype) == ("cpu", "bfloat16")
    config.write_text(head + "dtype: half\n")
    with pytest.raises(ConfigError, match="key 'dtype'.*allowed values"):
        load_bench(config)

    class OneProcess:
        process_index, num_processes = 0, 1

    settings = GenerationConfig().pipeline_kwargs()
    paths = {dtype: ImageCache(build_tiny_pipe(dtype), settings, 4, tmp_path, OneProcess()).path("e", "a cat", 0)
             for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    assert len(set(paths.values())) == 3
