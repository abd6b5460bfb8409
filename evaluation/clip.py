"""CLIP evaluators over open_clip: an :class:`Evaluator` embeds images and texts in batches with L2-normalized
float32 outputs and caches them (images by a hash of their pixels, texts by their string), classifies zero-shot with
prompt-template ensembles, and computes CLIP score and image-image similarity with the convention recorded next to
every number. :mod:`evaluation.evaluators` loads one from a spec.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DEFAULT_TEMPLATES",
    "Classification",
    "ClipScore",
    "Evaluator",
    "ImageLike",
    "image_key",
    "uint8_images",
]

#: Template used when a caller gives none (the MACE CIFAR-10 scorer's single template).
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of the {}",)

#: Anything the evaluator accepts as one image: PIL image, HxWx3 uint8/float array, or a 3xHxW tensor
#: (float in [0, 1] or uint8). Float inputs are quantized to uint8 first, as a saved image would be.
ImageLike = Any



# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
def _to_uint8_hwc(image: ImageLike) -> np.ndarray:
    """Canonical pixels of one image: contiguous uint8 RGB, HxWx3."""
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim != 3:
            raise ValueError(f"expected one image tensor of shape 3xHxW, got {tuple(t.shape)}")
        if t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)
        array = t.numpy()
    else:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"expected an HxWxC image, got shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        array = array[..., :3]
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def _split_images(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (Image.Image, torch.Tensor, np.ndarray)):
        return [images]
    return list(images)


def uint8_images(images: ImageLike | Sequence[ImageLike]) -> list[np.ndarray]:
    """Every image of ``images`` (one image, a batch or a list) as contiguous uint8 RGB, HxWx3."""
    return [_to_uint8_hwc(im) for im in _split_images(images)]


def image_key(pixels: np.ndarray) -> str:
    """Cache key of one image: a hash over its shape and uint8 RGB bytes."""
    h = hashlib.blake2b(digest_size=20)
    h.update(repr(pixels.shape).encode())
    h.update(pixels.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Classification:
    """Zero-shot classification of n images over C class names."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    logits: torch.Tensor  # [n, C] = logit_scale * cosine
    probs: torch.Tensor  # [n, C] softmax over the C classes
    logit_scale: float

    @property
    def pred(self) -> torch.Tensor:
        """Argmax class index per image, [n]."""
        return self.probs.argmax(dim=-1)

    def labels(self) -> list[str]:
        return [self.classnames[i] for i in self.pred.tolist()]

    def index(self, name: str) -> int:
        try:
            return self.classnames.index(name)
        except ValueError:
            raise KeyError(f"{name!r} is not one of the classes {list(self.classnames)}") from None


@dataclass(frozen=True)
class ClipScore:
    """CLIP score with its convention: ``score = scale * cos`` clamped below at ``clamp_min``.

    The default (scale 100, clamp 0) is torchmetrics' ``CLIPScore``: ``max(100 * cos, 0)``.
    """

    per_image: tuple[float, ...]
    mean: float
    scale: float
    clamp_min: float | None
    evaluator: str

    @classmethod
    def from_cosines(
        cls, cosines: torch.Tensor, evaluator: str, *, scale: float = 100.0, clamp_min: float | None = 0.0
    ) -> ClipScore:
        """Score image-text cosines [n] with the convention ``max(scale * cos, clamp_min)``, averaged."""
        s = scale * torch.as_tensor(cosines).detach().double().cpu().reshape(-1)
        if clamp_min is not None:
            s = s.clamp_min(clamp_min)
        mean = float(s.mean()) if s.numel() else math.nan
        return cls(tuple(float(v) for v in s), mean, scale, clamp_min, evaluator)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_image"] = list(self.per_image)
        d["convention"] = f"{self.scale:g}*cos" + (
            "" if self.clamp_min is None else f", clamped at >= {self.clamp_min:g}"
        )
        return d


# --------------------------------------------------------------------------------------------
# the evaluator
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Evaluator:
    """An open_clip model + its tokenizer + its image preprocessing, with embedding caches.

    Build one with :func:`evaluation.evaluators.load_evaluator`; the constructor takes already-built parts.
    ``preprocess`` maps a PIL image to a CxHxW float tensor (open_clip's eval transform);
    ``tokenizer`` maps a list of strings to a LongTensor of token ids.
    """

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Callable[[Image.Image], torch.Tensor]
    spec: str = "custom"
    device: str | torch.device = "cpu"
    batch_size: int = 64
    _image_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _text_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.model = self.model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    # ---- facts recorded with every result -----------------------------------------------
    @property
    def logit_scale(self) -> float:
        scale = getattr(self.model, "logit_scale", None)
        if scale is None:
            return 100.0
        return float(torch.as_tensor(scale).detach().float().exp().reshape(-1)[0])

    def describe(self) -> dict[str, Any]:
        """What a result must record about the evaluator that produced it."""
        try:
            import open_clip  # lazy: optional/heavy

            pp = dict(open_clip.get_model_preprocess_cfg(self.model))
        except Exception:  # pragma: no cover - non open_clip model
            pp = {}
        return {
            "spec": self.spec,
            "logit_scale": self.logit_scale,
            "image_size": pp.get("size"),
            "embed_dim": self._embed_dim(),
        }

    def _embed_dim(self) -> int | None:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[-1])
        if isinstance(proj, torch.nn.Linear):
            return int(proj.out_features)
        return None

    def clear_cache(self) -> None:
        self._image_cache.clear()
        self._text_cache.clear()

    @property
    def cache_sizes(self) -> dict[str, int]:
        return {"images": len(self._image_cache), "texts": len(self._text_cache)}

    # ---- embeddings ---------------------------------------------------------------------
    @torch.no_grad()
    def embed_images(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """L2-normalized float32 image embeddings, [n, D] (CPU). Cached by pixel hash."""
        pixels = uint8_images(images)
        keys = [image_key(p) for p in pixels]
        todo: dict[str, np.ndarray] = {}
        for k, p in zip(keys, pixels, strict=True):
            if k not in self._image_cache and k not in todo:
                todo[k] = p
        items = list(todo.items())
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            batch = torch.stack([self.preprocess(Image.fromarray(p)) for _, p in chunk]).to(self.device)
            feats = self.model.encode_image(batch).float()
            feats = torch.nn.functional.normalize(feats, dim=-1).cpu()
            for (k, _), f in zip(chunk, feats, strict=True):
                self._image_cache[k] = f
        if not keys:
            return torch.empty(0, self._embed_dim() or 0)
        return torch.stack([self._image_cache[k] for k in keys])

    @torch.no_grad()
    def embed_texts(self, texts: str | Sequence[str]) -> torch.Tensor:
        """L2-normalized float32 text embeddings, [n, D] (CPU). Cached by string."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        todo = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            tokens = self.tokenizer(chunk).to(self.device)
            feats = self.model.encode_text(tokens).float()
            feats = torch.nn.functional.normalize(feats, dim=-1).cpu()
            for t, f in zip(chunk, feats, strict=True):
                self._text_cache[t] = f
        if not texts:
            return torch.empty(0, self._embed_dim() or 0)
        return torch.stack([self._text_cache[t] for t in texts])

    def class_embeddings(
        self, classnames: Sequence[str], templates: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Prompt-ensemble class embeddings, [C, D].

        For each class, the normalized text embeddings of every template filled with the class name
        are averaged and the mean is renormalized (CLIP's zero-shot recipe). A template without
        ``{}`` gets the class name appended after a space.
        """
        templates = tuple(templates or DEFAULT_TEMPLATES)
        if not classnames:
            raise ValueError("class_embeddings needs at least one class name")
        filled = [_fill(t, c) for c in classnames for t in templates]
        emb = self.embed_texts(filled).view(len(classnames), len(templates), -1)
        return torch.nn.functional.normalize(emb.mean(dim=1), dim=-1)

    # ---- zero-shot classification ---------------------------------------------------------
    def classify(
        self,
        images: ImageLike | Sequence[ImageLike],
        classnames: Sequence[str],
        templates: Sequence[str] | None = None,
    ) -> Classification:
        """Zero-shot classification: softmax over ``logit_scale * cos(image, class embedding)``."""
        templates = tuple(templates or DEFAULT_TEMPLATES)
        img = self.embed_images(images)
        cls = self.class_embeddings(classnames, templates)
        scale = self.logit_scale
        logits = scale * img @ cls.T
        return Classification(
            classnames=tuple(classnames),
            templates=templates,
            logits=logits,
            probs=logits.softmax(dim=-1),
            logit_scale=scale,
        )

    # ---- scores -----------------------------------------------------------------------------
    def cosine(self, images: ImageLike | Sequence[ImageLike], texts: Sequence[str]) -> torch.Tensor:
        """Paired image-text cosine similarity, [n] (image i with text i)."""
        img = self.embed_images(images)
        txt = self.embed_texts(list(texts))
        if img.shape[0] != txt.shape[0]:
            raise ValueError(f"{img.shape[0]} images but {txt.shape[0]} texts; they are paired one to one")
        return (img * txt).sum(dim=-1)

    def clip_score(
        self,
        images: ImageLike | Sequence[ImageLike],
        texts: Sequence[str],
        *,
        scale: float = 100.0,
        clamp_min: float | None = 0.0,
    ) -> ClipScore:
        """CLIP score of image i against text i; default torchmetrics convention ``max(100*cos, 0)``."""
        return ClipScore.from_cosines(self.cosine(images, texts), self.spec, scale=scale, clamp_min=clamp_min)

    def image_similarity(
        self,
        images_a: ImageLike | Sequence[ImageLike],
        images_b: ImageLike | Sequence[ImageLike],
        *,
        paired: bool = False,
    ) -> float:
        """Mean cosine between image embeddings (CLIP-I).

        ``paired=False``: mean over all (a, b) pairs -- generated vs reference images (CLIP-I of
        Custom Diffusion / CustomConcept101). ``paired=True``: mean of cos(a_i, b_i) -- the same
        prompt and seed before/after an edit.
        """
        a = self.embed_images(images_a).double()
        b = self.embed_images(images_b).double()
        if a.shape[0] == 0 or b.shape[0] == 0:
            raise ValueError("image_similarity needs at least one image on each side")
        if paired:
            if a.shape[0] != b.shape[0]:
                raise ValueError(f"paired similarity needs equal counts, got {a.shape[0]} and {b.shape[0]}")
            return float((a * b).sum(-1).mean())
        return float((a @ b.T).mean())


def _fill(template: str, name: str) -> str:
    return template.format(name) if "{}" in template else f"{template} {name}"


