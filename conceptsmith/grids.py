"""Contact sheets: tile images into one picture with a caption strip under each tile.

Pillow only (no torch), so a report rebuilt from a results file draws its grids without loading a model stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw


def image_grid(images: Sequence[Image.Image], columns: int, labels: Sequence[str] | None = None) -> Image.Image:
    """Tile images row-major into one picture, with an optional caption strip under each tile."""
    if not images:
        raise ValueError("image_grid needs at least one image.")
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    strip = 12 if labels else 0
    grid = Image.new("RGB", (columns * width, rows * (height + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        x, y = (index % columns) * width, (index // columns) * (height + strip)
        grid.paste(image.convert("RGB").resize((width, height)), (x, y))
        if labels and labels[index]:
            draw.text((x + 2, y + height), labels[index][: _label_chars(labels, index, columns, width)], fill="black")
    return grid


def _label_chars(labels: Sequence[str], index: int, columns: int, width: int) -> int:
    """How many characters of ``labels[index]`` fit: its tile plus the empty-labelled tiles after it in its row."""
    span = 1
    while (index + span) % columns and index + span < len(labels) and not labels[index + span]:
        span += 1
    return max(4, span * width // 6)
