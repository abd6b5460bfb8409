"""Erasure benchmark reports: ``report.html`` (and ``report.md``) with the run's metadata, a metrics table,
per-metric plots, the efficacy-specificity trade-off of a sweep, and per-prompt image galleries.

``write_report(results, out_dir)`` reads only the ``results.json`` structure written by
:func:`evaluation.engine.run_bench` (so a report can be rebuilt from a results file alone, as long as the
cached images it points to still exist). Every gallery shows every seed: one row per seed, the unedited
model's image beside each method's edited image of the same prompt and seed, and each attack's images
beside the edited image they attack. Image labels are the judge's (the evaluator's zero-shot) predictions.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from PIL import Image

from conceptsmith.evaluation.custom_report import custom_table, write_custom_report
from conceptsmith.evaluation.report_parts import (
    Tile,
    direction,
    gallery_html,
    judge_name,
    metadata_html,
    metric_label,
    page,
    save_figure,
    slug,
    table_html,
)
from conceptsmith.grids import image_grid
from conceptsmith.io import atomic_write, write_text

__all__ = ["erasure_table", "metrics_rows", "summary_table", "write_erasure_report", "write_report"]

_COLUMNS = ("acc_e", "acc_g", "acc_i", "acc_s", "h_o", "h_c", "paired_specificity", "fd_clip", "clip_score")
_PLOTTED = ("acc_e", "acc_g", "acc_i", "acc_s", "h_o", "paired_specificity")


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


def _grid(results: dict[str, Any], task: str, out: Path) -> Path | None:
    """One PNG for the Markdown report: rows = methods (unedited first), columns = prompts at the first seed;
    tile label: method and the judge's prediction."""
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
                tiles.append(Image.new("RGB", (96, 96), "white"))
                labels.append("missing")
                continue
            with Image.open(im["path"]) as pil:
                tiles.append(pil.convert("RGB").resize((96, 96), Image.NEAREST))
            labels.append(f"{m}; judge: {im['pred']}")
    grid = image_grid(tiles, columns=len(prompts), labels=labels)
    return atomic_write(out / "grids" / f"{slug(task)}.png", lambda tmp: grid.save(tmp, format="PNG"))


def _plot(results: dict[str, Any], task: str, out: Path) -> tuple[Path, str] | None:
    """One panel per metric (bars: the task's rows), each y axis titled with its metric's own direction."""
    specs = results.get("metrics")  # the run's metric specs: directions without loading plugins
    import matplotlib  # lazy: optional/heavy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional/heavy

    mode = results.get("accuracy_headline", "argmax")
    rows = [r for r in results["rows"] if r["task"] == task]
    names = [c for c in _PLOTTED if any(c in r["metrics"] for r in rows)]
    kinds = sorted({k for r in rows for k, a in r.get("attacks", {}).items() if "asr" in a})
    panels = [*names, *[f"asr_{k}" for k in kinds]]
    if not rows or not panels:
        return None
    columns = min(4, len(panels))
    height = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(height, columns, figsize=(2.9 * columns, 2.7 * height + 0.4), squeeze=False)
    labels = [r["method"] for r in rows]
    for ax, name in zip(axes.flat, panels, strict=False):
        if name.startswith("asr_"):
            values = [r.get("attacks", {}).get(name[4:], {}).get("asr") for r in rows]
        else:
            values = [_value(r["metrics"].get(name), mode) for r in rows]
        ax.bar(range(len(rows)), [math.nan if v is None else v for v in values], color=f"C{panels.index(name) % 10}")
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(min(0.0, *(v for v in values if v is not None)), 1.05)
        ax.set_ylabel(metric_label(name, specs), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes.flat[len(panels) :]:
        ax.remove()
    fig.suptitle(f"{task} ({mode} accuracy; each axis states its own direction)", fontsize=9)
    fig.tight_layout()
    path = out / "plots" / f"{slug(task)}.svg"
    return path, save_figure(fig, path)


def _sweep_plot(results: dict[str, Any], out: Path) -> tuple[Path, str] | None:
    """Efficacy (1 - acc_e) against specificity (acc_s_rel, else acc_s), averaged over tasks: one line per
    method through its sweep points, the unedited model as a reference point."""
    specs = results.get("metrics")  # the run's metric specs: directions without loading plugins
    import matplotlib  # lazy: optional/heavy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional/heavy

    sweep = (results.get("config") or {}).get("sweep")
    points = [r for r in results["rows"] if r.get("sweep")]
    summary = results.get("summary", {})
    if not sweep or not points:
        return None
    labels = list(dict.fromkeys(r["method"] for r in points))
    spec = "acc_s_rel" if all("acc_s_rel" in summary.get(m, {}) for m in labels) else "acc_s"
    if not all("acc_e" in summary.get(m, {}) and spec in summary[m] for m in labels):
        return None
    lines: dict[str, list[tuple[int, Any, str]]] = {}
    for label, tag in {r["method"]: r["sweep"] for r in points}.items():  # a label's tag is the same on every task
        lines.setdefault(tag["method"], []).append((sweep["values"].index(tag["value"]), tag["value"], label))
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, (method, entries) in enumerate(lines.items()):
        entries.sort()
        xs = [summary[label][spec] for _, _, label in entries]
        ys = [1.0 - summary[label]["acc_e"] for _, _, label in entries]
        ax.plot(xs, ys, marker="o", color=f"C{i}", label=method)
        for j, ((_, value, _), x, y) in enumerate(zip(entries, xs, ys, strict=True)):  # stacked: points may coincide
            ax.annotate(f"{sweep['param']}={value}", (x, y), textcoords="offset points", xytext=(4, 4 - 9 * j), fontsize=7)
    base = summary.get("unedited", {})
    if "acc_e" in base:
        x = base.get(spec, 1.0 if spec == "acc_s_rel" else None)
        if x is not None:
            ax.plot([x], [1.0 - base["acc_e"]], marker="*", markersize=12, color="black", linestyle="", label="unedited")
    ax.set_xlabel(f"specificity: {spec} ({direction(spec, specs)})")
    ax.set_ylabel(f"efficacy: 1 - acc_e ({direction('efficacy', specs)})")
    mode = results.get("accuracy_headline", "argmax")
    ax.set_title(f"Efficacy vs specificity over the {sweep['param']} sweep (mean over tasks, {mode})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "plots" / "sweep.svg"
    return path, save_figure(fig, path)


_GALLERY_NOTE = (
    "One table per prompt, one row per seed. Each method's column is followed by its attack columns: the attack "
    "images of the same seed that attack this prompt (or, for attacks that target a concept rather than a prompt, "
    "this prompt's concept). Every label is the judge's prediction, not ground truth."
)


def _judge(im: dict[str, Any], judge: str) -> str:
    return f"<span class='judge'>judge ({html.escape(judge)}): {html.escape(str(im['pred']))}</span>"


def _galleries(results: dict[str, Any], task: str, out: Path) -> list[str]:
    """Per prompt of ``task``: one row per seed; columns: unedited | each method | that method's attacks (the
    attack images of that prompt, or of its concept when an attack does not name the prompt it attacks)."""
    e, judge = html.escape, judge_name(results)
    images = [im for im in results["images"] if im["task"] == task]
    attacks = [a for a in results.get("attack_images", []) if a["task"] == task]
    by_key = {(im["method"], im["prompt"], im["seed"]): im for im in images}
    methods = list(dict.fromkeys(im["method"] for im in images))
    out_html = []
    for prompt in dict.fromkeys(im["prompt"] for im in images):
        first = next(im for im in images if im["prompt"] == prompt)
        seeds = list(dict.fromkeys(im["seed"] for im in images if im["prompt"] == prompt))
        mine = [
            a for a in attacks
            if a.get("source") == prompt
            or (a.get("source") is None and first["set"] == "erase" and a["target"] == first["target"])
        ]  # fmt: skip
        columns: list[tuple[str, str | None]] = []
        for m in methods:
            columns.append((m, None))
            columns += [(m, k) for k in dict.fromkeys(a["attack"] for a in mine if a["method"] == m)]
        headers = [
            e(m) if k is None else f"{e(m)} + {e(k)} attack" for m, k in columns
        ]
        rows = []
        for seed in seeds:
            cells = []
            for m, k in columns:
                if k is None:
                    im = by_key.get((m, prompt, seed))
                    role = "unedited" if m == "unedited" else "edited"
                    data = (("role", role), ("method", m), ("seed", str(seed)), ("prompt", prompt))
                    cells.append([Tile(im["path"], _judge(im, judge), data)] if im else [])
                    continue
                cells.append([
                    Tile(a["path"], _judge(a, judge) + _attack_note(a),
                         (("role", "attack"), ("method", m), ("attack", k), ("seed", str(seed)), ("prompt", prompt)))
                    for a in mine if a["method"] == m and a["attack"] == k and a["seed"] == seed
                ])  # fmt: skip
            rows.append((seed, cells))
        target = f" (target: {e(str(first['target']))})" if first.get("target") else ""
        title = f"{e(first['set'])}: <q>{e(prompt)}</q>{target}"
        out_html.append(gallery_html(results, out, title, headers, rows, {"task": task, "prompt": prompt}))
    return out_html


def _attack_note(a: dict[str, Any]) -> str:
    e = html.escape
    note = f"<br><span class='attack-prompt'>attack prompt: {e(a['prompt'])}</span>" if a.get("prompt") else ""
    if a.get("source") is None:
        note += f"<br><span class='attack-target'>attacks the concept {e(a['target'])}</span>"
    return note


def _edit_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(row label, edit file) of every row whose edit was saved to a file, each file once."""
    files = results.get("edit_files", {})
    seen: dict[str, str] = {}
    for r in results["rows"]:
        path = files.get(r.get("edit_key") or "")
        if path and path not in seen:
            seen[path] = r["method"] if len({x["task"] for x in results["rows"]}) == 1 else f"{r['method']} ({r['task']})"
    return [(label, path) for path, label in seen.items()]


def write_erasure_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.html`` and ``report.md`` (+ ``grids/``, ``plots/``) into ``out_dir``, atomically."""
    specs = results.get("metrics")  # the run's metric specs: directions without loading plugins
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = metrics_rows(results)
    tasks = list(dict.fromkeys(r["task"] for r in results["rows"]))
    grids = {t: _grid(results, t, out) for t in tasks}
    plots = {t: _plot(results, t, out) for t in tasks}
    sweep = _sweep_plot(results, out)
    ev, model = results.get("evaluator", {}), results.get("model", {})
    mode = results.get("accuracy_headline", "argmax")
    conventions = results.get("conventions", {})
    facts = [
        ("model", f"{model.get('spec')} ({model.get('family')}, base {model.get('fingerprint')})"),
        ("judge", f"{ev.get('spec')} (zero-shot evaluator, logit scale {ev.get('logit_scale', float('nan')):.1f}); "
                  "image labels are its predictions, not ground truth"),
        ("accuracy", f"{mode}: {conventions.get(mode, '')}"),
        ("CLIP score", conventions.get("clip_score", "")),
        ("FD-CLIP", conventions.get("fd_clip", "")),
        ("seeds", ", ".join(str(s) for s in results.get("config", {}).get("seeds", []))),
    ]
    run = results.get("run", {})

    md = [f"# Benchmark `{results['bench']}`", "", results.get("description", ""), ""]
    md += [f"* **{k}**: {v}" for k, v in facts]
    md += [f"* **{k}**: {run[k]}" for k in ("command", "date") if run.get(k)]
    md += ["* **results**: [results.json](results.json)", ""]
    md += ["| " + " | ".join(metric_label(h, specs) for h in header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    if sweep:
        md += ["", f"![efficacy vs specificity over the sweep]({sweep[0].relative_to(out).as_posix()})"]
    for t in tasks:
        md += ["", f"## {t}", ""]
        if grids[t]:
            md += [f"![{t}: rows = methods, columns = prompts (first seed); label = judge's prediction]"
                   f"({grids[t].relative_to(out).as_posix()})", ""]  # fmt: skip
        if plots[t]:
            md += [f"![{t} metrics]({plots[t][0].relative_to(out).as_posix()})", ""]
    md += ["", "Every seed, with the attack images beside the images they attack: see report.html."]

    e = html.escape
    body = [f"<h1>Benchmark <code>{e(results['bench'])}</code></h1>", f"<p>{e(results.get('description', ''))}</p>"]
    body.append(metadata_html(results, out, _edit_rows(results)))
    body += ["<h2>Protocol</h2><ul>", *[f"<li><b>{e(k)}</b>: {e(str(v))}</li>" for k, v in facts], "</ul>"]
    body += ["<h2>Metrics</h2>", table_html(header, rows, specs)]
    if sweep:
        body += ["<h2>Sweep: efficacy vs specificity</h2>", f"<figure class='plot' id='sweep-plot'>{sweep[1]}</figure>"]
    for t in tasks:
        body.append(f"<h2 id='task-{e(slug(t))}'>{e(t)}</h2>")
        if plots[t]:
            body.append(f"<figure class='plot'>{plots[t][1]}</figure>")
        body += ["<h3>Images (every seed; labels are the judge's predictions)</h3>", f"<p>{_GALLERY_NOTE}</p>"]
        body += _galleries(results, t, out)
    paths = {
        "markdown": write_text(out / "report.md", "\n".join(md) + "\n"),
        "html": write_text(out / "report.html", page(f"Benchmark {results['bench']}", body)),
    }
    paths |= {f"grid:{t}": p for t, p in grids.items() if p}
    paths |= {f"plot:{t}": p[0] for t, p in plots.items() if p}
    if sweep:
        paths["plot:sweep"] = sweep[0]
    return paths



def erasure_table(results: dict[str, Any]) -> str:
    """A fixed-width metrics table of an erasure run's rows (headline accuracy convention), for terminals."""
    mode = results.get("accuracy_headline", "argmax")
    cols = ["acc_e", "acc_g", "acc_i", "acc_s", "h_o", "h_c", "paired_specificity", "fd_clip"]
    attack_kinds = sorted({k for r in results["rows"] for k in r.get("attacks", {})})
    lines = [["task", "method", *cols, *[f"asr_{k}" for k in attack_kinds]]]
    for r in results["rows"]:
        vals = [_value(r["metrics"].get(c), mode) for c in cols]
        asr = [r.get("attacks", {}).get(k, {}).get("asr") for k in attack_kinds]
        lines.append([r["task"], r["method"], *("-" if v is None else f"{v:.3f}" for v in [*vals, *asr])])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)) for line in lines)


def summary_table(results: dict[str, Any]) -> str:
    """The terminal table of a run of either kind."""
    return custom_table(results) if results.get("kind") == "customization" else erasure_table(results)


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``report.html`` and ``report.md`` of a run of either kind (read from its ``results.json`` structure)."""
    if results.get("kind") == "customization":
        return write_custom_report(results, out_dir)
    return write_erasure_report(results, out_dir)
