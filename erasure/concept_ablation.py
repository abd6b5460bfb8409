"""Concept Ablation (Kumari et al., ICCV 2023), the model-based variant.

Algorithm (``fit``), with ``eps*`` the frozen model and ``eps`` the one being trained:

1. target prompts ``c`` (the concept in each template) and anchor prompts ``c*`` (the anchor -- the
   request's guide or ``anchor`` -- in the same templates);
2. the trained modules of ``variant`` (default ``x-strict``, the paper's cross-attention K/V) on a
   shared copy of the UNet, LoRA or full weights;
3. anchor images from the frozen model: ``trajectories`` DDIM runs of the anchor prompts, made once,
   every intermediate ``(x_t, t)`` kept;
4. each step (Eq. 3, model-based): ``||eps(x_t, c, t) - eps*(x_t, c*, t)||^2`` with the target prompt and
   the anchor prompt of one template, plus ``anchor_weight`` x ``||eps(x_t, c*, t) - eps*(x_t, c*, t)||^2``
   (keeps the anchor itself drawn as before);
5. the trained change as an Edit (``lora`` or ``weights``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from conceptsmith.diffusion import predict
from conceptsmith.edits import Edit
from conceptsmith.erasure._trained import (
    FrozenRunConfig,
    UnetTraining,
    UnetVariant,
    concept_prompts,
    fixed_draw_evaluator,
)
from conceptsmith.registry import UNET_FAMILIES, Editor, EditRequest, register_editor
from conceptsmith.trainable import frozen, pipe_components
from conceptsmith.training import TrainingError, train


class ConceptAblationConfig(FrozenRunConfig):
    """Defaults mirror ``configs/erase/concept-ablation.yaml``."""

    variant: UnetVariant = "x-strict"
    steps: int = Field(100, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    anchor: str | None = Field(None, description="the concept drawn instead (default: the request's guide)")
    anchor_weight: float = Field(1.0, ge=0, description="weight of keeping the anchor prompt's own prediction")


def ablation_loss(
    prediction_target: torch.Tensor, frozen_anchor: torch.Tensor, prediction_anchor: torch.Tensor | None, anchor_weight: float
) -> torch.Tensor:
    """Eq. 3 (model-based) plus the anchor term: ``||eps(c) - eps*(c*)||^2 + w ||eps(c*) - eps*(c*)||^2``."""
    loss = F.mse_loss(prediction_target, frozen_anchor)
    if prediction_anchor is not None:
        loss = loss + anchor_weight * F.mse_loss(prediction_anchor, frozen_anchor)
    return loss


@register_editor("concept-ablation", description="Concept Ablation: the concept's prediction pulled to the frozen model's for an anchor")
class ConceptAblation(Editor):
    Config = ConceptAblationConfig
    supports = UNET_FAMILIES

    def fit(self, pipe: Any, request: EditRequest) -> Edit:
        config: ConceptAblationConfig = self.config
        started = time.perf_counter()
        anchor = (config.anchor or request.guide or "").strip()
        if not anchor:
            raise TrainingError("concept-ablation needs an anchor concept to draw instead: set params.anchor or pass --guide TEXT.")
        if any(anchor.lower() == c.strip().lower() for c in request.concepts):
            raise TrainingError(f"The anchor '{anchor}' is the concept being erased; pick a different anchor (e.g. its class word).")
        targets = concept_prompts(request, config.templates, "concept-ablation")
        anchors = [t.format(anchor) for _ in request.concepts for t in config.templates]
        with frozen(*pipe_components(pipe)):
            run = UnetTraining(pipe, config, config.variant, request.seed)
            target_conds, anchor_conds, (uncond,) = run.encode(targets), run.encode(anchors), run.encode([""])
            runs = run.trajectories(anchor_conds, uncond)

            def loss(generator: torch.Generator) -> torch.Tensor:
                total = 0.0
                for key, state, t, which in runs.sample(generator, config.batch_size):
                    frozen_anchor = run.frozen_prediction((key, which), state, t, anchor_conds[which])
                    pair = target_conds[which].cat(anchor_conds[which]) if config.anchor_weight else target_conds[which]
                    predictions = predict(run.trainable.module, torch.cat([state] * (2 if config.anchor_weight else 1)), t, pair)
                    anchor_prediction = predictions[1:] if config.anchor_weight else None
                    total = total + ablation_loss(predictions[:1], frozen_anchor.to(predictions.device), anchor_prediction, config.anchor_weight)
                return total / config.batch_size

            result = train(run.trainable.named_parameters(), lambda step: loss(step.generator), config, seed=request.seed,
                           evaluate=fixed_draw_evaluator(loss), models=[run.trainable.module],
                           run_key=f"concept-ablation:{targets}:{anchors}", description=f"concept-ablation-{config.variant}")
            params = {**config.model_dump(), "anchor": anchor, "prompts": targets}
            return run.edit("concept-ablation", list(request.concepts), params, result, started)
