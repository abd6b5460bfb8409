"""The built wheel installs everything under the ``conceptsmith`` namespace and runs outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the files git would commit (tracked or not ignored), as a release would be."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        check=True, cwd=out,
    )
    (built,) = out.glob("conceptsmith-*.whl")
    return built


def test_wheel_holds_only_the_conceptsmith_namespace_with_its_configs(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"conceptsmith", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for required in ("conceptsmith/erasure/uce.py", "conceptsmith/customization/lora.py", "conceptsmith/evaluation/engine.py",
                     "conceptsmith/configs/bench/shapes-smoke.yaml", "conceptsmith/configs/erase/uce.yaml",
                     "conceptsmith/configs/models/shapes.yaml"):
        assert required in names, required
    shipped = {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    packaged = {n.removeprefix("conceptsmith/configs/") for n in names if n.startswith("conceptsmith/configs/") and n.endswith(".yaml")}
    assert packaged == shipped
    assert any(n.startswith("conceptsmith/world/weights/") for n in names)


def test_installed_wheel_runs_the_smoke_bench_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import conceptsmith, conceptsmith.erasure, importlib.util as u;"
         "print(conceptsmith.__file__); print(conceptsmith.erasure.__file__); print(u.find_spec('erasure'))"],
        cwd=work, env=env, capture_output=True, text=True, check=True,
    ).stdout.split("\n")
    assert where[0].startswith(str(target)) and where[1].startswith(str(target)), where
    assert where[2] == "None"  # no generic top-level package
    run = subprocess.run(
        [sys.executable, "-c", "from conceptsmith.cli import main; main()", "bench", "shapes-smoke", "--out", "report", "--cache", "cache", "--json"],
        cwd=work, env=env, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((work / "report" / "results.json").read_text())
    assert results["bench"] == "shapes-smoke"
    assert results["summary"]["uce"]["acc_e"] < results["summary"]["unedited"]["acc_e"]
    assert (work / "report" / "report.html").is_file()
