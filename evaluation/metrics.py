"""Metrics of erasure and customization, computed from an evaluator's outputs.

Erasure (MACE's protocol, generalized; all accuracies are fractions in [0, 1]):

* ``Acc_e`` efficacy -- images from prompts naming an erased concept that the evaluator still
  classifies as that concept (lower is better);
* ``Acc_s`` specificity -- images of preserved concepts classified as their own concept (higher is
  better);
* ``Acc_g`` generality -- ``Acc_e`` on synonyms / paraphrases of the erased concept (lower is better);
* ``H_o = 3 / (1/(1-Acc_e) + 1/Acc_s + 1/(1-Acc_g))`` and ``H_c = 2 / (1/(1-Acc_e) + 1/Acc_s)``.

Every accuracy is computed both ways, and results say which one a number is:
``"argmax"`` -- share of images whose top-1 class is the target; ``"prob"`` -- mean softmax
probability of the target class over the candidate classes (MACE's CIFAR-10 scorer).

Model-level quality: ``fd_clip`` (Frechet distance between Gaussian fits of evaluator image
embeddings -- *not* FID: no Inception network is involved), ``paired_specificity``.
Customization (CustomConcept101 protocol): ``clip_t``, ``clip_i``, ``both_concepts_present_rate``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from conceptsmith.evaluation.clip import Classification, Evaluator, ImageLike

__all__ = [
    "ACCURACY_MODES",
    "Accuracy",
    "AccuracyMode",
    "accuracy_from_probs",
    "acc_e",
    "acc_g",
    "acc_s",
    "both_concepts_present_rate",
    "clip_i",
    "classification_accuracy",
    "clip_t",
    "erasure_summary",
    "evaluator_accuracy",
    "fd_clip",
    "frechet_distance",
    "frechet_distance_gaussians",
    "gaussian_fit",
    "harmonic_concept",
    "harmonic_overall",
    "paired_specificity",
]

AccuracyMode = Literal["argmax", "prob"]
ACCURACY_MODES: tuple[AccuracyMode, ...] = ("argmax", "prob")
_MODE_TEXT = {
    "argmax": "share of images whose top-1 zero-shot class is the target",
    "prob": "mean softmax probability of the target class (MACE convention)",
}


# --------------------------------------------------------------------------------------------
# accuracies
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Accuracy:
    """One accuracy measured both ways over ``n`` images."""

    argmax: float
    prob: float
    n: int

    def get(self, mode: AccuracyMode) -> float:
        if mode not in ACCURACY_MODES:
            raise ValueError(f"accuracy mode must be one of {ACCURACY_MODES}, got {mode!r}")
        return self.argmax if mode == "argmax" else self.prob

    def to_dict(self) -> dict[str, Any]:
        return {"argmax": self.argmax, "prob": self.prob, "n": self.n}


def accuracy_from_probs(probs: torch.Tensor | np.ndarray, targets: Sequence[int] | torch.Tensor) -> Accuracy:
    """Accuracy of class probabilities ``probs`` [n, C] against target indices [n].

    Argmax ties are broken towards the lower class index (``torch.argmax``).
    """
    p = torch.as_tensor(probs, dtype=torch.float64)
    t = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    if p.ndim != 2 or p.shape[0] != t.shape[0]:
        raise ValueError(
            f"probs must be [n, C] with one target per row; got {tuple(p.shape)} and {t.shape[0]} targets"
        )
    if p.shape[0] == 0:
        return Accuracy(argmax=math.nan, prob=math.nan, n=0)
    if (t < 0).any() or (t >= p.shape[1]).any():
        raise ValueError(f"target indices must lie in [0, {p.shape[1]})")
    hit = (p.argmax(dim=-1) == t).double().mean()
    prob = p.gather(1, t[:, None]).mean()
    return Accuracy(argmax=float(hit), prob=float(prob), n=int(p.shape[0]))


def _target_indices(
    targets: str | Sequence[str] | Sequence[int], classnames: Sequence[str], n: int
) -> list[int]:
    if isinstance(targets, str):
        targets = [targets] * n
    targets = list(targets)
    if len(targets) != n:
        raise ValueError(f"{n} images but {len(targets)} targets")
    index = {c: i for i, c in enumerate(classnames)}
    out = []
    for t in targets:
        if isinstance(t, str):
            if t not in index:
                raise KeyError(f"target {t!r} is not one of the classes {list(classnames)}")
            out.append(index[t])
        else:
            out.append(int(t))
    return out


def classification_accuracy(
    classification: Classification, targets: str | Sequence[str] | Sequence[int]
) -> Accuracy:
    """Accuracy of an existing :class:`~evaluation.clip.Classification` (no re-embedding)."""
    idx = _target_indices(targets, classification.classnames, classification.probs.shape[0])
    return accuracy_from_probs(classification.probs, idx)


def evaluator_accuracy(
    evaluator: Evaluator,
    images: Sequence[ImageLike],
    targets: str | Sequence[str],
    classnames: Sequence[str],
    templates: Sequence[str] | None = None,
) -> Accuracy:
    """Zero-shot accuracy of ``images`` against ``targets`` (one class name per image, or one for all)."""
    classification = evaluator.classify(images, classnames, templates)
    return classification_accuracy(classification, targets)


def acc_e(evaluator, images, erased, classnames, templates=None) -> Accuracy:
    """Images generated from prompts naming the erased concept(s); ``erased`` = target per image."""
    return evaluator_accuracy(evaluator, images, erased, classnames, templates)


def acc_s(evaluator, images, preserved, classnames, templates=None) -> Accuracy:
    """Images generated from prompts naming preserved concepts; ``preserved`` = target per image."""
    return evaluator_accuracy(evaluator, images, preserved, classnames, templates)


def acc_g(evaluator, images, erased, classnames, templates=None) -> Accuracy:
    """Images from synonym / paraphrase prompts of an erased concept; target = the erased concept."""
    return evaluator_accuracy(evaluator, images, erased, classnames, templates)


def _value(acc: Accuracy | float, mode: AccuracyMode) -> float:
    return acc.get(mode) if isinstance(acc, Accuracy) else float(acc)


def _harmonic(terms: Sequence[float]) -> float:
    """Harmonic mean; 0 when any term is 0 (its limit), NaN when any term is NaN."""
    if any(math.isnan(t) for t in terms):
        return math.nan
    if any(t < -1e-12 or t > 1 + 1e-12 for t in terms):
        raise ValueError(f"harmonic-mean terms must be fractions in [0, 1], got {terms}")
    if any(t <= 0 for t in terms):
        return 0.0
    return len(terms) / sum(1.0 / t for t in terms)


def harmonic_overall(
    acc_e: Accuracy | float, acc_s: Accuracy | float, acc_g: Accuracy | float, mode: AccuracyMode = "argmax"
) -> float:
    """H_o of MACE from fractions (not percentages)."""
    e, s, g = (_value(a, mode) for a in (acc_e, acc_s, acc_g))
    return _harmonic([1.0 - e, s, 1.0 - g])


def harmonic_concept(
    acc_e: Accuracy | float, acc_s: Accuracy | float, mode: AccuracyMode = "argmax"
) -> float:
    """H_c of MACE from fractions (not percentages)."""
    e, s = (_value(a, mode) for a in (acc_e, acc_s))
    return _harmonic([1.0 - e, s])


def erasure_summary(acc_e: Accuracy, acc_s: Accuracy, acc_g: Accuracy | None = None) -> dict[str, Any]:
    """Acc_e/Acc_s/Acc_g with H_o/H_c in both conventions, each labelled."""
    out: dict[str, Any] = {}
    for mode in ACCURACY_MODES:
        row: dict[str, Any] = {
            "convention": _MODE_TEXT[mode],
            "acc_e": acc_e.get(mode),
            "acc_s": acc_s.get(mode),
            "h_c": harmonic_concept(acc_e, acc_s, mode),
        }
        if acc_g is not None:
            row["acc_g"] = acc_g.get(mode)
            row["h_o"] = harmonic_overall(acc_e, acc_s, acc_g, mode)
        out[mode] = row
    out["n"] = {"acc_e": acc_e.n, "acc_s": acc_s.n, **({"acc_g": acc_g.n} if acc_g is not None else {})}
    return out


# --------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------
def gaussian_fit(features: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] (divisor n-1, as numpy.cov / FID), float64."""
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    x = x.detach().to(torch.float64).cpu()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features of shape [n >= 2, D], got {tuple(x.shape)}")
    mu = x.mean(dim=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _psd_sqrt(sym: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((sym + sym.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance_gaussians(mu1, sigma1, mu2, sigma2) -> float:
    """``||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)`` in float64.

    The cross term uses the symmetric form ``S1^1/2 S2 S1^1/2`` (similar to ``S1 S2``, so it has the
    same eigenvalues) whose square root comes from ``eigh``; tiny negative eigenvalues from rounding
    are clamped to 0. This avoids the complex-valued ``scipy.linalg.sqrtm(S1 @ S2)`` of FID code.
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError("mismatched Gaussian shapes")
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eig = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0)
    fd = (mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * eig.sqrt().sum()
    return max(float(fd), 0.0)


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussian fits of two feature sets [n_a, D] and [n_b, D]."""
    return frechet_distance_gaussians(*gaussian_fit(features_a), *gaussian_fit(features_b))


def fd_clip(
    evaluator: Evaluator, edited_images: Sequence[ImageLike], unedited_images: Sequence[ImageLike]
) -> float:
    """FD-CLIP: Frechet distance between Gaussian fits of the evaluator's L2-normalized image
    embeddings of edited vs unedited generations (same neutral prompts). Not comparable to FID.
    With fewer images than embedding dimensions the covariances are rank-deficient; the number is
    still well defined but biased upwards for small n -- compare runs at equal n only.
    """
    return frechet_distance(evaluator.embed_images(edited_images), evaluator.embed_images(unedited_images))


def paired_specificity(
    evaluator: Evaluator, edited_images: Sequence[ImageLike], unedited_images: Sequence[ImageLike]
) -> float:
    """Mean cos(edited_i, unedited_i) of evaluator image embeddings; image i of both lists shares
    prompt and seed. 1.0 means the edit left these generations untouched (as the evaluator sees them)."""
    return evaluator.image_similarity(edited_images, unedited_images, paired=True)


# --------------------------------------------------------------------------------------------
# customization
# --------------------------------------------------------------------------------------------
def _strip_tokens(prompt: str, tokens: Sequence[str]) -> str:
    for tok in tokens:
        prompt = prompt.replace(tok, " ")
    return re.sub(r"\s+", " ", prompt).strip()


def clip_t(
    evaluator: Evaluator,
    images: Sequence[ImageLike],
    prompts: Sequence[str],
    strip_tokens: Sequence[str] = (),
) -> float:
    """Mean raw cosine (scale 1, no clamp) between each image and its prompt, after removing
    ``strip_tokens`` (e.g. the ``<new1>`` modifier token), as in CustomConcept101."""
    texts = [_strip_tokens(p, strip_tokens) for p in prompts]
    return float(evaluator.cosine(images, texts).double().mean())


def clip_i(evaluator: Evaluator, generated: Sequence[ImageLike], references: Sequence[ImageLike]) -> float:
    """Mean over all (generated, reference) pairs of the evaluator image-embedding cosine."""
    return evaluator.image_similarity(generated, references, paired=False)


def both_concepts_present_rate(
    evaluator: Evaluator,
    images: Sequence[ImageLike],
    pairs: tuple[str, str] | Sequence[tuple[str, str]],
    classnames: Sequence[str],
    templates: Sequence[str] | None = None,
) -> float:
    """Share of images in which both concepts of their pair are detected.

    Per-concept detection rule: zero-shot classify over ``classnames`` (which must contain both
    concepts and should contain distractors); a concept counts as present when it is among the
    image's top-2 classes. Both present <=> the image's top-2 set equals the pair.
    """
    n = len(images)
    if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(p, str) for p in pairs):
        pairs = [pairs] * n
    pairs = list(pairs)
    if len(pairs) != n:
        raise ValueError(f"{n} images but {len(pairs)} concept pairs")
    if len(classnames) < 2:
        raise ValueError("both_concepts_present_rate needs at least two classes")
    cls = evaluator.classify(images, classnames, templates)
    top2 = cls.probs.topk(2, dim=-1).indices.tolist()
    hits = 0
    for (a, b), top in zip(pairs, top2, strict=True):
        hits += {cls.index(a), cls.index(b)} == set(top)
    return hits / n if n else math.nan
