"""The customization benchmark (the engine's customization suite) on the tiny pipeline with a tiny open_clip
evaluator: config validation, an end-to-end run (results + report), a cache hit on re-run, the
metric normalizations recomputed by hand, the halves presence rule, the CLI dispatch, and the relearning
audit (several erasures, customization checkpoints, steps_to_50)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from conceptsmith.config import ConfigError
from conceptsmith.evaluation.bench_metrics import relative
from conceptsmith.evaluation.custom_suite import summarize_rows as summarize
from conceptsmith.evaluation.engine import bench_kind, load_bench, run_bench
from conceptsmith.evaluation.providers import both_present_halves
from conceptsmith.evaluation.relearn_suite import steps_to_rate

FAST = {"steps": 2, "batch_size": 1, "eval_batches": 0}
CD_FAST = {**FAST, "num_class_images": 1, "class_inference_steps": 2}
TINY = {
    "kind": "customization",
    "name": "tiny-custom",
    "renderer": "shapes",
    "model": "builtin:tiny-test",
    "seeds": [0],
    "generation": {
        "num_inference_steps": 2,
        "guidance_scale": 2.0,
        "height": 16,
        "width": 16,
        "batch_size": 4,
    },
    "classes": ["mushroom", "key", "circle", "square"],
    "concepts": [{"token": "<mush>", "object": "mushroom"}, {"token": "<key>", "object": "key"}],
    "n_reference": 3,
    "prompts": ["a picture of a {}"],
    "composition_prompts": ["a picture of a {a} next to a {b}", "a picture of a {a} left of a {b}"],
    "prompt_sets": {"next to": ["a picture of a {a} next to a {b}"]},
    "known_pairs": [["circle", "square"]],
    "ceiling": {"steps": 2, "batch_size": 2},
    "methods": [
        {"config": "configs/customize/custom-diffusion.yaml", "params": CD_FAST},
        {"config": "configs/customize/lora.yaml", "params": FAST},
        {"config": "configs/customize/textual-inversion.yaml", "params": FAST},
    ],
    "compositions": [
        {
            "kind": "joint",
            "name": "joint",
            "method": {"config": "configs/customize/custom-diffusion.yaml", "params": CD_FAST},
        },
        {"kind": "merge", "name": "closed-form", "merge": "closed-form", "source": "custom-diffusion"},
        {"kind": "merge", "name": "lora-sum", "merge": "lora-sum", "source": "lora"},
        {
            "kind": "hook",
            "name": "t2i-zero",
            "method": {"config": "configs/customize/t2i-zero.yaml"},
            "on_top_of": "closed-form",
        },
        {
            "kind": "hook",
            "name": "a-star",
            "method": {"config": "configs/customize/a-star.yaml"},
            "on_top_of": "closed-form",
        },
    ],
    "relearn": {
        "concept": "circle",
        "preserve": ["square"],
        "erase": {"config": "configs/erase/uce.yaml"},
        "token": "<rel>",
        "method": {"config": "configs/customize/custom-diffusion.yaml", "params": CD_FAST},
    },
}
# fits: (3 methods + the conditioning ceiling) x 2 concepts + joint + relearn (erase, customize); images:
# 2 concepts x 4 prompted rows x 1 prompt + 2 ceiling rows + (6 composition rows + 1 known pair) x 2 prompts +
# 3 relearning rows (1 seed each)
TRAINED, GENERATED = 11, 27
pytestmark = pytest.mark.usefixtures("one_thread")


def _write(folder: Path, data: dict, name: str = "bench.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, evaluator_file) -> Path:
    return _write(tmp_path_factory.mktemp("config"), {**TINY, "evaluator": str(evaluator_file)})


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_config):
    return run_bench(tiny_config, tmp_path_factory.mktemp("bench") / "one", progress=False)


# -- configs ----------------------------------------------------------------------------------------


def test_shipped_configs_validate_and_dispatch():
    single, _ = load_bench("shapes-custom-single")
    assert [c.object for c in single.concepts] == ["mushroom", "key", "umbrella"]
    assert {m.label() for m in single.methods} == {"custom-diffusion", "lora", "textual-inversion"}
    # inside the 5-minute budget per run (bench/results/shapes_custom.json, train_seconds): 1200 steps of Custom
    # Diffusion / LoRA took 80-109 s, 2400 steps of textual inversion 197-200 s
    budget = {"custom-diffusion": 1200, "lora": 1200, "textual-inversion": 2400}
    assert all(m.params["steps"] <= budget[m.label()] for m in single.methods)
    assert single.ceiling is not None
    multi, _ = load_bench("shapes-custom-multi")
    assert len(multi.concepts) == 2 and multi.relearn is not None and multi.relearn.concept == "circle"
    assert multi.known_pairs and any("left of" in t for t in multi.composition_prompts)
    assert {c.kind for c in multi.compositions} == {"joint", "merge", "hook"}
    assert {c.merge for c in multi.compositions if c.kind == "merge"} == {"closed-form", "lora-sum"}
    # the bar's prompts are a named set, and the composition that depends on its training seed is measured over five
    assert multi.prompt_sets["next to"] and all("next to" in t for t in multi.prompt_sets["next to"])
    assert any(len(c.training_seeds) == 5 for c in multi.compositions if c.kind == "joint")
    audit, _ = load_bench("shapes-relearn")  # every erasure method, relearned at four checkpoints
    assert audit.relearn.concept == "skull" and not audit.concepts and not audit.methods
    erasures = ["uce", "rece", "esd", "concept-ablation", "te-unlearn", "advunlearn", "mace"]
    assert [m.label() for m in audit.relearn.erase] == erasures
    assert audit.relearn.checkpoints == [50, 100, 200, 400]
    assert bench_kind("shapes-custom-single") == "customization" and bench_kind("shapes-smoke") == "erasure"
    assert load_bench("shapes-smoke")[0].kind == "erasure"  # one loader reads either kind
    assert load_bench("shapes-custom-single")[0].kind == "customization"


def test_the_compose_preset_is_the_benchmarked_composition():
    """configs/customize/lora-compose.yaml, which the README offers for multi-concept runs, is what the multi
    bench's every-layer LoRA row trains: the row names the preset and overrides nothing."""
    from conceptsmith.evaluation.bench_spec import resolve_method

    multi, path = load_bench("shapes-custom-multi")
    row = next(c for c in multi.compositions if c.name == "joint-lora-all-layers-cutmix")
    assert row.method.config == "configs/customize/lora-compose.yaml" and not row.method.params
    method, params = resolve_method(row.method, path, row.name)
    assert method == "lora" and params["cut_mix"] == 12 and "conv1" in params["unet_modules"]


def _checkpoints(data: dict, checkpoints: list[int], **params) -> None:
    """Relearning checkpoints in place of the method's steps (plus ``params``)."""
    method = data["relearn"]["method"]
    method["params"] = {k: v for k, v in method["params"].items() if k != "steps"} | params
    data["relearn"]["checkpoints"] = checkpoints


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.update(seedz=[0]), "seedz.*unknown key"),
        (
            lambda d: d["methods"][0].update(config=None, method="custom-difusion"),
            "custom-difusion.*Available",
        ),
        (lambda d: d["methods"][1]["params"].update(rnak=2), "rnak"),
        (lambda d: d["concepts"][0].update(object="mushrom"), "renderer 'shapes' has no object 'mushrom'.*mushroom, key"),
        (
            lambda d: d["concepts"][1].update(object=None, images="no/such/folder", class_word="key"),
            "<key>.*no/such/folder",
        ),
        (lambda d: d["compositions"][1].update(source="dreambooth"), "dreambooth"),
        (lambda d: d["compositions"][3].update(on_top_of="a-star"), "on_top_of: a-star"),
        (lambda d: d["relearn"].update(concept="skul"), "renderer 'shapes' has no object 'skul'"),
        (lambda d: d["relearn"].update(erase=[]), "relearn.erase.*no erasure method"),
        (
            lambda d: d["relearn"].update(erase=[d["relearn"]["erase"]] * 2),
            r"erasure labels repeat: \['uce', 'uce'\]",
        ),
        (
            lambda d: _checkpoints(d, [100, 50]),
            r"relearn.checkpoints.*sorted, without repeats; got \[100, 50\]",
        ),
        (lambda d: _checkpoints(d, [50, 50]), r"relearn.checkpoints.*got \[50, 50\]"),
        (lambda d: _checkpoints(d, [0, 50]), r"relearn.checkpoints.*>= 1"),
        (
            lambda d: d["relearn"].update(checkpoints=[1, 2]),
            r"`checkpoints` replace `steps`; drop params.steps \(2\)",
        ),
        (lambda d: _checkpoints(d, [1, 2], lr_schedule="cosine"), "lr_schedule: constant"),
        (
            lambda d: d["relearn"].update(method={"config": "configs/customize/t2i-zero.yaml"}),
            "'t2i-zero' does not train",
        ),
        (lambda d: d.update(concepts=[], compositions=[]), "`concepts` is empty"),
        (lambda d: d.update(composition_prompts=["{a} alone"]), r"needs '\{a\}' and '\{b\}'"),
        (lambda d: d.update(ceiling={"stepz": 3}), "stepz"),
        (lambda d: d["compositions"][0].update(training_seeds=[0, 1, 0]), r"repeat a seed: \[0, 1, 0\]"),
        (
            lambda d: d.update(prompt_sets={"next to": ["a picture of a {a} beside a {b}"]}),
            "prompt set 'next to'.*beside a",
        ),
        (lambda d: d.update(prompt_sets={"none": []}), "prompt set 'none'.*empty"),
    ],
    ids=[
        "unknown-key",
        "unknown-method",
        "bad-param",
        "unknown-object",
        "missing-images",
        "merge-source",
        "hook-order",
        "relearn-concept",
        "relearn-no-erasure",
        "relearn-repeated-erasure",
        "checkpoints-unsorted",
        "checkpoints-repeated",
        "checkpoints-zero",
        "checkpoints-and-steps",
        "checkpoints-decaying-lr",
        "relearn-untrained-method",
        "no-concepts-but-methods",
        "pair-prompt",
        "ceiling-setting",
        "repeated-training-seed",
        "prompt-set-stranger",
        "prompt-set-empty",
    ],
)
def test_config_errors_name_the_problem(tmp_path, change, match):
    data = copy.deepcopy({**TINY, "evaluator": "e"})
    change(data)
    with pytest.raises(ConfigError, match=match):
        load_bench(_write(tmp_path, data))


def test_objects_need_a_renderer_and_folders_do_not(tmp_path):
    """Rendered references are a provider the bench names: without `renderer:` an `object:` concept is refused,
    while a bench whose concepts are folders of images needs none (any model, any open_clip evaluator)."""
    data = copy.deepcopy({**TINY, "evaluator": "e"})
    del data["renderer"]
    with pytest.raises(ConfigError, match=r"\['mushroom', 'key', 'circle'\] are drawn by a renderer: set `renderer: shapes`"):
        load_bench(_write(tmp_path, data))
    for i, name in enumerate(("a", "b")):
        folder = tmp_path / name
        folder.mkdir()
        for j in range(2):
            Image.new("RGB", (8, 8), (40 * j, 90 * i, 0)).save(folder / f"{j}.png")
        data["concepts"][i] = {"token": data["concepts"][i]["token"], "images": str(folder), "class_word": ["mushroom", "key"][i]}
    data.pop("relearn")
    cfg, _ = load_bench(_write(tmp_path, data))
    assert cfg.renderer is None and [c.images for c in cfg.concepts] == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_empty_image_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    data = copy.deepcopy({**TINY, "evaluator": "e"})
    data["concepts"][0] = {"token": "<mush>", "images": str(tmp_path / "empty"), "class_word": "mushroom"}
    with pytest.raises(ConfigError, match="<mush>.*No images"):
        load_bench(_write(tmp_path, data))


# -- the runner -------------------------------------------------------------------------------------


def test_runner_writes_results_and_report(first_run):
    results = first_run.results
    assert (first_run.trained, first_run.generated, first_run.cached) == (TRAINED, GENERATED, 0)
    assert json.loads((first_run.out_dir / "results.json").read_text())["summary"] == json.loads(
        json.dumps(results["summary"])
    )
    summary = results["summary"]
    singles, compositions = (
        ["custom-diffusion", "lora", "textual-inversion"],
        ["joint", "closed-form", "lora-sum"],
    )
    assert list(summary) == [
        "unedited",
        *singles,
        "conditioning-ceiling",
        *compositions,
        "t2i-zero",
        "a-star",
        "known-pairs",
        "relearn",
    ]
    for name in ("unedited", *singles):
        assert {"clip_i", "clip_i_rel", "clip_t", "clip_t_rel"} <= set(summary[name])
    for name in singles:  # the measured training time of one run, kept with the (cached) edit
        assert summary[name]["train_seconds"] > 0
    assert "train_seconds" not in summary["unedited"]
    assert set(summary["conditioning-ceiling"]) == {"clip_i", "clip_i_rel"}  # no prompt, so no CLIP-T
    ceiling = [im for im in results["images"] if im["method"] == "conditioning-ceiling"]
    assert [im["group"] for im in ceiling] == ["<mush>", "<key>"] and all(
        im["prompt"] is None for im in ceiling
    )
    for name in (*compositions, "t2i-zero", "a-star"):
        assert {"both_present", "clip_t", "clip_t_rel"} <= set(summary[name])
        assert 0.0 <= summary[name]["both_present"] <= 1.0
    assert "both_present" in summary["unedited"] and summary["unedited"]["clip_t_rel"] == pytest.approx(1.0)
    # one erasure given as a single method (no list), its steps the one checkpoint
    assert list(summary["relearn"]) == ["uce"]
    uce = summary["relearn"]["uce"]
    assert (
        list(uce) == ["concept", "unedited", "erased", "by_steps", "steps_to_50"]
        and uce["concept"] == "circle"
    )
    assert list(uce["by_steps"]) == ["2"]
    rows = results["rows"]
    assert {r["group"] for r in rows} == {
        "<mush>",
        "<key>",
        "<mush>+<key>",
        "circle+square",
        "relearn:circle",
    }
    known = [im["prompt"] for im in results["images"] if im["method"] == "known-pairs"]
    assert known == ["a picture of a circle next to a square", "a picture of a circle left of a square"]
    assert set(summary["known-pairs"]) == {"both_present", "both_present_by_prompt", "both_present_by_set"}
    for name in ("known-pairs", *compositions):  # one prompt in the set: its rate
        by_prompt = summary[name]["both_present_by_prompt"]
        assert summary[name]["both_present_by_set"] == {"next to": by_prompt["a picture of a {a} next to a {b}"]}
    assert all(
        {"both_present_top2", "both_present_halves"} <= set(r["metrics"])
        for r in rows
        if r["section"] == "composition"
    )
    assert len(results["images"]) == GENERATED and all(Path(im["path"]).is_file() for im in results["images"])
    hooked = [r["edit_key"] for r in rows if r["method"] in ("closed-form", "t2i-zero", "a-star")]
    assert len(set(hooked)) == 3  # the hooks change the edit (and so the generations' cache key)
    for kind in ("markdown", "html"):
        assert first_run.report[kind].is_file()
    assert "| closed-form |" in first_run.report["markdown"].read_text()
    assert "relearn_rate of 'circle'" in first_run.report["markdown"].read_text()
    assert (
        "| erasure | unedited | erased (0 steps) | +2 steps | steps to 50% |"
        in first_run.report["markdown"].read_text()
    )
    assert "<table>" in first_run.report["html"].read_text()
    assert "both_present by composition prompt" in first_run.report["markdown"].read_text()
    assert "set: next to" in first_run.report["markdown"].read_text()
    grids = [k for k in first_run.report if k.startswith("grid:")]
    assert len(grids) == 5 and all(first_run.report[k].is_file() for k in grids)


def test_rerun_hits_every_cache(first_run, tiny_config):
    again = run_bench(tiny_config, first_run.out_dir, progress=False, report=False)
    assert (again.trained, again.generated, again.cached) == (0, 0, GENERATED)
    assert again.results["summary"] == first_run.results["summary"]


def test_a_joint_run_over_several_training_seeds_is_averaged_and_reported_per_seed(
    first_run, tiny_config, tmp_path
):
    """training_seeds: one joint run per seed (seed 0 is the single-seed run, found in its cache), both_present
    averaged over them and listed per seed; a hook on top is measured on every seed's run."""
    data = yaml.safe_load(tiny_config.read_text())
    data["compositions"][0]["training_seeds"] = [0, 1]
    data["compositions"][3]["on_top_of"] = "joint"
    config = _write(tmp_path, data)
    again = run_bench(
        config,
        tmp_path / "seeds",
        methods=["joint", "t2i-zero"],
        cache_dir=first_run.out_dir / "cache",
        progress=False,
    )
    assert again.trained == 1  # seed 1 only: the seed-0 run is the cached single-seed edit
    joint = [r for r in again.results["rows"] if r["method"] == "joint"]
    assert [r["training_seed"] for r in joint] == [0, 1] and joint[0]["edit_key"] != joint[1]["edit_key"]
    single = next(r for r in first_run.results["rows"] if r["method"] == "joint")
    assert joint[0]["edit_key"] == single["edit_key"] and joint[0]["metrics"] == single["metrics"]
    summary = again.results["summary"]
    for name in ("joint", "t2i-zero"):
        rates = [r["metrics"]["both_present"] for r in again.results["rows"] if r["method"] == name]
        assert summary[name]["both_present_by_training_seed"] == dict(zip(("0", "1"), rates, strict=True))
        assert summary[name]["both_present"] == pytest.approx(sum(rates) / 2)
    hooked = [r["edit_key"] for r in again.results["rows"] if r["method"] == "t2i-zero"]
    assert len(set(hooked)) == 2 and not set(hooked) & {r["edit_key"] for r in joint}
    labels = {im["method"] for im in again.results["images"]}
    assert {"joint @ seed 0", "joint @ seed 1", "t2i-zero @ seed 1"} <= labels and "joint" not in labels
    report = again.report["markdown"].read_text()
    assert "both_present by training seed" in report and "(seed 1)" in report


def test_normalizations_match_a_hand_computation(first_run, evaluator_file):
    """clip_i_rel = mean cos(generated, references) / mean cos(references, independent references);
    clip_t_rel = mean cos(image, prompt without token) / the same for the unedited model's images of
    the prompt without the token. Recomputed here from the stored images with plain tensor code."""
    from conceptsmith.evaluation.evaluators import load_evaluator

    ev = load_evaluator(str(evaluator_file))
    results = first_run.results

    def embed(paths):
        return ev.embed_images([Image.open(p).convert("RGB") for p in paths]).double()

    def images(method):
        return [im for im in results["images"] if im["group"] == "<mush>" and im["method"] == method]

    refs = results["references"]["<mush>"]
    first, second = (embed(s) for s in refs["pair"])
    norm = float((first @ second.T).mean())
    generated = images("custom-diffusion")
    clip_i = float((embed([im["path"] for im in generated]) @ embed(refs["train"]).T).mean())
    base = images("unedited")
    assert [im["prompt"] for im in base] == ["a picture of a mushroom"]
    assert [im["prompt"] for im in generated] == ["a picture of a <mush> mushroom"]
    texts = ev.embed_texts(["a picture of a mushroom"]).double()
    clip_t = float((embed([im["path"] for im in generated]) * texts).sum(-1).mean())
    baseline = float((embed([im["path"] for im in base]) * texts).sum(-1).mean())

    row = next(r for r in results["rows"] if r["group"] == "<mush>" and r["method"] == "custom-diffusion")
    m = row["metrics"]
    assert m["clip_i"] == pytest.approx(clip_i, abs=1e-6) and m["clip_i_ref"] == pytest.approx(norm, abs=1e-6)
    assert m["clip_i_rel"] == pytest.approx(clip_i / norm, rel=1e-6)
    assert m["clip_t"] == pytest.approx(clip_t, abs=1e-6) and m["clip_t_rel"] == pytest.approx(
        clip_t / baseline, rel=1e-5
    )
    per_concept = [
        r["metrics"]["clip_i_rel"]
        for r in results["rows"]
        if r["section"] == "single" and r["method"] == "custom-diffusion"
    ]
    assert results["summary"]["custom-diffusion"]["clip_i_rel"] == pytest.approx(sum(per_concept) / 2)


def test_both_present_by_prompt_splits_the_images_prompt_major(first_run, evaluator_file):
    """Each composition row's per-prompt rates are the rule applied to that prompt's images alone
    (recomputed here from the stored files), and with equal seeds per prompt they average to the row's rate."""
    from conceptsmith.evaluation.evaluators import load_evaluator
    from conceptsmith.evaluation.metrics import both_concepts_present_rate

    ev, results = load_evaluator(str(evaluator_file)), first_run.results
    prompts, classes = TINY["composition_prompts"], TINY["classes"]
    for row in (r for r in results["rows"] if r["section"] == "composition"):
        mine = [
            im for im in results["images"] if im["group"] == row["group"] and im["method"] == row["method"]
        ]
        pair = ("circle", "square") if row["group"] == "circle+square" else ("mushroom", "key")
        by = row["metrics"]["both_present_by_prompt"]
        assert list(by) == prompts
        for i, template in enumerate(prompts):
            images = [Image.open(mine[i]["path"]).convert("RGB")]
            assert by[template] == both_concepts_present_rate(
                ev, images, pair, classes, ["a picture of a {}"]
            )
        assert row["metrics"]["both_present"] == pytest.approx(sum(by.values()) / len(by))


def test_relative_and_the_halves_presence_rule():
    assert relative(0.6, 0.8) == pytest.approx(0.75)
    assert math.isnan(relative(0.6, 0.0))

    class ByColor:
        """Stub evaluator: a crop is 'mushroom' if mostly red, 'key' if mostly blue, else 'circle'."""

        def classify(self, crops, classnames, templates):
            labels = []
            for crop in crops:
                r, _, b = np.asarray(crop, dtype=float).reshape(-1, 3).mean(0)
                labels.append("mushroom" if r > 150 else "key" if b > 150 else "circle")
            return type("C", (), {"labels": lambda self: labels})()

    def picture(left, right):
        a = np.zeros((64, 64, 3), np.uint8)
        a[:, :32], a[:, 32:] = left, right
        return Image.fromarray(a)

    red, blue, grey = (230, 0, 0), (0, 0, 230), (90, 90, 90)
    images = [picture(red, blue), picture(blue, red), picture(red, red), picture(grey, blue)]
    assert (
        both_present_halves(ByColor(), images, ("mushroom", "key"), ["mushroom", "key", "circle"], ["{}"])
        == 0.5
    )


def test_cli_dispatches_on_kind_and_filters_methods(first_run, tiny_config, tmp_path):
    from conceptsmith.cli import app

    cache = str(first_run.out_dir / "cache")
    out = tmp_path / "cli"
    args = [
        "bench",
        str(tiny_config),
        "--out",
        str(out),
        "--cache",
        cache,
        "--methods",
        "textual-inversion,closed-form",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trained 0 edits; generated 0 images" in result.output
    assert list(json.loads((out / "results.json").read_text())["summary"]) == [
        "unedited",
        "textual-inversion",
        "closed-form",
        "known-pairs",  # the ceiling row comes with any composition
    ]
    assert (out / "report.html").is_file()
    bad = CliRunner().invoke(app, ["bench", str(tiny_config), "--out", str(out), "--methods", "dreambooth"])
    assert bad.exit_code == 2 and "unknown methods ['dreambooth']" in bad.output


def test_prompt_sets_average_their_prompts_over_pairs_and_seeds():
    """both_present_by_set: per set, the mean of its prompts' rates, themselves averaged over every row (pair and
    training seed) of the composition; a set is what a bar is defined on (shapes-custom-multi: "next to")."""
    prompts = ["p {a} next to {b}", "q {a} next to {b}", "p {a} left of {b}"]

    def row(seed: int, rates: list[float]) -> dict:
        by = dict(zip(prompts, rates))
        metrics = {"both_present": sum(rates) / 3, "both_present_by_prompt": by}
        return {"section": "composition", "group": "a+b", "method": "joint", "metrics": metrics, "training_seed": seed}

    rows = [row(0, [1.0, 0.5, 0.0]), row(1, [0.0, 0.5, 1.0])]
    summary = summarize(rows, prompt_sets={"next to": prompts[:2], "left of": prompts[2:]})["joint"]
    assert summary["both_present_by_set"] == {"next to": pytest.approx(0.5), "left of": pytest.approx(0.5)}
    rows[1]["metrics"]["both_present_by_prompt"][prompts[0]] = 1.0
    summary = summarize(rows, prompt_sets={"next to": prompts[:2]})["joint"]
    assert summary["both_present_by_set"] == {"next to": pytest.approx(0.75)}
    assert "both_present_by_set" not in summarize(rows)["joint"]


# -- the relearning audit ----------------------------------------------------------------------------
ESD_FAST = {"steps": 2, "trajectories": 1, "ddim_steps": 2, "eval_batches": 0, "progress": False}
RELEARN = {
    **{k: TINY[k] for k in ("kind", "model", "seeds", "generation", "classes", "n_reference", "renderer")},
    "name": "tiny-relearn",
    "relearn": {
        **TINY["relearn"],
        "erase": [
            TINY["relearn"]["erase"],
            {"config": "configs/erase/rece.yaml", "params": {"epochs": 1}},
            {"config": "configs/erase/esd.yaml", "params": ESD_FAST},
        ],
        "checkpoints": [1, 2],
        "method": {
            "config": "configs/customize/custom-diffusion.yaml",
            "params": {k: v for k, v in CD_FAST.items() if k != "steps"},
        },
    },
}


@pytest.fixture(scope="module")
def audit(tmp_path_factory, evaluator_file):
    config = _write(tmp_path_factory.mktemp("relearn"), {**RELEARN, "evaluator": str(evaluator_file)})
    return config, run_bench(config, tmp_path_factory.mktemp("audit") / "out", progress=False)


def test_relearn_audit_gives_one_row_per_erasure(audit):
    """A relearning-only bench (no concepts): the unedited model once, then per erasure the erased model and the
    customization at each checkpoint; the summary and the report's relearning table have one row per erasure."""
    _, run = audit
    results = run.results
    assert run.trained == 3 + 3 * 2  # three erasures, two checkpoints of the customization on each
    assert [(r["method"], r["erase"], r["steps"]) for r in results["rows"]] == [
        ("unedited", None, None),
        *((f"{e} +{n} steps" if n else e, e, n) for e in ("uce", "rece", "esd") for n in (0, 1, 2)),
    ]
    summary = results["summary"]
    assert list(summary) == ["relearn"] and list(summary["relearn"]) == ["uce", "rece", "esd"]
    rates = {(r["erase"], r["steps"]): r["metrics"]["relearn_rate"] for r in results["rows"]}
    for name, entry in summary["relearn"].items():
        assert entry["unedited"] == rates[(None, None)] and entry["erased"] == rates[(name, 0)]
        assert entry["by_steps"] == {"1": rates[(name, 1)], "2": rates[(name, 2)]}
        points = [(0, entry["erased"]), (1, rates[(name, 1)]), (2, rates[(name, 2)])]
        assert entry["steps_to_50"] == steps_to_rate(points)
    table = run.report["markdown"].read_text()
    assert "| erasure | unedited | erased (0 steps) | +1 steps | +2 steps | steps to 50% |" in table
    assert all(
        sum(line.startswith(f"| {name} |") for line in table.splitlines()) == 1 for name in summary["relearn"]
    )
    assert run.report["html"].read_text().count("<tr><td>") == 3
    assert "| name |" not in table  # no method rows, so no main table


def test_relearn_checkpoints_continue_one_run_exactly(audit, first_run):
    """The 2-step edit resumed from the 1-step checkpoint is the plain 2-step run of the first bench (same erasure,
    token, references and params), tensor for tensor, under the same cache key; extending the checkpoints trains
    only the new count of each erasure (a count below the last checkpoint trains afresh)."""
    from safetensors.torch import load_file

    from conceptsmith.edits import Edit

    config, run = audit
    resumed = sorted((run.out_dir / "cache").glob("*/edits/custom-diffusion-*.safetensors"))
    plain = sorted((first_run.out_dir / "cache").glob("*/edits/custom-diffusion-*.safetensors"))
    shared = {p.name for p in resumed} & {p.name for p in plain}
    assert len(shared) == 1  # uce, 2 steps: the single-method bench's relearning edit
    name = shared.pop()
    a, b = (load_file(str(next(p for p in paths if p.name == name))) for paths in (resumed, plain))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((run.out_dir / "cache").glob("*/checkpoints/custom-diffusion-*"))) == 3

    def rerun(checkpoints: list[int], name: str):
        data = yaml.safe_load(config.read_text())
        data["relearn"]["checkpoints"] = checkpoints
        again = run_bench(
            _write(config.parent, data, f"{name}.yaml"),
            run.out_dir / name,
            cache_dir=run.out_dir / "cache",
            progress=False,
            report=False,
        )
        before = run.results["summary"]["relearn"]
        for erasure, entry in again.results["summary"]["relearn"].items():
            assert list(entry["by_steps"]) == [str(n) for n in checkpoints]
            assert {k: entry["by_steps"][k] for k in ("1", "2")} == before[erasure]["by_steps"]
        return again

    def resumed_from(steps: int) -> list[int | None]:
        edits = (Edit.load(p) for p in (run.out_dir / "cache").glob("*/edits/custom-diffusion-*.safetensors"))
        return [e.metadata["training"]["resumed_from"] for e in edits if e.params["steps"] == steps]

    assert rerun([1, 2, 4], "longer").trained == 3  # each erasure's 4 steps, continuing its 2-step checkpoint
    assert resumed_from(4) == [2, 2, 2]
    assert rerun([1, 2, 3, 4], "inserted").trained == 3  # 3 < the last checkpoint (4): trained afresh
    assert resumed_from(3) == [None, None, None]


def test_steps_to_rate_interpolates_between_checkpoints():
    assert steps_to_rate([(0, 0.0), (50, 0.2), (100, 0.6), (200, 0.9)]) == pytest.approx(87.5)
    assert steps_to_rate([(0, 0.0), (100, 0.5)]) == 100.0  # reached exactly at a checkpoint
    assert steps_to_rate([(0, 0.7), (50, 0.1)]) == 0.0  # the erased model already draws it
    assert steps_to_rate([(0, 0.0), (60, 0.75), (120, 0.25)]) == pytest.approx(40.0)  # the first crossing
    assert steps_to_rate([(0, 0.0), (50, 0.2), (100, 0.49)]) is None
    assert steps_to_rate([(0, 0.25), (400, 0.75)], level=0.5) == pytest.approx(200.0)


def test_relearn_summary_from_hand_made_rows():
    def row(name, erase, steps, rate):
        return {
            "section": "relearn",
            "group": "relearn:skull",
            "method": name,
            "metrics": {"relearn_rate": rate},
        } | {
            "erase": erase,
            "steps": steps,
        }

    rows = [row("unedited", None, None, 0.9), row("uce", "uce", 0, 0.0)]
    rows += [row(f"uce +{n} steps", "uce", n, r) for n, r in ((50, 0.25), (100, 0.75))]
    rows += [
        row("esd", "esd", 0, 0.125),
        row("esd +50 steps", "esd", 50, 0.25),
        row("esd +100 steps", "esd", 100, 0.375),
    ]
    relearn = summarize(rows, "skull")["relearn"]
    assert relearn["uce"] == {
        "concept": "skull",
        "unedited": 0.9,
        "erased": 0.0,
        "by_steps": {"50": 0.25, "100": 0.75},
        "steps_to_50": pytest.approx(75.0),
    }
    assert relearn["esd"]["steps_to_50"] is None and relearn["esd"]["erased"] == 0.125
    from conceptsmith.evaluation.custom_report import custom_table as summary_table

    table = summary_table({"summary": {"relearn": relearn}})
    assert table.splitlines()[0].split() == [
        "erasure",
        "unedited",
        "erased",
        "(0",
        "steps)",
        "+50",
        "steps",
        "+100",
        "steps",
        "steps",
        "to",
        "50%",
    ]
    assert table.splitlines()[1].split()[-1] == "75" and table.splitlines()[2].split()[-2:] == [">", "100"]


def test_a_bench_of_reference_folders_runs_without_any_world_provider(tmp_path, evaluator_file):
    """Folders of the user's images, a saved model and an open_clip checkpoint: no renderer, the generic presence
    rule; CLIP-I's normalizer is the folder's first half against its second."""
    from conftest import build_tiny_pipe

    model = tmp_path / "model"
    build_tiny_pipe().save_pretrained(model)
    concepts = []
    for i, name in enumerate(("mug", "lamp")):
        folder = tmp_path / name
        folder.mkdir()
        for j in range(4):
            Image.fromarray(np.full((16, 16, 3), (60 * i, 40 * j, 120), np.uint8)).save(folder / f"{j}.png")
        concepts.append({"token": f"<{name}>", "images": str(folder), "class_word": name})
    data = {**{k: TINY[k] for k in ("kind", "seeds", "generation", "prompts", "composition_prompts")},
            "name": "folders", "model": str(model), "evaluator": str(evaluator_file), "classes": ["mug", "lamp", "cat"],
            "concepts": concepts, "methods": [{"config": "configs/customize/lora.yaml", "params": FAST}],
            "compositions": [{"kind": "merge", "name": "sum", "merge": "lora-sum", "source": "lora"}]}  # fmt: skip
    run = run_bench(_write(tmp_path, data), tmp_path / "out", progress=False, report=False)
    rows = run.results["rows"]
    assert [(r["section"], r["group"], r["method"]) for r in rows] == [
        ("single", "<mug>", "unedited"), ("single", "<mug>", "lora"),
        ("single", "<lamp>", "unedited"), ("single", "<lamp>", "lora"),
        ("composition", "<mug>+<lamp>", "unedited"), ("composition", "<mug>+<lamp>", "sum"),
    ]  # fmt: skip
    refs = run.results["references"]["<mug>"]
    assert [len(half) for half in refs["pair"]] == [2, 2] and len(refs["train"]) == 4
    single = rows[1]["metrics"]
    assert single["clip_i_rel"] == pytest.approx(single["clip_i"] / single["clip_i_ref"])
    assert run.results["presence"] == "top2" and 0.0 <= rows[5]["metrics"]["both_present"] <= 1.0
