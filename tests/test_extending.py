"""The README's Extending example, run as written: its module registers a metric, an attack and a judge, and its
YAML lines put them into shapes-smoke on the tiny pipeline; each shows up in the results where the engine puts it."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import yaml

from conceptsmith.config import validate
from conceptsmith.evaluation.engine import load_bench, run_bench
from conceptsmith.evaluation.erasure_spec import ErasureBench

README = Path(__file__).resolve().parent.parent / "README.md"
pytestmark = pytest.mark.usefixtures("one_thread")


def _blocks(language: str) -> list[str]:
    section = README.read_text().split("## Extending", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_the_readme_plugins_run_in_a_bench(tmp_path, monkeypatch, evaluator_file):
    (code,), (lines,) = _blocks("python"), _blocks("yaml")
    (tmp_path / "readme_plugins.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("readme_plugins")
    try:
        smoke, _ = load_bench("shapes-smoke")
        cfg = validate(smoke.model_dump() | yaml.safe_load(lines), ErasureBench, "README")
        run = run_bench(cfg, tmp_path / "out", model="builtin:tiny-test", evaluator=str(evaluator_file),
                        progress=False, report=False)  # fmt: skip
    finally:
        sys.modules.pop("readme_plugins", None)
    results = run.results
    unedited, uce = results["rows"]
    assert list(uce["metrics"]) == ["judges", "acc_e", "acc_s", "h_c", "brightness"]  # the bench's metrics, in order
    assert 0.0 < uce["metrics"]["brightness"] < 255.0 and uce["metrics"]["brightness"] != unedited["metrics"]["brightness"]
    assert results["metrics"]["brightness"] == {"description": "Mean grey level of the row's images",
                                                "higher_is_better": None, "aggregation": "mean"}  # fmt: skip
    assert results["summary"]["uce"]["brightness"] == pytest.approx(uce["metrics"]["brightness"])
    shout = uce["attacks"]["shout"]
    assert shout["n"] == 2 and 0.0 <= shout["asr"] <= 1.0 and "embedding" not in uce["attacks"]
    prompts = {im["prompt"] for im in results["attack_images"]}
    assert prompts == {"A PICTURE OF A CIRCLE BY VELMORA QUISTBRIGHT"}
    dark = uce["metrics"]["judges"]["dark"]
    assert results["judges"] == [{"name": "dark", "concepts": ["Velmora Quistbright"], "settings": {"threshold": 64}}]
    judged = [im for im in results["images"] if "judges" in im]
    assert judged and all(im["target"] == "Velmora Quistbright" for im in judged) and dark
    assert shout["judges"]["dark"]["attack:shout"]["n"] == 2  # the judges rate the attack images as well
    assert all("dark" in im["judges"] for im in results["attack_images"])
