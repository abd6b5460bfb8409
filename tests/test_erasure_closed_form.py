"""Closed-form erasure editors (uce, rece, realera, mace-cfr) on the tiny random pipeline.

Joint vs sequential edits (documented by ``test_joint_edit_meets_every_target_sequential_drifts``):
erasing A and B in one solve meets both targets up to the recorded residuals. Erasing A, applying
it, then erasing B on the edited pipe anchors the second solve at the edited weights and does not
know about A, so A's edit drifts unless A is also preserved; the joint solve is the one to use for
many concepts, and the only one whose residuals describe the final model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conceptsmith.attention import kv_projections
from conceptsmith.edits import EditError, compose
from conceptsmith.erasure._closed_form import kv_weights
from conceptsmith.erasure.mace_cfr import MaceCFR, load_or_build_prior, match_surrounding
from conceptsmith.erasure.realera import RealEra, RealEraConfig, sample_band
from conceptsmith.erasure.rece import RECE
from conceptsmith.erasure.uce import UCE
from conceptsmith.linalg import regenerating_embeddings
from conceptsmith.models import fingerprint
from conceptsmith.registry import EditRequest, get_editor, list_editors
from conceptsmith.text import encode_prompts
from conceptsmith.token_positions import concept_token_embeddings

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "erase"
METHODS = ("uce", "rece", "realera", "mace-cfr")
FAST = {"mace-cfr": {"n_prompts": 4, "corpus_size": 16}, "rece": {"epochs": 1}}


@pytest.fixture(scope="module")
def pipe():
    """One tiny pipeline for the module: editors never mutate it, and every apply here is reverted
    (each test checks the fingerprint it ends with)."""
    from conceptsmith.models import load_pipeline

    pipe, _ = load_pipeline("builtin:tiny-test")
    start = fingerprint(pipe)
    yield pipe
    assert fingerprint(pipe) == start


def _fast(name, tmp_path, **extra):
    config = dict(FAST.get(name, {}), **extra)
    if name == "mace-cfr":
        config.setdefault("cache_dir", str(tmp_path))
    return config


def _word(pipe, text):
    """UCE's row of ``text``: its last token (BOS for the empty prompt)."""
    if not text:
        return encode_prompts(pipe, [""], max_length=1)[0, :1]
    return concept_token_embeddings(pipe, [text], [text], "last_word")


def _outputs(pipe, rows):
    return {f"unet.{n}": rows @ linear.weight.detach().T for n, linear in kv_projections(pipe.unet).items()}


def test_uce_maps_concept_outputs_to_the_guide_and_keeps_preserved_ones(pipe):
    before = fingerprint(pipe)
    weights_before = {n: w.clone() for n, w in kv_weights(pipe).items()}
    edit = UCE().fit(pipe, EditRequest(concepts=["red circle"], guide="blue star", preserve=["green square", "dog"]))
    # the pipe is untouched
    assert fingerprint(pipe) == before
    assert all(torch.equal(w, weights_before[n]) for n, w in kv_weights(pipe).items())

    concept, guide = _word(pipe, "red circle"), _word(pipe, "blue star")
    preserved = concept_token_embeddings(pipe, ["green square", "dog"], ["green square", "dog"], "last_word")
    old_c, old_g, old_p = _outputs(pipe, concept), _outputs(pipe, guide), _outputs(pipe, preserved)
    info = edit.metadata["closed_form"]
    edit.apply(pipe)
    new_c, new_p = _outputs(pipe, concept), _outputs(pipe, preserved)
    edit.revert(pipe)
    assert fingerprint(pipe) == before
    for name in old_c:
        requested = torch.linalg.norm(old_g[name] - old_c[name])
        missed = torch.linalg.norm(new_c[name] - old_g[name])
        assert float(missed / requested) == pytest.approx(info["edit_residual"][name], rel=1e-3, abs=1e-5)
        assert info["edit_residual"][name] < 0.2  # the concept now reads (almost) as the guide
        drift = torch.linalg.norm(new_p[name] - old_p[name]) / torch.linalg.norm(old_p[name])
        assert float(drift) <= info["preserve_residual"][name] + 1e-5
    assert info["condition_number"] > 1 and info["rank"] == 1
    assert edit.params["guide"] == "blue star" and edit.params["token_policy"] == "last_word"


def test_uce_with_small_lam_matches_the_guide_outputs(pipe):
    edit = UCE({"lam": 1e-4}).fit(pipe, EditRequest(concepts=["red circle"], guide="blue star"))
    concept, guide = _word(pipe, "red circle"), _word(pipe, "blue star")
    target = _outputs(pipe, guide)
    edit.apply(pipe)
    outputs = _outputs(pipe, concept)
    edit.revert(pipe)
    for name, out in outputs.items():
        torch.testing.assert_close(out, target[name], rtol=1e-3, atol=1e-3)


def test_empty_guide_is_moderation_towards_bos(pipe):
    edit = UCE({"lam": 1e-4}).fit(pipe, EditRequest(concepts=["skull"]))
    assert edit.params["guide"] == ""
    bos = _outputs(pipe, _word(pipe, ""))
    edit.apply(pipe)
    outputs = _outputs(pipe, _word(pipe, "skull"))
    edit.revert(pipe)
    for name, out in outputs.items():
        torch.testing.assert_close(out, bos[name], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("policy, rows", [("last_word", 2), ("phrase", 4), ("phrase+eos", 6)])
def test_token_policies_edit_the_expected_rows(pipe, policy, rows):
    edit = UCE({"token_policy": policy}).fit(pipe, EditRequest(concepts=["red circle", "blue star"]))
    assert edit.metadata["closed_form"]["rank"] == rows
    ups = [t for k, t in edit.tensors.items() if k.endswith(".up")]
    assert ups and all(t.shape[1] == rows for t in ups)


def test_all_token_policy_and_prompt_expansion(pipe):
    edit = UCE({"token_policy": "all"}).fit(pipe, EditRequest(concepts=["red circle"], preserve=["dog"]))
    info = edit.metadata["closed_form"]
    assert info["rank"] == 77 - 2  # last word at position 2 of "red circle"; the empty guide starts at BOS
    assert info["n_preserve_vectors"] == 2 * 77  # "dog" and "" in full
    expanded = UCE({"expand_prompts": True, "concept_type": "art"}).fit(pipe, EditRequest(concepts=["velmora"]))
    assert expanded.params["guide"] == "art"
    assert expanded.metadata["closed_form"]["rank"] == 6


def test_expand_preserve_keeps_preserved_concepts_inside_the_expansion_templates(pipe):
    """With expand_prompts the template words are edited too; expand_preserve keeps the preserved
    concepts' outputs inside those templates (here: 'dog' within 'photo of dog')."""
    request = EditRequest(concepts=["red circle"], preserve=["dog", "green square"])
    plain = UCE({"expand_prompts": True}).fit(pipe, request)
    kept = UCE({"expand_prompts": True, "expand_preserve": True}).fit(pipe, request)
    assert plain.metadata["closed_form"]["n_preserve_vectors"] == 2
    assert kept.metadata["closed_form"]["n_preserve_vectors"] == 2 * 6  # each alone and in 5 templates
    states = concept_token_embeddings(pipe, ["photo of dog", "painting of green square"], ["dog", "green square"], "last_word")
    before = _outputs(pipe, states)

    def drift(edit):
        edit.apply(pipe)
        after = _outputs(pipe, states)
        edit.revert(pipe)
        return sum(float(torch.linalg.norm(after[n] - before[n]) / torch.linalg.norm(before[n])) for n in before)

    assert drift(kept) < 0.5 * drift(plain)


def test_weights_edit_is_low_rank_and_exports_exactly_to_lora(pipe, tmp_path):
    edit = UCE().fit(pipe, EditRequest(concepts=["red circle", "blue star", "dog"]))
    errors = edit.to_lora(tmp_path / "uce_lora.safetensors")
    assert max(errors.values()) == 0.0
    lora = load_file(str(tmp_path / "uce_lora.safetensors"))
    for key, down in lora.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            up = lora[f"{module}.lora_B.weight"]
            assert down.shape[0] == 3
            expected = edit.tensors[f"{module}.up"] @ edit.tensors[f"{module}.down"]
            torch.testing.assert_close(up @ down, expected)


def test_joint_edit_meets_every_target_sequential_drifts(pipe):
    joint = UCE({"lam": 1e-3}).fit(pipe, EditRequest(concepts=["red circle", "blue star"]))
    first = UCE({"lam": 1e-3}).fit(pipe, EditRequest(concepts=["red circle"]))
    first.apply(pipe)
    second = UCE({"lam": 1e-3}).fit(pipe, EditRequest(concepts=["blue star"]))
    first.revert(pipe)
    sequential = compose([first, second])
    bos = _outputs(pipe, _word(pipe, ""))
    a = _word(pipe, "red circle")

    def miss(edit):
        edit.apply(pipe)
        out = _outputs(pipe, a)
        edit.revert(pipe)
        return max(float(torch.linalg.norm(out[n] - bos[n]) / torch.linalg.norm(bos[n])) for n in out)

    assert miss(joint) < 0.05
    assert miss(sequential) > miss(joint)


def test_bad_requests_say_what_to_do(pipe):
    uce = UCE()
    with pytest.raises(EditError, match="No concept to erase"):
        uce.fit(pipe, EditRequest(concepts=[]))
    with pytest.raises(EditError, match=r"Concept #2 is empty.*--concept"):
        uce.fit(pipe, EditRequest(concepts=["dog", "  "]))
    with pytest.raises(EditError, match=r"guide 'Dog' is the concept being erased.*Pick another guide"):
        uce.fit(pipe, EditRequest(concepts=["dog"], guide="Dog"))
    with pytest.raises(EditError, match=r"tokenizes to nothing.*ordinary words"):
        uce.fit(pipe, EditRequest(concepts=["<|endoftext|>"]))
    with pytest.raises(EditError, match="both erased and preserved"):
        uce.fit(pipe, EditRequest(concepts=["dog"], preserve=["dog"]))
    words = ["dog", "cat", "tree", "house", "car", "boat", "bird", "fish", "apple", "chair", "table", "lamp", "clock",
             "book", "shoe", "hat", "cup", "bottle", "phone", "bike", "train", "plane", "horse", "cow", "sheep", "lion",
             "tiger", "bear", "zebra", "rose", "moon", "sun", "star", "river", "hill"]
    with pytest.raises(EditError, match=r"edit vectors >= d_in = 32.*lam > 0.*preserve"):
        UCE({"lam": 0.0}).fit(pipe, EditRequest(concepts=words))
    with pytest.raises(ValueError, match="unknown key|Extra inputs"):
        UCE({"lamb": 0.5})


def test_rece_erases_what_the_regenerating_embedding_recovers(pipe):
    request = EditRequest(concepts=["red circle"], preserve=["green square"])
    uce = UCE().fit(pipe, request)
    scores = []
    before = fingerprint(pipe)

    def score(p, edit, epoch):
        edit.apply(p)
        edit.revert(p)
        scores.append(epoch)
        return -abs(epoch - 1)  # prefer epoch 1

    rece = RECE({"epochs": 2}, score_fn=score).fit(pipe, request)
    assert fingerprint(pipe) == before and scores == [1, 2]
    assert rece.metadata["selection"]["epoch_returned"] == 1
    assert [s["stage"] for s in rece.metadata["stages"]] == ["uce", "epoch 1"]

    # the attack: how well does the regenerated embedding still reproduce the concept's original outputs?
    weights = kv_weights(pipe)
    concept = encode_prompts(pipe, ["red circle"])[0]

    def recovered(edit):
        deltas = {}
        for key, t in edit.tensors.items():
            module, _, part = key.rpartition(".")
            deltas.setdefault(module, {})[part] = t.double()
        deltas = {m: (d["up"], d["down"]) if "up" in d else d["delta"] for m, d in deltas.items()}
        regen = regenerating_embeddings(weights, deltas, concept, 0.1)
        err = num = 0.0
        for name, w in weights.items():
            d = deltas[name]
            w_new = w.double() + (d[0] @ d[1] if isinstance(d, tuple) else d)
            err += float((regen @ w_new.T - concept.double() @ w.double().T).square().sum())
            num += float((concept.double() @ w.double().T).square().sum())
        return err / num

    assert recovered(rece) > 2 * recovered(uce)


def test_rece_steps_keep_the_concept_itself_erased(pipe):
    """The published RECE step only constrains c' and the preserved tokens; keep_erased also holds the concept's
    own rows at the guide, so erasing c' cannot pull the concept back."""
    request = EditRequest(concepts=["red circle"], guide="blue star", preserve=["green square"])
    concept, guide = _word(pipe, "red circle"), _word(pipe, "blue star")
    old_c, target = _outputs(pipe, concept), _outputs(pipe, guide)

    def residual(edit):
        edit.apply(pipe)
        new_c = _outputs(pipe, concept)
        edit.revert(pipe)
        return max(float(torch.linalg.norm(new_c[n] - target[n]) / torch.linalg.norm(old_c[n] - target[n])) for n in new_c)

    settings = {"epochs": 2, "regen_tokens": "edited", "lam_reg": 1e-3}
    kept = residual(RECE({**settings, "keep_erased": True}).fit(pipe, request))
    published = residual(RECE({**settings, "keep_erased": False}).fit(pipe, request))
    assert kept < 0.1 and kept < 0.5 * published, (kept, published)


def test_realera_samples_in_band_and_erases_neighbors(pipe):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 32, dtype=torch.float64) * 5
    samples = sample_band(rows, 50, 0.875, 0.97, g).reshape(3, 50, 32)
    cos = torch.nn.functional.cosine_similarity(samples, rows[:, None], dim=2)
    assert cos.min() >= 0.875 - 1e-9 and cos.max() <= 0.97 + 1e-9
    assert torch.allclose(samples.norm(dim=2), rows.norm(dim=1, keepdim=True).expand(3, 50))
    assert ((samples - rows[:, None]).norm(dim=2) <= 0.5 * rows.norm(dim=1, keepdim=True) + 1e-9).all()
    with pytest.raises(ValueError, match="above s2"):
        RealEraConfig(d1=0.1, s2=0.9)

    request = EditRequest(concepts=["red circle"], seed=3)
    realera = RealEra().fit(pipe, request)
    uce = UCE().fit(pipe, request)
    assert realera.metadata["closed_form"]["rank"] == 1 + 8
    assert realera.metadata["mining"]["beyond"] == 8
    # a fresh neighbor of the concept token (not one of the mined ones) reads closer to the guide after RealEra
    concept = _word(pipe, "red circle").double()
    fresh = sample_band(concept, 32, 0.9, 0.95, torch.Generator().manual_seed(99)).float()
    bos = _outputs(pipe, _word(pipe, ""))

    def distance(edit):
        edit.apply(pipe)
        out = _outputs(pipe, fresh)
        edit.revert(pipe)
        return sum(float(torch.linalg.norm(out[n] - bos[n])) for n in out)

    assert distance(realera) < distance(uce)
    # token policy 'all': neighbours and beyond-concept samples around every edited row (concept word through padding)
    everything = RealEra({"token_policy": "all", "n_neighbors": 2, "n_beyond": 1}).fit(pipe, request)
    edited = 77 - 2  # "red circle": last word at position 2, paired with the empty guide from its BOS
    assert everything.metadata["mining"] == {**everything.metadata["mining"], "edited_tokens": edited,
                                            "neighbors": 2 * edited, "beyond": edited}


def test_match_surrounding_aligns_prefix_suffix_and_padding():
    old = [0, 5, 6, 7, 8, 9]  # BOS a photo of <red circle> EOS  (7, 8 = concept)
    new = [0, 5, 6, 9]  # BOS a photo of EOS
    o, n = match_surrounding(old[:3] + old[3:], new, 10)
    assert o == [0, 1, 2, 5, 6, 7, 8, 9]
    assert n == [0, 1, 2, 3, 4, 5, 6, 7]


def test_mace_cfr_prior_cache_and_surrounding_tokens(pipe, tmp_path):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("a red circle on grass\n\na blue star at night\na green square\n", encoding="utf-8")
    config = {"n_prompts": 4, "corpus_file": str(corpus), "cache_dir": str(tmp_path / "cache"), "prior_weight": 10.0}
    request = EditRequest(concepts=["skull"], preserve=["dog"])
    edit = MaceCFR(config).fit(pipe, request)
    prior = edit.metadata["prior"]
    assert prior["captions"] == 3 and prior["tokens"] == 3 * 77 and not prior["from_cache"]
    assert edit.metadata["refinement"]["prompts"] == 4
    cache = tmp_path / "cache"
    files = list((cache / "priors").glob("mace-prior-*.safetensors"))
    assert len(files) == 1 and fingerprint(pipe) in files[0].name
    again = MaceCFR(config).fit(pipe, request)
    assert again.metadata["prior"]["from_cache"]
    for key, tensor in edit.tensors.items():
        torch.testing.assert_close(again.tensors[key], tensor)
    stored = load_or_build_prior(pipe, ["a red circle on grass", "a blue star at night", "a green square"], str(cache))
    states = encode_prompts(pipe, ["a red circle on grass", "a blue star at night", "a green square"]).double().reshape(-1, 32)
    torch.testing.assert_close(stored.gram, states.T @ states)
    # surrounding tokens of a templated prompt now read (closer to) the mapping prompt's
    old = encode_prompts(pipe, ["a photo of skull"])[0, -10:]
    new = encode_prompts(pipe, ["a photo of"])[0, -10:]
    base = _outputs(pipe, old)
    target = _outputs(pipe, new)
    edit.apply(pipe)
    after = _outputs(pipe, old)
    edit.revert(pipe)
    assert sum(float(torch.linalg.norm(after[n] - target[n])) for n in after) < sum(
        float(torch.linalg.norm(base[n] - target[n])) for n in base
    )
    with pytest.raises(EditError, match="one caption per line"):
        MaceCFR({"corpus_file": str(tmp_path / "missing.txt")}).fit(pipe, request)


def test_mace_cfr_prior_leaves_out_captions_that_name_the_concept(pipe, tmp_path):
    """A prior built over captions of the concept would preserve what is being erased: those captions are
    subtracted, so the edit equals the one computed with a corpus that never had them."""
    full, clean = tmp_path / "full.txt", tmp_path / "clean.txt"
    full.write_text("a blue star at night\na Red  Circle on grass\na green square\n", encoding="utf-8")
    clean.write_text("a blue star at night\na green square\n", encoding="utf-8")
    config = {"n_prompts": 4, "cache_dir": str(tmp_path / "cache"), "prior_weight": 10.0}
    request = EditRequest(concepts=["red circle"])
    left_out = MaceCFR({**config, "corpus_file": str(full)}).fit(pipe, request)
    never_there = MaceCFR({**config, "corpus_file": str(clean)}).fit(pipe, request)
    kept = MaceCFR({**config, "corpus_file": str(full), "exclude_concept_captions": False}).fit(pipe, request)
    assert left_out.metadata["prior"]["excluded_captions"] == 1 and kept.metadata["prior"]["excluded_captions"] == 0
    for key, tensor in never_there.tensors.items():
        torch.testing.assert_close(left_out.tensors[key], tensor, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(kept.tensors[k], t, rtol=1e-4, atol=1e-6) for k, t in never_there.tensors.items())


@pytest.mark.parametrize("name", METHODS)
def test_every_editor_returns_a_weights_edit_that_saves_and_loads(pipe, tmp_path, name):
    before = fingerprint(pipe)
    edit = get_editor(name)(_fast(name, tmp_path)).fit(pipe, EditRequest(concepts=["red circle"], preserve=["dog"]))
    assert fingerprint(pipe) == before
    assert edit.kind == "weights" and edit.method == name and edit.concepts == ["red circle"]
    assert all(m.startswith("unet.") and m.endswith((".to_k", ".to_v")) for m in edit.module_shapes)
    json.dumps(edit.metadata)
    path = edit.save(tmp_path / f"{name}.safetensors")
    from conceptsmith.edits import Edit

    loaded = Edit.load(path)
    loaded.apply(pipe)
    loaded.revert(pipe)
    assert fingerprint(pipe) == before


def test_configs_mirror_config_defaults():
    assert set(METHODS) <= set(list_editors())
    for name in METHODS:
        data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text(encoding="utf-8"))
        editor = get_editor(name)
        assert data["method"] == name
        assert editor.Config.model_validate(data["params"]).model_dump() == editor.Config().model_dump()


def test_library_uce_equals_the_research_style_reference(pipe):
    """bench/closed_form.py's reference (per-layer loops, 77-token prompts, torch.inverse) agrees with the library."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_closed_form", Path(__file__).resolve().parents[1] / "bench" / "closed_form.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    concepts, preserve = ["red circle", "velmora quist"], ["dog", "blue star", "green square"]
    with torch.no_grad():
        reference, _ = bench.reference_uce(pipe, concepts, "art", preserve)
    edit = UCE({"concept_type": "art"}).fit(pipe, EditRequest(concepts=concepts, preserve=preserve))
    edit.apply(pipe)
    try:
        for name, expected in reference.items():
            actual = pipe.unet.get_submodule(name.removeprefix("unet.")).weight.detach()
            assert float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected)) < 1e-5
    finally:
        edit.revert(pipe)


def test_large_preserve_lists_are_encoded_once_and_cached(pipe, tmp_path):
    from conceptsmith.erasure._closed_form import PRESERVE_CACHE_MIN

    preserve = [f"{color} {shape}" for color in ("red", "green", "blue", "pink", "gray", "gold")
                for shape in ("square", "star", "heart", "cross", "arrow", "moon")][:PRESERVE_CACHE_MIN]
    request = EditRequest(concepts=["skull"], preserve=preserve)
    first = UCE({"cache_dir": str(tmp_path)}).fit(pipe, request)
    files = list((tmp_path / "encodings").glob("preserve-*.safetensors"))
    assert len(files) == 1
    files[0].touch()
    stamp = files[0].stat().st_mtime_ns
    second = UCE({"cache_dir": str(tmp_path)}).fit(pipe, request)
    assert files[0].stat().st_mtime_ns == stamp  # read, not rewritten
    uncached = UCE({"cache_preserve": False}).fit(pipe, request)
    for key, tensor in first.tensors.items():
        torch.testing.assert_close(second.tensors[key], tensor)
        torch.testing.assert_close(uncached.tensors[key], tensor)
