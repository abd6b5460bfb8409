"""Training data of the customization methods: reference images, class images, prompt templates, latents.

* :func:`load_images` reads a folder (or a list of files) of reference images with errors that name
  the problem: missing path, no images, unreadable image.
* :func:`class_images` draws class-regularization images ("a photo of a dog") from the base model
  through :func:`conceptsmith.generation.generate`, optionally cached on disk (keyed by the model's
  current weights, the prompt, the settings and the seed, so a cache is never reused for another model).
* :func:`encode_images` turns images into the VAE's latent distribution once; :class:`Examples`
  samples latents (and prompts) from it at every training step with the step's generator.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, Field, field_validator

from conceptsmith.customization import CustomizationError
from conceptsmith.edits import applied, content_digest
from conceptsmith.generation import default_settings, iter_images
from conceptsmith.images import IMAGE_SUFFIXES, find_images
from conceptsmith.io import save_image
from conceptsmith.models import fingerprint

#: Prompt templates for objects; ``{}`` is the concept phrase (e.g. "<mascot> dog").
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a close-up photo of a {}",
    "a bright photo of a {}",
    "a cropped photo of a {}",
    "a good photo of a {}",
    "a photo of one {}",
    "a picture of a {}",
)

#: Prompt templates for styles; ``{}`` is the style phrase.
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a picture in the style of {}",
    "an image in the style of {}",
    "a drawing in the style of {}",
    "artwork in the style of {}",
)

DEFAULT_CLASS_PROMPT = "a photo of a {}"


def templates(kind: str | Sequence[str]) -> tuple[str, ...]:
    """``"object"``, ``"style"`` or an explicit list of templates (each with one ``{}``)."""
    if isinstance(kind, str):
        if kind == "object":
            return OBJECT_TEMPLATES
        if kind == "style":
            return STYLE_TEMPLATES
        raise CustomizationError(f"Unknown template set {kind!r}: use 'object', 'style' or a list of templates with '{{}}'.")
    chosen = tuple(kind)
    bad = [t for t in chosen if t.count("{}") != 1]
    if not chosen or bad:
        raise CustomizationError(f"Each prompt template needs exactly one '{{}}' for the concept; got {bad or 'none'}.")
    return chosen


# -- reference images ----------------------------------------------------------------------------------


def load_images(source: str | Path | Sequence[str | Path]) -> list[Image.Image]:
    """Read reference images as RGB (EXIF orientation applied); unreadable files are errors, not skipped."""
    images = []
    for path in find_images(source):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise CustomizationError(f"'{path}' is not an image file this loader reads ({', '.join(IMAGE_SUFFIXES)}).")
        try:
            with Image.open(path) as handle:
                handle.load()
                image = ImageOps.exif_transpose(handle).convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise CustomizationError(
                f"Cannot read image '{path}' ({type(err).__name__}: {err}). The file is damaged or not an image: "
                "replace it or remove it from the folder."
            ) from None
        images.append(image)
    return images


def to_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """``[n, 3, size, size]`` in ``[-1, 1]``: shorter side resized to ``size`` (bicubic), then center-cropped."""
    tensors = []
    for image in images:
        scale = size / min(image.size)
        resized = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC)
        left, top = (resized.width - size) // 2, (resized.height - size) // 2
        cropped = resized.crop((left, top, left + size, top + size))
        data = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8).view(size, size, 3)
        tensors.append(data.permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(tensors)


@torch.no_grad()
def encode_images(vae: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent distribution of ``pixels``: ``(mean, std)``, both already multiplied by the scaling factor."""
    param = next(vae.parameters())
    scale = float(getattr(vae.config, "scaling_factor", 1.0))
    means, stds = [], []
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start : start + batch_size].to(param.device, param.dtype)
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean.float() * scale)
        stds.append(dist.std.float() * scale)
    return torch.cat(means), torch.cat(stds)


@dataclass(frozen=True)
class ZoomOut:
    """Custom Diffusion's scale augmentation (Kumari et al., CVPR 2023, Sec. 3.1 "data augmentation"): each
    reference image is also shown shrunk to ``scale`` of the frame at a random place, with the loss taken only
    where the image is (:func:`zoomed_out`), so the token is learned as an object that can be small and share
    the frame, not as "one object filling the image" (which composition prompts cannot place twice).

    ``variants`` zoomed copies per image (so ``variants / (variants + 1)`` of the draws are zoomed);
    ``words`` are put before the phrase of a zoomed copy's prompts (the paper: "very small", "far away")."""

    variants: int = 1
    scale: tuple[float, float] = (0.4, 0.6)
    words: tuple[str, ...] = ()
    seed: int = 0


def shrunk(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """``pixels`` ``[3, s, s]`` resized to ``side`` x ``side`` (bicubic, antialiased, kept in ``[-1, 1]``)."""
    return torch.nn.functional.interpolate(pixels[None], size=(side, side), mode="bicubic", antialias=True,
                                           align_corners=False)[0].clamp(-1, 1)


def border_color(pixels: torch.Tensor) -> torch.Tensor:
    """The mean color ``[3]`` of the outermost rows and columns of ``pixels`` ``[3, s, s]`` (its background)."""
    return torch.cat([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], dim=1).mean(1)


def zoomed_out(pixels: torch.Tensor, side: int, left: int, top: int, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixels`` ``[3, s, s]`` shrunk to ``side`` x ``side`` and pasted at ``(left, top)`` on a canvas of the
    image's mean border color; returns ``(pixels, mask)`` with ``mask`` ``[1, s / factor, s / factor]`` = 1 on the
    latent cells the pasted image covers completely (the only ones the loss sees)."""
    size = pixels.shape[-1]
    if left < 0 or top < 0 or left + side > size or top + side > size:
        raise ValueError(f"a {side}px image at ({left}, {top}) does not fit a {size}px frame")
    canvas = border_color(pixels)[:, None, None].expand(3, size, size).clone()
    canvas[:, top : top + side, left : left + side] = shrunk(pixels, side)
    mask = torch.zeros(1, size // factor, size // factor)
    first_x, last_x = -(-left // factor), (left + side) // factor
    first_y, last_y = -(-top // factor), (top + side) // factor
    mask[:, first_y:last_y, first_x:last_x] = 1.0
    return canvas, mask


def zoom_variants(pixels: torch.Tensor, zoom: ZoomOut, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``zoom.variants`` zoomed-out copies of each image of ``pixels`` ``[n, 3, s, s]`` (seeded scale and place)."""
    generator = torch.Generator().manual_seed(zoom.seed)
    size = pixels.shape[-1]
    out, masks = [], []
    for _ in range(zoom.variants):
        for image in pixels:
            low, high = zoom.scale
            scale = low + (high - low) * float(torch.rand((), generator=generator))
            side = max(factor, round(scale * size))
            left, top = (int(torch.randint(0, size - side + 1, (), generator=generator)) for _ in range(2))
            canvas, mask = zoomed_out(image, side, left, top, factor)
            out.append(canvas)
            masks.append(mask)
    return torch.stack(out), torch.stack(masks)


@dataclass(frozen=True)
class CutMix:
    """SVDiff's Cut-Mix augmentation (Han et al., ICCV 2023, Sec. 3.3 "Cut-Mix-Unmix"): for joint training on
    several concepts, images that show two of them side by side, each reference shrunk into one half of the frame,
    prompted with both phrases joined by ``relation`` (e.g. ``"<a> mushroom left of a <b> key"``), so the run
    sees the concepts together, not only each filling the frame alone. ``per_pair`` images per ordered pair of
    concepts (reference images drawn with ``seed``). The paper's Unmix term (a cross-attention penalty) is not
    implemented."""

    per_pair: int = 4
    relation: str = "{a} left of a {b}"
    seed: int = 0


def side_by_side(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Two images ``[3, s, s]`` as one: each shrunk to ``s/2`` x ``s/2`` and centred in its half, on its own
    mean border color (ShapesWorld draws two-object scenes the same way: one object per half)."""
    size = left.shape[-1]
    half = size // 2
    top = (size - half) // 2
    canvas = torch.empty(3, size, size)
    for image, start in ((left, 0), (right, half)):
        canvas[:, :, start : start + half] = border_color(image)[:, None, None]
        canvas[:, top : top + half, start : start + half] = shrunk(image, half)
    return canvas


def cut_mix_pixels(pixels: Sequence[torch.Tensor], phrases: Sequence[str], mix: CutMix) -> tuple[torch.Tensor, list[str]]:
    """``mix.per_pair`` side-by-side images per ordered pair of concepts (``pixels[i]`` ``[n_i, 3, s, s]`` are
    concept ``i``'s references, ``phrases[i]`` its phrase) and their phrases."""
    if len(pixels) < 2:
        raise CustomizationError(
            "cut_mix puts two concepts in one image, so it needs a run with at least two concepts (joint training); "
            "set cut_mix: 0 for a single concept."
        )
    generator = torch.Generator().manual_seed(mix.seed)
    images, mixed_phrases = [], []
    for a, b in ((a, b) for a in range(len(pixels)) for b in range(len(pixels)) if a != b):
        for _ in range(mix.per_pair):
            i = int(torch.randint(len(pixels[a]), (), generator=generator))
            j = int(torch.randint(len(pixels[b]), (), generator=generator))
            images.append(side_by_side(pixels[a][i], pixels[b][j]))
            mixed_phrases.append(mix.relation.format(a=phrases[a], b=phrases[b]))
    return torch.stack(images), mixed_phrases


# -- class-regularization images -----------------------------------------------------------------------


def class_images(
    pipe: object,
    prompt: str,
    count: int,
    *,
    seed: int = 0,
    size: int | None = None,
    cache_dir: str | Path | None = None,
    num_inference_steps: int | None = None,
    progress: bool = True,
) -> list[Image.Image]:
    """``count`` images of ``prompt`` from ``pipe`` itself (seeds ``seed .. seed + count - 1``).

    With ``cache_dir``, images are stored under a key of (current weights, applied edits, prompt, settings)
    and reused by later runs; only the missing seeds are generated.
    """
    if count < 1:
        return []
    settings = default_settings(pipe, height=size, width=size, num_inference_steps=num_inference_steps)
    seeds = list(range(seed, seed + count))
    folder = None
    cached: dict[int, Image.Image] = {}
    if cache_dir is not None:
        edits = [content_digest(edit, scale) for edit, scale in applied(pipe)]  # adapters and hooks are not weights
        key = json.dumps({"model": fingerprint(pipe), "edits": edits, "prompt": prompt, "settings": settings.pipeline_kwargs()}, sort_keys=True)
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt"
        folder = Path(cache_dir) / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        for s in seeds:
            path = folder / f"{s}.png"
            if path.is_file():
                try:
                    cached[s] = load_images([path])[0]
                except CustomizationError:
                    path.unlink()  # a broken cache entry (interrupted write): generate it again
    missing = [s for s in seeds if s not in cached]
    if missing:
        for _, s, image in iter_images(pipe, [(prompt, s) for s in missing], settings, progress=progress):
            cached[s] = image
            if folder is not None:  # each image as soon as its batch is done: a stopped run keeps them
                save_image(folder / f"{s}.png", image, format="PNG")
    return [cached[s] for s in seeds]


def training_examples(pipe: Any, specs: Sequence[Any], config: Any, size: int, seed: int) -> tuple[Examples, Examples | None, tuple[str, ...]]:
    """``(instances, classes, prompt_templates)`` of a subject-training run (DreamBooth / Custom Diffusion):
    each concept's reference images with its phrase in the config's templates, and with
    ``config.prior_preservation`` the base model's own images of every class word (``config.class_prompt``)."""
    classes = None
    if config.prior_preservation:
        parts = []
        for word in dict.fromkeys(s.class_word for s in specs):
            prompt = config.class_prompt.format(word)
            images = class_images(
                pipe, prompt, config.num_class_images, seed=seed, size=size, cache_dir=config.class_data_dir,
                num_inference_steps=config.class_inference_steps, progress=config.progress,
            )
            parts.append(Examples.from_images(pipe.vae, images, size, prompt, ("{}",), config.flip))
        classes = Examples.concat(parts)
    instances, prompt_templates = instance_examples(pipe, specs, config, size, seed)
    return instances, classes, prompt_templates


def instance_examples(pipe: Any, specs: Sequence[Any], config: Any, size: int, seed: int) -> tuple[Examples, tuple[str, ...]]:
    """``(instances, prompt_templates)``: each concept's reference images with its phrase in the config's
    templates (mirrored with ``config.flip``, zoomed out per :meth:`ZoomOutOptions.zoom`), plus, for a joint run with
    ``config.cut_mix``, side-by-side images of every ordered pair of concepts (:func:`cut_mix_pixels`)."""
    prompt_templates = templates(config.templates)
    zoom = config.zoom(seed)
    parts = [Examples.from_images(pipe.vae, s.images, size, s.phrase, prompt_templates, config.flip, zoom) for s in specs]
    mix = config.mix(seed)
    if mix is not None:
        mixed, phrases = cut_mix_pixels([to_pixels(s.images, size) for s in specs], [s.phrase for s in specs], mix)
        parts.append(Examples.from_pixels(pipe.vae, mixed, phrases, prompt_templates))
    return Examples.concat(parts), prompt_templates


class ZoomOutOptions(BaseModel):
    """Config fields of :class:`ZoomOut` shared by the methods that train on reference images."""

    zoom_out: int = Field(0, ge=0, description="zoomed-out copies per reference image (0: none; Custom Diffusion's "
                          "scale augmentation, for composing several concepts in one image)")
    zoom_out_scale: tuple[float, float] = Field((0.4, 0.6), description="size range of a zoomed-out copy (share of the frame)")
    zoom_out_words: list[str] = Field(default_factory=list, description="words put before the phrase of zoomed-out "
                                      "copies, e.g. ['very small'] (only words the text encoder knows)")

    @field_validator("zoom_out_scale")
    @classmethod
    def _scale_in_frame(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"zoom_out_scale needs 0 < low <= high <= 1; got {list(value)}")
        return value

    def zoom(self, seed: int) -> ZoomOut | None:
        if not self.zoom_out:
            return None
        return ZoomOut(self.zoom_out, tuple(self.zoom_out_scale), tuple(self.zoom_out_words), seed)


class CutMixOptions(BaseModel):
    """Config fields of :class:`CutMix` shared by the methods that train on reference images."""

    cut_mix: int = Field(0, ge=0, description="side-by-side images per ordered pair of concepts in a joint run (0: none; "
                         "SVDiff's Cut-Mix, for composing several concepts in one image)")
    cut_mix_relation: str = Field("{a} left of a {b}", description="how a side-by-side image joins the two phrases "
                                  "({a} is the left concept, {b} the right)")

    @field_validator("cut_mix_relation")
    @classmethod
    def _both_concepts(cls, value: str) -> str:
        if "{a}" not in value or "{b}" not in value:
            raise ValueError(f"cut_mix_relation needs '{{a}}' and '{{b}}'; got {value!r}")
        return value

    def mix(self, seed: int) -> CutMix | None:
        return CutMix(self.cut_mix, self.cut_mix_relation, seed) if self.cut_mix else None


# -- sampling ------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One draw of training examples: latents, their prompts and (if any example is zoomed out) loss masks."""

    latents: torch.Tensor
    prompts: list[str]
    mask: torch.Tensor | None = None

    def cat(self, other: Batch) -> Batch:
        mask = joined_masks([(self.mask, self.latents), (other.mask, other.latents)])
        return Batch(torch.cat([self.latents, other.latents]), self.prompts + other.prompts, mask)


def joined_masks(parts: Sequence[tuple[torch.Tensor | None, torch.Tensor]]) -> torch.Tensor | None:
    """Concatenated loss masks of ``(mask, latents)`` parts, all-ones for a part without one; None if none has one."""
    if all(mask is None for mask, _ in parts):
        return None
    return torch.cat([mask if mask is not None else torch.ones_like(latents[:, :1]) for mask, latents in parts])


@dataclass
class Examples:
    """Latent distributions of images with, per image, the phrase and templates its prompts are made from."""

    mean: torch.Tensor  # [n, c, h, w]
    std: torch.Tensor
    phrases: list[str]
    templates: tuple[str, ...]
    mask: torch.Tensor | None = None  # [n, 1, h, w]: latent cells the loss sees (None: all of them)

    @classmethod
    def from_images(
        cls,
        vae: torch.nn.Module,
        images: Sequence[Image.Image],
        size: int,
        phrases: str | Sequence[str],
        prompt_templates: Sequence[str] = ("{}",),
        flip: bool = False,
        zoom: ZoomOut | None = None,
    ) -> Examples:
        """Encode ``images`` (and their horizontal mirror images with ``flip``, and ``zoom``'s zoomed-out copies of
        all of them, whose phrases get ``zoom.words``) once."""
        pixels = to_pixels(images, size)
        phrase_list = [phrases] * len(images) if isinstance(phrases, str) else list(phrases)
        if flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
            phrase_list = phrase_list * 2
        mask = None
        if zoom is not None and zoom.variants > 0:
            factor = 2 ** (len(vae.config.block_out_channels) - 1)  # the VAE's downsampling, as diffusers computes it
            zoomed, zoom_mask = zoom_variants(pixels, zoom, factor)
            full = torch.ones(len(pixels), *zoom_mask.shape[1:])
            pixels, mask = torch.cat([pixels, zoomed]), torch.cat([full, zoom_mask])
            prefix = " ".join(zoom.words)
            phrase_list = phrase_list + [f"{prefix} {p}".strip() for p in phrase_list] * zoom.variants
        return cls.from_pixels(vae, pixels, phrase_list, prompt_templates, mask)

    @classmethod
    def from_pixels(
        cls,
        vae: torch.nn.Module,
        pixels: torch.Tensor,
        phrases: Sequence[str],
        prompt_templates: Sequence[str] = ("{}",),
        mask: torch.Tensor | None = None,
    ) -> Examples:
        """Encode ``pixels`` ``[n, 3, s, s]`` in ``[-1, 1]`` (one phrase each) once."""
        mean, std = encode_images(vae, pixels)
        return cls(mean, std, list(phrases), tuple(prompt_templates), mask)

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, count: int, generator: torch.Generator) -> Batch:
        """``count`` latents (drawn from each image's latent distribution), their prompts and loss masks."""
        index = torch.randint(len(self), (count,), generator=generator)
        template = torch.randint(len(self.templates), (count,), generator=generator)
        noise = torch.randn((count, *self.mean.shape[1:]), generator=generator)
        latents = self.mean[index] + self.std[index] * noise
        prompts = [self.templates[t].format(self.phrases[i]) for i, t in zip(index.tolist(), template.tolist())]
        return Batch(latents, prompts, None if self.mask is None else self.mask[index])

    @staticmethod
    def concat(parts: Sequence[Examples]) -> Examples:
        """One example set from several with the same templates (e.g. one per concept)."""
        if len({p.templates for p in parts}) != 1:
            raise ValueError("Examples.concat needs parts with the same templates.")
        return Examples(
            torch.cat([p.mean for p in parts]),
            torch.cat([p.std for p in parts]),
            [phrase for p in parts for phrase in p.phrases],
            parts[0].templates,
            joined_masks([(p.mask, p.mean) for p in parts]),
        )


def default_resolution(pipe: object) -> int:
    """Training resolution: the pipeline's default generation height, else the UNet's native size."""
    defaults = getattr(pipe, "conceptsmith_defaults", None) or {}
    if defaults.get("height"):
        return int(defaults["height"])
    unet = pipe.unet
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    size = unet.config.sample_size
    return int(size if isinstance(size, int) else size[0]) * factor


# -- what a customization request asks for ------------------------------------------------------------


@dataclass
class ConceptSpec:
    """One concept to learn: its new token, class word, reference images and the phrase used in prompts."""

    token: str
    class_word: str | None
    images: list[Image.Image]
    phrase: str
    source: str


def concept_specs(
    request: object,
    *,
    phrase_format: str,
    need_class_word: bool,
    recommended: tuple[int, int] | None = None,
    method: str = "this method",
) -> list[ConceptSpec]:
    """Read tokens, class words and reference images from an ``EditRequest`` (clear errors when they don't fit).

    One token: ``request.images`` lists folders and/or files (all of that concept). Several tokens:
    one folder (or file) per token, in the same order. One class word applies to every token.
    ``phrase_format`` builds the phrase used in prompts, e.g. ``"{token} {class_word}"``.
    """
    tokens = list(request.tokens)
    if not tokens:
        raise CustomizationError(f"{method} learns a new token per concept: give one, e.g. --token '<mascot>'.")
    if len(set(tokens)) != len(tokens):
        raise CustomizationError(f"Each concept needs its own token; got duplicates in {tokens}.")
    class_words = list(request.class_words)
    if len(class_words) == 1:
        class_words = class_words * len(tokens)
    elif not class_words:
        if need_class_word or "{class_word}" in phrase_format:
            raise CustomizationError(
                f"{method} needs a class word per concept (what the concept is, e.g. --class-word dog): it is used "
                "in the training prompts and for the class-regularization images."
            )
        class_words = [None] * len(tokens)
    elif len(class_words) != len(tokens):
        raise CustomizationError(f"Got {len(tokens)} tokens but {len(class_words)} class words: give one per token (or one for all).")
    images = list(request.images)
    if not images:
        raise CustomizationError(f"No reference images given: {method} needs a folder of 3-10 images of the concept (--images DIR).")
    if len(tokens) == 1:
        sources = [images]
    elif len(images) == len(tokens):
        sources = [[item] for item in images]
    else:
        raise CustomizationError(
            f"Got {len(tokens)} tokens but {len(images)} image sources: with several concepts give one folder per token, in order."
        )
    specs = []
    for token, class_word, source in zip(tokens, class_words, sources):
        loaded = load_images(source)
        if recommended is not None and not recommended[0] <= len(loaded) <= recommended[1]:
            warnings.warn(
                f"{len(loaded)} reference images for '{token}'; {method} is meant for {recommended[0]}-{recommended[1]}.",
                UserWarning,
                stacklevel=3,
            )
        phrase = phrase_format.format(token=token, class_word=class_word or "").strip()
        specs.append(ConceptSpec(token, class_word, loaded, " ".join(phrase.split()), ", ".join(str(s) for s in source)))
    return specs
