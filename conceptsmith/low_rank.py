"""Low-rank forms of weight changes: the summands of an edit's changes, their exact sum (``compose``), their
truncated SVD factors (``Edit.to_lora``), the Frobenius norm of a factored change, and peft's LoRA scale."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from conceptsmith.edit_format import Term, module_terms
from conceptsmith.errors import EditError

if TYPE_CHECKING:
    from conceptsmith.edits import Edit


def low_rank_terms(edit: Edit) -> dict[str, list[Term]]:
    """Per module, the summands of ``edit``'s weight change, parts included: dense tensors or ``(up, down)`` pairs
    (learned-token parts change no weight: ``Edit.to_lora`` writes them as embedding files)."""
    from conceptsmith.tokens import is_token_edit  # a cycle: tokens builds Edits

    if is_token_edit(edit):
        return {}
    if edit.kind == "hook":
        raise EditError(f"The {edit.label} is an inference-time hook, not a weight change; it has no LoRA form.")
    terms: dict[str, list[Term]] = {}
    for part in edit.parts:
        for module, part_terms in low_rank_terms(part).items():
            terms.setdefault(module, []).extend(part_terms)
    for module, term in module_terms(edit.kind, edit.tensors).items():
        terms.setdefault(module, []).append(term)
    for module, summands in terms.items():
        if not all(_is_2d(term) for term in summands) and not all(_is_conv(term) for term in summands):
            raise EditError(
                f"Module '{module}' is neither a linear layer nor a convolution with LoRA-shaped factors; it cannot be "
                "exported as LoRA."
            )
    return terms


def merged_deltas(edits: Sequence[Edit]) -> dict[str, Term]:
    """Per module, the exact sum of the changes of ``weights`` edits: low-rank factors concatenated along the rank
    (so the sum stays exactly low-rank) when every summand is factored, else the dense sum."""
    terms: dict[str, list[Term]] = {}
    shapes: dict[str, list[int]] = {}
    for edit in edits:
        for module, shape in edit.module_shapes.items():
            if shapes.setdefault(module, shape) != shape:
                raise EditError(f"Cannot compose: module '{module}' has shape {shapes[module]} in one edit and {shape} in another.")
        for module, term in module_terms("weights", edit.tensors).items():
            terms.setdefault(module, []).append(term)
    deltas: dict[str, Term] = {}
    for module, summands in terms.items():
        if all(isinstance(term, tuple) for term in summands):
            deltas[module] = (
                torch.cat([up.float() for up, _ in summands], dim=1),
                torch.cat([down.float() for _, down in summands], dim=0),
            )
        else:
            deltas[module] = sum(_dense(term) for term in summands)
    return deltas


def change_norm(term: Term) -> float:
    """Frobenius norm of a module's change: a dense delta, or ``up @ down`` (convolutions flattened) computed as
    ``sqrt(sum((U^T U) * (D D^T)))`` from the ``r x r`` Gram matrices, without forming the product."""
    if not isinstance(term, tuple):
        return float(torch.linalg.vector_norm(term.detach(), dtype=torch.float64))
    up, down = (t.detach().flatten(1).double() for t in term)
    return math.sqrt(max(float(((up.T @ up) * (down @ down.T)).sum()), 0.0))


def factorize_layer(terms: list[Term], rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`_factorize` for a linear layer, or for a convolution seen as the linear map ``[out, in * kh * kw]``
    (exact: a conv's LoRA is ``up[:, :, 0, 0] @ down.flatten(1)``), its factors reshaped back to conv form."""
    if all(_is_2d(term) for term in terms):
        return _factorize(terms, rank)
    first = terms[0]
    kernel = tuple((first[1] if isinstance(first, tuple) else first).shape[1:])  # (in, kh, kw)
    flat = [(term[0].flatten(1), term[1].flatten(1)) if isinstance(term, tuple) else term.flatten(1) for term in terms]
    up, down, error = _factorize(flat, rank)
    return up[:, :, None, None], down.reshape(down.shape[0], *kernel), error


def _factorize(terms: list[Term], rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(up, down, relative error)`` with ``up @ down`` = the sum of ``terms``, rank-capped by ``rank``."""
    if all(isinstance(term, tuple) for term in terms):
        up = torch.cat([u.double() for u, _ in terms], dim=1)
        down = torch.cat([d.double() for _, d in terms], dim=0)
        width = up.shape[1]
        if width <= min(up.shape[0], down.shape[1]) and (rank is None or width <= rank):
            return up, down, 0.0
        q_up, r_up = torch.linalg.qr(up)
        q_down, r_down = torch.linalg.qr(down.T)
        u, s, vh = torch.linalg.svd(r_up @ r_down.T)
        left, right = q_up @ u, vh @ q_down.T
    else:
        left, s, right = torch.linalg.svd(sum(_dense(term).double() for term in terms), full_matrices=False)
    tolerance = s.max() * max(left.shape[0], right.shape[1]) * torch.finfo(torch.float32).eps
    keep = int((s > tolerance).sum()) if rank is None else min(rank, int((s > tolerance).sum()))
    total = float(s.square().sum())
    error = math.sqrt(float(s[keep:].square().sum()) / total) if total > 0 else 0.0
    root = s[:keep].sqrt()
    return left[:, :keep] * root, root[:, None] * right[:keep], error


def _is_2d(term: Term) -> bool:
    return all(t.ndim == 2 for t in (term if isinstance(term, tuple) else (term,)))


def _is_conv(term: Term) -> bool:
    """A convolution's change: a dense ``[out, in, kh, kw]`` delta, or LoRA factors ``up [out, r, 1, 1]``,
    ``down [r, in, kh, kw]`` (peft's and kohya's layout for Conv2d)."""
    if isinstance(term, tuple):
        up, down = term
        return up.ndim == 4 and down.ndim == 4 and tuple(up.shape[2:]) == (1, 1)
    return term.ndim == 4


def _dense(term: Term) -> torch.Tensor:
    if isinstance(term, tuple):
        return term[0].float() @ term[1].float()
    return term.float()


# -- peft's LoRA scale -------------------------------------------------------------------------------


def lora_config_dict(config: Any) -> dict[str, Any]:
    """What the LoRA scale needs of a ``LoraConfig`` (or a dict with ``lora_alpha``): alpha, alpha_pattern, rsLoRA."""
    raw = config if isinstance(config, Mapping) else vars(config)
    if "lora_alpha" not in raw:
        raise EditError(f"LoRA config {raw} has no 'lora_alpha'; pass the adapter's LoraConfig or a dict with lora_alpha.")
    return {
        "lora_alpha": raw["lora_alpha"],
        "alpha_pattern": dict(raw.get("alpha_pattern") or {}),
        "use_rslora": bool(raw.get("use_rslora", False)),
    }


def lora_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's scaling of one module: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), alpha from alpha_pattern."""
    alpha = next(
        (value for pattern, value in config["alpha_pattern"].items() if re.match(rf"(.*\.)?({pattern})$", module)),
        config["lora_alpha"],
    )
    return alpha / (math.sqrt(rank) if config["use_rslora"] else rank)
