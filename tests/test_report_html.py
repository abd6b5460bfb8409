"""The HTML reports as a browser sees them: headless Chromium renders ``report.html`` (``--dump-dom``: the DOM after
scripts; ``--screenshot``) and the tests assert on that DOM: every seed's image, attack images beside the images
they attack, the judge's labels, the run-metadata block, links that resolve, and plot axes that state each metric's
own direction. Reports come from synthetic results fed straight to the writers, and from a real ``conceptsmith
bench`` run of shapes-smoke with an ``erase_scale`` sweep on the tiny model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml
from PIL import Image

from conceptsmith.evaluation.bench_spec import BENCH_DIR
from conceptsmith.evaluation.custom_report import write_custom_report
from conceptsmith.evaluation.erasure_suite import summarize_rows
from conceptsmith.evaluation.report import write_report
from conceptsmith.evaluation.report_parts import higher_is_better, run_record
from conceptsmith.registry import get_metric

REPO = Path(__file__).resolve().parent.parent
JUDGE = "builtin:shapes-clip"
#: The direction of each metric, stated here independently of the code under test.
EXPECTED_DIRECTION = {
    "acc_e": "lower", "acc_g": "lower", "acc_i": "lower", "asr_embedding": "lower", "asr_p4d": "lower",
    "fd_clip": "lower", "acc_s": "higher", "acc_s_rel": "higher", "h_o": "higher", "h_c": "higher",
    "paired_specificity": "higher", "clip_score": "higher", "clip_i": "higher", "clip_t_rel": "higher",
}  # fmt: skip


# ============================================================================================
# the browser and a small DOM
# ============================================================================================
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "headless Chromium is needed to test the HTML reports but none of chromium / chromium-browser / "
        "google-chrome is on PATH: install it (Debian/Ubuntu: `sudo apt-get install -y chromium`; `make install` "
        "does it when run as root) and rerun"
    )


def _browser(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp / 'profile'}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    parent: Node | None = None
    children: list[Node | str] = field(default_factory=list)

    def iter(self, tag: str | None = None):
        for child in self.children:
            if isinstance(child, Node):
                if tag is None or child.tag == tag:
                    yield child
                yield from child.iter(tag)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def up(self, tag: str) -> Node:
        node = self.parent
        while node is not None and node.tag != tag:
            node = node.parent
        assert node is not None, f"<{self.tag}> is not inside a <{tag}>"
        return node


class _Builder(HTMLParser):
    VOID = {"img", "br", "meta", "link", "input", "hr", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#document", {})

    def handle_starttag(self, tag, attrs):
        child = Node(tag, {k: v or "" for k, v in attrs}, self.node)
        self.node.children.append(child)
        if tag not in self.VOID:
            self.node = child

    def handle_startendtag(self, tag, attrs):
        self.node.children.append(Node(tag, {k: v or "" for k, v in attrs}, self.node))

    def handle_endtag(self, tag):
        node = self.node
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.node = node.parent

    def handle_data(self, data):
        self.node.children.append(data)


def rendered_dom(report: Path, tmp: Path) -> Node:
    """The DOM Chromium builds from ``report`` (after scripts), parsed."""
    proc = _browser(tmp, "--dump-dom", report.resolve().as_uri())
    assert "<body" in proc.stdout
    builder = _Builder()
    builder.feed(proc.stdout)
    return builder.root


def screenshot_is_not_blank(report: Path, tmp: Path) -> None:
    shot = tmp / "shot.png"
    _browser(tmp, f"--screenshot={shot}", "--window-size=1280,1600", report.resolve().as_uri())
    with Image.open(shot) as im:
        gray = im.convert("L")
        assert im.size == (1280, 1600)
        assert gray.getextrema()[0] < 128  # some dark pixels (text, images) ...
        dark = sum(n for value, n in enumerate(gray.histogram()) if value < 200)
        assert dark > 0.005 * im.size[0] * im.size[1]  # ... and more than a speck


def resolved(src: str, report: Path) -> Path:
    assert not src.startswith(("data:", "/", "file:")), f"not a relative link: {src[:60]}"
    return (report.parent / unquote(src)).resolve()


# ============================================================================================
# shared DOM checks
# ============================================================================================
def check_links_resolve(dom: Node, report: Path) -> None:
    links = [n.attrs["href"] for n in dom.iter("a")] + [n.attrs["src"] for n in dom.iter("img")]
    assert links
    missing = [link for link in links if not resolved(link, report).is_file()]
    assert not missing, missing[:5]


def check_metadata(dom: Node, results: dict, report: Path) -> dict[str, str]:
    """The run-metadata block states the run's facts; returns {term: its text}."""
    block = next(n for n in dom.iter("section") if n.attrs.get("id") == "run-metadata")
    terms = [dt.text() for dt in block.iter("dt")]
    facts = dict(zip(terms, (" ".join(dd.text().split()) for dd in block.iter("dd") if dd.parent.tag == "dl"), strict=True))
    assert terms == ["command", "date", "duration", "versions", "base model", "judge", "results", "edit files", "cache"]
    run = results["run"]
    assert facts["command"] == run["command"] and facts["date"] == run["date"]
    assert facts["duration"] == f"{run['seconds']:.1f} s"
    assert facts["versions"] == ", ".join(f"{p} {run['versions'][p]}" for p in ("conceptsmith", "torch", "diffusers", "transformers"))
    assert all(run["versions"].values())
    assert results["model"]["fingerprint"] in facts["base model"] and results["model"]["spec"] in facts["base model"]
    assert facts["judge"].startswith(f"{results['evaluator']['spec']}: a zero-shot classifier")
    assert "not ground truth" in facts["judge"]
    hrefs = {a.attrs["href"] for a in block.iter("a")}
    assert "results.json" in hrefs and resolved("results.json", report) == (report.parent / "results.json").resolve()
    edit_links = {resolved(a.attrs["href"], report) for a in block.iter("a") if "edit-file" in a.attrs.get("class", "")}
    assert edit_links == {Path(p).resolve() for p in results["edit_files"].values()}
    return facts


def _tiles(dom: Node) -> list[Node]:
    return [n for n in dom.iter("figure") if "tile" in n.attrs.get("class", "")]


def _path_of(tile: Node, report: Path) -> Path:
    return resolved(next(tile.iter("img")).attrs["src"], report)


def check_erasure_galleries(dom: Node, results: dict, report: Path) -> None:
    """Every image of every seed in a gallery, labelled with the judge's prediction; every attack image in the
    row (same prompt and seed) of the edited image it attacks, with the unedited image in that row too."""
    cwd = Path(results["run"]["cwd"])
    tiles = {_path_of(t, report): t for t in _tiles(dom)}
    judge = results["evaluator"]["spec"]
    for im in results["images"]:
        tile = tiles[(cwd / im["path"]).resolve()]
        assert tile.attrs["data-seed"] == str(im["seed"]) and tile.attrs["data-prompt"] == im["prompt"]
        assert f"judge ({judge}): {im['pred']}" in tile.text()
    assert {int(t.attrs["data-seed"]) for t in tiles.values()} == set(results["config"]["seeds"])
    assert results["attack_images"]
    for a in results["attack_images"]:
        tile = tiles[(cwd / a["path"]).resolve()]
        assert tile.attrs["data-role"] == "attack" and f"judge ({judge}): {a['pred']}" in tile.text()
        row = tile.up("tr")
        assert row.attrs["data-seed"] == str(a["seed"])
        beside = {(t.attrs["data-role"], t.attrs["data-method"]): t for t in _tiles(row)}
        edited, unedited = beside[("edited", a["method"])], beside[("unedited", "unedited")]
        attacked = a["source"] or next(
            im["prompt"] for im in results["images"] if im["set"] == "erase" and im["target"] == a["target"]
        )
        for t in (edited, unedited):
            assert t.attrs["data-prompt"] == attacked and t.attrs["data-seed"] == str(a["seed"])
        # the attack column comes right after its method's column
        cells = [c for c in row.children if isinstance(c, Node) and c.tag == "td"]
        column = next(i for i, c in enumerate(cells) if tile in list(c.iter("figure")))
        previous = [t.attrs.get("data-method") for t in _tiles(cells[column - 1])]
        assert a["method"] in previous
    assert "judge (" in dom.text() and "ground truth" in dom.text()


def check_axis_directions(svg_texts: list[str], metrics: set[str]) -> None:
    """Each plotted metric's axis title states its own, true direction; no text misstates one."""
    for name in metrics:
        assert f"{name} ({EXPECTED_DIRECTION[name]} is better)" in svg_texts, (name, svg_texts)
    for text in svg_texts:
        for way in ("higher", "lower"):
            if f"{way} is better" in text:
                named = [m for m in EXPECTED_DIRECTION if re.search(rf"(?<!1 - )\b{re.escape(m)}\b", text)]
                assert all(EXPECTED_DIRECTION[m] == way for m in named), text


def svg_texts(dom: Node) -> list[str]:
    return [" ".join(t.text().split()) for svg in dom.iter("svg") for t in svg.iter("text")]


# ============================================================================================
# synthetic results
# ============================================================================================
def _png(path: Path, color: tuple[int, int, int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return str(path)


def synthetic_results(root: Path, monkeypatch) -> dict:
    """An erasure run with a sweep of two values, three seeds, two attacks (one names the prompt it attacks,
    one only the concept); the unedited model's image paths are relative to the run's working directory."""
    from datetime import datetime, timezone

    monkeypatch.setattr(sys, "argv", ["conceptsmith", "bench", "synthetic.yaml", "--out", "run"])
    seeds = [0, 1, 2]
    prompts = [("a picture by A", "erase", "A"), ("a picture by B", "preserve", "B"), ("a square", "neutral", None)]
    methods = ["unedited", "uce erase_scale=0.5", "uce erase_scale=2"]
    images, attacks, rows, files = [], [], [], {}
    for m_i, method in enumerate(methods):
        for p_i, (prompt, kind, target) in enumerate(prompts):
            for seed in seeds:
                path = _png(root / "cache" / "fp" / f"m{m_i}" / f"{p_i}-{seed}.png", (40 * m_i, 80 * p_i, 60 * seed))
                if method == "unedited":
                    path = os.path.relpath(path, root)
                pred = target or "A" if method == "unedited" else ("C" if kind == "erase" else target or "B")
                images.append({"task": "erase-a", "method": method, "prompt": prompt, "seed": seed, "set": kind,
                               "target": target, "path": path, "pred": pred})  # fmt: skip
        if method == "unedited":
            rows.append({"task": "erase-a", "method": method, "edit_key": "unedited", "attacks": {},
                         "metrics": {"acc_e": {"argmax": 1.0, "prob": 0.9}, "acc_s": {"argmax": 0.8, "prob": 0.7},
                                     "paired_specificity": 1.0}})  # fmt: skip
            continue
        value = [0.5, 2][m_i - 1]
        for seed in seeds:
            for attack, source, text in (("embedding", None, None), ("p4d", "a picture by A", "painting quist A")):
                path = _png(root / "cache" / "fp" / f"m{m_i}" / f"attack-{attack}-{seed}.png", (200, 10 * seed, 90))
                attacks.append({"task": "erase-a", "method": method, "attack": attack, "condition": f"{attack}:x",
                                "prompt": text, "source": source, "target": "A", "seed": seed, "path": path,
                                "pred": "A" if seed else "B"})  # fmt: skip
        key = f"uce-{m_i}"
        files[key] = str(root / "cache" / "fp" / "edits" / f"uce-{m_i}.safetensors")
        Path(files[key]).parent.mkdir(exist_ok=True)
        Path(files[key]).write_bytes(b"an edit")
        rows.append({"task": "erase-a", "method": method, "edit_key": key,
                     "sweep": {"method": "uce", "param": "erase_scale", "value": value},
                     "attacks": {"embedding": {"asr": 0.5 / m_i}, "p4d": {"asr": 0.2}},
                     "metrics": {"acc_e": {"argmax": 0.4 / m_i, "prob": 0.3}, "acc_s": {"argmax": 0.8 - 0.2 * m_i, "prob": 0.5},
                                 "paired_specificity": 0.9 - 0.1 * m_i}})  # fmt: skip
    started = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    results = {
        "bench": "synthetic", "description": "a synthetic erasure run", "accuracy_headline": "argmax",
        "config": {"seeds": seeds, "sweep": {"param": "erase_scale", "values": [0.5, 2]}},
        "model": {"spec": "builtin:shapes", "family": "sd1", "fingerprint": "f1e2d3c4b5a69788"},
        "evaluator": {"spec": JUDGE, "logit_scale": 100.0}, "conventions": {},
        "metrics": {n: {"description": get_metric(n).description, "higher_is_better": get_metric(n).higher_is_better,
                        "aggregation": get_metric(n).aggregation} for n in ("acc_e", "acc_s", "paired_specificity")},
        "summary": summarize_rows(rows), "rows": rows, "images": images, "attack_images": attacks,
        "edit_files": files, "run": run_record(started, 12.34, root / "cache" / "fp") | {"cwd": str(root)},
    }  # fmt: skip
    out = root / "run"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(results))
    return results


def test_metric_directions_match_their_definitions():
    for name, way in EXPECTED_DIRECTION.items():
        assert higher_is_better(name) is (way == "higher"), name


def test_erasure_report_in_a_browser(tmp_path, monkeypatch):
    """Synthetic results -> report.html -> Chromium's DOM: galleries, judge labels, metadata, links, axis titles."""
    results = synthetic_results(tmp_path, monkeypatch)
    paths = write_report(results, tmp_path / "run")
    report = paths["html"]
    assert report.stat().st_size < 200_000 and "base64" not in report.read_text()
    dom = rendered_dom(report, tmp_path)
    check_links_resolve(dom, report)
    facts = check_metadata(dom, results, report)
    assert facts["command"] == "conceptsmith bench synthetic.yaml --out run"
    assert facts["date"] == "2025-01-02T03:04:05+00:00" and facts["duration"] == "12.3 s"
    check_erasure_galleries(dom, results, report)
    galleries = [n for n in dom.iter("section") if "gallery" in n.attrs.get("class", "")]
    assert [g.attrs["data-prompt"] for g in galleries] == ["a picture by A", "a picture by B", "a square"]
    erase = galleries[0]
    headers = [" ".join(th.text().split()) for th in next(erase.iter("thead")).iter("th")]
    assert headers == ["seed", "unedited", "uce erase_scale=0.5", "uce erase_scale=0.5 + embedding attack",
                       "uce erase_scale=0.5 + p4d attack", "uce erase_scale=2", "uce erase_scale=2 + embedding attack",
                       "uce erase_scale=2 + p4d attack"]  # fmt: skip
    assert [tr.attrs["data-seed"] for tr in next(erase.iter("tbody")).iter("tr")] == ["0", "1", "2"]
    texts = svg_texts(dom)
    check_axis_directions(texts, {"acc_e", "acc_s", "paired_specificity", "asr_embedding", "asr_p4d"})
    assert "efficacy: 1 - acc_e (higher is better)" in texts and "specificity: acc_s_rel (higher is better)" in texts
    assert any("erase_scale=0.5" in t for t in texts) and "uce" in texts  # the sweep's points and line
    screenshot_is_not_blank(report, tmp_path)


def test_customization_report_in_a_browser(tmp_path, monkeypatch):
    """Synthetic customization results: references, per-prompt tables with every seed (unedited beside each
    method), metadata with the edit files, table headers stating each metric's direction."""
    from datetime import datetime, timezone

    monkeypatch.setattr(sys, "argv", ["conceptsmith", "bench", "custom.yaml"])
    seeds, images = [3, 4], []
    refs = [_png(tmp_path / "refs" / f"{i}.png", (10, 200, 10 * i)) for i in range(3)]
    plans = {"unedited": ["a photo of a mug", "a mug on a table"], "lora": ["a photo of a <m> mug", "a <m> mug on a table"]}
    for m_i, (method, prompts) in enumerate(plans.items()):
        for p_i, prompt in enumerate(prompts):
            for seed in seeds:
                path = _png(tmp_path / "cache" / f"{method}-{p_i}-{seed}.png", (90 * m_i, 100 * p_i, 30 * seed))
                images.append({"section": "single", "group": "<m>", "method": method, "prompt": prompt, "seed": seed,
                               "path": path})  # fmt: skip
    edit = tmp_path / "cache" / "edits" / "lora-1.safetensors"
    edit.parent.mkdir()
    edit.write_bytes(b"an edit")
    summary = {m: {"clip_i": 0.5, "clip_i_rel": 0.9, "clip_t": 0.3, "clip_t_rel": 1.0} for m in plans}
    results = {
        "bench": "custom", "kind": "customization", "description": "a synthetic customization run",
        "config": {"seeds": seeds}, "model": {"spec": "builtin:shapes", "family": "sd1", "fingerprint": "00ff00ff00ff00ff"},
        "evaluator": {"spec": JUDGE}, "presence": "halves", "conventions": {}, "summary": summary,
        "references": {"<m>": {"train": refs}}, "edit_files": {"lora-k": str(edit)},
        "rows": [{"section": "single", "group": "<m>", "method": "unedited", "edit_key": "unedited", "metrics": {}},
                 {"section": "single", "group": "<m>", "method": "lora", "edit_key": "lora-k", "metrics": {}}],
        "images": images, "run": run_record(datetime.now(timezone.utc), 3.0, tmp_path / "cache"),
    }  # fmt: skip
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(results))
    report = write_custom_report(results, out)["html"]
    dom = rendered_dom(report, tmp_path)
    check_links_resolve(dom, report)
    check_metadata(dom, results, report)
    tiles = {_path_of(t, report): t for t in _tiles(dom)}
    assert {Path(p).resolve() for p in refs} | {Path(im["path"]).resolve() for im in images} == set(tiles)
    galleries = [n for n in dom.iter("section") if "gallery" in n.attrs.get("class", "")]
    assert len(galleries) == 2
    for i, gallery in enumerate(galleries):
        heads = [" ".join(th.text().split()) for th in next(gallery.iter("thead")).iter("th")]
        assert heads == ["seed", f"unedited {plans['unedited'][i]}", f"lora {plans['lora'][i]}"]
        for tr in next(gallery.iter("tbody")).iter("tr"):
            shown = [(t.attrs["data-method"], _path_of(t, report)) for t in _tiles(tr)]
            seed = int(tr.attrs["data-seed"])
            want = [(im["method"], Path(im["path"]).resolve()) for im in images
                    if im["seed"] == seed and im["prompt"] in (plans["unedited"][i], plans["lora"][i])]  # fmt: skip
            assert shown == want
    headers = [" ".join(th.text().split()) for th in dom.iter("th")]
    assert "clip_i_rel higher is better" in headers
    screenshot_is_not_blank(report, tmp_path)


# ============================================================================================
# a real run: shapes-smoke with an erase_scale sweep, through the CLI
# ============================================================================================
def test_shapes_smoke_sweep_end_to_end_in_a_browser(tmp_path, evaluator_file):
    """``python -m conceptsmith bench`` on shapes-smoke (tiny model, tiny evaluator) with ``sweep: {param:
    erase_scale, values: [0.5, 2.0]}``: UCE once per value (rows tagged, two edit files), and a report whose DOM
    has every seed, the attack images beside the attacked ones, the metadata and the trade-off plot."""
    from conftest import build_tiny_pipe

    model = tmp_path / "tiny-model"
    build_tiny_pipe().save_pretrained(model)
    config = yaml.safe_load((BENCH_DIR / "shapes-smoke.yaml").read_text())
    config["sweep"] = {"param": "erase_scale", "values": [0.5, 2.0]}
    bench = tmp_path / "smoke-sweep.yaml"
    bench.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "conceptsmith", "bench", str(bench), "--out", str(out), "--model", str(model),
           "--evaluator", str(evaluator_file), "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["unedited", "uce erase_scale=0.5", "uce erase_scale=2.0"]
    swept = results["rows"][1:]
    assert [r["params"]["erase_scale"] for r in swept] == [0.5, 2.0]
    assert [r["sweep"] for r in swept] == [{"method": "uce", "param": "erase_scale", "value": v} for v in (0.5, 2.0)]
    assert swept[0]["edit_key"] != swept[1]["edit_key"] and "sweep" not in results["rows"][0]
    assert len(set(results["edit_files"].values())) == 2 and all(Path(p).is_file() for p in results["edit_files"].values())
    assert len(results["attack_images"]) == 2 * 2  # one embedding-attack condition x 2 seeds, per sweep point
    report = out / "report.html"
    dom = rendered_dom(report, tmp_path)
    check_links_resolve(dom, report)
    facts = check_metadata(dom, results, report)
    assert facts["command"].startswith(f"python -m conceptsmith bench {bench} --out {out}")
    print("run metadata as rendered:", json.dumps(facts, indent=1))
    check_erasure_galleries(dom, results, report)
    texts = svg_texts(dom)
    check_axis_directions(texts, {"acc_e", "acc_g", "acc_s", "h_o", "paired_specificity", "asr_embedding"})
    assert "efficacy: 1 - acc_e (higher is better)" in texts
    assert "erase_scale=0.5" in texts and "erase_scale=2.0" in texts
    screenshot_is_not_blank(report, tmp_path)


def test_a_sweep_param_no_method_has_fails_before_loading_a_model(tmp_path):
    from typer.testing import CliRunner

    from conceptsmith.cli import app
    from conceptsmith.config import ConfigError

    config = yaml.safe_load((BENCH_DIR / "shapes-smoke.yaml").read_text())
    config |= {"model": "builtin:no-such-model", "sweep": {"param": "erase_scael", "values": [0.5, 2.0]}}
    bench = tmp_path / "bad.yaml"
    bench.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["bench", str(bench), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "sweep param 'erase_scael' is not a parameter of method 'uce' (uce)" in result.output
    assert "erase_scale" in result.output and not (tmp_path / "out").exists()
    config["sweep"]["values"] = [1.0]
    bench.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="values"):
        from conceptsmith.evaluation.engine import load_bench

        load_bench(bench)


def test_a_report_is_rebuilt_from_its_results_without_torch(tmp_path, monkeypatch):
    """Rebuilding report.html from results.json (grids, plots, tables) imports no model stack."""
    synthetic_results(tmp_path, monkeypatch)
    script = (
        "import json, sys\n"
        "from conceptsmith.evaluation.report import write_report\n"
        f"paths = write_report(json.load(open({str(tmp_path / 'run' / 'results.json')!r})), {str(tmp_path / 'rebuilt')!r})\n"
        "print(sorted(paths), sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("[]"), proc.stdout
    assert "'html'" in proc.stdout and (tmp_path / "rebuilt" / "report.html").exists()
