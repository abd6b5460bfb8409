"""``conceptsmith bench`` and ``conceptsmith evaluate``: run a bench of either kind through the engine and print
its table (or JSON)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conceptsmith.evaluation.engine import BenchRun, load_bench, run_bench
from conceptsmith.evaluation.report import summary_table

__all__ = ["bench_command", "evaluate_command", "print_run"]


def bench_command(config: str, out: str | None = None, methods: str | None = None, model: str | None = None,
                  evaluator: str | None = None, cache: str | None = None, as_json: bool = False,
                  device: str | None = None, dtype: str | None = None, report: bool = True) -> dict[str, Any]:  # fmt: skip
    """``conceptsmith bench CONFIG [--methods a,b] --out DIR``: run a bench, print its table. Under
    ``accelerate launch -m conceptsmith bench ...`` the processes share the work."""
    cfg, _ = load_bench(config)
    run = run_bench(config, out or Path("conceptsmith-runs") / cfg.name, methods=methods.split(",") if methods else None,
                    model=model, evaluator=evaluator, cache_dir=cache, device=device, dtype=dtype, report=report)  # fmt: skip
    print_run(run, as_json)
    return run.results


def evaluate_command(bench: str, model: str | None = None, edits: Sequence[str] = (), out: str | None = None,
                     evaluator: str | None = None, cache: str | None = None, as_json: bool = False,
                     device: str | None = None, dtype: str | None = None) -> dict[str, Any]:  # fmt: skip
    """``conceptsmith evaluate --model M [--edit E ...] --bench CONFIG [--json]``: score the unedited model and each
    saved edit on an erasure bench's tasks (the bench's own methods are not run)."""
    cfg, _ = load_bench(bench)
    run = run_bench(bench, out or Path("conceptsmith-runs") / f"{cfg.name}-evaluate", methods=[], edits=list(edits),
                    model=model, evaluator=evaluator, cache_dir=cache, device=device, dtype=dtype)  # fmt: skip
    print_run(run, as_json)
    return run.results


#: What ``--json`` prints of a run.
JSON_KEYS = ("bench", "kind", "model", "evaluator", "accuracy_headline", "conventions", "metrics", "summary", "rows")


def print_run(run: BenchRun, as_json: bool) -> None:
    if not run.results:  # not the main process
        return
    if as_json:
        print(json.dumps({k: run.results[k] for k in JSON_KEYS if k in run.results}, default=float))
        return
    print(summary_table(run.results))
    edits = "edit" if run.trained == 1 else "edits"
    print(f"trained {run.trained} {edits}; generated {run.generated} images, {run.cached} from the cache")
    print(f"results: {run.out_dir / 'results.json'}")
    if "html" in run.report:
        print(f"report:  {run.report['html']}  (and {run.report['markdown'].name})")
