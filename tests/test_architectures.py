"""Full-size SD 1.5 / SD 2.1 / SDXL / SD3-medium / FLUX.1-dev architectures, built from their public configs
on the meta device.

No weight values are needed to prove layer discovery and text widths, so nothing is allocated
(``accelerate.init_empty_weights``): SDXL's UNet alone would be ~10 GB in fp32. The parameter
counts pin the configs to the published models.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from conceptsmith.architectures import (
    CLIP_VIT_L_TEXT,
    FLUX1_DEV_TRANSFORMER,
    OPENCLIP_BIGG_TEXT,
    OPENCLIP_VIT_H_TEXT,
    SD3_MEDIUM_TRANSFORMER,
    SD15_UNET,
    SD21_UNET,
    SDXL_UNET,
    T5_XXL_TEXT,
)
from conceptsmith.attention import find_cross_attention, kv_projections
from conceptsmith.erasure._closed_form import map_weights
from conceptsmith.mmdit import POOLED_MAP, TOKEN_MAP, joint_attention
from conceptsmith.models import detect_family
from conceptsmith.text import encode_prompts
from conceptsmith.text_segments import encode_mmdit, text_segments
from conceptsmith.world.tokenizer import clip_tokenizer

# family -> (unet config, layers, d_in, UNet parameters)
UNETS = {
    "sd15": (SD15_UNET, 16, 768, 859_520_964),
    "sd21": (SD21_UNET, 16, 1024, 865_910_724),
    "sdxl": (SDXL_UNET, 70, 2048, 2_567_463_684),
}


def _on_meta(build, include_buffers: bool = False):
    """``build()`` with empty weights; ``include_buffers`` also puts buffers on meta (SD3's 192 x 192 position
    table alone is 226 MB)."""
    with init_empty_weights(include_buffers=include_buffers):
        model = build()
    assert all(p.is_meta for p in model.parameters()), "a real weight tensor was allocated"
    assert sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_meta) < 1 << 20
    return model


def _text_encoder(config: dict, with_projection: bool = False):
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _on_meta(lambda: cls(CLIPTextConfig(**config)))


@pytest.mark.parametrize("family", list(UNETS))
def test_full_size_unet_cross_attention(family):
    config, n_layers, d_in, n_params = UNETS[family]
    unet = _on_meta(lambda: UNet2DConditionModel(**config))
    assert sum(p.numel() for p in unet.parameters()) == n_params

    layers = find_cross_attention(unet)
    assert len(layers) == n_layers
    assert len(kv_projections(unet)) == 2 * n_layers
    assert {layer.d_in for layer in layers} == {d_in}
    assert all(layer.to_k.weight.is_meta and layer.to_k.weight.shape[1] == d_in for layer in layers)
    assert all(layer.to_v.weight.shape == layer.to_k.weight.shape for layer in layers)
    # every attn2 is found and no self-attention is
    assert sorted(layer.name for layer in layers) == sorted(
        n for n, _ in unet.named_modules() if n.endswith("attn2")
    )
    blocks = [layer.block for layer in layers]
    if family == "sdxl":
        assert {layer.d_out for layer in layers} == {640, 1280}
        assert (blocks.count("down"), blocks.count("mid"), blocks.count("up")) == (4 + 20, 10, 30 + 6)
        assert layers[0].name == "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
        assert layers[-1].name == "up_blocks.1.attentions.2.transformer_blocks.1.attn2"
    else:
        assert {layer.d_out for layer in layers} == {320, 640, 1280}
        assert (blocks.count("down"), blocks.count("mid"), blocks.count("up")) == (6, 1, 9)
        assert layers[0].name == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
        assert layers[-1].name == "up_blocks.3.attentions.2.transformer_blocks.0.attn2"


def test_full_size_text_encoders_match_the_unet_widths():
    vit_l = _text_encoder(CLIP_VIT_L_TEXT)
    vit_h = _text_encoder(OPENCLIP_VIT_H_TEXT)
    big_g = _text_encoder(OPENCLIP_BIGG_TEXT, with_projection=True)
    assert sum(p.numel() for p in vit_l.parameters()) == 123_060_480
    assert sum(p.numel() for p in vit_h.parameters()) == 340_387_840
    assert sum(p.numel() for p in big_g.parameters()) == 694_659_840

    prompts = ["a castle by greg rutkowski", "a photo of a cat"]
    eos_padded, bang_padded = clip_tokenizer(), clip_tokenizer("!")
    sd1 = SimpleNamespace(tokenizer=eos_padded, text_encoder=vit_l)
    sd2 = SimpleNamespace(tokenizer=bang_padded, text_encoder=vit_h)
    sdxl = SimpleNamespace(
        tokenizer=eos_padded, text_encoder=vit_l, tokenizer_2=bang_padded, text_encoder_2=big_g
    )
    # the same code path as on real weights, run on meta tensors: shapes only
    for pipe, family in ((sd1, "sd15"), (sd2, "sd21"), (sdxl, "sdxl")):
        states = encode_prompts(pipe, prompts)
        assert states.is_meta and states.dtype == torch.float32
        assert states.shape == (2, 77, UNETS[family][2])
    # SDXL: penultimate states of both encoders, 768 + 1280 = 2048 features
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    widths = [enc(ids, output_hidden_states=True).hidden_states[-2].shape[-1] for enc in (vit_l, big_g)]
    assert widths == [768, 1280] and sum(widths) == SDXL_UNET["cross_attention_dim"]
    assert encode_prompts(sdxl, prompts, max_length=8).shape == (2, 8, 2048)


# family -> (transformer parameters, context width, pooled width, joint blocks, runs of the joint text sequence)
MMDITS = {
    "sd3": (2_028_328_000, 1536, 2048, 24, [("clip", 0, 77), ("t5", 77, 256)]),
    "flux": (11_901_408_320, 3072, 768, 19, [("t5", 0, 512)]),
}


def _mmdit_pipe(family: str):
    """The pipeline with every model on the meta device; T5's tokenizer is a small unigram vocabulary (ids only)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0) for w in ("van", "gogh", "cat")]
    t5 = (_on_meta(lambda: T5EncoderModel(T5Config(**T5_XXL_TEXT))), T5Tokenizer(vocab=vocab, extra_ids=0))
    if family == "flux":
        return FluxPipeline(
            transformer=_on_meta(lambda: FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER)),
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
            text_encoder=_text_encoder(CLIP_VIT_L_TEXT), tokenizer=clip_tokenizer(), text_encoder_2=t5[0], tokenizer_2=t5[1],
        )
    return StableDiffusion3Pipeline(
        transformer=_on_meta(lambda: SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER), include_buffers=True),
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=_text_encoder(CLIP_VIT_L_TEXT, with_projection=True), tokenizer=clip_tokenizer(),
        text_encoder_2=_text_encoder(OPENCLIP_BIGG_TEXT, with_projection=True), tokenizer_2=clip_tokenizer("!"),
        text_encoder_3=t5[0], tokenizer_3=t5[1],
    )


@pytest.mark.parametrize("family", list(MMDITS))
def test_full_size_mmdit_text_maps(family):
    """The closed-form editors' targets on SD3-medium / FLUX.1-dev: the maps, their shapes, and the widths of
    the pipeline's own encode_prompt output they read (on meta tensors: shapes only)."""
    n_params, inner, pooled, blocks, runs = MMDITS[family]
    pipe = _mmdit_pipe(family)
    assert sum(p.numel() for p in pipe.transformer.parameters()) == n_params
    assert detect_family(pipe) == family
    assert [(s.name, s.offset, s.length) for s in text_segments(pipe)] == runs

    weights = map_weights(pipe)
    assert {group: {name: tuple(w.shape) for name, w in maps.items()} for group, maps in weights.items()} == {
        "tokens": {f"transformer.{TOKEN_MAP}": (inner, 4096)},
        "pooled": {f"transformer.{POOLED_MAP}": (inner, pooled)},
    }
    assert all(w.is_meta for maps in weights.values() for w in maps.values())
    states, vectors = encode_mmdit(pipe, ["a photo of van gogh", "cat"])
    assert states.is_meta and states.shape == (2, runs[-1][1] + runs[-1][2], 4096)
    assert vectors.is_meta and vectors.shape == (2, pooled)

    attention = joint_attention(pipe.transformer)  # the text stream's K/V, not edited (see conceptsmith.mmdit)
    assert len(attention) == blocks
    assert {(a.add_k_proj.in_features, a.add_v_proj.in_features) for a in attention.values()} == {(inner, inner)}
