"""Parts shared by the erasure and customization reports: metric directions, the run record and its HTML
block, relative links, image galleries, inline SVG plots and the page shell.

Reports link every image as a relative path to its PNG (no base64), so ``report.html`` stays small and
opens straight from the run folder. Plots are inline SVG with their text kept as text, so their axis titles
are part of the page. Every file is written atomically (:mod:`conceptsmith.io`).
"""

from __future__ import annotations

import html
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from conceptsmith.io import atomic_write
from conceptsmith.registry import RegistryError, get_metric

__all__ = [
    "Tile",
    "direction",
    "gallery_html",
    "higher_is_better",
    "judge_name",
    "link",
    "metadata_html",
    "metric_label",
    "page",
    "run_record",
    "save_figure",
    "slug",
    "table_html",
]

#: Which way the summaries' derived entries improve (True: higher is better); registered metrics say it themselves.
HIGHER_IS_BETTER = {
    "acc_s_rel": True,
    "attack_asr": False,
    "efficacy": True,
    "steps_to_50": True,
    "train_seconds": False,
}
_PREFIXES = (("asr_", False), ("asr:", False), ("ASR ", False), ("clip_", True), ("both_present_", True))

#: Packages whose versions a run records.
PACKAGES = ("conceptsmith", "torch", "diffusers", "transformers")


def higher_is_better(name: str, specs: Mapping[str, Any] | None = None) -> bool | None:
    """Whether a larger value of metric ``name`` is better: the spec a run recorded (``specs``: its results'
    ``metrics``, so a report rebuilt from a results file loads no plugin) or else the registered spec's word
    (:mod:`evaluation.bench_metrics`, plugins), else the summaries' derived entries below; ``None`` when nobody says."""
    if specs is not None:  # a run records every registered metric it computed; other names are derived entries
        said = specs.get(name, {}).get("higher_is_better")
    else:
        try:
            said = get_metric(name).higher_is_better
        except RegistryError:
            said = None
    if said is not None:
        return said
    if name in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[name]
    return next((better for prefix, better in _PREFIXES if name.startswith(prefix)), None)


def direction(name: str, specs: Mapping[str, Any] | None = None) -> str:
    """``"higher is better"``, ``"lower is better"`` or ``""`` (unknown) for metric ``name`` (``specs``: as
    :func:`higher_is_better`)."""
    better = higher_is_better(name, specs)
    return "" if better is None else ("higher is better" if better else "lower is better")


def metric_label(name: str, specs: Mapping[str, Any] | None = None) -> str:
    """The metric's name with its own direction, for axis titles and table headers."""
    way = direction(name, specs)
    return f"{name} ({way})" if way else name


def slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower() or "x"


# ============================================================================================
# the run record
# ============================================================================================
def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def run_record(started: datetime, seconds: float, cache: Path) -> dict[str, Any]:
    """What a report states about the run: command line, start date (UTC), duration, package versions,
    the working directory (relative paths in the results are relative to it) and the cache folder."""
    program = Path(sys.argv[0])
    name = f"python -m {program.parent.name}" if program.name == "__main__.py" else shlex.quote(program.name)
    return {
        "command": " ".join([name, *map(shlex.quote, sys.argv[1:])]),
        "date": started.astimezone(timezone.utc).isoformat(timespec="seconds"),
        "seconds": seconds,
        "versions": {p: _version(p) for p in PACKAGES},
        "cwd": os.getcwd(),
        "cache": str(cache),
    }


def _resolve(path: str | Path, results: dict[str, Any]) -> Path:
    """A path from the results: relative ones are relative to the run's working directory."""
    path = Path(path)
    return path if path.is_absolute() else Path(results.get("run", {}).get("cwd") or os.getcwd()) / path


def link(path: str | Path, results: dict[str, Any], out: Path) -> str:
    """The relative URL from ``out`` (the report's folder) to a file named in the results."""
    target = os.path.relpath(_resolve(path, results).resolve(), out.resolve())
    return Path(target).as_posix()


def metadata_html(
    results: dict[str, Any],
    out: Path,
    edit_rows: Sequence[tuple[str, str]],
    judged: str = "the image labels below are its predictions",
) -> str:
    """The run-metadata block: command, date, duration, versions, base model and fingerprint, the judge (and what
    it ``judged``), links to ``results.json`` and to the edit files (``edit_rows``: (row label, edit file) pairs)."""
    e = html.escape
    run, model = results.get("run", {}), results.get("model", {})
    versions = run.get("versions") or {}
    seconds = run.get("seconds")
    facts: list[tuple[str, str]] = [
        ("command", f"<code>{e(run['command'])}</code>" if run.get("command") else "not recorded"),
        ("date", e(run.get("date") or "not recorded")),
        ("duration", "not recorded" if seconds is None else f"{seconds:.1f} s"),
        ("versions", e(", ".join(f"{p} {versions.get(p) or 'not recorded'}" for p in PACKAGES))),
        (
            "base model",
            f"<code>{e(str(model.get('spec')))}</code> ({e(str(model.get('family')))}), fingerprint "
            f"<code class='fingerprint'>{e(str(model.get('fingerprint')))}</code>",
        ),
        ("judge", f"<code>{e(judge_name(results))}</code>: a zero-shot classifier; {e(judged)}, not ground truth"),
    ]
    results_json = out / "results.json"
    facts.append(("results", '<a href="results.json">results.json</a>' if results_json.is_file() else "not written"))
    if edit_rows:
        items = "".join(
            f"<li>{e(label)}: <a class='edit-file' href='{e(link(path, results, out))}'>{e(Path(path).name)}</a></li>"
            for label, path in edit_rows
        )
        facts.append(("edit files", f"<ul>{items}</ul>"))
    else:
        facts.append(("edit files", "none (no edit was saved to a file)"))
    if run.get("cache"):
        facts.append(("cache", f"<code>{e(run['cache'])}</code>"))
    body = "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in facts)
    return f"<section id='run-metadata'><h2>Run</h2><dl>{body}</dl></section>"


def judge_name(results: dict[str, Any]) -> str:
    return str(results.get("evaluator", {}).get("spec"))


# ============================================================================================
# galleries
# ============================================================================================
@dataclass(frozen=True)
class Tile:
    """One image of a gallery cell: its file, a caption and ``data-*`` attributes for the page."""

    path: str
    caption: str = ""
    data: tuple[tuple[str, str], ...] = ()


def _tile_html(tile: Tile, results: dict[str, Any], out: Path) -> str:
    e = html.escape
    attrs = "".join(f" data-{k}='{e(v)}'" for k, v in tile.data)
    caption = f"<figcaption>{tile.caption}</figcaption>" if tile.caption else ""
    src = e(link(tile.path, results, out))
    return f"<figure class='tile'{attrs}><a href='{src}'><img src='{src}' alt='{e(Path(tile.path).name)}' loading='lazy'></a>{caption}</figure>"


def gallery_html(
    results: dict[str, Any],
    out: Path,
    title: str,
    columns: Sequence[str],
    rows: Sequence[tuple[int, Sequence[Sequence[Tile]]]],
    attrs: dict[str, str] | None = None,
) -> str:
    """A table of images: one row per seed (``rows`` = (seed, one list of tiles per column)), one column per
    model (``columns``: header HTML), so that images of the same prompt and seed sit side by side."""
    e = html.escape
    data = "".join(f" data-{k}='{e(v)}'" for k, v in (attrs or {}).items())
    head = "<th>seed</th>" + "".join(f"<th>{c}</th>" for c in columns)
    body = "".join(
        f"<tr data-seed='{seed}'><th>{seed}</th>"
        + "".join(
            f"<td data-column='{i}'>{''.join(_tile_html(t, results, out) for t in cell)}</td>"
            for i, cell in enumerate(cells)
        )
        + "</tr>"
        for seed, cells in rows
    )
    return f"<section class='gallery'{data}><h4>{title}</h4><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>"


# ============================================================================================
# plots and the page
# ============================================================================================
def save_figure(fig: Any, path: Path) -> str:
    """Write a matplotlib figure atomically as SVG (text kept as text) and return the markup to inline."""
    import matplotlib.pyplot as plt  # lazy: optional/heavy

    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "conceptsmith"}):
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="svg"))
    plt.close(fig)
    text = path.read_text(encoding="utf-8")
    return text[text.index("<svg") :]


STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;vertical-align:top}"
    "th small{display:block;font-weight:normal;color:#555}"
    "dt{font-weight:bold;margin-top:.4em}dd{margin-left:1.5em}"
    ".tile{display:inline-block;margin:2px;text-align:center;font-size:11px;max-width:140px}"
    ".tile img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;background:#eee}"
    ".tile figcaption{word-break:break-word}.plot svg{max-width:100%;height:auto}"
)


def page(title: str, body: Sequence[str]) -> str:
    e = html.escape
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )


def table_html(header: Sequence[str], rows: Sequence[Sequence[str]], specs: Mapping[str, Any] | None = None) -> str:
    """A table whose metric headers state their direction (``metric`` + a "higher/lower is better" line; ``specs``:
    as :func:`higher_is_better`)."""
    e = html.escape
    head = "".join(f"<th>{e(h)}" + (f" <small>{way}</small>" if (way := direction(h, specs)) else "") + "</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
