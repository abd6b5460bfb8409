"""RECE — Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024), closed form.

Algorithm:

1. UCE (:mod:`erasure.uce`, its settings under ``uce``) gives edited weights ``W'``.
2. For ``epochs`` rounds:

   a. derive the embeddings that still regenerate the concept in the edited model,
      ``c' = (lam_reg I + sum_l W'_l^T W'_l)^-1 (sum_l W'_l^T W_l) c_e`` over every edited K and V
      (:func:`conceptsmith.linalg.regenerating_embeddings`; ``W_l`` original, ``W'_l`` current);
   b. erase them with a UCE step anchored at the CURRENT weights:
      ``W_new = (lam W' + W' c_g c'^T + preserve_scale sum W' p p^T)(lam I + c' c'^T + preserve_scale sum p p^T)^-1``
      (the same solver, ``weights = W'``).

``keep_erased`` (default on; our addition): each step also keeps the UCE stage's own concept rows mapped
to their UCE targets ``W_old c_g``. The published step constrains only ``c'`` and the preserved tokens, so
nothing holds the concept's own embedding in place: ``c'`` is a rescaled, rotated copy of it, and mapping
``c'`` to the guide pulls ``W c_e`` away from it. On ShapesWorld (square, UCE token policy ``all`` with
expanded prompts) one published step raised the concept rows' relative residual from 0.10 to 0.84 and the
erased square came back (drawn 0.12 -> 0.75 -> 1.00 over epochs 0, 1, 2); with ``keep_erased`` the residual
is 0.06 after one and two epochs.

``regen_tokens``: ``all`` derives ``c'`` for every token of each concept prompt (77 rows, paired position
by position with the guide prompt's), as in the paper; ``edited`` only for the rows the UCE stage edited
(paired with the same guide rows).

SD3 / FLUX: the derivation needs only the edited linear maps, so it runs unchanged on the transformer's
text maps (:mod:`conceptsmith.mmdit`), separately for each group that reads the same features: the
``context_embedder`` on the joint token sequence (``all``: every row of it, SD3 333, FLUX 512) and the
pooled-text map on the pooled embeddings (one row per prompt).

``score_fn(pipe, edit, epoch) -> float`` (constructor argument; higher = better erasure, e.g. an evaluator's
1 - concept accuracy on validation images) is called after every epoch with the edit so far; with
``keep_best`` the best-scoring epoch is returned (the official loop does this with generated images).
The callback may apply and revert the edit on ``pipe``; it must leave ``pipe`` as it found it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from conceptsmith.edits import Edit
from conceptsmith.erasure._closed_form import (
    ClosedFormConfig,
    EditRows,
    MapGroup,
    add_deltas,
    cache_root,
    check_request,
    full_rows,
    group_metrics,
    make_edit,
    solve,
    torch_dtype,
    updated_weights,
)
from conceptsmith.erasure.uce import UCEConfig, default_guide, request_groups
from conceptsmith.linalg import regenerating_embeddings
from conceptsmith.registry import ALL_FAMILIES, Editor, EditRequest, register_editor

ScoreFn = Callable[[Any, Edit, int], float]


class RECEConfig(ClosedFormConfig):
    """Defaults mirror ``configs/erase/rece.yaml`` (the paper's settings for objects / unsafe content)."""

    uce: UCEConfig = Field(default_factory=UCEConfig, description="settings of the initial UCE edit")
    epochs: int = Field(2, ge=0, description="rounds of regenerating-embedding derivation + erasure")
    lam_reg: float = Field(0.1, gt=0, description="ridge weight of the regenerating-embedding derivation")
    lam: float = Field(0.1, ge=0, description="l1: anchor to the current weights in each RECE step")
    preserve_scale: float = Field(0.1, ge=0, description="l2: weight of the preserved tokens in each RECE step")
    regen_tokens: Literal["all", "edited"] = Field("all", description="which concept tokens are re-derived")
    keep_best: bool = Field(True, description="with a score_fn, return the best-scoring epoch")
    keep_erased: bool = Field(True, description="each step also keeps the concept's own rows mapped to the guide")


def keep_erased_rows(
    original: Mapping[str, torch.Tensor],
    current: Mapping[str, torch.Tensor],
    regenerated: torch.Tensor,
    regen_targets: torch.Tensor,
    rows: EditRows,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Edit rows of a ``keep_erased`` RECE step: the regenerated embeddings mapped to the guide under the
    current weights (the paper's target), then the UCE stage's concept rows mapped to their original targets
    ``W_old c_g``; returned as explicit per-projection outputs."""
    dtype = regenerated.dtype
    concept, guide = rows.inputs.to(dtype), rows.targets.to(dtype)
    outputs = {
        name: torch.cat([regen_targets.to(dtype) @ current[name].to(dtype).T, guide @ original[name].to(dtype).T])
        for name in current
    }
    return torch.cat([regenerated, concept]), outputs


@register_editor("rece", description="RECE: UCE, then erase the embeddings that still regenerate the concept")
class RECE(Editor):
    Config = RECEConfig
    supports = ALL_FAMILIES

    def __init__(self, config: RECEConfig | dict[str, Any] | None = None, score_fn: ScoreFn | None = None) -> None:
        super().__init__(config)
        self.score_fn = score_fn

    def fit(self, pipe: Any, request: EditRequest) -> Edit:
        config: RECEConfig = self.config
        started = time.perf_counter()
        dtype = torch_dtype(config.solve_dtype)
        checked = check_request(pipe, request, default_guide(config.uce.concept_type))
        groups, prompts = request_groups(pipe, checked, config.uce, self._preserve_cache())
        regen = {group.name: self._regeneration_rows(pipe, group, prompts, checked.guide) for group in groups}

        # 1. UCE
        first = {
            group.name: solve(
                group.weights,
                group.rows.inputs,
                group.rows.targets,
                edit_weights=config.uce.erase_scale,
                preserve_inputs=group.rows.preserve,
                preserve_weights=config.uce.preserve_scale,
                lam=config.uce.lam,
                dtype=torch_dtype(config.uce.solve_dtype),
            )
            for group in groups
        }
        deltas = {name: delta for solution in first.values() for name, delta in solution.deltas.items()}
        stages = [{"stage": "uce", **group_metrics(first)}]
        params = {**config.model_dump(), "guide": checked.guide, "preserve": checked.preserve}

        # 2. epochs of regenerating-embedding derivation + erasure at the current weights, group by group
        candidates: list[tuple[int, dict, float | None]] = []
        for epoch in range(1, config.epochs + 1):
            steps = {}
            for group in groups:
                original, (regen_inputs, regen_targets) = group.weights, regen[group.name]
                regenerated = regenerating_embeddings(original, deltas, regen_inputs, config.lam_reg, dtype=dtype)
                current = updated_weights(original, deltas)
                inputs, targets = regenerated, regen_targets
                if config.keep_erased:
                    inputs, targets = keep_erased_rows(original, current, regenerated, regen_targets, group.rows)
                steps[group.name] = solve(
                    current,
                    inputs,
                    targets,
                    preserve_inputs=group.rows.preserve,
                    preserve_weights=config.preserve_scale,
                    lam=config.lam,
                    dtype=dtype,
                )
            for step in steps.values():
                deltas = add_deltas(deltas, step.deltas)
            stages.append({"stage": f"epoch {epoch}", **group_metrics(steps)})
            score = None
            if self.score_fn is not None:
                candidate = self._edit(pipe, checked.concepts, params, deltas, stages, started, None)
                score = float(self.score_fn(pipe, candidate, epoch))
            candidates.append((epoch, deltas, score))

        chosen = config.epochs
        scores = {epoch: score for epoch, _, score in candidates if score is not None}
        if scores and config.keep_best:
            chosen = max(scores, key=lambda epoch: scores[epoch])
            deltas = candidates[chosen - 1][1]
        selection = {"epochs_run": config.epochs, "epoch_returned": chosen, "scores": {str(e): s for e, s in scores.items()}}
        return self._edit(pipe, checked.concepts, params, deltas, stages[: chosen + 1], started, selection)

    def _regeneration_rows(self, pipe: Any, group: MapGroup, prompts: list[str], guide: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows whose regenerating embeddings are derived (``regen_tokens``), with their guide targets."""
        if self.config.regen_tokens == "all":
            return full_rows(pipe, group, prompts, guide)
        return group.rows.inputs, group.rows.targets

    def _preserve_cache(self) -> Path | None:
        """RECE's ``cache_dir`` (when set) overrides its UCE stage's."""
        config: RECEConfig = self.config
        if not config.uce.cache_preserve:
            return None
        return cache_root(config.cache_dir or config.uce.cache_dir)

    def _edit(self, pipe, concepts, params, deltas, stages, started, selection) -> Edit:
        metadata = {
            "closed_form": stages[-1],
            "stages": stages,
            "timing_s": {"total": time.perf_counter() - started},
        }
        if selection is not None:
            metadata["selection"] = selection
        out = {name: (tuple(t.float() for t in d) if isinstance(d, tuple) else d.float()) for name, d in deltas.items()}
        return make_edit(pipe, self.name, concepts, params, out, metadata)
