"""A customization bench (``kind: customization``): novel concepts (a folder of reference images, or an object a
renderer draws), single-concept method rows, compositions of pairs (joint training, merges, training-free hooks
on top), the conditioning ceiling and the relearning audit (erase a concept, customize the erased model on it).

Protocol (CustomConcept101, Kumari et al. 2023): CLIP-I against the training references, normalized by the
references' CLIP-I against an independent set; CLIP-T with the new token removed, normalized by the unedited
model's; ``both_present`` of composed pairs by a presence rule (:mod:`evaluation.providers`).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from conceptsmith.config import ConfigError, StrictModel
from conceptsmith.customization.conditioning_ceiling import CeilingConfig
from conceptsmith.customization.merge_methods import MERGE_METHODS
from conceptsmith.evaluation.bench_spec import BenchBase, MethodSpec, resolve_method, resolve_path
from conceptsmith.evaluation.providers import PRESENCE_RULES, get_renderer
from conceptsmith.images import find_images
from conceptsmith.registry import get_editor

__all__ = [
    "CEILING",
    "CONVENTIONS",
    "ConceptSpec",
    "CustomBench",
    "HookSpec",
    "JointSpec",
    "MergeSpec",
    "RelearnSpec",
    "check_custom_bench",
    "labels",
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
    object: str | None = Field(None, description="an object the bench's `renderer` draws as references")
    images: str | None = Field(None, description="folder of reference images (instead of `object`)")
    class_word: str | None = Field(None, description="class word in prompts (default: the object's name)")

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

    concept: str = Field(description="the erased concept (the bench's `renderer` draws its references)")
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


class CustomBench(BenchBase):
    kind: Literal["customization"]
    training_seed: int = 0
    classes: list[str] = Field(min_length=2, description="zero-shot label set (both_present, relearning)")
    renderer: str | None = Field(None, description="draws the references of concepts given as `object` (shapes)")
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
    presence: str = Field("top2", description=f"presence rule: {' | '.join(PRESENCE_RULES)}")
    ceiling: CeilingConfig | None = Field(
        None,
        description="settings of the conditioning-ceiling row: the whole conditioning inverted on each concept's "
        "references, an upper reference for textual inversion",
    )
    methods: list[MethodSpec] = Field(default_factory=list)
    compositions: list[Composition] = Field(default_factory=list)
    relearn: RelearnSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CustomBench:
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


def labels(cfg: CustomBench) -> list[str]:
    ceiling = [CEILING] if cfg.ceiling is not None else []
    return [m.label() for m in cfg.methods] + ceiling + [c.name for c in cfg.compositions]


def _check_references(cfg: CustomBench, path: Path | None) -> None:
    """Folders hold >= 2 images; objects are the renderer's."""
    source = path or "config"
    renderer = get_renderer(cfg.renderer) if cfg.renderer else None
    drawn = [c.object for c in cfg.concepts if c.object is not None] + ([cfg.relearn.concept] if cfg.relearn else [])
    if drawn and renderer is None:
        raise ConfigError(f"{source}: {drawn} are drawn by a renderer: set `renderer: shapes` (ShapesWorld), "
                          "or give reference folders (`images:`)")
    for obj in drawn:
        try:
            renderer.check(obj)
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
    for concept in cfg.concepts:
        if concept.images is None:
            continue
        try:
            files = find_images(resolve_path(concept.images, path, f"reference images of '{concept.token}'"))
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"{source}: concept '{concept.token}': {err}") from None
        if len(files) < 2:
            raise ConfigError(
                f"{source}: concept '{concept.token}': needs >= 2 reference images, has {len(files)}"
            )


def _check_names(cfg: CustomBench, path: Path | None) -> None:
    source, names = path or "config", labels(cfg)
    if len(set(names)) != len(names) or {"unedited", "relearn"} & set(names):
        raise ConfigError(f"{source}: method and composition names must be unique, not unedited/relearn: {names}")
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


def _method_specs(cfg: CustomBench) -> list[tuple[str, MethodSpec]]:
    specs = [(m.label(), m) for m in cfg.methods]
    specs += [(c.name, c.method) for c in cfg.compositions if not isinstance(c, MergeSpec)]
    if cfg.relearn:
        specs += [(f"relearn.erase '{m.label()}'", m) for m in cfg.relearn.erase]
        specs += [("relearn.method", cfg.relearn.method)]
    return specs


def _check_relearn(spec: RelearnSpec, path: Path | None) -> None:
    """The relearning customization trains (it has ``steps``); several checkpoints continue one run, so its
    learning rate must not depend on ``steps`` and ``steps`` must not be set beside them."""
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


def check_custom_bench(cfg: CustomBench, path: Path | None) -> None:
    """Every method (registered, valid params), name reference and image folder, before any work."""
    for where, spec in _method_specs(cfg):
        resolve_method(spec, path, where)
    if cfg.relearn:
        _check_relearn(cfg.relearn, path)
    _check_references(cfg, path)
    _check_names(cfg, path)
    if cfg.presence not in PRESENCE_RULES:
        raise ConfigError(f"{path or 'config'}: unknown presence rule {cfg.presence!r}; known: {', '.join(PRESENCE_RULES)}")
