"""Cross-attention discovery and the attention-map recorder on tiny random pipelines."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from conceptsmith.attention import (
    AttentionMapRecorder,
    CrossAttentionLayer,
    find_cross_attention,
    kv_projections,
)

PROMPT = "a photo of a cat"


def _small_unet(cross_attention_dim: int = 32) -> UNet2DConditionModel:
    """First block width == text width, so its self-attention to_k also reads 32-d vectors."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    ).eval()


def _processors(unet) -> dict[str, object]:
    return {name: module.processor for name, module in unet.named_modules() if hasattr(module, "processor")}


def _generate(pipe, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "latent", **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images


# ------------------------------------------------------------------------------------ discovery


def test_finds_only_cross_attention_even_when_self_attention_has_text_width():
    unet = _small_unet()
    self_attn = [m for n, m in unet.named_modules() if n.endswith("attn1")]
    assert any(m.to_k.in_features == 32 for m in self_attn)  # the trap the width check alone falls into
    layers = find_cross_attention(unet)
    expected = [n for n, m in unet.named_modules() if n.endswith("attn2")]
    assert sorted(layer.name for layer in layers) == sorted(expected)
    assert all(layer.module.is_cross_attention for layer in layers)
    assert all(isinstance(layer, CrossAttentionLayer) for layer in layers)


def test_layers_in_execution_order_with_shapes(tiny_pipe):
    pipe, info = tiny_pipe
    layers = find_cross_attention(pipe)  # a pipeline is accepted too
    assert len(layers) == info.cross_attention_layers == 7
    blocks = [layer.block for layer in layers]
    assert blocks == sorted(blocks, key=["down", "mid", "up"].index)
    assert layers[0].name == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    modules = dict(pipe.unet.named_modules())
    for layer in layers:
        assert modules[layer.name] is layer.module
        assert layer.to_k is layer.module.to_k and layer.to_v is layer.module.to_v
        assert layer.d_in == pipe.unet.config.cross_attention_dim == layer.to_k.weight.shape[1]
        assert layer.d_out == layer.to_k.weight.shape[0] == layer.to_v.weight.shape[0]
        assert layer.heads == layer.module.heads


def test_kv_projections_keys_are_module_paths(tiny_sdxl_pipe):
    pipe, _ = tiny_sdxl_pipe
    projections = kv_projections(pipe.unet)
    modules = dict(pipe.unet.named_modules())
    assert len(projections) == 2 * len(find_cross_attention(pipe.unet))
    for key, linear in projections.items():
        assert key.endswith((".attn2.to_k", ".attn2.to_v"))
        assert modules[key] is linear
        assert linear.in_features == 64  # both encoders concatenated


def test_lora_wrapped_projections_resolve_to_base_linear(tiny_pipe):
    from peft import LoraConfig

    pipe, _ = tiny_pipe
    before = {layer.name: layer.to_k for layer in find_cross_attention(pipe.unet)}
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_k", "to_v"]))
    after = find_cross_attention(pipe.unet)
    assert {layer.name for layer in after} == set(before)
    for layer in after:
        assert type(layer.to_k) is torch.nn.Linear and layer.to_k is before[layer.name]


def test_rejects_objects_without_a_unet():
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        find_cross_attention(object())


# ------------------------------------------------------------------------------------ recorder


def test_recorder_leaves_generation_unchanged_and_restores_processors(tiny_pipe):
    pipe, _ = tiny_pipe
    reference = _generate(pipe)
    before = _processors(pipe.unet)
    with AttentionMapRecorder(pipe) as recorder:
        recorded = _generate(pipe)
        assert any(_processors(pipe.unet)[name] is not before[name] for name in before)
    assert torch.equal(recorded, reference)
    after = _processors(pipe.unet)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert recorder.recorded_steps == [0, 1]
    maps = recorder.maps
    assert set(maps) == {layer.name for layer in find_cross_attention(pipe.unet)}
    for tensor in maps.values():  # CFG batch of 2, square latent grid, all 77 tokens; rows are distributions
        assert tensor.shape[0] == 2 and tensor.shape[1] == tensor.shape[2] and tensor.shape[3] == 77
        torch.testing.assert_close(tensor.sum(-1), torch.ones_like(tensor[..., 0]))


def test_processors_restored_when_generation_raises(tiny_pipe):
    pipe, _ = tiny_pipe
    before = _processors(pipe.unet)

    def explode(pipeline, step, timestep, kwargs):
        raise RuntimeError(f"boom at step {step}")

    with pytest.raises(RuntimeError, match="boom"):
        with AttentionMapRecorder(pipe):
            _generate(pipe, callback_on_step_end=explode)
    after = _processors(pipe.unet)
    assert all(after[n] is before[n] for n in before)
    assert not pipe.unet._forward_pre_hooks  # the step counter hook is gone too


def test_maps_equal_the_attention_probabilities_the_layer_computes():
    """Reference: diffusers' classic AttnProcessor materialises the softmax; capture it per layer."""
    unet = _small_unet()
    layers = find_cross_attention(unet)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))

    captured = {}
    for layer in layers:
        layer.module.set_processor(AttnProcessor())
        original = layer.module.get_attention_scores

        def capture(query, key, mask=None, _orig=original, _name=layer.name, _heads=layer.heads):
            probs = _orig(query, key, mask)
            captured[_name] = probs.reshape(-1, _heads, *probs.shape[1:]).mean(1)
            return probs

        layer.module.get_attention_scores = capture
    with torch.no_grad():
        expected_out = unet(sample, 10, text).sample
    with AttentionMapRecorder(unet, token_indices=[0, 3, 76]) as recorder, torch.no_grad():
        out = unet(sample, 10, text).sample
    assert torch.equal(out, expected_out)
    for layer in layers:
        got = recorder.maps[layer.name]
        want = captured[layer.name][..., [0, 3, 76]]
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-5, atol=1e-6)


def test_token_indices_steps_and_per_step(tiny_pipe):
    pipe, _ = tiny_pipe
    with AttentionMapRecorder(pipe, per_step=True) as full:
        _generate(pipe)
    with AttentionMapRecorder(pipe, token_indices=[4, 5], steps=[1], per_step=True) as part:
        _generate(pipe)
    assert part.recorded_steps == [1] and full.recorded_steps == [0, 1]
    for name, tensor in part.maps.items():
        assert set(part.step_maps[name]) == {1}
        torch.testing.assert_close(tensor, full.step_maps[name][1][..., [4, 5]])
        torch.testing.assert_close(full.maps[name], torch.stack(list(full.step_maps[name].values())).mean(0))


def test_resolution_groups_aggregate_and_non_square_latents(tiny_sdxl_pipe):
    pipe, _ = tiny_sdxl_pipe
    names = [layer.name for layer in find_cross_attention(pipe)]
    with AttentionMapRecorder(pipe, token_indices=[1], layers=lambda n: not n.startswith("mid")) as rec:
        _generate(pipe, height=16, width=32, num_inference_steps=1)
    assert set(rec.maps) == {n for n in names if not n.startswith("mid")}
    shapes = {tuple(t.shape) for t in rec.maps.values()}
    assert shapes == {(2, 8, 16, 1), (2, 4, 8, 1)}  # latent 8x16 (tiny VAE: factor 2), then one downsampling
    groups = rec.by_resolution()
    assert set(groups) == {(8, 16), (4, 8)}
    assert rec.aggregate().shape == (2, 8, 16, 1)
    assert rec.aggregate(size=(4, 8), layers=r"^up_").shape == (2, 4, 8, 1)


def test_cross_attention_kwargs_still_reach_the_wrapped_processor(tiny_pipe):
    pipe, _ = tiny_pipe

    class Scaled(AttnProcessor2_0):
        seen: list = []

        def __call__(
            self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, factor=1.0
        ):
            Scaled.seen.append(factor)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * factor

    for layer in find_cross_attention(pipe):
        layer.module.set_processor(Scaled())
    with AttentionMapRecorder(pipe):
        _generate(pipe, num_inference_steps=1, cross_attention_kwargs={"factor": 0.5})
    assert Scaled.seen and set(Scaled.seen) == {0.5}
    assert all(type(layer.module.processor) is Scaled for layer in find_cross_attention(pipe))


def test_recorder_errors(tiny_pipe):
    pipe, _ = tiny_pipe
    with pytest.raises(ValueError, match="Unknown cross-attention layer"):
        AttentionMapRecorder(pipe, layers=["down_blocks.9.nope"])
    recorder = AttentionMapRecorder(pipe)
    with recorder, pytest.raises(RuntimeError, match="already active"):
        recorder.__enter__()
    with pytest.raises(ValueError, match="No attention maps recorded"):
        recorder.aggregate()
