"""The closed-form solver shared by every closed-form editor (UCE, RECE, RealEra, MACE-CFR, merges).

For every projection ``W_old`` (``d_out x d_in``; a cross-attention ``to_k`` / ``to_v``) the
editors minimise one ridge least-squares objective::

    sum_i a_i ||W c_i - v_i*||^2  +  sum_j b_j ||W p_j - W_old p_j||^2  +  lam ||W - W_old||_F^2

(edit vectors ``c_i`` with targets ``v_i*``, preserved vectors ``p_j``, anchor ``W_old``), whose
minimiser is ``W = (sum a v* c^T + sum b W_old p p^T + lam W_old) M^-1`` with
``M = sum a c c^T + sum b p p^T + lam I`` (``d_in x d_in``).

How :func:`solve_ridge` computes it:

* ``M`` depends on the text embeddings only, so it is built once (Gram matrices by matmul, no loop
  over vectors) and factored once (Cholesky), in float64 by default whatever the model's dtype.
* Subtracting ``W_old M`` from both sides gives the update in closed form::

      dW = W - W_old = R A C^T M^-1,      R = V* - W_old C   (d_out x k),  A = diag(a)

  so ``dW = up @ down`` with ``up = R`` and ``down = A C^T M^-1`` (``k x d_in``): rank <= k, the
  number of edit vectors, exactly (a LoRA of rank k reproduces it). ``down`` is the same for every
  projection (one triangular solve); ``up`` needs ``W_old`` times the inputs, computed for all
  projections at once as one matmul of the stacked weights (row-stacked in chunks of bounded memory).
  That product runs in the weights' own precision promoted to float32 (float64 for float64 weights):
  the weights are exact in it and ``T - C`` is formed in the solve precision first, so the update is
  accurate to ~1e-6 relative (it is stored in float32 anyway) at half the cost of float64.
* Targets given in input space (``v_i* = W_old t_i``, e.g. UCE's guide embedding) make ``up`` a
  single product ``W_old (T - C)``.
* Per projection it records how much of the requested change was not achieved (edit residual),
  how far the preserved outputs moved (preserve residual), and once the condition number of ``M``.

With ``lam = 0`` the system is only well posed when the edit and preserve vectors together span all
``d_in`` input dimensions; otherwise (and when only edit vectors are given) :class:`SingularSystemError`
says how to fix the call.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "RidgeSolution",
    "SingularSystemError",
    "regenerating_embeddings",
    "solve_constrained",
    "solve_ridge",
    "weighted_gram",
]

Delta = Tensor | tuple[Tensor, Tensor]

_DEFAULT_CHUNK_BYTES = 64 * 2**20


class SingularSystemError(ValueError):
    """The closed-form system has no unique solution; the message says what to change."""


@dataclass
class RidgeSolution:
    """The result of :func:`solve_ridge`.

    ``deltas[name]`` is ``(up, down)`` with ``W_new = W_old + up @ down`` (``up`` ``[d_out, r]``,
    ``down`` ``[r, d_in]``), or a dense ``[d_out, d_in]`` tensor when ``r`` reaches
    ``min(d_out, d_in)`` (a factorization would not be smaller). ``edit_residual[name]`` is
    ``||W_new C - V*||_F / ||V* - W_old C||_F`` (0: every edit met exactly, 1: nothing changed);
    ``preserve_residual[name]`` is ``||(W_new - W_old) P B^1/2||_F / ||W_old P B^1/2||_F`` (the
    relative drift of the weighted preserved outputs; the prior Gram counts as preserved vectors).
    """

    deltas: dict[str, Delta]
    condition_number: float
    edit_residual: dict[str, float]
    preserve_residual: dict[str, float]
    rank: int
    lam: float
    dtype: torch.dtype
    n_edit: int
    n_preserve: int
    extra: dict[str, Any] = field(default_factory=dict)

    def dense(self, name: str) -> Tensor:
        """The update of projection ``name`` as a dense ``[d_out, d_in]`` tensor."""
        delta = self.deltas[name]
        if isinstance(delta, tuple):
            return delta[0].to(self.dtype) @ delta[1].to(self.dtype)
        return delta

    def metrics(self) -> dict[str, Any]:
        """JSON-serializable summary for an Edit's metadata."""
        return {
            "solver": "ridge-cholesky",
            "solve_dtype": str(self.dtype).removeprefix("torch."),
            "lam": self.lam,
            "condition_number": self.condition_number,
            "n_edit_vectors": self.n_edit,
            "n_preserve_vectors": self.n_preserve,
            "rank": self.rank,
            "max_edit_residual": max(self.edit_residual.values(), default=0.0),
            "max_preserve_residual": max(self.preserve_residual.values(), default=0.0),
            "edit_residual": dict(self.edit_residual),
            "preserve_residual": dict(self.preserve_residual),
            **self.extra,
        }


def weighted_gram(vectors: Tensor, weights: float | Tensor = 1.0, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """``sum_i w_i x_i x_i^T`` (``[d, d]``) of the rows of ``vectors`` (``[n, d]``), one matmul."""
    x = vectors.to(dtype)
    w = _weights(weights, x.shape[0], "weights", dtype, x.device)
    return (x * w[:, None]).T @ x


def solve_ridge(
    weights: Mapping[str, Tensor],
    edit_inputs: Tensor,
    edit_targets: Tensor | Mapping[str, Tensor],
    *,
    edit_weights: float | Tensor = 1.0,
    preserve_inputs: Tensor | None = None,
    preserve_weights: float | Tensor = 1.0,
    preserve_gram: Tensor | None = None,
    lam: float = 0.5,
    dtype: torch.dtype = torch.float64,
    out_dtype: torch.dtype = torch.float32,
    low_rank: bool | None = None,
    chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
) -> RidgeSolution:
    """Solve the ridge problem of the module docstring for every projection in ``weights``.

    ``weights``: ``{name: W_old [d_out, d_in]}`` (any dtype/device; never modified).
    ``edit_inputs``: ``C`` ``[k, d_in]``, one edit vector per row.
    ``edit_targets``: either ``T`` ``[k, d_in]`` in input space (target ``v_i* = W_old t_i`` for every
    projection, UCE's "map c to the guide's output") or ``{name: V* [k, d_out]}`` explicit outputs.
    ``edit_weights`` / ``preserve_weights``: scalars or per-row tensors (``a_i``, ``b_j`` >= 0).
    ``preserve_inputs``: ``P`` ``[m, d_in]`` (targets ``W_old p_j``). ``preserve_gram``: an extra,
    already weighted ``sum b p p^T`` (e.g. a cached caption prior), added to ``M``.
    ``lam``: ridge weight of ``||W - W_old||``. ``dtype``: solve precision (float64 or float32).
    ``out_dtype``: dtype of the returned deltas. ``low_rank``: ``True`` always factors, ``False``
    always dense, ``None`` factors when the rank is below ``min(d_out, d_in)``.
    """
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"solve dtype must be torch.float64 or torch.float32 (never half precision), got {dtype}.")
    if not weights:
        raise ValueError("No projections to edit: `weights` is empty.")
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam}.")
    weights = _float64_capable(weights, dtype)
    names = list(weights)
    d_in = _common_d_in(weights)
    device = weights[names[0]].device

    c = _matrix(edit_inputs, "edit_inputs", d_in, dtype, device)
    k = c.shape[0]
    if k == 0:
        raise ValueError("No edit vectors: edit_inputs has 0 rows. Give at least one concept to edit.")
    a = _weights(edit_weights, k, "edit_weights", dtype, device)
    input_targets = isinstance(edit_targets, Tensor)
    if input_targets:
        t = _matrix(edit_targets, "edit_targets", d_in, dtype, device)
        if t.shape[0] != k:
            raise ValueError(f"edit_targets has {t.shape[0]} rows but edit_inputs has {k}: give one target per edit vector.")
    else:
        missing = [n for n in names if n not in edit_targets]
        if missing:
            raise ValueError(f"edit_targets has no entry for projections {missing[:3]}: give V* for every projection.")
        for name in names:
            shape = tuple(edit_targets[name].shape)
            if shape != (k, weights[name].shape[0]):
                raise ValueError(f"edit_targets['{name}'] has shape {shape}, expected {(k, weights[name].shape[0])} = [k, d_out].")

    p = None if preserve_inputs is None else _matrix(preserve_inputs, "preserve_inputs", d_in, dtype, device)
    if p is not None and p.shape[0] == 0:
        p = None
    b = None if p is None else _weights(preserve_weights, p.shape[0], "preserve_weights", dtype, device)
    if b is not None and not bool((b > 0).any()):  # zero weights preserve nothing
        p = b = None
    prior = None
    if preserve_gram is not None:
        prior = preserve_gram.to(device=device, dtype=dtype)
        if prior.shape != (d_in, d_in):
            raise ValueError(f"preserve_gram has shape {tuple(prior.shape)}, expected {(d_in, d_in)}.")
        if not bool(prior.any()):
            prior = None
    m = 0 if p is None else p.shape[0]

    chol, condition = _factored_system(c, a, p, b, prior, lam, dtype)  # shared by every projection

    # down = A C^T M^-1 (shared by every projection): M is symmetric, so down^T = M^-1 C A.
    down = torch.cholesky_solve((c * a[:, None]).T.contiguous(), chol).T.contiguous()  # [k, d_in]
    # Edit residual W_new C - V* = R (down C^T - I) =: R S ; preserved drift dW P = R (down P^T) =: R Q.
    s = down @ c.T
    s.diagonal().sub_(1.0)
    sqrt_b = None if b is None else b.sqrt()
    q = None if p is None else (down @ p.T) * sqrt_b[None, :]
    z = None if prior is None else down @ prior @ down.T

    # What the stacked matmul multiplies W_old by: [T - C | P] (input targets) or [C | P] (explicit).
    left = (t - c) if input_targets else c
    rhs = left.T if p is None else torch.cat([left.T, (p * sqrt_b[:, None]).T], dim=1)
    rhs = rhs.contiguous()

    if low_rank is None:
        low_rank_of = {n: k < min(weights[n].shape) for n in names}
    else:
        low_rank_of = dict.fromkeys(names, bool(low_rank))

    deltas: dict[str, Delta] = {}
    edit_residual: dict[str, float] = {}
    preserve_residual: dict[str, float] = {}
    # Products with the stored weights run in the weights' precision promoted to float32 (float64 weights:
    # float64): W is exact in it and the inputs are formed in `dtype` first, so no cancellation is
    # amplified; explicit targets (R = V* - W C) are formed in `dtype`.
    product_dtype = dtype if not input_targets else _product_dtype(weights, dtype)
    rhs = rhs.to(product_dtype)
    width = _itemsize(product_dtype) * (d_in + 3 * k + 2 * m) + _itemsize(dtype) * (2 * d_in if prior is not None else 0)
    # The per-projection diagnostics (residuals) are computed in the product precision too.
    s_p = s.to(product_dtype)
    q_p = None if q is None else q.to(product_dtype)
    z_p = None if z is None else z.to(product_dtype)
    down_p, down_out = down.to(product_dtype), down.to(out_dtype)  # shared by every low-rank projection
    for chunk in _chunks(names, weights, width, chunk_bytes):
        stacked = _stack(chunk, weights, d_in, product_dtype, device)
        product = stacked @ rhs  # [sum d_out, k (+ m)]
        r_all = product[:, :k]
        if not input_targets:
            r_all = torch.cat([edit_targets[n].to(device=device, dtype=dtype).T for n in chunk], dim=0) - r_all
        offsets = _offsets(chunk, weights)
        edit_error = _block_sq_norms(r_all @ s_p, offsets)
        requested = _block_sq_norms(r_all, offsets)
        if p is not None or prior is not None:
            drift = torch.zeros(len(chunk), dtype=torch.float64, device=device)
            scale = torch.zeros(len(chunk), dtype=torch.float64, device=device)
            if p is not None:
                drift += _block_sq_norms(r_all @ q_p, offsets)
                scale += _block_sq_norms(product[:, k:], offsets)
            if prior is not None:
                drift += _block_sums((r_all @ z_p) * r_all, offsets)
                stacked = stacked.to(dtype)
                scale += _block_sums((stacked @ prior) * stacked, offsets)
        for index, name in enumerate(chunk):
            start, stop = offsets[index], offsets[index + 1]
            up = r_all[start:stop]
            if low_rank_of[name]:
                deltas[name] = (up.to(out_dtype).contiguous(), down_out)
            else:
                deltas[name] = (up @ down_p).to(out_dtype)
            edit_residual[name] = _ratio(edit_error[index], requested[index])
            if p is not None or prior is not None:
                preserve_residual[name] = _ratio(drift[index], scale[index])
        del stacked, product, r_all

    return RidgeSolution(
        deltas=deltas,
        condition_number=condition,
        edit_residual=edit_residual,
        preserve_residual=preserve_residual,
        rank=k,
        lam=lam,
        dtype=dtype,
        n_edit=k,
        n_preserve=m,
    )


def _factored_system(
    c: Tensor, a: Tensor, p: Tensor | None, b: Tensor | None, prior: Tensor | None, lam: float, dtype: torch.dtype
) -> tuple[Tensor, float]:
    """The Cholesky factor of :func:`solve_ridge`'s shared ``d_in x d_in`` system
    ``M = C^T A C + P^T B P + prior + lam I`` and its condition number; a singular or, with ``lam = 0``,
    numerically singular system is a :class:`SingularSystemError` naming the fix, an ill-conditioned one a
    warning."""
    k, d_in = c.shape
    m = 0 if p is None else p.shape[0]
    system = weighted_gram(c, a, dtype=dtype)
    if p is not None:
        system += weighted_gram(p, b, dtype=dtype)
    if prior is not None:
        system += prior
    if lam == 0 and p is None and prior is None and k >= d_in:
        raise SingularSystemError(
            f"{k} edit vectors >= d_in = {d_in} input dimensions with lam = 0 and nothing preserved: the edit "
            "over-determines the projection (not every edit can be met) and nothing ties the result to the "
            "original weights, which would be overwritten by a least-squares fit. Set lam > 0 (e.g. 0.5, UCE's "
            "default) or add preserve vectors."
        )
    system.diagonal().add_(lam)
    condition = _condition_number(system)
    chol, info = torch.linalg.cholesky_ex(system)
    precision_lost = condition * torch.finfo(dtype).eps
    if int(info) != 0 or not math.isfinite(condition) or (lam == 0 and precision_lost > 0.1):
        rank = int(torch.linalg.matrix_rank(system - lam * torch.eye(d_in, dtype=dtype, device=system.device)))
        if lam == 0:
            raise SingularSystemError(
                f"The system matrix is singular: with lam = 0 the {k} edit and {m} preserve vectors span only "
                f"{rank} of the d_in = {d_in} input dimensions, so the edit is not unique. Set lam > 0 (e.g. 0.5, "
                "UCE's default) or add preserve vectors that cover the remaining dimensions."
            )
        raise SingularSystemError(
            f"The system matrix is numerically singular (condition number {condition:.3g} in {dtype}); "
            f"increase lam (now {lam}) or solve in float64."
        )
    if precision_lost > 1e-3:
        warnings.warn(
            f"Ill-conditioned closed-form system (condition number {condition:.3g} in {dtype}): the edit may be "
            "inaccurate. Increase lam or solve in float64.",
            RuntimeWarning,
            stacklevel=3,  # the caller of solve_ridge
        )
    return chol, condition


def solve_constrained(
    weights: Mapping[str, Tensor],
    constraint_inputs: Tensor,
    constraint_targets: Mapping[str, Tensor],
    *,
    preserve_gram: Tensor,
    lam: float,
    rcond: float = 1e-10,
    dtype: torch.dtype = torch.float64,
) -> RidgeSolution:
    """Custom Diffusion's constrained merge (Kumari et al., CVPR 2023, Eq. 4), solved exactly.

    Per projection ``W_old`` (``d_out x d_in``)::

        min_W ||(W - W_old) P^T||_F^2 + lam ||W - W_old||_F^2   s.t.   W C^T = V^T

    with ``P^T P`` = ``preserve_gram`` (the regularization captions' Gram), ``C`` = ``constraint_inputs``
    ``[k, d_in]`` and ``V`` = ``constraint_targets[name]`` ``[k, d_out]``. With ``M = P^T P + lam I``,
    ``D = M^-1 C^T`` and ``G = C D`` (``k x k``) the minimiser is::

        W = W_old + (V^T - W_old C^T) G^+ D^T

    ``G^+`` is the pseudo-inverse (eigenvalues below ``rcond x`` the largest are dropped), so repeated
    constraint rows (the same token in several prompts) are harmless; when the constraints are
    inconsistent (more independent rows than ``d_in`` allows) it is their least-squares fit. The
    update has rank <= ``rank(G)``; ``edit_residual`` is the relative constraint violation.
    """
    weights = _float64_capable(weights, dtype)
    names = list(weights)
    d_in = _common_d_in(weights)
    device = weights[names[0]].device
    c = _matrix(constraint_inputs, "constraint_inputs", d_in, dtype, device)
    gram = _matrix(preserve_gram, "preserve_gram", d_in, dtype, device)
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"lam must be finite and >= 0, got {lam}.")
    system = gram + lam * torch.eye(d_in, dtype=dtype, device=device)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise SingularSystemError(
            f"The regularization Gram + lam I ({d_in}x{d_in}) is not positive definite; use more regularization "
            "captions or lam > 0."
        )
    d = torch.cholesky_solve(c.T.contiguous(), factor)  # [d_in, k]
    g = c @ d
    eigenvalues, vectors = torch.linalg.eigh((g + g.T) / 2)
    keep = eigenvalues > rcond * float(eigenvalues[-1].clamp_min(0))
    if not keep.any():
        raise SingularSystemError("The constraint vectors are all zero: nothing to constrain.")
    g_pinv = (vectors[:, keep] / eigenvalues[keep]) @ vectors[:, keep].T
    down = (d @ g_pinv).T.contiguous()  # [k, d_in]: the same for every projection
    deltas: dict[str, Delta] = {}
    edit_residual: dict[str, float] = {}
    preserve_residual: dict[str, float] = {}
    for name in names:
        w_old = weights[name].to(dtype)
        target = _matrix(constraint_targets[name], f"constraint_targets['{name}']", w_old.shape[0], dtype, device)
        requested = target.T - w_old @ c.T  # [d_out, k]
        delta = requested @ down
        deltas[name] = (requested.float().contiguous(), down.float()) if c.shape[0] < min(w_old.shape) else delta.float()
        edit_residual[name] = _ratio((delta @ c.T - requested).pow(2).sum(), requested.pow(2).sum())
        preserve_residual[name] = _ratio(((delta @ gram) * delta).sum(), ((w_old @ gram) * w_old).sum())
    return RidgeSolution(
        deltas=deltas,
        condition_number=_condition_number(system),
        edit_residual=edit_residual,
        preserve_residual=preserve_residual,
        rank=int(keep.sum()),
        lam=lam,
        dtype=dtype,
        n_edit=int(c.shape[0]),
        n_preserve=0,
        extra={"solver": "constrained-pinv", "constraint_rank": int(keep.sum()),
               "constraint_condition_number": float(eigenvalues[-1] / eigenvalues[keep][0])},
    )


def regenerating_embeddings(
    weights: Mapping[str, Tensor],
    deltas: Mapping[str, Delta],
    inputs: Tensor,
    lam: float,
    *,
    dtype: torch.dtype = torch.float64,
    chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
) -> Tensor:
    """Inputs for which the edited projections best reproduce the original outputs of ``inputs``.

    ``c' = (lam I + sum_l W'_l^T W'_l)^-1 (sum_l W'_l^T W_l) c`` for every row ``c`` of ``inputs``
    (``[n, d_in]``), summed over the projections of ``weights`` (``W_l``) with ``W'_l = W_l + delta_l``
    (``deltas``: dense or ``(up, down)``; projections without a delta are unchanged). This is RECE's
    regenerating embedding, and the cheapest white-box attack on any closed-form edit.
    """
    if lam <= 0:
        raise ValueError(f"lam must be > 0 for the regenerating embedding (RECE's lam_reg), got {lam}.")
    weights = _float64_capable(weights, dtype)
    names = list(weights)
    d_in = _common_d_in(weights)
    device = weights[names[0]].device
    x = _matrix(inputs, "inputs", d_in, dtype, device)
    gram_edited = torch.zeros(d_in, d_in, dtype=dtype, device=device)
    cross = torch.zeros(d_in, d_in, dtype=dtype, device=device)
    for chunk in _chunks(names, weights, 2 * _itemsize(dtype) * d_in, chunk_bytes):
        original = _stack(chunk, weights, d_in, dtype, device)
        edited = original.clone()
        for name, (start, stop) in zip(chunk, _pairs(_offsets(chunk, weights))):
            delta = deltas.get(name)
            if delta is None:
                continue
            if isinstance(delta, tuple):
                edited[start:stop] += delta[0].to(device, dtype) @ delta[1].to(device, dtype)
            else:
                edited[start:stop] += delta.to(device, dtype)
        gram_edited += edited.T @ edited
        cross += edited.T @ original
        del original, edited
    gram_edited.diagonal().add_(float(lam))
    return torch.linalg.solve(gram_edited, cross @ x.T).T


# -- helpers --------------------------------------------------------------------------------------------


def _float64_capable(weights: Mapping[str, Tensor], dtype: torch.dtype) -> Mapping[str, Tensor]:
    """``weights`` where a ``dtype`` solve can run: Apple's MPS has no float64, so float64 solves of MPS weights
    run on CPU copies (the deltas come back on the CPU; applying an edit moves them to the weights' device)."""
    if dtype == torch.float64 and any(w.device.type == "mps" for w in weights.values()):
        return {name: w.cpu() for name, w in weights.items()}
    return weights


def _common_d_in(weights: Mapping[str, Tensor]) -> int:
    widths = {}
    for name, weight in weights.items():
        if weight.ndim != 2:
            raise ValueError(f"Projection '{name}' has a weight of shape {tuple(weight.shape)}; expected a 2-D [d_out, d_in] matrix.")
        widths.setdefault(int(weight.shape[1]), name)
    if len(widths) > 1:
        raise ValueError(
            f"Projections read inputs of different widths {sorted(widths)} (e.g. '{next(iter(widths.values()))}'); "
            "solve each input width separately."
        )
    return next(iter(widths))


def _matrix(x: Tensor, what: str, d_in: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != d_in:
        raise ValueError(f"{what} has shape {tuple(x.shape)}; expected [n, {d_in}] (one vector per row, d_in = {d_in}).")
    x = x.to(device=device, dtype=dtype)
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or infinite values.")
    return x


def _weights(w: float | Tensor, n: int, what: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    w = torch.as_tensor(w, dtype=dtype, device=device)
    if w.ndim == 0:
        w = w.expand(n)
    if w.shape != (n,):
        raise ValueError(f"{what} must be a scalar or have one entry per vector ({n}), got shape {tuple(w.shape)}.")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{what} must be finite and >= 0.")
    return w


def _condition_number(system: Tensor) -> float:
    eigenvalues = torch.linalg.eigvalsh(system)
    smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    if smallest <= 0:
        return math.inf
    return largest / smallest


def _chunks(names: list[str], weights: Mapping[str, Tensor], row_bytes: int, budget: int) -> list[list[str]]:
    """Consecutive groups of projections whose working set (``row_bytes`` per output row) fits ``budget``."""
    chunks: list[list[str]] = [[]]
    used = 0
    for name in names:
        size = weights[name].shape[0] * row_bytes
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return chunks


def _itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _product_dtype(weights: Mapping[str, Tensor], dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64 and any(w.dtype == torch.float64 for w in weights.values()):
        return torch.float64
    return torch.float32


def _stack(chunk: list[str], weights: Mapping[str, Tensor], d_in: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    rows = sum(weights[name].shape[0] for name in chunk)
    stacked = torch.empty(rows, d_in, dtype=dtype, device=device)
    start = 0
    for name in chunk:
        weight = weights[name].detach()
        stacked[start : start + weight.shape[0]].copy_(weight)
        start += weight.shape[0]
    return stacked


def _offsets(chunk: list[str], weights: Mapping[str, Tensor]) -> list[int]:
    offsets = [0]
    for name in chunk:
        offsets.append(offsets[-1] + int(weights[name].shape[0]))
    return offsets


def _pairs(offsets: list[int]) -> list[tuple[int, int]]:
    return list(zip(offsets[:-1], offsets[1:]))


def _block_sums(x: Tensor, offsets: list[int]) -> Tensor:
    """Sum of all entries of each row block ``x[offsets[i]:offsets[i+1]]`` (float64)."""
    return _sum_blocks(x.sum(dim=1, dtype=torch.float64), offsets)


def _block_sq_norms(x: Tensor, offsets: list[int]) -> Tensor:
    """Squared Frobenius norm of each row block (no temporary of ``x``'s size)."""
    return _sum_blocks(torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square(), offsets)


def _sum_blocks(row_values: Tensor, offsets: list[int]) -> Tensor:
    sizes = torch.tensor([b - a for a, b in _pairs(offsets)], device=row_values.device)
    index = torch.repeat_interleave(torch.arange(len(offsets) - 1, device=row_values.device), sizes)
    return torch.zeros(len(offsets) - 1, dtype=row_values.dtype, device=row_values.device).index_add_(0, index, row_values)


def _ratio(numerator: Tensor, denominator: Tensor) -> float:
    num, den = float(numerator), float(denominator)
    if den <= 0:
        return 0.0 if num <= 0 else math.inf
    return math.sqrt(max(num, 0.0) / den)
