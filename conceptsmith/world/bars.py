"""The bars ShapesWorld is measured against by ``conceptsmith world check`` and the generator metrics it can run.

Plain data, no torch: the command line checks ``world check --only`` against :data:`GEN_METRICS` before it imports
anything heavy. :mod:`conceptsmith.world.check` measures them.
"""

from __future__ import annotations

#: Acceptance bars of ``conceptsmith world check`` for the ShapesWorld generator and evaluator
#: (metric -> minimum, or maximum for seconds).
BARS: dict[str, tuple[str, float]] = {
    "eval_shape_acc": (">=", 0.97),
    "eval_color_acc": (">=", 0.95),
    "eval_pattern_acc": (">=", 0.90),
    "eval_artist_acc": (">=", 0.90),
    "eval_watermark_acc": (">=", 0.90),
    "gen_shape_acc": (">=", 0.90),
    "gen_color_acc": (">=", 0.85),
    "gen_artist_acc": (">=", 0.80),
    "gen_restricted_indirect_rate": (">=", 0.70),
    "gen_two_object_acc": (">=", 0.40),
    "gen_watermark_rate": (">=", 0.30),
    "gen_seconds_per_image": ("<=", 1.0),
}

#: The generator metrics ``world check --only`` may name, in the order they run.
GEN_METRICS = ("shape", "color", "artist", "restricted_indirect", "two_object", "watermark", "speed")


def passes(metric: str, value: float) -> bool:
    """Whether ``value`` meets the bar of ``metric``."""
    op, bar = BARS[metric]
    return value >= bar if op == ">=" else value <= bar
