"""UCE — Unified Concept Editing (Gandikota et al., WACV 2024), erasure.

Algorithm (one closed-form solve for every cross-attention K and V projection; on SD3 / FLUX for the
transformer's text maps, ``context_embedder`` on the concept's token states and the pooled-text map on its
pooled embedding, one solve each, see :mod:`conceptsmith.mmdit`):

1. encode the concept tokens ``c_i`` (token policy below) and the guide tokens ``c_g``;
2. targets ``v_i* = W_old c_g`` (the guide's K/V outputs), preserved tokens keep ``W_old p_j``;
3. ``W = (erase_scale sum v* c^T + preserve_scale sum W_old p p^T + lam W_old)
   (erase_scale sum c c^T + preserve_scale sum p p^T + lam I)^-1`` — :func:`conceptsmith.linalg.solve_ridge`;
4. return the update as a low-rank ``weights`` Edit (rank <= number of edited tokens).

Token policies (``token_policy``):

* ``last_word`` (default, the current official script): the last token of the concept, mapped to the
  guide's last token; the empty guide ``""`` (moderation) maps to its BOS state, as the official
  index (real tokens - 2) does; preserved concepts contribute their last token.
* ``phrase``: every token of the concept phrase, mapped to the guide's last token.
* ``phrase+eos``: the phrase tokens as above, plus the EOS token mapped to the guide's EOS.
* ``all`` (the original script): from the concept's last token through the padding, paired token by
  token with the guide's from its last token (cut to equal length); every token of each preserved
  prompt and of the empty prompt is preserved.

``expand_prompts`` adds each concept in 5 templates (``concept_type`` "art": "painting by X", "art by X",
"artwork by X", "picture by X", "style of X"; "object": "image/photo/portrait/picture/painting of X"),
each edited at X's tokens and mapped to the guide. (The official script also appends the expanded
erase prompts to the preserve list and takes their guide from the preserve list; that looks like a
bug and is not reproduced.) ``expand_preserve`` (our addition) preserves each preserved concept in
the same templates: the template words are edited with the concept, and without this their outputs
for the preserved concepts drift too (ShapesWorld, erasing triangle, token policy ``all``: preserved
shapes drawn 0.58 of the time instead of 0.83; with it 0.83, the concept still fully erased).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from conceptsmith.edits import Edit, base_fingerprint
from conceptsmith.erasure._closed_form import (
    PRESERVE_CACHE_MIN,
    CheckedRequest,
    ClosedFormConfig,
    EditRows,
    MapGroup,
    cache_root,
    check_request,
    expand_prompts,
    group_metrics,
    make_edit,
    solve,
    torch_dtype,
    uce_groups,
)
from conceptsmith.registry import ALL_FAMILIES, Editor, EditRequest, register_editor
from conceptsmith.token_positions import TokenPolicy


class UCEConfig(ClosedFormConfig):
    """Defaults mirror ``configs/erase/uce.yaml`` (the official script's defaults)."""

    token_policy: TokenPolicy = Field("last_word", description="which concept tokens are edited (see module doc)")
    concept_type: Literal["object", "art"] = Field(
        "object", description="default guide ('' for object, 'art' for art) and prompt-expansion templates"
    )
    expand_prompts: bool = Field(False, description="also edit each concept inside 5 prompt templates")
    expand_preserve: bool = Field(False, description="also preserve each preserved concept inside the same templates")
    erase_scale: float = Field(1.0, gt=0, description="weight a_i of every edited token")
    preserve_scale: float = Field(1.0, ge=0, description="weight b_j of every preserved token")
    cache_preserve: bool = Field(True, description=f"cache the encodings of preserve lists of >= {PRESERVE_CACHE_MIN} concepts")

    def preserve_cache(self) -> Path | None:
        return cache_root(self.cache_dir) if self.cache_preserve else None


def default_guide(concept_type: str) -> str:
    return "art" if concept_type == "art" else ""


def request_groups(
    pipe: Any, checked: CheckedRequest, config: UCEConfig, cache: Path | None
) -> tuple[list[MapGroup], list[str]]:
    """The UCE rows of a checked request under ``config``'s token policy and prompt expansion, per group of
    maps; also returns the edited prompts (each concept, then its templates when expanded)."""
    prompts, phrases = checked.concepts, checked.concepts
    if config.expand_prompts:
        prompts, phrases = expand_prompts(checked.concepts, config.concept_type)
    preserve = checked.preserve
    if config.expand_preserve and preserve:
        preserve = expand_prompts(preserve, config.concept_type)[0]
    groups = uce_groups(pipe, prompts, phrases, checked.guide, preserve, config.token_policy, cache)
    return groups, list(prompts)


def request_rows(pipe: Any, checked: CheckedRequest, config: UCEConfig, cache: Path | None) -> tuple[EditRows, list[str]]:
    """:func:`request_groups` of a UNet pipeline: the cross-attention K/V rows (editors built on them alone)."""
    groups, prompts = request_groups(pipe, checked, config, cache)
    return groups[0].rows, prompts


@register_editor("uce", description="Unified Concept Editing: closed-form K/V edit mapping concept tokens to a guide")
class UCE(Editor):
    Config = UCEConfig
    supports = ALL_FAMILIES

    def fit(self, pipe: Any, request: EditRequest) -> Edit:
        config: UCEConfig = self.config
        started, started_cpu = time.perf_counter(), time.process_time()
        checked = check_request(pipe, request, default_guide(config.concept_type))
        fingerprint = base_fingerprint(pipe)
        groups, _ = request_groups(pipe, checked, config, config.preserve_cache())
        encoded, encoded_cpu = time.perf_counter(), time.process_time()
        solutions = {
            group.name: solve(
                group.weights,
                group.rows.inputs,
                group.rows.targets,
                edit_weights=config.erase_scale,
                preserve_inputs=group.rows.preserve,
                preserve_weights=config.preserve_scale,
                lam=config.lam,
                dtype=torch_dtype(config.solve_dtype),
            )
            for group in groups
        }
        deltas = {name: delta for solution in solutions.values() for name, delta in solution.deltas.items()}
        params = {**config.model_dump(), "guide": checked.guide, "preserve": checked.preserve}
        metadata = {
            "closed_form": group_metrics(solutions),
            "timing_s": {"encode": encoded - started, "solve": time.perf_counter() - encoded},
            "cpu_s": {"encode": encoded_cpu - started_cpu, "solve": time.process_time() - encoded_cpu},
        }
        return make_edit(pipe, self.name, checked.concepts, params, deltas, metadata, fingerprint)
