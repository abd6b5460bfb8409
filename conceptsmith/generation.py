"""Deterministic generation: prompts x seeds -> images, one CPU ``torch.Generator`` per image.

Seeding each image with its own CPU generator makes an image depend only on (model, edits,
prompt, seed, settings) — not on batch size, device or the order of requests — which is what
the benchmark cache and paired before/after comparisons rely on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

#: Attribute a pipeline loader may set to give its model better defaults (e.g. ShapesWorld: 64 px).
DEFAULTS_ATTRIBUTE = "conceptsmith_defaults"


@dataclass(frozen=True)
class GenerationSettings:
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    batch_size: int = 4

    def pipeline_kwargs(self) -> dict[str, object]:
        kwargs = asdict(self)
        kwargs.pop("batch_size")
        return {key: value for key, value in kwargs.items() if value is not None}


def default_settings(pipe: object, **overrides: object) -> GenerationSettings:
    """The pipeline's own defaults (if its loader set any), then explicit non-None overrides."""
    values = dict(getattr(pipe, DEFAULTS_ATTRIBUTE, {}))
    values.update({key: value for key, value in overrides.items() if value is not None})
    return GenerationSettings(**values)


def parse_seeds(text: str) -> list[int]:
    """Parse ``"0,1,5-7"`` into ``[0, 1, 5, 6, 7]`` with an error that names the bad part."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, sep, high = part.partition("-")
        try:
            values = range(int(low), int(high) + 1) if sep and low else [int(part)]
        except ValueError:
            raise ValueError(
                f"Seed '{part}' is not an integer: pass integers or ranges such as --seeds 0,1,2 or --seeds 0-7."
            ) from None
        seeds.extend(values)
    if not seeds:
        raise ValueError("No seeds given: pass at least one, e.g. --seeds 0 or --seeds 0-7.")
    return seeds


def _batches(jobs: Sequence[tuple[str, int]], size: int) -> Iterator[Sequence[tuple[str, int]]]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


@torch.no_grad()
def generate(
    pipe: object,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: GenerationSettings | None = None,
    progress: bool = True,
) -> list[tuple[str, int, Image.Image]]:
    """Generate every (prompt, seed) pair, prompt-major; returns ``(prompt, seed, image)`` triples."""
    if not prompts:
        raise ValueError("No prompts given: pass at least one prompt (--prompt TEXT or --prompts-file FILE).")
    if not seeds:
        raise ValueError("No seeds given: pass at least one seed.")
    settings = settings or default_settings(pipe)
    jobs = [(prompt, int(seed)) for prompt in prompts for seed in seeds]
    results: list[tuple[str, int, Image.Image]] = []
    bar = tqdm(total=len(jobs), desc="generate", unit="img", disable=not progress)
    for batch in _batches(jobs, max(1, settings.batch_size)):
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
        output = pipe(
            prompt=[prompt for prompt, _ in batch],
            generator=generators,
            output_type="pil",
            **settings.pipeline_kwargs(),
        )
        results.extend((prompt, seed, image) for (prompt, seed), image in zip(batch, output.images))
        bar.update(len(batch))
    bar.close()
    return results


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
