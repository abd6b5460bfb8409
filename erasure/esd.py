"""ESD — Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023).

Algorithm (``fit``), with ``eps*`` the frozen model and ``eps`` the one being trained:

1. conditioning ``c`` of each concept prompt and of the empty prompt;
2. the trained modules of the chosen ``variant`` (``x``: cross-attention, ``x-strict``: its K/V,
   ``u``: everything but cross-attention, ``all``) on a shared copy of the UNet, LoRA or full weights;
3. partial denoising from the frozen model: ``trajectories`` DDIM runs of the concept prompts
   (guidance ``sample_guidance``), made once, every intermediate ``(x_t, t)`` kept -- the frozen
   runs do not depend on the weights being trained (the published script redoes one per step);
4. each step: a kept ``(x_t, t)``; target (Eq. 4) ``eps*(x_t, t) - eta [eps*(x_t, c, t) - eps*(x_t, t)]``
   with ``eta = negative_guidance``, the frozen predictions read from the same network with the
   adapters disabled (cached per state); loss ``||eps(x_t, c, t) - target||^2``;
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
from conceptsmith.erasure._trained import FrozenRunConfig, UnetTraining, concept_prompts, fixed_draw_evaluator
from conceptsmith.registry import UNET_FAMILIES, Editor, EditRequest, register_editor
from conceptsmith.trainable import frozen, pipe_components
from conceptsmith.training import train


class ESDConfig(FrozenRunConfig):
    """Defaults mirror ``configs/erase/esd.yaml``."""

    steps: int = Field(200, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    negative_guidance: float = Field(1.0, gt=0, description="eta of Eq. 4: how far past 'no concept' the target goes")


def esd_target(eps_uncond: torch.Tensor, eps_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's negatively guided target (Eq. 4): ``eps*(x_t, t) - eta (eps*(x_t, c, t) - eps*(x_t, t))``."""
    return eps_uncond - eta * (eps_concept - eps_uncond)


@register_editor("esd", description="ESD: fine-tune the UNet (LoRA or full) towards negatively guided frozen predictions")
class ESD(Editor):
    Config = ESDConfig
    supports = UNET_FAMILIES

    def fit(self, pipe: Any, request: EditRequest) -> Edit:
        config: ESDConfig = self.config
        started = time.perf_counter()
        prompts = concept_prompts(request, config.templates, "esd")
        with frozen(*pipe_components(pipe)):
            run = UnetTraining(pipe, config, config.variant, request.seed)
            conds, (uncond,) = run.encode(prompts), run.encode([""])
            runs = run.trajectories(conds, uncond)

            def loss(generator: torch.Generator) -> torch.Tensor:
                draws = runs.sample(generator, config.batch_size)
                x = torch.cat([state for _, state, _, _ in draws])
                t = torch.tensor([t for _, _, t, _ in draws])
                cond = conds[draws[0][3]]
                for _, _, _, which in draws[1:]:
                    cond = cond.cat(conds[which])
                target = torch.cat([
                    esd_target(run.frozen_prediction((key, "u"), state, t_, uncond),
                               run.frozen_prediction((key, which), state, t_, conds[which]), config.negative_guidance)
                    for key, state, t_, which in draws
                ])
                prediction = predict(run.trainable.module, x, t, cond)
                return F.mse_loss(prediction, target.to(prediction.device))

            result = train(run.trainable.named_parameters(), lambda step: loss(step.generator), config, seed=request.seed,
                           evaluate=fixed_draw_evaluator(loss), models=[run.trainable.module],
                           run_key=f"esd:{prompts}", description=f"esd-{config.variant}")
            params = {**config.model_dump(), "prompts": prompts}
            return run.edit("esd", list(request.concepts), params, result, started)
