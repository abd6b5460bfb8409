"""A-STAR (Agarwal et al., ICCV 2023): test-time attention segregation and retention, as a ``hook`` edit.

During the first ``until`` fraction of the denoising steps, before the UNet predicts the noise, the
latent of every prompt that names at least two of the edit's concepts is updated
``z_t <- z_t - step_size * grad L`` (``iterations`` times), with ``L`` computed on the cross-attention
maps of the concept tokens (one extra UNet forward + backward on the conditional rows):

* **segregation** ``L_seg``: mean over concept pairs of the soft overlap
  ``sum min(A_i, A_j) / sum (A_i + A_j)`` (the maps of different concepts should not overlap);
* **retention** ``L_ret``: mean over concepts of ``1 - IoU(A_i^t, M_i^{t-1})`` where ``M_i^{t-1}`` is
  concept ``i``'s map at the previous step binarized at ``retention_threshold`` x its maximum
  (what a concept attended to should not be lost from one step to the next);
* ``L = segregation_weight L_seg + retention_weight L_ret``.

Maps: the recorded cross-attention probabilities (:class:`conceptsmith.attention.AttentionMapRecorder`)
of the layers at ``1/map_downsample`` of the latent resolution (all layers when none has that size),
BOS / EOS / padding columns dropped and the word columns renormalized, a concept's map = the sum of
its tokens' columns, Gaussian-smoothed (``sigma``) and divided by its maximum.

Installation: ``pipe.encode_prompt`` is wrapped (concept token positions per prompt, step counter
reset), a forward pre-hook on the UNet performs the update and feeds the updated latent to the
UNet, and ``pipe.scheduler.step`` is wrapped so that the scheduler steps from the updated latent.
``revert`` removes all three. Works on top of any pipeline state (custom tokens, LoRA, T2I-Zero).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field

from conceptsmith.attention import AttentionMapRecorder
from conceptsmith.customization.t2i_zero import PromptTracker, check_phrases, gaussian_smooth
from conceptsmith.edits import Edit, base_fingerprint
from conceptsmith.models import detect_family
from conceptsmith.registry import (
    UNET_FAMILIES,
    Editor,
    EditorConfig,
    EditRequest,
    register_editor,
    register_hook,
)


class AStarConfig(EditorConfig):
    """Defaults mirror ``configs/customize/a-star.yaml``."""

    until: float = Field(0.5, gt=0, le=1, description="fraction of the denoising steps with latent updates")
    step_size: float = Field(20.0, gt=0, description="a in z <- z - a grad L")
    iterations: int = Field(1, ge=1, description="updates per step")
    segregation_weight: float = Field(1.0, ge=0)
    retention_weight: float = Field(1.0, ge=0)
    retention_threshold: float = Field(0.5, gt=0, lt=1)
    sigma: float = Field(0.5, ge=0, description="Gaussian smoothing of the maps, in map pixels")
    map_downsample: int = Field(4, ge=1, description="use the layers at latent size / this (SD at 512 px: 16x16)")


def concept_maps(maps: torch.Tensor, concepts: list[list[int]], length: int, sigma: float) -> torch.Tensor:
    """``[K, h, w]`` normalized maps of the concepts present from one row's ``[h, w, tokens]`` attention."""
    words = maps[..., 1 : max(2, length - 1)]
    words = words / words.sum(-1, keepdim=True).clamp(min=1e-12)
    stacked = torch.stack([words[..., [p - 1 for p in positions]].sum(-1) for positions in concepts])
    smoothed = gaussian_smooth(stacked, sigma)
    return smoothed / smoothed.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]


def segregation_loss(maps: torch.Tensor) -> torch.Tensor:
    """Mean soft overlap ``sum min(A_i, A_j) / sum (A_i + A_j)`` over concept pairs of ``[K, h, w]`` maps."""
    pairs = list(itertools.combinations(range(maps.shape[0]), 2))
    if not pairs:
        return maps.sum() * 0
    terms = [torch.minimum(maps[i], maps[j]).sum() / (maps[i] + maps[j]).sum().clamp(min=1e-12) for i, j in pairs]
    return torch.stack(terms).mean()


def retention_loss(maps: torch.Tensor, previous: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mean ``1 - IoU`` between ``maps`` and the previous step's maps binarized at ``threshold`` x max."""
    masks = (previous >= threshold * previous.flatten(1).amax(1)[:, None, None]).to(maps.dtype)
    iou = torch.minimum(maps, masks).flatten(1).sum(1) / torch.maximum(maps, masks).flatten(1).sum(1).clamp(min=1e-12)
    return (1 - iou).mean()


class _AStar:
    def __init__(self, pipe: Any, edit: Edit) -> None:
        self.pipe = pipe
        self.config = AStarConfig.model_validate({k: v for k, v in edit.params.items() if k in AStarConfig.model_fields})
        self.tracker = PromptTracker(pipe, edit.concepts, on_encode=self.reset)
        self.busy = False
        self.reset()
        self.losses: list[float] = []  # last generation's loss per update, for inspection
        self.unet_hook = pipe.unet.register_forward_pre_hook(self.before_unet, with_kwargs=True)
        scheduler = pipe.scheduler
        self.scheduler = scheduler
        self._had_step = "step" in vars(scheduler)
        self._step = scheduler.step
        scheduler.step = self.scheduler_step

    def reset(self) -> None:
        self.calls = 0
        self.previous: dict[int, torch.Tensor] = {}
        self.pending: tuple[list[int], torch.Tensor, torch.Tensor, int] | None = None
        self.losses = []

    def remove(self) -> None:
        self.unet_hook.remove()
        if self._had_step:
            self.scheduler.step = self._step
        elif "step" in vars(self.scheduler):
            del self.scheduler.step
        self.tracker.remove()

    # -- the update ---------------------------------------------------------------------------------

    def before_unet(self, unet: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.busy:
            return None
        step = self.calls
        self.calls += 1
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        total = len(timesteps) if timesteps is not None and len(timesteps) else 1
        if step >= self.config.until * total:
            return None
        sample = args[0] if args else kwargs.get("sample")
        rows = self.tracker.positions(sample.shape[0])
        active = [i for i, r in enumerate(rows) if r is not None and sum(1 for p in r if p) >= 2]
        if not active:
            return None
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        hidden = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        added = kwargs.get("added_cond_kwargs")
        x = sample[active].detach().clone()
        for _ in range(self.config.iterations):
            x = self._update(unet, x, timestep, hidden, added, active, rows, step)
        new_sample = sample.clone()
        batch = sample.shape[0]
        partners = self._partners(active, batch)
        for index, row in enumerate(active):
            new_sample[row] = x[index]
            if partners[index] is not None:
                new_sample[partners[index]] = x[index]
        self.pending = (active, sample[active].detach(), x.detach(), batch)
        args = (new_sample, *args[1:]) if args else args
        if not args or "sample" in kwargs:
            kwargs = {**kwargs, "sample": new_sample}
        return args, kwargs

    def _partners(self, active: list[int], batch: int) -> list[int | None]:
        n = len(self.tracker.rows)
        return [row - n if batch == 2 * n else None for row in active]

    def _update(self, unet: Any, x: torch.Tensor, timestep: Any, hidden: torch.Tensor, added: dict | None,
                active: list[int], rows: list[Any], step: int) -> torch.Tensor:
        x = x.requires_grad_(True)
        kwargs = {"encoder_hidden_states": hidden[active]}
        if added is not None:
            kwargs["added_cond_kwargs"] = {k: v[active] for k, v in added.items()}
        if isinstance(timestep, torch.Tensor) and timestep.ndim > 0 and timestep.shape[0] == hidden.shape[0]:
            timestep = timestep[active]
        self.busy = True
        try:
            with torch.enable_grad(), AttentionMapRecorder(unet, keep_grad=True, device=x.device) as recorder:
                unet(x, timestep, **kwargs)
                by_size = recorder.by_resolution()
                target = (max(1, x.shape[-2] // self.config.map_downsample), max(1, x.shape[-1] // self.config.map_downsample))
                maps = by_size.get(target)
                if maps is None:
                    maps = recorder.aggregate()
                n = len(self.tracker.rows)
                losses = []
                for index, row in enumerate(active):
                    present = [p for p in rows[row] if p]
                    length = self.tracker.lengths[row - (len(rows) - n)]
                    current = concept_maps(maps[index], present, length, self.config.sigma)
                    loss = self.config.segregation_weight * segregation_loss(current)
                    previous = self.previous.get(row)
                    if previous is not None and previous.shape == current.shape and self.config.retention_weight > 0:
                        loss = loss + self.config.retention_weight * retention_loss(current, previous, self.config.retention_threshold)
                    self.previous[row] = current.detach()
                    losses.append(loss)
                total = torch.stack(losses).sum()
                grad = torch.autograd.grad(total, x)[0]
        finally:
            self.busy = False
        self.losses.append(float(total.detach()))
        return (x - self.config.step_size * grad).detach()

    def scheduler_step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.pending is not None:
            active, before, after, batch = self.pending
            self.pending = None
            n = sample.shape[0]
            latent_rows = [row - (batch - n) for row in active]
            if all(0 <= r < n for r in latent_rows):
                sample = sample.clone()
                current = sample[latent_rows]
                scale = float((before * current).sum() / (current * current).sum().clamp(min=1e-12))
                scale = scale if abs(scale) > 1e-6 else 1.0
                sample[latent_rows] = current + (after - before).to(sample.dtype) / scale
        return self._step(model_output, timestep, sample, *args, **kwargs)


class _Handle:
    def __init__(self, remove: Callable[[], None]) -> None:
        self.remove = remove


@register_hook("a-star", "A-STAR: test-time attention segregation + retention latent updates")
def install_a_star(edit: Edit, pipe: Any) -> Any:
    state = _AStar(pipe, edit)
    handle = _Handle(state.remove)
    handle.state = state
    return handle


@register_editor("a-star", description="A-STAR: training-free composition by test-time attention segregation and retention")
class AStar(Editor):
    Config = AStarConfig
    supports = UNET_FAMILIES

    def fit(self, pipe: Any, request: EditRequest) -> Edit:
        phrases = check_phrases(pipe, request.concepts, "A-STAR")
        return Edit.from_hook("a-star", phrases, self.config.model_dump(), base_fingerprint(pipe), detect_family(pipe), "a-star", {})
