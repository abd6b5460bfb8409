"""Images and segmentation masks of the concepts MACE erases (Lu et al., CVPR 2024, Sec. 3.3: the
attention loss looks only inside the concept's mask; the paper segments generated images with Grounded-SAM).

Two sources (``MACEConfig.images``):

* ``request``: ``request.images`` holds one entry per concept, in the order of the concepts: a folder of
  images or one image file. Every image ``NAME.EXT`` needs its mask beside it, ``NAME.mask.png`` (white
  where the concept is, black elsewhere; any mode, read as grayscale; resized and center-cropped exactly as
  the image). Files ending in ``.mask.png`` are never read as images.
* ``renderer``: ShapesWorld (``builtin:shapes``) draws them. A concept naming a shape (its canonical name
  or a caption noun, e.g. ``skull``) gets ``n_images`` single-object scenes of it (random color, pattern and
  background; no artist, no watermark) masked by :func:`conceptsmith.world.render.object_masks`; a
  pseudo-artist's name gets scenes in that style, masked by the whole frame (a style covers the image).

Either way the images become :class:`customization.data.Examples` (latent distributions encoded once,
prompts from the templates) whose ``mask`` is the segmentation mask at image resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from conceptsmith.customization.data import Examples, default_resolution, load_images, to_pixels
from conceptsmith.errors import CustomizationError
from conceptsmith.images import find_images
from conceptsmith.text import context_length, text_encoders
from conceptsmith.token_positions import concept_token_positions
from conceptsmith.training import TrainingError
from conceptsmith.world import vocab
from conceptsmith.world.render import object_masks, render

ImageSource = Literal["request", "renderer"]
MASK_SUFFIX = ".mask.png"


def mask_path(image: Path) -> Path:
    """Where the mask of ``image`` lives: ``NAME.EXT`` -> ``NAME.mask.png`` in the same folder."""
    return image.with_name(f"{image.stem}{MASK_SUFFIX}")


def concept_examples(
    pipe: Any, concepts: Sequence[str], request_images: Sequence[Path], source: ImageSource,
    templates: Sequence[str], n_images: int, seed: int,
) -> list[Examples]:
    """Per concept, its images (latents), prompts and masks; a clear :class:`TrainingError` when any is missing."""
    if source == "request":
        pairs = _request_pairs(concepts, request_images)
    elif request_images:
        raise TrainingError("images: renderer draws every image itself; drop the image folders or set images: request.")
    else:
        pairs = [_rendered(concept, n_images, seed) for concept in concepts]
    size = default_resolution(pipe)
    examples = []
    for concept, (images, masks) in zip(concepts, pairs):
        mask = ((to_pixels(masks, size)[:, :1] + 1) / 2).clamp(0, 1)  # the image's resize and crop, back to [0, 1]
        if not bool((mask > 0).any()):
            raise TrainingError(f"Every mask of '{concept}' is empty (all black): mark where the concept is in white.")
        examples.append(Examples.from_pixels(pipe.vae, to_pixels(images, size), [concept] * len(images), templates, mask))
    return examples


def _request_pairs(concepts: Sequence[str], entries: Sequence[Path]) -> list[tuple[list[Image.Image], list[Image.Image]]]:
    if not entries:
        raise TrainingError(
            "mace trains on images of each concept with segmentation masks, and none were given: pass one folder per "
            f"concept (each image NAME.png with its mask NAME{MASK_SUFFIX} beside it), or on builtin:shapes set "
            "images: renderer."
        )
    if len(entries) != len(concepts):
        raise TrainingError(
            f"mace needs one image folder (or file) per concept, in the same order: got {len(concepts)} concept(s) "
            f"({', '.join(concepts)}) and {len(entries)} image entr{'y' if len(entries) == 1 else 'ies'}."
        )
    pairs = []
    for concept, entry in zip(concepts, entries):
        try:
            files = [p for p in find_images(entry) if not p.name.endswith(MASK_SUFFIX)]
        except CustomizationError as err:
            raise TrainingError(f"Images of '{concept}': {err}") from None
        if not files:
            raise TrainingError(f"'{entry}' holds only masks ({MASK_SUFFIX}); put the images of '{concept}' beside them.")
        missing = [str(mask_path(p)) for p in files if not mask_path(p).is_file()]
        if missing:
            raise TrainingError(
                f"{len(missing)} image(s) of '{concept}' have no mask, e.g. '{missing[0]}': save each image's "
                f"segmentation mask (white = the concept) as NAME{MASK_SUFFIX} beside NAME.EXT."
            )
        pairs.append((load_images(files), load_images([mask_path(p) for p in files])))
    return pairs


def _rendered(concept: str, count: int, seed: int) -> tuple[list[Image.Image], list[Image.Image]]:
    """ShapesWorld scenes of ``concept`` (a shape noun or a pseudo-artist) and their masks."""
    key = concept.strip().lower()
    shapes = {noun.lower(): shape for shape in vocab.ALL_SHAPES for noun in vocab.nouns(shape)}
    artists = {name.lower(): name for name in vocab.ARTISTS}
    if key not in shapes and key not in artists:
        raise TrainingError(
            f"images: renderer draws ShapesWorld shapes and artists, and '{concept}' is neither (shapes: "
            f"{', '.join(vocab.ALL_SHAPES)}; artists: {', '.join(vocab.ARTISTS)}). Give its images and masks instead."
        )
    force = {"shape": shapes[key], "artist": None} if key in shapes else {"artist": artists[key]}
    images, masks = [], []
    for i in range(count):
        sample = render((seed, 7741, i), n_objects=1, watermark=False, **force)
        mask = object_masks(sample.labels)[0] if key in shapes else np.ones(sample.image.shape[:2], np.float32)
        images.append(sample.pil())
        masks.append(Image.fromarray(np.round(mask * 255).astype(np.uint8)).convert("RGB"))
    return images, masks


def token_mask(pipe: Any, prompts: Sequence[str], phrases: Sequence[str]) -> torch.Tensor:
    """``[n, context]`` float: 1 at the tokens of each prompt's concept phrase (every occurrence)."""
    tokenizer, encoder = text_encoders(pipe)[0]
    try:
        positions = concept_token_positions(pipe, list(prompts), list(phrases), "phrase")
    except ValueError as err:
        raise TrainingError(f"mace: {err} (the templates must contain the concept as words of its own).") from None
    mask = torch.zeros(len(prompts), context_length(tokenizer, encoder))
    for row, cols in enumerate(positions):
        mask[row, cols] = 1.0
    return mask
