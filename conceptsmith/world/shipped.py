"""Where the shipped ShapesWorld weights lie, and the guard that keeps training out of them.

Plain paths, no torch: the command line refuses ``world train --out`` inside the shipped weights before it imports
anything heavy. :mod:`conceptsmith.world.pipeline` loads the pipeline found here.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
PIPE_DIR = SHIPPED_DIR / "shapes-sd"


def refuse_shipped(path: str | Path) -> Path:
    """``path`` (resolved), unless it is or lies inside the shipped weights folder: training never writes there."""
    resolved = Path(path).resolve()
    if resolved == SHIPPED_DIR or SHIPPED_DIR in resolved.parents:
        raise ValueError(
            f"'{path}' is inside the shipped ShapesWorld weights ({SHIPPED_DIR}), which training never overwrites: "
            "write to a new folder (e.g. --out out/shapes-world) and copy the result over by hand to replace them."
        )
    return resolved
