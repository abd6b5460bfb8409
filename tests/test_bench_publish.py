"""bench/publish.py: finished benchmark runs -> bench/results (JSON + report), custom runs merged."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _publish_module():
    spec = importlib.util.spec_from_file_location("publish", ROOT / "bench" / "publish.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, name: str, summary: dict) -> Path:
    run = tmp_path / "out" / name
    (run / "grids").mkdir(parents=True)
    (run / "grids" / "a.png").write_bytes(b"png")
    (run / "report.md").write_text(f"# {name}")
    (run / "results.json").write_text(json.dumps({"bench": name, "summary": summary, "rows": []}))
    return run


def test_publish_copies_reports_and_merges_the_custom_runs(tmp_path):
    publish = _publish_module().publish
    objects = _run(tmp_path, "shapes-objects", {"uce": {"acc_e": 0.1}})
    single = _run(tmp_path, "shapes-custom-single", {"lora": {"clip_i_rel": 0.7, "train_seconds": 40.0}})
    multi = _run(tmp_path, "shapes-custom-multi", {"joint": {"both_present": 0.2}, "unedited": {"both_present": 0.0}})
    results = tmp_path / "results"
    written = publish([objects, single, multi], results)
    assert [p.name for p in written] == ["shapes_objects.json", "shapes_custom.json"]
    assert json.loads((results / "shapes_objects.json").read_text())["summary"] == {"uce": {"acc_e": 0.1}}
    merged = json.loads((results / "shapes_custom.json").read_text())
    assert merged["summary"] == {"lora": {"clip_i_rel": 0.7, "train_seconds": 40.0}, "joint": {"both_present": 0.2},
                                 "unedited": {"both_present": 0.0}}
    assert merged["single"]["bench"] == "shapes-custom-single" and merged["multi"]["bench"] == "shapes-custom-multi"
    assert (results / "shapes-objects" / "grids" / "a.png").read_bytes() == b"png"
    assert (results / "shapes-custom-multi" / "report.md").read_text() == "# shapes-custom-multi"


def test_publish_refuses_half_a_custom_pair_with_nothing_published_or_a_missing_run_before_writing(tmp_path):
    publish = _publish_module().publish
    single = _run(tmp_path, "shapes-custom-single", {})
    results = tmp_path / "results"
    with pytest.raises(SystemExit, match="no published 'multi' part.*together"):
        publish([single], results)
    with pytest.raises(SystemExit, match="does not exist"):
        publish([tmp_path / "out" / "nothing"], results)
    assert not results.exists()


def test_publishing_one_custom_bench_keeps_the_other_published_part(tmp_path):
    publish = _publish_module().publish
    results = tmp_path / "results"
    single = _run(tmp_path, "shapes-custom-single", {"lora": {"clip_i_rel": 0.7}, "unedited": {"clip_t_rel": 1.0}})
    multi = _run(tmp_path, "shapes-custom-multi", {"joint": {"both_present": 0.2}, "unedited": {"both_present": 0.0}})
    publish([single, multi], results)
    rerun = _run(tmp_path / "again", "shapes-custom-multi", {"joint": {"both_present": 0.5}})
    publish([rerun], results)
    merged = json.loads((results / "shapes_custom.json").read_text())
    assert merged["single"]["summary"] == {"lora": {"clip_i_rel": 0.7}, "unedited": {"clip_t_rel": 1.0}}
    assert merged["multi"]["summary"] == {"joint": {"both_present": 0.5}}
    assert merged["summary"] == {"lora": {"clip_i_rel": 0.7}, "unedited": {"clip_t_rel": 1.0}, "joint": {"both_present": 0.5}}
