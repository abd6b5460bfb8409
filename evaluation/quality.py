"""Image quality of a model's generations: CLIP score, FD in the evaluator's feature space, FID and KID.

* ``clip_score`` -- torchmetrics' ``CLIPScore`` convention: per image ``max(100 * cos(image, prompt), 0)``,
  averaged, with the bench's CLIP evaluator (its spec is recorded with the number; CLIP-T of
  CustomConcept101 is the raw cosine instead, :func:`evaluation.metrics.clip_t`).
* ``fd_clip`` (:func:`evaluation.metrics.fd_clip`) -- Frechet distance between Gaussian fits of the
  evaluator's image embeddings; needs no extra weights and is not comparable to FID.
* ``fid`` / ``kid`` -- torchmetrics' ``FrechetInceptionDistance`` (Heusel et al. 2017) and
  ``KernelInceptionDistance`` (Binkowski et al. 2018: unbiased MMD^2 with the kernel
  ``(x.y / d + 1)^3`` over random subsets) on the 2048-d pool features of the FID Inception network
  (torch-fidelity's port of TensorFlow's 2015-12-05 graph). Only from a local weights file --
  torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` or a ``.safetensors`` copy -- named by
  ``inception_weights`` (a bench YAML's ``quality: {inception_weights: PATH}``) or by
  ``$CONCEPTSMITH_INCEPTION_WEIGHTS``; it is read with ``weights_only=True`` / safetensors and nothing is
  ever downloaded: without it :class:`MissingInceptionWeights` says how to supply it.

:func:`quality` is the group: all of the above for one set of generations against a reference set.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import warnings
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import Field, model_validator

from conceptsmith.config import StrictModel
from conceptsmith.evaluation.clip import ClipScore, image_key, uint8_images
from conceptsmith.evaluation.metrics import fd_clip
from conceptsmith.imports import read_weights

if TYPE_CHECKING:
    from conceptsmith.evaluation.clip import Evaluator, ImageLike

__all__ = [
    "INCEPTION_ENV",
    "InceptionFeatures",
    "MissingInceptionWeights",
    "QualitySpec",
    "clip_score",
    "clip_score_from_embeddings",
    "fid",
    "inception_settings",
    "inception_weights_path",
    "kid",
    "quality",
]

INCEPTION_ENV = "CONCEPTSMITH_INCEPTION_WEIGHTS"
_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
_FEATURE_DIM = 2048


# --------------------------------------------------------------------------------------------
# CLIP score
# --------------------------------------------------------------------------------------------
def clip_score_from_embeddings(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    *,
    evaluator: str = "custom",
    scale: float = 100.0,
    clamp_min: float | None = 0.0,
) -> ClipScore:
    """CLIP score of paired embeddings [n, D] (normalized here): mean of ``max(scale * cos, clamp_min)``."""
    img = torch.nn.functional.normalize(torch.as_tensor(image_embeds).double(), dim=-1)
    txt = torch.nn.functional.normalize(torch.as_tensor(text_embeds).double(), dim=-1)
    if img.shape != txt.shape:
        raise ValueError(f"image and text embeddings are paired one to one; got {tuple(img.shape)} and {tuple(txt.shape)}")
    return ClipScore.from_cosines((img * txt).sum(dim=-1), evaluator, scale=scale, clamp_min=clamp_min)


def clip_score(evaluator: Evaluator, images: Sequence[ImageLike], prompts: Sequence[str]) -> ClipScore:
    """Image i against prompt i with the evaluator's embeddings; ``.to_dict()`` records the convention."""
    return evaluator.clip_score(images, prompts)


# --------------------------------------------------------------------------------------------
# the FID Inception network, from a local file only
# --------------------------------------------------------------------------------------------
class MissingInceptionWeights(FileNotFoundError, ValueError):
    """FID / KID were asked for without a local Inception weights file."""


def inception_weights_path(path: str | Path | None = None) -> Path:
    """The Inception weights file: ``path``, else ``$CONCEPTSMITH_INCEPTION_WEIGHTS``; it must exist."""
    given = path or os.environ.get(INCEPTION_ENV)
    how = (
        f"FID and KID need the FID Inception weights as a local file (torch-fidelity's {_WEIGHTS_NAME} or a "
        f".safetensors copy): set `quality: {{inception_weights: PATH}}` in the bench YAML or export {INCEPTION_ENV}=PATH; "
        "nothing is downloaded"
    )
    if not given:
        raise MissingInceptionWeights(f"no Inception weights file given. {how}")
    resolved = Path(given).expanduser()
    if not resolved.is_file():
        raise MissingInceptionWeights(f"Inception weights file '{resolved}' not found. {how}")
    return resolved


@functools.lru_cache(maxsize=2)
def _inception(path: str, device: str) -> torch.nn.Module:
    """torchmetrics' FID Inception with the weights of ``path`` (read with safetensors / ``weights_only=True``).

    torch-fidelity reads a weights file with full unpickling, so it gets an in-memory copy of the tensors
    that were already read safely, never the file itself.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3  # lazy: optional/heavy

    state, _ = read_weights(Path(path))
    buffer = io.BytesIO()
    torch.save({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, buffer)
    buffer.seek(0)
    try:
        net = NoTrainInceptionV3("inception-v3-compat", [str(_FEATURE_DIM)], buffer)  # type: ignore[arg-type]
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"'{path}' does not hold the FID Inception weights ({_WEIGHTS_NAME}): {first}") from None
    return net.to(device)


class InceptionFeatures:
    """2048-d FID Inception pool features of images, cached by pixel hash (an unedited model's images are
    featurized once for every method compared with them)."""

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 16):
        self.path = inception_weights_path(weights)
        self.device = str(device)
        self.batch_size = batch_size
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, images: Sequence[ImageLike]) -> torch.Tensor:
        pixels = uint8_images(images)
        keys = [image_key(p) for p in pixels]
        by_size: dict[tuple[int, ...], dict[str, Any]] = {}
        for k, p in zip(keys, pixels, strict=True):
            if k not in self._cache:
                by_size.setdefault(p.shape, {})[k] = p
        for todo in by_size.values():  # a batch holds images of one size; the network resizes to 299x299
            items = list(todo.items())
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                x = torch.from_numpy(np.stack([p for _, p in chunk])).permute(0, 3, 1, 2).to(self.device)
                feats = _inception(str(self.path), self.device)(x).double().cpu()
                for (k, _), f in zip(chunk, feats, strict=True):
                    self._cache[k] = f
        return torch.stack([self._cache[k] for k in keys]) if keys else torch.empty(0, _FEATURE_DIM)


class _Precomputed(torch.nn.Module):
    """The feature extractor handed to torchmetrics: the features are computed (and cached) beforehand."""

    num_features = _FEATURE_DIM

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _features(features: InceptionFeatures | None, weights: str | Path | None, device: str | torch.device) -> InceptionFeatures:
    return features if features is not None else InceptionFeatures(weights, device)


def fid(
    generated: Sequence[ImageLike],
    reference: Sequence[ImageLike],
    *,
    inception_weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    features: InceptionFeatures | None = None,
) -> dict[str, Any]:
    """torchmetrics' ``FrechetInceptionDistance`` on 2048-d Inception features (>= 2 images per side)."""
    net = _features(features, inception_weights, device)  # refuses before anything is imported or loaded
    from torchmetrics.image.fid import FrechetInceptionDistance  # lazy: optional/heavy

    metric = FrechetInceptionDistance(feature=_Precomputed())
    metric.update(net(reference), real=True)
    metric.update(net(generated), real=False)
    return {"value": float(metric.compute()), "n_generated": len(generated), "n_reference": len(reference)}


def kid(
    generated: Sequence[ImageLike],
    reference: Sequence[ImageLike],
    *,
    inception_weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    features: InceptionFeatures | None = None,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """torchmetrics' ``KernelInceptionDistance``: mean and std over ``subsets`` random subsets of
    ``min(subset_size, n_generated, n_reference)`` images each, drawn from a CPU generator seeded with ``seed``."""
    net = _features(features, inception_weights, device)  # refuses before anything is imported or loaded
    from torchmetrics.image.kid import KernelInceptionDistance  # lazy: optional/heavy

    size = min(subset_size, len(generated), len(reference))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {len(generated)} and {len(reference)}")
    with warnings.catch_warnings():  # its note on keeping every feature in memory: these are 2048-d vectors
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        metric = KernelInceptionDistance(feature=_Precomputed(), subsets=subsets, subset_size=size)
    metric.update(net(reference), real=True)
    metric.update(net(generated), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {
        "mean": float(mean),
        "std": float(std),
        "subsets": subsets,
        "subset_size": size,
        "seed": seed,
        "n_generated": len(generated),
        "n_reference": len(reference),
    }


def inception_settings(weights: str | Path | None = None) -> dict[str, Any]:
    """What results record about FID / KID: the weights file (path and SHA-256) and the implementations."""
    path = inception_weights_path(weights)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {
        "inception_weights": str(path),
        "sha256": digest.hexdigest(),
        "features": f"{_FEATURE_DIM}-d pool features of torch-fidelity {version('torch-fidelity')} InceptionV3 (FID network)",
        "implementations": {
            "fid": f"torchmetrics {version('torchmetrics')} FrechetInceptionDistance",
            "kid": f"torchmetrics {version('torchmetrics')} KernelInceptionDistance (degree 3, coef 1)",
        },
    }


# --------------------------------------------------------------------------------------------
# the group
# --------------------------------------------------------------------------------------------
class QualitySpec(StrictModel):
    """A bench's ``quality:``: FID / KID next to the CLIP score and FD-CLIP (which need no extra weights)."""

    fid: bool = Field(False, description="torchmetrics FID, edited vs unedited generations")
    kid: bool = Field(False, description="torchmetrics KID, edited vs unedited generations")
    inception_weights: str | None = Field(None, description=f"local FID Inception weights (default ${INCEPTION_ENV})")
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)

    @model_validator(mode="after")
    def _weights_present(self) -> QualitySpec:
        """Asking for FID / KID without the weights fails when the YAML is loaded, not after generating."""
        if self.fid or self.kid:
            inception_weights_path(self.inception_weights)
        return self

    def features(self, device: str | torch.device = "cpu") -> InceptionFeatures | None:
        """The shared Inception feature extractor when FID or KID is asked for, else None."""
        return InceptionFeatures(self.inception_weights, device) if (self.fid or self.kid) else None

    def settings(self) -> dict[str, Any]:
        """What results record: which of FID / KID ran and, when any did, the weights and implementations."""
        asked = {"fid": self.fid, "kid": self.kid}
        return {**asked, **inception_settings(self.inception_weights)} if (self.fid or self.kid) else asked

    def compute(
        self,
        generated: Sequence[ImageLike],
        reference: Sequence[ImageLike],
        *,
        features: InceptionFeatures | None = None,
        device: str | torch.device = "cpu",
    ) -> dict[str, Any]:
        """The requested ones of ``fid`` / ``kid`` (none: an empty dict), from one feature extractor."""
        out: dict[str, Any] = {}
        features = features or self.features(device)
        if self.fid:
            out["fid"] = fid(generated, reference, inception_weights=self.inception_weights, features=features)
        if self.kid:
            out["kid"] = kid(
                generated, reference, inception_weights=self.inception_weights, features=features,
                subsets=self.kid_subsets, subset_size=self.kid_subset_size,
            )
        return out


def quality(
    evaluator: Evaluator,
    images: Sequence[ImageLike],
    prompts: Sequence[str],
    reference: Sequence[ImageLike],
    *,
    fid: bool = False,
    kid: bool = False,
    inception_weights: str | Path | None = None,
) -> dict[str, Any]:
    """``images`` (generated from ``prompts``) against ``reference`` images: ``clip_score`` (with its
    convention and evaluator), ``fd_clip``, and ``fid`` / ``kid`` when asked (local weights only)."""
    features = InceptionFeatures(inception_weights, evaluator.device) if (fid or kid) else None
    spec = QualitySpec(fid=fid, kid=kid, inception_weights=None if features is None else str(features.path))
    return {
        "clip_score": clip_score(evaluator, images, prompts).to_dict(),
        "fd_clip": fd_clip(evaluator, images, reference),
        **spec.compute(images, reference, features=features),
    }
