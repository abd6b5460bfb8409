"""Merging customization edits: LoRA sums against diffusers' set_adapters + fuse_lora, peft's
add_weighted_adapter modes, Custom Diffusion's closed-form merge, and the errors of bad merges."""

from __future__ import annotations

import pytest
import torch

from conceptsmith.customization import CustomizationError
from conceptsmith.customization.merge import (
    MERGE_METHODS,
    closed_form_merge,
    lora_sum,
    merge,
    needs_pipeline,
    peft_merge,
)
from conceptsmith.edits import Edit, EditError, base_fingerprint
from conceptsmith.models import detect_family
from conceptsmith.tokens import token_edit

TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
TO_Q1 = "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q"
TE_Q = "encoder.layers.1.self_attn.q_proj"


def _module(pipe, key: str) -> torch.nn.Module:
    component, _, name = key.partition(".")
    module = getattr(pipe, component).get_submodule(name)
    return getattr(module, "base_layer", module)


def _lora(pipe, seed: int, rank: int, modules=("unet." + TO_K, "unet." + TO_Q1, "text_encoder." + TE_Q), token: str | None = None) -> Edit:
    """A random LoRA edit (scale folded in), optionally with a learned token, as the lora editor makes them."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key in modules:
        d_out, d_in = _module(pipe, key).weight.shape
        state[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=generator) * 0.1
        state[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=generator) * 0.1
    params = {"phrases": [f"{token or 'sks'} dog"], "prompt_templates": ["a photo of a {}"]}
    lora = Edit.from_lora("lora", [f"concept{seed}"], params, base_fingerprint(pipe), detect_family(pipe), state)
    if token is None:
        return lora
    vectors = {f"text_encoder.{token}": torch.randn(1, 32, generator=generator)}
    tokens = token_edit(pipe, "lora", lora.concepts, {}, vectors)
    return Edit("composite", "lora", lora.concepts, params, lora.base_fingerprint, lora.family, parts=[lora, tokens])


def _dense(edit: Edit, key: str) -> torch.Tensor:
    lora = edit.parts[0] if edit.parts else edit
    return lora.tensors[f"{key}.lora_B.weight"] @ lora.tensors[f"{key}.lora_A.weight"]


def test_lora_sum_equals_diffusers_set_adapters_and_fuse(tiny_pipe, tmp_path):
    pipe, _ = tiny_pipe
    a, b = _lora(pipe, 1, rank=4), _lora(pipe, 2, rank=2)
    summed = lora_sum([a, b], weights=[0.7, -1.5])
    summed = Edit.load(summed.save(tmp_path / "sum.safetensors"))
    key = "unet." + TO_K
    assert summed.tensors[f"{key}.lora_A.weight"].shape[0] == 6  # ranks add up
    originals = {k: _module(pipe, k).weight.detach().clone() for k in ("unet." + TO_K, "unet." + TO_Q1, "text_encoder." + TE_Q)}

    # diffusers: both adapters loaded, weighted, fused into the weights
    pipe.load_lora_weights(dict(a.tensors), adapter_name="a")
    pipe.load_lora_weights(dict(b.tensors), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -1.5])
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=["a", "b"])
    for k, w0 in originals.items():
        fused = _module(pipe, k).weight.detach()
        torch.testing.assert_close(fused, w0 + _dense(summed, k), rtol=0, atol=2e-6)
        torch.testing.assert_close(fused, w0 + 0.7 * _dense(a, k) - 1.5 * _dense(b, k), rtol=0, atol=2e-6)
    pipe.unfuse_lora(components=["unet", "text_encoder"])
    pipe.unload_lora_weights()

    # peft's cat is the same exact sum; svd at full rank too; svd at a lower rank reports its error
    cat = peft_merge([a, b], "cat", weights=[0.7, -1.5])
    torch.testing.assert_close(_dense(cat, key), _dense(summed, key), rtol=0, atol=1e-6)
    full = peft_merge([a, b], "svd", weights=[0.7, -1.5], rank=6)
    assert max(full.metadata["relative_error"].values()) < 1e-5
    truncated = merge([a, b], "svd", weights=[0.7, -1.5], rank=1)
    assert truncated.tensors[f"{key}.lora_A.weight"].shape[0] == 1
    error = truncated.metadata["relative_error"][key]
    exact = _dense(summed, key)
    assert 0 < error < 1 and abs(error - float(torch.linalg.norm(_dense(truncated, key) - exact) / torch.linalg.norm(exact))) < 1e-5


def test_ties_and_linear_need_equal_ranks_and_tokens_are_carried(tiny_pipe):
    pipe, _ = tiny_pipe
    with pytest.raises(CustomizationError, match="Rank mismatch.*use 'svd'"):
        merge([_lora(pipe, 1, rank=4), _lora(pipe, 2, rank=2)], "ties")
    a, b = _lora(pipe, 1, rank=2, token="<a>"), _lora(pipe, 2, rank=2, token="<b>")
    tied = merge([a, b], "ties", density=0.5)
    lora, tokens = tied.parts
    assert lora.kind == "lora" and set(tokens.tensors) == {"text_encoder.<a>", "text_encoder.<b>"}
    assert lora.tensors[f"unet.{TO_K}.lora_A.weight"].shape[0] == 2
    tied.apply(pipe)
    assert pipe.tokenizer.tokenize("<a> and <b>") == ["<a>", "and</w>", "<b>"]
    tied.revert(pipe)
    with pytest.raises(EditError, match="same token"):
        lora_sum([a, _lora(pipe, 3, rank=2, token="<a>")])


def test_bad_merges_have_clear_errors(tiny_pipe, tmp_path):
    pipe, _ = tiny_pipe
    a = _lora(pipe, 1, rank=2)
    other = Edit.from_lora("lora", ["x"], {}, "0123456789abcdef", "sd1", dict(_lora(pipe, 2, rank=2).tensors))
    with pytest.raises(EditError, match="different base models"):
        merge([a, other], "lora-sum")
    with pytest.raises(CustomizationError, match="at least two"):
        merge([a], "cat")
    with pytest.raises(CustomizationError, match="Unknown merge method 'mean'"):
        merge([a, a], "mean")
    with pytest.raises(CustomizationError, match="needs the base pipeline"):
        merge([a, a], "closed-form")
    with pytest.raises(CustomizationError, match="LoRA edit"):
        merge([a, _lora(pipe, 2, rank=2)], "closed-form", pipe=pipe)
    with pytest.raises(CustomizationError, match="one weight per edit"):
        lora_sum([a, _lora(pipe, 2, rank=2)], weights=[1.0])
    assert needs_pipeline("closed-form") and not needs_pipeline("svd") and set(MERGE_METHODS) >= {"lora-sum", "cat", "svd", "ties"}


def _custom_diffusion_like(pipe, token: str, word: str, seed: int) -> Edit:
    """A K/V edit + token edit with the layout the custom-diffusion editor produces."""
    from conceptsmith.attention import kv_projections

    generator = torch.Generator().manual_seed(seed)
    deltas = {f"unet.{name}": 0.05 * torch.randn(tuple(linear.weight.shape), generator=generator) for name, linear in kv_projections(pipe.unet).items()}
    params = {"tokens": [token], "phrases": [f"{token} {word}"], "prompt_templates": ["a photo of a {}", "a {} in the grass"]}
    weights = Edit.from_weight_deltas("custom-diffusion", [f"{token} {word}"], params, base_fingerprint(pipe), "sd1", deltas)
    tokens = token_edit(pipe, "custom-diffusion", weights.concepts, {}, {f"text_encoder.{token}": torch.randn(1, 32, generator=generator)})
    return Edit("composite", "custom-diffusion", weights.concepts, params, weights.base_fingerprint, "sd1", parts=[weights, tokens])


def test_closed_form_merge_keeps_each_concepts_kv_outputs(tiny_pipe, tmp_path):
    from conceptsmith.text import encode_prompts

    pipe, _ = tiny_pipe
    a, b = _custom_diffusion_like(pipe, "<ca>", "dog", 1), _custom_diffusion_like(pipe, "<cb>", "cat", 2)
    prompts = [["<ca> dog"], ["a <cb> cat"]]  # few constraint rows (< d_in = 32): met almost exactly
    merged = merge([a, b], "closed-form", pipe=pipe, prompts=prompts, regularization_prompts=["a photo", "a red car on a road"])
    merged = Edit.load(merged.save(tmp_path / "merged.safetensors"))
    weights, tokens = merged.parts
    assert set(tokens.tensors) == {"text_encoder.<ca>", "text_encoder.<cb>"}
    assert merged.metadata["solver"]["max_edit_residual"] < 1e-2

    def kv(edit, prompt):
        edit.apply(pipe)
        try:
            states = encode_prompts(pipe, [prompt])[0, 1:4]
            return _module(pipe, "unet." + TO_K).weight.detach() @ states.T
        finally:
            edit.revert(pipe)

    for edit, prompt in [(a, "<ca> dog"), (b, "a <cb> cat")]:
        target = kv(edit, prompt)
        torch.testing.assert_close(kv(merged, prompt), target, rtol=0, atol=5e-3 * float(target.abs().max()))
    # the default prompts (the edits' training templates) and default captions also work
    assert closed_form_merge(pipe, [a, b]).kind == "composite"

    cross = _custom_diffusion_like(pipe, "<cc>", "cow", 3)
    q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"
    extra = Edit.from_weight_deltas("custom-diffusion", ["q"], {}, base_fingerprint(pipe), "sd1", {q: torch.zeros(tuple(_module(pipe, q).weight.shape))})
    with_q = Edit("composite", "custom-diffusion", cross.concepts, cross.params, cross.base_fingerprint, "sd1", parts=[*cross.parts, extra])
    with pytest.raises(CustomizationError, match="read text embeddings"):
        closed_form_merge(pipe, [a, with_q])
    tokenizer = pipe.tokenizer
    assert closed_form_merge(pipe, [b, cross], prompts=[["<cb> cat"], ["<cc> cow"]]).kind == "composite"
    assert pipe.tokenizer is tokenizer  # the merge never touches the pipe
    a.apply(pipe)
    try:
        with pytest.raises(EditError, match="without any edit applied"):
            closed_form_merge(pipe, [b, cross])
    finally:
        a.revert(pipe)


def test_stack_applies_textual_inversion_and_weight_edits_together_unchanged(tiny_pipe):
    pipe, _ = tiny_pipe
    generator = torch.Generator().manual_seed(5)
    ti = {t: token_edit(pipe, "textual-inversion", [t], {}, {f"text_encoder.{t}": torch.randn(2, 32, generator=generator)})
          for t in ("<a>", "<b>")}
    stacked = merge(list(ti.values()), "stack")
    base_tokenizer = pipe.tokenizer  # restored on revert
    stacked.apply(pipe)
    table = pipe.text_encoder.get_input_embeddings()
    for token, edit in ti.items():
        token_id = pipe.tokenizer.convert_tokens_to_ids(token)
        assert torch.equal(table(torch.tensor([token_id]))[0], edit.tensors[f"text_encoder.{token}"][0])
    stacked.revert(pipe)
    assert pipe.tokenizer is base_tokenizer and "<a>" not in pipe.tokenizer.get_vocab()

    cd_a, cd_b = _custom_diffusion_like(pipe, "<c>", "cat", 1), _custom_diffusion_like(pipe, "<d>", "dog", 2)
    key = next(k for k in cd_a.parts[0].tensors if k.startswith("unet."))
    linear = pipe.unet.get_submodule(key.removeprefix("unet.").rpartition(".")[0])
    before = linear.weight.detach().clone()
    both = merge([cd_a, cd_b], "stack")
    both.apply(pipe)
    expected = before + cd_a.parts[0].tensors[key] + cd_b.parts[0].tensors[key]
    torch.testing.assert_close(linear.weight.detach(), expected)
    both.revert(pipe)
    assert torch.equal(linear.weight.detach(), before)
    with pytest.raises(CustomizationError, match="stack merge takes no weights or rank"):
        merge([cd_a, cd_b], "stack", weights=[1.0, 0.5])
    with pytest.raises(CustomizationError, match="closed-form merge takes no weights or rank"):
        merge([cd_a, cd_b], "closed-form", pipe=pipe, rank=2)
    with pytest.raises(EditError, match="same token"):
        merge([cd_a, _custom_diffusion_like(pipe, "<c>", "cow", 3)], "stack")
