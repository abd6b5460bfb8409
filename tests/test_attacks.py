"""Attacks on edited tiny pipelines: closed-form embedding attack, concept vector, textual inversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conceptsmith.attention import find_cross_attention
from conceptsmith.edits import Edit, base_fingerprint
from conceptsmith.evaluation.attacks import (
    KVPair,
    attack_success_rate,
    closed_form_attack_embeddings,
    concept_vector,
    embedding_attack,
    generate_from_embeds,
    greedy_prompt_search,
    kv_pairs_from_edit,
    kv_pairs_from_models,
    ring_a_bell,
    textual_inversion_attack,
)
from conceptsmith.evaluation.clip import Classification
from conceptsmith.text import encode_prompts
from conceptsmith.token_positions import concept_token_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")


def test_closed_form_attack_inverts_shared_low_rank_edit():
    """W'_l = W_l A with A = I + u v^T shared by all layers: c' = A^-1 c_e exactly."""
    g = torch.Generator().manual_seed(0)
    d = 8
    u, v = (
        torch.randn(d, 1, generator=g, dtype=torch.float64),
        torch.randn(d, 1, generator=g, dtype=torch.float64),
    )
    a = torch.eye(d, dtype=torch.float64) + u @ v.T
    pairs = []
    for i, rows in enumerate((12, 16, 12)):
        w = torch.randn(rows, d, generator=g, dtype=torch.float64)
        pairs.append(KVPair(f"l{i}", w, (w @ u, v.T)))  # W' = W + (W u) v^T = W A
    c_e = torch.randn(5, d, generator=g, dtype=torch.float64)
    attack, info = closed_form_attack_embeddings(c_e, pairs, lam=1e-10)
    torch.testing.assert_close(attack, torch.linalg.solve(a, c_e.T).T, atol=1e-7, rtol=1e-7)
    assert info["residual_before"] > 1e-2 and info["residual_after"] < 1e-12
    for p in pairs:  # the edited projections reproduce the original outputs
        torch.testing.assert_close(attack @ p.edited.T, c_e @ p.original.T, atol=1e-7, rtol=1e-7)
    # batch dimensions are kept; ridge shrinks with lam
    attack3, info3 = closed_form_attack_embeddings(c_e.view(1, 5, d), pairs, lam=1.0)
    assert attack3.shape == (1, 5, d) and info3["residual_after"] > info["residual_after"]


def _uce_like_edit(pipe, concept_prompt, concept, guide_prompt, guide, preserve, lam=0.5):
    """A UCE-style closed-form erasure built by hand: W' = W (lam I + c_g c^T + P)(lam I + c c^T + P)^-1,
    stored as the exact rank-1 update up = W (c_g - c), down = (M^-1 c)^T."""
    c = concept_token_embeddings(pipe, [concept_prompt], concept, "last_word").double()  # [1, d]
    c_g = concept_token_embeddings(pipe, [guide_prompt], guide, "last_word").double()
    p = concept_token_embeddings(pipe, preserve, preserve, "last_word").double() if preserve else c[:0]
    d = c.shape[1]
    m = lam * torch.eye(d, dtype=torch.float64) + c.T @ c + p.T @ p
    down = torch.linalg.solve(m, c.T).T  # [1, d]
    deltas = {}
    for layer in find_cross_attention(pipe.unet):
        for proj in ("to_k", "to_v"):
            w = getattr(layer, proj).weight.detach().double()
            deltas[f"unet.{layer.name}.{proj}"] = ((w @ (c_g - c).T).float(), down.float())
    return Edit.from_weight_deltas("uce-test", [concept], {"lam": lam}, base_fingerprint(pipe), "sd1", deltas)


def _kv(pipe, emb):
    return {
        f"{layer.name}.{proj}": getattr(layer, proj)(emb).detach()
        for layer in find_cross_attention(pipe.unet)
        for proj in ("to_k", "to_v")
    }


def test_embedding_attack_recovers_original_keys_values(tiny_pipe):
    pipe, _ = tiny_pipe
    prompt = "a photo of a circle"
    edit = _uce_like_edit(pipe, prompt, "circle", "a photo of a square", "square", ["a photo of a star"])
    c_e = encode_prompts(pipe, [prompt])
    original_kv = _kv(pipe, c_e)

    unapplied = embedding_attack(pipe, edit, [prompt], lam=1e-6)
    edit.apply(pipe)
    try:
        attack = embedding_attack(pipe, edit, [prompt], lam=1e-6)
        edited_kv = _kv(pipe, c_e)  # the erased model on the concept prompt: K/V changed
        attacked_kv = _kv(pipe, attack.prompt_embeds)  # the erased model on the attack embedding
        num_before = sum((edited_kv[k] - original_kv[k]).square().sum() for k in original_kv)
        num_after = sum((attacked_kv[k] - original_kv[k]).square().sum() for k in original_kv)
        den = sum(v.square().sum() for v in original_kv.values())
        assert float(num_before / den) > 1e-3
        assert float(num_after / den) < 1e-6 * float(num_before / den) + 1e-9
        assert attack.info["residual_after"] < 1e-8 and attack.info["modules"] == 14
        torch.testing.assert_close(attack.prompt_embeds, unapplied.prompt_embeds, atol=1e-4, rtol=1e-4)
        assert attack.prompt_embeds.shape == (1, 77, 32)
        # an edited checkpoint "from elsewhere": compare against the original pipe's weights
        pairs_models = kv_pairs_from_models(_original(pipe, edit), pipe)
        pairs_edit = kv_pairs_from_edit(pipe, edit)
        assert [p.name for p in pairs_models] == [p.name for p in pairs_edit]
        torch.testing.assert_close(pairs_models[0].original, pairs_edit[0].original)
        # the attack conditioning drives the pipeline
        images = generate_from_embeds(pipe, attack.prompt_embeds, [0], settings=_fast())
        assert len(images) == 1 and isinstance(images[0][2], Image.Image)
    finally:
        edit.revert(pipe)


def test_embedding_attack_on_lora_edit_matches_weights_edit(tiny_pipe):
    """The same rank-1 change as a peft LoRA (base weights stay original while applied)."""
    pipe, _ = tiny_pipe
    prompt = "a photo of a circle"
    w_edit = _uce_like_edit(pipe, prompt, "circle", "a photo of a square", "square", [])
    lora = {}
    for key, value in w_edit.tensors.items():
        module, _, part = key.rpartition(".")
        lora[f"{module}.lora_B.weight" if part == "up" else f"{module}.lora_A.weight"] = value
    l_edit = Edit.from_lora("uce-lora", ["circle"], {}, w_edit.base_fingerprint, "sd1", lora)
    reference = embedding_attack(pipe, w_edit, [prompt], lam=1e-6)
    l_edit.apply(pipe)
    try:
        attack = embedding_attack(pipe, l_edit, [prompt], lam=1e-6)
    finally:
        l_edit.revert(pipe)
    assert attack.info["residual_after"] < 1e-8
    torch.testing.assert_close(attack.prompt_embeds, reference.prompt_embeds, atol=1e-5, rtol=1e-5)


def _original(pipe, edit):
    import copy

    other = copy.deepcopy(pipe.unet)
    for p in kv_pairs_from_edit(pipe, edit):
        other.get_submodule(p.name.removeprefix("unet.")).weight.data.copy_(p.original.float())
    return other


def _fast():
    from conceptsmith.generation import GenerationSettings

    return GenerationSettings(num_inference_steps=2, guidance_scale=2.0, batch_size=1)


def test_embedding_attack_on_text_encoder_edit_is_the_unedited_conditioning(tiny_pipe):
    """No K/V pair: the attack is c_e from the unedited encoder (edit reverted and re-applied exactly);
    a UNet edit outside attn2 K/V is ignored with a warning."""
    pipe, _ = tiny_pipe
    prompts = ["a photo of a circle", "a red square"]
    g = torch.Generator().manual_seed(0)
    fc2 = pipe.text_encoder.get_submodule("encoder.layers.1.mlp.fc2").weight
    edit = Edit.from_weight_deltas(
        "te-test", ["circle"], {}, base_fingerprint(pipe), "sd1",
        {"text_encoder.encoder.layers.1.mlp.fc2": 0.5 * torch.randn(fc2.shape, generator=g)},
    )  # fmt: skip
    unedited = encode_prompts(pipe, prompts)
    edit.apply(pipe)
    edited_weights = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    assert not torch.allclose(encode_prompts(pipe, prompts), unedited, atol=1e-3)
    attack = embedding_attack(pipe, edit, prompts)
    assert torch.equal(attack.prompt_embeds, unedited)
    assert attack.info["kv_modules"] == 0 and attack.info["modules"] == 0
    assert all(torch.equal(v, edited_weights[k]) for k, v in pipe.text_encoder.state_dict().items())
    from conceptsmith.edits import applied_edits

    assert applied_edits(pipe) == [edit]
    edit.revert(pipe)

    q = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight
    self_attn = Edit.from_weight_deltas(
        "q-test", ["circle"], {}, base_fingerprint(pipe), "sd1",
        {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": torch.ones(q.shape)},
    )  # fmt: skip
    self_attn.apply(pipe)
    with pytest.warns(UserWarning, match="ignoring 1 other module"):
        attack = embedding_attack(pipe, self_attn, prompts)
    assert attack.info["kv_modules"] == 0 and torch.equal(attack.prompt_embeds, unedited)


def test_hook_edit_is_refused(tiny_pipe):
    pipe, _ = tiny_pipe
    edit = Edit.from_hook("h", ["x"], {}, base_fingerprint(pipe), "sd1", "nohook", {})
    with pytest.raises(ValueError, match="hook"):
        embedding_attack(pipe, edit, ["x"])


def test_concept_vector_and_greedy_search(tiny_pipe):
    pipe, _ = tiny_pipe
    pairs = [("a red circle", "a red"), ("a big circle", "a big")]
    v = concept_vector(pipe, pairs)
    e = encode_prompts(pipe, [p for pair in pairs for p in pair])
    torch.testing.assert_close(v, ((e[0] - e[1]) + (e[2] - e[3])) / 2)
    attack = ring_a_bell(pipe, ["a blue square"], pairs, eta=0.9)
    torch.testing.assert_close(attack.prompt_embeds[0], encode_prompts(pipe, ["a blue square"])[0] + 0.9 * v)
    # the discrete search never increases the distance and reports the prompt's true distance
    s = greedy_prompt_search(
        pipe, attack.prompt_embeds[0], n_words=4, sweeps=2, n_candidates=16, init="a blue square"
    )
    assert len(s.words) == 4 and s.prompt == " ".join(s.words)
    assert (
        all(b <= a + 1e-6 for a, b in zip(s.history, s.history[1:], strict=False))
        and s.history[-1] < s.history[0]
    )
    real = float((encode_prompts(pipe, [s.prompt])[0] - attack.prompt_embeds[0]).square().sum())
    assert s.distance == pytest.approx(real, rel=1e-4)


def _concept_images(n=4, size=16):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        img[4:12, 4:12] = rng.integers(150, 255, 3)
        out.append(Image.fromarray(img))
    return out


def test_textual_inversion_attack_runs_reduces_loss_and_is_usable(tiny_pipe):
    pipe, _ = tiny_pipe
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    result = textual_inversion_attack(pipe, _concept_images(), steps=25, lr=5e-2, eval_samples=8, seed=0)
    assert len(result.losses) == 25 and result.embedding.shape == (32,)
    assert result.eval_loss_after < result.eval_loss_before
    # the pipe is untouched, and no parameter gradient was accumulated
    for k, v in pipe.text_encoder.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in pipe.unet.parameters())
    # usable in prompts: the non-mutating encoding equals the installed token's encoding
    prompt = f"a photo of {result.token}"
    encoded = result.encode(pipe, [prompt])
    assert not torch.allclose(encoded, encode_prompts(pipe, ["a photo of sks"]))
    result.install(pipe)
    torch.testing.assert_close(encode_prompts(pipe, [prompt]), encoded, atol=1e-5, rtol=1e-5)
    out = pipe(
        prompt=prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pil"
    )
    assert isinstance(out.images[0], Image.Image)


class _StubEvaluator:
    def __init__(self, probs):
        self.probs = probs

    def classify(self, images, classnames, templates=None):
        p = self.probs[list(images)]
        return Classification(tuple(classnames), ("{}",), p.log(), p, 1.0)


def test_attack_success_rate():
    probs = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1], [0.2, 0.8]])
    ev = _StubEvaluator(probs)
    assert attack_success_rate(ev, [0, 1, 2, 3], "skull", ["skull", "circle"]) == pytest.approx(0.5)
    assert attack_success_rate(
        ev, [0, 1, 2, 3], "skull", ["skull", "circle"], pre_attack_success=[False, True, False, False]
    ) == pytest.approx(0.75)
    with pytest.raises(KeyError):
        attack_success_rate(ev, [0], "star", ["skull", "circle"])
