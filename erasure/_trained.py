"""What the trained erasers share: the config of how they train, and which modules they train.

Every trained eraser (``esd``, ``concept-ablation``, ``te-unlearn``, ``advunlearn``, ``mace``) trains
through the core (:func:`conceptsmith.training.train` on :class:`conceptsmith.trainable.TrainableModules`)
as a peft LoRA (``mode: lora``, the default) or as full weights (``mode: full``), and returns an Edit
that applies, reverts bit-exactly, composes and exports as a diffusers LoRA.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field

from conceptsmith.devices import module_device
from conceptsmith.diffusion import FrozenTrajectories, TextConditioner, predict
from conceptsmith.registry import EditRequest
from conceptsmith.trainable import TrainableModules, TrainMode, select_modules, trained_edit
from conceptsmith.training import TrainingConfig, TrainingError

UnetVariant = Literal["x", "x-strict", "u", "all"]

# ESD's parameter sets (Gandikota et al., ICCV 2023, Sec. 3.2 and the official `train_method` names):
# x = cross-attention, x-strict = its K/V only, u = everything but cross-attention, time embedding and
# the output layer ("noxattn"), all = every layer ("full").
_UNET_SELECTION: dict[str, tuple[str, str | None]] = {
    "x": (r"attn2\.(to_q|to_k|to_v|to_out\.0)$", None),
    "x-strict": (r"attn2\.(to_k|to_v)$", None),
    "u": (r".", r"(^|\.)attn2\.|^time_embedding\.|^conv_out$|^add_embedding\."),
    "all": (r".", None),
}
# Few-shot text-encoder unlearning (BMVC 2024) trains the MLPs of every layer and the last self-attention.
TEXT_ENCODER_SELECTION = r"layers\.\d+\.mlp\.fc[12]$|layers\.{last}\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$"


class TrainedEraserConfig(TrainingConfig):
    """How a trained eraser trains (on top of the shared loop's hyper-parameters)."""

    mode: TrainMode = Field("lora", description="lora: a peft LoRA (exports as-is); full: the weights themselves")
    rank: int = Field(4, ge=1, description="LoRA rank (mode: lora)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (default: rank, scale 1)")
    init: Literal["gaussian", "default"] = Field("gaussian", description="peft init of lora_A (lora_B starts at 0)")
    templates: list[str] = Field(default_factory=lambda: ["{}"], min_length=1, description="prompts per concept; {} is the concept")



class FrozenRunConfig(TrainedEraserConfig):
    """A UNet eraser trained on states of the frozen model's own sampling runs (ESD, Concept Ablation)."""

    variant: UnetVariant = Field("x", description="x: cross-attention; x-strict: its K/V; u: all but cross-attention; all")
    trajectories: int = Field(8, ge=1, description="frozen DDIM runs from noise, made once; every state is a training sample")
    ddim_steps: int = Field(50, ge=2, description="steps of each frozen run (ESD's ddim_steps)")
    sample_guidance: float = Field(3.0, ge=0, description="classifier-free guidance of the frozen runs (ESD's start_guidance)")
    batch_size: int = Field(1, ge=1, description="states per step")


def unet_modules(unet: object, variant: str) -> list[str]:
    """The UNet modules an ESD-style ``variant`` trains (see ``_UNET_SELECTION``)."""
    if variant not in _UNET_SELECTION:
        raise TrainingError(f"Unknown variant '{variant}'; use one of {', '.join(_UNET_SELECTION)}.")
    include, exclude = _UNET_SELECTION[variant]
    return select_modules(unet, include, exclude)


def text_encoder_modules(encoder: object) -> list[str]:
    """Every layer's MLP and the last layer's self-attention of a CLIP text encoder."""
    layers = len(getattr(encoder, "text_model", encoder).encoder.layers)  # transformers 5 has no .text_model
    return select_modules(encoder, TEXT_ENCODER_SELECTION.format(last=layers - 1))


def concept_prompts(request: EditRequest, templates: list[str], method: str) -> list[str]:
    """Each requested concept in each template; a clear error when nothing is to be erased."""
    concepts = [c.strip() for c in request.concepts]
    if not concepts or not all(concepts):
        raise TrainingError(f"{method} needs at least one non-empty concept to erase: pass --concept TEXT.")
    for template in templates:
        if "{}" not in template:
            raise TrainingError(f"{method}: template '{template}' has no '{{}}' where the concept goes.")
    return [t.format(c) for c in concepts for t in templates]


class UnetTraining:
    """The pieces of a UNet eraser that distills from the frozen model along its own trajectories
    (ESD, Concept Ablation): the trainable copy, the conditioning, the frozen runs and a cache of the
    frozen model's predictions at their states (those never change while training)."""

    def __init__(self, pipe: Any, config: Any, variant: str, seed: int) -> None:
        self.pipe, self.config, self.seed = pipe, config, seed
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # LoRA init
            self.trainable = TrainableModules(
                pipe.unet, "unet", unet_modules(pipe.unet, variant), mode=config.mode, rank=config.rank, alpha=config.alpha, init=config.init
            )
        size = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
        self.conditioner = TextConditioner.for_pipe(pipe, size=size)
        self._frozen: dict[tuple[Any, ...], torch.Tensor] = {}

    def encode(self, prompts: list[str]) -> list[Any]:
        with torch.no_grad():
            return [self.conditioner([p]).detach() for p in prompts]

    def frozen_prediction(self, key: tuple[Any, ...], x: torch.Tensor, t: int, cond: Any) -> torch.Tensor:
        """The frozen model's prediction at a kept state, computed once (adapters off / original weights)."""
        if key not in self._frozen:
            with torch.no_grad(), self.trainable.disabled() as frozen_unet:
                self._frozen[key] = predict(frozen_unet, x, t, cond).cpu()
        return self._frozen[key]

    def trajectories(self, conds: list[Any], uncond: Any) -> Any:
        return frozen_runs(self.pipe, conds, uncond, self.config, self.config.trajectories, self.seed)

    def edit(self, method: str, concepts: list[str], params: dict[str, Any], result: Any, started: float) -> Any:
        metadata = {"training": result.summary(), "losses": result.losses, "logs": result.logs,
                    "train_seconds": round(time.perf_counter() - started, 3)}
        return trained_edit(method, concepts, params, self.pipe, [self.trainable], metadata)


def fixed_draw_evaluator(loss_of: Any, seed: int = 1234) -> Any:
    """``evaluate(batches)`` for :func:`~conceptsmith.training.train`: the mean of ``loss_of(generator)``
    over fixed draws, comparable before and after training."""

    def evaluate(batches: int) -> float:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return sum(float(loss_of(generator)) for _ in range(batches)) / max(1, batches)

    return evaluate


def frozen_runs(pipe: Any, conds: list[Any], uncond: Any, config: Any, trajectories: int, seed: int) -> Any:
    """:class:`~conceptsmith.diffusion.FrozenTrajectories` of ``pipe``'s own (frozen) UNet on ``conds``."""
    unet = pipe.unet
    shape = (int(unet.config.in_channels), int(unet.config.sample_size), int(unet.config.sample_size))
    return FrozenTrajectories(
        lambda x, t, cond: predict(unet, x, t, cond), pipe.scheduler.config, shape, conds, uncond,
        trajectories=trajectories, ddim_steps=config.ddim_steps, guidance=config.sample_guidance, seed=seed,
        device=module_device(unet), progress=config.progress,
    )


class TextEncoderTraining:
    """The pieces of a text-encoder eraser (few-shot unlearning, AdvUnlearn): the trainable copy of the text
    encoder (:func:`text_encoder_modules`, LoRA or full), prompts -> conditioning through it (``conditioner``)
    and through the frozen encoder (:meth:`frozen_encode`: adapters off / original weights), and the Edit.
    The UNet and VAE are the pipe's own, frozen by the caller (:func:`conceptsmith.trainable.frozen`)."""

    def __init__(self, pipe: Any, config: TrainedEraserConfig, seed: int) -> None:
        self.pipe = pipe  # SD 1.x / 2.x (the editors' `supports`): one text encoder
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # LoRA init
            self.trainable = TrainableModules(
                pipe.text_encoder, "text_encoder", text_encoder_modules(pipe.text_encoder), mode=config.mode,
                rank=config.rank, alpha=config.alpha, init=config.init,
            )
        self.size = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
        self.conditioner = TextConditioner([(pipe.tokenizer, self.trainable.module)], dual=False, size=self.size)

    def frozen_encode(self, prompts: list[str]) -> list[Any]:
        """The frozen text encoder's conditioning of each prompt (one per prompt, no autograd)."""
        with torch.no_grad(), self.trainable.disabled():
            return [self.conditioner([p]).detach() for p in prompts]

    def edit(self, method: str, concepts: list[str], params: dict[str, Any], result: Any, started: float,
             extra: dict[str, Any] | None = None) -> Any:
        metadata = {"training": result.summary(), "losses": result.losses, "logs": result.logs,
                    "train_seconds": round(time.perf_counter() - started, 3), **(extra or {})}
        return trained_edit(method, concepts, params, self.pipe, [self.trainable], metadata)
