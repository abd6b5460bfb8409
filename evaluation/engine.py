"""The benchmark engine: a bench YAML -> fit -> apply -> generate -> score -> revert, row by row -> ``results.json``
and ``report.html``.

One engine runs both kinds of bench (``kind: erasure``, the default, and ``kind: customization``): it loads the
model once, keeps the two caches (:mod:`evaluation.cache`), resumes a stopped run from its row journal, and hands
a :class:`Session` to the kind's suite (:mod:`evaluation.erasure_suite`, :mod:`evaluation.custom_suite`), which
yields typed :class:`Row` s; the suite's summary, the run record and one report writer finish the run. The model
runs on ``device`` in ``dtype`` (arguments, else the YAML's, else the model config's). Under ``accelerate
launch`` every process runs on its own device, generation batches are dealt round-robin to the processes, every
process takes part in fitting an edit and the main process saves it, scores and writes the results::

    accelerate launch --multi_gpu --num_processes 2 -m conceptsmith bench shapes-smoke --out runs/smoke
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from conceptsmith.config import load_config, read_yaml, validate
from conceptsmith.evaluation import custom_suite, erasure_suite
from conceptsmith.evaluation.bench_spec import BenchBase, resolve_bench_path
from conceptsmith.evaluation.custom_spec import CustomBench, check_custom_bench
from conceptsmith.evaluation.erasure_spec import ErasureBench, check_erasure_bench
from conceptsmith.evaluation.report import write_report
from conceptsmith.evaluation.report_parts import run_record
from conceptsmith.evaluation.session import ROWS_JOURNAL, open_session
from conceptsmith.io import write_json
from conceptsmith.registry import get_metric

__all__ = ["BenchRun", "bench_kind", "check", "load_bench", "run_bench"]

def bench_kind(path_or_name: str | Path) -> str:
    """The ``kind`` of a bench YAML (``erasure`` when the file does not say)."""
    data = read_yaml(resolve_bench_path(path_or_name))
    return str(data.get("kind", "erasure")) if isinstance(data, dict) else "erasure"


def load_bench(path_or_name: str | Path) -> tuple[ErasureBench | CustomBench, Path]:
    """A bench YAML by path or by name under ``configs/bench/`` (``shapes-smoke``), of either kind, fully checked
    (methods, params, names, files) before any model is loaded."""
    path = resolve_bench_path(path_or_name)
    cfg = load_config(path, CustomBench if bench_kind(path) == "customization" else ErasureBench)
    check(cfg, path)
    return cfg, path


def check(cfg: ErasureBench | CustomBench, path: Path | None) -> None:
    (check_custom_bench if isinstance(cfg, CustomBench) else check_erasure_bench)(cfg, path)


@dataclass
class BenchRun:
    """What a run did: the results (as written; empty on other processes), edits fitted, images generated / from
    the cache, the report's files."""

    results: dict[str, Any]
    out_dir: Path
    trained: int
    generated: int
    cached: int
    report: dict[str, Path] = field(default_factory=dict)


def run_bench(
    config: ErasureBench | CustomBench | str | Path,
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
    """Run a bench of either kind; writes ``results.json`` (and the report) into ``out_dir`` on the main process.

    ``methods`` keeps only these rows (by label or editor name; ``relearn`` names a customization bench's
    relearning audit); ``edits`` adds saved Edit files as rows of an erasure bench (scored on every task);
    ``model`` / ``evaluator`` / ``device`` / ``dtype`` override the config's.
    """
    if isinstance(config, BenchBase):
        cfg, bench_path = config, None
        check(cfg, None)
    else:
        cfg, bench_path = load_bench(config)
    overrides = {k: v for k, v in (("model", model), ("evaluator", evaluator)) if v}
    if overrides:
        cfg = validate({**cfg.model_dump(), **overrides}, type(cfg), "overrides")
    suite = custom_suite if isinstance(cfg, CustomBench) else erasure_suite
    selection = suite.select(cfg, bench_path, methods, edits)
    started, started_at = time.perf_counter(), datetime.now(timezone.utc)
    out_dir = Path(out_dir)
    session = open_session(cfg, bench_path, out_dir, cache_dir, device=device, dtype=dtype, progress=progress)
    rows = [row.to_dict() for row in suite.rows(session, selection)]
    images, edit_files = session.images, session.edits.files
    if not session.state.is_main_process:
        session.state.wait_for_everyone()
        return BenchRun({}, out_dir, session.edits.fitted, images.generated, images.cached)
    names = session.metrics
    results = {
        "bench": cfg.name,
        "kind": cfg.kind,
        "description": cfg.description,
        "config": cfg.model_dump(),
        "model": {"spec": session.info.spec, "family": session.info.family, "fingerprint": session.info.fingerprint},
        "evaluator": session.evaluator.describe(),
        "metrics": {n: {"description": (m := get_metric(n)).description, "higher_is_better": m.higher_is_better,
                        "aggregation": m.aggregation} for n in names},  # fmt: skip
        **suite.header(session),
        "processes": session.state.num_processes,
        **suite.summaries(cfg, rows),
        "rows": rows,
        **session.records,
        "edit_files": edit_files,
        "run": run_record(started_at, time.perf_counter() - started, session.cache)
        | {"trained": session.edits.fitted, "generated": images.generated, "cached": images.cached},
    }
    write_json(out_dir / "results.json", results, default=float)
    (out_dir / ROWS_JOURNAL).unlink(missing_ok=True)  # results.json holds every row now
    run = BenchRun(results, out_dir, session.edits.fitted, images.generated, images.cached)
    if report:
        run.report = write_report(results, out_dir)
    session.state.wait_for_everyone()
    return run
