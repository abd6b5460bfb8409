"""Customization benchmark runner (compositions and the relearning audit): a ``kind: customization`` YAML under
``configs/bench/`` -> reference images -> trained / merged / composed edits -> generations ->
CLIP-I / CLIP-T / both-present / relearning -> ``results.json`` + report.

Protocol (CustomConcept101, Kumari et al. 2023, adapted to ShapesWorld):

* **references**: per concept, ``n_reference`` renders of a ShapesWorld novel object
  (:func:`conceptsmith.world.render.reference_set`, seed ``reference_seed``) or a folder of images;
  a second, independent set (seed ``holdout_seed``; for a folder: its second half against its
  first half) only serves the CLIP-I normalizer;
* **single concept** (every method row, one edit per concept): prompts ``template.format(phrase)``
  with ``phrase = "<tok> class_word"``;
  ``clip_i`` = mean evaluator cosine over all (generation, reference) pairs
  (:func:`evaluation.metrics.clip_i`), ``clip_i_rel = clip_i / clip_i(references, held-out references)``;
  ``clip_t`` = mean evaluator image-text cosine with the token removed from the prompt
  (:func:`evaluation.metrics.clip_t`), ``clip_t_rel = clip_t / clip_t`` of the unedited model
  prompted with the same prompts without the token. The summary averages each metric over the
  concepts (``clip_i_rel`` is the mean of the per-concept ratios);
* **conditioning ceiling** (optional, ``ceiling:``): per concept, the whole conditioning inverted on the
  references (:func:`customization.conditioning_ceiling.invert_conditioning`), one image per seed,
  ``clip_i`` / ``clip_i_rel`` only (there is no prompt): what textual inversion could reach at most;
* **composition** (every pair of concepts, prompts such as ``"{a} next to {b}"``): ``joint`` trains
  one run on both concepts, ``merge`` combines the single-concept edits of a method row
  (:func:`customization.merge.merge`: closed-form, lora-sum, ...), ``hook`` puts a training-free
  editor (t2i-zero, a-star) on top of another composition. ``both_present`` is the share of images
  with both concepts detected by the rule ``presence``: ``top2`` =
  :func:`evaluation.metrics.both_concepts_present_rate` on the whole image, ``halves`` = the left and
  right halves (:func:`conceptsmith.world.check.object_crop`) are classified as the two concepts, one each.
  Both rules are recorded per row; the summary's ``both_present`` is the configured one;
* **relearning** (optional): erase a ShapesWorld shape with each of the ``relearn.erase`` methods, then
  customize every erased model with a new token on renders of that shape; ``relearn_rate`` = share of
  images classified as the erased shape for the unedited and each erased model (prompted with the
  shape's name) and for each erased + customized model after each of ``relearn.checkpoints`` training
  steps (prompted with the new token). The checkpoints are one run per erasure: each count continues
  the previous count's training checkpoint (under ``<cache>/<base fingerprint>/checkpoints/``; exact: the
  loop re-seeds every step), so the edit at a count equals, and is cached as, a run of that many steps.
  ``steps_to_50`` (:func:`steps_to_rate`) is the interpolated step count at which the rate first reaches
  0.5, the erased model counting as 0 steps.

The unedited model is always a row. Edits are cached under ``<cache>/<base fingerprint>/edits/`` by a
digest of (base fingerprint, method, params, tokens, reference image bytes, seed), generations by
:class:`evaluation.bench.Generator`; a re-run trains and generates only what is new. Runs in one
process (training is not sharded)::

    conceptsmith bench configs/bench/shapes-custom-single.yaml --out runs/custom-single
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from conceptsmith.customization.conditioning_ceiling import CeilingConfig
from conceptsmith.customization.merge import MERGE_METHODS
from conceptsmith.evaluation.bench import (
    GenerationConfig,
    Generator,
    MethodSpec,
    TaskSpec,
    compute_once,
    digest,
    edit_digest,
    fit_edit,
    load_for_processes,
    load_images,
    method_config,
    resolve_bench_path,
    resolve_path,
)
from conceptsmith.evaluation.custom_report import summary_table, write_custom_report
from conceptsmith.evaluation.report_parts import run_record
from PIL import Image
from pydantic import Field, field_validator, model_validator

from conceptsmith.config import DEVICE_PATTERN, ConfigError, DtypeName, StrictModel, load_config, validate
from conceptsmith.world.vocab import GENERATOR_SHAPES, NOVEL_OBJECTS

__all__ = [
    "ConceptSpec",
    "CustomBenchConfig",
    "CustomBenchRun",
    "HookSpec",
    "JointSpec",
    "MergeSpec",
    "RelearnSpec",
    "both_present_halves",
    "check_custom_config",
    "print_custom_run",
    "load_custom_config",
    "relative",
    "resolve_method",
    "run_custom_bench",
    "steps_to_rate",
    "summarize",
    "summary_table",
    "write_custom_report",
]

CONVENTIONS = {
    "clip_i": "mean evaluator image-image cosine over all (generation, reference) pairs",
    "clip_i_rel": "clip_i / clip_i between the references and an independent reference set of the object",
    "clip_t": "mean evaluator image-text cosine, prompt with the new token removed (raw cosine, no scale)",
    "clip_t_rel": "clip_t / clip_t of the unedited model on the same prompts without the new token",
    "both_present": "share of composition images where both concepts are detected (rule: `presence`)",
    "relearn_rate": "share of images whose top-1 zero-shot class is the erased shape",
    "steps_to_50": "customization steps at which relearn_rate first reaches 0.5, linearly interpolated between "
    "checkpoints (the erased model, prompted with the shape's name, is 0 steps); null: not by the last checkpoint",
}


# ============================================================================================
# config
# ============================================================================================
class ConceptSpec(StrictModel):
    token: str = Field(pattern=r"^[^\s+]+$", description="the new token, e.g. '<mush>' (no spaces, no '+')")
    object: str | None = Field(None, description="a ShapesWorld novel object, rendered as references")
    images: str | None = Field(None, description="folder of reference images (instead of `object`)")
    class_word: str | None = Field(None, description="class word in prompts (default: the object's name)")

    @field_validator("object")
    @classmethod
    def _novel_object(cls, value: str | None) -> str | None:
        if value is not None and value not in NOVEL_OBJECTS:
            raise ValueError(
                f"unknown novel object {value!r}; ShapesWorld's novel objects: {', '.join(NOVEL_OBJECTS)}"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ConceptSpec:
        if (self.object is None) == (self.images is None):
            raise ValueError(
                f"concept '{self.token}' needs exactly one of `object` (novel object) or `images` (folder)"
            )
        if self.images is not None and not self.class_word:
            raise ValueError(f"concept '{self.token}' with `images` needs a `class_word`")
        return self

    def word(self) -> str:
        """The class word of the prompts."""
        return self.class_word or str(self.object)

    def noun(self) -> str:
        """What the evaluator should see: the object's name, else the class word."""
        return self.object or self.word()


class JointSpec(StrictModel):
    """One training run on both concepts of a pair (Custom Diffusion's joint training)."""

    kind: Literal["joint"]
    name: str = Field(min_length=1)
    method: MethodSpec
    training_seeds: list[int] = Field(
        default_factory=list,
        description="train once per seed and average the metrics (also reported per seed); empty: the bench's "
        "training_seed. For a method whose result depends on its training seed, one seed's number is luck",
    )

    @field_validator("training_seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"training_seeds repeat a seed: {value}")
        return value


class MergeSpec(StrictModel):
    """:func:`customization.merge.merge` of the single-concept edits of the method row ``source``."""

    kind: Literal["merge"]
    name: str = Field(min_length=1)
    merge: str = Field(description=f"one of {', '.join(MERGE_METHODS)}")
    source: str = Field(min_length=1, description="label of the method row whose edits are merged")
    params: dict[str, Any] = Field(default_factory=dict, description="options of the merge")

    @field_validator("merge")
    @classmethod
    def _known_merge(cls, value: str) -> str:
        if value not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {value!r}; allowed: {', '.join(MERGE_METHODS)}")
        return value


class HookSpec(StrictModel):
    """A training-free editor (t2i-zero, a-star) composed on top of the composition ``on_top_of``."""

    kind: Literal["hook"]
    name: str = Field(min_length=1)
    method: MethodSpec
    on_top_of: str = Field(min_length=1, description="name of an earlier composition")


Composition = Annotated[JointSpec | MergeSpec | HookSpec, Field(discriminator="kind")]


class RelearnSpec(StrictModel):
    """Erase a ShapesWorld shape with each erasure method, then customize every erased model on renders of it
    (the relearning audit), evaluated after each of ``checkpoints`` training steps."""

    concept: str = Field(description="the erased ShapesWorld shape")
    erase: list[MethodSpec] = Field(
        description="the erasure methods, one row each (a single method is accepted)"
    )
    preserve: list[str] = Field(default_factory=list, description="preserved concepts of the erasure")
    method: MethodSpec = Field(
        description="the customization method run on the erased models (a trained one)"
    )
    checkpoints: list[int] = Field(
        default_factory=list,
        description="increasing training step counts of `method` that are evaluated; they replace its `steps`, and "
        "each continues the previous one's run (empty: the method's `steps` alone)",
    )
    token: str = Field("<relearn>", pattern=r"^\S+$")
    class_word: str = "shape"
    phrase: str = Field("{token}", description="how the token appears in the relearning prompts")
    prompts: list[str] = Field(default_factory=lambda: ["a picture of a {}"], min_length=1)

    @field_validator("concept")
    @classmethod
    def _shape(cls, value: str) -> str:
        if value not in GENERATOR_SHAPES:
            raise ValueError(f"unknown shape {value!r}; ShapesWorld shapes: {', '.join(GENERATOR_SHAPES)}")
        return value

    @field_validator("erase", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return value if isinstance(value, list) else [value]

    @field_validator("erase")
    @classmethod
    def _distinct_methods(cls, value: list[MethodSpec]) -> list[MethodSpec]:
        labels = [m.label() for m in value]
        if not labels:
            raise ValueError("lists no erasure method; give at least one")
        if len(set(labels)) != len(labels):
            raise ValueError(f"erasure labels repeat: {labels}; give each row its own `name`")
        return value

    @field_validator("checkpoints")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(s < 1 for s in value) or any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError(f"must be step counts >= 1, sorted, without repeats; got {value}")
        return value

    def token_phrase(self) -> str:
        """How the new token appears in the relearning prompts."""
        return " ".join(self.phrase.format(token=self.token, class_word=self.class_word).split())


class CustomBenchConfig(StrictModel):
    kind: Literal["customization"]
    name: str = Field(min_length=1)
    description: str = ""
    model: str = Field(min_length=1)
    evaluator: str = Field(min_length=1)
    device: str | None = Field(None, pattern=DEVICE_PATTERN, description="cuda | cuda:N | mps | cpu | auto (default: the model's)")
    dtype: DtypeName | None = Field(None, description="float32 | float16 | bfloat16 (default: the model's)")
    seeds: list[int] = Field(min_length=1)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    training_seed: int = 0
    classes: list[str] = Field(min_length=2, description="zero-shot label set (both_present, relearning)")
    eval_templates: list[str] = Field(default_factory=lambda: ["a picture of a {}"], min_length=1)
    concepts: list[ConceptSpec] = Field(
        default_factory=list, description="novel concepts (none: a relearning-only bench)"
    )
    n_reference: int = Field(6, ge=2)
    reference_seed: int = 0
    holdout_seed: int = Field(1, description="seed of the independent reference set (CLIP-I normalizer)")
    phrase: str = Field("{token} {class_word}", description="a concept in prompts")
    prompts: list[str] = Field(
        default_factory=lambda: ["a picture of a {}"], description="single-concept templates"
    )
    composition_prompts: list[str] = Field(default_factory=lambda: ["a picture of a {a} next to a {b}"])
    prompt_sets: dict[str, list[str]] = Field(
        default_factory=dict,
        description="named subsets of composition_prompts (e.g. the prompts a bar is defined on); the summary adds "
        "both_present_by_set, each set's mean over its prompts",
    )
    known_pairs: list[tuple[str, str]] = Field(
        default_factory=list,
        description="pairs of classes the base model already draws, composed by the unedited model with the same "
        "prompts and presence rule: the ceiling of both_present for this prompt set",
    )
    presence: Literal["top2", "halves"] = "top2"
    ceiling: CeilingConfig | None = Field(
        None,
        description="settings of the conditioning-ceiling row: the whole conditioning inverted on each concept's "
        "references, an upper reference for textual inversion",
    )
    methods: list[MethodSpec] = Field(default_factory=list)
    compositions: list[Composition] = Field(default_factory=list)
    relearn: RelearnSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CustomBenchConfig:
        if not self.concepts and (self.methods or self.ceiling or not self.relearn):
            raise ValueError(
                "`concepts` is empty: list some, or keep only a `relearn` block (no methods, no ceiling)"
            )
        if self.holdout_seed == self.reference_seed:
            raise ValueError("holdout_seed must differ from reference_seed (two independent reference sets)")
        if "{token}" not in self.phrase or "{class_word}" not in self.phrase:
            raise ValueError("phrase needs both {token} and {class_word}")
        for template in [*self.prompts, *(self.relearn.prompts if self.relearn else [])]:
            if template.count("{}") != 1:
                raise ValueError(f"prompt template {template!r} needs exactly one '{{}}'")
        for template in self.composition_prompts:
            if "{a}" not in template or "{b}" not in template:
                raise ValueError(f"composition prompt {template!r} needs '{{a}}' and '{{b}}'")
        for set_name, templates in self.prompt_sets.items():
            strangers = [t for t in templates if t not in self.composition_prompts]
            if not templates or strangers:
                raise ValueError(
                    f"prompt set {set_name!r} must list some of composition_prompts, verbatim; "
                    f"not among them: {strangers or '(the set is empty)'}"
                )
        tokens = [c.token for c in self.concepts] + ([self.relearn.token] if self.relearn else [])
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"every concept needs its own token; got {tokens}")
        return self

    def concept_phrase(self, concept: ConceptSpec, with_token: bool = True) -> str:
        """``"<tok> class_word"`` (or the class word alone, for the unedited model)."""
        phrase = self.phrase.format(token=concept.token if with_token else "", class_word=concept.word())
        return " ".join(phrase.split())


#: Row name of the conditioning inversion (:mod:`customization.conditioning_ceiling`) of each concept.
CEILING = "conditioning-ceiling"


def _labels(cfg: CustomBenchConfig) -> list[str]:
    ceiling = [CEILING] if cfg.ceiling is not None else []
    return [m.label() for m in cfg.methods] + ceiling + [c.name for c in cfg.compositions]


def _check_references(cfg: CustomBenchConfig, path: Path | None) -> None:
    from conceptsmith.customization import CustomizationError
    from conceptsmith.customization.data import find_images

    source = path or "config"
    for concept in cfg.concepts:
        if concept.images is None:
            continue
        try:
            files = find_images(resolve_path(concept.images, path, f"reference images of '{concept.token}'"))
        except (CustomizationError, FileNotFoundError) as err:
            raise ConfigError(f"{source}: concept '{concept.token}': {err}") from None
        if len(files) < 2:
            raise ConfigError(
                f"{source}: concept '{concept.token}': needs >= 2 reference images, has {len(files)}"
            )


def _check_names(cfg: CustomBenchConfig, path: Path | None) -> None:
    source, labels = path or "config", _labels(cfg)
    if len(set(labels)) != len(labels) or {"unedited", "relearn"} & set(labels):
        raise ConfigError(
            f"{source}: method and composition names must be unique, not unedited/relearn: {labels}"
        )
    methods = {m.label() for m in cfg.methods}
    earlier: set[str] = set()
    for comp in cfg.compositions:
        where = f"{source}: composition '{comp.name}'"
        if isinstance(comp, MergeSpec) and comp.source not in methods:
            raise ConfigError(f"{where}: source '{comp.source}' is not a method row {sorted(methods)}")
        if isinstance(comp, HookSpec) and comp.on_top_of not in earlier:
            raise ConfigError(
                f"{where}: `on_top_of: {comp.on_top_of}` is not an earlier composition {sorted(earlier)}"
            )
        earlier.add(comp.name)
    if cfg.compositions and len(cfg.concepts) < 2:
        raise ConfigError(f"{source}: compositions need at least two concepts")
    needed = [c.noun() for c in cfg.concepts] if cfg.compositions else []
    needed += [name for pair in cfg.known_pairs for name in pair]
    needed += [cfg.relearn.concept] if cfg.relearn else []
    missing = [n for n in needed if n not in cfg.classes]
    if missing:
        raise ConfigError(
            f"{source}: {missing} must be in `classes` (zero-shot labels of both_present / relearning)"
        )


def _method_specs(cfg: CustomBenchConfig) -> list[tuple[str, MethodSpec]]:
    specs = [(m.label(), m) for m in cfg.methods]
    specs += [(c.name, c.method) for c in cfg.compositions if not isinstance(c, MergeSpec)]
    if cfg.relearn:
        specs += [(f"relearn.erase '{m.label()}'", m) for m in cfg.relearn.erase]
        specs += [("relearn.method", cfg.relearn.method)]
    return specs


def resolve_method(spec: MethodSpec, bench_path: Path | None, where: str) -> tuple[str, dict[str, Any]]:
    """(editor, params) of a method row, checked against the editor's registry entry and config."""
    from conceptsmith.registry import get_editor

    source = str(bench_path or "config")
    try:
        method, params = method_config(spec, bench_path)
        editor = get_editor(method)
    except (KeyError, ValueError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise ConfigError(f"{source}: {where}: {message}") from None
    validate(params, editor.Config, f"{source}: {where}: params")
    return method, params


def _check_relearn(spec: RelearnSpec, path: Path | None) -> None:
    """The relearning customization trains (it has ``steps``); several checkpoints continue one run, so its
    learning rate must not depend on ``steps`` and ``steps`` must not be set beside them."""
    from conceptsmith.registry import get_editor

    where = f"{path or 'config'}: relearn.method"
    method, params = resolve_method(spec.method, path, "relearn.method")
    if "steps" not in get_editor(method).Config.model_fields:
        raise ConfigError(
            f"{where}: '{method}' does not train (no `steps`); relearning needs a trained customization"
        )
    if spec.checkpoints and "steps" in spec.method.params:
        raise ConfigError(
            f"{where}: `checkpoints` replace `steps`; drop params.steps ({spec.method.params['steps']})"
        )
    if len(spec.checkpoints) > 1 and params.get("lr_schedule", "constant") != "constant":
        raise ConfigError(
            f"{where}: each checkpoint continues the previous run, so the learning rate must not depend on `steps`: "
            f"use lr_schedule: constant (not {params['lr_schedule']})"
        )


def check_custom_config(cfg: CustomBenchConfig, path: Path | None) -> None:
    """Every method (registered, valid params), name reference and image folder, before any work."""
    for where, spec in _method_specs(cfg):
        resolve_method(spec, path, where)
    if cfg.relearn:
        _check_relearn(cfg.relearn, path)
    _check_names(cfg, path)
    _check_references(cfg, path)


def load_custom_config(path_or_name: str | Path) -> tuple[CustomBenchConfig, Path]:
    """A customization bench YAML by path or by name under ``configs/bench/``, fully checked."""
    path = resolve_bench_path(path_or_name)
    cfg = load_config(path, CustomBenchConfig)
    check_custom_config(cfg, path)
    return cfg, path


def relative(value: float, baseline: float) -> float:
    """``value / baseline`` (NaN for a zero or NaN baseline): the ``*_rel`` normalizations."""
    return value / baseline if baseline and not math.isnan(baseline) else math.nan


def both_present_halves(
    evaluator: Any,
    images: Sequence[Image.Image],
    pair: tuple[str, str],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> float:
    """Share of images whose left and right halves (:func:`conceptsmith.world.check.object_crop`) have the
    two concepts of ``pair`` as top-1 zero-shot classes, one each (either order)."""
    from conceptsmith.world.check import object_crop

    crops = [object_crop(im, side) for side in ("left", "right") for im in images]
    labels = evaluator.classify(crops, classnames, templates).labels()
    n = len(images)
    hits = sum({labels[i], labels[n + i]} == set(pair) for i in range(n))
    return hits / n if n else math.nan


# ============================================================================================
# the runner
# ============================================================================================
@dataclass(frozen=True)
class References:
    folder: Path  # the training references (the customization editors read folders)
    train: list[Path]  # the files of ``folder``: CLIP-I is measured against them
    pair: tuple[list[Path], list[Path]]  # two independent sets of the object: the CLIP-I normalizer


@dataclass
class CustomBenchRun:
    """What a run did: the results (as written), edits trained, images generated / from the cache."""

    results: dict[str, Any]
    out_dir: Path
    trained: int
    generated: int
    cached: int
    report: dict[str, Path] = field(default_factory=dict)


def _render(obj: str, n: int, seed: int, folder: Path) -> list[Path]:
    """``n`` ShapesWorld renders of ``obj`` as PNGs in ``folder`` (kept when already there)."""
    from conceptsmith.io import atomic_write
    from conceptsmith.world.render import reference_set

    paths = [folder / f"{i:02d}.png" for i in range(n)]
    if not all(p.is_file() for p in paths):
        for sample, p in zip(reference_set(obj, n, seed), paths, strict=True):
            atomic_write(p, lambda tmp, image=sample.pil(): image.save(tmp, format="PNG"))
    return paths


def _files_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _with_steps(spec: MethodSpec, steps: int) -> MethodSpec:
    return spec.model_copy(update={"params": {**spec.params, "steps": steps}})


def _resumable(folder: Path, steps: int) -> bool:
    """Whether a run of ``steps`` can continue the latest checkpoint in ``folder`` (none, or not beyond ``steps``:
    a checkpoint list that gained a smaller count trains that count afresh)."""
    from conceptsmith.train_checkpoints import latest_checkpoint

    latest = latest_checkpoint(folder)
    return latest is None or int(latest.stem.rsplit("-", 1)[1]) <= steps


@contextmanager
def _applied(pipe: Any, edit: Any) -> Iterator[None]:
    if edit is None:
        yield
        return
    edit.apply(pipe)
    try:
        yield
    finally:
        edit.revert(pipe)


@dataclass
class _Runner:
    """Shared state of one run: the pipe, caches, evaluator and counters."""

    cfg: CustomBenchConfig
    bench_path: Path | None
    pipe: Any
    fingerprint: str
    cache_root: Path
    gen: Generator
    evaluator: Any
    state: Any
    progress: bool
    trained: int = 0
    memo: dict[Any, Any] = field(default_factory=dict)
    refs: dict[str, References] = field(default_factory=dict)
    images: list[dict[str, Any]] = field(default_factory=list)
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    edit_files: dict[str, str] = field(default_factory=dict)  # image-cache key -> the saved edit

    @property
    def cache(self) -> Path:
        return self.cache_root / self.fingerprint

    # ---- references ---------------------------------------------------------------------------
    def rendered(self, obj: str, seed: int) -> tuple[Path, list[Path]]:
        """(folder, files) of ``n_reference`` renders of ``obj`` with ``seed``, cached on disk."""
        folder = self.cache_root / "references" / f"{obj}-{seed}-{self.cfg.n_reference}"
        return folder, _render(obj, self.cfg.n_reference, seed, folder)

    def concept_references(self, concept: ConceptSpec) -> References:
        """Training references and the normalizer's two sets: renders with ``reference_seed`` and
        ``holdout_seed``, or a folder (all files for training; its two halves for the normalizer)."""
        from conceptsmith.customization.data import find_images

        if concept.object is not None:
            folder, train = self.rendered(concept.object, self.cfg.reference_seed)
            refs = References(folder, train, (train, self.rendered(concept.object, self.cfg.holdout_seed)[1]))
        else:
            folder = resolve_path(
                str(concept.images), self.bench_path, f"reference images of '{concept.token}'"
            )
            train = find_images(folder)
            refs = References(folder, train, (train[: len(train) // 2], train[len(train) // 2 :]))
        self.refs[concept.token] = refs
        self.references[concept.token] = {
            "train": [str(p) for p in train],
            "pair": [[str(p) for p in s] for s in refs.pair],
        }
        return refs

    # ---- edits --------------------------------------------------------------------------------
    def _runtime(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Params plus run-time settings that do not change the result (class-image cache, progress bars)."""
        from conceptsmith.registry import get_editor

        fields = get_editor(method).Config.model_fields
        out = dict(params)
        if "class_data_dir" in fields and not out.get("class_data_dir"):
            out["class_data_dir"] = str(self.cache / "class-images")
        if "progress" in fields:
            out["progress"] = bool(out.get("progress", True)) and self.progress
        return out

    def _fit_key(
        self,
        method: str,
        params: dict[str, Any],
        concepts: Sequence[tuple[str, str, Path]],
        on: Any,
        seed: int,
    ) -> str:
        """Cache key of a customization: base, method, params, tokens, class words, reference bytes, ``on``, seed."""
        from conceptsmith.customization.data import find_images

        from conceptsmith import __version__

        tokens, words, folders = (list(x) for x in zip(*concepts, strict=True))
        images = [_files_digest(find_images(f)) for f in folders]
        on_key = edit_digest(on) if on is not None else None
        return digest(self.fingerprint, method, params, tokens, words, images, on_key, seed, __version__)

    def customize(
        self,
        spec: MethodSpec,
        concepts: Sequence[tuple[str, str, Path]],
        on: Any = None,
        seed: int | None = None,
        runtime: dict[str, Any] | None = None,
    ) -> tuple[Any, str]:
        """Fit (or load) ``spec`` on ``concepts`` = [(token, class word, reference folder)], on top of
        the edit ``on`` (applied while training) when given, with training ``seed`` (default: the bench's
        ``training_seed``); ``runtime``: params that do not change the result (left out of the cache key).
        Returns (edit, image-cache key)."""
        from conceptsmith.customization import customize

        from conceptsmith.edits import Edit

        method, params = resolve_method(spec, self.bench_path, spec.label())
        seed = self.cfg.training_seed if seed is None else seed
        key = self._fit_key(method, params, concepts, on, seed)
        path = self.cache / "edits" / f"{method}-{key}.safetensors"
        if path in self.memo:
            return self.memo[path]

        def fit() -> Any:
            tokens, words, folders = (list(x) for x in zip(*concepts, strict=True))
            with _applied(self.pipe, on):
                return customize(
                    self.pipe,
                    method,
                    tokens,
                    folders,
                    words,
                    params=self._runtime(method, params) | (runtime or {}),
                    seed=seed,
                )

        self.trained += compute_once(self.state, path, fit, lambda edit, target: edit.save(target))
        edit = Edit.load(path)  # the stored edit, so that a re-run sees the very same tensors
        self.memo[path] = (edit, f"{method}-{edit_digest(edit)}")
        self.edit_files[self.memo[path][1]] = str(path)
        return self.memo[path]

    def customize_steps(
        self, spec: MethodSpec, steps: list[int], concepts: Sequence[tuple[str, str, Path]], on: Any
    ) -> list[tuple[Any, str]]:
        """``spec`` trained on ``concepts`` on top of ``on`` for each of ``steps`` (increasing) training steps: one
        run, each count resuming the training checkpoint the previous count left (the loop re-seeds every step,
        so this equals a fresh run of that many steps, and is cached as one)."""
        if len(steps) == 1:
            return [self.customize(_with_steps(spec, steps[0]), concepts, on=on)]
        method, params = resolve_method(spec, self.bench_path, spec.label())
        run = self._fit_key(
            method, {k: v for k, v in params.items() if k != "steps"}, concepts, on, self.cfg.training_seed
        )
        folder = self.cache / "checkpoints" / f"{method}-{run}"
        return [
            self.customize(
                _with_steps(spec, n),
                concepts,
                on=on,
                runtime={"checkpoint_dir": str(folder), "resume": _resumable(folder, n)},
            )
            for n in steps
        ]

    def ceiling_images(self, concept: ConceptSpec, refs: References) -> tuple[str, list[Image.Image]]:
        """The conditioning ceiling of ``concept`` (inverted once, cached) and its images, one per seed."""
        from conceptsmith.customization.conditioning_ceiling import invert_conditioning
        from safetensors.torch import load_file, save_file

        from conceptsmith import __version__
        from conceptsmith.io import atomic_write

        config = self.cfg.ceiling.model_copy(update={"progress": self.cfg.ceiling.progress and self.progress})
        settings = config.model_dump(exclude={"progress"})
        images = _files_digest(refs.train)
        key = f"{CEILING}-{digest(self.fingerprint, settings, concept.word(), images, self.cfg.training_seed, __version__)}"
        path = self.cache / "edits" / f"{key}.safetensors"
        self.trained += compute_once(
            self.state,
            path,
            lambda: invert_conditioning(self.pipe, refs.train, concept.word(), config, self.cfg.training_seed),
            lambda states, target: atomic_write(
                target, lambda tmp: save_file({"prompt_embeds": states.contiguous()}, str(tmp))
            ),
        )
        states = load_file(str(path))["prompt_embeds"]
        return key, self._images(
            "single", concept.token, CEILING, key, [(key, lambda: {"prompt_embeds": states})]
        )

    def erase(self, spec: MethodSpec, concept: str, preserve: list[str]) -> tuple[Any, str]:
        method, params = resolve_method(spec, self.bench_path, "relearn.erase")
        task = TaskSpec(name=f"erase-{concept}", erase=[concept], preserve=preserve)
        edit, key, seconds, path = fit_edit(
            self.pipe, self.cache, self.state, method, params, task, self.cfg.training_seed
        )
        self.trained += int(seconds is not None)
        self.edit_files[key] = str(path)
        return edit, key

    # ---- generation ---------------------------------------------------------------------------
    def generate(
        self, section: str, group: str, method: str, key: str, edit: Any, prompts: list[str]
    ) -> list[Image.Image]:
        """Images of every (prompt, seed) with ``edit`` applied, prompt-major; recorded in ``images``."""
        with _applied(self.pipe, edit):
            return self._images(section, group, method, key, [(p, p) for p in prompts])

    def _images(
        self, section: str, group: str, method: str, key: str, conditions: list[tuple[str, Any]]
    ) -> list[Image.Image]:
        """Images of every (condition, seed), condition-major (:meth:`Generator.run` conditions: a prompt, or a
        key and a maker of prompt embeddings); recorded in ``images`` with their prompt (``None`` for embeddings)."""
        paths = self.gen.run(key, conditions, self.cfg.seeds, desc=f"{group}: {method}")
        keys = [(k, c, s) for k, c in conditions for s in self.cfg.seeds]
        self.images += [
            {
                "section": section,
                "group": group,
                "method": method,
                "prompt": c if isinstance(c, str) else None,
                "seed": s,
                "path": str(paths[(k, s)]),
            }
            for k, c, s in keys
        ]
        return load_images([paths[(k, s)] for k, _, s in keys])


def _row(section: str, group: str, method: str, key: str | None, metrics: dict[str, float]) -> dict[str, Any]:
    return {"section": section, "group": group, "method": method, "edit_key": key, "metrics": metrics}


def _single_metrics(
    evaluator: Any,
    images: list[Image.Image],
    texts: list[str],
    token: str | None,
    train: list[Image.Image],
    norm: float,
    baseline: float,
) -> dict[str, float]:
    """CLIP-I against the training references and CLIP-T (token removed), each also divided by its
    normalizer: ``norm`` (references vs independent references), ``baseline`` (unedited CLIP-T)."""
    from conceptsmith.evaluation.metrics import clip_t

    ct = clip_t(evaluator, images, texts, strip_tokens=[token] if token else [])
    return {
        **_clip_i_metrics(evaluator, images, train, norm),
        "clip_t": ct,
        "clip_t_base": baseline,
        "clip_t_rel": relative(ct, baseline),
    }


def _clip_i_metrics(
    evaluator: Any, images: list[Image.Image], train: list[Image.Image], norm: float
) -> dict[str, float]:
    """CLIP-I against the training references, and divided by ``norm`` (references vs independent references)."""
    from conceptsmith.evaluation.metrics import clip_i

    ci = clip_i(evaluator, images, train)
    return {"clip_i": ci, "clip_i_ref": norm, "clip_i_rel": relative(ci, norm)}


def _single_rows(run: _Runner, labels: set[str]) -> list[dict[str, Any]]:
    """Per concept: the unedited model and every selected method row (CLIP-I, CLIP-T, both normalized)."""
    from conceptsmith.evaluation.metrics import clip_i, clip_t

    cfg, rows = run.cfg, []
    for concept in cfg.concepts:
        refs = run.concept_references(concept)
        norm = clip_i(run.evaluator, *(load_images(s) for s in refs.pair))
        run.references[concept.token]["clip_i_ref"] = norm
        if not cfg.prompts:
            continue
        train = load_images(refs.train)
        plain = [t.format(cfg.concept_phrase(concept, with_token=False)) for t in cfg.prompts]
        images = run.generate("single", concept.token, "unedited", "unedited", None, plain)
        texts = [p for p in plain for _ in cfg.seeds]
        baseline = clip_t(run.evaluator, images, texts)
        metrics = _single_metrics(run.evaluator, images, texts, None, train, norm, baseline)
        rows.append(_row("single", concept.token, "unedited", "unedited", metrics))
        prompts = [t.format(cfg.concept_phrase(concept)) for t in cfg.prompts]
        texts = [p for p in prompts for _ in cfg.seeds]
        for spec in (m for m in cfg.methods if m.label() in labels):
            edit, key = run.customize(spec, [(concept.token, concept.word(), refs.folder)])
            images = run.generate("single", concept.token, spec.label(), key, edit, prompts)
            metrics = _single_metrics(run.evaluator, images, texts, concept.token, train, norm, baseline)
            seconds = edit.metadata.get("training", {}).get("seconds")
            if seconds is not None:  # measured when the edit was trained (it may come from the cache)
                metrics["train_seconds"] = float(seconds)
            rows.append(_row("single", concept.token, spec.label(), key, metrics))
        if CEILING in labels:
            key, images = run.ceiling_images(concept, refs)
            rows.append(
                _row(
                    "single", concept.token, CEILING, key, _clip_i_metrics(run.evaluator, images, train, norm)
                )
            )
    return rows


def _pair_prompts(cfg: CustomBenchConfig, a: ConceptSpec, b: ConceptSpec, with_token: bool) -> list[str]:
    phrases = {"a": cfg.concept_phrase(a, with_token), "b": cfg.concept_phrase(b, with_token)}
    return [t.format(**phrases) for t in cfg.composition_prompts]


def _training_seeds(cfg: CustomBenchConfig, comp: JointSpec | MergeSpec | HookSpec) -> list[int]:
    """The training seeds a composition is measured over: a joint run's own list, a hook's base composition's,
    else the bench's ``training_seed``."""
    if isinstance(comp, JointSpec) and comp.training_seeds:
        return comp.training_seeds
    if isinstance(comp, HookSpec):
        return _training_seeds(cfg, next(c for c in cfg.compositions if c.name == comp.on_top_of))
    return [cfg.training_seed]


def _composed(
    run: _Runner, comp: JointSpec | MergeSpec | HookSpec, a: ConceptSpec, b: ConceptSpec, seed: int
) -> tuple[Any, str]:
    """The edit of composition ``comp`` for the pair (a, b) trained with ``seed``: joint run, merge, or hook on
    another one."""
    from conceptsmith.customization.merge import merge, needs_pipeline

    from conceptsmith.edits import compose
    from conceptsmith.registry import EditRequest, get_editor

    cfg = run.cfg
    memo_key = f"composition:{comp.name}:{a.token}:{b.token}:{seed}"
    if memo_key in run.memo:
        return run.memo[memo_key]
    pair = [(c.token, c.word(), run.refs[c.token].folder) for c in (a, b)]
    if isinstance(comp, JointSpec):
        edit, _ = run.customize(comp.method, pair, seed=seed)
    elif isinstance(comp, MergeSpec):
        source = next(m for m in cfg.methods if m.label() == comp.source)
        parts = [run.customize(source, [p])[0] for p in pair]
        edit = merge(parts, comp.merge, pipe=run.pipe if needs_pipeline(comp.merge) else None, **comp.params)
    else:
        on = next(c for c in cfg.compositions if c.name == comp.on_top_of)
        method, params = resolve_method(comp.method, run.bench_path, comp.name)
        phrases = [cfg.concept_phrase(a), cfg.concept_phrase(b)]
        hook = get_editor(method)(params).fit(run.pipe, EditRequest(concepts=phrases))
        edit = compose([_composed(run, on, a, b, seed)[0], hook])
    run.memo[memo_key] = (edit, f"{comp.name}-{edit_digest(edit)}")
    return run.memo[memo_key]


def _composition_rows(run: _Runner, labels: set[str]) -> list[dict[str, Any]]:
    """Per pair of concepts: the unedited model and every selected composition (both_present, CLIP-T)."""
    from conceptsmith.evaluation.metrics import clip_t

    cfg, ev, rows = run.cfg, run.evaluator, []
    selected = [c for c in cfg.compositions if c.name in labels]
    if not selected:
        return rows
    for a, b in itertools.combinations(cfg.concepts, 2):
        group = f"{a.token}+{b.token}"
        plain, prompts = _pair_prompts(cfg, a, b, False), _pair_prompts(cfg, a, b, True)
        pair, baseline = (a.noun(), b.noun()), None
        runs = [(None, None)] + [(comp, seed) for comp in selected for seed in _training_seeds(cfg, comp)]
        for comp, seed in runs:
            name = "unedited" if comp is None else comp.name
            several = comp is not None and len(_training_seeds(cfg, comp)) > 1
            edit, key = (None, "unedited") if comp is None else _composed(run, comp, a, b, seed)
            used = plain if comp is None else prompts
            images = run.generate(
                "composition", group, f"{name} @ seed {seed}" if several else name, key, edit, used
            )
            ct = clip_t(ev, images, [p for p in used for _ in cfg.seeds], strip_tokens=[a.token, b.token])
            baseline = ct if baseline is None else baseline
            metrics = _presence_metrics(cfg, ev, images, pair)
            metrics |= {"clip_t": ct, "clip_t_base": baseline, "clip_t_rel": relative(ct, baseline)}
            rows.append(
                _row("composition", group, name, key, metrics)
                | ({} if comp is None else {"training_seed": seed})
            )
    for pair in cfg.known_pairs:
        group = "+".join(pair)
        used = [t.format(a=pair[0], b=pair[1]) for t in cfg.composition_prompts]
        images = run.generate("composition", group, KNOWN_PAIRS, "unedited", None, used)
        metrics = _presence_metrics(cfg, ev, images, pair)
        rows.append(_row("composition", group, KNOWN_PAIRS, "unedited", metrics))
    return rows


#: Row name of the unedited model composing ``known_pairs`` (the both_present ceiling of the prompt set).
KNOWN_PAIRS = "known-pairs"


def _presence_metrics(
    cfg: CustomBenchConfig, evaluator: Any, images: list[Image.Image], pair: tuple[str, str]
) -> dict[str, Any]:
    """both_present under both rules (``both_present`` = the configured one) and, per composition prompt,
    under the configured rule (images are prompt-major, ``len(cfg.seeds)`` per prompt)."""
    from conceptsmith.evaluation.metrics import both_concepts_present_rate

    def rate(rule: str, part: list[Image.Image]) -> float:
        if rule == "top2":
            return both_concepts_present_rate(evaluator, part, pair, cfg.classes, cfg.eval_templates)
        return both_present_halves(evaluator, part, pair, cfg.classes, cfg.eval_templates)

    n = len(cfg.seeds)
    present = {rule: rate(rule, images) for rule in ("top2", "halves")}
    by_prompt = {
        t: rate(cfg.presence, images[i * n : (i + 1) * n]) for i, t in enumerate(cfg.composition_prompts)
    }
    return {
        "both_present": present[cfg.presence],
        **{f"both_present_{k}": v for k, v in present.items()},
        "both_present_by_prompt": by_prompt,
    }


def _relearn_steps(run: _Runner) -> list[int]:
    """The evaluated step counts of the relearning customization: its checkpoints, else its ``steps``."""
    spec = run.cfg.relearn
    return spec.checkpoints or [resolve_method(spec.method, run.bench_path, "relearn.method")[1]["steps"]]


def _rate_row(
    run: _Runner,
    group: str,
    name: str,
    edit: Any,
    key: str,
    prompts: list[str],
    erase: str | None,
    steps: int | None,
) -> dict[str, Any]:
    """One relearning row: the share of ``edit``'s images of ``prompts`` classified as the erased shape."""
    from conceptsmith.evaluation.metrics import evaluator_accuracy

    cfg = run.cfg
    images = run.generate("relearn", group, name, key, edit, prompts)
    rate = evaluator_accuracy(
        run.evaluator, images, cfg.relearn.concept, cfg.classes, cfg.eval_templates
    ).argmax
    return _row("relearn", group, name, key, {"relearn_rate": rate}) | {"erase": erase, "steps": steps}


def _erasure_rows(run: _Runner, erase: MethodSpec, group: str, folder: Path) -> list[dict[str, Any]]:
    """The erased model (0 steps, prompted with the shape's name) and the erased + customized model after each
    checkpoint (prompted with the new token)."""
    from conceptsmith.edits import compose

    spec, label = run.cfg.relearn, erase.label()
    erased, erase_key = run.erase(erase, spec.concept, spec.preserve)
    plain = [t.format(spec.concept) for t in spec.prompts]
    rows = [_rate_row(run, group, label, erased, erase_key, plain, label, 0)]
    steps = _relearn_steps(run)
    concepts = [(spec.token, spec.class_word, folder)]
    prompts = [t.format(spec.token_phrase()) for t in spec.prompts]
    for n, (custom, _) in zip(steps, run.customize_steps(spec.method, steps, concepts, erased), strict=True):
        both = compose([erased, custom])
        key = f"relearn-{edit_digest(both)}"
        rows.append(_rate_row(run, group, f"{label} +{n} steps", both, key, prompts, label, n))
    return rows


def _relearn_rows(run: _Runner) -> list[dict[str, Any]]:
    """Unedited, then per erasure method the erased model and the erased + customized model at each checkpoint:
    how often the evaluator sees the erased shape."""
    cfg, spec = run.cfg, run.cfg.relearn
    group = f"relearn:{spec.concept}"
    folder, train = run.rendered(spec.concept, cfg.reference_seed)
    run.references[group] = {"train": [str(p) for p in train]}
    plain = [t.format(spec.concept) for t in spec.prompts]
    rows = [_rate_row(run, group, "unedited", None, "unedited", plain, None, None)]
    for erase in spec.erase:
        rows += _erasure_rows(run, erase, group, folder)
    return rows


def steps_to_rate(points: Sequence[tuple[int, float]], level: float = 0.5) -> float | None:
    """The step count at which the rate first reaches ``level``, linearly interpolated between the (steps, rate)
    ``points`` (increasing steps); None if it never does."""
    if points and points[0][1] >= level:
        return float(points[0][0])
    for (s0, r0), (s1, r1) in itertools.pairwise(points):
        if r1 >= level:
            return s0 + (level - r0) / (r1 - r0) * (s1 - s0)
    return None


def _relearn_summary(rows: list[dict[str, Any]], concept: str | None) -> dict[str, Any]:
    """Erasure label -> the concept, the unedited and erased rates, the rate by customization steps and
    ``steps_to_50``."""
    mine = [r for r in rows if r["section"] == "relearn"]
    unedited = next((r["metrics"]["relearn_rate"] for r in mine if r["erase"] is None), None)
    out: dict[str, Any] = {}
    for r in (r for r in mine if r["erase"] is not None):
        entry = out.setdefault(
            r["erase"], {"concept": concept, "unedited": unedited, "erased": None, "by_steps": {}}
        )
        if r["steps"]:
            entry["by_steps"][str(r["steps"])] = r["metrics"]["relearn_rate"]
        else:
            entry["erased"] = r["metrics"]["relearn_rate"]
    for entry in out.values():
        points = [(0, entry["erased"]), *((int(n), rate) for n, rate in entry["by_steps"].items())]
        entry["steps_to_50"] = steps_to_rate(points)
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(
    rows: list[dict[str, Any]], relearn_concept: str | None = None, prompt_sets: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """``summary``: method / composition name -> metrics averaged over concepts or pairs; the
    unedited model's single-concept and composition numbers share one entry; ``relearn`` -> per erasure method
    the rates of :func:`_relearn_summary`;
    ``both_present_by_set``: the mean over each of ``prompt_sets``' prompts."""
    summary: dict[str, Any] = {}
    for section in ("single", "composition"):
        names = dict.fromkeys(r["method"] for r in rows if r["section"] == section)
        for name in names:
            entries = [r for r in rows if r["section"] == section and r["method"] == name]
            mine = [r["metrics"] for r in entries]
            keys = (
                ("clip_i", "clip_i_rel", "clip_t", "clip_t_rel") if section == "single" else ("both_present",)
            )
            if section == "composition" and name not in ("unedited", KNOWN_PAIRS):
                keys += ("clip_t", "clip_t_rel")
            if section == "single":
                keys += ("train_seconds",)
            # only what every concept of the row has (no training time for the unedited model, no CLIP-T for the ceiling)
            keys = tuple(k for k in keys if all(k in m for m in mine))
            summary.setdefault(name, {}).update({k: _mean([m[k] for m in mine]) for k in keys})
            if section == "composition" and all("both_present_by_prompt" in m for m in mine):
                prompts = mine[0]["both_present_by_prompt"]
                by_prompt = {t: _mean([m["both_present_by_prompt"][t] for m in mine]) for t in prompts}
                summary[name]["both_present_by_prompt"] = by_prompt
                if prompt_sets:  # every prompt has one image per seed, so the mean of rates is the pooled rate
                    summary[name]["both_present_by_set"] = {
                        set_name: _mean([by_prompt[t] for t in templates]) for set_name, templates in prompt_sets.items()
                    }
            by_seed: dict[Any, list[float]] = {}
            for r in entries:
                by_seed.setdefault(r.get("training_seed"), []).append(r["metrics"].get("both_present"))
            if len(by_seed) > 1:  # several training runs: their spread is part of the result
                summary[name]["both_present_by_training_seed"] = {
                    str(seed): _mean(rates) for seed, rates in by_seed.items()
                }
    relearn = _relearn_summary(rows, relearn_concept)
    if relearn:
        summary["relearn"] = relearn
    return summary


def _selected(cfg: CustomBenchConfig, methods: Sequence[str] | None) -> set[str]:
    available = [*_labels(cfg), *(["relearn"] if cfg.relearn else [])]
    if methods is None:
        return set(available)
    unknown = sorted(set(methods) - set(available))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; this bench has {available}")
    return set(methods)


def run_custom_bench(
    config: CustomBenchConfig | str | Path,
    out_dir: str | Path,
    *,
    methods: Sequence[str] | None = None,
    model: str | None = None,
    evaluator: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    report: bool = True,
    device: str | None = None,
    dtype: str | None = None,
) -> CustomBenchRun:
    """Run a customization benchmark; writes ``results.json`` (and the report) into ``out_dir``.

    ``methods`` keeps only these method rows / compositions (``relearn`` names the relearning task);
    the edits a kept composition needs are trained even when their method row is filtered out.
    ``model`` / ``evaluator`` / ``device`` / ``dtype`` override the config's. Under ``accelerate launch`` the
    processes share generation and train together (:func:`~conceptsmith.evaluation.bench.compute_once`); the
    main process writes the results.
    """
    from conceptsmith.evaluation.clip import load_evaluator

    from conceptsmith.io import write_json

    if isinstance(config, CustomBenchConfig):
        cfg, bench_path = config, None
        check_custom_config(cfg, None)
    else:
        cfg, bench_path = load_custom_config(config)
    overrides = {k: v for k, v in (("model", model), ("evaluator", evaluator)) if v}
    if overrides:
        cfg = validate({**cfg.model_dump(), **overrides}, CustomBenchConfig, "overrides")
    labels = _selected(cfg, methods)
    started, started_at = time.perf_counter(), datetime.now(timezone.utc)
    out_dir = Path(out_dir)
    cache_root = Path(cache_dir) if cache_dir else out_dir / "cache"
    pipe, info, state = load_for_processes(cfg.model, device or cfg.device, dtype or cfg.dtype)
    gen = Generator(pipe, cfg.generation, cache_root / info.fingerprint, state, progress=progress)
    ev = load_evaluator(cfg.evaluator, device=pipe.device)
    run = _Runner(cfg, bench_path, pipe, info.fingerprint, cache_root, gen, ev, state, progress)

    rows = _single_rows(run, labels) + _composition_rows(run, labels)
    if cfg.relearn is not None and "relearn" in labels:
        rows += _relearn_rows(run)
    results = {
        "bench": cfg.name,
        "kind": "customization",
        "description": cfg.description,
        "config": cfg.model_dump(),
        "model": {"spec": info.spec, "family": info.family, "fingerprint": info.fingerprint},
        "evaluator": ev.describe(),
        "presence": cfg.presence,
        "conventions": CONVENTIONS,
        "references": run.references,
        "summary": summarize(rows, cfg.relearn.concept if cfg.relearn else None, cfg.prompt_sets),
        "rows": rows,
        "images": run.images,
        "edit_files": run.edit_files,
        "run": run_record(started_at, time.perf_counter() - started, run.cache)
        | {"trained": run.trained, "generated": gen.generated, "cached": gen.cached},
    }
    done = CustomBenchRun(results if state.is_main_process else {}, out_dir, run.trained, gen.generated, gen.cached)
    if state.is_main_process:
        write_json(out_dir / "results.json", json.loads(json.dumps(results, default=float)))
        if report:
            done.report = write_custom_report(results, out_dir)
    state.wait_for_everyone()
    return done


# ============================================================================================
# CLI (dispatched by evaluation.bench.bench_command on `kind: customization`)
# ============================================================================================
def print_custom_run(run: CustomBenchRun, as_json: bool) -> None:
    """What ``conceptsmith bench`` prints for a customization benchmark: the summary table (or JSON)."""
    if not run.results:  # not the main process
        return
    if as_json:
        print(
            json.dumps({k: run.results[k] for k in ("bench", "model", "evaluator", "summary")}, default=float)
        )
    else:
        print(summary_table(run.results))
        print(f"trained {run.trained} edits; generated {run.generated} images, {run.cached} from the cache")
        print(f"results: {run.out_dir / 'results.json'}")
        if "html" in run.report:
            print(f"report:  {run.report['html']}  (and {run.report['markdown'].name})")
