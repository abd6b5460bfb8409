"""Shared fixtures: tiny random Stable Diffusion pipelines built in code (no downloads)."""

from __future__ import annotations

import copy
import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and several pytest workers may share 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from conceptsmith.models import describe, register_builtin
from conceptsmith.world.tokenizer import clip_tokenizer

TINY_TEXT_DIM = 32
TINY_GENERATION_DEFAULTS = {"num_inference_steps": 2, "guidance_scale": 2.0, "height": 16, "width": 16}


def _text_config(**overrides):
    from transformers import CLIPTextConfig

    settings = dict(
        vocab_size=49408,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TINY_TEXT_DIM,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    settings.update(overrides)
    return CLIPTextConfig(**settings)


def _unet(cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
        **extra,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=16,
    )


@functools.cache
def _tiny_sd_pipe():
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()).eval(),
        tokenizer=clip_tokenizer(),
        unet=_unet(TINY_TEXT_DIM).eval(),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def _tiny_sdxl_pipe():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(pad_token_id=0)).eval(),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=_unet(
            2 * TINY_TEXT_DIM,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + TINY_TEXT_DIM,
        ).eval(),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipe(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A fresh copy of the tiny SD 1.x-like pipeline (same random weights every time)."""
    pipe = copy.deepcopy(_tiny_sd_pipe())
    if dtype != torch.float32 or device != "cpu":
        pipe.to(device=device, dtype=dtype)
    pipe.conceptsmith_defaults = dict(TINY_GENERATION_DEFAULTS)
    return pipe


register_builtin("tiny-test", build_tiny_pipe, "tiny random SD 1.x-like pipeline for tests")


@pytest.fixture
def tiny_pipe():
    """(pipe, ModelInfo) of a fresh tiny SD 1.x-like pipeline; free to mutate."""
    pipe = build_tiny_pipe()
    return pipe, describe(pipe, "builtin:tiny-test")


@pytest.fixture
def tiny_sdxl_pipe():
    """(pipe, ModelInfo) of a fresh tiny SDXL-like pipeline (two text encoders, text_time embedding)."""
    pipe = copy.deepcopy(_tiny_sdxl_pipe())
    pipe.conceptsmith_defaults = dict(TINY_GENERATION_DEFAULTS)
    return pipe, describe(pipe, "<tiny-sdxl>")


#: A tiny open_clip config (random weights) for evaluator tests: the same code path as ViT-L-14.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def evaluator_file(tmp_path_factory):
    """A random tiny open_clip model saved as a local checkpoint with its config beside it."""
    import json

    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("evaluator")
    torch.manual_seed(0)
    model = open_clip.CLIP(**json.loads(json.dumps(TINY_CLIP)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "tiny.safetensors"))
    (folder / "tiny.json").write_text(json.dumps(TINY_CLIP))
    return folder / "tiny.safetensors"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest and avoids oversubscribing a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
