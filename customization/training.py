"""The one training loop of ConceptSmith: every training-based method (customization and erasure) uses it.

:func:`train` runs AdamW on named parameters for ``steps`` optimizer steps with ``accelerate``:

* **mixed precision where the device has it**: ``mixed_precision="auto"`` means bf16 (else fp16)
  autocast on CUDA and float32 on CPU/MPS; a precision the device lacks falls back to float32 with
  a warning. Trainable parameters stay float32 (master weights).
* **gradient checkpointing** of the given models (diffusers and transformers APIs) on request;
* **checkpoints and resume** as ``.safetensors`` (parameters, optimizer state, step, loss history;
  never pickles): ``checkpoint_dir`` + ``checkpoint_every``, ``resume=True`` continues from the
  latest checkpoint of the same run;
* **seeded and resumable exactly**: the loss function draws all its randomness from the step's own
  generator (``TrainStep.generator``, seeded by (seed, step, micro-step)) and the global RNG is
  re-seeded the same way (dropout), so a resumed run reproduces the uninterrupted run bit for bit;
* a tqdm progress bar with the running loss.

Around it, helpers every method needs: :func:`shared_copy` (a copy of a model's module tree that
shares the frozen weights, so training never touches the caller's pipeline), :func:`frozen`,
:class:`TextConditioner` (prompts -> UNet conditioning with autograd, SD 1.x/2.x and SDXL) and
:func:`denoising_loss` (the standard diffusion objective).

Training runs in one process on the device the models are on (no device placement, no DDP).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from conceptsmith.registry import EditorConfig
from customization import CustomizationError
from customization.data import CutMixOptions, ZoomOutOptions

CHECKPOINT_KEY = "conceptsmith_checkpoint"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.safetensors$")


class TrainingConfig(EditorConfig):
    """Hyper-parameters of the shared loop; editors' configs extend it with their own fields."""

    steps: int = Field(250, ge=1, description="optimizer steps")
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate (before scale_lr)")
    scale_lr: bool = Field(False, description="multiply the learning rate by batch_size * gradient_accumulation_steps")
    batch_size: int = Field(2, ge=1, description="examples per micro-step (per concept group, see the method)")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null disables it")
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16/fp16 autocast on CUDA, float32 elsewhere"
    )
    gradient_checkpointing: bool = False
    checkpoint_dir: str | None = Field(None, description="folder for resumable checkpoints (null: none)")
    checkpoint_every: int = Field(0, ge=0, description="save every N steps (0: only at the end, if checkpoint_dir)")
    keep_checkpoints: int = Field(2, ge=1)
    resume: bool = Field(False, description="continue from the latest checkpoint in checkpoint_dir")
    progress: bool = True
    eval_batches: int = Field(2, ge=0, description="fixed-noise batches scored before and after training (0: none)")

    def effective_lr(self) -> float:
        if self.scale_lr:
            return self.learning_rate * self.batch_size * self.gradient_accumulation_steps
        return self.learning_rate

    def training_fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in TrainingConfig.model_fields}


class SubjectTrainingConfig(TrainingConfig, ZoomOutOptions, CutMixOptions):
    """Fields of the methods that fine-tune weights on reference images of a subject (Custom Diffusion,
    DreamBooth-LoRA): how the subject appears in prompts and the class-regularization (prior) images."""

    phrase: str = Field("{token} {class_word}", description="how the concept appears in prompts")
    templates: Literal["object", "style"] | list[str] = "object"
    prior_preservation: bool = True
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(200, ge=1)
    class_prompt: str = Field("a photo of a {}", description="prompt of the class images; {} is the class word")
    class_data_dir: str | None = Field(None, description="cache folder for generated class images")
    class_inference_steps: int | None = Field(None, ge=1, description="sampling steps of the class images (default: the pipeline's)")
    flip: bool = True
    resolution: int | None = None


def subject_params(config: SubjectTrainingConfig, specs: Sequence[Any], prompt_templates: Sequence[str]) -> dict[str, Any]:
    """An Edit's ``params`` for a subject-training run: the config plus what the merges and evaluations read back."""
    return {
        **config.model_dump(),
        "tokens": [s.token for s in specs],
        "class_words": [s.class_word for s in specs],
        "phrases": [s.phrase for s in specs],
        "prompt_templates": list(prompt_templates),
    }


# -- results -------------------------------------------------------------------------------------------


@dataclass
class TrainStep:
    """What the loss function gets at each micro-step."""

    step: int
    micro_step: int
    generator: torch.Generator  # CPU generator: draw every random number of this step from it
    device: torch.device


@dataclass
class TrainResult:
    losses: list[float]  # mean loss of each optimizer step (all steps, also those of a resumed run)
    logs: dict[str, list[float]] = field(default_factory=dict)  # extra scalars the loss function returned
    steps: int = 0
    resumed_from: int | None = None
    seconds: float = 0.0
    mixed_precision: str = "no"
    checkpoint: str | None = None
    eval_start: float | None = None  # loss on fixed noise before training (see TrainingConfig.eval_batches)
    eval_end: float | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-serializable summary for an Edit's metadata."""
        first = self.losses[: max(1, len(self.losses) // 10)]
        last = self.losses[-max(1, len(self.losses) // 10) :]
        return {
            "steps": self.steps,
            "resumed_from": self.resumed_from,
            "seconds": round(self.seconds, 3),
            "mixed_precision": self.mixed_precision,
            "loss_start": sum(first) / len(first) if first else None,
            "loss_end": sum(last) / len(last) if last else None,
            "eval_loss_start": self.eval_start,
            "eval_loss_end": self.eval_end,
        }

    def metadata(self, specs: Sequence[Any]) -> dict[str, Any]:
        """An Edit's ``metadata`` for a training run on the reference images of ``specs``."""
        return {"training": self.summary(), "losses": self.losses, "logs": self.logs, "images": [s.source for s in specs]}


# -- keeping the caller's models untouched -------------------------------------------------------------


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s module tree whose parameters and buffers are the original tensors.

    Costs almost no memory; replacing a submodule or a parameter of the copy (new LoRA layers, a
    trainable clone of one weight, gradient checkpointing flags, train mode) leaves the original
    untouched. Never modify the shared tensors in place.
    """
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def trainable_clone(module: nn.Module, name: str = "weight") -> nn.Parameter:
    """Replace ``module.<name>`` (in a :func:`shared_copy`) by a float32 trainable clone and return it."""
    original = getattr(module, name)
    clone = nn.Parameter(original.detach().float().clone(), requires_grad=True)
    setattr(module, name, clone)
    return clone


@contextlib.contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter of ``modules``; the flags are restored."""
    params = {id(p): p for m in modules if m is not None for p in m.parameters()}
    flags = [(p, p.requires_grad) for p in params.values()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def pipe_components(pipe: object) -> list[nn.Module]:
    """The torch models of a pipeline (UNet, VAE, text encoders), for :func:`frozen`."""
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return [m for m in (getattr(pipe, n, None) for n in names) if isinstance(m, nn.Module)]


def module_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# -- conditioning and objective ------------------------------------------------------------------------


def expand_multi_vector(prompt: str, tokenizer: Any) -> str:
    """Replace a multi-vector token ``<t>`` by ``<t> <t>_1 ... <t>_{n-1}`` (what the pipelines do)."""
    added = getattr(tokenizer, "added_tokens_encoder", {})
    for token in sorted(set(tokenizer.tokenize(prompt))):
        if token in added and f"{token}_1" in added:
            names, i = [token], 1
            while f"{token}_{i}" in added:
                names.append(f"{token}_{i}")
                i += 1
            prompt = prompt.replace(token, " ".join(names))
    return prompt


@dataclass
class Conditioning:
    hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def cat(self, other: Conditioning) -> Conditioning:
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: torch.cat([v, other.added_cond_kwargs[k]]) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(torch.cat([self.hidden_states, other.hidden_states]), added)

    def detach(self) -> Conditioning:
        added = None if self.added_cond_kwargs is None else {k: v.detach() for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.hidden_states.detach(), added)


class TextConditioner:
    """Prompts -> the UNet's conditioning, differentiable (for training new token embeddings / text LoRA).

    ``pairs``: ``[(tokenizer, text_encoder), ...]`` in the pipeline's order (usually copies holding
    new tokens). SD 1.x/2.x: the last hidden state of the one encoder. SDXL (two pairs): penultimate
    hidden states of both, concatenated, plus ``added_cond_kwargs`` (pooled embedding of the second
    encoder and the size/crop ``time_ids`` of ``size``).
    """

    def __init__(self, pairs: Sequence[tuple[Any, nn.Module]], *, dual: bool, size: int) -> None:
        self.pairs = list(pairs)
        self.dual = dual
        self.size = size

    @classmethod
    def for_pipe(cls, pipe: object, pairs: Sequence[tuple[Any, nn.Module]] | None = None, size: int = 512) -> TextConditioner:
        from conceptsmith.text import text_encoders

        dual = getattr(pipe, "text_encoder_2", None) is not None
        return cls(pairs if pairs is not None else text_encoders(pipe), dual=dual, size=size)

    def __call__(self, prompts: Sequence[str]) -> Conditioning:
        states, pooled = [], None
        for tokenizer, encoder in self.pairs:
            texts = [expand_multi_vector(p, tokenizer) for p in prompts]
            batch = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
            device = module_device(encoder)
            ids = batch["input_ids"].to(device)
            if self.dual:
                out = encoder(ids, output_hidden_states=True)
                states.append(out.hidden_states[-2])
                pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder's is used)
            else:
                use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
                mask = batch["attention_mask"].to(device) if use_mask else None
                states.append(encoder(ids, attention_mask=mask)[0])
        hidden = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
        added = None
        if self.dual:
            time_ids = torch.tensor([[self.size, self.size, 0, 0, self.size, self.size]], dtype=hidden.dtype, device=hidden.device)
            added = {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), -1)}
        return Conditioning(hidden, added)


def noise_scheduler(pipe: object) -> Any:
    """A DDPM scheduler with the pipeline's training noise schedule (betas, prediction type)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def denoising_loss(
    unet: nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    conditioning: Conditioning,
    generator: torch.Generator,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example diffusion loss ``[B]``: MSE between the UNet's prediction and the scheduler's target.

    Noise and timesteps come from ``generator`` (CPU); the target follows the scheduler's
    ``prediction_type`` (epsilon, v_prediction or sample). ``mask`` ``[B, 1, h, w]`` restricts the mean to
    the latent cells where it is 1 (zoomed-out reference images, :class:`customization.data.ZoomOut`).
    """
    device = module_device(unet)
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator).to(device)
    latents = latents.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif kind == "sample":
        target = latents
    else:
        raise CustomizationError(f"Unsupported prediction_type {kind!r} of the pipeline's scheduler.")
    dtype = next(unet.parameters()).dtype
    hidden = conditioning.hidden_states.to(dtype=dtype)
    kwargs = {}
    if conditioning.added_cond_kwargs is not None:
        kwargs["added_cond_kwargs"] = {k: v.to(dtype=dtype) for k, v in conditioning.added_cond_kwargs.items()}
    prediction = unet(noisy.to(dtype), timesteps, encoder_hidden_states=hidden, **kwargs).sample
    error = (prediction.float() - target.float()).pow(2)
    if mask is None:
        return error.flatten(1).mean(1)
    mask = mask.to(error.device).expand_as(error)
    return (error * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1.0)


class DenoisingObjective:
    """Denoising loss on the reference images, plus ``prior_weight`` x the loss on class images.

    Each call samples ``batch_size`` reference examples (and as many class examples when
    ``classes`` is given: DreamBooth / Custom Diffusion prior preservation) from the step's
    generator, encodes their prompts with ``conditioner`` and returns ``{"loss", "instance", "prior"}``.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler: Any,
        conditioner: TextConditioner,
        instances: Any,
        classes: Any | None,
        batch_size: int,
        prior_weight: float = 1.0,
    ) -> None:
        self.unet = unet
        self.scheduler = scheduler
        self.conditioner = conditioner
        self.instances = instances
        self.classes = classes
        self.batch_size = batch_size
        self.prior_weight = prior_weight

    def __call__(self, step: TrainStep) -> dict[str, torch.Tensor]:
        batch = self.instances.sample(self.batch_size, step.generator)
        if self.classes is not None:
            batch = batch.cat(self.classes.sample(self.batch_size, step.generator))
        losses = denoising_loss(self.unet, self.scheduler, batch.latents, self.conditioner(batch.prompts), step.generator,
                                batch.mask)
        instance = losses[: self.batch_size].mean()
        if self.classes is None:
            return {"loss": instance, "instance": instance}
        prior = losses[self.batch_size :].mean()
        return {"loss": instance + self.prior_weight * prior, "instance": instance, "prior": prior}

    @torch.no_grad()
    def evaluate(self, batches: int, seed: int = 1234) -> float:
        """Mean reference-image loss over ``batches`` draws of fixed noise: comparable before/after training."""
        generator = torch.Generator().manual_seed(seed)
        total = 0.0
        for _ in range(batches):
            batch = self.instances.sample(self.batch_size, generator)
            total += float(denoising_loss(self.unet, self.scheduler, batch.latents, self.conditioner(batch.prompts),
                                          generator, batch.mask).mean())
        return total / max(1, batches)


# -- the loop ------------------------------------------------------------------------------------------


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """The autocast precision to use on ``device`` for the requested setting."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return "bf16" if bf16 else "fp16"
        if requested == "bf16" and not bf16:
            warnings.warn("This GPU has no bf16 support; training with fp16 mixed precision instead.", stacklevel=3)
            return "fp16"
        return requested
    if requested in ("fp16", "bf16"):
        warnings.warn(
            f"{requested} mixed precision is not available on {device.type}; training in float32 instead.", stacklevel=3
        )
    return "no"


def _accelerator(mixed_precision: str, device: torch.device) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    kwargs = dict(mixed_precision=mixed_precision, cpu=device.type == "cpu", device_placement=False)
    try:
        return Accelerator(**kwargs)
    except ValueError as err:  # accelerate keeps one global state; another precision needs a reset
        if "already been initialized" not in str(err):
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def _seed(seed: int, step: int, micro: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _lr_factor(config: TrainingConfig, step: int) -> float:
    if config.lr_warmup_steps and step < config.lr_warmup_steps:
        return (step + 1) / config.lr_warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    span = max(1, config.steps - config.lr_warmup_steps)
    progress = min(1.0, (step - config.lr_warmup_steps) / span)
    if config.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _enable_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        model.enable_gradient_checkpointing()
    elif hasattr(model, "gradient_checkpointing_enable"):  # transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        warnings.warn(f"{type(model).__name__} has no gradient-checkpointing switch; training it without.", stacklevel=3)


ParamSpec = Mapping[str, nn.Parameter] | Sequence[tuple[Mapping[str, nn.Parameter], float]]


def _groups(params: ParamSpec, lr: float) -> list[tuple[dict[str, nn.Parameter], float]]:
    """``{name: p}`` (one group at ``lr``) or ``[({name: p}, lr_multiplier), ...]``."""
    raw = [(params, 1.0)] if isinstance(params, Mapping) else list(params)
    groups, seen = [], set()
    for named, multiplier in raw:
        named = dict(named)
        for name, p in named.items():
            if name in seen:
                raise ValueError(f"Parameter name '{name}' is used twice; trainable parameter names must be unique.")
            if not p.requires_grad:
                raise ValueError(f"Parameter '{name}' does not require grad; it cannot be trained.")
            seen.add(name)
        if named:
            groups.append((named, lr * multiplier))
    if not groups:
        raise ValueError("Nothing to train: no parameters given.")
    return groups


def train(
    params: ParamSpec,
    loss_fn: Callable[[TrainStep], torch.Tensor | Mapping[str, torch.Tensor]],
    config: TrainingConfig,
    *,
    seed: int = 0,
    models: Sequence[nn.Module] = (),
    run_key: str = "",
    description: str = "train",
    evaluate: Callable[[int], float] | None = None,
) -> TrainResult:
    """Minimize ``loss_fn`` over ``params`` for ``config.steps`` AdamW steps; parameters are updated in place.

    ``params``: ``{name: parameter}`` or ``[({name: parameter}, lr_multiplier), ...]``.
    ``loss_fn(step)`` returns the scalar loss, or a mapping with ``"loss"`` plus extra scalars to log.
    ``models``: the modules the loss runs through (train mode, gradient checkpointing).
    ``run_key``: identifies the run (method, data, hyper-parameters) so that ``resume`` never continues
    another run's checkpoint. ``evaluate(batches)``: a deterministic loss (e.g.
    :meth:`DenoisingObjective.evaluate`) recorded before and after training when ``eval_batches > 0``.
    """
    started = time.perf_counter()
    groups = _groups(params, config.effective_lr())
    named = {name: p for group, _ in groups for name, p in group.items()}
    device = next(iter(named.values())).device
    precision = resolve_mixed_precision(config.mixed_precision, device)
    accelerator = _accelerator(precision, device)
    optimizer = torch.optim.AdamW(
        [{"params": list(group.values()), "lr": lr} for group, lr in groups],
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    base_lrs = [lr for _, lr in groups]
    prepared = accelerator.prepare_optimizer(optimizer, device_placement=False)
    signature = _signature(run_key, named, config)

    result = TrainResult(losses=[], mixed_precision=precision)
    start = 0
    folder = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if config.resume:
        if folder is None:
            raise CustomizationError("resume=True needs a checkpoint_dir to resume from.")
        latest = latest_checkpoint(folder)
        if latest is not None:
            start = _load_checkpoint(latest, named, optimizer, accelerator, signature, result)
            result.resumed_from = start
            if start > config.steps:
                raise CustomizationError(
                    f"Checkpoint '{latest}' is at step {start}, beyond steps={config.steps}; raise steps or use another checkpoint_dir."
                )

    if evaluate is not None and config.eval_batches and start == 0:
        result.eval_start = evaluate(config.eval_batches)
    modes = [(m, m.training) for m in models]
    for model in models:
        model.train()
        if config.gradient_checkpointing:
            _enable_checkpointing(model)
    cuda_devices = [device] if device.type == "cuda" else []
    bar = tqdm(total=config.steps, initial=start, desc=description, unit="step", disable=not config.progress)
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            for step in range(start, config.steps):
                factor = _lr_factor(config, step)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
                total, extras = 0.0, {}
                for micro in range(config.gradient_accumulation_steps):
                    value = _seed(seed, step, micro)
                    torch.manual_seed(value)
                    generator = torch.Generator().manual_seed(value)
                    with accelerator.autocast():
                        out = loss_fn(TrainStep(step, micro, generator, device))
                    loss = out if isinstance(out, torch.Tensor) else out["loss"]
                    if not torch.isfinite(loss.detach()).all():
                        raise CustomizationError(
                            f"The training loss became {float(loss.detach())} at step {step}; lower learning_rate (now "
                            f"{config.effective_lr():g}) or use mixed_precision='no'."
                        )
                    accelerator.backward(loss / config.gradient_accumulation_steps, inputs=list(named.values()))
                    total += float(loss.detach()) / config.gradient_accumulation_steps
                    if not isinstance(out, torch.Tensor):
                        for key, v in out.items():
                            if key != "loss":
                                extras[key] = extras.get(key, 0.0) + float(torch.as_tensor(v).detach()) / config.gradient_accumulation_steps
                if config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(list(named.values()), config.max_grad_norm)
                prepared.step()
                prepared.zero_grad(set_to_none=True)
                result.losses.append(total)
                for key, v in extras.items():
                    result.logs.setdefault(key, []).append(v)
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}")
                done = step + 1
                if folder is not None and (
                    done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0)
                ):
                    result.checkpoint = str(_save_checkpoint(folder, done, named, optimizer, accelerator, signature, result))
                    _prune(folder, config.keep_checkpoints)
    finally:
        bar.close()
        for model, mode in modes:
            model.train(mode)
    if evaluate is not None and config.eval_batches:
        result.eval_end = evaluate(config.eval_batches)
    result.steps = config.steps
    result.seconds = time.perf_counter() - started
    return result


# -- checkpoints ---------------------------------------------------------------------------------------


def _signature(run_key: str, named: Mapping[str, nn.Parameter], config: TrainingConfig) -> str:
    ignored = {"steps", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "progress"}
    hyper = {k: v for k, v in config.training_fields().items() if k not in ignored}
    shapes = {name: list(p.shape) for name, p in named.items()}
    blob = json.dumps({"run": run_key, "shapes": shapes, "config": hyper}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``folder`` (``checkpoint-<step>.safetensors``), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
    return max(found)[1] if found else None


def _save_checkpoint(
    folder: Path, step: int, named: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer, accelerator: Any, signature: str, result: TrainResult
) -> Path:
    tensors = {f"param.{name}": p.detach().cpu().contiguous().clone() for name, p in named.items()}
    index = {id(p): i for i, p in enumerate(named.values())}
    state = optimizer.state_dict()
    order = [index[id(p)] for group in optimizer.param_groups for p in group["params"]]
    for slot, values in state["state"].items():
        for key, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim.{order[slot]}.{key}"] = tensor.detach().cpu().contiguous().clone()
    groups = [{k: v for k, v in group.items() if k != "params"} for group in state["param_groups"]]
    scaler = getattr(accelerator, "scaler", None)
    header = {
        "step": step,
        "signature": signature,
        "names": list(named),
        "param_groups": groups,
        "losses": result.losses,
        "logs": result.logs,
        "eval_start": result.eval_start,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"checkpoint-{step:07d}.safetensors"
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={"format": "pt", CHECKPOINT_KEY: json.dumps(header, default=_json_default)})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return str(value)


def _load_checkpoint(
    path: Path, named: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer, accelerator: Any, signature: str, result: TrainResult
) -> int:
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {})[CHECKPOINT_KEY])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise CustomizationError(f"Cannot read checkpoint '{path}' ({err}); delete it to start over.") from None
    if header.get("signature") != signature or header.get("names") != list(named):
        raise CustomizationError(
            f"Checkpoint '{path}' belongs to a different training run (other method, data, parameters or "
            "hyper-parameters). Use another checkpoint_dir, or delete it to start over."
        )
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(tensors[f"param.{name}"].to(p.device, p.dtype))
    index = {id(p): i for i, p in enumerate(named.values())}
    order = [index[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for slot, flat in enumerate(order):
        prefix = f"optim.{flat}."
        values = {key.removeprefix(prefix): t for key, t in tensors.items() if key.startswith(prefix)}
        if values:
            state[slot] = values
    groups = []
    for group, saved in zip(optimizer.state_dict()["param_groups"], header["param_groups"]):
        restored = dict(saved)
        restored["betas"] = tuple(restored.get("betas", group["betas"]))
        restored["params"] = group["params"]
        groups.append(restored)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and header.get("scaler"):
        scaler.load_state_dict(header["scaler"])
    result.losses = list(header.get("losses", []))
    result.eval_start = header.get("eval_start")
    result.logs = {k: list(v) for k, v in header.get("logs", {}).items()}
    return int(header["step"])


def _prune(folder: Path, keep: int) -> None:
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name)))
    for _, path in found[:-keep]:
        path.unlink(missing_ok=True)
