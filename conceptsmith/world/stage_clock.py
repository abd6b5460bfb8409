"""Wall-clock accounting of ``conceptsmith world train``, summed over every resumed run.

ShapesWorld's recipe must train in at most 2.5 hours on 2 cores (``--budget-hours``' default), possibly spread
over several runs. Each timed span writes its own small JSON file under
``<cache>/world/train_clock/`` and rewrites it every ``flush_s`` seconds, so a killed run loses at most
that much and concurrent processes (the evaluator trains beside the generator) never share a file.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conceptsmith.io import write_text
from conceptsmith.world.vae_train import cache_dir

WALL = "wall"  # the span of a whole `world train` invocation (stages may overlap inside it)


def clock_dir() -> Path:
    return cache_dir() / "train_clock"


def reset() -> None:
    """Forget every recorded span (a run that starts from scratch)."""
    shutil.rmtree(clock_dir(), ignore_errors=True)


def _write(path: Path, key: str, seconds: float) -> None:
    write_text(path, json.dumps({"key": key, "seconds": round(seconds, 1)}))


@contextmanager
def timed(key: str, flush_s: float = 30.0) -> Iterator[None]:
    """Record the wall time spent inside the block under ``key`` (flushed while it runs)."""
    clock_dir().mkdir(parents=True, exist_ok=True)
    start = time.time()
    path = clock_dir() / f"{key}-{os.getpid()}-{int(start * 1000)}.json"
    done = threading.Event()

    def flush_until_done() -> None:
        while not done.wait(flush_s):
            _write(path, key, time.time() - start)

    flusher = threading.Thread(target=flush_until_done, daemon=True)
    flusher.start()
    try:
        yield
    finally:
        done.set()
        flusher.join()
        _write(path, key, time.time() - start)


def totals() -> dict[str, float]:
    """Seconds per key, summed over every recorded span (all runs since the last reset)."""
    sums: dict[str, float] = {}
    for path in sorted(clock_dir().glob("*.json")) if clock_dir().exists() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        sums[record["key"]] = sums.get(record["key"], 0.0) + float(record["seconds"])
    return sums


def report(budget_h: float = 2.5) -> str:
    """One line per stage and the summed wall time against the budget."""
    sums = totals()
    lines = [f"  {key:<11} {seconds / 60:7.1f} min" for key, seconds in sums.items() if key != WALL]
    wall = sums.get(WALL, 0.0)
    verdict = "within" if wall <= budget_h * 3600 else "OVER"
    lines.append(f"  {'total wall':<11} {wall / 60:7.1f} min ({verdict} the {budget_h:g} h budget; stages overlap)")
    return "\n".join(lines)
