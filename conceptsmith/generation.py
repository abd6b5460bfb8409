"""Deterministic generation: prompts x seeds -> images, one CPU ``torch.Generator`` per image.

Seeding each image with its own CPU generator makes an image depend only on (model, edits,
prompt, seed, settings) — not on batch size, device or the order of requests — which is what
the benchmark cache and paired before/after comparisons rely on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from conceptsmith.io import save_image, write_json

#: Attribute a pipeline loader may set to give its model better defaults (e.g. ShapesWorld: 64 px).
DEFAULTS_ATTRIBUTE = "conceptsmith_defaults"
MANIFEST = "manifest.json"


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


def _batches(jobs: Sequence[tuple[str, int]], size: int) -> Iterator[Sequence[tuple[str, int]]]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


def _run_batch(pipe: object, batch: Sequence[tuple[str, int]], settings: GenerationSettings) -> list[Image.Image]:
    """One forward pass over ``(prompt, seed)`` pairs, each image noised by its own CPU generator."""
    generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
    output = pipe(prompt=[prompt for prompt, _ in batch], generator=generators, output_type="pil",
                  **settings.pipeline_kwargs())
    return list(output.images)


@torch.no_grad()
def iter_images(
    pipe: object,
    jobs: Sequence[tuple[str, int]],
    settings: GenerationSettings | None = None,
    progress: bool = True,
) -> Iterator[tuple[str, int, Image.Image]]:
    """``(prompt, seed, image)`` of every ``(prompt, seed)`` job, in order, yielded as each batch finishes."""
    settings = settings or default_settings(pipe)
    jobs = [(prompt, int(seed)) for prompt, seed in jobs]
    with tqdm(total=len(jobs), desc="generate", unit="img", disable=not progress) as bar:
        for batch in _batches(jobs, max(1, settings.batch_size)):
            images = _run_batch(pipe, batch, settings)
            bar.update(len(batch))
            yield from ((prompt, seed, image) for (prompt, seed), image in zip(batch, images, strict=True))


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
    return list(iter_images(pipe, [(prompt, seed) for prompt in prompts for seed in seeds], settings, progress))


@dataclass
class FolderRun:
    """What :func:`generate_to_folder` did: every image in job order, the manifest's records, how many were reused."""

    images: list[tuple[str, int, Image.Image]]
    records: list[dict[str, Any]]
    reused: int


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _reusable(out: Path, header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Records (by file name) of an earlier run into ``out`` with the same ``header`` whose files still hold what
    it wrote."""
    try:
        previous = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(previous, dict):
        return {}
    same = {k: v for k, v in previous.items() if k not in ("images", "complete")} == json.loads(json.dumps(header))
    if not same:
        return {}
    return {
        r["file"]: r
        for r in previous.get("images", [])
        if isinstance(r, dict) and (out / str(r.get("file"))).is_file() and r.get("sha256") == _sha256(out / r["file"])
    }


def generate_to_folder(
    pipe: object,
    jobs: Sequence[tuple[str, int, str]],
    out: str | Path,
    header: dict[str, Any],
    settings: GenerationSettings | None = None,
    progress: bool = True,
) -> FolderRun:
    """Generate ``(prompt, seed, file name)`` jobs into ``out``: each PNG is written as soon as its batch is done,
    and ``manifest.json`` (``header``, ``complete`` false until the end, the images so far) after every batch.

    A rerun with the same ``header`` (model, edits, settings, ...) keeps every image the manifest lists whose file
    still has the recorded SHA-256 and generates only the rest; with one CPU generator per image, the result is
    the one of an uninterrupted run."""
    out = Path(out)
    settings = settings or default_settings(pipe)
    jobs = [(prompt, int(seed), name) for prompt, seed, name in jobs]
    wanted = set(jobs)
    done = {name: r for name, r in _reusable(out, header).items() if (r.get("prompt"), r.get("seed"), name) in wanted}
    pending = list({name: (prompt, seed, name) for prompt, seed, name in jobs if name not in done}.values())
    made: dict[str, Image.Image] = {}

    def write_manifest(complete: bool) -> None:
        records = [done[name] for name in dict.fromkeys(name for _, _, name in jobs) if name in done]
        write_json(out / MANIFEST, {**header, "complete": complete, "images": records})

    images = iter_images(pipe, [(prompt, seed) for prompt, seed, _ in pending], settings, progress)
    for count, ((prompt, seed, name), (_, _, image)) in enumerate(zip(pending, images, strict=True), start=1):
        save_image(out / name, image, format="PNG")
        done[name] = {"prompt": prompt, "seed": seed, "file": name, "sha256": _sha256(out / name)}
        made[name] = image
        if count % max(1, settings.batch_size) == 0:
            write_manifest(complete=False)
    write_manifest(complete=True)
    for name in dict.fromkeys(name for _, _, name in jobs):
        if name not in made:
            with Image.open(out / name) as stored:
                made[name] = stored.copy()
    return FolderRun([(p, s, made[n]) for p, s, n in jobs], [done[n] for _, _, n in jobs], len(jobs) - len(pending))
