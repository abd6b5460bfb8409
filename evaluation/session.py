"""A benchmark run's shared state (:class:`Session`) and what suites yield (:class:`Row`): the pipeline, the two
caches, the evaluator, the accelerate state, the image records and the journal that lets a stopped run resume."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conceptsmith import __version__
from conceptsmith.devices import process_state
from conceptsmith.evaluation.bench_metrics import CUSTOM_METRICS, ERASURE_METRICS
from conceptsmith.evaluation.cache import EditCache, FittedEdit, ImageCache, digest, precision
from conceptsmith.evaluation.evaluators import load_evaluator
from conceptsmith.io import append_jsonl, read_jsonl
from conceptsmith.models import load_pipeline, resolve_model
from conceptsmith.registry import EditRequest

__all__ = ["ROWS_JOURNAL", "Row", "Session", "open_session"]

#: A run's finished rows, one JSON line each; removed once results.json is written.
ROWS_JOURNAL = "rows.jsonl"


@dataclass
class Row:
    """One scored row: its section (``erasure``; ``single``, ``composition``, ``relearn``), group (the task, the
    concept's token, the pair, the relearning task), the method label, the image-cache key of its edit, its metrics,
    and what else the kind records (editor, params, attacks, training seed, ...)."""

    section: str
    group: str
    method: str
    edit_key: str | None
    metrics: dict[str, Any]
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"section": self.section, "group": self.group, "method": self.method, "edit_key": self.edit_key,
                "metrics": self.metrics, **self.fields}  # fmt: skip


@dataclass
class Session:
    """One run's shared state: the config, the pipeline, the caches, the evaluator, the accelerate state, the
    image records every row adds, and the journal of finished rows."""

    cfg: Any
    bench_path: Path | None
    pipe: Any
    info: Any
    state: Any
    images: ImageCache
    edits: EditCache
    evaluator: Any
    cache_root: Path
    out_dir: Path
    progress: bool = True
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)  # what a suite adds to the results' top level
    judges: list[Any] = field(default_factory=list)  # erasure: the bench's judges (main process)
    inception: Any = None  # erasure: the FID / KID feature extractor when asked for (main process)

    @property
    def cache(self) -> Path:
        return self.images.root

    @property
    def metrics(self) -> list[str]:
        return list(self.cfg.metrics) if self.cfg.metrics is not None else list(default_metrics(self.cfg))

    @contextmanager
    def applied(self, edit: Any, scale: float = 1.0) -> Iterator[None]:
        """``edit`` applied to the pipeline at ``scale`` (nothing for ``None``), reverted however the block ends."""
        if edit is None:
            yield
            return
        edit.apply(self.pipe, scale=scale)
        try:
            yield
        finally:
            edit.revert(self.pipe)

    def generate(self, key: str, conditions: Sequence[tuple[str, Any]], desc: str) -> dict[tuple[str, int], Path]:
        """Images of every (condition, seed) of the bench with the pipeline as it is (``key`` names its edit)."""
        return self.images.run(key, conditions, self.cfg.seeds, desc=desc)

    def fit(self, method: str, params: dict[str, Any], request: EditRequest, **kw: Any) -> FittedEdit:
        """The edit of ``method`` for ``request``, from the edit cache or fitted now (:meth:`EditCache.fit`)."""
        return self.edits.fit(self.pipe, method, params, request, **kw)

    def record(self, kind: str, entries: list[dict[str, Any]]) -> None:
        """Add image records (``images``, ``attack_images``) to the results."""
        self.records.setdefault(kind, []).extend(entries)

    def row_key(self, *parts: Any) -> str:
        """The journal key of a row: the config, the model, the precision, the version and ``parts``."""
        return digest(self.cfg.model_dump(), self.info.fingerprint, precision(self.pipe), __version__, *parts)

    def resumed(self, key: str) -> Row | None:
        """The row a stopped run into the same folder finished under ``key`` (its records re-added), else None."""
        entry = self.finished.get(key)
        if entry is None:
            return None
        for kind, entries in entry["records"].items():
            self.record(kind, entries)
        return Row(**entry["row"])

    def finish_row(self, key: str, row: Row, records: dict[str, list[dict[str, Any]]]) -> Row:
        """Journal ``row`` (main process) and add its image records."""
        if self.state.is_main_process:
            append_jsonl(self.out_dir / ROWS_JOURNAL, {"key": key, "row": row.__dict__, "records": records}, default=float)
        for kind, entries in records.items():
            self.record(kind, entries)
        return row


def default_metrics(cfg: Any) -> tuple[str, ...]:
    """Every built-in metric of the bench's kind."""
    return CUSTOM_METRICS if cfg.kind == "customization" else ERASURE_METRICS


def open_session(cfg: Any, bench_path: Path | None, out_dir: Path, cache_dir: str | Path | None, *,
                 device: str | None, dtype: str | None, progress: bool) -> Session:  # fmt: skip
    """Load the model on this process's device and the evaluator (main process), open the caches and the journal."""
    target = resolve_model(cfg.model, dtype or cfg.dtype, device or cfg.device)
    state = process_state(target.device)
    pipe, info = load_pipeline(target.spec, target.dtype, target.device, target.single_file_config)
    pipe.set_progress_bar_config(disable=True)
    cache_root = Path(cache_dir) if cache_dir else out_dir / "cache"
    root = cache_root / info.fingerprint
    images = ImageCache(pipe, cfg.generation.pipeline_kwargs(), cfg.generation.batch_size, root, state, progress)
    # erasure rows are scored on the main process; a customization suite scores on every one (as it always did)
    scoring = state.is_main_process or cfg.kind == "customization"
    evaluator = load_evaluator(cfg.evaluator, device=pipe.device) if scoring else None
    try:
        finished = {e["key"]: e for e in read_jsonl(out_dir / ROWS_JOURNAL)}
    except (ValueError, KeyError, TypeError):
        finished = {}
    return Session(cfg, bench_path, pipe, info, state, images, EditCache(root, state), evaluator, cache_root,
                   out_dir, progress, finished=finished)  # fmt: skip


