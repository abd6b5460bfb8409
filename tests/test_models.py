"""load_pipeline: every door (builtin, local dir, single file, hub id) and every bad-input path."""

from __future__ import annotations

import pytest
import torch

from conceptsmith.models import ModelLoadError, detect_family, fingerprint, load_pipeline


def test_builtin_loads_with_model_info():
    pipe, info = load_pipeline("builtin:tiny-test")
    assert info.family == "sd1"
    assert info.text_embed_dim == 32
    # CrossAttnDownBlock2D x2 (1 layer each), mid block (1), CrossAttnUpBlock2D x2 (2 layers each)
    assert info.cross_attention_layers == 7
    assert info.fingerprint == fingerprint(pipe)
    assert info.spec == "builtin:tiny-test"


def test_unknown_builtin_lists_known_ones():
    with pytest.raises(ModelLoadError, match=r"Unknown builtin model 'builtin:nope'.*builtin:tiny-test"):
        load_pipeline("builtin:nope")


def test_local_directory_round_trip(tiny_pipe, tmp_path):
    pipe, info = tiny_pipe
    pipe.save_pretrained(tmp_path / "model")
    loaded, loaded_info = load_pipeline(str(tmp_path / "model"))
    assert loaded_info.fingerprint == info.fingerprint
    assert loaded_info.family == "sd1"


def test_directory_without_model_index_is_explained(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline"):
        load_pipeline(str(tmp_path))


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(ModelLoadError, match=r"does not exist"):
        load_pipeline(str(missing))


def test_pickled_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match=r"only \.safetensors"):
        load_pipeline(str(ckpt))


def test_unresolvable_hub_id_offline_says_how_to_pass_a_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"offline.*--model \./no-such-model"):
        load_pipeline("conceptsmith-test/no-such-model")


def test_empty_spec():
    with pytest.raises(ModelLoadError, match="Empty model spec"):
        load_pipeline("  ")


def test_fingerprint_ignores_dtype_but_sees_edits(tiny_pipe):
    pipe, info = tiny_pipe
    half = fingerprint(pipe.to(dtype=torch.float16))
    assert half == info.fingerprint
    pipe.to(dtype=torch.float32)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    with torch.no_grad():
        layer.weight[0, 0] += 0.5
    assert fingerprint(pipe) != info.fingerprint


def test_sdxl_family(tiny_sdxl_pipe):
    pipe, info = tiny_sdxl_pipe
    assert detect_family(pipe) == "sdxl"
    assert info.text_embed_dim == 64


def test_unreadable_single_file_names_the_fix(tiny_pipe, tmp_path):
    """A .safetensors file that is not an SD checkpoint: the error names the file and --single-file-config."""
    from safetensors.torch import save_file

    save_file({"some.tensor": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*--single-file-config"):
        load_pipeline(str(tmp_path / "model.safetensors"))


# ------------------------------------------------------------------ model configs, dtype and device


def test_model_config_file_gives_spec_dtype_and_device_which_arguments_override(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("spec: builtin:tiny-test\ndtype: bfloat16\ndevice: cpu\n")
    pipe, info = load_pipeline(str(config))
    assert info.spec == "builtin:tiny-test" and pipe.unet.dtype == torch.bfloat16 and pipe.device.type == "cpu"
    pipe, _ = load_pipeline(str(config), dtype="float32")
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    pipe, _ = load_pipeline("builtin:tiny-test", dtype=torch.float16, device="cpu")
    assert pipe.unet.dtype == torch.float16


def test_shipped_model_configs_by_name():
    from conceptsmith.models import resolve_model

    shapes = resolve_model("shapes")
    assert shapes.spec == "builtin:shapes" and shapes.config.endswith("models/shapes.yaml")
    assert shapes.dtype == torch.float32 and shapes.device == torch.device("cpu")
    sd14 = resolve_model("configs/models/sd14.yaml", device="cpu")
    assert sd14.spec == "CompVis/stable-diffusion-v1-4" and sd14.dtype == torch.float16
    assert resolve_model("sd14", dtype="bfloat16", device="cpu").dtype == torch.bfloat16
    plain = resolve_model("CompVis/stable-diffusion-v1-4", device="cpu")
    assert plain.config is None and plain.dtype == torch.float32


def test_a_local_folder_named_like_a_model_config_is_the_folder(tmp_path, monkeypatch):
    from conceptsmith.models import resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()
    assert resolve_model("shapes", device="cpu").config is None


def test_bad_model_configs_name_the_file_and_key(tmp_path):
    from conceptsmith.config import ConfigError

    config = tmp_path / "bad.yaml"
    config.write_text("spec: builtin:tiny-test\ndevice: gpu\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid ModelConfig:\n  key 'device'"):
        load_pipeline(str(config))
    with pytest.raises(ConfigError, match=r"missing\.yaml' does not exist"):
        load_pipeline(str(tmp_path / "missing.yaml"))
