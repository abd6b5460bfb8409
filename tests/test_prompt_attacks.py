"""Attack plugins: the registry, UnlearnDiffAtk and P4D on a tiny pipeline, ASR counting, the bench."""

from __future__ import annotations

import json

import pytest
import torch
from test_attacks import _concept_images, _uce_like_edit

from conceptsmith.edits import applied_edits
from conceptsmith.evaluation.attack_plugins import AttackCondition, AttackPlan, score_attack
from conceptsmith.evaluation.attacks import reverted
from conceptsmith.evaluation.prompt_attacks import PromptVocabulary, p4d_attack, unlearn_diff_attack
from conceptsmith.registry import Attack, RegistryError, get_attack, list_attacks, register_attack

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a photo of a circle"


@pytest.fixture(scope="module")
def vocabulary():
    """The tiny text encoder's whole-word vocabulary (the K/V edits below leave the encoder alone)."""
    from conftest import build_tiny_pipe

    return PromptVocabulary.of(build_tiny_pipe())


@pytest.fixture
def edited(tiny_pipe):
    pipe, _ = tiny_pipe
    edit = _uce_like_edit(pipe, PROMPT, "circle", "a photo of a square", "square", [])
    edit.apply(pipe)
    return pipe, edit


def _n_tokens(pipe, text):
    return len(pipe.tokenizer(text)["input_ids"])


def _weights(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def test_registry_lists_the_five_attacks_with_strict_configs():
    assert {"embedding", "ring_a_bell", "textual_inversion", "unlearndiffatk", "p4d"} <= set(list_attacks())
    attack = get_attack("unlearndiffatk")({"steps": 3})
    assert attack.config.steps == 3 and attack.config.prefix_tokens == 5 and attack.name == "unlearndiffatk"
    with pytest.raises(ValueError, match="stesp"):
        get_attack("p4d")({"stesp": 3})
    with pytest.raises(RegistryError, match="Unknown attack 'nope'.*p4d"):
        get_attack("nope")
    with pytest.raises(TypeError, match="Attack subclasses"):
        register_attack("not-an-attack", "x")(dict)


def test_third_party_attack_is_discovered_through_entry_points(tmp_path, monkeypatch):
    from test_registry import _install_fake_distribution

    _install_fake_distribution(
        tmp_path,
        "cs_thirdparty_attack",
        "conceptsmith.attacks",
        "plain-prompt",
        """
        from conceptsmith.evaluation.attack_plugins import AttackCondition, AttackPlan
        from conceptsmith.registry import Attack, register_attack

        @register_attack("plain-prompt", description="third-party test attack")
        class PlainPrompt(Attack):
            def plan(self, ctx):
                return AttackPlan([AttackCondition(p, p, c) for p, c in ctx.prompts])
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert issubclass(get_attack("plain-prompt"), Attack)
    assert list_attacks()["plain-prompt"] == "third-party test attack"


def test_unlearn_diff_attack_lowers_its_loss_and_returns_a_discrete_prefix(edited, vocabulary):
    pipe, _ = edited
    before = _weights(pipe)
    result = unlearn_diff_attack(pipe, PROMPT, _concept_images(), prefix_tokens=3, steps=10, vocabulary=vocabulary)
    assert result.loss_after < result.loss_before and len(result.losses) == 10
    assert len(result.words) == 3 and result.prompt == " ".join([*result.words, PROMPT])
    assert _n_tokens(pipe, result.prompt) == 3 + _n_tokens(pipe, PROMPT)
    assert all(torch.equal(v, before[k]) for k, v in _weights(pipe).items())
    assert all(p.grad is None for p in pipe.unet.parameters())
    again = unlearn_diff_attack(pipe, PROMPT, _concept_images(), prefix_tokens=3, steps=10, vocabulary=vocabulary)
    assert again == result  # seeded


def test_p4d_lowers_its_loss_and_leaves_the_edit_applied(edited, vocabulary):
    pipe, edit = edited
    before = _weights(pipe)
    result = p4d_attack(pipe, edit, PROMPT, [0, 1], n_tokens=4, steps=10, vocabulary=vocabulary)
    assert result.loss_after < result.loss_before
    assert len(result.words) == 4 and _n_tokens(pipe, result.prompt) == 4 + 2
    assert applied_edits(pipe) == [edit]
    assert all(torch.equal(v, before[k]) for k, v in _weights(pipe).items())


def test_reverted_is_the_unedited_model_and_restores_the_edit_exactly(tiny_pipe):
    pipe, _ = tiny_pipe
    original = _weights(pipe)
    edit = _uce_like_edit(pipe, PROMPT, "circle", "a photo of a square", "square", [])
    edit.apply(pipe)
    applied = _weights(pipe)
    with reverted(pipe, edit):
        assert all(torch.equal(v, original[k]) for k, v in _weights(pipe).items())
    assert all(torch.equal(v, applied[k]) for k, v in _weights(pipe).items())
    assert applied_edits(pipe) == [edit]


def test_union_counting_by_hand():
    conditions = [AttackCondition("k1", "adv one", "skull", "p1"), AttackCondition("k2", "adv two", "skull", "p2")]
    seeds = [0, 1]
    predictions = ["skull", "circle", "circle", "circle"]  # (k1, 0) (k1, 1) (k2, 0) (k2, 1)
    plain = {("p1", 0): False, ("p1", 1): True, ("p2", 0): False, ("p2", 1): True}
    union = score_attack(AttackPlan(conditions, {"x": 1}, count="union"), predictions, seeds, plain)
    assert union == {"asr": 0.75, "n": 4, "info": {"x": 1, "asr_attack": 0.25, "asr_union": 0.75}}
    attack_only = score_attack(AttackPlan(conditions), predictions, seeds, plain)
    assert attack_only["asr"] == 0.25 and attack_only["info"]["asr_union"] == 0.75
    assert score_attack(AttackPlan(conditions), predictions, seeds) == {"asr": 0.25, "n": 4, "info": {}}
    with pytest.raises(ValueError, match="union"):
        score_attack(AttackPlan(conditions, count="union"), predictions, seeds)


def test_bench_runs_the_prompt_attacks_and_caches_them_by_content(tmp_path, evaluator_file):
    from conceptsmith.config import validate
    from conceptsmith.evaluation.engine import load_bench, run_bench
    from conceptsmith.evaluation.erasure_spec import ErasureBench

    cfg, _ = load_bench("shapes-smoke")
    data = cfg.model_dump() | {
        "attacks": [
            {"kind": "unlearndiffatk", "params": {"steps": 3, "prefix_tokens": 2}},
            {"kind": "p4d", "params": {"steps": 3, "n_tokens": 3, "trajectories": 1}},
            {"kind": "textual_inversion", "params": {"steps": 2, "eval_samples": 1}},
        ]
    }
    cfg = validate(data, ErasureBench, "test")
    kw = {"model": "builtin:tiny-test", "evaluator": str(evaluator_file), "progress": False, "report": False}
    run = run_bench(cfg, tmp_path / "out", **kw)
    attacks = run.results["rows"][1]["attacks"]
    for kind, n_words in (("unlearndiffatk", 2), ("p4d", 3)):
        result = attacks[kind]
        assert result["n"] == 2 and 0.0 <= result["info"]["asr_attack"] <= result["info"]["asr_union"] <= 1.0
        (found,) = result["info"]["prompts"]
        assert found["source"] == "a picture of a circle by Velmora Quistbright"
        assert found["loss_after"] <= found["loss_before"] and len(found["prompt"].split()) >= n_words
    assert attacks["unlearndiffatk"]["asr"] == attacks["unlearndiffatk"]["info"]["asr_union"]
    assert attacks["p4d"]["asr"] == attacks["p4d"]["info"]["asr_attack"]
    stored = sorted(p.name.split("-")[0] for p in (tmp_path / "out" / "cache").glob("*/attacks/*.json"))
    assert stored == ["p4d", "ti", "unlearndiffatk"]
    again = run_bench(cfg, tmp_path / "out", **kw)
    assert again.generated == 0
    assert json.dumps(again.results["rows"][1]["attacks"]) == json.dumps(attacks)
    # artifacts are keyed by what the attacks learn from (the reference images' bytes), not where the cache lies
    artifacts = sorted(p.name for p in (tmp_path / "out" / "cache").glob("*/attacks/*.json"))
    (tmp_path / "out" / "cache").rename(tmp_path / "moved")
    moved = run_bench(cfg, tmp_path / "out2", cache_dir=tmp_path / "moved", **kw)
    assert moved.generated == 0 and moved.trained == 0
    assert sorted(p.name for p in (tmp_path / "moved").glob("*/attacks/*.json")) == artifacts
    assert json.dumps(moved.results["rows"][1]["attacks"]) == json.dumps(attacks)
