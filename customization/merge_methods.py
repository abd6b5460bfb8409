"""The names of the merge methods and what each needs (:mod:`customization.merge` implements them).

Plain data, no torch: ``conceptsmith merge --method`` is checked here before any edit is loaded.
"""

from __future__ import annotations

from conceptsmith.errors import CustomizationError

MERGE_METHODS: dict[str, str] = {
    "closed-form": "Custom Diffusion constrained least squares over K/V (needs the base pipeline)",
    "lora-sum": "exact weighted sum of LoRA updates (rank adds up)",
    "cat": "peft add_weighted_adapter cat (exact, rank adds up)",
    "svd": "peft add_weighted_adapter svd (exact sum truncated to a rank)",
    "ties": "peft add_weighted_adapter ties on the A/B factors (approximate, equal ranks)",
    "ties_svd": "peft ties on the dense updates, then SVD (approximate)",
    "linear": "peft linear on the A/B factors (approximate, equal ranks)",
    "stack": "the edits applied together unchanged (weight changes add up; any edit kind, e.g. textual inversion)",
}


def check_method(method: str) -> str:
    """``method``, if it names a merge method; else a :class:`CustomizationError` listing them."""
    if method not in MERGE_METHODS:
        raise CustomizationError(f"Unknown merge method '{method}'. Available: {', '.join(MERGE_METHODS)}.")
    return method


def needs_pipeline(method: str) -> bool:
    """Whether ``merge`` needs the base pipeline for ``method``."""
    return check_method(method) == "closed-form"
