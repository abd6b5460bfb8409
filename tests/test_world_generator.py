"""The shipped ShapesWorld generator: loads through load_pipeline and draws what it is asked (fast subset of `world check`)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conceptsmith.world.pipeline import PIPE_DIR

WORLD_WEIGHTS = PIPE_DIR.parent


@pytest.fixture(scope="module")
def shapes():
    from conceptsmith.models import load_pipeline

    torch.set_num_threads(2)
    return load_pipeline("builtin:shapes")


def test_builtin_shapes_is_a_stable_diffusion_pipeline(shapes):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe, info = shapes
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert info.family == "sd1"
    assert info.text_embed_dim == pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim
    assert info.cross_attention_layers >= 6
    assert pipe.unet.dtype == torch.float32  # stored in fp16, loaded in the dtype asked for
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.latent_channels == 4
    # cross-attention at >= 2 resolutions
    attn_blocks = [b for b in (*pipe.unet.down_blocks, *pipe.unet.up_blocks) if hasattr(b, "attentions")]
    assert len(attn_blocks) >= 2
    # the tokenizer gives OpenAI CLIP ids (open_clip's tokenizer is the reference)
    from open_clip.tokenizer import SimpleTokenizer

    text = "a red circle by Velmora Quistbright"
    ref = SimpleTokenizer()
    assert pipe.tokenizer(text).input_ids == [ref.sot_token_id, *ref.encode(text), ref.eot_token_id]
    assert pipe.conceptsmith_defaults["height"] == 64


def test_world_train_defaults_build_the_shipped_unet(shapes):
    """`conceptsmith world train` reproduces the shipped architecture: cross-attention at 16x16, 8x8 and 4x4."""
    from conceptsmith.world.unet_train import UNetTrainConfig, unet_config

    pipe, info = shapes
    recipe = unet_config(pipe.text_encoder.config.hidden_size, UNetTrainConfig().attention_16)
    for key, value in recipe.items():
        assert pipe.unet.config[key] == (list(value) if isinstance(value, tuple) else value), key
    assert info.cross_attention_layers == 10


def test_shipped_weights_fit_the_budget():
    total = sum(f.stat().st_size for f in WORLD_WEIGHTS.rglob("*") if f.is_file())
    assert total <= 40 * 2**20, f"ShapesWorld weights are {total / 2**20:.1f} MB (> 40 MB)"
    assert json.loads((PIPE_DIR / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_generates_64px_images_deterministically(shapes):
    from conceptsmith.generation import GenerationSettings, generate

    pipe, _ = shapes
    settings = GenerationSettings(num_inference_steps=8, guidance_scale=5.0, height=64, width=64, batch_size=2)
    a = generate(pipe, ["a red star"], [3], settings, progress=False)[0][2]
    b = generate(pipe, ["a red star"], [3], settings, progress=False)[0][2]
    assert a.size == (64, 64)
    assert list(a.getdata()) == list(b.getdata())


@pytest.fixture(scope="module")
def fast_check(shapes):
    """A fast subset of `conceptsmith world check`: shape, color, artist and indirect restricted prompts
    (held-out templates), 2 seeds each."""
    from conceptsmith.world.check import run_check

    pipe, _ = shapes
    return run_check(seeds=2, metrics=("shape", "color", "artist", "restricted_indirect"), include_eval=False, pipe=pipe,
                     progress=False)


# Measured by `conceptsmith world check --seeds 8` on the shipped weights (2026-11-22): gen_shape_acc 0.925,
# gen_color_acc 1.00, gen_restricted_indirect_rate 0.875, gen_artist_acc 0.81 (bars 0.90 / 0.85 / 0.70 / 0.80,
# asserted with a margin for 2 seeds). This 2-seed subset measured 0.95 / 1.00 / 0.92 / 0.83.
SHAPE_BAR, COLOR_BAR, RESTRICTED_BAR, ARTIST_BAR = 0.80, 0.75, 0.60, 0.58


def test_world_check_fast_subset(fast_check):
    assert fast_check["gen_shape_acc"] >= SHAPE_BAR, fast_check
    assert fast_check["gen_color_acc"] >= COLOR_BAR, fast_check
    assert fast_check["gen_restricted_indirect_rate"] >= RESTRICTED_BAR, fast_check
    assert fast_check["gen_artist_acc"] >= ARTIST_BAR, fast_check


def test_vae_reconstructs_colors_without_a_tint(shapes):
    """The decoder must keep colors: trained on 32x32 crops its GroupNorm statistics differed from full-size
    decoding and every background came back tinted (up to 20/255) - fixed by the full-size decoder fine-tune."""
    import numpy as np

    from conceptsmith.world import render as R
    from conceptsmith.world.vae_train import to_tensor

    pipe, _ = shapes
    labels = [R.sample_labels(np.random.default_rng((9, s)), n_objects=1, artist=None) for s in range(48)]
    pixels = to_tensor(np.stack([R.render_scene(lab, seed=s) for s, lab in enumerate(labels)]))
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    shift = (recon - pixels).mean(dim=(2, 3)) * 127.5  # per image and channel, in 0-255 units
    for background in {lab["background"] for lab in labels}:
        rows = torch.tensor([lab["background"] == background for lab in labels])
        assert shift[rows].mean(0).abs().max() < 6.0, (background, shift[rows].mean(0))
    psnr = 10 * torch.log10(4.0 / (recon - pixels).pow(2).mean())
    assert psnr > 22.0, psnr


def _tiny_unet(down: tuple[str, ...], up: tuple[str, ...]):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, down_block_types=down,
                                up_block_types=up, block_out_channels=(16, 32), layers_per_block=1,
                                norm_num_groups=8, cross_attention_dim=16, attention_head_dim=2)


def test_grown_unet_starts_as_the_smaller_one_and_rejects_misfits():
    from conceptsmith.world.unet_train import grow_from

    small = _tiny_unet(("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D"))
    grown = _tiny_unet(("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.randn(2, 7, 16)
    with torch.no_grad():
        before = grown(x, t, cond).sample
        new_blocks = grow_from(grown, small.state_dict())
        assert new_blocks == ["down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
        assert torch.equal(grown(x, t, cond).sample, small(x, t, cond).sample)
        assert not torch.allclose(before, small(x, t, cond).sample)  # the grown model was different before
    wider = _tiny_unet(("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D"))
    wider.conv_in = torch.nn.Conv2d(4, 8, 3, padding=1)
    with pytest.raises(ValueError, match="do not fit"):
        grow_from(grown, wider.state_dict())


def test_matmul_attention_computes_what_the_fused_kernel_does():
    """Training swaps SDPA for plain matmul attention (faster backward on CPU); values and gradients agree."""
    from diffusers.models.attention_processor import AttnProcessor

    from conceptsmith.world.unet_train import use_matmul_attention

    torch.manual_seed(0)
    fused = _tiny_unet(("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    matmul = _tiny_unet(("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    matmul.load_state_dict(fused.state_dict())
    use_matmul_attention(matmul)
    assert {type(p) for p in matmul.attn_processors.values()} == {AttnProcessor}
    assert not any(isinstance(p, AttnProcessor) for p in fused.attn_processors.values())
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.randn(2, 7, 16)
    outs = []
    for model in (fused, matmul):
        out = model(x, t, cond).sample
        out.pow(2).mean().backward()
        outs.append((out.detach(), model.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.grad))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5)
    assert outs[0][1].abs().max() > 0


def test_offset_noise_moves_channel_means_only_when_asked():
    from conceptsmith.world.unet_train import training_noise

    plain = training_noise((64, 4, 8, 8), 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn((64, 4, 8, 8), generator=torch.Generator().manual_seed(0)))
    offset = training_noise((64, 4, 8, 8), 0.5, torch.Generator().manual_seed(0))
    # per-(image, channel) means: std 1/8 for white noise, sqrt(1/64 + 0.25) ~ 0.52 with the offset
    assert plain.mean(dim=(2, 3)).std() < 0.2 < 0.35 < offset.mean(dim=(2, 3)).std()
    within = offset - offset.mean(dim=(2, 3), keepdim=True)  # the offset is constant over each channel
    assert abs(float(within.std()) - 1.0) < 0.05


def test_text_binding_cosines_compare_the_tokens_that_differ(tiny_pipe):
    import torch.nn.functional as F

    from conceptsmith.text import encode_prompts
    from conceptsmith.world.check import text_binding_cosines

    tiny_pipe, _ = tiny_pipe
    a, b = "a red circle left of a blue star", "a red circle right of a blue star"
    got = text_binding_cosines(tiny_pipe, {"relation": [(a, b)]})
    ids = tiny_pipe.tokenizer([a, b], padding="max_length", max_length=77, return_tensors="pt").input_ids
    first = int((ids[0] != ids[1]).nonzero()[0])  # "left" / "right"
    eos = int((ids[0] == tiny_pipe.tokenizer.eos_token_id).nonzero()[0])
    states = encode_prompts(tiny_pipe, [a, b])
    want = F.cosine_similarity(states[0, first : eos + 1], states[1, first : eos + 1], dim=-1).mean()
    assert got == {"text_relation_cos": round(float(want), 4)}
    assert got["text_relation_cos"] < 0.999  # a random encoder does tell the two apart


def test_a_candidate_directory_is_checked_with_the_shipped_sampling_defaults():
    """`world check --model DIR` must sample a candidate exactly as it samples builtin:shapes (a bare directory
    would otherwise get the library-wide 30 steps / guidance 7.5 and its numbers would not be comparable)."""
    from conceptsmith.generation import default_settings
    from conceptsmith.models import load_pipeline
    from conceptsmith.world.check import load_generator

    bare, _ = load_pipeline(str(PIPE_DIR))
    builtin, _ = load_pipeline("builtin:shapes")
    assert default_settings(bare) != default_settings(builtin)  # what the helper is for
    assert default_settings(load_generator(str(PIPE_DIR))) == default_settings(builtin)


def test_a_fitted_schedule_ends_by_the_deadline_and_never_exceeds_the_recipe():
    from conceptsmith.world.unet_train import DEADLINE_RESERVE_S, UNetTrainConfig, _lr_at, fit_schedule

    # 1000 s left at 0.5 s per step: 2 steps per second, minus the reserve kept for the final export
    assert fit_schedule(200, 0.5, 1000.0, cap=8500) == 200 + int((1000 - DEADLINE_RESERVE_S) / 0.5)
    assert fit_schedule(200, 0.5, 1e6, cap=8500) == 8500  # time to spare: the recipe's length, not more
    assert fit_schedule(200, 0.5, 10.0, cap=8500) == 201  # past the deadline: stop after the next step
    # the UNet speeds up when the evaluator's core frees: the plan grows, and the cosine barely moves
    cfg = UNetTrainConfig()
    slow, fast = fit_schedule(500, 1.0, 5000.0, cfg.steps), fit_schedule(500, 0.6, 5000.0, cfg.steps)
    assert slow < fast <= cfg.steps
    assert abs(_lr_at(cfg, 500, slow) - _lr_at(cfg, 500, fast)) < 0.02 * cfg.lr
    assert _lr_at(cfg, fast, fast) == pytest.approx(0.1 * cfg.lr)  # fully decayed at the planned end
    assert _lr_at(cfg, 500) == _lr_at(cfg, 500, cfg.steps)


def test_model_card_records_the_recipe_the_clock_and_the_bars(monkeypatch, tmp_path):
    """The card is written beside the weights from the training cache: a schedule fitted to the budget names its
    planned steps (and how to replay them), the training clock is listed, and every measured bar says pass or MISS."""
    import shutil

    from conceptsmith.world import stage_clock
    from conceptsmith.world.card import write_model_card

    monkeypatch.setenv("CONCEPTSMITH_CACHE", str(tmp_path / "cache"))
    pipe_dir = tmp_path / "weights" / "shapes-sd"
    for part in ("unet", "vae", "text_encoder"):
        (pipe_dir / part).mkdir(parents=True)
        shutil.copy(PIPE_DIR / part / "config.json", pipe_dir / part / "config.json")
    stage_clock.clock_dir().mkdir(parents=True)
    stage_clock._write(stage_clock.clock_dir() / "wall-1-1.json", stage_clock.WALL, 8940.0)
    progress = {"config": {"steps": 8500, "ema_decay": 0.998}, "step": 7310, "train_minutes": 80.2, "params": 7,
                "planned_steps": 7310, "fitted_to_deadline": True}
    (stage_clock.clock_dir().parent / "unet_progress_s0.json").write_text(json.dumps(progress))
    card = write_model_card({"seeds": 8, "gen_shape_acc": 0.95, "gen_two_object_acc": 0.3}, pipe_dir=pipe_dir)
    text = card.read_text()
    assert card == pipe_dir / "MODEL_CARD.md"
    assert "7310 steps planned" in text and "--unet-steps 7310" in text
    assert "149.0 min (within the 2.5 h budget" in text
    assert "| gen_shape_acc | 0.95 | >= 0.9 | pass |" in text and "| gen_two_object_acc | 0.3 | >= 0.4 | MISS |" in text


def test_unet_training_past_its_deadline_stops_at_the_next_plan_and_records_it(monkeypatch, tmp_path):
    """train_unet with a deadline already past: the first re-plan (step 50) ends the schedule one step later, the
    checkpoint keeps the plan, and the progress file says the schedule was fitted. The shipped pipeline is copied,
    since training exports its UNet into the directory it trains from."""
    import shutil

    from conceptsmith.world.unet_train import UNetTrainConfig, train_unet

    monkeypatch.setenv("CONCEPTSMITH_CACHE", str(tmp_path / "cache"))
    pipe_dir = tmp_path / "shapes-sd"
    shutil.copytree(PIPE_DIR, pipe_dir)
    cfg = UNetTrainConfig(pool_size=16, steps=400, batch_size=2, warmup=10, threads=1, checkpoint_every_s=1e9)
    _, steps = train_unet(cfg, pipe_dir=pipe_dir, progress=False, deadline=time.time() - 1.0)
    assert steps == 51
    progress = json.loads((tmp_path / "cache" / "world" / "unet_progress_s0.json").read_text())
    assert (progress["step"], progress["planned_steps"], progress["fitted_to_deadline"], progress["final"]) == (
        51, 51, True, True)
