"""Merging customization edits: Custom Diffusion's closed-form merge and LoRA composition.

Which one to use (``merge(edits, method)``):

``closed-form``  Custom Diffusion's constrained merge of single-concept K/V edits (needs the base
                 pipeline): one set of K/V weights that reproduces every concept's fine-tuned outputs
                 on that concept's prompts while staying as close as possible to the base model on
                 regularization captions. Cost: one factorization for all projections (seconds).
``lora-sum``     exact weighted sum of LoRA updates: the factors are concatenated (rank adds up), so
                 the result equals diffusers' ``set_adapters([...], adapter_weights=w)`` and
                 ``fuse_lora`` bit for bit up to float rounding. Largest file; no approximation.
``cat``          peft ``add_weighted_adapter(combination_type="cat")``: the same exact sum, computed by peft.
``svd``          peft ``svd``: the exact weighted sum of the dense updates, truncated by SVD to ``rank``
                 (default: the largest input rank). Small file; error = discarded singular values
                 (reported per module in the metadata).
``ties``         peft ``ties``: TIES-merging (trim to ``density``, elect signs, disjoint mean) applied
                 to the A and B factors separately. Reduces interference between adapters but is *not*
                 the sum of their updates (``A`` and ``B`` are merged independently, so cross terms
                 appear); needs equal ranks. ``ties_svd`` applies TIES to the dense updates, then SVD.
``linear``       peft ``linear``: weighted sum of A and of B separately (a rough approximation of the
                 sum: cross terms); needs equal ranks. Provided for comparison only.
``stack``        the edits applied together as trained (:func:`conceptsmith.edits.compose`): weight
                 changes add up, every learned token is installed. Any kind of edit; the baseline the
                 merges improve on, and all that textual-inversion edits need (they change only
                 their own tokens' embeddings, so they cannot interfere).

Learned tokens of the merged edits are carried over (they must be distinct). All edits must come
from the same base model.
The method names and which of them need the base pipeline are in :mod:`customization.merge_methods` (no torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from conceptsmith.customization import CustomizationError
from conceptsmith.customization.lora import lora_factors
from conceptsmith.customization.merge_methods import MERGE_METHODS as MERGE_METHODS
from conceptsmith.customization.merge_methods import check_method
from conceptsmith.customization.merge_methods import needs_pipeline as needs_pipeline
from conceptsmith.customization.textual_inversion import tokens_view
from conceptsmith.edits import Edit, EditError, applied_edits, base_fingerprint, compose
from conceptsmith.linalg import solve_constrained, weighted_gram
from conceptsmith.text import encode_prompts, tokenize
from conceptsmith.tokens import TOKEN_HOOK, token_parts

#: Generic captions for the merge's regularization term when none are given (any caption corpus works better).
DEFAULT_REGULARIZATION_PROMPTS = tuple(
    template.format(subject)
    for subject in (
        "a dog", "a cat", "a person", "a car", "a house", "a tree", "a bird", "a flower",
        "a cup", "a chair", "a mountain", "a street", "a boat", "a horse", "a table", "a book",
    )
    for template in ("a photo of {}", "{} in a park", "a painting of {}", "a close-up picture of {}")
)


def merge(
    edits: Sequence[Edit],
    method: str = "closed-form",
    *,
    pipe: Any = None,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    density: float = 0.5,
    **options: Any,
) -> Edit:
    """Merge ``edits`` with ``method`` (see the module docstring); the entry point of ``conceptsmith merge``."""
    check_method(method)
    if method in ("closed-form", "stack") and (weights is not None or rank is not None):
        raise CustomizationError(f"The {method} merge takes no weights or rank; they apply to LoRA merges (lora-sum, svd, ...).")
    if method == "closed-form":
        if pipe is None:
            raise CustomizationError("The closed-form merge needs the base pipeline the edits were trained on (--model).")
        return closed_form_merge(pipe, edits, **options)
    if options:
        raise CustomizationError(f"Unknown options for the '{method}' merge: {sorted(options)}.")
    if method == "stack":
        return stack(edits)
    if method == "lora-sum":
        return lora_sum(edits, weights)
    return peft_merge(edits, method, weights=weights, rank=rank, density=density)


def check_same_base(edits: Sequence[Edit]) -> None:
    """Clear error for fewer than two edits or edits computed on different base models."""
    if len(edits) < 2:
        raise CustomizationError(f"Merging needs at least two edits, got {len(edits)}.")
    first = edits[0]
    for edit in edits[1:]:
        if edit.base_fingerprint != first.base_fingerprint or edit.family != first.family:
            raise EditError(
                f"Cannot merge edits of different base models: '{first.method}' {first.concepts} was computed on "
                f"{first.base_fingerprint} ({first.family}), '{edit.method}' {edit.concepts} on {edit.base_fingerprint} "
                f"({edit.family}). Re-train them on the same base model."
            )


def _concepts(edits: Sequence[Edit]) -> list[str]:
    return list(dict.fromkeys(c for e in edits for c in e.concepts))


def _merged_tokens(edits: Sequence[Edit]) -> dict[str, torch.Tensor]:
    """All learned token tensors of ``edits`` (distinct tokens required)."""
    tensors: dict[str, torch.Tensor] = {}
    for edit in edits:
        for part in token_parts(edit):
            for key, value in part.tensors.items():
                if key in tensors:
                    raise EditError(
                        f"Two of the merged edits learn the same token '{key.partition('.')[2]}'; a merge needs distinct tokens."
                    )
                tensors[key] = value
    return tensors


def _with_tokens(edits: Sequence[Edit], method: str, weight_part: Edit, params: dict[str, Any], metadata: dict[str, Any]) -> Edit:
    """``weight_part`` alone, or a composite of it and one token edit with every learned token."""
    tokens = _merged_tokens(edits)
    if not tokens:
        return weight_part
    first = edits[0]
    order = list(dict.fromkeys(key.partition(".")[2] for key in tokens))
    token_part = Edit.from_hook(method, weight_part.concepts, {"tokens": order}, first.base_fingerprint, first.family, TOKEN_HOOK, tokens)
    return Edit("composite", method, weight_part.concepts, params, first.base_fingerprint, first.family, parts=[weight_part, token_part], metadata=metadata)


# -- (a) Custom Diffusion's closed-form merge -------------------------------------------------------------


def _weight_deltas(edit: Edit) -> dict[str, torch.Tensor]:
    """Dense ``{module: delta}`` of the ``weights`` parts of ``edit``."""
    deltas: dict[str, torch.Tensor] = {}
    for part in edit.parts or [edit]:
        if part.kind == "lora":
            raise CustomizationError(
                f"The closed-form merge combines Custom Diffusion (K/V weights) edits; '{edit.method}' {edit.concepts} is a "
                "LoRA edit: merge LoRA edits with lora-sum, cat, svd or ties."
            )
        if part.kind != "weights":
            continue
        for key, value in part.tensors.items():
            module, _, kind = key.rpartition(".")
            if kind == "down":
                continue
            dense = value.float() if kind == "delta" else value.float() @ part.tensors[f"{module}.down"].float()
            deltas[module] = deltas.get(module, 0) + dense
    if not deltas:
        raise CustomizationError(f"The '{edit.method}' edit {edit.concepts} changes no weights; nothing to merge.")
    return deltas


def _concept_prompts(edit: Edit) -> list[str]:
    params = edit.params
    phrases, prompt_templates = params.get("phrases"), params.get("prompt_templates")
    if not phrases or not prompt_templates:
        raise CustomizationError(
            f"The '{edit.method}' edit {edit.concepts} does not record its training prompts; pass prompts=[[...], ...] "
            "(one list of prompts per edit) to the closed-form merge."
        )
    return [template.format(phrase) for phrase in phrases for template in prompt_templates]


def _linear(pipe: Any, module: str) -> nn.Module:
    component, _, name = module.partition(".")
    found = getattr(pipe, component).get_submodule(name)
    return getattr(found, "base_layer", found)


def closed_form_merge(
    pipe: Any,
    edits: Sequence[Edit],
    *,
    regularization_prompts: Sequence[str] | None = None,
    prompts: Sequence[Sequence[str]] | None = None,
    target_tokens: Literal["words+eos", "all"] = "words+eos",
    lam: float = 1e-4,
) -> Edit:
    """Custom Diffusion's multi-concept merge of single-concept K/V edits, through the shared solver.

    Per projection ``W`` (``W0``: base; ``W_i``: concept ``i``'s fine-tuned matrix; ``C_i``: text
    features of concept ``i``'s prompts, with every learned token installed; ``C_reg``: features of
    ``regularization_prompts``, all 77 positions)::

        min_W ||C_reg W^T - C_reg W0^T||_F^2   s.t.   C_i W^T = C_i W_i^T  for every i

    solved exactly by :func:`conceptsmith.linalg.solve_constrained` (pseudo-inverse of the
    constraint system, so repeated tokens across prompts are harmless), with ridge
    ``lam x trace/d`` added to the mean regularization Gram; the remaining constraint violation
    (0 unless the constraints outnumber ``d_in``) is reported as ``edit_residual``.
    ``target_tokens``: ``words+eos`` constrains the prompt's tokens after BOS up to EOS; ``all`` also
    the padding positions (more constraints than ``d_in`` quickly: then it is a least-squares fit).
    ``prompts``: one list of prompts per edit (default: the edit's own training prompts).
    """
    check_same_base(edits)
    base = base_fingerprint(pipe)
    if base != edits[0].base_fingerprint:
        raise EditError(
            f"The edits were computed on base model {edits[0].base_fingerprint}, but this pipe's base model is {base}: "
            "merge them with the pipeline they were trained on (without the edits applied)."
        )
    if applied_edits(pipe):
        raise EditError(
            f"The pipe has {len(applied_edits(pipe))} edit(s) applied; the closed-form merge needs the base weights: "
            "merge on the pipeline without any edit applied (revert them first)."
        )
    if prompts is not None and len(prompts) != len(edits):
        raise CustomizationError(f"prompts must hold one list of prompts per edit ({len(edits)}), got {len(prompts)}.")
    all_deltas = [_weight_deltas(edit) for edit in edits]
    modules = list(dict.fromkeys(m for deltas in all_deltas for m in deltas))
    base_weights = {m: _linear(pipe, m).weight.detach() for m in modules}
    widths = {int(w.shape[1]) for w in base_weights.values()}
    view = tokens_view(pipe, [part for edit in edits for part in token_parts(edit)])
    text_width = int(encode_prompts(view, [""], max_length=1).shape[-1])
    wrong = [m for m, w in base_weights.items() if w.shape[1] != text_width]
    if wrong or len(widths) != 1:
        raise CustomizationError(
            f"The closed-form merge handles projections that read text embeddings (attn2 to_k / to_v); the edits also change "
            f"{wrong[:3]}. Train with train='kv' for merging, or train the concepts jointly in one run."
        )

    # text features: concept prompts (constraints) and regularization captions (preservation)
    rows, targets = [], {m: [] for m in modules}
    for index, (edit, deltas) in enumerate(zip(edits, all_deltas)):
        concept_prompts = list(prompts[index]) if prompts is not None else _concept_prompts(edit)
        states = encode_prompts(view, concept_prompts)
        expanded = view.maybe_convert_prompt(concept_prompts, view.tokenizer)
        lengths = tokenize(view.tokenizer, expanded, warn=False).lengths
        if target_tokens == "all":
            c = states[:, 1:].reshape(-1, states.shape[-1])
        else:
            c = torch.cat([states[i, 1:n] for i, n in enumerate(lengths)])
        c = c.double()
        rows.append(c)
        for m in modules:
            w_i = base_weights[m].double() + deltas.get(m, torch.zeros(())).double().to(base_weights[m].device)
            targets[m].append(c.to(w_i.device) @ w_i.T)
    c_all = torch.cat(rows)
    v_all = {m: torch.cat(v) for m, v in targets.items()}
    reg_prompts = list(regularization_prompts or DEFAULT_REGULARIZATION_PROMPTS)
    reg = encode_prompts(view, reg_prompts).reshape(-1, text_width)
    gram = weighted_gram(reg) / reg.shape[0]
    ridge = lam * float(gram.trace()) / text_width
    solution = solve_constrained(base_weights, c_all, v_all, preserve_gram=gram, lam=ridge)
    params = {
        "method": "closed-form",
        "lam": lam,
        "target_tokens": target_tokens,
        "n_regularization_prompts": len(reg_prompts),
        "parts": [{"method": e.method, "concepts": e.concepts, "tokens": e.params.get("tokens")} for e in edits],
        "phrases": [p for e in edits for p in (e.params.get("phrases") or [])],
        "prompt_templates": list(dict.fromkeys(t for e in edits for t in (e.params.get("prompt_templates") or []))),
    }
    metadata = {"solver": solution.metrics()}
    first = edits[0]
    weight_part = Edit.from_weight_deltas(
        "closed-form-merge", _concepts(edits), params, first.base_fingerprint, first.family, solution.deltas, metadata
    )
    return _with_tokens(edits, "closed-form-merge", weight_part, params, metadata)


# -- (b) LoRA composition ------------------------------------------------------------------------------


def _weights(edits: Sequence[Edit], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(edits)
    weights = [float(w) for w in weights]
    if len(weights) != len(edits):
        raise CustomizationError(f"Got {len(weights)} weights for {len(edits)} edits: give one weight per edit.")
    return weights


def _factors(edits: Sequence[Edit]) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    result = []
    for edit in edits:
        try:
            result.append(lora_factors(edit))
        except EditError:
            raise CustomizationError(
                f"The '{edit.method}' edit {edit.concepts} has no LoRA adapter; LoRA merges combine LoRA edits "
                "(use the closed-form merge for Custom Diffusion edits)."
            ) from None
    shapes: dict[str, tuple[int, int]] = {}
    for edit, factors in zip(edits, result):
        for module, (down, up) in factors.items():
            shape = (up.shape[0], down.shape[1])
            if shapes.setdefault(module, shape) != shape:
                raise EditError(f"Cannot merge: module '{module}' has shape {list(shapes[module])} in one edit and {list(shape)} in '{edit.method}'.")
    return result


def stack(edits: Sequence[Edit]) -> Edit:
    """The edits applied together, unchanged: :func:`conceptsmith.edits.compose` after the merge checks
    (same base, distinct tokens)."""
    check_same_base(edits)
    _merged_tokens(edits)  # raises on a token learned by two edits
    return compose(edits)


def lora_sum(edits: Sequence[Edit], weights: Sequence[float] | None = None) -> Edit:
    """The exact weighted sum ``sum_i w_i B_i A_i`` of the LoRA edits as one LoRA edit (factors concatenated)."""
    check_same_base(edits)
    w = _weights(edits, weights)
    state: dict[str, torch.Tensor] = {}
    for factors, scale in zip(_factors(edits), w):
        for module, (down, up) in factors.items():
            key_a, key_b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
            if key_a in state:
                state[key_a] = torch.cat([state[key_a], down])
                state[key_b] = torch.cat([state[key_b], up * scale], dim=1)
            else:
                state[key_a], state[key_b] = down.clone(), up * scale
    first = edits[0]
    params = {"method": "lora-sum", "weights": w, "parts": [{"method": e.method, "concepts": e.concepts} for e in edits]}
    params.update(_prompt_params(edits))
    lora = Edit.from_lora("lora-sum", _concepts(edits), params, first.base_fingerprint, first.family, state)
    return _with_tokens(edits, "lora-sum", lora, params, {})


def _prompt_params(edits: Sequence[Edit]) -> dict[str, Any]:
    return {
        "phrases": [p for e in edits for p in (e.params.get("phrases") or [])],
        "prompt_templates": list(dict.fromkeys(t for e in edits for t in (e.params.get("prompt_templates") or []))),
    }


class _Skeleton(nn.Module):
    """Empty container modules with weightless ``nn.Linear`` leaves: just enough structure for peft."""


def _skeleton(shapes: dict[str, tuple[int, int]]) -> nn.Module:
    root = _Skeleton()
    for path, (d_out, d_in) in shapes.items():
        node = root
        parts = path.split(".")
        for part in parts[:-1]:
            if not hasattr(node, part):
                node.add_module(part, _Skeleton())
            node = getattr(node, part)
        leaf = nn.Linear(1, 1, bias=False)
        leaf.in_features, leaf.out_features = d_in, d_out
        leaf.weight = nn.Parameter(torch.zeros(()).expand(d_out, d_in), requires_grad=False)  # no memory: stride 0
        node.add_module(parts[-1], leaf)
    return root


def peft_merge(
    edits: Sequence[Edit],
    method: str,
    *,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    density: float = 0.5,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> Edit:
    """Combine LoRA edits with peft's ``add_weighted_adapter`` (``cat``, ``svd``, ``ties``, ``ties_svd``, ``linear``)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    if method not in ("cat", "svd", "ties", "ties_svd", "linear"):
        raise CustomizationError(f"peft_merge supports cat, svd, ties, ties_svd and linear, not '{method}'.")
    if rank is not None and rank < 1:
        raise CustomizationError(f"rank must be a positive integer, got {rank}.")
    if not 0 < density <= 1:
        raise CustomizationError(f"density must be in (0, 1], got {density}.")
    check_same_base(edits)
    w = _weights(edits, weights)
    all_factors = _factors(edits)
    if method in ("ties", "linear"):
        for module in dict.fromkeys(m for f in all_factors for m in f):
            ranks = {e.method + str(e.concepts): f[module][0].shape[0] for e, f in zip(edits, all_factors) if module in f}
            if len(set(ranks.values())) > 1:
                raise CustomizationError(
                    f"Rank mismatch at module '{module}': {ranks}. '{method}' merges the A and B factors entry by entry and "
                    "needs equal ranks; use 'svd' (any ranks, truncated to --rank), 'cat' or 'lora-sum' (exact)."
                )
    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    components = dict.fromkeys(m.partition(".")[0] for f in all_factors for m in f)
    for component in components:
        shapes = {}
        for factors in all_factors:
            for module, (down, up) in factors.items():
                if module.partition(".")[0] == component:
                    shapes[module.partition(".")[2]] = (up.shape[0], down.shape[1])
        model = _skeleton(shapes)
        names = []
        tuner = None
        for index, factors in enumerate(all_factors):
            mine = {m.partition(".")[2]: f for m, f in factors.items() if m.partition(".")[0] == component}
            if not mine:
                continue
            ranks = {m: down.shape[0] for m, (down, _) in mine.items()}
            common = max(set(ranks.values()), key=list(ranks.values()).count)
            pattern = {m: r for m, r in ranks.items() if r != common}
            config = LoraConfig(r=common, lora_alpha=common, target_modules=sorted(mine), rank_pattern=pattern, alpha_pattern=pattern)
            name = f"edit{index}"
            if tuner is None:
                tuner = LoraModel(model, config, name)
            else:
                tuner.peft_config[name] = config
                tuner.inject_adapter(tuner.model, name)
            with torch.no_grad():
                for module, (down, up) in mine.items():
                    layer = tuner.model.get_submodule(module)
                    layer.lora_A[name].weight.copy_(down)
                    layer.lora_B[name].weight.copy_(up)
            names.append((name, w[index]))
        if len(names) == 1:  # only one edit touches this component: weight it, no combination needed
            combination = "linear"
        else:
            combination = method
        tuner.add_weighted_adapter(
            [n for n, _ in names], [x for _, x in names], "merged", combination_type=combination, svd_rank=rank,
            density=density if method in ("ties", "ties_svd") else None, majority_sign_method=majority_sign_method,
        )
        scaling_of = {}
        for module in shapes:
            layer = tuner.model.get_submodule(module)
            if "merged" not in layer.lora_A:
                continue
            down = layer.lora_A["merged"].weight.detach().float().clone()
            up = layer.lora_B["merged"].weight.detach().float().clone() * float(layer.scaling["merged"])
            key = f"{component}.{module}"
            state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, up
            scaling_of[key] = float(layer.scaling["merged"])
            if method in ("svd", "cat"):
                exact = sum(
                    x * (f[key][1] @ f[key][0]) for f, x in zip(all_factors, w) if key in f
                )
                total = float(torch.linalg.norm(exact))
                errors[key] = float(torch.linalg.norm(up @ down - exact)) / total if total > 0 else 0.0
    first = edits[0]
    params = {"method": method, "weights": w, "rank": rank, "density": density, "parts": [{"method": e.method, "concepts": e.concepts} for e in edits]}
    params.update(_prompt_params(edits))
    metadata = {"relative_error": errors} if errors else {}
    lora = Edit.from_lora(f"lora-{method}", _concepts(edits), params, first.base_fingerprint, first.family, state, metadata=metadata)
    return _with_tokens(edits, f"lora-{method}", lora, params, metadata)
