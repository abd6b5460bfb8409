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
