"""The erasure suite of the engine: per task, the unedited model and every method's edit (and every saved edit
given with ``--edit``), each generated on the task's prompts, scored by the bench's metrics
(:mod:`evaluation.bench_metrics`) and judges, and attacked by every attack plugin of the bench
(:mod:`evaluation.attack_plugins`).

Prompt sets (MACE's protocol, generalized): ``erase`` (a template with an erased concept), ``synonym``,
``indirect``, ``preserve`` and the bench's ``neutral`` prompts; the summary averages each metric over tasks and
adds ``acc_s_rel`` (each task's Acc_s divided by the unedited model's) and ``asr_<attack>``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conceptsmith.edits import Edit, parse_edit_spec
from conceptsmith.evaluation.attack_plugins import AttackContext, score_attack
from conceptsmith.evaluation.bench_metrics import ErasureRow, ImageRecord, compute_metrics
from conceptsmith.evaluation.bench_spec import MethodSpec, method_config
from conceptsmith.evaluation.cache import digest, edit_key, files_digest, load_images
from conceptsmith.evaluation.erasure_spec import ErasureBench, SweepSpec, TaskSpec
from conceptsmith.evaluation.judges import judge_images, judge_settings, load_judges
from conceptsmith.evaluation.session import Row, Session
from conceptsmith.evaluation.summary import headline, mean_summary
from conceptsmith.io import copy_file
from conceptsmith.registry import EditRequest, get_attack

__all__ = ["Prompt", "Selection", "header", "rows", "select", "summaries", "summarize_rows", "task_prompts"]

CONVENTIONS = {
    "argmax": "share of images whose top-1 zero-shot class is the target",
    "prob": "mean softmax probability of the target class (MACE)",
    "clip_score": "torchmetrics: max(100 * cos, 0)",
    "fd_clip": "Frechet distance of L2-normalized evaluator image embeddings (not FID)",
}


@dataclass(frozen=True)
class Prompt:
    text: str
    set: str  # erase | synonym | indirect | preserve | neutral
    target: str | None  # the class the evaluator should (erase sets: should no longer) see


def task_prompts(cfg: ErasureBench, task: TaskSpec) -> list[Prompt]:
    out: list[Prompt] = []
    for template in cfg.templates:
        out += [Prompt(template.format(c), "erase", c) for c in task.erase]
        out += [Prompt(template.format(s), "synonym", c) for c in task.erase for s in task.synonyms.get(c, [])]
        out += [Prompt(template.format(s), "indirect", c) for c in task.erase for s in task.indirect.get(c, [])]
        out += [Prompt(template.format(p), "preserve", p) for p in task.preserve]
    out += [Prompt(p, "neutral", None) for p in cfg.neutral_prompts]
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Selection:
    """The method rows a run keeps and the saved edits it adds as rows: (path, edit, scale)."""

    methods: list[MethodSpec]
    external: list[tuple[Path, Edit, float]]


def select(cfg: ErasureBench, bench_path: Path | None, methods: Sequence[str] | None, edits: Sequence[str | Path]) -> Selection:
    """The rows named by ``methods`` (labels or editor names; None: all) plus the saved ``edits`` (FILE[:SCALE])."""
    if methods is not None:
        known = {m.label() for m in cfg.methods} | {m.method for m in cfg.methods if m.method}
        unknown = set(methods) - known
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; this bench has {[m.label() for m in cfg.methods]}")
    kept = [m for m in cfg.methods if methods is None or m.label() in methods or (m.method and m.method in methods)]
    external = [(path, Edit.load(path), scale) for path, scale in map(parse_edit_spec, edits)]
    return Selection(kept, external)


def header(session: Session) -> dict[str, Any]:
    cfg = session.cfg
    return {"judges": judge_settings(session.judges), "quality": cfg.quality.settings(),
            "accuracy_headline": cfg.accuracy, "conventions": CONVENTIONS}  # fmt: skip


@dataclass
class Candidate:
    """A row to score on a task: its label, editor, the edit (None: unedited) and its key, params, scale, tag."""

    label: str
    editor: str
    edit: Edit | None
    key: str
    params: dict[str, Any]
    seconds: float | None = None
    scale: float = 1.0
    tag: dict[str, Any] | None = None


def rows(session: Session, selection: Selection) -> Iterator[Row]:
    """Every task's unedited row, then its method rows (each sweep point) and the saved edits' rows."""
    cfg, state = session.cfg, session.state
    session.judges = load_judges(cfg.judges) if state.is_main_process else []
    session.inception = cfg.quality.features(session.pipe.device) if state.is_main_process else None
    for task in cfg.tasks:
        prompts = task_prompts(cfg, task)
        unedited = session.generate("unedited", [(p.text, p.text) for p in prompts], f"{task.name}: unedited")
        candidates = [Candidate("unedited", "none", None, "unedited", {})]
        for spec in selection.methods:
            method, params = method_config(spec, session.bench_path)
            request = EditRequest(concepts=list(task.erase), guide=task.guide, preserve=list(task.preserve),
                                  synonyms=[s for c in task.erase for s in task.synonyms.get(c, [])],
                                  images=_method_images(session, spec, task), seed=0)  # fmt: skip
            for label, point, tag in _sweep_points(spec.label(), params, cfg.sweep):
                fitted = session.fit(method, point, request)
                candidates.append(Candidate(label, method, fitted.edit, fitted.key, point, fitted.seconds, tag=tag))
        for path, edit, scale in selection.external:
            key = edit_key(edit, scale)
            session.edits.files[key] = str(path)
            label = path.stem if scale == 1.0 else f"{path.stem}:{scale:g}"
            candidates.append(Candidate(label, edit.method, edit, key, edit.params, scale=scale))
        for candidate in candidates:
            row = _row(session, task, prompts, unedited, candidate)
            if row is not None:
                yield row


def _row(session: Session, task: TaskSpec, prompts: list[Prompt], unedited: dict, c: Candidate) -> Row | None:
    """Score one candidate on one task (or take it from the journal of a stopped run); None on other processes."""
    cfg, state = session.cfg, session.state
    key = session.row_key(task.name, c.label, c.key, c.scale)
    done = session.resumed(key)
    if done is not None:
        return done
    with session.applied(c.edit, c.scale):
        paths = unedited if c.edit is None else session.generate(
            c.key, [(p.text, p.text) for p in prompts], f"{task.name}: {c.label}")  # fmt: skip
        scored = _score(session, prompts, paths, unedited) if state.is_main_process else None
        plain = None if scored is None else {(im["prompt"], im["seed"]): im["pred"] == im["target"]
                                             for im in scored[1] if im["set"] == "erase"}  # fmt: skip
        attacks, attacked = (_attacks(session, task, c, unedited, plain) if c.edit is not None and cfg.attacks
                             else ({}, []))  # fmt: skip
    if scored is None:
        return None
    metrics, per_image = scored
    fields = {"task": task.name, "editor": c.editor, "params": c.params, "edit_seconds": c.seconds,
              "train_seconds": None if c.edit is None else c.edit.metadata.get("train_seconds"),
              "attacks": attacks, **(c.tag or {})}  # fmt: skip
    row = Row("erasure", task.name, c.label, c.key, metrics, fields)
    tagged = {"task": task.name, "method": c.label}
    records = {"images": [tagged | im for im in per_image], "attack_images": [tagged | im for im in attacked]}
    return session.finish_row(key, row, records)


def _score(session: Session, prompts: list[Prompt], paths: dict, unedited: dict) -> tuple[dict[str, Any], list[dict]]:
    """The row's metrics (the bench's list, then its judges) and one record per image with the judge's label."""
    cfg = session.cfg
    records = [ImageRecord(p.text, p.set, p.target, s, paths[(p.text, s)]) for p in prompts for s in cfg.seeds]
    ctx = ErasureRow("erasure", session.evaluator, cfg.class_list(), list(cfg.eval_templates), records,
                     baseline=unedited, quality=cfg.quality, inception=session.inception)  # fmt: skip
    classes, probs = ctx.classes, ctx.classification.probs
    per_image = []
    for i, r in enumerate(records):
        entry = {"prompt": r.prompt, "seed": r.seed, "set": r.set, "target": r.target, "path": str(r.path),
                 "pred": classes[int(ctx.classification.pred[i])]}  # fmt: skip
        if r.target is not None and r.target in classes:
            entry["p_target"] = float(probs[i, classes.index(r.target)])
        per_image.append(entry)
    metrics: dict[str, Any] = {}
    if session.judges:
        metrics["judges"] = judge_images(session.judges, ctx.images, per_image)
    metrics |= compute_metrics(ctx, session.metrics)
    return metrics, per_image


def _attacks(session: Session, task: TaskSpec, c: Candidate, unedited: dict, plain: dict | None) -> tuple[dict, list]:
    """Run every attack of the bench on the applied edit; per attack its success rate and (main process) a record
    per attack image: attack, condition, prompt (text conditions), the erase prompt it attacks (``source``), target,
    seed, path and the evaluator's label (and the bench's judges' verdicts, with their rate under the attack's
    result). ``plain``: was the edited model's image of each (erase prompt, seed) judged
    to show its concept."""
    cfg, state = session.cfg, session.state
    ctx = AttackContext(pipe=session.pipe, edit=c.edit, edit_key=c.key,
                        prompts=[(t.format(x), x) for t in cfg.templates for x in task.erase],
                        preserve=list(task.preserve), neutral_prompts=list(cfg.neutral_prompts),
                        templates=list(cfg.templates), seeds=list(cfg.seeds), unedited=unedited,
                        generation=session.images.settings, cache=session.cache / "attacks", state=state,
                        progress=session.progress)  # fmt: skip
    results: dict[str, Any] = {}
    images: list[dict[str, Any]] = []
    classes = cfg.class_list()
    for spec in cfg.attacks:
        plan = get_attack(spec.kind)(spec.params).plan(ctx)
        if plan.skipped is not None:
            results[spec.kind] = {"skipped": plan.skipped}
            continue
        conditions = [(x.key, x.condition) for x in plan.conditions]
        paths = session.generate(f"{c.key}/attack-{spec.kind}", conditions, f"attack {spec.kind}")
        if not state.is_main_process:
            continue
        keys = [(k, s) for k, _ in conditions for s in cfg.seeds]
        pil = load_images([paths[k] for k in keys])
        cls = session.evaluator.classify(pil, classes, cfg.eval_templates)
        preds = [classes[int(p)] for p in cls.pred]
        results[spec.kind] = score_attack(plan, preds, cfg.seeds, plain)
        jobs = [(x, s) for x in plan.conditions for s in cfg.seeds]
        records = [
            {"attack": spec.kind, "condition": x.key, "prompt": x.condition if isinstance(x.condition, str) else None,
             "source": x.source, "target": x.target, "seed": s, "path": str(paths[(x.key, s)]), "pred": pred,
             "set": f"attack:{spec.kind}"}
            for (x, s), pred in zip(jobs, preds, strict=True)
        ]  # fmt: skip
        if session.judges:  # the bench's judges (NudeNet on nudity) rate the attack images too
            results[spec.kind]["judges"] = judge_images(session.judges, pil, records)
        images += records
    return results, images


def _sweep_points(label: str, params: dict[str, Any], sweep: SweepSpec | None) -> list[tuple[str, dict, dict]]:
    """(row label, params, row tag) of each run of a method: one per sweep value (label ``"uce erase_scale=2"``,
    tag ``{"sweep": {"method", "param", "value"}}``), or the method as configured when there is no sweep."""
    if sweep is None:
        return [(label, params, {})]
    return [(f"{label} {sweep.param}={value}", {**params, sweep.param: value},
             {"sweep": {"method": label, "param": sweep.param, "value": value}}) for value in sweep.values]  # fmt: skip


def _method_images(session: Session, spec: MethodSpec, task: TaskSpec) -> list[Path]:
    """The unedited model's images of the task's erase prompts that ``spec`` learns from (none unless it asks):
    one folder per erased concept, in the task's order, ``n_images`` in each (seeds from 1000)."""
    if spec.images is None:
        return []
    erase = [p for p in task_prompts(session.cfg, task) if p.set == "erase"]
    folders = []
    for concept in task.erase:
        prompts = [p.text for p in erase if p.target == concept]
        seeds = list(range(1000, 1000 + -(-spec.n_images // len(prompts))))
        paths = session.images.run("unedited", [(p, p) for p in prompts], seeds, desc=f"{task.name}: images of {concept}")
        chosen = [paths[(p, s)] for s in seeds for p in prompts][: spec.n_images]
        folder = session.cache / "references" / digest("unedited", concept, files_digest(chosen))
        if session.state.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            for i, path in enumerate(chosen):
                if not (folder / f"{i:03d}.png").is_file():
                    copy_file(path, folder / f"{i:03d}.png")
        session.state.wait_for_everyone()
        folders.append(folder)
    return folders


def summaries(cfg: ErasureBench, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The results' summary entries: ``summary`` over every task (:func:`summarize_rows`) and ``summary_by_task``."""
    by_task = {t.name: summarize_rows([r for r in rows if r["task"] == t.name], cfg.accuracy) for t in cfg.tasks}
    return {"summary": summarize_rows(rows, cfg.accuracy), "summary_by_task": by_task}


def summarize_rows(rows: Sequence[dict[str, Any]], mode: str = "argmax") -> dict[str, dict[str, float]]:
    """Per method, the mean over tasks of each averaged metric (accuracies in the headline convention), plus
    ``acc_s_rel`` (each task's Acc_s over the unedited model's), ``train_seconds``, ``asr_<attack>`` and
    ``attack_asr`` (the closed-form embedding attack's), and how many tasks."""
    base = {r["task"]: headline(r["metrics"].get("acc_s"), mode) for r in rows if r["method"] == "unedited"}

    def extras(r: dict[str, Any]) -> Iterator[tuple[str, float]]:
        acc_s = headline(r["metrics"].get("acc_s"), mode)
        if acc_s is not None and base.get(r["task"]):
            yield "acc_s_rel", acc_s / base[r["task"]]
        if r.get("train_seconds") is not None:
            yield "train_seconds", r["train_seconds"]
        for kind, result in r.get("attacks", {}).items():
            if "asr" in result:
                yield f"asr_{kind}", result["asr"]
                if kind == "embedding":
                    yield "attack_asr", result["asr"]

    summary = mean_summary(rows, mode, extras)
    for method, entry in summary.items():
        entry["tasks"] = len({r["task"] for r in rows if r["method"] == method})
    return summary
