"""Providers a customization bench names: where reference images come from and how presence is judged.

* **Renderers** (a bench's ``renderer:``) make reference images of a named object, so a concept can say
  ``object: mushroom`` instead of pointing at a folder: ``shapes`` renders ShapesWorld's objects
  (:func:`conceptsmith.world.render.reference_set`). Benches on real models give folders (``images:``) and need
  none.
* **Presence rules** (a bench's ``presence:``) decide whether both concepts of a pair are in an image:
  ``top2`` (both among the evaluator's top-2 zero-shot classes of the whole image, any model) and ``halves``
  (ShapesWorld's two-object layout: the left and right halves, classified on their own, show one concept each).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from conceptsmith.evaluation.metrics import both_concepts_present_rate
from conceptsmith.io import atomic_write
from conceptsmith.world.check import object_crop
from conceptsmith.world.render import reference_set
from conceptsmith.world.vocab import ALL_SHAPES

__all__ = ["RENDERERS", "PRESENCE_RULES", "Renderer", "both_present_halves", "get_presence_rule", "get_renderer"]


@dataclass(frozen=True)
class Renderer:
    """Reference images of the objects ``names()`` lists: ``render(name, n, seed)`` -> ``n`` PIL images."""

    name: str
    names: Callable[[], Sequence[str]]
    render: Callable[[str, int, int], list[Image.Image]]

    def check(self, obj: str) -> None:
        if obj not in self.names():
            raise ValueError(f"renderer '{self.name}' has no object {obj!r}; it renders: {', '.join(self.names())}")

    def files(self, obj: str, n: int, seed: int, folder: Path) -> list[Path]:
        """``n`` renders of ``obj`` with ``seed`` as PNGs in ``folder`` (kept when already there)."""
        paths = [folder / f"{i:02d}.png" for i in range(n)]
        if not all(p.is_file() for p in paths):
            for image, p in zip(self.render(obj, n, seed), paths, strict=True):
                atomic_write(p, lambda tmp, image=image: image.save(tmp, format="PNG"))
        return paths


def _shapes_names() -> Sequence[str]:
    return ALL_SHAPES


def _shapes_render(obj: str, n: int, seed: int) -> list[Image.Image]:
    return [sample.pil() for sample in reference_set(obj, n, seed)]


RENDERERS: dict[str, Renderer] = {"shapes": Renderer("shapes", _shapes_names, _shapes_render)}


def get_renderer(name: str) -> Renderer:
    if name not in RENDERERS:
        raise ValueError(f"unknown renderer {name!r}; known: {', '.join(RENDERERS)}")
    return RENDERERS[name]


def both_present_halves(
    evaluator: Any, images: Sequence[Image.Image], pair: tuple[str, str], classnames: Sequence[str],
    templates: Sequence[str],
) -> float:  # fmt: skip
    """Share of images whose left and right halves (:func:`conceptsmith.world.check.object_crop`) have the two
    concepts of ``pair`` as top-1 zero-shot classes, one each (either order)."""
    crops = [object_crop(im, side) for side in ("left", "right") for im in images]
    labels = evaluator.classify(crops, classnames, templates).labels()
    n = len(images)
    hits = sum({labels[i], labels[n + i]} == set(pair) for i in range(n))
    return hits / n if n else math.nan


PresenceRule = Callable[[Any, Sequence[Image.Image], tuple[str, str], Sequence[str], Sequence[str]], float]
PRESENCE_RULES: dict[str, PresenceRule] = {"top2": both_concepts_present_rate, "halves": both_present_halves}


def get_presence_rule(name: str) -> PresenceRule:
    if name not in PRESENCE_RULES:
        raise ValueError(f"unknown presence rule {name!r}; known: {', '.join(PRESENCE_RULES)}")
    return PRESENCE_RULES[name]
