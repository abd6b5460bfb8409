"""The prompt list every text function takes (:mod:`conceptsmith.text`, :mod:`conceptsmith.text_segments`,
:mod:`conceptsmith.token_positions`): a non-empty list of strings, a single string refused rather than read as
a sequence of one-letter prompts."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check_prompts"]


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """``prompts`` as a list, or a ``TypeError`` / ``ValueError`` that says how to pass them."""
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings, not a single string: wrap it as [{prompts!r}].")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("Empty prompts list: pass at least one prompt.")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings; got {bad[:3]!r}.")
    return prompts
