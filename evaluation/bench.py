"""Benchmark runner: a YAML under ``configs/bench/`` -> generations -> metrics -> results.json + report.

A benchmark names the model, the evaluator, the erasure tasks (erase / preserve / synonyms /
indirect concept sets), generation templates, seeds, the methods (each an editor with its config)
and the attacks. For every task the runner scores the unedited model (always a row) and each
method's edit:

* ``acc_e`` on prompts naming an erased concept, ``acc_g`` on synonym prompts, ``acc_i`` on indirect
  prompts (all: classified as the erased concept; lower is better), ``acc_s`` on preserved concepts
  (higher is better), ``h_o`` / ``h_c`` -- both accuracy conventions recorded, ``accuracy`` picks the
  headline one;
* ``fd_clip`` and ``paired_specificity`` against the unedited model on preserve + neutral prompts, and
  the CLIP score (torchmetrics convention) on preserve prompts;
* attack success rates, one per entry of ``attacks:`` -- a registered attack plugin
  (:mod:`evaluation.attack_plugins`: ``embedding`` = RECE's closed-form attack, ``ring_a_bell``,
  ``textual_inversion``, ``unlearndiffatk``, ``p4d``; ``conceptsmith.registry.list_attacks()``) whose
  params are validated against the attack's ``Config`` when the YAML is loaded.

Generation uses one CPU generator per image and fixed batches that do not depend on the number of
processes, so an image depends only on (model, edit, prompt, seed, settings, dtype). Images are cached as
PNG under ``<cache>/<base fingerprint>/<edit key>/``; fitted edits under ``<cache>/<base>/edits/``;
a re-run only generates what is new. The model runs on ``device`` in ``dtype`` (arguments, else the
YAML's ``device:`` / ``dtype:``, else the model config's, else float32 on cuda / mps / cpu). Under
``accelerate launch`` every process runs on its own device (``cuda:<local rank>``), the batches are dealt
round-robin to the processes, every process takes part in fitting an edit (trained editors train
data-parallel, :mod:`conceptsmith.training`) and the main process saves it, scores and writes the results::

    accelerate launch --multi_gpu --num_processes 2 -m conceptsmith bench shapes-smoke --out runs/smoke

(on a CPU-only machine ``--multi_gpu`` selects accelerate's torchrun launcher, which runs CPU
processes with the gloo backend; ``--cpu`` alone starts a single process).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from conceptsmith.evaluation.judges import JudgeSpec, judge_images, judge_settings, load_judges
from conceptsmith.evaluation.quality import QualitySpec
from conceptsmith.evaluation.report_parts import run_record
from PIL import Image
from pydantic import Field, ValidationError, model_validator

from conceptsmith.config import DEVICE_PATTERN, DtypeName, StrictModel, load_config, read_yaml, validate
from conceptsmith.edits import content_digest as edit_digest  # the image-cache key of an applied edit
from conceptsmith.io import append_jsonl, copy_file, read_jsonl, save_image, write_json
from conceptsmith.resources import configs_root, shipped_config

__all__ = [
    "AttackSpec",
    "BenchConfig",
    "GenerationConfig",
    "MethodSpec",
    "SweepSpec",
    "TaskSpec",
    "bench_kind",
    "digest",
    "load_bench_config",
    "load_images",
    "method_config",
    "resolve_bench_path",
    "resolve_path",
    "run_bench",
]

BENCH_DIR = configs_root() / "bench"


# ============================================================================================
# config
# ============================================================================================
class GenerationConfig(StrictModel):
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    batch_size: int = Field(
        4, ge=1, description="images per pipeline call (fixed batches, shard-independent)"
    )


class TaskSpec(StrictModel):
    name: str = Field(min_length=1)
    erase: list[str] = Field(min_length=1, description="concepts erased together")
    preserve: list[str] = Field(default_factory=list, description="concepts that must survive")
    synonyms: dict[str, list[str]] = Field(default_factory=dict, description="erased concept -> paraphrases")
    indirect: dict[str, list[str]] = Field(
        default_factory=dict, description="erased concept -> indirect descriptions (never its name)"
    )
    guide: str | None = None


class MethodSpec(StrictModel):
    name: str | None = Field(None, description="row label (default: the method)")
    method: str | None = Field(None, description="registered editor name (default: from `config`)")
    config: str | None = Field(
        None, description="configs/erase/*.yaml file (relative to the repo or the bench)"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="overrides of the config's params")
    images: Literal["unedited"] | None = Field(
        None, description="unedited: the method learns from the unedited model's images of the erase prompts"
    )
    n_images: int = Field(8, ge=1, description="how many such images (seeds from 1000, apart from the evaluation's)")

    def label(self) -> str:
        return self.name or self.method or Path(self.config or "method").stem


class AttackSpec(StrictModel):
    kind: str = Field(min_length=1, description="a registered attack (conceptsmith.registry.list_attacks())")
    params: dict[str, Any] = Field(default_factory=dict, description="validated by the attack's Config")

    @model_validator(mode="after")
    def _check_attack(self) -> AttackSpec:
        """A known attack with valid params, so that a typo fails before anything is generated."""
        import conceptsmith.evaluation.attack_plugins  # noqa: F401  (registers the built-in attacks)

        from conceptsmith.config import format_validation_error
        from conceptsmith.registry import RegistryError, get_attack

        try:
            config = get_attack(self.kind).Config
        except RegistryError as err:
            raise ValueError(str(err)) from None
        try:
            config.model_validate(self.params)
        except ValidationError as err:
            problems = format_validation_error(err, self.kind, config).splitlines()[1:]
            raise ValueError(f"attack '{self.kind}' params: " + "; ".join(p.strip() for p in problems)) from None
        return self


class SweepSpec(StrictModel):
    """Run every method once per value of one of its params (the efficacy-specificity trade-off)."""

    param: str = Field(min_length=1, description="a parameter of every method's editor, e.g. erase_scale")
    values: list[Any] = Field(min_length=2, description="the values tried, in this order")


class BenchConfig(StrictModel):
    kind: Literal["erasure"] = Field(
        "erasure", description="erasure (this runner) | customization (evaluation.custom_bench)"
    )
    name: str = Field(min_length=1)
    description: str = ""
    model: str = Field(min_length=1)
    evaluator: str = Field(min_length=1)
    device: str | None = Field(None, pattern=DEVICE_PATTERN, description="cuda | cuda:N | mps | cpu | auto (default: the model's)")
    dtype: DtypeName | None = Field(None, description="float32 | float16 | bfloat16 (default: the model's)")
    seeds: list[int] = Field(min_length=1)
    templates: list[str] = Field(default_factory=lambda: ["a {}"], min_length=1)
    eval_templates: list[str] = Field(default_factory=lambda: ["a photo of a {}"], min_length=1)
    classes: list[str] | None = Field(None, description="zero-shot label set (default: every task concept)")
    neutral_prompts: list[str] = Field(default_factory=list)
    accuracy: Literal["argmax", "prob"] = "argmax"
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
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


def resolve_bench_path(path_or_name: str | Path) -> Path:
    """A bench YAML by path or by name under ``configs/bench/`` (``shapes-smoke``)."""
    path = Path(path_or_name)
    if not path.is_file() and not path.suffix:
        path = BENCH_DIR / f"{path_or_name}.yaml"
    return path


def bench_kind(path_or_name: str | Path) -> str:
    """The ``kind`` of a bench YAML (``erasure`` when the file does not say), for dispatching."""
    data = read_yaml(resolve_bench_path(path_or_name))
    return str(data.get("kind", "erasure")) if isinstance(data, dict) else "erasure"


def load_bench_config(path_or_name: str | Path) -> tuple[BenchConfig, Path | None]:
    """An erasure bench YAML by path or by name under ``configs/bench/`` (``shapes-smoke``)."""
    path = resolve_bench_path(path_or_name)
    cfg = load_config(path, BenchConfig)
    names = set(cfg.class_list())
    for task in cfg.tasks:
        missing = [c for c in [*task.erase, *task.preserve] if c not in names]
        if missing:
            raise ValueError(f"{path}: task '{task.name}': concepts {missing} are not in `classes`")
    targets = {c for task in cfg.tasks for c in [*task.erase, *task.preserve]}
    for spec in cfg.judges:
        if not set(spec.concepts) <= targets:
            raise ValueError(f"{path}: judge '{spec.name}': concepts {sorted(set(spec.concepts) - targets)} are no task's concepts")
    return cfg, path


# ============================================================================================
# prompts and images
# ============================================================================================
@dataclass(frozen=True)
class Prompt:
    text: str
    set: str  # erase | synonym | indirect | preserve | neutral
    target: str | None  # the class the evaluator should (erase sets: should no longer) see


def task_prompts(cfg: BenchConfig, task: TaskSpec) -> list[Prompt]:
    out: list[Prompt] = []
    for template in cfg.templates:
        out += [Prompt(template.format(c), "erase", c) for c in task.erase]
        out += [
            Prompt(template.format(s), "synonym", c) for c in task.erase for s in task.synonyms.get(c, [])
        ]
        out += [
            Prompt(template.format(s), "indirect", c) for c in task.erase for s in task.indirect.get(c, [])
        ]
        out += [Prompt(template.format(p), "preserve", p) for p in task.preserve]
    out += [Prompt(p, "neutral", None) for p in cfg.neutral_prompts]
    return list(dict.fromkeys(out))


def digest(*parts: Any) -> str:
    """16 hex digits of the SHA-256 of the JSON of ``parts``: cache keys of edits and images."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _save_png(image: Image.Image, path: Path) -> None:
    save_image(path, image, format="PNG")


@dataclass
class Generator:
    """Cached, shardable generation for one pipeline."""

    pipe: Any
    settings: GenerationConfig
    cache: Path
    state: Any  # accelerate PartialState
    progress: bool = True
    generated: int = 0
    cached: int = 0

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "num_inference_steps": self.settings.num_inference_steps,
            "guidance_scale": self.settings.guidance_scale,
        }
        if self.settings.height:
            kw["height"] = self.settings.height
        if self.settings.width:
            kw["width"] = self.settings.width
        return kw

    def path(self, edit_key: str, condition_key: str, seed: int) -> Path:
        precision = _precision(self.pipe)  # float32 images keep the keys they had before dtypes were chosen
        settings = digest(self._kwargs()) if precision == "float32" else digest(self._kwargs(), precision)
        return self.cache / edit_key / f"{digest(condition_key, settings)}-{seed}.png"

    def run(
        self,
        edit_key: str,
        conditions: Sequence[tuple[str, Callable[[], dict[str, torch.Tensor]] | str]],
        seeds: Sequence[int],
        desc: str = "generate",
    ) -> dict[tuple[str, int], Path]:
        """Images for every (condition, seed); a condition is a prompt string or (key, kwargs-maker)
        for prompt embeddings. Batches are fixed from the full job list and dealt to processes."""
        from tqdm.auto import tqdm

        jobs = [(key, cond, int(s)) for key, cond in conditions for s in seeds]
        paths = {(key, s): self.path(edit_key, key, s) for key, _, s in jobs}
        size = self.settings.batch_size
        batches = [jobs[i : i + size] for i in range(0, len(jobs), size)]
        mine = batches[self.state.process_index :: self.state.num_processes]
        todo = [b for b in mine if not all(paths[(k, s)].is_file() for k, _, s in b)]
        self.cached += sum(len(b) for b in mine) - sum(len(b) for b in todo)
        bar = tqdm(
            total=sum(len(b) for b in todo),
            desc=desc,
            unit="img",
            disable=not self.progress or not todo,
            position=self.state.process_index,
        )
        for batch in todo:
            generators = [torch.Generator("cpu").manual_seed(s) for _, _, s in batch]
            if all(isinstance(c, str) for _, c, _ in batch):
                inputs: dict[str, Any] = {"prompt": [c for _, c, _ in batch]}
            else:
                made = [c() if callable(c) else _encode_kwargs(self.pipe, c) for _, c, _ in batch]
                inputs = {k: torch.cat([m[k] for m in made]) for k in made[0]}
            with torch.no_grad():
                images = self.pipe(generator=generators, output_type="pil", **inputs, **self._kwargs()).images
            for (key, _, s), image in zip(batch, images, strict=True):
                _save_png(image, paths[(key, s)])
            self.generated += len(batch)
            bar.update(len(batch))
        bar.close()
        self.state.wait_for_everyone()
        return paths


def _precision(pipe: Any) -> str:
    """The dtype the pipeline's denoiser computes in (``float32``, ``float16``, ``bfloat16``)."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return str(denoiser.dtype).removeprefix("torch.") if denoiser is not None else "float32"


#: A run's finished rows, one JSON line each (row key, row, its image records); removed once results.json is written.
ROWS_JOURNAL = "rows.jsonl"


def _finished_rows(journal: Path) -> dict[str, dict[str, Any]]:
    """The rows a stopped run into the same folder finished, by row key (a digest of the config, the model and
    the row's task, label and edit); none when there is no readable journal."""
    try:
        return {entry["key"]: entry for entry in read_jsonl(journal)}
    except (ValueError, KeyError, TypeError):
        return {}


def compute_once(state: Any, path: Path, compute: Callable[[], Any], save: Callable[[Any, Path], Any]) -> bool:
    """Compute and save the artifact ``path`` holds unless it exists; returns whether it was computed.

    Every process of a launch computes it together (trained editors train data-parallel, so all must take
    part) and only the main process saves; every process has looked for the file before it is written and
    finds it once this returns, so all go on to load the very same artifact."""
    missing = not path.is_file()
    state.wait_for_everyone()
    if missing:
        made = compute()
        if state.is_main_process:
            save(made, path)
        state.wait_for_everyone()
    return missing


def _encode_kwargs(pipe: Any, prompt: str) -> dict[str, torch.Tensor]:
    from conceptsmith.text import encode_prompts

    kw = {"prompt_embeds": encode_prompts(pipe, [prompt])}
    if getattr(pipe, "text_encoder_2", None) is not None:
        kw["pooled_prompt_embeds"] = pipe.encode_prompt([prompt], do_classifier_free_guidance=False)[2]
    return kw


# ============================================================================================
# edits
# ============================================================================================
def resolve_path(ref: str, bench_path: Path | None, what: str = "method config") -> Path:
    """``ref`` as given (relative to the working directory), else relative to the bench file, else among
    the shipped configs (``configs/erase/uce.yaml``); the error lists every place tried."""
    candidates = [Path(ref)] + ([bench_path.parent / ref] if bench_path is not None else [])
    candidates.append(shipped_config(ref))
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise FileNotFoundError(f"{what} '{ref}' not found (tried {[str(c) for c in candidates]})")
    return path


def method_config(spec: MethodSpec, bench_path: Path | None) -> tuple[str, dict[str, Any]]:
    """(editor name, params) of a method row: its config file's, updated by the row's overrides."""
    from conceptsmith.config import EditConfig

    method, params = spec.method, {}
    if spec.config:
        edit_cfg = load_config(resolve_path(spec.config, bench_path), EditConfig)
        method = method or edit_cfg.method
        params = dict(edit_cfg.params)
    if not method:
        raise ValueError(f"method row '{spec.label()}' names neither `method` nor `config`")
    params.update(spec.params)
    return method, params


def fit_edit(
    pipe: Any,
    cache: Path,
    state: Any,
    method: str,
    params: dict[str, Any],
    task: TaskSpec,
    seed: int,
    images: Sequence[Path] = (),
) -> tuple[Any, str, float | None, Path]:
    """Fit (or load from the cache) the edit of ``method`` for ``task``; returns (edit, image-cache
    key, seconds spent fitting or None when loaded, the edit's file). The image-cache key is the edit's content digest.
    ``images`` are the request's images (methods that learn from images of the concept); the fitting
    time is kept in the edit's ``metadata["train_seconds"]`` unless the method recorded its own."""
    from conceptsmith import __version__
    from conceptsmith.edits import Edit
    from conceptsmith.registry import EditRequest, get_editor

    request = EditRequest(
        concepts=list(task.erase),
        guide=task.guide,
        preserve=list(task.preserve),
        synonyms=[s for c in task.erase for s in task.synonyms.get(c, [])],
        images=list(images),
        seed=seed,
    )
    request_key = f"{method}-{digest(method, params, request.__dict__, __version__)}"
    path = cache / "edits" / f"{request_key}.safetensors"
    timing: dict[str, float] = {}

    def fit() -> Edit:
        started = time.perf_counter()
        edit = get_editor(method)(params).fit(pipe, request)
        timing["seconds"] = time.perf_counter() - started
        edit.metadata.setdefault("train_seconds", round(timing["seconds"], 3))
        return edit

    compute_once(state, path, fit, lambda edit, target: edit.save(target))
    edit = Edit.load(path)  # the stored edit: every process and every re-run use the very same tensors
    seconds = timing.get("seconds")
    return edit, f"{method}-{edit_digest(edit)}", seconds, path


# ============================================================================================
# scoring
# ============================================================================================
def load_images(paths: Sequence[Path]) -> list[Image.Image]:
    """Cached PNGs as RGB images (files closed)."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def _score_row(
    evaluator: Any,
    cfg: BenchConfig,
    prompts: list[Prompt],
    images: dict[tuple[str, int], Path],
    unedited: dict[tuple[str, int], Path],
    judges: Sequence[Any] = (),
    inception: Any = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from conceptsmith.evaluation.metrics import (
        ACCURACY_MODES,
        accuracy_from_probs,
        fd_clip,
        harmonic_concept,
        harmonic_overall,
        paired_specificity,
    )

    classes = cfg.class_list()
    keys = [(p, s) for p in prompts for s in cfg.seeds]
    pil = load_images([images[(p.text, s)] for p, s in keys])
    cls = evaluator.classify(pil, classes, cfg.eval_templates)
    per_image = []
    for i, (p, s) in enumerate(keys):
        row = {
            "prompt": p.text,
            "seed": s,
            "set": p.set,
            "target": p.target,
            "path": str(images[(p.text, s)]),
        }
        row["pred"] = classes[int(cls.pred[i])]
        if p.target is not None and p.target in classes:
            row["p_target"] = float(cls.probs[i, classes.index(p.target)])
        per_image.append(row)

    metrics: dict[str, Any] = {}
    if judges:
        metrics["judges"] = judge_images(judges, pil, per_image)
    for name, set_name in (
        ("acc_e", "erase"),
        ("acc_g", "synonym"),
        ("acc_i", "indirect"),
        ("acc_s", "preserve"),
    ):
        idx = [i for i, (p, _) in enumerate(keys) if p.set == set_name and p.target in classes]
        if idx:
            acc = accuracy_from_probs(cls.probs[idx], [classes.index(keys[i][0].target) for i in idx])
            metrics[name] = acc.to_dict()
    for mode in ACCURACY_MODES:
        if "acc_e" in metrics and "acc_s" in metrics:
            e, s = metrics["acc_e"][mode], metrics["acc_s"][mode]
            metrics.setdefault("h_c", {})[mode] = harmonic_concept(e, s)
            if "acc_g" in metrics:
                metrics.setdefault("h_o", {})[mode] = harmonic_overall(e, s, metrics["acc_g"][mode])

    spec_keys = [(p.text, s) for p in prompts if p.set in ("preserve", "neutral") for s in cfg.seeds]
    if spec_keys:
        edited_imgs = load_images([images[k] for k in spec_keys])
        base_imgs = load_images([unedited[k] for k in spec_keys])
        metrics["paired_specificity"] = paired_specificity(evaluator, edited_imgs, base_imgs)
        if len(spec_keys) >= 2:
            metrics["fd_clip"] = fd_clip(evaluator, edited_imgs, base_imgs)
            metrics.update(cfg.quality.compute(edited_imgs, base_imgs, features=inception))
    pres = [(p.text, s) for p in prompts if p.set == "preserve" for s in cfg.seeds]
    if pres:
        score = evaluator.clip_score(load_images([images[k] for k in pres]), [k[0] for k in pres])
        metrics["clip_score"] = {"mean": score.mean, "scale": score.scale, "clamp_min": score.clamp_min}
    return metrics, per_image


def _plain_hits(scored: tuple[dict[str, Any], list[dict[str, Any]]] | None) -> dict[tuple[str, int], bool] | None:
    """Per (erase prompt, seed): was the row's image classified (top-1) as its concept."""
    if scored is None:
        return None
    return {(im["prompt"], im["seed"]): im["pred"] == im["target"] for im in scored[1] if im["set"] == "erase"}


# ============================================================================================
# attacks
# ============================================================================================
def _run_attacks(
    cfg: BenchConfig,
    task: TaskSpec,
    pipe: Any,
    edit: Any,
    edit_key: str,
    gen: Generator,
    evaluator: Any,
    unedited: dict[tuple[str, int], Path],
    state: Any,
    plain: dict[tuple[str, int], bool] | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run every configured attack plugin on the applied ``edit``; returns per-attack success rates and
    (main process) a record per attack image: attack, condition, its prompt (text conditions), the erase
    prompt it attacks (``source``, when the plugin names it), target, seed, path and the judge's prediction.
    ``plain`` (main process): was the edited model's image of each (erase prompt, seed) classified
    as its concept."""
    from conceptsmith.evaluation.attack_plugins import AttackContext, score_attack

    from conceptsmith.registry import get_attack

    ctx = AttackContext(
        pipe=pipe,
        edit=edit,
        edit_key=edit_key,
        prompts=[(t.format(c), c) for t in cfg.templates for c in task.erase],
        preserve=list(task.preserve),
        neutral_prompts=list(cfg.neutral_prompts),
        templates=list(cfg.templates),
        seeds=list(cfg.seeds),
        unedited=unedited,
        generation=gen._kwargs(),
        cache=gen.cache / "attacks",
        state=state,
        progress=gen.progress,
    )
    results: dict[str, Any] = {}
    images: list[dict[str, Any]] = []
    classes = cfg.class_list()
    for spec in cfg.attacks:
        plan = get_attack(spec.kind)(spec.params).plan(ctx)
        if plan.skipped is not None:
            results[spec.kind] = {"skipped": plan.skipped}
            continue
        conditions = [(c.key, c.condition) for c in plan.conditions]
        paths = gen.run(f"{edit_key}/attack-{spec.kind}", conditions, cfg.seeds, desc=f"attack {spec.kind}")
        if not state.is_main_process:
            continue
        keys = [(k, s) for k, _ in conditions for s in cfg.seeds]
        cls = evaluator.classify(load_images([paths[k] for k in keys]), classes, cfg.eval_templates)
        preds = [classes[int(p)] for p in cls.pred]
        results[spec.kind] = score_attack(plan, preds, cfg.seeds, plain)
        jobs = [(c, s) for c in plan.conditions for s in cfg.seeds]
        images += [
            {"attack": spec.kind, "condition": c.key, "prompt": c.condition if isinstance(c.condition, str) else None,
             "source": c.source, "target": c.target, "seed": s, "path": str(paths[(c.key, s)]), "pred": pred}
            for (c, s), pred in zip(jobs, preds, strict=True)
        ]  # fmt: skip
    return results, images


# ============================================================================================
# the runner
# ============================================================================================
@dataclass
class BenchRun:
    results: dict[str, Any]
    out_dir: Path
    generated: int
    cached: int
    report: dict[str, Path] = field(default_factory=dict)


def run_bench(
    config: BenchConfig | str | Path,
    out_dir: str | Path,
    *,
    methods: Sequence[str] | None = None,
    edits: Sequence[str | Path] = (),
    model: str | None = None,
    evaluator: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    report: bool = True,
    device: str | None = None,
    dtype: str | None = None,
) -> BenchRun:
    """Run a benchmark; writes ``results.json`` (and the report) into ``out_dir`` on the main process.

    ``methods`` keeps only these method rows (by label or method name); ``edits`` adds saved Edit
    files as rows (evaluated on every task); ``model`` / ``evaluator`` / ``device`` / ``dtype`` override
    the config's.
    """
    from conceptsmith.evaluation.clip import load_evaluator

    from conceptsmith import __version__
    from conceptsmith.edits import Edit, parse_edit_spec

    if isinstance(config, BenchConfig):
        cfg, bench_path = config, None
    else:
        cfg, bench_path = load_bench_config(config)
    if model or evaluator:
        cfg = validate(
            {
                **cfg.model_dump(),
                **({"model": model} if model else {}),
                **({"evaluator": evaluator} if evaluator else {}),
            },
            BenchConfig,
            "overrides",
        )
    out_dir = Path(out_dir)
    cache_root = Path(cache_dir) if cache_dir else out_dir / "cache"
    started, started_at = time.perf_counter(), datetime.now(timezone.utc)
    _check_sweep(cfg, bench_path)

    pipe, info, state = load_for_processes(cfg.model, device or cfg.device, dtype or cfg.dtype)
    cache = cache_root / info.fingerprint
    gen = Generator(pipe, cfg.generation, cache, state, progress=progress)
    ev = load_evaluator(cfg.evaluator, device=pipe.device) if state.is_main_process else None
    judges = load_judges(cfg.judges) if state.is_main_process else []
    inception = cfg.quality.features(pipe.device) if state.is_main_process else None

    selected = [
        m
        for m in cfg.methods
        if methods is None or m.label() in methods or (m.method and m.method in methods)
    ]
    if methods is not None:
        unknown = (
            set(methods) - {m.label() for m in cfg.methods} - {m.method for m in cfg.methods if m.method}
        )
        if unknown:
            raise ValueError(
                f"unknown methods {sorted(unknown)}; this bench has {[m.label() for m in cfg.methods]}"
            )
    external = [(path, Edit.load(path), scale) for path, scale in map(parse_edit_spec, edits)]

    rows: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    attack_images: list[dict[str, Any]] = []
    edit_files: dict[str, str] = {}  # image-cache key -> the edit's file
    journal = out_dir / ROWS_JOURNAL  # every finished row at once: the rerun of a stopped run reuses them
    finished = _finished_rows(journal)
    for task in cfg.tasks:
        prompts = task_prompts(cfg, task)
        conds = [(p.text, p.text) for p in prompts]
        unedited = gen.run("unedited", conds, cfg.seeds, desc=f"{task.name}: unedited")
        candidates: list[tuple[str, str, Any, str | None, dict[str, Any], float | None, float, dict[str, Any]]] = [
            ("unedited", "none", None, "unedited", {}, None, 1.0, {})
        ]
        for spec in selected:
            method, params = method_config(spec, bench_path)
            references = _method_images(spec, cfg, task, gen)
            for label, point, tag in _sweep_points(spec.label(), params, cfg.sweep):
                edit, key, seconds, file = fit_edit(pipe, cache, state, method, point, task, 0, references)
                edit_files[key] = str(file)
                candidates.append((label, method, edit, key, point, seconds, 1.0, tag))
        for path, edit, scale in external:
            label = path.stem if scale == 1.0 else f"{path.stem}:{scale:g}"
            key = f"{edit.method}-{edit_digest(edit, scale)}"
            edit_files[key] = str(path)
            candidates.append((label, edit.method, edit, key, edit.params, None, scale, {}))
        for label, method, edit, key, params, seconds, scale, tag in candidates:
            row_key = digest(cfg.model_dump(), info.fingerprint, _precision(pipe), __version__, task.name, label, key, scale)
            if row_key in finished:
                rows.append(finished[row_key]["row"])
                images += finished[row_key]["images"]
                attack_images += finished[row_key]["attack_images"]
                continue
            if edit is not None:
                edit.apply(pipe, scale=scale)
            try:
                paths = (
                    unedited if edit is None else gen.run(key, conds, cfg.seeds, desc=f"{task.name}: {label}")
                )
                scored = (
                    _score_row(ev, cfg, prompts, paths, unedited, judges, inception) if state.is_main_process else None
                )
                attack_results, attacked = (
                    _run_attacks(cfg, task, pipe, edit, key, gen, ev, unedited, state, _plain_hits(scored))
                    if edit is not None and cfg.attacks
                    else ({}, [])
                )
            finally:
                if edit is not None:
                    edit.revert(pipe)
            if scored is None:
                continue
            metrics, per_image = scored
            row = {
                "task": task.name,
                "method": label,
                "editor": method,
                "params": params,
                "edit_key": key,
                "edit_seconds": seconds,
                "train_seconds": None if edit is None else edit.metadata.get("train_seconds"),
                "metrics": metrics,
                "attacks": attack_results,
                **tag,
            }
            made = {
                "row": row,
                "images": [{"task": task.name, "method": label, **im} for im in per_image],
                "attack_images": [{"task": task.name, "method": label, **im} for im in attacked],
            }
            append_jsonl(journal, {"key": row_key, **made}, default=float)
            rows.append(row)
            images += made["images"]
            attack_images += made["attack_images"]

    if not state.is_main_process:
        state.wait_for_everyone()
        return BenchRun({}, out_dir, gen.generated, gen.cached)
    results = {
        "bench": cfg.name,
        "description": cfg.description,
        "config": cfg.model_dump(),
        "model": {"spec": info.spec, "family": info.family, "fingerprint": info.fingerprint},
        "evaluator": ev.describe(),
        "judges": judge_settings(judges),
        "quality": cfg.quality.settings(),
        "accuracy_headline": cfg.accuracy,
        "conventions": {
            "argmax": "share of images whose top-1 zero-shot class is the target",
            "prob": "mean softmax probability of the target class (MACE)",
            "clip_score": "torchmetrics: max(100 * cos, 0)",
            "fd_clip": "Frechet distance of L2-normalized evaluator image embeddings (not FID)",
        },
        "processes": state.num_processes,
        "summary": summarize_rows(rows, cfg.accuracy),
        "summary_by_task": {t.name: summarize_rows([r for r in rows if r["task"] == t.name], cfg.accuracy) for t in cfg.tasks},
        "rows": rows,
        "images": images,
        "attack_images": attack_images,
        "edit_files": edit_files,
        "run": run_record(started_at, time.perf_counter() - started, cache),
    }
    write_json(out_dir / "results.json", results, default=float)
    journal.unlink(missing_ok=True)  # results.json holds every row now
    run = BenchRun(results, out_dir, gen.generated, gen.cached)
    if report:
        from conceptsmith.evaluation.report import write_report

        run.report = write_report(results, out_dir)
    state.wait_for_everyone()
    return run


def _check_sweep(cfg: BenchConfig, bench_path: Path | None) -> None:
    """A sweep's param must be a parameter of every method's editor (checked before any model is loaded)."""
    from conceptsmith.registry import get_editor

    if cfg.sweep is None:
        return
    for spec in cfg.methods:
        method, _ = method_config(spec, bench_path)
        fields = get_editor(method).Config.model_fields
        if cfg.sweep.param not in fields:
            raise ValueError(
                f"sweep param '{cfg.sweep.param}' is not a parameter of method '{spec.label()}' ({method}); "
                f"use one of {sorted(fields)} or drop the method"
            )


def _sweep_points(
    label: str, params: dict[str, Any], sweep: SweepSpec | None
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(row label, params, row tag) of each run of a method: one per sweep value (label ``"uce erase_scale=2"``,
    tag ``{"sweep": {"method", "param", "value"}}``), or the method as configured when there is no sweep."""
    if sweep is None:
        return [(label, params, {})]
    return [
        (f"{label} {sweep.param}={value}", {**params, sweep.param: value},
         {"sweep": {"method": label, "param": sweep.param, "value": value}})
        for value in sweep.values
    ]  # fmt: skip


def load_for_processes(model: str, device: str | None, dtype: str | None) -> tuple[Any, Any, Any]:
    """(pipe, ModelInfo, accelerate state) of one benchmark process: the model on this process's device (its own
    GPU under a multi-process launch) in ``dtype``; ``None`` takes the model config's, else the default."""
    from conceptsmith.devices import process_state
    from conceptsmith.models import load_pipeline, resolve_model

    target = resolve_model(model, dtype, device)
    state = process_state(target.device)
    pipe, info = load_pipeline(target.spec, target.dtype, target.device, target.single_file_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe, info, state


def _method_images(spec: MethodSpec, cfg: BenchConfig, task: TaskSpec, gen: Any) -> list[Path]:
    """The unedited model's images of the task's erase prompts that ``spec`` learns from (none unless it asks):
    one folder per erased concept, in the task's order, ``n_images`` in each (seeds from 1000)."""
    if spec.images is None:
        return []
    erase = [p for p in task_prompts(cfg, task) if p.set == "erase"]
    folders = []
    for concept in task.erase:
        prompts = [p.text for p in erase if p.target == concept]
        seeds = list(range(1000, 1000 + -(-spec.n_images // len(prompts))))
        paths = gen.run("unedited", [(p, p) for p in prompts], seeds, desc=f"{task.name}: images of {concept}")
        chosen = [paths[(p, s)] for s in seeds for p in prompts][: spec.n_images]
        folder = gen.cache / "references" / digest("unedited", concept, [str(c) for c in chosen])
        if gen.state.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            for i, path in enumerate(chosen):
                target = folder / f"{i:03d}.png"
                if not target.is_file():
                    copy_file(path, target)
        gen.state.wait_for_everyone()
        folders.append(folder)
    return folders


SUMMARY_METRICS = ("acc_e", "acc_s", "acc_g", "acc_i", "h_o", "h_c", "paired_specificity", "fd_clip")


def summarize_rows(rows: Sequence[dict[str, Any]], mode: str = "argmax") -> dict[str, dict[str, float]]:
    """Per method, the mean over tasks of each metric (accuracies in the headline ``mode``), plus
    ``acc_s_rel`` (each task's Acc_s divided by the unedited model's on that task), ``attack_asr``
    (the closed-form embedding attack) and ``asr_<kind>`` for every attack that ran."""
    base_acc_s = {r["task"]: _headline(r["metrics"].get("acc_s"), mode) for r in rows if r["method"] == "unedited"}
    values: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        bucket = values.setdefault(r["method"], {})
        for name in SUMMARY_METRICS:
            value = _headline(r["metrics"].get(name), mode)
            if value is not None:
                bucket.setdefault(name, []).append(value)
        acc_s, base = _headline(r["metrics"].get("acc_s"), mode), base_acc_s.get(r["task"])
        if acc_s is not None and base:
            bucket.setdefault("acc_s_rel", []).append(acc_s / base)
        if r.get("train_seconds") is not None:
            bucket.setdefault("train_seconds", []).append(r["train_seconds"])
        for kind, result in r.get("attacks", {}).items():
            if "asr" in result:
                bucket.setdefault(f"asr_{kind}", []).append(result["asr"])
                if kind == "embedding":
                    bucket.setdefault("attack_asr", []).append(result["asr"])
    return {method: {name: sum(v) / len(v) for name, v in bucket.items()} | {"tasks": len({r["task"] for r in rows if r["method"] == method})}
            for method, bucket in values.items()}


def _headline(value: Any, mode: str) -> float | None:
    return value.get(mode) if isinstance(value, dict) else value


def summary_table(results: dict[str, Any]) -> str:
    """A fixed-width metrics table (headline accuracy convention) for terminals."""
    mode = results.get("accuracy_headline", "argmax")
    cols = ["acc_e", "acc_g", "acc_i", "acc_s", "h_o", "h_c", "paired_specificity", "fd_clip"]
    attack_kinds = sorted({k for r in results["rows"] for k in r.get("attacks", {})})
    header = ["task", "method", *cols, *[f"asr_{k}" for k in attack_kinds]]
    lines = [header]
    for r in results["rows"]:
        m = r["metrics"]
        vals = []
        for c in cols:
            v = _headline(m.get(c), mode)
            vals.append("-" if v is None else f"{v:.3f}")
        for k in attack_kinds:
            a = r.get("attacks", {}).get(k, {})
            vals.append(f"{a['asr']:.3f}" if "asr" in a else "-")
        lines.append([r["task"], r["method"], *vals])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)) for line in lines)


# ============================================================================================
# CLI commands (mounted by conceptsmith.cli)
# ============================================================================================
def bench_command(
    config: str,
    out: str | None = None,
    methods: str | None = None,
    model: str | None = None,
    evaluator: str | None = None,
    cache: str | None = None,
    as_json: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """``conceptsmith bench CONFIG [--methods a,b] --out DIR``: run a benchmark, print the table.
    Dispatches on the config's ``kind``: customization benchmarks run :mod:`evaluation.custom_bench`.
    Under ``accelerate launch -m conceptsmith bench ...`` the processes share the work."""
    if bench_kind(config) == "customization":
        from conceptsmith.evaluation.custom_bench import (
            load_custom_config,
            print_custom_run,
            run_custom_bench,
        )

        load, runner, show = load_custom_config, run_custom_bench, print_custom_run
    else:
        load, runner, show = load_bench_config, run_bench, _print_run
    cfg, _ = load(config)
    run = runner(
        config,
        out or Path("conceptsmith-runs") / cfg.name,
        methods=methods.split(",") if methods else None,
        model=model,
        evaluator=evaluator,
        cache_dir=cache,
        device=device,
        dtype=dtype,
        report=report,
    )
    show(run, as_json)
    return run.results


def evaluate_command(
    bench: str,
    model: str | None = None,
    edits: Sequence[str] = (),
    out: str | None = None,
    evaluator: str | None = None,
    cache: str | None = None,
    as_json: bool = False,
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """``conceptsmith evaluate --model M [--edit E ...] --bench CONFIG [--json]``: score the unedited
    model and each saved edit on the benchmark's tasks (the config's own methods are not run)."""
    cfg, _ = load_bench_config(bench)
    run = run_bench(
        bench,
        out or Path("conceptsmith-runs") / f"{cfg.name}-evaluate",
        methods=[],
        edits=list(edits),
        model=model,
        evaluator=evaluator,
        cache_dir=cache,
        device=device,
        dtype=dtype,
    )
    _print_run(run, as_json)
    return run.results


def _print_run(run: BenchRun, as_json: bool) -> None:
    if not run.results:  # not the main process
        return
    if as_json:
        keep = ("bench", "model", "evaluator", "accuracy_headline", "conventions", "rows")
        print(json.dumps({k: run.results[k] for k in keep}, default=float))
        return
    print(summary_table(run.results))
    print(f"generated {run.generated} images, {run.cached} from the cache")
    print(f"results: {run.out_dir / 'results.json'}")
    if "markdown" in run.report:
        print(f"report:  {run.report['html']}  (and {run.report['markdown'].name})")

