"""Few-shot text-encoder unlearning (Fuchi & Takagi, "Erasing Concepts from Text-to-Image Diffusion Models
with Few-shot Unlearning", BMVC 2024).

Algorithm (``fit``):

1. a few images of each concept (``request.images``: a folder or files; several concepts: one source per
   concept, in order; or, with ``generate_images: N``, N images the model itself draws of the concept)
   encoded once by the VAE; their prompts are the concept in ``templates``;
2. the trained modules: every layer's MLP (``fc1``, ``fc2``) and the last layer's self-attention of a shared
   copy of the text encoder, LoRA or full weights; the UNet and the VAE stay frozen;
3. each step: ``batch_size`` images, each with a template prompt, noised at a random timestep; gradient
   ASCENT on the conditional latent-diffusion loss (Rombach et al., CVPR 2022, Eq. 3), i.e. minimize
   ``-(1/B) sum_i min(L_i, max_loss)`` with ``L_i = ||eps - eps_theta(z_t, t, tau(c))||^2``, plus (optional,
   not in the paper) ``preserve_weight`` x the mean squared change of the encoder's output states for the
   request's preserved concepts in the same templates;
4. the trained change as an Edit (``lora`` or ``weights``, module paths ``text_encoder.*``).

Gradient ascent has no minimum, so it is bounded twice: the paper's short schedule (a few epochs of ~4
images, hence ``steps: 10`` at ``batch_size: 2``) is the bound that acts first; a per-example cap is the
safeguard against divergence: an example whose loss reaches ``max_loss`` (default 1.0, the loss of a model
that predicts no noise at all: ``E||eps||^2 = 1``, and ``E||v||^2 = 1`` for v-prediction) gives no more
gradient, so a long run stops pushing once the concept's conditioning is as useless as none (Adam's momentum
still carries it a few steps). There is no anchor concept: the erased concept drifts to whatever the ascent
finds (the paper reports related concepts). On a small text encoder (builtin:shapes) the ascent moves every
prompt alike -- it goes from no effect to a collapse of all prompts -- and only ``preserve_weight`` makes it
specific (lr 1e-2, 60 steps, preserve_weight 1-3 erase "skull" and keep the other shapes).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pydantic import Field

from conceptsmith.customization.data import Examples, class_images, default_resolution, load_images
from conceptsmith.diffusion import DenoisingObjective, denoising_loss, noise_scheduler
from conceptsmith.edits import Edit
from conceptsmith.erasure._trained import TextEncoderTraining, TrainedEraserConfig, concept_prompts
from conceptsmith.errors import CustomizationError
from conceptsmith.registry import Editor, EditRequest, register_editor
from conceptsmith.trainable import frozen, pipe_components
from conceptsmith.training import TrainingError, TrainStep, train

GENERATED_SEED = 1000  # first seed of the images drawn with generate_images (plus the request's seed)


class TEUnlearnConfig(TrainedEraserConfig):
    """Defaults mirror ``configs/erase/te-unlearn.yaml``."""

    steps: int = Field(10, ge=1, description="optimizer steps (paper: ~5 epochs of 4 images at batch 2)")
    learning_rate: float = Field(1e-4, gt=0, description="paper 1e-5 for full weights; LoRA needs more")
    batch_size: int = Field(2, ge=1, description="images per step (paper: 2)")
    max_loss: float | None = Field(1.0, gt=0, description="per-example cap of the ascended loss (null: unbounded)")
    templates: list[str] = Field(
        default_factory=lambda: ["{}", "a photo of a {}", "an image of a {}"], min_length=1,
        description="prompts of the images; {} is the concept",
    )
    preserve_weight: float = Field(0.0, ge=0, description="weight of keeping the encoder's output for the request's "
                                   "preserved concepts (in templates) unchanged; 0: none, as the paper")
    generate_images: int = Field(0, ge=0, description="with no images in the request, draw this many of the concept "
                                 "(its first template, seeds from 1000) from the model itself; 0: images are required")


class AscentObjective:
    """Few-shot unlearning's loss: the negated, per-example capped denoising loss of the concept's images.

    Returns ``{"loss": -(1/B) sum_i min(L_i, max_loss) + preserve_weight * P, "denoising": mean L_i, "capped":
    share of examples at the cap}`` (and ``"preserve": P``); the draws (images, templates, noise, timesteps) come
    from the step's generator. ``P`` (an addition to the paper, off by default) is the mean squared change of the
    encoder's output states for the ``preserve`` prompts, against the frozen encoder's ``preserve_states``.
    """

    def __init__(self, objective: DenoisingObjective, max_loss: float | None, preserve: list[str] | None = None,
                 preserve_states: torch.Tensor | None = None, preserve_weight: float = 0.0) -> None:
        self.objective = objective
        self.max_loss = max_loss
        self.preserve, self.preserve_states, self.preserve_weight = preserve, preserve_states, preserve_weight

    def __call__(self, step: TrainStep) -> dict[str, torch.Tensor]:
        o = self.objective
        batch = o.instances.sample(o.batch_size, step.generator)
        losses = denoising_loss(o.unet, o.scheduler, batch.latents, o.conditioner(batch.prompts), step.generator, batch.mask)
        capped = losses if self.max_loss is None else losses.clamp(max=self.max_loss)
        at_cap = torch.zeros(()) if self.max_loss is None else (losses.detach() >= self.max_loss).float().mean()
        out = {"loss": -capped.mean(), "denoising": losses.detach().mean(), "capped": at_cap}
        if not self.preserve_weight:
            return out
        states = o.conditioner(self.preserve).hidden_states.float()
        drift = (states - self.preserve_states.to(states.device)).pow(2).mean()
        return {**out, "loss": out["loss"] + self.preserve_weight * drift, "preserve": drift.detach()}


def concept_images(pipe: Any, request: EditRequest, config: TEUnlearnConfig) -> tuple[list[list[Image.Image]], list[str]]:
    """Per concept, its images and where they came from (files of the request, or the model's own draws)."""
    concepts = [c.strip() for c in request.concepts]
    if request.images:
        if len(concepts) == 1:
            sources: list[list[Path]] = [list(request.images)]
        elif len(request.images) == len(concepts):
            sources = [[item] for item in request.images]
        else:
            raise TrainingError(
                f"Got {len(concepts)} concepts but {len(request.images)} image sources: with several concepts give one "
                "folder per concept, in order."
            )
        try:
            return [load_images(s) for s in sources], [", ".join(map(str, s)) for s in sources]
        except CustomizationError as err:
            raise TrainingError(str(err)) from None
    if not config.generate_images:
        raise TrainingError(
            "te-unlearn learns from images of the concept: pass a folder or files of 3-10 images (request.images), "
            "or set generate_images: N to draw N images of the concept from the model itself."
        )
    prompts = [config.templates[0].format(c) for c in concepts]
    seed = GENERATED_SEED + request.seed  # not the seeds 0, 1, ... an evaluation of the edit usually draws
    images = [class_images(pipe, p, config.generate_images, seed=seed, progress=config.progress) for p in prompts]
    return images, [f"generated: {p!r} x {config.generate_images}" for p in prompts]


def preserved_prompts(request: EditRequest, config: TEUnlearnConfig) -> list[str] | None:
    """The request's preserved concepts in every template, when ``preserve_weight`` asks for them."""
    if not config.preserve_weight:
        return None
    if not request.preserve:
        raise TrainingError("preserve_weight > 0 keeps the preserved concepts intact: name them (request.preserve / "
                            "--preserve TEXT), or set preserve_weight: 0.")
    return [t.format(c) for c in request.preserve for t in config.templates]


@register_editor("te-unlearn", description="Few-shot unlearning: gradient ascent on concept images, text encoder only")
class TEUnlearn(Editor):
    Config = TEUnlearnConfig
    supports = ("sd1", "sd2")  # one text encoder: SDXL has two

    def fit(self, pipe: Any, request: EditRequest) -> Edit:
        config: TEUnlearnConfig = self.config
        started = time.perf_counter()
        prompts = concept_prompts(request, config.templates, "te-unlearn")
        concepts = [c.strip() for c in request.concepts]
        with frozen(*pipe_components(pipe)):
            run = TextEncoderTraining(pipe, config, request.seed)
            images, sources = concept_images(pipe, request, config)
            size = default_resolution(pipe)
            examples = Examples.concat([
                Examples.from_images(pipe.vae, group, size, concept, config.templates) for group, concept in zip(images, concepts)
            ])
            descent = DenoisingObjective(pipe.unet, noise_scheduler(pipe), run.conditioner, examples, None, config.batch_size)
            preserve = preserved_prompts(request, config)
            states = torch.cat([c.hidden_states for c in run.frozen_encode(preserve)]).float() if preserve else None
            objective = AscentObjective(descent, config.max_loss, preserve, states, config.preserve_weight)
            result = train(run.trainable.named_parameters(), objective, config,
                           seed=request.seed, evaluate=descent.evaluate, models=[run.trainable.module],
                           run_key=f"te-unlearn:{prompts}:{sources}", description="te-unlearn")
            params = {**config.model_dump(), "prompts": prompts}
            return run.edit("te-unlearn", list(request.concepts), params, result, started, {"images": sources})
