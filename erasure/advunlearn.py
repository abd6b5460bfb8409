"""AdvUnlearn (Zhang et al., "Defensive Unlearning with Adversarial Training for Robust Concept Erasure in
Diffusion Models", NeurIPS 2024): adversarial training of the text encoder.

Algorithm (``fit``), with ``eps*`` the frozen model (frozen text encoder and UNet) and ``eps`` the UNet
conditioned by the text encoder being trained (UNet and VAE stay frozen):

1. the trained modules: every layer's MLP and the last layer's self-attention of a shared copy of the text
   encoder (LoRA or full weights) -- the paper's robust, transferable module;
2. frozen DDIM runs (made once, every ``(x_t, t)`` kept, as :mod:`erasure.esd`) of the concept prompts and of
   the ``retain_prompts`` (ordinary captions);
3. inner (lower-level) problem, the attack: every ``attack_every`` steps, ``attack_steps`` signed-gradient
   steps (PGD without a projection: the prefix is free in embedding space) on ``adv_tokens`` soft prefix embeddings ``delta`` put at the encoder's input before the concept
   prompt, minimizing ``||eps(x_t, [delta; c], t) - eps*(x_t, c, t)||^2``: the prefix that makes the current
   model draw the concept again. ``delta`` starts from the concept's own token embeddings and is kept from
   one attack to the next (one prefix shared by all concept prompts);
4. outer (upper-level) problem: ESD's unlearning loss on the attacked prompt, ``||eps(x_t, [delta; c], t) -
   (eps*(x_t, t) - eta [eps*(x_t, c, t) - eps*(x_t, t)])||^2`` (ESD Eq. 4), plus ``gamma`` x the
   utility-retaining regularizer ``||eps(x_r, c_r, t) - eps*(x_r, c_r, t)||^2`` on a retain caption ``c_r``
   at a state ``x_r`` of its own frozen run;
5. the trained change as an Edit (``lora`` or ``weights``, module paths ``text_encoder.*``).

The adversarial prefix is training state outside the optimizer: a run resumed from a checkpoint restarts the
attack from the concept's embeddings. Only the text encoder changes, so an attack on its output (the UNet's
conditioning) bypasses this eraser by construction; the robustness it trains for is at the encoder's input.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from conceptsmith.diffusion import Conditioning, predict
from conceptsmith.edits import Edit
from conceptsmith.erasure._trained import (
    TextEncoderTraining,
    TrainedEraserConfig,
    concept_prompts,
    fixed_draw_evaluator,
    frozen_runs,
)
from conceptsmith.erasure.esd import esd_target
from conceptsmith.registry import Editor, EditRequest, register_editor
from conceptsmith.token_positions import encode_with_embeddings, prefix_slot_ids
from conceptsmith.trainable import frozen, pipe_components
from conceptsmith.training import TrainStep, train

DEFAULT_RETAIN = [
    "a photo of a dog", "a photo of a car", "a portrait of a woman", "a landscape with mountains",
    "a bowl of fruit on a table", "a city street at night", "a red bicycle", "a house with a garden",
]


class AdvUnlearnConfig(TrainedEraserConfig):
    """Defaults mirror ``configs/erase/advunlearn.yaml``."""

    steps: int = Field(200, ge=1, description="outer (unlearning) steps (paper: 1000 on SD 1.4)")
    learning_rate: float = Field(1e-4, gt=0, description="paper 1e-5 for the full text encoder; LoRA needs more")
    batch_size: int = Field(1, ge=1, description="states per step (concept and retain each)")
    negative_guidance: float = Field(1.0, gt=0, description="eta of ESD's target")
    gamma: float = Field(0.3, ge=0, description="weight of the utility-retaining regularizer (paper ~0.3)")
    retain_prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_RETAIN), min_length=1,
                                      description="ordinary captions whose predictions must not change")
    adv_tokens: int = Field(1, ge=1, description="soft prefix tokens of the attack")
    attack_every: int = Field(1, ge=1, description="run the attack every N outer steps (the prefix is kept between)")
    attack_steps: int = Field(10, ge=0, description="PGD steps per attack (0: no attack, ESD on the text encoder)")
    attack_lr: float = Field(1e-3, gt=0, description="PGD step: each embedding entry moves by this x sign(gradient)")
    trajectories: int = Field(8, ge=1, description="frozen DDIM runs of the concept prompts, made once")
    retain_trajectories: int = Field(8, ge=1, description="frozen DDIM runs of the retain prompts (one prompt each, in turn)")
    ddim_steps: int = Field(50, ge=2, description="steps of each frozen run")
    sample_guidance: float = Field(3.0, ge=0, description="classifier-free guidance of the frozen runs")


class AdvUnlearnObjective:
    """The bi-level objective: :meth:`attack` (inner), :meth:`unlearn_loss` + ``gamma`` :meth:`retain_loss` (outer)."""

    def __init__(self, run: TextEncoderTraining, config: AdvUnlearnConfig, prompts: list[str], seed: int) -> None:
        self.run, self.config = run, config
        pipe, self.unet = run.pipe, run.pipe.unet
        tokenizer = pipe.tokenizer
        self.conds, (self.uncond,) = run.frozen_encode(prompts), run.frozen_encode([""])
        self.retain_conds = run.frozen_encode(config.retain_prompts)
        self.concept_runs = frozen_runs(pipe, self.conds, self.uncond, config, config.trajectories, seed)
        self.retain_runs = frozen_runs(pipe, self.retain_conds, self.uncond, config, config.retain_trajectories, seed + 1)
        self.ids, self.positions = prefix_slot_ids(tokenizer, prompts, config.adv_tokens)
        words = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
        weight = run.trainable.module.get_input_embeddings().weight
        self.initial = weight[[words[i % len(words)] for i in range(config.adv_tokens)]].detach().float().clone()
        self.prefix = self.initial
        self.attack_loss = torch.tensor(float("nan"))
        self._frozen: dict[tuple[Any, ...], torch.Tensor] = {}

    def frozen(self, key: tuple[Any, ...], x: torch.Tensor, t: int, cond: Conditioning) -> torch.Tensor:
        """``eps*`` at a kept state, computed once (the frozen encoder's conditioning, the pipe's UNet)."""
        if key not in self._frozen:
            with torch.no_grad():
                self._frozen[key] = predict(self.unet, x, t, cond).cpu()
        return self._frozen[key]

    def attacked(self, which: list[int], prefix: torch.Tensor) -> Conditioning:
        """The trained encoder's conditioning of the concept prompts ``which`` behind the soft ``prefix``."""
        out = encode_with_embeddings(self.run.trainable.module, self.ids[which], self.positions, prefix)
        return Conditioning(out[0])

    @staticmethod
    def _batch(draws: list[Any]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        return (torch.cat([x for _, x, _, _ in draws]), torch.tensor([t for _, _, t, _ in draws]),
                [which for _, _, _, which in draws])

    def attack(self, draws: list[Any]) -> None:
        """PGD on the prefix (the inner problem): make the current model's prediction for ``[delta; c]`` match ``eps*(x_t, c)``."""
        x, t, which = self._batch(draws)
        goal = torch.cat([self.frozen((key, which_), s, t_, self.conds[which_]) for key, s, t_, which_ in draws])
        prefix = self.prefix
        for _ in range(self.config.attack_steps):
            prefix = prefix.detach().requires_grad_(True)
            prediction = predict(self.unet, x, t, self.attacked(which, prefix))
            loss = F.mse_loss(prediction, goal.to(prediction.device))
            (grad,) = torch.autograd.grad(loss, prefix)
            prefix = prefix - self.config.attack_lr * grad.sign()
            self.attack_loss = loss.detach().cpu()
        self.prefix = prefix.detach()

    def unlearn_loss(self, draws: list[Any], prefix: torch.Tensor | None = None) -> torch.Tensor:
        """ESD's loss (Eq. 4) on the attacked prompt: ``||eps(x_t, [delta; c]) - target||^2`` (``delta``: the
        current adversarial prefix unless ``prefix`` is given)."""
        x, t, which = self._batch(draws)
        target = torch.cat([
            esd_target(self.frozen((key, "u"), s, t_, self.uncond), self.frozen((key, w), s, t_, self.conds[w]),
                       self.config.negative_guidance)
            for key, s, t_, w in draws
        ])
        prediction = predict(self.unet, x, t, self.attacked(which, self.prefix if prefix is None else prefix))
        return F.mse_loss(prediction, target.to(prediction.device))

    def fixed_loss(self, generator: torch.Generator) -> torch.Tensor:
        """The outer objective with the prefix at its start (the concept's own tokens), comparable before/after."""
        concept = self.unlearn_loss(self.concept_runs.sample(generator, self.config.batch_size), self.initial)
        return concept + self.config.gamma * self.retain_loss(self.retain_runs.sample(generator, self.config.batch_size))

    def retain_loss(self, draws: list[Any]) -> torch.Tensor:
        """The utility-retaining regularizer: ``||eps(x_r, c_r) - eps*(x_r, c_r)||^2`` on retain captions."""
        x, t, which = self._batch(draws)
        target = torch.cat([self.frozen((key, "retain"), s, t_, self.retain_conds[w]) for key, s, t_, w in draws])
        prediction = predict(self.unet, x, t, self.run.conditioner([self.config.retain_prompts[w] for w in which]))
        return F.mse_loss(prediction, target.to(prediction.device))

    def __call__(self, step: TrainStep) -> dict[str, torch.Tensor]:
        draws = self.concept_runs.sample(step.generator, self.config.batch_size)
        if step.micro_step == 0 and step.step % self.config.attack_every == 0:
            self.attack(draws)
        unlearn = self.unlearn_loss(draws)
        retain = self.retain_loss(self.retain_runs.sample(step.generator, self.config.batch_size))
        out = {"loss": unlearn + self.config.gamma * retain, "unlearn": unlearn, "retain": retain}
        return out if self.config.attack_steps == 0 else {**out, "attack": self.attack_loss}


@register_editor("advunlearn", description="AdvUnlearn: adversarial (soft-prefix) ESD training of the text encoder + retain loss")
class AdvUnlearn(Editor):
    Config = AdvUnlearnConfig
    supports = ("sd1", "sd2")  # one text encoder: SDXL has two

    def fit(self, pipe: Any, request: EditRequest) -> Edit:
        config: AdvUnlearnConfig = self.config
        started = time.perf_counter()
        prompts = concept_prompts(request, config.templates, "advunlearn")
        with frozen(*pipe_components(pipe)):
            run = TextEncoderTraining(pipe, config, request.seed)
            objective = AdvUnlearnObjective(run, config, prompts, request.seed)
            result = train(run.trainable.named_parameters(), objective, config, seed=request.seed,
                           evaluate=fixed_draw_evaluator(objective.fixed_loss), models=[run.trainable.module], run_key=f"advunlearn:{prompts}:{config.retain_prompts}",
                           description="advunlearn")
            params = {**config.model_dump(), "prompts": prompts}
            return run.edit("advunlearn", list(request.concepts), params, result, started)
