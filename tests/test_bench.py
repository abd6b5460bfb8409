"""The benchmark runner on shapes-smoke with the tiny pipeline and a tiny open_clip evaluator:
results + report, a cache hit on re-run, and 2 processes (accelerate) giving the numbers of 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conceptsmith.evaluation.bench_spec import BENCH_DIR
from conceptsmith.evaluation.engine import bench_kind, load_bench, run_bench
from conceptsmith.evaluation.report import summary_table

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, evaluator_file):
    out = tmp_path_factory.mktemp("bench") / "one"
    run = run_bench(
        "shapes-smoke", out, model="builtin:tiny-test", evaluator=str(evaluator_file), progress=False
    )
    return run


def test_bench_configs_validate():
    names = {p.stem for p in BENCH_DIR.glob("*.yaml")}
    assert {"shapes-smoke", "shapes-objects", "shapes-artists", "shapes-restricted"} <= names
    for name in names:
        if bench_kind(name) == "customization":
            custom = load_bench(name)[0]
            assert custom.concepts or custom.relearn  # customization, or a relearning audit only
            continue
        cfg, _ = load_bench(name)
        assert cfg.tasks and cfg.seeds
    objects, _ = load_bench("shapes-objects")
    assert len(objects.tasks) >= 3 and all(t.synonyms for t in objects.tasks)
    restricted, _ = load_bench("shapes-restricted")
    assert restricted.tasks[0].indirect
    i2p, _ = load_bench("sd14-i2p")  # real-model protocols: CIFAR-10 objects, artists, I2P-style categories
    assert {"sd14-cifar10", "sd14-artists"} <= names and all(t.indirect for t in i2p.tasks)


def test_bench_config_errors(tmp_path):
    from conceptsmith.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: m\nevaluator: e\nseeds: [0]\ntasks: [{name: t, erase: [a]}]\nsteeps: 3\n")
    with pytest.raises(ConfigError, match="steeps"):
        load_bench(bad)
    bad.write_text(
        "name: x\nmodel: m\nevaluator: e\nseeds: [0]\nclasses: [b]\ntasks: [{name: t, erase: [a]}]\n"
    )
    with pytest.raises(ValueError, match="not in `classes`"):
        load_bench(bad)


def test_attack_kind_and_params_are_validated_when_the_config_is_loaded(tmp_path):
    """A typo in an attack's params or kind fails at load, before a model is loaded or an image made."""
    from conceptsmith.config import ConfigError

    head = "name: x\nmodel: builtin:shapes\nevaluator: e\nseeds: [0]\ntasks: [{name: t, erase: [a]}]\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text(head + "attacks: [{kind: p4d, params: {n_tokens: 4}}, {kind: unlearndiffatk, params: {stesp: 3}}]\n")
    with pytest.raises(ConfigError, match=r"attacks\.1.*attack 'unlearndiffatk' params: key 'stesp': unknown key") as err:
        load_bench(bad)
    assert "prefix_tokens" in str(err.value)  # the allowed keys are listed
    bad.write_text(head + "attacks: [{kind: p4d, params: {n_tokens: zero}}]\n")
    with pytest.raises(ConfigError, match="key 'n_tokens'"):
        load_bench(bad)
    bad.write_text(head + "attacks: [{kind: embeding}]\n")
    with pytest.raises(ConfigError, match="Unknown attack 'embeding'. Available: .*embedding"):
        load_bench(bad)
    with pytest.raises(ConfigError, match="embeding"):
        run_bench(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_runner_results_report_and_cache_hit(smoke_run, evaluator_file):
    results = smoke_run.results
    assert (
        smoke_run.generated == 22 and smoke_run.cached == 0
    )  # 5 prompts x 2 seeds x 2 rows + 2 attack images
    assert [r["method"] for r in results["rows"]] == ["unedited", "uce"]
    edited = results["rows"][1]
    for key in ("acc_e", "acc_g", "acc_s", "h_o", "h_c", "paired_specificity", "fd_clip", "clip_score"):
        assert key in edited["metrics"], key
    assert set(edited["metrics"]["acc_e"]) == {"argmax", "prob", "n"}
    assert edited["metrics"]["clip_score"]["scale"] == 100.0
    emb = edited["attacks"]["embedding"]
    assert 0.0 <= emb["asr"] <= 1.0 and emb["info"]["residual_after"] < emb["info"]["residual_before"]
    assert results["rows"][0]["metrics"]["paired_specificity"] == pytest.approx(1.0)
    summary = results["summary"]["uce"]
    assert summary["acc_e"] == edited["metrics"]["acc_e"]["argmax"] and summary["attack_asr"] == emb["asr"]
    assert results["summary"]["unedited"].get("acc_s_rel") in (None, 1.0) and results["summary_by_task"]["erase-quistbright"]
    assert len(results["images"]) == 20 and all(Path(im["path"]).is_file() for im in results["images"])
    out = smoke_run.out_dir
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    for kind in ("markdown", "html"):
        assert smoke_run.report[kind].is_file()
    assert "uce" in (out / "report.md").read_text() and "<table>" in (out / "report.html").read_text()
    assert any(k.startswith("grid:") for k in smoke_run.report) and any(
        k.startswith("plot:") for k in smoke_run.report
    )
    assert "uce" in summary_table(results)
    # a re-run only does what is new: here nothing
    again = run_bench(
        "shapes-smoke",
        out,
        model="builtin:tiny-test",
        evaluator=str(evaluator_file),
        progress=False,
        report=False,
    )
    assert again.generated == 0 and again.cached == 22
    assert [r["metrics"] for r in again.results["rows"]] == [r["metrics"] for r in results["rows"]]


def test_two_processes_through_the_cli_match_one(smoke_run, evaluator_file, tmp_path):
    """``accelerate launch -m conceptsmith bench``: two CPU processes (torchrun + gloo) share the generation
    and give the one-process run's numbers; the tiny model is passed as a saved pipeline directory."""
    from conftest import build_tiny_pipe

    model = tmp_path / "tiny-model"
    build_tiny_pipe().save_pretrained(model)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "conceptsmith", "bench", "shapes-smoke", "--out", str(out), "--model", str(model),
        "--evaluator", str(evaluator_file), "--device", "cpu", "--no-report",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results: ") == 1  # the main process prints, the other does not
    two = json.loads((out / "results.json").read_text())
    assert two["processes"] == 2 and two["model"]["fingerprint"] == smoke_run.results["model"]["fingerprint"]
    one = smoke_run.results
    assert [r["metrics"] for r in two["rows"]] == json.loads(json.dumps([r["metrics"] for r in one["rows"]]))
    assert [r["attacks"] for r in two["rows"]] == json.loads(json.dumps([r["attacks"] for r in one["rows"]]))
    strip = [{k: v for k, v in im.items() if k != "path"} for im in one["images"]]
    assert [{k: v for k, v in im.items() if k != "path"} for im in two["images"]] == json.loads(
        json.dumps(strip)
    )


def test_evaluate_saved_edit(smoke_run, evaluator_file, capsys):
    from conceptsmith.cli.bench import evaluate_command

    edit_files = sorted(smoke_run.out_dir.glob("cache/*/edits/*.safetensors"))
    assert len(edit_files) == 1
    results = evaluate_command(
        "shapes-smoke",
        model="builtin:tiny-test",
        edits=[str(edit_files[0])],
        out=str(smoke_run.out_dir.parent / "evaluate"),
        evaluator=str(evaluator_file),
        cache=str(smoke_run.out_dir / "cache"),
        as_json=True,
    )
    assert [r["method"] for r in results["rows"]] == ["unedited", edit_files[0].stem]
    uce = next(r for r in smoke_run.results["rows"] if r["method"] == "uce")
    assert results["rows"][1]["edit_key"] == uce["edit_key"]  # images are keyed by the edit's content
    assert results["rows"][1]["metrics"] == uce["metrics"]
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["rows"][1]["method"] == edit_files[0].stem


def test_summary_averages_tasks_and_relates_acc_s_to_the_unedited_model():
    from conceptsmith.evaluation.erasure_suite import summarize_rows

    def row(task, method, e, s, asr=None):
        metrics = {"acc_e": {"argmax": e, "prob": e / 2}, "acc_s": {"argmax": s, "prob": s / 2}, "paired_specificity": 0.5}
        return {"task": task, "method": method, "metrics": metrics, "attacks": {} if asr is None else {"embedding": {"asr": asr}}}

    rows = [row("a", "unedited", 1.0, 0.8), row("a", "uce", 0.0, 0.6, 0.5), row("b", "unedited", 0.9, 0.5), row("b", "uce", 0.2, 0.5, 0.1)]
    summary = summarize_rows(rows)
    assert summary["uce"]["acc_e"] == pytest.approx(0.1) and summary["uce"]["acc_s"] == pytest.approx(0.55)
    assert summary["uce"]["acc_s_rel"] == pytest.approx((0.6 / 0.8 + 0.5 / 0.5) / 2)  # per task, then averaged
    assert summary["uce"]["attack_asr"] == pytest.approx(0.3) and summary["uce"]["tasks"] == 2
    assert summary["unedited"]["acc_s_rel"] == pytest.approx(1.0) and "attack_asr" not in summary["unedited"]
    assert summarize_rows(rows, "prob")["uce"]["acc_e"] == pytest.approx(0.05)


def test_a_method_learns_from_the_unedited_models_images_one_folder_per_concept(tmp_path, evaluator_file):
    """``images: unedited``: te-unlearn erasing two concepts at once gets one folder of the unedited model's images
    per concept (seeds from 1000, apart from the evaluation's), and its fitting time is summarized."""
    smoke, _ = load_bench("shapes-smoke")
    task = smoke.tasks[0].model_copy(update={"erase": ["Velmora Quistbright", "Oskar Brindlewood"],
                                             "preserve": ["Zephyrine Mallowtusk"], "synonyms": {}})
    method = {"name": "te", "method": "te-unlearn", "images": "unedited", "n_images": 2,
              "params": {"steps": 1, "batch_size": 1, "progress": False}}
    config = smoke.model_copy(update={"tasks": [task], "attacks": [], "seeds": [0],
                                      "methods": [type(smoke.methods[0]).model_validate(method)]})
    run = run_bench(config, tmp_path / "out", model="builtin:tiny-test", evaluator=str(evaluator_file),
                    cache_dir=tmp_path / "cache", progress=False, report=False)
    folders = sorted((tmp_path / "cache").glob("*/references/*"))
    assert len(folders) == 2 and all(len(list(f.glob("*.png"))) == 2 for f in folders)
    assert run.results["summary"]["te"]["train_seconds"] > 0


def test_a_method_config_files_templates_are_checked_when_the_bench_loads(tmp_path):
    """A template in a method's own config file (not only in the bench YAML) is checked before any model loads."""
    from conceptsmith.config import ConfigError
    from conceptsmith.validate import InputError

    (tmp_path / "esd.yaml").write_text("method: esd\nparams: {steps: 1, templates: ['a picture of {0.__class__}']}\n")
    bench = tmp_path / "bench.yaml"
    bench.write_text("name: x\nmodel: builtin:shapes\nevaluator: e\nseeds: [0]\ntasks: [{name: t, erase: [a]}]\n"
                     "methods: [{config: esd.yaml}]\n")  # fmt: skip
    with pytest.raises((ConfigError, InputError), match=r"method 'esd': params: key 'templates': template 'a picture of {0.__class__}'"):
        load_bench(bench)
