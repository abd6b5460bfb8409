"""Benchmark reports: Markdown and HTML with a metrics table, before/after image grids and plots.

``write_report(results, out_dir)`` reads only the ``results.json`` structure written by
:func:`evaluation.bench.run_bench` (so a report can be rebuilt from a results file alone, as long as
the cached images it points to still exist).
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["metrics_rows", "write_report"]

_COLUMNS = ("acc_e", "acc_g", "acc_i", "acc_s", "h_o", "h_c", "paired_specificity", "fd_clip", "clip_score")
_LOWER_BETTER = {"acc_e", "acc_g", "acc_i", "fd_clip"}


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower() or "task"


def _value(metric: Any, mode: str) -> float | None:
    if isinstance(metric, dict):
        if mode in metric:
            return metric[mode]
        return metric.get("mean")
    return metric


def metrics_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the metrics table (headline accuracy convention)."""
    mode = results.get("accuracy_headline", "argmax")
    present = [c for c in _COLUMNS if any(c in r["metrics"] for r in results["rows"])]
    kinds = sorted({k for r in results["rows"] for k in r.get("attacks", {})})
    header = ["task", "method", *present, *[f"ASR {k}" for k in kinds]]
    rows = []
    for r in results["rows"]:
        cells = [r["task"], r["method"]]
        for c in present:
            v = _value(r["metrics"].get(c), mode)
            cells.append("–" if v is None else f"{v:.3f}")
        for k in kinds:
            a = r.get("attacks", {}).get(k, {})
            cells.append(f"{a['asr']:.3f}" if "asr" in a else "–")
        rows.append(cells)
    return header, rows


def _grid_columns(results: dict[str, Any], task: str) -> list[str]:
    images = [im for im in results["images"] if im["task"] == task]
    if not images:
        return []
    seed = images[0]["seed"]
    return list(dict.fromkeys(im["prompt"] for im in images if im["seed"] == seed))


def _grid(results: dict[str, Any], task: str, out: Path) -> Path | None:
    """Rows = methods (unedited first), columns = prompts at the first seed."""
    from conceptsmith.generation import image_grid

    images = [im for im in results["images"] if im["task"] == task]
    if not images:
        return None
    seed = images[0]["seed"]
    methods = list(dict.fromkeys(im["method"] for im in images))
    prompts = list(dict.fromkeys(im["prompt"] for im in images if im["seed"] == seed))
    by_key = {(im["method"], im["prompt"]): im for im in images if im["seed"] == seed}
    tiles, labels = [], []
    for m in methods:
        for p in prompts:
            im = by_key.get((m, p))
            if im is None or not Path(im["path"]).is_file():
                tiles.append(Image.new("RGB", (64, 64), "white"))
                labels.append("missing")
                continue
            with Image.open(im["path"]) as pil:
                tiles.append(pil.convert("RGB").resize((96, 96), Image.NEAREST))
            labels.append(f"{m}: {im['pred']}")
    grid = image_grid(tiles, columns=len(prompts), labels=labels)
    path = out / "grids" / f"{_slug(task)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _plot(results: dict[str, Any], task: str, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode = results.get("accuracy_headline", "argmax")
    rows = [r for r in results["rows"] if r["task"] == task]
    names = [c for c in ("acc_e", "acc_g", "acc_i", "acc_s", "h_o") if any(c in r["metrics"] for r in rows)]
    kinds = sorted({k for r in rows for k, a in r.get("attacks", {}).items() if "asr" in a})
    bars = [*names, *[f"asr:{k}" for k in kinds]]
    if not rows or not bars:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(bars) * max(1, len(rows)) / 2), 3.2))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        values = []
        for b in bars:
            if b.startswith("asr:"):
                values.append(r.get("attacks", {}).get(b[4:], {}).get("asr", 0.0) or 0.0)
            else:
                values.append(_value(r["metrics"].get(b), mode) or 0.0)
        ax.bar([j + i * width for j in range(len(bars))], values, width, label=r["method"])
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(bars))], bars)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{task} ({mode}; acc_e/acc_g/acc_i/asr: lower is better)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "plots" / f"{_slug(task)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` (+ ``grids/``, ``plots/``) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = metrics_rows(results)
    tasks = list(dict.fromkeys(r["task"] for r in results["rows"]))
    figures = {t: (_grid(results, t, out), _plot(results, t, out)) for t in tasks}
    ev = results.get("evaluator", {})
    model = results.get("model", {})
    mode = results.get("accuracy_headline", "argmax")
    facts = [
        ("model", f"{model.get('spec')} ({model.get('family')}, base {model.get('fingerprint')})"),
        ("evaluator", f"{ev.get('spec')} (logit scale {ev.get('logit_scale', float('nan')):.1f})"),
        ("accuracy", f"{mode}: {results.get('conventions', {}).get(mode, '')}"),
        ("CLIP score", results.get("conventions", {}).get("clip_score", "")),
        ("FD-CLIP", results.get("conventions", {}).get("fd_clip", "")),
        ("seeds", ", ".join(str(s) for s in results.get("config", {}).get("seeds", []))),
    ]

    md = [f"# Benchmark `{results['bench']}`", "", results.get("description", ""), ""]
    md += [f"* **{k}**: {v}" for k, v in facts]
    md += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    columns = {t: _grid_columns(results, t) for t in tasks}
    for t in tasks:
        grid, plot = figures[t]
        md += ["", f"## {t}", ""]
        if grid:
            md += [f"![{t} images (rows: methods, columns: prompts)]({grid.relative_to(out).as_posix()})", ""]
            md += [
                "Columns: "
                + " | ".join(f"`{c}`" for c in columns[t])
                + " (first seed; tile label: method: prediction)",
                "",
            ]
        if plot:
            md += [f"![{t} metrics]({plot.relative_to(out).as_posix()})", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")

    e = html.escape
    body = [
        f"<h1>Benchmark <code>{e(results['bench'])}</code></h1>",
        f"<p>{e(results.get('description', ''))}</p>",
    ]
    body += ["<ul>", *[f"<li><b>{e(k)}</b>: {e(str(v))}</li>" for k, v in facts], "</ul>"]
    body += ["<table><thead><tr>", *[f"<th>{e(h)}</th>" for h in header], "</tr></thead><tbody>"]
    body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
    body += ["</tbody></table>"]
    for t in tasks:
        grid, plot = figures[t]
        body.append(f"<h2>{e(t)}</h2>")
        grid_alt = "rows: methods; columns: " + " | ".join(columns[t]) + " (first seed)"
        for fig, alt in ((grid, grid_alt), (plot, "metrics")):
            if fig:
                body.append(
                    f'<figure><img src="{e(fig.relative_to(out).as_posix())}" alt="{e(alt)}">'
                    f"<figcaption>{e(alt)}</figcaption></figure>"
                )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(-n+2){text-align:left}"
        "img{max-width:100%;image-rendering:pixelated}"
    )
    html_text = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(results['bench'])}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
    html_path = out / "report.html"
    html_path.write_text(html_text, encoding="utf-8")
    paths = {"markdown": md_path, "html": html_path}
    for t, (grid, plot) in figures.items():
        if grid:
            paths[f"grid:{t}"] = grid
        if plot:
            paths[f"plot:{t}"] = plot
    return paths
