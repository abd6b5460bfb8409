"""export_single_file: a pipeline written in the original Stable Diffusion (LDM) layout loads back bit-exact.

Round trips go through ``conceptsmith.models.load_pipeline`` (diffusers' ``from_single_file`` with a
local config directory whose weight files were deleted, so every tensor must come from the single
file). Full-size SD 1.5 / 2.1 / SDXL layouts are checked on the meta device against diffusers' own
reader and the key names of the published checkpoints.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from conceptsmith.export import ExportError, export_single_file, ldm_state_dict, unet_to_ldm
from conceptsmith.models import ModelLoadError, describe, load_pipeline

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PREFIXES = {
    "sd1": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."),
    "sd2": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."),
    "sdxl": (
        "model.diffusion_model.",
        "first_stage_model.",
        "conditioner.embedders.0.transformer.text_model.",
        "conditioner.embedders.1.model.",
    ),
}


def _scramble(pipe):
    """Distinct random values everywhere: fresh norms are all ones / zeros, so a swapped key would go unnoticed."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in COMPONENTS:
            module = getattr(pipe, name, None)
            for parameter in module.parameters() if module is not None else ():
                parameter.add_(torch.randn(parameter.shape, generator=generator))
    return pipe


def _sd2_like(pipe):
    """SD 2.x: linear projections in the transformers (detected as sd2), OpenCLIP layout for the text encoder."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    pipe.register_modules(unet=UNet2DConditionModel.from_config(pipe.unet.config, use_linear_projection=True))
    return pipe


def _sdxl_like(pipe):
    """A tiny SDXL whose two text encoders differ in width, as in SDXL (768 / 1280).

    diffusers' single-file reader tells its CLIP and OpenCLIP encoders apart by width, so the
    ``tiny_sdxl_pipe`` fixture (both 32 wide) would load its second encoder from the first's weights.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    text_config = {**pipe.text_encoder.config.to_dict(), "hidden_size": 48, "pad_token_id": 0}
    second = CLIPTextModelWithProjection(CLIPTextConfig(**text_config)).eval()
    unet = UNet2DConditionModel.from_config(
        pipe.unet.config,
        cross_attention_dim=32 + 48,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + second.config.projection_dim,
    )
    xl = StableDiffusionXLPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        text_encoder_2=second,
        tokenizer=pipe.tokenizer,
        tokenizer_2=copy.deepcopy(pipe.tokenizer),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config),
    )
    xl.set_progress_bar_config(disable=True)
    return xl


def _round_trip(pipe, tmp_path):
    config_dir = tmp_path / "config"
    pipe.save_pretrained(config_dir)
    for weights in config_dir.glob("*/*.safetensors"):
        weights.unlink()  # keep only the configs: every weight must come from the single file
    checkpoint = export_single_file(pipe, tmp_path / "edited.safetensors")
    loaded, info = load_pipeline(str(checkpoint), single_file_config=str(config_dir))
    return checkpoint, loaded, info


def _assert_same_weights(original, loaded):
    for name in COMPONENTS:
        module = getattr(original, name, None)
        if module is None:
            continue
        want, got = module.state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        differ = [key for key in want if not torch.equal(want[key], got[key])]
        assert not differ, f"{name}: {differ[:5]}"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_round_trip_through_load_pipeline_is_bit_exact(tiny_pipe, tmp_path, family):
    pipe = {"sd1": lambda p: p, "sd2": _sd2_like, "sdxl": _sdxl_like}[family](tiny_pipe[0])
    _scramble(pipe)
    expected = describe(pipe)
    assert expected.family == family

    checkpoint, loaded, info = _round_trip(pipe, tmp_path)

    with safe_open(str(checkpoint), framework="pt") as handle:
        keys, header = list(handle.keys()), handle.metadata()
    for prefix in PREFIXES[family]:
        assert any(key.startswith(prefix) for key in keys), prefix
    assert all(key.startswith(PREFIXES[family]) for key in keys)
    provenance = json.loads(header["conceptsmith"])
    assert provenance["family"] == family and provenance["fingerprint"] == expected.fingerprint
    assert header["modelspec.architecture"].startswith(
        {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl"}[family]
    )

    _assert_same_weights(pipe, loaded)
    assert (info.family, info.fingerprint) == (family, expected.fingerprint)
    assert type(loaded).__name__ == type(pipe).__name__


# ------------------------------------------------------------------ full-size layouts on the meta device


def _full_size(family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from test_architectures import (
        CLIP_VIT_L_TEXT,
        OPENCLIP_BIGG_TEXT,
        OPENCLIP_VIT_H_TEXT,
        UNETS,
        _on_meta,
        _text_encoder,
    )

    unet_config = UNETS[{"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}[family]][0]
    vae = _on_meta(
        lambda: AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
        )
    )
    pipe = SimpleNamespace(unet=_on_meta(lambda: UNet2DConditionModel(**unet_config)), vae=vae)
    if family == "sd1":
        pipe.text_encoder = _text_encoder(CLIP_VIT_L_TEXT)
    elif family == "sd2":
        pipe.text_encoder = _text_encoder(OPENCLIP_VIT_H_TEXT)
    else:
        pipe.text_encoder = _text_encoder(CLIP_VIT_L_TEXT)
        pipe.text_encoder_2 = _text_encoder(OPENCLIP_BIGG_TEXT, with_projection=True)
    return pipe


# Key names (and shapes) of the published checkpoints (v1-5-pruned, v2-1_768-ema-pruned, sd_xl_base_1.0).
ANCHORS = {
    "sd1": {
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.time_embed.2.weight": (1280, 1280),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.norm_out.weight": (128,),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias": (768,),
    },
    "sd2": {
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.ln_final.bias": (1024,),
    },
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.out_layers.3.weight": (320, 320, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.bias": (1280,),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias": (3840,),
    },
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_layout_matches_published_checkpoints_and_diffusers_reader(family):
    from diffusers.loaders import single_file_utils as reader

    pipe = _full_size(family)
    checkpoint = ldm_state_dict(pipe)
    for key, shape in ANCHORS[family].items():
        assert tuple(checkpoint[key].shape) == shape, key
    # diffusers' architecture sniffing (what it uses without a local config) recognizes the file
    assert (
        reader.infer_diffusers_model_type(checkpoint) == {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}[family]
    )

    # diffusers' own LDM -> diffusers conversion inverts the export exactly
    markers = {key: key for key in pipe.unet.state_dict()}  # the UNet mapping passes values through untouched
    renamed = {f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(markers).items()}
    assert renamed.keys() == {k for k in checkpoint if k.startswith("model.diffusion_model.")}
    assert reader.convert_ldm_unet_checkpoint(renamed, dict(pipe.unet.config)) == markers
    vae = pipe.vae.state_dict()
    back = reader.convert_ldm_vae_checkpoint(checkpoint, dict(pipe.vae.config))
    assert back.keys() == vae.keys() and all(back[k].shape == vae[k].shape for k in vae)
    readers = {  # text encoder -> diffusers' reader of its part of the file
        "sd1": {"text_encoder": reader.convert_ldm_clip_checkpoint},
        "sd2": {
            "text_encoder": lambda ckpt: reader.convert_open_clip_checkpoint(
                pipe.text_encoder, ckpt, "cond_stage_model.model."
            )
        },
        "sdxl": {
            "text_encoder": reader.convert_ldm_clip_checkpoint,
            "text_encoder_2": lambda ckpt: reader.convert_open_clip_checkpoint(
                pipe.text_encoder_2, ckpt, "conditioner.embedders.1.model."
            ),
        },
    }[family]
    for name, read in readers.items():
        shapes = {k.removeprefix("text_model."): v.shape for k, v in read(checkpoint).items()}
        want = {k.removeprefix("text_model."): v.shape for k, v in getattr(pipe, name).state_dict().items()}
        assert shapes == want, name


def test_open_clip_layout_runs_in_open_clip(tiny_pipe):
    """LDM / WebUI-style loaders build open_clip's TextTransformer from these keys: it loads strictly and agrees."""
    from open_clip.model import QuickGELU
    from open_clip.transformer import TextTransformer

    pipe = _scramble(_sdxl_like(tiny_pipe[0]))
    encoder, config = pipe.text_encoder_2, pipe.text_encoder_2.config
    prefix = "conditioner.embedders.1.model."
    state = {k.removeprefix(prefix): v for k, v in ldm_state_dict(pipe).items() if k.startswith(prefix)}
    tower = TextTransformer(
        width=config.hidden_size,
        heads=config.num_attention_heads,
        layers=config.num_hidden_layers,
        mlp_ratio=(config.intermediate_size + 0.5) / config.hidden_size,
        output_dim=config.projection_dim,
        act_layer=QuickGELU,  # the tiny config's hidden_act
    )
    tower.load_state_dict(state, strict=True)
    ids = torch.tensor(
        [[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70]
    )  # "a photo of a cat", "!"-padded
    with torch.no_grad():
        torch.testing.assert_close(tower(ids), encoder(ids).text_embeds, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ refusals and atomic writes


def test_export_writes_atomically_and_casts_on_request(tiny_pipe, tmp_path, monkeypatch):
    pipe = tiny_pipe[0]
    target = tmp_path / "model.safetensors"
    export_single_file(pipe, target, dtype=torch.float16, metadata={"modelspec.title": "shipped"})
    with safe_open(str(target), framework="pt") as handle:
        assert handle.metadata()["modelspec.title"] == "shipped"
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    before = target.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_single_file(pipe, target)
    assert target.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # and no temporary file is left


def test_applied_weight_edit_is_exported_with_its_provenance(tiny_pipe, tmp_path):
    from conceptsmith.edits import Edit, base_fingerprint

    pipe, info = tiny_pipe
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    to_k = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    delta = torch.randn(to_k.weight.shape, generator=torch.Generator().manual_seed(1))
    Edit.from_weight_deltas("uce", ["cat"], {}, base_fingerprint(pipe), info.family, {module: delta}).apply(
        pipe
    )

    target = export_single_file(pipe, tmp_path / "erased.safetensors")
    with safe_open(str(target), framework="pt") as handle:
        shipped = handle.get_tensor(
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        )
        provenance = json.loads(handle.metadata()["conceptsmith"])
    assert torch.equal(shipped, to_k.weight.detach())
    assert provenance["base_fingerprint"] == info.fingerprint != provenance["fingerprint"]
    assert provenance["edits"] == [{"kind": "weights", "method": "uce", "concepts": ["cat"]}]


def test_export_refuses_what_a_checkpoint_cannot_hold(tiny_pipe, tmp_path):
    from peft import LoraConfig

    pipe = tiny_pipe[0]
    with pytest.raises(ExportError, match=r"\.safetensors only"):
        export_single_file(pipe, tmp_path / "model.ckpt")
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_k"]))
    with pytest.raises(ExportError, match="LoRA adapters.*fuse_lora"):
        export_single_file(pipe, tmp_path / "model.safetensors")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ load_pipeline's errors for bad single files


@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory):
    """(checkpoint, config_dir) of the tiny SD 1.x pipe; tests copy them before damaging them."""
    pipe, _ = load_pipeline("builtin:tiny-test")
    root = tmp_path_factory.mktemp("sd1")
    pipe.save_pretrained(root / "config")
    return export_single_file(pipe, root / "model.safetensors"), root / "config"




@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_single_file_is_a_clear_model_load_error(sd1_files, tmp_path, damage):
    checkpoint, config_dir = sd1_files
    data = checkpoint.read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(
        b"this is not a safetensors file" * 4 if damage == "garbage" else data[: len(data) // 2]
    )
    with pytest.raises(ModelLoadError, match="not a readable .safetensors"):
        load_pipeline(str(broken), single_file_config=str(config_dir))


def test_safetensors_file_without_a_stable_diffusion_checkpoint_is_a_model_load_error(sd1_files, tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(other))
    with pytest.raises(ModelLoadError, match=re.escape(str(other))):
        load_pipeline(str(other), single_file_config=str(sd1_files[1]))


def test_checkpoint_missing_weights_of_the_config_is_a_clear_error(sd1_files, tmp_path):
    checkpoint, config_dir = sd1_files
    config_dir = shutil.copytree(config_dir, tmp_path / "deeper")
    config_file = config_dir / "text_encoder" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    with pytest.raises(ModelLoadError, match="no weights for"):
        load_pipeline(str(checkpoint), single_file_config=str(config_dir))


def test_missing_config_directory_is_a_model_load_error(sd1_files, tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(ModelLoadError, match=re.escape(str(missing))):
        load_pipeline(str(sd1_files[0]), single_file_config=str(missing))
