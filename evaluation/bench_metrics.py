"""The benchmark metrics: registered specs (:func:`conceptsmith.registry.register_metric`) that a bench names in
its ``metrics:`` list and the engine calls on every row of a section they read.

A metric is ``compute(ctx) -> value | None``: ``ctx`` is the row's :class:`ErasureRow` (section ``erasure``) or
:class:`CustomRow` (``single``, ``composition``, ``relearn``); ``None`` leaves the metric out of the row (no
synonym prompts, no preserved concept, ...). Contexts compute what several metrics share (the zero-shot
classification of the row's images, the images themselves) once; ``ctx.value(name)`` gives another metric's
value of the same row, so derived metrics (``h_o``) read the accuracies they combine.

Adding a metric is one module (a function with the decorator, in an installed plugin package or among
``conceptsmith.evaluation``'s modules) and one line in the bench's ``metrics:``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from PIL import Image

from conceptsmith.evaluation.cache import load_images
from conceptsmith.evaluation.metrics import (
    ACCURACY_MODES,
    accuracy_from_probs,
    both_concepts_present_rate,
    clip_i,
    clip_t,
    evaluator_accuracy,
    fd_clip,
    harmonic_concept,
    harmonic_overall,
    paired_specificity,
)
from conceptsmith.evaluation.providers import get_presence_rule
from conceptsmith.registry import Metric, get_metric, register_metric

__all__ = ["CustomRow", "ErasureRow", "ImageRecord", "RowContext", "compute_metrics", "metric_specs", "relative"]


def relative(value: float, baseline: float) -> float:
    """``value / baseline`` (NaN for a zero or NaN baseline): the ``*_rel`` normalizations."""
    return value / baseline if baseline and not math.isnan(baseline) else math.nan


@dataclass(frozen=True)
class ImageRecord:
    """One generated image of a row: its prompt (``None`` for embeddings), the prompt set (``erase``,
    ``synonym``, ``indirect``, ``preserve``, ``neutral``; customization: ``generated``), the class the judge should
    (erase sets: should no longer) see, the seed and the cached file."""

    prompt: str | None
    set: str
    target: str | None
    seed: int
    path: Path


@dataclass
class RowContext:
    """What every metric of a row sees: the section, the evaluator, the zero-shot label set and templates, and
    the row's images; ``values`` collects the metrics computed so far."""

    section: str
    evaluator: Any
    classes: list[str]
    templates: list[str]
    records: list[ImageRecord]
    values: dict[str, Any] = field(default_factory=dict)
    _names: tuple[str, ...] = ()

    @cached_property
    def images(self) -> list[Image.Image]:
        return load_images([r.path for r in self.records])

    def value(self, name: str) -> Any:
        """Metric ``name`` of this row (computed now if it was not, whether or not the bench lists it)."""
        if name not in self.values:
            self.values[name] = get_metric(name).compute(self)
        return self.values[name]


@dataclass
class ErasureRow(RowContext):
    """An erasure row: ``baseline`` maps (prompt, seed) to the unedited model's image; ``quality`` is the bench's
    FID / KID spec with its shared Inception features."""

    baseline: dict[tuple[str, int], Path] = field(default_factory=dict)
    quality: Any = None
    inception: Any = None

    @cached_property
    def classification(self) -> Any:
        return self.evaluator.classify(self.images, self.classes, self.templates)

    def accuracy(self, prompt_set: str) -> dict[str, float] | None:
        """Both accuracy conventions over the images of ``prompt_set`` (None without such images)."""
        idx = [i for i, r in enumerate(self.records) if r.set == prompt_set and r.target in self.classes]
        if not idx:
            return None
        targets = [self.classes.index(self.records[i].target) for i in idx]
        return accuracy_from_probs(self.classification.probs[idx], targets).to_dict()

    def pairs(self, sets: Sequence[str]) -> tuple[list[Image.Image], list[Image.Image]]:
        """The row's images of ``sets`` and the unedited model's images of the same prompts and seeds."""
        idx = [i for i, r in enumerate(self.records) if r.set in sets]
        base = load_images([self.baseline[(self.records[i].prompt, self.records[i].seed)] for i in idx])
        return [self.images[i] for i in idx], base


@dataclass
class CustomRow(RowContext):
    """A customization row: ``texts`` are the images' prompts as the judge reads them (``None``: no prompt, the
    conditioning ceiling), ``tokens`` the new tokens stripped from them; ``references`` the training references
    and ``reference_norm`` their CLIP-I against an independent set; ``clip_t_base`` the unedited model's CLIP-T;
    ``pair`` and ``presence`` (a registered presence rule) the composed concepts; ``prompts_per_group`` groups
    the images by composition prompt; ``relearned`` the erased shape."""

    texts: list[str] | None = None
    tokens: list[str] = field(default_factory=list)
    references: list[Path] = field(default_factory=list)
    reference_norm: float | None = None
    clip_t_base: float | None = None
    pair: tuple[str, str] | None = None
    presence: str = "top2"
    prompt_groups: list[str] = field(default_factory=list)
    relearned: str | None = None

    @cached_property
    def reference_images(self) -> list[Image.Image]:
        return load_images(self.references)


def metric_specs(names: Sequence[str]) -> list[Metric]:
    """The registered specs of ``names`` (unknown names fail, listing the known ones)."""
    return [get_metric(n) for n in names]


def compute_metrics(ctx: RowContext, names: Sequence[str]) -> dict[str, Any]:
    """The listed metrics that read ``ctx.section`` and have a value for this row, in the listed order."""
    out: dict[str, Any] = {}
    for spec in metric_specs(names):
        if ctx.section in spec.sections:
            value = ctx.value(spec.name)
            if value is not None:
                out[spec.name] = value
    return out


# ============================================================================================
# erasure (MACE's protocol, generalized: evaluation.metrics)
# ============================================================================================
def _accuracy_metric(name: str, prompt_set: str, lower: bool, what: str) -> None:
    register_metric(name, f"{what}: share of images classified as their target (argmax) and mean target "
                    "probability (prob)", higher_is_better=not lower)(lambda ctx: ctx.accuracy(prompt_set))  # fmt: skip


_accuracy_metric("acc_e", "erase", True, "Efficacy Acc_e on prompts naming an erased concept")
_accuracy_metric("acc_g", "synonym", True, "Generality Acc_g on paraphrases of an erased concept")
_accuracy_metric("acc_i", "indirect", True, "Acc_i on indirect descriptions of an erased concept")
_accuracy_metric("acc_s", "preserve", False, "Specificity Acc_s on preserved concepts")


@register_metric("h_c", "Concept harmonic mean 2/(1/(1-Acc_e)+1/Acc_s) (MACE)", higher_is_better=True)
def _h_c(ctx: ErasureRow) -> dict[str, float] | None:
    e, s = ctx.value("acc_e"), ctx.value("acc_s")
    return None if e is None or s is None else {m: harmonic_concept(e[m], s[m]) for m in ACCURACY_MODES}


@register_metric("h_o", "Overall harmonic mean 3/(1/(1-Acc_e)+1/Acc_s+1/(1-Acc_g)) (MACE)", higher_is_better=True)
def _h_o(ctx: ErasureRow) -> dict[str, float] | None:
    e, s, g = ctx.value("acc_e"), ctx.value("acc_s"), ctx.value("acc_g")
    if e is None or s is None or g is None:
        return None
    return {m: harmonic_overall(e[m], s[m], g[m]) for m in ACCURACY_MODES}


SPECIFICITY_SETS = ("preserve", "neutral")


@register_metric("paired_specificity", "Mean evaluator cosine between edited and unedited images of the same preserve "
                 "or neutral prompt and seed", higher_is_better=True)  # fmt: skip
def _paired_specificity(ctx: ErasureRow) -> float | None:
    edited, base = ctx.pairs(SPECIFICITY_SETS)
    return paired_specificity(ctx.evaluator, edited, base) if edited else None


@register_metric("fd_clip", "Frechet distance of L2-normalized evaluator image embeddings, edited vs unedited "
                 "(preserve and neutral prompts; not FID)", higher_is_better=False)  # fmt: skip
def _fd_clip(ctx: ErasureRow) -> float | None:
    edited, base = ctx.pairs(SPECIFICITY_SETS)
    return fd_clip(ctx.evaluator, edited, base) if len(edited) >= 2 else None


def _quality(ctx: ErasureRow, name: str) -> dict[str, Any] | None:
    if ctx.quality is None or not getattr(ctx.quality, name):
        return None
    edited, base = ctx.pairs(SPECIFICITY_SETS)
    if len(edited) < 2:
        return None
    return ctx.quality.compute(edited, base, features=ctx.inception)[name]


@register_metric("fid", "FID (torchmetrics) edited vs unedited; with the bench's quality: {fid: true} and local "
                 "Inception weights", higher_is_better=False, aggregation="none")  # fmt: skip
def _fid(ctx: ErasureRow) -> dict[str, Any] | None:
    return _quality(ctx, "fid")


@register_metric("kid", "KID (torchmetrics) edited vs unedited; with the bench's quality: {kid: true} and local "
                 "Inception weights", higher_is_better=False, aggregation="none")  # fmt: skip
def _kid(ctx: ErasureRow) -> dict[str, Any] | None:
    return _quality(ctx, "kid")


@register_metric("clip_score", "CLIP score on preserve prompts, torchmetrics convention: mean of max(100 cos, 0)",
                 higher_is_better=True, aggregation="none")  # fmt: skip
def _clip_score(ctx: ErasureRow) -> dict[str, Any] | None:
    idx = [i for i, r in enumerate(ctx.records) if r.set == "preserve"]
    if not idx:
        return None
    score = ctx.evaluator.clip_score([ctx.images[i] for i in idx], [ctx.records[i].prompt for i in idx])
    return {"mean": score.mean, "scale": score.scale, "clamp_min": score.clamp_min}


#: A bench's metrics when it names none.
ERASURE_METRICS = ("acc_e", "acc_g", "acc_i", "acc_s", "h_c", "h_o", "paired_specificity", "fd_clip", "fid", "kid",
                   "clip_score")  # fmt: skip


# ============================================================================================
# customization (CustomConcept101's protocol: evaluation.metrics)
# ============================================================================================
@register_metric("clip_i", "CLIP-I: mean evaluator cosine over all (generation, training reference) pairs",
                 higher_is_better=True, sections=("single",))  # fmt: skip
def _clip_i(ctx: CustomRow) -> float:
    return clip_i(ctx.evaluator, ctx.images, ctx.reference_images)


@register_metric("clip_i_ref", "CLIP-I of the references against an independent reference set (the normalizer)",
                 higher_is_better=True, aggregation="none", sections=("single",))  # fmt: skip
def _clip_i_ref(ctx: CustomRow) -> float | None:
    return ctx.reference_norm


@register_metric("clip_i_rel", "clip_i / clip_i_ref", higher_is_better=True, sections=("single",))
def _clip_i_rel(ctx: CustomRow) -> float:
    return relative(ctx.value("clip_i"), ctx.reference_norm)


@register_metric("clip_t", "CLIP-T: mean evaluator image-text cosine, the new tokens removed from the prompt",
                 higher_is_better=True, sections=("single", "composition"))  # fmt: skip
def _clip_t(ctx: CustomRow) -> float | None:
    return None if ctx.texts is None else clip_t(ctx.evaluator, ctx.images, ctx.texts, strip_tokens=ctx.tokens)


@register_metric("clip_t_base", "CLIP-T of the unedited model on the same prompts without the new tokens",
                 higher_is_better=True, aggregation="none", sections=("single", "composition"))  # fmt: skip
def _clip_t_base(ctx: CustomRow) -> float | None:
    return None if ctx.texts is None else ctx.clip_t_base


@register_metric("clip_t_rel", "clip_t / clip_t_base", higher_is_better=True, sections=("single", "composition"))
def _clip_t_rel(ctx: CustomRow) -> float | None:
    return None if ctx.texts is None else relative(ctx.value("clip_t"), ctx.clip_t_base)


def presence_rate(ctx: CustomRow, rule: str, images: list[Image.Image]) -> float:
    """Share of ``images`` where both concepts of ``ctx.pair`` are detected by the presence rule ``rule``."""
    return get_presence_rule(rule)(ctx.evaluator, images, ctx.pair, ctx.classes, ctx.templates)


@register_metric("both_present", "Share of composition images where both concepts are detected (the bench's "
                 "presence rule)", higher_is_better=True, sections=("composition",))  # fmt: skip
def _both_present(ctx: CustomRow) -> float:
    return presence_rate(ctx, ctx.presence, ctx.images)


@register_metric("both_present_top2", "both_present by the top2 rule (both concepts among the top-2 classes)",
                 higher_is_better=True, aggregation="none", sections=("composition",))  # fmt: skip
def _both_present_top2(ctx: CustomRow) -> float:
    return both_concepts_present_rate(ctx.evaluator, ctx.images, ctx.pair, ctx.classes, ctx.templates)


@register_metric("both_present_halves", "both_present by the halves rule (left and right halves, one concept "
                 "each)", higher_is_better=True, aggregation="none", sections=("composition",))  # fmt: skip
def _both_present_halves(ctx: CustomRow) -> float:
    return presence_rate(ctx, "halves", ctx.images)


@register_metric("both_present_by_prompt", "both_present per composition prompt", higher_is_better=True,
                 aggregation="none", sections=("composition",))  # fmt: skip
def _both_present_by_prompt(ctx: CustomRow) -> dict[str, float]:
    n = len(ctx.images) // max(len(ctx.prompt_groups), 1)
    return {t: presence_rate(ctx, ctx.presence, ctx.images[i * n : (i + 1) * n]) for i, t in enumerate(ctx.prompt_groups)}


@register_metric("relearn_rate", "Share of images whose top-1 zero-shot class is the erased shape",
                 higher_is_better=False, sections=("relearn",))  # fmt: skip
def _relearn_rate(ctx: CustomRow) -> float:
    return evaluator_accuracy(ctx.evaluator, ctx.images, ctx.relearned, ctx.classes, ctx.templates).argmax


#: A customization bench's metrics when it names none.
CUSTOM_METRICS = ("clip_i", "clip_i_ref", "clip_i_rel", "clip_t", "clip_t_base", "clip_t_rel", "both_present",
                  "both_present_top2", "both_present_halves", "both_present_by_prompt", "relearn_rate")  # fmt: skip
