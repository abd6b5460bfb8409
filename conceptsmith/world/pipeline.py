"""``builtin:shapes``: the ShapesWorld micro Stable Diffusion pipeline.

The shipped directory ``weights/shapes-sd/`` is an ordinary diffusers ``StableDiffusionPipeline``
written with ``save_pretrained`` (tokenizer, text_encoder, vae, unet, scheduler; weights stored in
float16 to stay small, loaded in whatever dtype is asked for). Importing this module registers the
builtin with :mod:`conceptsmith.models`, which imports it lazily on the first ``builtin:`` lookup.
The shipped folders and the guard that keeps training out of them are in :mod:`conceptsmith.world.shipped`
(no torch) and importable from here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from conceptsmith.io import atomic_directory
from conceptsmith.models import dtype_kwargs, register_builtin
from conceptsmith.world.shipped import PIPE_DIR, refuse_shipped
from conceptsmith.world.shipped import SHIPPED_DIR as SHIPPED_DIR

#: Generation defaults of ShapesWorld (``conceptsmith.generation.default_settings`` reads them).
#: Steps are chosen so one image with classifier-free guidance takes <= 1 s on 2 CPU threads.
DEFAULTS: dict = dict(num_inference_steps=20, guidance_scale=5.0, height=64, width=64, batch_size=8)


class ShapesWeightsMissing(FileNotFoundError):
    pass


def inference_scheduler():
    """DPM-Solver++ (2nd order) on the training noise schedule."""
    from diffusers import DPMSolverMultistepScheduler

    from conceptsmith.world.unet_train import SCHEDULE

    return DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2)


def save_pipeline(out_dir: Path, *, unet, vae, text_encoder, tokenizer, scheduler=None) -> Path:
    """Assemble a StableDiffusionPipeline and write it with ``save_pretrained`` (fp16 weights), replacing
    ``out_dir`` as a whole (:func:`conceptsmith.io.atomic_directory`)."""
    from diffusers import StableDiffusionPipeline

    refuse_shipped(out_dir)
    parts = {name: copy.deepcopy(m).to(torch.float16).eval() for name, m in
             dict(unet=unet, vae=vae, text_encoder=text_encoder).items()}
    pipe = StableDiffusionPipeline(**parts, tokenizer=tokenizer, scheduler=scheduler or inference_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as temporary:
        pipe.save_pretrained(temporary, safe_serialization=True)
    return out_dir


def load_shapes_pipeline(dtype: torch.dtype = torch.float32, device: str = "cpu", pipe_dir: Path | None = None):
    """Load the shipped pipeline (or ``pipe_dir``) as a ``StableDiffusionPipeline``."""
    from diffusers import StableDiffusionPipeline

    pipe_dir = Path(pipe_dir) if pipe_dir else PIPE_DIR
    if not (pipe_dir / "model_index.json").exists() or not any((pipe_dir / "unet").glob("*.safetensors")):
        raise ShapesWeightsMissing(
            f"ShapesWorld weights not found in {pipe_dir}. Train them with `conceptsmith world train` "
            "(about 2 hours on 2 CPU cores)."
        )
    pipe = StableDiffusionPipeline.from_pretrained(
        pipe_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        local_files_only=True, **dtype_kwargs(dtype),
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.conceptsmith_defaults = dict(DEFAULTS)
    return pipe


def _register() -> None:
    register_builtin(
        "shapes",
        load_shapes_pipeline,
        "ShapesWorld micro Stable Diffusion (64x64, CLIP BPE tokenizer, trained on CPU; see world/weights/shapes-sd/MODEL_CARD.md)",
    )


_register()
