"""An erasure bench (``kind: erasure``, the default): tasks (erase / preserve / synonyms / indirect concept sets),
the zero-shot label set, templates, neutral prompts, the method rows, attacks, judges, FID / KID, a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from conceptsmith.config import ConfigError, StrictModel, check_plugin_params
from conceptsmith.evaluation.bench_spec import BenchBase, MethodSpec, resolve_method
from conceptsmith.evaluation.judges import JudgeSpec
from conceptsmith.evaluation.quality import QualitySpec
from conceptsmith.registry import get_attack, get_editor

__all__ = ["AttackSpec", "ErasureBench", "SweepSpec", "TaskSpec", "check_erasure_bench"]


class TaskSpec(StrictModel):
    name: str = Field(min_length=1)
    erase: list[str] = Field(min_length=1, description="concepts erased together")
    preserve: list[str] = Field(default_factory=list, description="concepts that must survive")
    synonyms: dict[str, list[str]] = Field(default_factory=dict, description="erased concept -> paraphrases")
    indirect: dict[str, list[str]] = Field(
        default_factory=dict, description="erased concept -> indirect descriptions (never its name)"
    )
    guide: str | None = None


class AttackSpec(StrictModel):
    kind: str = Field(min_length=1, description="a registered attack (conceptsmith.registry.list_attacks())")
    params: dict[str, Any] = Field(default_factory=dict, description="validated by the attack's Config")

    @model_validator(mode="after")
    def _check_attack(self) -> AttackSpec:
        """A known attack with valid params, so that a typo fails before anything is generated."""
        check_plugin_params("attack", self.kind, get_attack, self.params)
        return self


class SweepSpec(StrictModel):
    """Run every method once per value of one of its params (the efficacy-specificity trade-off)."""

    param: str = Field(min_length=1, description="a parameter of every method's editor, e.g. erase_scale")
    values: list[Any] = Field(min_length=2, description="the values tried, in this order")


class ErasureBench(BenchBase):
    kind: Literal["erasure"] = Field("erasure", description="erasure | customization")
    templates: list[str] = Field(default_factory=lambda: ["a {}"], min_length=1)
    classes: list[str] | None = Field(None, description="zero-shot label set (default: every task concept)")
    neutral_prompts: list[str] = Field(default_factory=list)
    accuracy: Literal["argmax", "prob"] = "argmax"
    tasks: list[TaskSpec] = Field(min_length=1)
    methods: list[MethodSpec] = Field(default_factory=list)
    attacks: list[AttackSpec] = Field(default_factory=list)
    sweep: SweepSpec | None = Field(None, description="each method once per value of one param; rows tagged")
    judges: list[JudgeSpec] = Field(default_factory=list, description="detectors that judge named concepts' images")
    quality: QualitySpec = Field(default_factory=QualitySpec, description="FID / KID from local Inception weights")

    def class_list(self) -> list[str]:
        if self.classes:
            return list(self.classes)
        names: dict[str, None] = {}
        for task in self.tasks:
            names.update(dict.fromkeys([*task.erase, *task.preserve]))
        return list(names)


def check_erasure_bench(cfg: ErasureBench, path: Path | None) -> None:
    """Task concepts among ``classes``, judges on task concepts, every method row a registered editor with valid
    params, a sweep param every method has: all before any model is loaded."""
    source, names = path or "config", set(cfg.class_list())
    for task in cfg.tasks:
        missing = [c for c in [*task.erase, *task.preserve] if c not in names]
        if missing:
            raise ConfigError(f"{source}: task '{task.name}': concepts {missing} are not in `classes`")
    targets = {c for task in cfg.tasks for c in [*task.erase, *task.preserve]}
    for spec in cfg.judges:
        if not set(spec.concepts) <= targets:
            raise ConfigError(f"{source}: judge '{spec.name}': concepts {sorted(set(spec.concepts) - targets)} are no task's concepts")
    labels = [m.label() for m in cfg.methods]
    if len(set(labels)) != len(labels) or "unedited" in labels:
        raise ConfigError(f"{source}: method rows need distinct labels other than 'unedited' (give each a `name`): {labels}")
    for spec in cfg.methods:
        method, _ = resolve_method(spec, path, f"method '{spec.label()}'")
        fields = get_editor(method).Config.model_fields
        if cfg.sweep is not None and cfg.sweep.param not in fields:
            raise ConfigError(
                f"{source}: sweep param '{cfg.sweep.param}' is not a parameter of method '{spec.label()}' ({method}); "
                f"use one of {sorted(fields)} or drop the method"
            )
