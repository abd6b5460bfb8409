"""Copy finished ShapesWorld benchmark runs into ``bench/results/`` (what the README cites).

For every run directory written by ``conceptsmith bench CONFIG --out DIR``: ``results.json`` becomes
``bench/results/<bench name with underscores>.json`` and the human-readable report (``report.md``,
``report.html``, ``grids/``, ``plots/``) goes to ``bench/results/<bench name>/``. The two customization
runs (``shapes-custom-single`` and ``shapes-custom-multi``) are merged into one
``bench/results/shapes_custom.json`` whose ``summary`` holds every method of both (single-concept
methods with ``train_seconds``, the mean measured training time of one run); publishing one of them
alone keeps the other's published part.

Run: ``.venv/bin/python bench/publish.py out/shapes-objects out/shapes-custom-single out/shapes-custom-multi``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from conceptsmith.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"
REPORT_PARTS = ("report.md", "report.html", "grids", "plots")
CUSTOM_PARTS = {"shapes-custom-single": "single", "shapes-custom-multi": "multi"}


def copy_report(run: Path, name: str, results: Path) -> None:
    target = results / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for part in REPORT_PARTS:
        source = run / part
        if source.is_dir():
            shutil.copytree(source, target / part)
        elif source.is_file():
            shutil.copy2(source, target / part)


def merge_custom(parts: dict[str, dict]) -> dict:
    parts = {part: parts[part] for part in CUSTOM_PARTS.values()}  # single first, however they were given
    summary: dict[str, dict] = {}
    for data in parts.values():
        for method, metrics in data["summary"].items():
            summary.setdefault(method, {}).update(metrics)
    return {
        "bench": "shapes-custom (single + multi)",
        "summary": summary,
        **parts,
    }


def published_custom_parts(loaded: list[tuple[Path, dict]], results: Path) -> dict[str, dict]:
    """The customization part a run set leaves out, kept from the published ``shapes_custom.json`` (so one of the
    two benches can be re-run and published alone); empty if the runs hold no customization bench."""
    given = {CUSTOM_PARTS[d["bench"]] for _, d in loaded if d["bench"] in CUSTOM_PARTS}
    if not given or given == set(CUSTOM_PARTS.values()):
        return {}
    published = results / "shapes_custom.json"
    missing = sorted(set(CUSTOM_PARTS.values()) - given)
    kept = json.loads(published.read_text()) if published.is_file() else {}
    if any(part not in kept for part in missing):
        raise SystemExit(
            f"error: {published} has no published '{missing[0]}' part to keep; publish shapes-custom-single and "
            "shapes-custom-multi together (one merged file)"
        )
    return {part: kept[part] for part in missing}


def publish(runs: list[Path], results: Path = RESULTS) -> list[Path]:
    """Publish the runs; returns the JSON files written."""
    loaded: list[tuple[Path, dict]] = []
    for run in runs:  # check everything before writing anything
        source = run / "results.json"
        if not source.is_file():
            raise SystemExit(f"error: {source} does not exist; run `conceptsmith bench CONFIG --out {run}` first")
        loaded.append((run, json.loads(source.read_text())))
    custom = published_custom_parts(loaded, results)
    results.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for run, data in loaded:
        name = data["bench"]
        copy_report(run, name, results)
        if name in CUSTOM_PARTS:
            custom[CUSTOM_PARTS[name]] = data
            continue
        path = results / f"{name.replace('-', '_')}.json"
        write_json(path, data)
        written.append(path)
    if custom:
        path = results / "shapes_custom.json"
        write_json(path, merge_custom(custom))
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (conceptsmith bench --out DIR)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to publish (default: bench/results)")
    args = parser.parse_args()
    for path in publish(args.runs, args.results):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
