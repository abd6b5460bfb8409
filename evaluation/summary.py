"""The one summary rule of the engine: per method, the mean over its rows (tasks, concepts, pairs) of every
metric whose registered spec aggregates by ``mean``, in the bench's headline accuracy convention; suites add
their own derived entries (``acc_s_rel``, attack success rates, training time)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from conceptsmith.registry import RegistryError, get_metric

__all__ = ["headline", "mean_summary"]


def headline(value: Any, mode: str = "argmax") -> float | None:
    """A metric's number in the headline convention: ``value[mode]`` for accuracy dicts, else the value."""
    return value.get(mode) if isinstance(value, dict) else value


def _averaged(name: str) -> bool:
    try:
        return get_metric(name).aggregation == "mean"
    except RegistryError:  # not a registered metric (judges' verdicts, recorded timings)
        return False


def mean_summary(
    rows: Sequence[dict[str, Any]],
    mode: str = "argmax",
    extras: Callable[[dict[str, Any]], Iterable[tuple[str, float]]] | None = None,
    every_row: bool = False,
) -> dict[str, dict[str, float]]:
    """Method label -> metric -> mean over the method's rows of the averaged metrics and of ``extras(row)``'s
    (name, value) pairs; ``every_row``: keep only the names every row of the method has."""
    values: dict[str, dict[str, list[float]]] = {}
    counts: dict[str, int] = {}
    for r in rows:
        bucket = values.setdefault(r["method"], {})
        counts[r["method"]] = counts.get(r["method"], 0) + 1
        pairs = [(n, headline(v, mode)) for n, v in r["metrics"].items() if _averaged(n)]
        for name, value in [*pairs, *(extras(r) if extras else [])]:
            if value is not None:
                bucket.setdefault(name, []).append(value)
    return {method: {name: sum(v) / len(v) for name, v in bucket.items() if not every_row or len(v) == counts[method]}
            for method, bucket in values.items()}  # fmt: skip
