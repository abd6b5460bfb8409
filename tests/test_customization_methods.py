"""Custom Diffusion and DreamBooth-LoRA on the tiny pipeline: training, the Edit, and its exports
(diffusers LoRA + textual-inversion files, kohya LoRA) reproduced by diffusers' own loaders."""

from __future__ import annotations

import pytest
import torch
from test_customization import make_references

from conceptsmith.customization import CustomizationError
from conceptsmith.edits import Edit, base_fingerprint
from conceptsmith.models import fingerprint
from conceptsmith.registry import EditRequest, get_editor

FAST = {"progress": False, "batch_size": 1}


@pytest.fixture
def refs(tmp_path):
    return make_references(tmp_path / "refs")


def _unet_out(pipe, prompt: str) -> torch.Tensor:
    """The UNet's noise prediction for ``prompt`` on a fixed latent (through the pipe's own prompt encoding)."""
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        return pipe.unet(latent, 500, encoder_hidden_states=embeds).sample


def _state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for component in (pipe.unet, pipe.text_encoder) for k, v in component.state_dict().items()}


def test_custom_diffusion_trains_kv_and_a_token(tiny_pipe, refs, tmp_path):
    pipe, info = tiny_pipe
    before, state = fingerprint(pipe), _state(pipe)
    config = {**FAST, "steps": 4, "learning_rate": 3e-3, "num_class_images": 2, "class_data_dir": str(tmp_path / "class")}
    edit = get_editor("custom-diffusion")(config).fit(pipe, EditRequest(concepts=[], tokens=["<cd>"], class_words=["dog"], images=[refs]))
    assert fingerprint(pipe) == before and len(pipe.tokenizer) == 49408
    weights, tokens = edit.parts
    assert edit.kind == "composite" and weights.kind == "weights" and tokens.hook == "custom-tokens"
    modules = weights.module_shapes
    assert len(modules) == 2 * info.cross_attention_layers
    assert all(m.endswith(("attn2.to_k", "attn2.to_v")) for m in modules)
    assert edit.params["phrases"] == ["<cd> dog"] and edit.concepts == ["<cd> dog"]
    training = edit.metadata["training"]
    assert training["eval_loss_end"] < training["eval_loss_start"]
    assert set(edit.metadata["logs"]) == {"instance", "prior"}

    edit = Edit.load(edit.save(tmp_path / "cd.safetensors"))
    base_out = _unet_out(pipe, "a photo of a dog")
    edit.apply(pipe)
    edited = _unet_out(pipe, "a photo of a <cd> dog")
    assert not torch.allclose(edited, base_out)
    edit.revert(pipe)
    assert all(torch.equal(v, state[k]) for k, v in _state(pipe).items())

    # diffusers export: the K/V change as a LoRA + the token for load_textual_inversion
    from conceptsmith.customization.lora import export_diffusers

    written = export_diffusers(edit, tmp_path / "export")
    assert max(written["truncation_error"].values()) < 1e-5
    pipe.load_lora_weights(str(written["lora"]))
    for path in written["tokens"]:
        pipe.load_textual_inversion(str(path))
    torch.testing.assert_close(_unet_out(pipe, "a photo of a <cd> dog"), edited, rtol=1e-4, atol=1e-4)


def test_custom_diffusion_options_and_errors(tiny_pipe, refs):
    pipe, _ = tiny_pipe
    cd = get_editor("custom-diffusion")
    edit = cd({**FAST, "steps": 1, "train": "cross-attention", "prior_preservation": False, "eval_batches": 0}).fit(
        pipe, EditRequest(concepts=["mascot"], tokens=["<cd2>"], class_words=["dog"], images=[refs])
    )
    suffixes = {m.rsplit("attn2.", 1)[1] for m in edit.parts[0].module_shapes}
    assert suffixes == {"to_q", "to_k", "to_v", "to_out.0"} and edit.concepts == ["mascot"]
    with pytest.raises(CustomizationError, match="class word"):
        cd(FAST).fit(pipe, EditRequest(concepts=[], tokens=["<x>"], images=[refs]))
    with pytest.raises(CustomizationError, match="already in the vocabulary"):
        cd(FAST).fit(pipe, EditRequest(concepts=[], tokens=["cat"], class_words=["dog"], images=[refs]))
    with pytest.raises(CustomizationError, match="No reference images"):
        cd(FAST).fit(pipe, EditRequest(concepts=[], tokens=["<x>"], class_words=["dog"]))


def test_lora_with_text_encoder_and_learned_token_exports_to_diffusers_and_kohya(tiny_pipe, refs, tmp_path):
    pipe, _ = tiny_pipe
    state = _state(pipe)
    config = {**FAST, "steps": 4, "learning_rate": 5e-3, "rank": 2, "train_text_encoder": True}
    edit = get_editor("lora")(config).fit(pipe, EditRequest(concepts=[], tokens=["<lo>"], class_words=["dog"], images=[refs]))
    lora, tokens = edit.parts
    assert lora.kind == "lora" and tokens.hook == "custom-tokens"
    keys = set(lora.tensors)
    assert any(k.startswith("unet.") and ".attn1.to_q.lora_A" in k for k in keys)
    assert any(k.startswith("text_encoder.") and "q_proj.lora_B" in k for k in keys)
    assert all(v.shape[0] == 2 for k, v in lora.tensors.items() if k.endswith("lora_A.weight"))
    training = edit.metadata["training"]
    assert training["eval_loss_end"] < training["eval_loss_start"]
    assert all(torch.equal(v, state[k]) for k, v in _state(pipe).items())  # fit left the pipe alone

    edit = Edit.load(edit.save(tmp_path / "lora.safetensors"))
    edit.apply(pipe)
    expected = _unet_out(pipe, "a photo of a <lo> dog")
    edit.revert(pipe)
    assert all(torch.equal(v, state[k]) for k, v in _state(pipe).items())

    from conceptsmith.customization.lora import export_diffusers, export_kohya
    from conceptsmith.customization.textual_inversion import export_embeddings

    kohya = export_kohya(edit, tmp_path / "kohya.safetensors")
    from safetensors.torch import load_file

    written = load_file(kohya)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down") for k in written)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up") for k in written)
    for path in export_embeddings(edit, tmp_path / "tokens"):
        pipe.load_textual_inversion(str(path))
    pipe.load_lora_weights(str(kohya), adapter_name="kohya")
    torch.testing.assert_close(_unet_out(pipe, "a photo of a <lo> dog"), expected, rtol=1e-4, atol=1e-4)
    pipe.delete_adapters("kohya")

    exported = export_diffusers(edit, tmp_path / "diffusers")
    pipe.load_lora_weights(str(exported["lora"]), adapter_name="diffusers")
    torch.testing.assert_close(_unet_out(pipe, "a photo of a <lo> dog"), expected, rtol=1e-4, atol=1e-4)


def test_lora_on_every_unet_layer_applies_and_exports_exactly(tiny_pipe, refs, tmp_path):
    """``unet_modules`` beyond attention (projections, feed-forward, ResNet convolutions): the composition probe's
    setting. The conv adapters train, and diffusers' loaders reproduce the applied edit from both exports."""
    pipe, _ = tiny_pipe
    modules = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
    config = {**FAST, "steps": 3, "learning_rate": 5e-3, "rank": 2, "unet_modules": modules, "eval_batches": 0}
    edit = get_editor("lora")(config).fit(pipe, EditRequest(concepts=[], tokens=["<all>"], class_words=["dog"], images=[refs]))
    lora = edit.parts[0]
    conv_down = [v for k, v in lora.tensors.items() if ".resnets.0.conv1.lora_A" in k]
    assert conv_down and conv_down[0].dim() == 4  # a real conv adapter, not a linear one
    assert any(".ff.net.2.lora_B" in k for k in lora.tensors) and any(".proj_in.lora_A" in k for k in lora.tensors)
    assert any(v.abs().sum() > 0 for k, v in lora.tensors.items() if ".conv2.lora_B" in k)  # B starts at zero: trained

    edit = Edit.load(edit.save(tmp_path / "all.safetensors"))
    base = _unet_out(pipe, "a photo of a dog")
    edit.apply(pipe)
    expected = _unet_out(pipe, "a photo of a <all> dog")
    assert not torch.allclose(_unet_out(pipe, "a photo of a dog"), base)  # the convs change every prompt's output
    edit.revert(pipe)

    from conceptsmith.customization.lora import export_diffusers, export_kohya
    from conceptsmith.customization.textual_inversion import export_embeddings

    for path in export_embeddings(edit, tmp_path / "tokens"):
        pipe.load_textual_inversion(str(path))
    pipe.load_lora_weights(str(export_kohya(edit, tmp_path / "kohya.safetensors")), adapter_name="kohya")
    torch.testing.assert_close(_unet_out(pipe, "a photo of a <all> dog"), expected, rtol=1e-4, atol=1e-4)
    pipe.delete_adapters("kohya")
    pipe.load_lora_weights(str(export_diffusers(edit, tmp_path / "diffusers")["lora"]), adapter_name="diffusers")
    torch.testing.assert_close(_unet_out(pipe, "a photo of a <all> dog"), expected, rtol=1e-4, atol=1e-4)


def test_lora_with_a_plain_text_token_adds_nothing_to_the_vocabulary(tiny_pipe, refs):
    pipe, _ = tiny_pipe
    edit = get_editor("lora")({**FAST, "steps": 1, "token": "text", "eval_batches": 0}).fit(
        pipe, EditRequest(concepts=[], tokens=["sks"], class_words=["dog"], images=[refs])
    )
    assert edit.kind == "lora" and edit.base_fingerprint == base_fingerprint(pipe)
    assert all(k.startswith("unet.") for k in edit.tensors)


def test_custom_diffusion_runs_on_sdxl(tiny_sdxl_pipe, refs):
    pipe, _ = tiny_sdxl_pipe
    edit = get_editor("custom-diffusion")({**FAST, "steps": 1, "prior_preservation": False, "eval_batches": 0}).fit(
        pipe, EditRequest(concepts=[], tokens=["<xl>"], class_words=["dog"], images=[refs])
    )
    assert edit.family == "sdxl" and set(edit.parts[1].tensors) == {"text_encoder.<xl>", "text_encoder_2.<xl>"}
    edit.apply(pipe)
    from conceptsmith.generation import generate

    generate(pipe, ["a photo of a <xl> dog"], [0], progress=False)
    edit.revert(pipe)
