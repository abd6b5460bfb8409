"""The customization suite of the engine (CustomConcept101's protocol, Kumari et al. 2023): single-concept rows,
compositions of pairs, the conditioning ceiling, and the relearning audit (:mod:`evaluation.relearn_suite`).

* **references**: per concept, a folder of images (all of them train; its two halves are the CLIP-I normalizer's
  two sets) or ``n_reference`` renders of an ``object`` by the bench's renderer (:mod:`evaluation.providers`),
  seed ``reference_seed``, with an independent set (``holdout_seed``) for the normalizer;
* **single concept** (every method row, one edit per concept): prompts ``template.format("<tok> class_word")``,
  scored by ``clip_i``, ``clip_i_rel``, ``clip_t`` (token removed), ``clip_t_rel`` (over the unedited model
  prompted without the token); the ceiling row inverts the whole conditioning on the references (CLIP-I only);
* **composition** (every pair of concepts): ``joint`` trains one run on both concepts (optionally over several
  training seeds), ``merge`` combines a method row's single-concept edits (:func:`customization.merge.merge`),
  ``hook`` puts a training-free editor (t2i-zero, a-star) on top of another composition; ``both_present`` by the
  bench's presence rule, plus ``known_pairs`` the unedited model already draws (the ceiling of the prompt set).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from conceptsmith import __version__
from conceptsmith.customization.conditioning_ceiling import invert_conditioning
from conceptsmith.customization.merge import merge, needs_pipeline
from conceptsmith.edits import Edit, compose
from conceptsmith.evaluation import relearn_suite
from conceptsmith.evaluation.bench_spec import resolve_method
from conceptsmith.evaluation.cache import compute_once, digest, edit_key, files_digest, load_images
from conceptsmith.evaluation.custom_parts import References, concept_references, customize, generate, score
from conceptsmith.evaluation.custom_spec import (
    CEILING,
    CONVENTIONS,
    ConceptSpec,
    CustomBench,
    HookSpec,
    JointSpec,
    MergeSpec,
    labels,
)
from conceptsmith.evaluation.metrics import clip_i, clip_t
from conceptsmith.evaluation.session import Row, Session
from conceptsmith.evaluation.summary import mean_summary
from conceptsmith.io import atomic_write
from conceptsmith.registry import EditRequest, get_editor

__all__ = ["KNOWN_PAIRS", "header", "rows", "select", "summaries", "summarize_rows"]

#: Row name of the unedited model composing ``known_pairs`` (the both_present ceiling of the prompt set).
KNOWN_PAIRS = "known-pairs"


def select(cfg: CustomBench, bench_path: Path | None, methods: Sequence[str] | None, edits: Sequence[Any]) -> set[str]:
    """The rows and compositions named by ``methods`` (``relearn``: the relearning audit; None: all)."""
    if edits:
        raise ValueError("saved edits (--edit) are scored by erasure benches; this bench is a customization bench")
    available = [*labels(cfg), *(["relearn"] if cfg.relearn else [])]
    if methods is None:
        return set(available)
    unknown = sorted(set(methods) - set(available))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; this bench has {available}")
    return set(methods)


def header(session: Session) -> dict[str, Any]:
    return {"presence": session.cfg.presence, "conventions": CONVENTIONS, "references": session.notes.get("references", {})}


def rows(session: Session, selected: set[str]) -> Iterator[Row]:
    yield from _single_rows(session, selected)
    yield from _composition_rows(session, selected)
    if session.cfg.relearn is not None and "relearn" in selected:
        yield from relearn_suite.rows(session)


def _ceiling_images(session: Session, concept: ConceptSpec, refs: References) -> tuple[str, dict]:
    """The conditioning ceiling of ``concept`` (inverted once, cached) and its images, one per seed."""
    cfg = session.cfg
    config = cfg.ceiling.model_copy(update={"progress": cfg.ceiling.progress and session.progress})
    settings = config.model_dump(exclude={"progress"})
    key = f"{CEILING}-{digest(settings, concept.word(), files_digest(refs.train), cfg.training_seed, __version__)}"
    path = session.cache / "edits" / f"{key}.safetensors"
    session.edits.fitted += compute_once(
        session.state, path, lambda: invert_conditioning(session.pipe, refs.train, concept.word(), config, cfg.training_seed),
        lambda states, target: atomic_write(target, lambda tmp: save_file({"prompt_embeds": states.contiguous()}, str(tmp))),
    )  # fmt: skip
    states = load_file(str(path))["prompt_embeds"]
    return key, {key: lambda: {"prompt_embeds": states}}


def _single_rows(session: Session, selected: set[str]) -> Iterator[Row]:
    """Per concept: the unedited model, every selected method row and the ceiling."""
    cfg, ev = session.cfg, session.evaluator
    for concept in cfg.concepts:
        refs = concept_references(session, concept)
        norm = clip_i(ev, *(load_images(s) for s in refs.pair))
        session.notes["references"][concept.token]["clip_i_ref"] = norm
        if not cfg.prompts:
            continue
        group = concept.token
        plain = [t.format(cfg.concept_phrase(concept, with_token=False)) for t in cfg.prompts]
        records = generate(session, "single", group, "unedited", "unedited", None, {p: p for p in plain})
        texts = [p for p in plain for _ in cfg.seeds]
        baseline = clip_t(ev, load_images([r.path for r in records]), texts)
        base = dict(references=refs.train, reference_norm=norm, clip_t_base=baseline)
        metrics = score(session, "single", records, texts=texts, **base)
        yield Row("single", group, "unedited", "unedited", metrics)
        prompts = [t.format(cfg.concept_phrase(concept)) for t in cfg.prompts]
        texts = [p for p in prompts for _ in cfg.seeds]
        for spec in (m for m in cfg.methods if m.label() in selected):
            edit, key = customize(session, spec, [(concept.token, concept.word(), refs.folder)])
            records = generate(session, "single", group, spec.label(), key, edit, {p: p for p in prompts})
            metrics = score(session, "single", records, texts=texts, tokens=[concept.token], **base)
            seconds = edit.metadata.get("training", {}).get("seconds")
            if seconds is not None:  # measured when the edit was trained (it may come from the cache)
                metrics["train_seconds"] = float(seconds)
            yield Row("single", group, spec.label(), key, metrics)
        if CEILING in selected:
            key, conditions = _ceiling_images(session, concept, refs)
            records = generate(session, "single", group, CEILING, key, None, conditions)
            yield Row("single", group, CEILING, key, score(session, "single", records, **base))


def _pair_prompts(cfg: CustomBench, a: ConceptSpec, b: ConceptSpec, with_token: bool) -> list[str]:
    phrases = {"a": cfg.concept_phrase(a, with_token), "b": cfg.concept_phrase(b, with_token)}
    return [t.format(**phrases) for t in cfg.composition_prompts]


def _training_seeds(cfg: CustomBench, comp: JointSpec | MergeSpec | HookSpec) -> list[int]:
    """The training seeds a composition is measured over: a joint run's own list, a hook's base composition's,
    else the bench's ``training_seed``."""
    if isinstance(comp, JointSpec) and comp.training_seeds:
        return comp.training_seeds
    if isinstance(comp, HookSpec):
        return _training_seeds(cfg, next(c for c in cfg.compositions if c.name == comp.on_top_of))
    return [cfg.training_seed]


def _composed(session: Session, comp: JointSpec | MergeSpec | HookSpec, a: ConceptSpec, b: ConceptSpec,
              seed: int) -> tuple[Edit, str]:  # fmt: skip
    """The edit of composition ``comp`` for the pair (a, b) trained with ``seed``: joint run, merge, or hook on
    another one."""
    cfg, memo = session.cfg, session.notes.setdefault("compositions", {})
    memo_key = (comp.name, a.token, b.token, seed)
    if memo_key in memo:
        return memo[memo_key]
    refs = session.notes["refs"]
    pair = [(c.token, c.word(), refs[c.token].folder) for c in (a, b)]
    if isinstance(comp, JointSpec):
        edit, _ = customize(session, comp.method, pair, seed=seed)
    elif isinstance(comp, MergeSpec):
        source = next(m for m in cfg.methods if m.label() == comp.source)
        parts = [customize(session, source, [p])[0] for p in pair]
        edit = merge(parts, comp.merge, pipe=session.pipe if needs_pipeline(comp.merge) else None, **comp.params)
    else:
        on = next(c for c in cfg.compositions if c.name == comp.on_top_of)
        method, params = resolve_method(comp.method, session.bench_path, comp.name)
        phrases = [cfg.concept_phrase(a), cfg.concept_phrase(b)]
        hook = get_editor(method)(params).fit(session.pipe, EditRequest(concepts=phrases))
        edit = compose([_composed(session, on, a, b, seed)[0], hook])
    memo[memo_key] = (edit, edit_key(edit, prefix=comp.name))
    return memo[memo_key]


def _composition_rows(session: Session, selected: set[str]) -> Iterator[Row]:
    """Per pair of concepts: the unedited model and every selected composition; then the known pairs."""
    cfg = session.cfg
    chosen = [c for c in cfg.compositions if c.name in selected]
    if not chosen:
        return
    for a, b in itertools.combinations(cfg.concepts, 2):
        group, pair = f"{a.token}+{b.token}", (a.noun(), b.noun())
        plain, prompts = _pair_prompts(cfg, a, b, False), _pair_prompts(cfg, a, b, True)
        context: dict[str, Any] = dict(pair=pair, prompt_groups=list(cfg.composition_prompts))
        for comp, seed in [(None, None)] + [(c, s) for c in chosen for s in _training_seeds(cfg, c)]:
            name = "unedited" if comp is None else comp.name
            several = comp is not None and len(_training_seeds(cfg, comp)) > 1
            edit, key = (None, "unedited") if comp is None else _composed(session, comp, a, b, seed)
            used = plain if comp is None else prompts
            records = generate(session, "composition", group, f"{name} @ seed {seed}" if several else name, key,
                               edit, {p: p for p in used})  # fmt: skip
            texts = [p for p in used for _ in cfg.seeds]
            if comp is None:
                context["clip_t_base"] = clip_t(session.evaluator, load_images([r.path for r in records]), texts)
            metrics = score(session, "composition", records, texts=texts, tokens=[a.token, b.token], **context)
            yield Row("composition", group, name, key, metrics, {} if comp is None else {"training_seed": seed})
    for known in cfg.known_pairs:
        group = "+".join(known)
        used = [t.format(a=known[0], b=known[1]) for t in cfg.composition_prompts]
        records = generate(session, "composition", group, KNOWN_PAIRS, "unedited", None, {p: p for p in used})
        metrics = score(session, "composition", records, pair=tuple(known), prompt_groups=list(cfg.composition_prompts))
        yield Row("composition", group, KNOWN_PAIRS, "unedited", metrics)


def summaries(cfg: CustomBench, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The results' summary entries: ``summary`` (:func:`summarize_rows`)."""
    return {"summary": summarize_rows(rows, cfg.relearn.concept if cfg.relearn else None, cfg.prompt_sets)}


def summarize_rows(rows: list[dict[str, Any]], relearn_concept: str | None = None,
                   prompt_sets: dict[str, list[str]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Method / composition -> metrics averaged over concepts or pairs (the unedited model's single-concept and
    composition numbers share one entry, single first); composition rows add ``both_present_by_prompt``,
    ``both_present_by_set`` (the mean over each prompt set's prompts) and, for several training runs,
    ``both_present_by_training_seed``; ``relearn``: :func:`evaluation.relearn_suite.summarize`."""
    summary: dict[str, Any] = {}

    def seconds(r: dict[str, Any]) -> Iterator[tuple[str, float]]:
        if "train_seconds" in r["metrics"]:
            yield "train_seconds", r["metrics"]["train_seconds"]

    for section in ("single", "composition"):
        mine = [r for r in rows if r["section"] == section]
        for name, entry in mean_summary(mine, extras=seconds, every_row=True).items():
            target = summary.setdefault(name, {})
            for k, v in entry.items():
                target.setdefault(k, v)
        for name in dict.fromkeys(r["method"] for r in mine if section == "composition"):
            summary[name] |= _by_prompt([r for r in mine if r["method"] == name], prompt_sets or {})
    relearn = relearn_suite.summarize(rows, relearn_concept)
    if relearn:
        summary["relearn"] = relearn
    return summary


def _by_prompt(entries: list[dict[str, Any]], prompt_sets: dict[str, list[str]]) -> dict[str, Any]:
    mine = [r["metrics"] for r in entries]
    out: dict[str, Any] = {}
    if mine and all("both_present_by_prompt" in m for m in mine):
        prompts = mine[0]["both_present_by_prompt"]
        by_prompt = {t: sum(m["both_present_by_prompt"][t] for m in mine) / len(mine) for t in prompts}
        out["both_present_by_prompt"] = by_prompt
        if prompt_sets:  # every prompt has one image per seed, so the mean of rates is the pooled rate
            out["both_present_by_set"] = {s: sum(by_prompt[t] for t in ts) / len(ts) for s, ts in prompt_sets.items()}
    by_seed: dict[Any, list[float]] = {}
    for r in entries:
        by_seed.setdefault(r.get("training_seed"), []).append(r["metrics"].get("both_present"))
    if len(by_seed) > 1:  # several training runs: their spread is part of the result
        out["both_present_by_training_seed"] = {str(seed): sum(v) / len(v) for seed, v in by_seed.items()}
    return out
