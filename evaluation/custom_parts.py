"""What the customization suite and the relearning audit share: reference sets, fitting customizations through
the engine's edit cache, generating a row's images and scoring them with the bench's metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conceptsmith.edits import Edit
from conceptsmith.evaluation.bench_metrics import CustomRow, ImageRecord, compute_metrics
from conceptsmith.evaluation.bench_spec import MethodSpec, resolve_method, resolve_path
from conceptsmith.evaluation.custom_spec import ConceptSpec
from conceptsmith.evaluation.providers import get_renderer
from conceptsmith.evaluation.session import Session
from conceptsmith.images import find_images
from conceptsmith.registry import EditRequest, get_editor

__all__ = ["References", "concept_references", "customization_request", "customize", "generate", "rendered", "score"]


@dataclass(frozen=True)
class References:
    folder: Path  # the training references (the customization editors read folders)
    train: list[Path]  # the files of ``folder``: CLIP-I is measured against them
    pair: tuple[list[Path], list[Path]]  # two independent sets of the object: the CLIP-I normalizer


# ---- references and edits ----------------------------------------------------------------------------------
def rendered(session: Session, obj: str, seed: int) -> tuple[Path, list[Path]]:
    """(folder, files) of ``n_reference`` renders of ``obj`` with ``seed`` by the bench's renderer, cached."""
    folder = session.cache_root / "references" / f"{obj}-{seed}-{session.cfg.n_reference}"
    return folder, get_renderer(session.cfg.renderer).files(obj, session.cfg.n_reference, seed, folder)


def concept_references(session: Session, concept: ConceptSpec) -> References:
    """Training references and the normalizer's two sets: renders with ``reference_seed`` and ``holdout_seed``, or
    a folder (all files for training; its two halves for the normalizer)."""
    cfg = session.cfg
    if concept.object is not None:
        folder, train = rendered(session, concept.object, cfg.reference_seed)
        refs = References(folder, train, (train, rendered(session, concept.object, cfg.holdout_seed)[1]))
    else:
        folder = resolve_path(str(concept.images), session.bench_path, f"reference images of '{concept.token}'")
        train = find_images(folder)
        refs = References(folder, train, (train[: len(train) // 2], train[len(train) // 2 :]))
    session.notes.setdefault("refs", {})[concept.token] = refs
    session.notes.setdefault("references", {})[concept.token] = {
        "train": [str(p) for p in train], "pair": [[str(p) for p in s] for s in refs.pair]}  # fmt: skip
    return refs


def _runtime(session: Session, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run-time settings that do not change the result: the class-image cache, progress bars."""
    fields, out = get_editor(method).Config.model_fields, {}
    if "class_data_dir" in fields and not params.get("class_data_dir"):
        out["class_data_dir"] = str(session.cache / "class-images")
    if "progress" in fields:
        out["progress"] = bool(params.get("progress", True)) and session.progress
    return out


def customize(session: Session, spec: MethodSpec, concepts: Sequence[tuple[str, str, Path]], on: Edit | None = None,
              seed: int | None = None, runtime: dict[str, Any] | None = None) -> tuple[Edit, str]:  # fmt: skip
    """``spec`` fitted (or loaded) on ``concepts`` = [(token, class word, reference folder)] on top of the edit
    ``on`` with training ``seed`` (default: the bench's); returns (edit, image-cache key)."""
    method, params = resolve_method(spec, session.bench_path, spec.label())
    request = customization_request(concepts, session.cfg.training_seed if seed is None else seed)
    fitted = session.fit(method, params, request, on=on, runtime=_runtime(session, method, params) | (runtime or {}))
    return fitted.edit, fitted.key


def customization_request(concepts: Sequence[tuple[str, str, Path]], seed: int) -> EditRequest:
    tokens, words, folders = (list(x) for x in zip(*concepts, strict=True))
    return EditRequest(concepts=[], tokens=tokens, class_words=words, images=[Path(f) for f in folders], seed=seed)


# ---- generation and rows ------------------------------------------------------------------------------------
def generate(session: Session, section: str, group: str, method: str, key: str, edit: Edit | None,
             conditions: dict[str, Any]) -> list[ImageRecord]:  # fmt: skip
    """Images of every (condition, seed) with ``edit`` applied, condition-major; recorded in the results' images
    (prompt ``None`` for embeddings)."""
    with session.applied(edit):
        paths = session.generate(key, list(conditions.items()), f"{group}: {method}")
    out = [ImageRecord(c if isinstance(c, str) else None, "generated", None, s, paths[(k, s)])
           for k, c in conditions.items() for s in session.cfg.seeds]  # fmt: skip
    session.record("images", [{"section": section, "group": group, "method": method, "prompt": r.prompt,
                               "seed": r.seed, "path": str(r.path)} for r in out])  # fmt: skip
    return out


def score(session: Session, section: str, records: list[ImageRecord], **context: Any) -> dict[str, Any]:
    """The bench's metrics of ``section`` on ``records`` with the row's ``context`` (:class:`CustomRow` fields)."""
    cfg = session.cfg
    ctx = CustomRow(section, session.evaluator, list(cfg.classes), list(cfg.eval_templates), records,
                    presence=cfg.presence, **context)  # fmt: skip
    return compute_metrics(ctx, session.metrics)


