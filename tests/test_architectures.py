"""Full-size SD 1.5 / SD 2.1 / SDXL architectures, built from their public configs on the meta device.

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
    OPENCLIP_BIGG_TEXT,
    OPENCLIP_VIT_H_TEXT,
    SD15_UNET,
    SD21_UNET,
    SDXL_UNET,
)
from conceptsmith.attention import find_cross_attention, kv_projections
from conceptsmith.text import encode_prompts
from conceptsmith.world.tokenizer import clip_tokenizer

# family -> (unet config, layers, d_in, UNet parameters)
UNETS = {
    "sd15": (SD15_UNET, 16, 768, 859_520_964),
    "sd21": (SD21_UNET, 16, 1024, 865_910_724),
    "sdxl": (SDXL_UNET, 70, 2048, 2_567_463_684),
}


def _on_meta(build):
    with init_empty_weights():
        model = build()
    assert all(p.is_meta for p in model.parameters()), "a real weight tensor was allocated"
    assert sum(b.numel() * b.element_size() for b in model.buffers()) < 1 << 20
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
