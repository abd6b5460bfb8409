"""The benchmark engine's two caches, one key scheme: images and fitted edits under ``<cache>/<base identity>/``.

* **Images** (:class:`ImageCache`): ``<edit key>/<digest(condition, settings)>-<seed>.png``, where the edit key
  is ``<method>-<content digest of the applied edit>`` (or ``unedited``), so an image depends only on (model,
  edit, prompt, seed, generation settings, dtype). Batches are fixed from the full job list and dealt to the
  processes of an ``accelerate launch``, one CPU generator per image: the result does not depend on the number
  of processes.
* **Edits** (:class:`EditCache`): ``edits/<method>-<key>.safetensors``, the key a digest of the method, its
  resolved params, the request (concepts, tokens, class words, preserve set, ...) with every reference image
  replaced by its bytes' digest, the edit it was fitted on top of, the seed and the package version. Run-time
  settings that do not change the result (progress bars, where class images or checkpoints live) stay out.
* **Attack artifacts** (``attacks/*.json``: learned tokens, optimized prompts) are keyed the same way: the edit
  key, the attack's params and the digest of the reference images' bytes, so moving ``--cache`` keeps them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from conceptsmith import __version__
from conceptsmith.edits import Edit
from conceptsmith.edits import content_digest as edit_digest
from conceptsmith.images import find_images
from conceptsmith.io import save_image
from conceptsmith.registry import EditRequest, get_editor
from conceptsmith.text import encode_prompts

__all__ = [
    "EditCache",
    "FittedEdit",
    "ImageCache",
    "compute_once",
    "digest",
    "edit_key",
    "files_digest",
    "load_images",
]


def digest(*parts: Any) -> str:
    """16 hex digits of the SHA-256 of the JSON of ``parts``: the cache keys."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def files_digest(paths: Sequence[Path]) -> str:
    """16 hex digits of the SHA-256 of the files' bytes, in order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def edit_key(edit: Edit, scale: float = 1.0, prefix: str | None = None) -> str:
    """The image-cache key of an applied edit: ``<prefix or method>-<content digest at this scale>``."""
    return f"{prefix or edit.method}-{edit_digest(edit, scale)}"


def load_images(paths: Sequence[Path]) -> list[Image.Image]:
    """Cached PNGs as RGB images (files closed)."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def compute_once(state: Any, path: Path, compute: Callable[[], Any], save: Callable[[Any, Path], Any]) -> bool:
    """Compute and save the artifact ``path`` holds unless it exists; returns whether it was computed.

    Every process of a launch computes it together (trained editors train data-parallel, so all must take part)
    and only the main process saves; every process has looked for the file before it is written and finds it
    once this returns, so all go on to load the very same artifact."""
    missing = not path.is_file()
    state.wait_for_everyone()
    if missing:
        made = compute()
        if state.is_main_process:
            save(made, path)
        state.wait_for_everyone()
    return missing


def precision(pipe: Any) -> str:
    """The dtype the pipeline's denoiser computes in (``float32``, ``float16``, ``bfloat16``)."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return str(denoiser.dtype).removeprefix("torch.") if denoiser is not None else "float32"


Condition = str | Callable[[], dict[str, torch.Tensor]]


@dataclass
class ImageCache:
    """Cached, shardable generation for one pipeline; ``settings`` holds the pipeline call's kwargs."""

    pipe: Any
    settings: dict[str, Any]
    batch_size: int
    root: Path
    state: Any  # accelerate PartialState
    progress: bool = True
    generated: int = 0
    cached: int = 0

    def path(self, key: str, condition_key: str, seed: int) -> Path:
        dtype = precision(self.pipe)  # float32 images keep the keys they had before dtypes were chosen
        settings = digest(self.settings) if dtype == "float32" else digest(self.settings, dtype)
        return self.root / key / f"{digest(condition_key, settings)}-{seed}.png"

    def run(
        self, key: str, conditions: Sequence[tuple[str, Condition]], seeds: Sequence[int], desc: str = "generate"
    ) -> dict[tuple[str, int], Path]:
        """Images of every (condition, seed) with the pipeline as it is now (``key`` names its edit); a condition
        is a prompt string or (key, maker of prompt-embedding kwargs)."""
        jobs = [(k, cond, int(s)) for k, cond in conditions for s in seeds]
        paths = {(k, s): self.path(key, k, s) for k, _, s in jobs}
        batches = [jobs[i : i + self.batch_size] for i in range(0, len(jobs), self.batch_size)]
        mine = batches[self.state.process_index :: self.state.num_processes]
        todo = [b for b in mine if not all(paths[(k, s)].is_file() for k, _, s in b)]
        self.cached += sum(len(b) for b in mine) - sum(len(b) for b in todo)
        bar = tqdm(total=sum(len(b) for b in todo), desc=desc, unit="img",
                   disable=not self.progress or not todo, position=self.state.process_index)  # fmt: skip
        for batch in todo:
            generators = [torch.Generator("cpu").manual_seed(s) for _, _, s in batch]
            if all(isinstance(c, str) for _, c, _ in batch):
                inputs: dict[str, Any] = {"prompt": [c for _, c, _ in batch]}
            else:
                made = [c() if callable(c) else _encode_kwargs(self.pipe, c) for _, c, _ in batch]
                inputs = {k: torch.cat([m[k] for m in made]) for k in made[0]}
            with torch.no_grad():
                images = self.pipe(generator=generators, output_type="pil", **inputs, **self.settings).images
            for (k, _, s), image in zip(batch, images, strict=True):
                save_image(paths[(k, s)], image, format="PNG")
            self.generated += len(batch)
            bar.update(len(batch))
        bar.close()
        self.state.wait_for_everyone()
        return paths


def _encode_kwargs(pipe: Any, prompt: str) -> dict[str, torch.Tensor]:
    """Prompt-embedding kwargs of ``prompt`` (SDXL: with its pooled embedding), for batches mixing prompts and
    embeddings."""
    kw = {"prompt_embeds": encode_prompts(pipe, [prompt])}
    if getattr(pipe, "text_encoder_2", None) is not None:
        kw["pooled_prompt_embeds"] = pipe.encode_prompt([prompt], do_classifier_free_guidance=False)[2]
    return kw


@dataclass(frozen=True)
class FittedEdit:
    """An edit from the cache: the stored tensors, their image-cache key, the file, and the seconds spent fitting
    (``None`` when it was loaded)."""

    edit: Edit
    key: str
    path: Path
    seconds: float | None


@dataclass
class EditCache:
    """Fitted edits of one base model, keyed by what determines them (see the module docstring)."""

    root: Path
    state: Any
    fitted: int = 0
    files: dict[str, str] = field(default_factory=dict)  # image-cache key -> the edit's file
    _memo: dict[Path, FittedEdit] = field(default_factory=dict)

    def key(self, method: str, params: dict[str, Any], request: EditRequest, on: Edit | None = None) -> str:
        images = [files_digest(find_images(p)) for p in request.images]
        described = {**request.__dict__, "images": images}
        on_key = edit_digest(on) if on is not None else None
        return digest(method, params, described, on_key, __version__)

    def fit(
        self,
        pipe: Any,
        method: str,
        params: dict[str, Any],
        request: EditRequest,
        *,
        on: Edit | None = None,
        runtime: dict[str, Any] | None = None,
        prefix: str | None = None,
    ) -> FittedEdit:
        """Fit ``method`` with ``params`` on ``request`` (on top of the edit ``on``, applied while fitting), or
        load it; ``runtime``: params that do not change the result (left out of the key). The fitting time is
        kept in the edit's ``metadata["train_seconds"]`` unless the method recorded its own."""
        path = self.root / "edits" / f"{method}-{self.key(method, params, request, on)}.safetensors"
        if path in self._memo:
            return self._memo[path]
        timing: dict[str, float] = {}

        def fit() -> Edit:
            started = time.perf_counter()
            if on is not None:
                on.apply(pipe)
            try:
                edit = get_editor(method)({**params, **(runtime or {})}).fit(pipe, request)
            finally:
                if on is not None:
                    on.revert(pipe)
            timing["seconds"] = time.perf_counter() - started
            edit.metadata.setdefault("train_seconds", round(timing["seconds"], 3))
            return edit

        self.fitted += compute_once(self.state, path, fit, lambda edit, target: edit.save(target))
        edit = Edit.load(path)  # the stored edit: every process and every re-run use the very same tensors
        done = FittedEdit(edit, edit_key(edit, prefix=prefix or method), path, timing.get("seconds"))
        self.files[done.key] = str(path)
        self._memo[path] = done
        return done
