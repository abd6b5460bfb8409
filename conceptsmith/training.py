"""The one training loop of ConceptSmith: every training-based method (customization and erasure) uses it.

:func:`train` runs AdamW on named parameters for ``steps`` optimizer steps with ``accelerate``:

* **mixed precision where the device has it**: ``mixed_precision="auto"`` means bf16 (else fp16)
  autocast on CUDA and float32 on CPU/MPS; a precision the device lacks falls back to float32 with
  a warning. Trainable parameters stay float32 (master weights).
* **gradient checkpointing** of the given models (diffusers and transformers APIs) on request;
* **data parallel (DDP)** when several processes run it (``accelerate launch`` / ``torchrun``): the
  trainable parameters are wrapped in ``DistributedDataParallel`` (``accelerator.prepare``), which
  averages their gradients; the micro-steps of an optimizer step are dealt to the processes, so with
  ``gradient_accumulation_steps`` a multiple of the number of processes a run equals the one-process
  run (same seeds, same average); otherwise every process does all micro-steps with its own seeds (the
  effective batch grows with the processes). Every process must call :func:`train` together;
* **checkpoints and resume** as ``.safetensors`` (:mod:`conceptsmith.train_checkpoints`; never
  pickles): ``checkpoint_dir`` + ``checkpoint_every``, ``resume=True`` continues from the latest
  checkpoint of the same run;
* **seeded and resumable exactly**: the loss function draws all its randomness from the step's own
  generator (``TrainStep.generator``, seeded by (seed, step, micro-step)) and the global RNG is
  re-seeded the same way (dropout), so a resumed run reproduces the uninterrupted run bit for bit;
* **gradients freed as they are used** (``step_in_backward``, on request): where nothing needs all gradients at
  once (one process, no gradient accumulation, no clipping, no fp16 loss scaling), each parameter is stepped from
  a post-accumulate-grad hook during the backward pass and its gradient dropped, so the peak holds the gradient
  of one parameter instead of all; AdamW's update of a parameter does not depend on the others', so the
  weights come out the same;
* a tqdm progress bar with the running loss.

What to train comes from :mod:`conceptsmith.trainable` (peft LoRA or full weights on any modules of
a shared copy, the frozen model's predictions from the same network); what to minimize from
:mod:`conceptsmith.diffusion` (conditioning, the denoising loss, frozen-model trajectories).
Training runs on the device the models are on (no device placement): one GPU per process under a
multi-process launch.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from conceptsmith.registry import EditorConfig


class TrainingError(ValueError):
    """A user-facing problem with a training run; the message says what is wrong and how to fix it."""


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
    step_in_backward: bool = Field(
        False,
        description="step each parameter as soon as its gradient is complete and free that gradient (one gradient "
        "alive instead of all, the same result, ~0.15 ms more per parameter and step on a CPU); used only where it "
        "can be: one process, no accumulation, no clipping, no fp16",
    )
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
    processes: int = 1  # data-parallel processes that trained together
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
            "processes": self.processes,
            "loss_start": sum(first) / len(first) if first else None,
            "loss_end": sum(last) / len(last) if last else None,
            "eval_loss_start": self.eval_start,
            "eval_loss_end": self.eval_end,
        }

    def metadata(self, specs: Sequence[Any]) -> dict[str, Any]:
        """An Edit's ``metadata`` for a training run on the reference images of ``specs``."""
        return {"training": self.summary(), "losses": self.losses, "logs": self.logs, "images": [s.source for s in specs]}



# -- the loop ------------------------------------------------------------------------------------------


def resolve_mixed_precision(requested: str, device: torch.device, weights: torch.dtype | None = None) -> str:
    """The autocast precision to use on ``device`` for the requested setting; ``auto`` follows a half-precision
    model (``weights``: the frozen model's dtype), else bf16 where the GPU has it, else fp16."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return "fp16" if weights == torch.float16 or not bf16 else "bf16"
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
    """An ``Accelerator`` for this run; under a multi-process launch it joins the launch's process group (gloo
    on CPUs, NCCL on GPUs) and DDP reports parameters a loss did not use instead of hanging."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    kwargs = dict(
        mixed_precision=mixed_precision,
        cpu=device.type == "cpu",
        device_placement=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    try:
        return Accelerator(**kwargs)
    except ValueError as err:  # accelerate keeps one global state; another precision needs a reset
        if "already been initialized" not in str(err):
            raise
        AcceleratorState._reset_state()  # the process state (process group, device) stays
        return Accelerator(**kwargs)


class _Objective(nn.Module):
    """The loss function as a module that owns the trainable parameters, so that DDP can average their gradients."""

    def __init__(self, named: Mapping[str, nn.Parameter], loss_fn: Callable[[TrainStep], Any]) -> None:
        super().__init__()
        self.trained = nn.ParameterList(named.values())  # the very parameter objects, not copies
        self.loss_fn = loss_fn

    def forward(self, step: TrainStep) -> Any:
        return self.loss_fn(step)


def _weights_dtype(models: Sequence[nn.Module]) -> torch.dtype | None:
    """The dtype of the first floating-point parameter of ``models`` (the frozen model's precision)."""
    for module in models:
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def _process_mean(accelerator: Any, values: list[float], device: torch.device) -> list[float]:
    """The mean of each value over the processes of a launch."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    return accelerator.reduce(tensor, reduction="mean").tolist()


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


def _check_finite(loss: float, step: int, config: TrainingConfig) -> None:
    if not math.isfinite(loss):
        raise TrainingError(
            f"The training loss became {loss} at step {step}; lower learning_rate (now "
            f"{config.effective_lr():g}) or use mixed_precision='no'."
        )


def _steps_in_backward(config: TrainingConfig, processes: int, micro_steps: int, precision: str) -> bool:
    """Whether each parameter can be stepped inside the backward pass: nothing needs every gradient first (no
    clipping by the global norm, no DDP averaging, no accumulation, no fp16 loss scaler)."""
    return (config.step_in_backward and config.max_grad_norm is None and processes == 1 and micro_steps == 1
            and precision != "fp16")  # fmt: skip


@contextlib.contextmanager
def _stepping_hooks(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> Any:
    """Step ``optimizer`` for one parameter as soon as its gradient is accumulated, then free that gradient
    (PyTorch's optimizer-step-in-backward recipe with one optimizer: a step skips parameters without a gradient)."""

    def step(param: torch.Tensor) -> None:
        optimizer.step()
        param.grad = None

    handles = [p.register_post_accumulate_grad_hook(step) for p in params]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
    from conceptsmith.train_checkpoints import (
        latest_checkpoint,
        load_checkpoint,
        prune,
        save_checkpoint,
        signature,
    )

    started = time.perf_counter()
    groups = _groups(params, config.effective_lr())
    named = {name: p for group, _ in groups for name, p in group.items()}
    device = next(iter(named.values())).device
    precision = resolve_mixed_precision(config.mixed_precision, device, _weights_dtype(models))
    accelerator = _accelerator(precision, device)
    world, rank = accelerator.num_processes, accelerator.process_index
    accumulation = config.gradient_accumulation_steps
    per_process = accumulation // world if accumulation % world == 0 else accumulation
    optimizer = torch.optim.AdamW(
        [{"params": list(group.values()), "lr": lr} for group, lr in groups],
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    base_lrs = [lr for _, lr in groups]
    prepared = accelerator.prepare_optimizer(optimizer, device_placement=False)
    signature = signature(run_key, named, config)

    result = TrainResult(losses=[], mixed_precision=precision, processes=world)
    start = 0
    folder = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if config.resume:
        if folder is None:
            raise TrainingError("resume=True needs a checkpoint_dir to resume from.")
        latest = latest_checkpoint(folder)
        if latest is not None:
            start = load_checkpoint(latest, named, optimizer, accelerator, signature, result)
            result.resumed_from = start
            if start > config.steps:
                raise TrainingError(
                    f"Checkpoint '{latest}' is at step {start}, beyond steps={config.steps}; raise steps or use another checkpoint_dir."
                )

    objective = _Objective(named, loss_fn)
    model = accelerator.prepare_model(objective, device_placement=False) if world > 1 else objective  # DDP
    if evaluate is not None and config.eval_batches and start == 0:
        result.eval_start = evaluate(config.eval_batches)
    modes = [(m, m.training) for m in models]
    for module in models:
        module.train()
        if config.gradient_checkpointing:
            _enable_checkpointing(module)
    cuda_devices = [device] if device.type == "cuda" else []
    in_backward = _steps_in_backward(config, world, per_process, precision)
    stepping = _stepping_hooks(optimizer, list(named.values())) if in_backward else contextlib.nullcontext()
    bar = tqdm(total=config.steps, initial=start, desc=description, unit="step", disable=not config.progress)
    try:
        with torch.random.fork_rng(devices=cuda_devices), stepping:
            for step in range(start, config.steps):
                factor = _lr_factor(config, step)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
                total, extras = 0.0, {}
                for micro in range(per_process):  # this process's share of the step's micro-steps
                    value = _seed(seed, step, rank * per_process + micro)
                    torch.manual_seed(value)
                    generator = torch.Generator().manual_seed(value)
                    last = micro == per_process - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(model):  # DDP: average once
                        with accelerator.autocast():
                            out = model(TrainStep(step, micro, generator, device))
                        loss = out if isinstance(out, torch.Tensor) else out["loss"]
                        if in_backward:  # the backward pass updates the weights: refuse a bad loss first
                            _check_finite(float(loss.detach()), step, config)
                        accelerator.backward(loss / per_process, inputs=list(named.values()))
                    total += float(loss.detach()) / per_process
                    if not isinstance(out, torch.Tensor):
                        for key, v in out.items():
                            if key != "loss":
                                extras[key] = extras.get(key, 0.0) + float(torch.as_tensor(v).detach()) / per_process
                if world > 1:  # the step's loss over every process's micro-steps, the same number on all
                    total, *rest = _process_mean(accelerator, [total, *extras.values()], device)
                    extras = dict(zip(extras, rest))
                _check_finite(total, step, config)
                if not in_backward:
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
                    written = [None]
                    if accelerator.is_main_process:
                        written = [str(save_checkpoint(folder, done, named, optimizer, accelerator, signature, result))]
                        prune(folder, config.keep_checkpoints)
                    if world > 1:  # the others wait for the file and learn its name
                        from accelerate.utils import broadcast_object_list

                        broadcast_object_list(written)
                    result.checkpoint = written[0]
    finally:
        bar.close()
        for module, mode in modes:
            module.train(mode)
    if evaluate is not None and config.eval_batches:
        result.eval_end = evaluate(config.eval_batches)
    result.steps = config.steps
    result.seconds = time.perf_counter() - started
    return result

