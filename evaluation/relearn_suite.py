"""The relearning audit of a customization bench: erase a concept with each of ``relearn.erase``'s methods, then
customize every erased model with a new token on renders of that concept; ``relearn_rate`` is the share of images
judged to show the erased concept, for the unedited and each erased model (prompted with the concept's name) and
for each erased + customized model after each of ``relearn.checkpoints`` training steps (prompted with the token).

The checkpoints are one run per erasure: each count continues the previous count's training checkpoint (under
``<cache>/<base identity>/checkpoints/``; exact, since the training loop re-seeds every step), so the edit at a
count equals, and is cached as, a run of that many steps. ``steps_to_50`` (:func:`steps_to_rate`) is the
interpolated step count at which the rate first reaches 0.5, the erased model counting as 0 steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from conceptsmith.edits import Edit, compose
from conceptsmith.evaluation.bench_spec import MethodSpec, resolve_method
from conceptsmith.evaluation.cache import edit_key
from conceptsmith.evaluation.custom_parts import customization_request, customize, generate, rendered, score
from conceptsmith.evaluation.session import Row, Session
from conceptsmith.registry import EditRequest
from conceptsmith.train_checkpoints import latest_checkpoint

__all__ = ["rows", "steps_to_rate", "summarize"]


def _steps(session: Session) -> list[int]:
    """The evaluated step counts of the relearning customization: its checkpoints, else its ``steps``."""
    spec = session.cfg.relearn
    return spec.checkpoints or [resolve_method(spec.method, session.bench_path, "relearn.method")[1]["steps"]]


def _with_steps(spec: MethodSpec, steps: int) -> MethodSpec:
    return spec.model_copy(update={"params": {**spec.params, "steps": steps}})


def _resumable(folder: Path, steps: int) -> bool:
    """Whether a run of ``steps`` can continue the latest checkpoint in ``folder`` (none, or not beyond ``steps``:
    a checkpoint list that gained a smaller count trains that count afresh)."""
    latest = latest_checkpoint(folder)
    return latest is None or int(latest.stem.rsplit("-", 1)[1]) <= steps


def _customize_steps(session: Session, concepts: Sequence[tuple[str, str, Path]], on: Edit) -> list[Edit]:
    """The relearning customization on top of ``on`` after each evaluated step count: one run, each count resuming
    the checkpoint the previous count left."""
    spec, steps = session.cfg.relearn.method, _steps(session)
    if len(steps) == 1:
        return [customize(session, _with_steps(spec, steps[0]), concepts, on=on)[0]]
    method, params = resolve_method(spec, session.bench_path, spec.label())
    request = customization_request(concepts, session.cfg.training_seed)
    run = session.edits.key(method, {k: v for k, v in params.items() if k != "steps"}, request, on)
    folder = session.cache / "checkpoints" / f"{method}-{run}"
    return [customize(session, _with_steps(spec, n), concepts, on=on,
                      runtime={"checkpoint_dir": str(folder), "resume": _resumable(folder, n)})[0]
            for n in steps]  # fmt: skip


def _rate_row(session: Session, group: str, name: str, edit: Edit | None, key: str, prompts: list[str],
              erase: str | None, steps: int | None) -> Row:  # fmt: skip
    """One relearning row: how often ``edit``'s images of ``prompts`` are judged to show the erased concept."""
    records = generate(session, "relearn", group, name, key, edit, {p: p for p in prompts})
    metrics = score(session, "relearn", records, relearned=session.cfg.relearn.concept)
    return Row("relearn", group, name, key, metrics, {"erase": erase, "steps": steps})


def _erasure_rows(session: Session, erase: MethodSpec, group: str, folder: Path) -> Iterator[Row]:
    """The erased model (0 steps, prompted with the concept's name) and the erased + customized model after each
    checkpoint (prompted with the new token)."""
    spec, label = session.cfg.relearn, erase.label()
    method, params = resolve_method(erase, session.bench_path, "relearn.erase")
    request = EditRequest(concepts=[spec.concept], preserve=list(spec.preserve), seed=session.cfg.training_seed)
    erased = session.fit(method, params, request)
    yield _rate_row(session, group, label, erased.edit, erased.key, [t.format(spec.concept) for t in spec.prompts], label, 0)
    prompts = [t.format(spec.token_phrase()) for t in spec.prompts]
    customized = _customize_steps(session, [(spec.token, spec.class_word, folder)], erased.edit)
    for n, custom in zip(_steps(session), customized, strict=True):
        both = compose([erased.edit, custom])
        yield _rate_row(session, group, f"{label} +{n} steps", both, edit_key(both, prefix="relearn"), prompts, label, n)


def rows(session: Session) -> Iterator[Row]:
    """Unedited, then per erasure method the erased model and the erased + customized model at each checkpoint."""
    cfg, spec = session.cfg, session.cfg.relearn
    group = f"relearn:{spec.concept}"
    folder, train = rendered(session, spec.concept, cfg.reference_seed)
    session.notes.setdefault("references", {})[group] = {"train": [str(p) for p in train]}
    yield _rate_row(session, group, "unedited", None, "unedited", [t.format(spec.concept) for t in spec.prompts], None, None)
    for erase in spec.erase:
        yield from _erasure_rows(session, erase, group, folder)


def steps_to_rate(points: Sequence[tuple[int, float]], level: float = 0.5) -> float | None:
    """The step count at which the rate first reaches ``level``, linearly interpolated between the (steps, rate)
    ``points`` (increasing steps); None if it never does."""
    if points and points[0][1] >= level:
        return float(points[0][0])
    for (s0, r0), (s1, r1) in itertools.pairwise(points):
        if r1 >= level:
            return s0 + (level - r0) / (r1 - r0) * (s1 - s0)
    return None


def summarize(rows: list[dict[str, Any]], concept: str | None) -> dict[str, Any]:
    """Erasure label -> the concept, the unedited and erased rates, the rate by customization steps and
    ``steps_to_50``."""
    mine = [r for r in rows if r["section"] == "relearn"]
    unedited = next((r["metrics"]["relearn_rate"] for r in mine if r["erase"] is None), None)
    out: dict[str, Any] = {}
    for r in (r for r in mine if r["erase"] is not None):
        entry = out.setdefault(r["erase"], {"concept": concept, "unedited": unedited, "erased": None, "by_steps": {}})
        if r["steps"]:
            entry["by_steps"][str(r["steps"])] = r["metrics"]["relearn_rate"]
        else:
            entry["erased"] = r["metrics"]["relearn_rate"]
    for entry in out.values():
        points = [(0, entry["erased"]), *((int(n), rate) for n, rate in entry["by_steps"].items())]
        entry["steps_to_50"] = steps_to_rate(points)
    return out
