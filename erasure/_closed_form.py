"""Glue shared by the closed-form erasure editors (uce, rece, realera, mace-cfr).

Request validation with actionable errors, the K/V projections an editor solves for, the UCE-style
pairing of concept tokens with guide tokens under each token policy, and turning a
:class:`~conceptsmith.linalg.RidgeSolution` into a ``weights`` Edit. No method-specific math here:
the solve itself is :func:`conceptsmith.linalg.solve_ridge`.

The maps solved for come in groups that read the same text features (:class:`MapGroup`, one system
each): a UNet's cross-attention K/V (the token embeddings); an MMDiT's ``context_embedder`` (the joint
token sequence: each run of it, CLIP then T5 for SD3, is paired with the guide's same run) and its
pooled-text map (the pooled embeddings; the token policy does not apply). See :mod:`conceptsmith.mmdit`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors.torch import load_file

from conceptsmith.attention import kv_projections
from conceptsmith.edits import Edit, EditError, base_fingerprint
from conceptsmith.io import save_safetensors
from conceptsmith.linalg import RidgeSolution, SingularSystemError, solve_ridge
from conceptsmith.mmdit import is_mmdit, text_maps
from conceptsmith.models import detect_family
from conceptsmith.registry import EditorConfig, EditRequest
from conceptsmith.text import encode_prompts, text_encoders, tokenize
from conceptsmith.text_segments import TextSegment, encode_mmdit, text_segments
from conceptsmith.token_positions import TokenPolicy, concept_token_embeddings, concept_token_positions

SolveDtype = Literal["float64", "float32"]

ART_TEMPLATES: tuple[str, ...] = ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}")
OBJECT_TEMPLATES: tuple[str, ...] = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")


class ClosedFormConfig(EditorConfig):
    """Hyper-parameters every closed-form editor shares."""

    lam: float = Field(0.5, ge=0, description="ridge weight of ||W - W_old||_F^2 (anchor to the current weights)")
    solve_dtype: SolveDtype = Field("float64", description="precision of the solve, whatever the model dtype")
    cache_dir: str | None = Field(None, description="cache directory (default $CONCEPTSMITH_CACHE or ~/.cache/conceptsmith)")


PRESERVE_CACHE_MIN = 32  # preserve lists at least this long are cached on disk (shorter ones encode fast)


def cache_root(cache_dir: str | None) -> Path:
    """Where encodings and priors are cached: ``cache_dir``, else ``$CONCEPTSMITH_CACHE``, else ``~/.cache/conceptsmith``."""
    return Path(cache_dir or os.environ.get("CONCEPTSMITH_CACHE") or "~/.cache/conceptsmith").expanduser()


# -- request validation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedRequest:
    concepts: list[str]
    guide: str
    preserve: list[str]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def check_request(pipe: Any, request: EditRequest, default_guide: str) -> CheckedRequest:
    """Validated concepts, guide and preserve list; every problem raises an :class:`EditError` saying what to do.

    Duplicates (case and spacing ignored) are dropped, keeping the first spelling."""
    if not request.concepts:
        raise EditError("No concept to erase: give at least one (CLI: --concept \"van gogh\" or --concepts-file FILE).")
    concepts: dict[str, str] = {}
    for index, concept in enumerate(request.concepts):
        if not isinstance(concept, str) or not concept.strip():
            raise EditError(
                f"Concept #{index + 1} is empty ({concept!r}): name the concept to erase with its words, "
                "e.g. --concept \"van gogh\", or remove the empty entry."
            )
        concepts.setdefault(_norm(concept), concept.strip())
    guide = default_guide if request.guide is None else request.guide.strip()
    if _norm(guide) in concepts:
        raise EditError(
            f"The guide {guide!r} is the concept being erased: erasing a concept towards itself changes nothing. "
            "Pick another guide (e.g. 'art' for a style, '' for an object or unsafe concept), or drop --guide."
        )
    preserve: dict[str, str] = {}
    for item in request.preserve:
        if not isinstance(item, str) or not item.strip():
            raise EditError(f"Empty entry {item!r} in the preserve list: remove it or name a concept to keep.")
        if _norm(item) in concepts:
            raise EditError(f"{item.strip()!r} is both erased and preserved; remove it from the preserve list (or from the concepts).")
        preserve.setdefault(_norm(item), item.strip())
    tokenizer = text_encoders(pipe)[0][0]
    _check_tokens(tokenizer, list(concepts.values()), "Concept")
    _check_tokens(tokenizer, [guide] if guide else [], "Guide")
    _check_tokens(tokenizer, list(preserve.values()), "Preserved concept")
    return CheckedRequest(list(concepts.values()), guide, list(preserve.values()))


def _check_tokens(tokenizer: Any, texts: list[str], what: str) -> None:
    if not texts:
        return
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for text, ids in zip(texts, tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]):
        if not [i for i in ids if i not in special]:
            raise EditError(
                f"{what} {text!r} tokenizes to nothing this model can see (no ordinary tokens, only whitespace or "
                "special tokens such as <|endoftext|>). Spell it with ordinary words."
            )


def expand_prompts(concepts: Sequence[str], concept_type: str) -> tuple[list[str], list[str]]:
    """``(prompts, phrases)``: each concept alone, then in the 5 UCE templates of its type."""
    templates = ART_TEMPLATES if concept_type == "art" else OBJECT_TEMPLATES
    prompts = list(concepts) + [template.format(concept) for concept in concepts for template in templates]
    phrases = list(concepts) + [concept for concept in concepts for _ in templates]
    return prompts, phrases


# -- projections and the Edit ------------------------------------------------------------------------


def kv_weights(pipe: Any) -> dict[str, torch.Tensor]:
    """``{"unet.<layer>.to_k": W, ...}``: the current weights of every cross-attention K/V projection."""
    projections = kv_projections(pipe.unet)
    if not projections:
        raise EditError(f"{type(pipe.unet).__name__} has no cross-attention K/V projections to edit.")
    return {f"unet.{name}": linear.weight.detach() for name, linear in projections.items()}


def torch_dtype(name: str) -> torch.dtype:
    return {"float64": torch.float64, "float32": torch.float32}[name]


def solve(weights: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> RidgeSolution:
    """:func:`solve_ridge`, its singular-system errors turned into :class:`EditError`."""
    try:
        return solve_ridge(weights, *args, **kwargs)
    except SingularSystemError as err:
        raise EditError(str(err)) from None


def make_edit(
    pipe: Any,
    method: str,
    concepts: list[str],
    params: dict[str, Any],
    deltas: Mapping[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    metadata: dict[str, Any],
    fingerprint: str | None = None,
) -> Edit:
    fingerprint = fingerprint or base_fingerprint(pipe)
    return Edit.from_weight_deltas(method, concepts, params, fingerprint, detect_family(pipe), dict(deltas), metadata=metadata)


# -- token rows: concepts paired with the guide ------------------------------------------------------


@dataclass
class EditRows:
    """Edit vectors ``inputs`` ``[k, d]`` with input-space ``targets`` ``[k, d]`` and ``preserve`` ``[m, d]``."""

    inputs: torch.Tensor
    targets: torch.Tensor
    preserve: torch.Tensor | None


def guide_rows(pipe: Any, guide: str, policy: TokenPolicy) -> dict[str, Any]:
    """The guide prompt's rows: ``word`` = its last word, at UCE's official index (real tokens - 2, which is
    BOS for the empty guide; a T5 run has no BOS, so there the empty guide's EOS), ``eos``; for policy ``all``
    the whole padded encoding ``all`` and ``start``."""
    length = tokenize(pipe, [guide]).lengths[0]
    word = max(length - 2, 0)
    states = encode_prompts(pipe, [guide], max_length=None if policy == "all" else length)[0]
    return {"word": states[word : word + 1], "eos": states[length - 1 : length], "all": states, "start": word}


def uce_rows(
    pipe: Any,
    prompts: Sequence[str],
    phrases: Sequence[str],
    guide: str,
    preserve: Sequence[str],
    policy: TokenPolicy,
    cache: Path | None = None,
) -> EditRows:
    """Concept tokens of ``prompts`` mapped to the guide's, under a token policy (see :mod:`erasure.uce`).

    With ``cache`` (a directory), the rows of a preserve list of at least ``PRESERVE_CACHE_MIN``
    prompts are stored there once per base model, policy and list, and read back on later edits."""
    guide_states = guide_rows(pipe, guide, policy)
    if policy == "all":
        states = encode_prompts(pipe, list(prompts))
        positions = concept_token_positions(pipe, list(prompts), list(phrases), "last_word")
        g_start = guide_states["start"]
        inputs, targets = [], []
        for index, pos in enumerate(positions):  # UCE's original pairing, aligned at the last words
            start = pos[-1]
            n = states.shape[1] - max(start, g_start)
            inputs.append(states[index, start : start + n])
            targets.append(guide_states["all"][g_start : g_start + n])
        rows, targets_ = torch.cat(inputs), torch.cat(targets)
    else:
        rows, positions = token_rows(pipe, prompts, phrases, policy)
        targets_ = guide_states["word"].expand(rows.shape[0], -1).clone()
        if policy == "phrase+eos":  # the last position of each prompt is its EOS: map it to the guide's EOS
            ends = torch.tensor([len(p) for p in positions]).cumsum(0) - 1
            targets_[ends] = guide_states["eos"]
    return EditRows(rows, targets_, preserve_rows(pipe, preserve, policy, cache))


def token_rows(pipe: Any, prompts: Sequence[str], phrases: Sequence[str], policy: TokenPolicy) -> tuple[torch.Tensor, list[list[int]]]:
    """:func:`concept_token_embeddings` with the prompts grouped by token count, so that each group is
    encoded only as far as it needs (one long prompt does not make every prompt pay for its length)."""
    groups: dict[int, list[int]] = {}
    for index, length in enumerate(tokenize(pipe, list(prompts), warn=False).lengths):
        groups.setdefault(length, []).append(index)
    rows: list[torch.Tensor | None] = [None] * len(prompts)
    positions: list[list[int]] = [[] for _ in prompts]
    for indices in groups.values():
        group_rows, group_positions = concept_token_embeddings(
            pipe, [prompts[i] for i in indices], [phrases[i] for i in indices], policy, return_positions=True
        )
        for i, part, pos in zip(indices, group_rows.split([len(p) for p in group_positions]), group_positions):
            rows[i], positions[i] = part, pos
    return torch.cat(rows), positions


def preserve_rows(pipe: Any, preserve: Sequence[str], policy: TokenPolicy, cache: Path | None) -> torch.Tensor | None:
    """Rows of the preserved concepts: the ``policy`` tokens of each (``all``: every token of each and of '')."""
    if not preserve:
        return None if policy != "all" else encode_prompts(pipe, [""])[0]

    def compute() -> torch.Tensor:
        if policy == "all":
            states = encode_prompts(pipe, [*preserve, ""])
            return states.reshape(-1, states.shape[-1])
        return token_rows(pipe, preserve, preserve, policy)[0]

    if cache is None or len(preserve) < PRESERVE_CACHE_MIN:
        return compute()
    key = hashlib.sha256(json.dumps([policy, list(preserve)]).encode()).hexdigest()[:16]
    base = f"{base_fingerprint(pipe.pipe)}-{pipe.name}" if isinstance(pipe, TextSegment) else base_fingerprint(pipe)
    path = cache / "encodings" / f"preserve-{base}-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["rows"]
    rows = compute()
    save_safetensors(path, {"rows": rows}, {"policy": policy, "count": str(len(preserve))})
    return rows


# -- groups of maps reading the same features --------------------------------------------------------


@dataclass
class MapGroup:
    """Maps that read the same text features (one closed-form system) with the rows to solve for."""

    name: str
    weights: dict[str, torch.Tensor]
    rows: EditRows


def map_weights(pipe: Any) -> dict[str, dict[str, torch.Tensor]]:
    """The current weights a closed-form editor edits, by group: a UNet pipeline's ``{"cross_attention":
    kv_weights(pipe)}``; an MMDiT pipeline's ``{"tokens": {"transformer.context_embedder": W}, "pooled": ...}``."""
    if not is_mmdit(pipe):
        return {"cross_attention": kv_weights(pipe)}
    return {
        group: {f"transformer.{name}": linear.weight.detach() for name, linear in maps.items()}
        for group, maps in text_maps(pipe.transformer).items()
    }


def uce_groups(
    pipe: Any,
    prompts: Sequence[str],
    phrases: Sequence[str],
    guide: str,
    preserve: Sequence[str],
    policy: TokenPolicy,
    cache: Path | None = None,
) -> list[MapGroup]:
    """:func:`uce_rows` for every group of :func:`map_weights`: an MMDiT's token rows are gathered run by run
    (:func:`conceptsmith.text_segments.text_segments`), its pooled rows map each prompt's pooled embedding to the guide's."""
    weights = map_weights(pipe)
    if not is_mmdit(pipe):
        return [MapGroup("cross_attention", weights["cross_attention"], uce_rows(pipe, prompts, phrases, guide, preserve, policy, cache))]
    runs = [uce_rows(segment, prompts, phrases, guide, preserve, policy, cache) for segment in text_segments(pipe)]
    kept = [run.preserve for run in runs if run.preserve is not None]
    tokens = EditRows(
        torch.cat([run.inputs for run in runs]), torch.cat([run.targets for run in runs]), torch.cat(kept) if kept else None
    )
    return [MapGroup("tokens", weights["tokens"], tokens), MapGroup("pooled", weights["pooled"], pooled_rows(pipe, prompts, guide, preserve))]


def pooled_rows(pipe: Any, prompts: Sequence[str], guide: str, preserve: Sequence[str]) -> EditRows:
    """Each prompt's pooled embedding mapped to the guide's; the preserved prompts' pooled embeddings kept."""
    pooled = encode_mmdit(pipe, [*prompts, guide, *preserve])[1]
    n = len(prompts)
    return EditRows(pooled[:n], pooled[n : n + 1].expand(n, -1).clone(), pooled[n + 1 :] if preserve else None)


def full_rows(pipe: Any, group: MapGroup, prompts: Sequence[str], guide: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row the group's maps read for each prompt, paired position by position with the guide's:
    all tokens of the padded encodings (the pooled group: one row per prompt)."""
    if group.name == "pooled":
        pooled = encode_mmdit(pipe, [*prompts, guide])[1]
        return pooled[:-1], pooled[-1:].expand(len(prompts), -1).clone()
    states = encode_prompts(pipe, list(prompts))
    return states.reshape(-1, states.shape[-1]), encode_prompts(pipe, [guide])[0].repeat(len(prompts), 1)


def group_metrics(solutions: Mapping[str, RidgeSolution]) -> dict[str, Any]:
    """An Edit's ``closed_form`` metadata: one group's solver metrics, or the worst over groups plus each group's."""
    if len(solutions) == 1:
        return next(iter(solutions.values())).metrics()
    metrics = {name: solution.metrics() for name, solution in solutions.items()}
    return {
        "rank": max(m["rank"] for m in metrics.values()),
        "condition_number": max(m["condition_number"] for m in metrics.values()),
        "max_edit_residual": max(m["max_edit_residual"] for m in metrics.values()),
        "max_preserve_residual": max(m["max_preserve_residual"] for m in metrics.values()),
        "groups": metrics,
    }


# -- sums of updates (multi-stage editors) ------------------------------------------------------------

Delta = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def add_deltas(total: dict[str, Delta], new: Mapping[str, Delta]) -> dict[str, Delta]:
    """Per projection ``total + new``: factors are concatenated along the rank (the sum stays exactly
    low-rank) unless either side is dense or the rank reaches ``min(d_out, d_in)``."""
    result = dict(total)
    for name, delta in new.items():
        old = result.get(name)
        if old is None:
            result[name] = delta
        elif isinstance(old, tuple) and isinstance(delta, tuple):
            up = torch.cat([old[0], delta[0]], dim=1)
            down = torch.cat([old[1], delta[1]], dim=0)
            result[name] = (up, down) if up.shape[1] < min(up.shape[0], down.shape[1]) else up @ down
        else:
            result[name] = _dense(old) + _dense(delta)
    return result


def _dense(delta: Delta) -> torch.Tensor:
    return delta[0] @ delta[1] if isinstance(delta, tuple) else delta


def updated_weights(weights: Mapping[str, torch.Tensor], deltas: Mapping[str, Delta]) -> dict[str, torch.Tensor]:
    """``W + delta`` per projection, in float64 (the weights the next closed-form stage anchors at)."""
    return {
        name: weight.double() + (_dense(deltas[name]).double() if name in deltas else 0.0)
        for name, weight in weights.items()
    }
