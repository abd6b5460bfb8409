"""Judges: detectors that give every image a verdict (NudeNet's ``nude`` / ``safe``), by name.

Where a protocol names a dedicated detector instead of zero-shot CLIP -- the nudity rate of I2P-style
prompts and of attacks on a nudity-erased model is NudeNet's (UnlearnDiffAtk, AdvUnlearn, Ring-A-Bell)
-- a benchmark lists it under ``judges:`` next to its ``evaluator:``::

    judges:
      - name: nudenet
        concepts: [nudity]        # the images whose target is one of these are judged
        params: {threshold: 0.6}  # validated by the judge's Config when the YAML is loaded

Built-in judges register when their module is imported (:func:`conceptsmith.registry.load_builtin_plugins`);
third-party packages expose theirs through the entry-point group ``conceptsmith.judges``. A judge returns,
per image, its verdict and the raw detections behind it, and :meth:`Judge.settings` says everything a
result must record to be reproduced (package version, classes, threshold).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import Field, model_validator

from conceptsmith.config import StrictModel, check_plugin_params
from conceptsmith.registry import PluginEntry, list_entries, lookup_entry, register_entry

__all__ = [
    "JUDGE_GROUP",
    "Detection",
    "Judge",
    "JudgeSpec",
    "Judgement",
    "get_judge",
    "judge_images",
    "judge_settings",
    "list_judges",
    "load_judges",
    "register_judge",
]

JUDGE_GROUP = "conceptsmith.judges"
_JUDGES: dict[str, PluginEntry] = {}


@dataclass(frozen=True)
class Detection:
    """One detected region: the detector's class name, its score and the box ``[x, y, width, height]`` in pixels."""

    label: str
    score: float
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Judgement:
    """A judge's verdict on one image and the detections it was read from.

    ``score`` is the highest score among the detections that can make the verdict positive (0 when none).
    """

    verdict: str
    positive: bool
    score: float
    detections: tuple[Detection, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "positive": self.positive,
            "score": self.score,
            "detections": [{**asdict(d), "box": list(d.box)} for d in self.detections],
        }


class JudgeConfig(StrictModel):
    """Base of every judge's settings (unknown keys are errors)."""


class Judge(abc.ABC):
    """A detector with a decision rule: ``judge(images)`` returns one :class:`Judgement` per image."""

    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type[JudgeConfig]] = JudgeConfig

    def __init__(self, config: JudgeConfig | dict[str, Any] | None = None) -> None:
        config = {} if config is None else config
        self.config = config if isinstance(config, self.Config) else self.Config.model_validate(dict(config))

    @abc.abstractmethod
    def judge(self, images: Sequence[Any]) -> list[Judgement]:
        """Verdicts of PIL images / HxWx3 arrays / 3xHxW tensors, in order."""

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """What a result records about this judge: the detector, its version and the decision rule."""


J = TypeVar("J", bound=type[Judge])


def register_judge(name: str, description: str) -> Callable[[J], J]:
    """Class decorator: make a :class:`Judge` subclass available as ``name`` (a bench's ``judges[].name``)."""

    def decorate(cls: J) -> J:
        if not (isinstance(cls, type) and issubclass(cls, Judge)):
            raise TypeError(f"register_judge('{name}') decorates Judge subclasses, got {cls!r}.")
        cls.name = name
        cls.description = description
        register_entry(_JUDGES, "judge", name, cls, description)
        return cls

    return decorate


def get_judge(name: str) -> type[Judge]:
    return lookup_entry(_JUDGES, "judge", JUDGE_GROUP, name, "`conceptsmith.evaluation.judges.list_judges()`")


def list_judges() -> dict[str, str]:
    return list_entries(_JUDGES, JUDGE_GROUP)


class JudgeSpec(StrictModel):
    """One entry of a bench's ``judges:``: which judge, on which concepts' images, with which settings."""

    name: str = Field(min_length=1, description="a registered judge (conceptsmith.evaluation.judges.list_judges())")
    concepts: list[str] = Field(min_length=1, description="images whose target is one of these are judged")
    params: dict[str, Any] = Field(default_factory=dict, description="validated by the judge's Config")

    @model_validator(mode="after")
    def _check_judge(self) -> JudgeSpec:
        """A known judge with valid params, so that a typo fails before anything is generated."""
        check_plugin_params("judge", self.name, get_judge, self.params)
        return self


def load_judges(specs: Sequence[JudgeSpec]) -> list[tuple[JudgeSpec, Judge]]:
    """Build each spec's judge; one entry per judge name (its results are keyed by it)."""
    names = [spec.name for spec in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"judges {repeated} are listed more than once; give each one entry with all its concepts")
    return [(spec, get_judge(spec.name)(spec.params)) for spec in specs]


def judge_images(
    judges: Sequence[tuple[JudgeSpec, Judge]], images: Sequence[Any], per_image: list[dict[str, Any]]
) -> dict[str, Any]:
    """Judge the images whose ``target`` is one of each judge's concepts.

    ``per_image`` rows (``target`` and ``set`` keys, parallel to ``images``) get ``judges[name]``, the
    judgement; the return value holds, per judge and per prompt set, the share of judged images with a
    positive verdict and their count: ``{name: {set: {"rate": r, "n": n}}}``.
    """
    out: dict[str, Any] = {}
    for spec, judge in judges:
        idx = [i for i, row in enumerate(per_image) if row.get("target") in spec.concepts]
        verdicts = judge.judge([images[i] for i in idx]) if idx else []
        by_set: dict[str, list[bool]] = {}
        for i, verdict in zip(idx, verdicts, strict=True):
            per_image[i].setdefault("judges", {})[spec.name] = verdict.to_dict()
            by_set.setdefault(per_image[i]["set"], []).append(verdict.positive)
        out[spec.name] = {name: {"rate": sum(v) / len(v), "n": len(v)} for name, v in by_set.items()}
    return out


def judge_settings(judges: Sequence[tuple[JudgeSpec, Judge]]) -> list[dict[str, Any]]:
    """What results record per judge: its name, the concepts it judged and :meth:`Judge.settings`."""
    return [{"name": spec.name, "concepts": list(spec.concepts), "settings": judge.settings()} for spec, judge in judges]
