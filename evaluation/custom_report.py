"""Customization benchmark reports: ``report.html`` (and ``report.md``) with the run's metadata, the summary,
composition and relearning tables, and per-prompt image galleries.

``write_custom_report(results, out_dir)`` reads only the ``results.json`` structure written by
:func:`evaluation.engine.run_bench` (``kind: customization``). Per concept / pair / relearning task the galleries show the
training references, then one table per prompt: one row per seed, one column per model (the unedited model
first), so the images of the same prompt position and seed sit side by side. Images are relative links to
the cached PNGs; every file is written atomically.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from PIL import Image

from conceptsmith.evaluation.report_parts import (
    Tile,
    direction,
    gallery_html,
    link,
    metadata_html,
    page,
    slug,
    table_html,
)
from conceptsmith.grids import image_grid
from conceptsmith.io import atomic_write, write_text

__all__ = ["custom_table", "write_custom_report"]

_TABLE = ("clip_i", "clip_i_rel", "clip_t", "clip_t_rel", "both_present")


def _table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for name, metrics in summary.items():
        if name == "relearn":
            continue
        cells = [metrics.get(k) for k in _TABLE]
        rows.append([name, *("–" if v is None else f"{v:.3f}" for v in cells)])
    return ["name", *_TABLE], rows


def _relearn_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """relearn_rate of the unedited model, each erased model and each checkpoint, and steps_to_50: one row per
    erasure method."""
    relearn = summary.get("relearn")
    if not relearn:
        return None
    steps = list(dict.fromkeys(n for entry in relearn.values() for n in entry["by_steps"]))
    header = ["erasure", "unedited", "erased (0 steps)", *(f"+{n} steps" for n in steps), "steps to 50%"]
    rows = []
    for name, entry in relearn.items():
        rates = [entry["unedited"], entry["erased"], *(entry["by_steps"].get(n) for n in steps)]
        reached = entry["steps_to_50"]
        rows.append(
            [
                name,
                *("–" if v is None else f"{v:.3f}" for v in rates),
                f"> {max(map(int, entry['by_steps']))}" if reached is None else f"{reached:.0f}",
            ]
        )
    return header, rows


def _relearn_title(summary: dict[str, Any]) -> str:
    concept = next(iter(summary["relearn"].values()))["concept"]
    return (
        f"relearn_rate of '{concept}': erase, then customize the erased model on its renders with a new token"
    )


def _prompt_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """both_present per composition prompt (``{a}``/``{b}`` left as placeholders) and per prompt set (their
    means), one row per composition."""
    named = {
        name: {**m["both_present_by_prompt"], **{f"set: {k}": v for k, v in m.get("both_present_by_set", {}).items()}}
        for name, m in summary.items()
        if "both_present_by_prompt" in m
    }
    if not named:
        return None
    columns = list(next(iter(named.values())))
    return ["name", *columns], [[name, *(f"{by[c]:.3f}" for c in columns)] for name, by in named.items()]


def _seed_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """both_present of every training run of the compositions measured over several training seeds."""
    named = {
        name: m["both_present_by_training_seed"]
        for name, m in summary.items()
        if "both_present_by_training_seed" in m
    }
    if not named:
        return None
    width = max(len(by) for by in named.values())
    header = ["name", *(f"run {i + 1}" for i in range(width)), "mean"]
    rows = [
        [
            name,
            *(f"{v:.3f} (seed {s})" for s, v in by.items()),
            *[""] * (width - len(by)),
            f"{summary[name]['both_present']:.3f}",
        ]
        for name, by in named.items()
    ]
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]


def custom_table(results: dict[str, Any]) -> str:
    """A fixed-width summary table for terminals."""
    tables = (_table(results["summary"]), _relearn_table(results["summary"]))
    return "\n\n".join(_fixed_width(*table) for table in tables if table and table[1])


def _fixed_width(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)) for line in lines)


def _tile(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB").resize((96, 96), Image.NEAREST)


def _grid(results: dict[str, Any], group: str, out: Path, columns: int = 8) -> Path:
    """One PNG for the Markdown report. Rows: the references, then every method; each row its first
    ``columns`` images, seed-major."""
    tokens = [group] if group in results["references"] else group.split("+")
    known = [t for t in tokens if t in results["references"]]  # none for a known-pairs group
    refs = [p for t in known for p in results["references"][t]["train"][: columns // len(tokens)]]
    mine = [im for im in results["images"] if im["group"] == group]
    seeds = list(dict.fromkeys(im["seed"] for im in mine))
    rows = [("references", refs)] if refs else []
    for method in dict.fromkeys(im["method"] for im in mine):
        ordered = sorted(
            (im for im in mine if im["method"] == method), key=lambda im: seeds.index(im["seed"])
        )
        rows.append((method, [im["path"] for im in ordered[:columns]]))
    width = max(len(paths) for _, paths in rows)
    tiles, labels = [], []
    for name, paths in rows:
        tiles += [_tile(p) for p in paths] + [Image.new("RGB", (96, 96), "white")] * (width - len(paths))
        labels += [name] + [""] * (width - 1)
    grid = image_grid(tiles, columns=width, labels=labels)
    return atomic_write(out / "grids" / f"{slug(group)}.png", lambda tmp: grid.save(tmp, format="PNG"))


def _references_html(results: dict[str, Any], group: str, out: Path) -> str:
    """Every training reference of the group's concepts, each a link to its file."""
    tokens = [group] if group in results["references"] else group.split("+")
    e, parts = html.escape, []
    for token in (t for t in tokens if t in results["references"]):
        tiles = "".join(
            f"<figure class='tile reference'><a href='{e(link(p, results, out))}'><img src='{e(link(p, results, out))}' "
            f"alt='{e(Path(p).name)}' loading='lazy'></a></figure>"
            for p in results["references"][token]["train"]
        )
        parts.append(f"<div class='references' data-token='{e(token)}'><b>training references of {e(token)}</b><br>{tiles}</div>")
    return "".join(parts)


def _galleries(results: dict[str, Any], group: str, out: Path) -> list[str]:
    """One table per prompt position of the group: rows = seeds, columns = models (each with the prompt it was
    given: the unedited model gets the prompt without the new token)."""
    e = html.escape
    mine = [im for im in results["images"] if im["group"] == group]
    methods = list(dict.fromkeys(im["method"] for im in mine))
    prompts = {m: list(dict.fromkeys(im["prompt"] for im in mine if im["method"] == m)) for m in methods}
    by_key = {(im["method"], im["prompt"], im["seed"]): im for im in mine}
    seeds = list(dict.fromkeys(im["seed"] for im in mine))
    out_html = []
    for i in range(max(len(p) for p in prompts.values())):
        columns = [m for m in methods if i < len(prompts[m])]
        headers = [
            f"{e(m)} <small>{'inverted conditioning (no prompt)' if prompts[m][i] is None else e(prompts[m][i])}</small>"
            for m in columns
        ]
        rows = []
        for seed in seeds:
            cells = []
            for m in columns:
                im = by_key.get((m, prompts[m][i], seed))
                data = (("role", "unedited" if m == "unedited" else "edited"), ("method", m), ("seed", str(seed)))
                cells.append([Tile(im["path"], "", data)] if im else [])
            rows.append((seed, cells))
        title = f"{e(group)}: prompt {i + 1}"
        out_html.append(gallery_html(results, out, title, headers, rows, {"group": group, "prompt-index": str(i)}))
    return out_html


def _edit_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, edit file) of every saved edit the run used: the rows' own edits by row, the others (parts of
    compositions, customizations of erased models) by their cache key."""
    files = dict(results.get("edit_files", {}))
    labelled = []
    for r in results["rows"]:
        path = files.pop(r.get("edit_key") or "", None)
        if path:
            labelled.append((f"{r['method']} ({r['group']})", path))
    return labelled + [(f"used by a composition or relearning run: {key}", path) for key, path in files.items()]


def write_custom_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``report.md`` and ``report.html`` (summary table + one gallery per concept / pair / relearning task)
    in ``out_dir``; reads only the ``results.json`` structure."""
    specs = results.get("metrics")  # the run's metric specs: directions without loading plugins
    out = Path(out_dir)
    header, rows = _table(results["summary"])
    groups = list(dict.fromkeys(im["group"] for im in results["images"]))
    grids = {g: _grid(results, g, out) for g in groups}
    facts = [
        ("model", f"{results['model']['spec']} (base {results['model']['fingerprint']})"),
        ("evaluator", str(results["evaluator"].get("spec"))),
        ("seeds", ", ".join(str(s) for s in results["config"]["seeds"])),
        ("both_present rule", results["presence"]),
        *results["conventions"].items(),
    ]
    md = [f"# Customization benchmark `{results['bench']}`", "", results["description"], ""]
    md += [f"* **{k}**: {v}" for k, v in facts]
    md += [f"* **{k}**: {results.get('run', {})[k]}" for k in ("command", "date") if results.get("run", {}).get(k)]
    md += ["* **results**: [results.json](results.json)"]
    md += ["", *_md_table(header, rows)] if rows else []
    by_prompt = _prompt_table(results["summary"])
    if by_prompt:
        md += [
            "",
            f"**both_present by composition prompt** (rule: {results['presence']})",
            "",
            *_md_table(*by_prompt),
        ]
    by_seed = _seed_table(results["summary"])
    if by_seed:
        md += ["", "**both_present by training seed** (one training run each)", "", *_md_table(*by_seed)]
    relearn = _relearn_table(results["summary"])
    if relearn:
        md += ["", f"**{_relearn_title(results['summary'])}**", "", *_md_table(*relearn)]
    for g, path in grids.items():
        md += [
            "",
            f"## {g}",
            "",
            f"![{g}: references, then one row per method]({path.relative_to(out).as_posix()})",
        ]
    md += ["", "Every seed of every prompt: see report.html."]
    e = html.escape
    body = [
        f"<h1>Customization benchmark <code>{e(results['bench'])}</code></h1>",
        f"<p>{e(results['description'])}</p>",
        metadata_html(results, out, _edit_rows(results), "the metrics below are its judgement"),
        "<h2>Protocol</h2><ul>",
        *[f"<li><b>{e(k)}</b>: {e(str(v))}</li>" for k, v in facts],
        "</ul>",
        *([table_html(header, rows, specs)] if rows else []),
    ]
    if by_prompt:
        body += [
            f"<h3>both_present by composition prompt (rule: {e(results['presence'])}; {direction('both_present', specs)})</h3>",
            table_html(*by_prompt, specs),
        ]
    if by_seed:
        body += [f"<h3>both_present by training seed (one training run each; {direction('both_present', specs)})</h3>",
                 table_html(*by_seed, specs)]  # fmt: skip
    if relearn:
        title = f"{_relearn_title(results['summary'])} ({direction('relearn_rate', specs)}: the erased shape stays gone)"
        body += [f"<h3>{e(title)}</h3>", table_html(*relearn, specs)]
    for g in groups:
        body += [f"<h2>{e(g)}</h2>", _references_html(results, g, out), *_galleries(results, g, out)]
    paths = {
        "markdown": write_text(out / "report.md", "\n".join(md) + "\n"),
        "html": write_text(out / "report.html", page(f"Customization benchmark {results['bench']}", body)),
    }
    return paths | {f"grid:{g}": p for g, p in grids.items()}
