"""SD3 and FLUX (MMDiT) pipelines: closed-form erasure of the transformer's text maps, the support check.

Tiny random pipelines are built in code (tiny CLIP and T5 encoders, a T5 tokenizer built from a small
unigram vocabulary, no download) and run through diffusers' own ``encode_prompt`` and ``__call__``.
"""

from __future__ import annotations

import copy
import functools
import string

import pytest
import torch
from typer.testing import CliRunner

from conceptsmith.cli import app
from conceptsmith.edits import Edit
from conceptsmith.erasure._closed_form import map_weights
from conceptsmith.linalg import regenerating_embeddings
from conceptsmith.mmdit import POOLED_MAP, TOKEN_MAP
from conceptsmith.models import describe, detect_family
from conceptsmith.registry import (
    EditRequest,
    UnsupportedArchitectureError,
    families_text,
    get_editor,
    list_editors,
)
from conceptsmith.text import tokenize
from conceptsmith.text_segments import text_segments
from conceptsmith.token_positions import concept_token_embeddings
from conceptsmith.world.tokenizer import clip_tokenizer

MAPS = {f"transformer.{TOKEN_MAP}", f"transformer.{POOLED_MAP}"}
WORDS = ("a", "photo", "painting", "image", "picture", "portrait", "of", "by", "art", "cat", "red", "house", "van", "gogh")
STEPS = {"num_inference_steps": 2, "height": 16, "width": 16}


def t5_tokenizer():
    """A T5 tokenizer (sentencepiece-style unigram model) over a few whole words plus single letters."""
    from transformers import T5Tokenizer

    pieces = [(f"\u2581{w}", -1.0) for w in WORDS]
    pieces += [(f"\u2581{c}", -4.0) for c in string.ascii_lowercase if c not in WORDS] + [(c, -5.0) for c in string.ascii_lowercase]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0), *pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _t5(width: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=96, d_model=width, d_ff=37, d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval()


def _clip(hidden: int, projection: int | None = None, pad_token_id: int = 49407):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=projection or hidden, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=pad_token_id,
    )
    return (CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)).eval()


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=16, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


@functools.cache
def _tiny_sd3():
    """SD3 layout: CLIP token states 8 + 8 zero-padded to T5's 32, pooled 12 + 12 = 24."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24,
        pos_embed_max_size=8,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4),
        text_encoder=_clip(8, 12), tokenizer=clip_tokenizer(), text_encoder_2=_clip(8, 12, pad_token_id=0),
        tokenizer_2=clip_tokenizer(pad_token="!"), text_encoder_3=_t5(), tokenizer_3=t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def _tiny_flux():
    """FLUX layout: T5 token states (32), pooled CLIP (24), guidance embedding."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 4, 8), guidance_embeds=True,
    )
    pipe = FluxPipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1),
        text_encoder=_clip(24), tokenizer=clip_tokenizer(), text_encoder_2=_t5(), tokenizer_2=t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny(family: str):
    return copy.deepcopy(_tiny_sd3() if family == "sd3" else _tiny_flux())


def encode(pipe, prompts):
    """``(prompt_embeds, pooled)`` straight from diffusers' ``encode_prompt``."""
    with torch.no_grad():
        if detect_family(pipe) == "sd3":
            states, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
            return states, pooled
        states, pooled, _ = pipe.encode_prompt(prompts, None)
        return states, pooled


def last_word_rows(pipe, prompt: str) -> list[int]:
    """Joint-sequence rows of ``prompt``'s last word (the token before EOS; a T5 run's EOS for '')."""
    return [segment.offset + max(tokenize(segment, [prompt]).lengths[0] - 2, 0) for segment in text_segments(pipe)]


def images(pipe, prompt: str) -> torch.Tensor:
    return pipe([prompt], generator=torch.Generator("cpu").manual_seed(0), output_type="pt", **STEPS).images


@pytest.mark.parametrize(("family", "cls", "layers"), [("sd3", "StableDiffusion3Pipeline", 2), ("flux", "FluxPipeline", 1)])
def test_family_and_model_info(family, cls, layers):
    pipe = tiny(family)
    info = describe(pipe, "<tiny>")
    assert type(pipe).__name__ == cls
    assert (info.family, info.text_embed_dim, info.cross_attention_layers) == (family, 32, layers)
    assert {group: set(weights) for group, weights in map_weights(pipe).items()} == {
        "tokens": {f"transformer.{TOKEN_MAP}"}, "pooled": {f"transformer.{POOLED_MAP}"}
    }


def test_token_rows_are_the_pipelines_own_encoding():
    sd3, flux = tiny("sd3"), tiny("flux")
    assert [(s.name, s.offset, s.length) for s in text_segments(sd3)] == [("clip", 0, 77), ("t5", 77, 256)]
    assert [(s.name, s.offset, s.length) for s in text_segments(flux)] == [("t5", 0, 512)]
    prompts = ["a painting by van gogh", "van gogh"]
    for pipe in (sd3, flux):
        states, _ = encode(pipe, prompts)
        for segment in text_segments(pipe):
            rows, positions = concept_token_embeddings(segment, prompts, "van gogh", "phrase", return_positions=True)
            pieces = [segment.tokenizer.convert_ids_to_tokens(tokenize(segment, [p]).input_ids[0, pos]) for p, pos in zip(prompts, positions)]
            assert all("".join(piece).replace("</w>", " ").replace("\u2581", " ").split() == ["van", "gogh"] for piece in pieces)
            expected = torch.cat([states[i, [segment.offset + p for p in pos]] for i, pos in enumerate(positions)])
            assert torch.equal(rows, expected.float())
    sd3.text_encoder_3 = None  # SD3 without T5: its rows are zeros, only the CLIP run is edited
    assert [s.name for s in text_segments(sd3)] == ["clip"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_uce_maps_the_concept_to_the_guide_then_reverts_exactly(family):
    pipe = tiny(family)
    request = EditRequest(concepts=["van gogh"], guide="art", preserve=["cat", "red house"])
    edit = get_editor("uce")().fit(pipe, request)
    assert edit.family == family and set(edit.module_shapes) == MAPS
    assert set(edit.metadata["closed_form"]["groups"]) == {"tokens", "pooled"}

    states, pooled = encode(pipe, ["van gogh", "art", "cat"])
    concept, guide, kept = last_word_rows(pipe, "van gogh"), last_word_rows(pipe, "art"), last_word_rows(pipe, "cat")
    tokens, text = pipe.transformer.context_embedder, pipe.transformer.time_text_embed.text_embedder.linear_1

    def features():
        with torch.no_grad():
            return tokens(states[0, concept]), tokens(states[2, kept]), text(pooled[0]), text(pooled[2])

    weights = {name: tensor.clone() for name, tensor in pipe.transformer.state_dict().items()}
    concept_before, kept_before, pooled_before, pooled_kept = features()
    target, pooled_target = tokens(states[1, guide]).detach(), text(pooled[1]).detach()
    image, guide_image = images(pipe, "van gogh"), images(pipe, "art")

    edit.apply(pipe)
    concept_after, kept_after, pooled_after, pooled_kept_after = features()
    # the concept's text features now read as the guide's, through both edited maps; the preserved concept's stay
    assert (concept_after - target).norm() < 0.3 * (concept_before - target).norm()
    assert (pooled_after - pooled_target).norm() < 0.3 * (pooled_before - pooled_target).norm()
    assert (kept_after - kept_before).norm() < 0.1 * kept_before.norm()
    assert (pooled_kept_after - pooled_kept).norm() < 0.1 * pooled_kept.norm()
    # the generated concept moves towards the guide's image
    assert (images(pipe, "van gogh") - guide_image).abs().mean() < 0.5 * (image - guide_image).abs().mean()

    edit.revert(pipe)
    assert all(torch.equal(tensor, weights[name]) for name, tensor in pipe.transformer.state_dict().items())
    assert torch.equal(images(pipe, "van gogh"), image)


def test_uce_every_token_to_the_empty_guide_on_flux():
    """Token policy ``all``: each of the prompt's 512 T5 rows maps to the empty prompt's row at the same place."""
    pipe = tiny("flux")
    config = {"token_policy": "all", "erase_scale": 5.0}
    edit = get_editor("uce")(config).fit(pipe, EditRequest(concepts=["cat"], preserve=["red house"]))
    assert edit.params["guide"] == ""
    states, _ = encode(pipe, ["cat", "", "red house"])
    with torch.no_grad():
        before = [pipe.transformer.context_embedder(s) for s in states]
        edit.apply(pipe)
        after = [pipe.transformer.context_embedder(s) for s in states]
    moved = (after[0] - before[1]).norm() / (before[0] - before[1]).norm()
    assert moved < 0.3
    assert moved.item() == pytest.approx(edit.metadata["closed_form"]["groups"]["tokens"]["max_edit_residual"], rel=1e-4)
    assert (after[0][0] - before[1][0]).norm() < 0.05 * (before[0][0] - before[1][0]).norm()  # the word itself
    assert (after[2] - before[2]).norm() < 0.05 * before[2].norm()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_rece_erases_the_embeddings_that_regenerate_the_concept(family):
    """One RECE epoch maps the UCE stage's regenerating embeddings (every token of the concept prompt, and
    its pooled embedding) to the guide, in each group of maps."""
    pipe = tiny(family)
    request = EditRequest(concepts=["van gogh"], guide="art", preserve=["cat"])
    uce, rece = (get_editor("rece")({"epochs": epochs}).fit(pipe, request) for epochs in (0, 1))
    assert set(rece.module_shapes) == MAPS and [s["stage"] for s in rece.metadata["stages"]] == ["uce", "epoch 1"]
    states, pooled = encode(pipe, ["van gogh", "art"])
    weights = {name: w for group in map_weights(pipe).values() for name, w in group.items()}
    for name, concept, guide in ((f"transformer.{TOKEN_MAP}", states[0], states[1]), (f"transformer.{POOLED_MAP}", pooled[:1], pooled[1:])):
        stage = weights[name].double() + _dense(uce, name)
        regenerated = regenerating_embeddings({name: weights[name]}, {name: _dense(uce, name)}, concept, 0.1).double()
        target = guide.double() @ stage.T
        edited = weights[name].double() + _dense(rece, name)
        assert (regenerated @ edited.T - target).norm() < 0.1 * (regenerated @ stage.T - target).norm()


def _dense(edit: Edit, module: str) -> torch.Tensor:
    parts = {key.rsplit(".", 1)[1]: t for key, t in edit.tensors.items() if key.rsplit(".", 1)[0] == module}
    return (parts["delta"] if "delta" in parts else parts["up"] @ parts["down"]).double()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_export_loads_with_diffusers(family, tmp_path):
    pipe = tiny(family)
    edit = get_editor("uce")().fit(pipe, EditRequest(concepts=["van gogh"], guide="art"))
    errors = edit.to_lora(tmp_path / "uce.safetensors")
    assert set(errors) == MAPS and max(errors.values()) < 1e-6
    before = {name: tensor.clone() for name, tensor in pipe.transformer.state_dict().items()}
    edit.apply(pipe)
    expected = {name: tensor.clone() for name, tensor in pipe.transformer.state_dict().items()}

    loaded = tiny(family)
    loaded.load_lora_weights(str(tmp_path / "uce.safetensors"))
    loaded.fuse_lora()
    loaded.unload_lora_weights()
    fused = loaded.transformer.state_dict()
    for name, tensor in expected.items():
        if name.removesuffix(".weight") in {m.removeprefix("transformer.") for m in MAPS}:
            assert not torch.equal(tensor, before[name])
            torch.testing.assert_close(fused[name], tensor, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(fused[name], before[name]), name


#: The architecture support matrix of the built-in editors (README: "Architectures").
SUPPORTS = {
    **dict.fromkeys(("uce", "rece"), {"sd1", "sd2", "sdxl", "sd3", "flux"}),
    **dict.fromkeys(("te-unlearn", "advunlearn"), {"sd1", "sd2"}),  # they train the one CLIP text encoder
    **dict.fromkeys(
        ("realera", "mace-cfr", "mace", "esd", "concept-ablation", "custom-diffusion", "lora", "textual-inversion",
         "t2i-zero", "a-star"),
        {"sd1", "sd2", "sdxl"},
    ),
}


def test_every_editor_declares_its_architectures_and_the_others_refuse_mmdit():
    pipe = tiny("flux")
    builtin = {name: get_editor(name) for name in list_editors()}
    builtin = {n: cls for n, cls in builtin.items() if cls.__module__.startswith(("conceptsmith.erasure", "conceptsmith.customization"))}
    assert all("supports" in vars(cls) for cls in builtin.values()), "every editor sets `supports`"
    assert {name: set(cls.supports) for name, cls in builtin.items()} == SUPPORTS
    for name in sorted(n for n, families in SUPPORTS.items() if "flux" not in families):
        with pytest.raises(UnsupportedArchitectureError) as raised:
            builtin[name]().fit(pipe, EditRequest(concepts=["cat"], tokens=["<cat>"]))
        assert str(raised.value) == f"{name} supports {families_text(builtin[name].supports)}; got FluxPipeline"
    assert families_text(builtin["esd"].supports) == "UNet pipelines (SD 1.x, 2.x, SDXL)"
    assert families_text(builtin["te-unlearn"].supports) == "SD 1.x and SD 2.x pipelines"


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-flux")
    _tiny_flux().save_pretrained(folder)
    return folder


def test_cli_refuses_a_unet_method_on_flux_and_erases_with_uce(flux_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "edit.safetensors"
    refused = runner.invoke(app, ["erase", "-m", str(flux_dir), "--method", "esd", "-c", "cat", "-o", str(out)])
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.strip().splitlines()[-1] == "error: esd supports UNet pipelines (SD 1.x, 2.x, SDXL); got FluxPipeline"
    assert not out.exists()

    done = runner.invoke(app, ["erase", "-m", str(flux_dir), "--method", "uce", "-c", "van gogh", "--guide", "art", "-o", str(out)])
    assert done.exit_code == 0, done.output
    edit = Edit.load(out)
    assert edit.family == "flux" and set(edit.module_shapes) == MAPS
    assert "closed_form.max_edit_residual" in done.stdout


def test_token_positions_need_a_run_of_the_joint_sequence():
    pipe = tiny("flux")  # its first tokenizer is CLIP's, but the T5 run is what the transformer reads first
    with pytest.raises(ValueError, match="text_segments"):
        concept_token_embeddings(pipe, ["van gogh"], "van gogh")
    with pytest.raises(ValueError, match="text_segments"):
        tokenize(pipe, ["van gogh"])
