"""Customization core: reference-image loading, the shared training loop (checkpoints, exact resume,
mixed-precision fallback), new tokens (the custom-tokens hook, diffusers export) and textual inversion."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conceptsmith.config import EditConfig, load_config
from conceptsmith.customization import CustomizationError
from conceptsmith.customization.data import (
    CutMix,
    Examples,
    ZoomOut,
    class_images,
    concept_specs,
    cut_mix_pixels,
    instance_examples,
    load_images,
    side_by_side,
    to_pixels,
    zoomed_out,
)
from conceptsmith.diffusion import denoising_loss
from conceptsmith.edits import Edit, EditError, applied_edits
from conceptsmith.models import fingerprint
from conceptsmith.registry import EditRequest, get_editor
from conceptsmith.train_checkpoints import latest_checkpoint
from conceptsmith.training import TrainingConfig, TrainingError, resolve_mixed_precision, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "customize"


def make_references(folder: Path, count: int = 4, color=(230, 40, 20)) -> Path:
    """``count`` small images of one coloured square on a grey background (the 'concept')."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.full((24, 24, 3), 128, np.uint8)
        pixels[4 + i : 18 + i, 3:17] = color
        Image.fromarray(pixels).save(folder / f"ref{i}.png")
    return folder


@pytest.fixture
def refs(tmp_path) -> Path:
    return make_references(tmp_path / "refs")


def _images(results):
    return [np.asarray(image, dtype=np.float64) for _, _, image in results]


def _generate(pipe, prompts):
    from conceptsmith.generation import generate

    return _images(generate(pipe, prompts, [0], progress=False))


# -- data ---------------------------------------------------------------------------------------------


def test_reference_images_load_with_clear_errors(tmp_path, refs):
    assert len(load_images(refs)) == 4
    assert len(load_images([refs / "ref0.png", refs / "ref1.png"])) == 2
    with pytest.raises(CustomizationError, match="does not exist"):
        load_images(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CustomizationError, match="No images in .*empty"):
        load_images(empty)
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(CustomizationError, match=r"No images in .*notes\.txt"):
        load_images(empty)
    broken = make_references(tmp_path / "broken", count=2)
    (broken / "ref1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(CustomizationError, match=r"Cannot read image .*ref1\.png"):
        load_images(broken)
    with pytest.raises(CustomizationError, match="not an image file"):
        load_images([empty / "notes.txt"])
    pixels = to_pixels(load_images(refs), 16)
    assert pixels.shape == (4, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1


def test_requests_are_checked(refs, tmp_path):
    def specs(**kwargs):
        request = EditRequest(concepts=[], **kwargs)
        return concept_specs(request, phrase_format="{token} {class_word}", need_class_word=True, method="M")

    with pytest.raises(CustomizationError, match="new token"):
        specs(images=[refs], class_words=["dog"])
    with pytest.raises(CustomizationError, match="No reference images"):
        specs(tokens=["<a>"], class_words=["dog"])
    with pytest.raises(CustomizationError, match="class word"):
        specs(tokens=["<a>"], images=[refs])
    with pytest.raises(CustomizationError, match="one folder per token"):
        specs(tokens=["<a>", "<b>"], class_words=["dog"], images=[refs])
    other = make_references(tmp_path / "other", 3)
    both = specs(tokens=["<a>", "<b>"], class_words=["dog", "cat"], images=[refs, other])
    assert [(s.token, s.phrase, len(s.images)) for s in both] == [("<a>", "<a> dog", 4), ("<b>", "<b> cat", 3)]


def test_zoomed_out_copy_pastes_the_image_small_and_masks_exactly_its_latent_cells():
    pixels = to_pixels([Image.fromarray(np.full((32, 32, 3), (250, 10, 10), np.uint8))], 32)[0]
    pixels[:, 0, :] = pixels[:, -1, :] = pixels[:, :, 0] = pixels[:, :, -1] = -1.0  # a black border
    canvas, mask = zoomed_out(pixels, 16, left=3, top=8, factor=8)
    assert canvas.shape == (3, 32, 32) and mask.shape == (1, 4, 4)
    # the 16px copy covers x 3..18 and y 8..23: latent cells fully inside are x in {1}, y in {1, 2}
    assert mask[0].nonzero().tolist() == [[1, 1], [2, 1]]
    assert canvas[0, 12, 10] > 0.9 and canvas[1, 12, 10] < -0.8  # the red inside, shrunk
    assert canvas[:, 0, 0].tolist() == canvas[:, 31, 31].tolist()  # the canvas is one border color
    with pytest.raises(ValueError, match="does not fit"):
        zoomed_out(pixels, 16, left=20, top=0, factor=8)


def test_zoom_out_adds_seeded_masked_copies_with_their_own_phrase(tiny_pipe, refs):
    pipe, _ = tiny_pipe
    images = load_images(refs)
    plain = Examples.from_images(pipe.vae, images, 32, "<z> dog", ("a photo of a {}",), flip=True)
    zoom = ZoomOut(variants=2, scale=(0.4, 0.6), words=("very small",), seed=3)
    zoomed = Examples.from_images(pipe.vae, images, 32, "<z> dog", ("a photo of a {}",), flip=True, zoom=zoom)
    n = len(images) * 2
    cells = tuple(plain.mean.shape[-2:])
    assert plain.mask is None and len(zoomed) == 3 * n and zoomed.mask.shape == (3 * n, 1, *cells)
    assert zoomed.mask[:n].eq(1).all() and 0 < zoomed.mask[n:].sum() < 0.4 * 2 * n * cells[0] * cells[1]
    assert zoomed.phrases[:n] == plain.phrases and set(zoomed.phrases[n:]) == {"very small <z> dog"}
    torch.testing.assert_close(zoomed.mean[:n], plain.mean)
    again = Examples.from_images(pipe.vae, images, 32, "<z> dog", ("a photo of a {}",), flip=True, zoom=zoom)
    assert torch.equal(again.mask, zoomed.mask) and torch.equal(again.mean, zoomed.mean)
    batch = zoomed.sample(6, torch.Generator().manual_seed(0))
    assert batch.mask.shape == (6, 1, *cells) and len(batch.prompts) == 6
    both = batch.cat(plain.sample(2, torch.Generator().manual_seed(0)))
    assert both.mask.shape == (8, 1, *cells) and both.mask[6:].eq(1).all()


def test_masked_denoising_loss_only_sees_the_masked_cells(tiny_pipe):
    from conceptsmith.diffusion import TextConditioner, noise_scheduler

    pipe, _ = tiny_pipe
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    conditioning = TextConditioner.for_pipe(pipe, size=32)(["a dog", "a cat"])
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2, :2] = 1
    loss = lambda lat, m=None: denoising_loss(pipe.unet, noise_scheduler(pipe), lat, conditioning,  # noqa: E731
                                              torch.Generator().manual_seed(1), m)
    full, masked = loss(latents), loss(latents, mask)
    assert not torch.allclose(full, masked)
    changed = latents.clone()
    changed[:, :, 3, 3] += 5.0  # outside the mask: the masked loss cannot see it (the UNet's output there moves)
    outside = loss(changed, mask)
    assert not torch.allclose(loss(changed), full)
    assert torch.allclose(outside, masked, atol=0.5)
    torch.testing.assert_close(loss(latents, torch.ones(2, 1, 4, 4)), full)


def test_zoom_out_options_are_checked():
    from conceptsmith.customization.custom_diffusion import CustomDiffusionConfig

    assert CustomDiffusionConfig().zoom(0) is None
    zoom = CustomDiffusionConfig(zoom_out=2, zoom_out_words=["far away"]).zoom(5)
    assert zoom == ZoomOut(2, (0.4, 0.6), ("far away",), 5)
    with pytest.raises(ValueError, match="zoom_out_scale"):
        CustomDiffusionConfig(zoom_out=1, zoom_out_scale=(0.7, 1.5))


def test_side_by_side_puts_each_image_small_in_its_half_on_its_border_color():
    left = torch.full((3, 32, 32), 0.5)
    left[:, 8:24, 8:24] = -1.0  # a dark square on grey
    right = torch.full((3, 32, 32), -0.25)
    right[0, 4:28, 4:28] = 1.0  # a red square on dark grey
    mixed = side_by_side(left, right)
    assert mixed.shape == (3, 32, 32)
    expected_left = torch.nn.functional.interpolate(left[None], size=(16, 16), mode="bicubic", antialias=True)[0]
    torch.testing.assert_close(mixed[:, 8:24, :16], expected_left.clamp(-1, 1))
    assert torch.equal(mixed[:, :8, :16], torch.full((3, 8, 16), 0.5))  # the left image's border color
    assert torch.equal(mixed[:, 24:, 16:], torch.full((3, 8, 16), -0.25))  # the right image's
    assert mixed[0, 16, 24] > 0.9 and mixed[1, 16, 24] < -0.2  # the red square, centred in the right half
    assert mixed[0, 16, 8] < -0.9  # the dark square, centred in the left half


def test_cut_mix_pairs_every_ordered_pair_of_concepts_with_seeded_references():
    a, b, c = (torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(n)) * 2 - 1 for n in (3, 4, 5))
    mix = CutMix(per_pair=2, relation="{a} left of a {b}", seed=7)
    images, phrases = cut_mix_pixels([a, b, c], ["<a> cup", "<b> hat", "<c> pen"], mix)
    assert images.shape == (12, 3, 16, 16)  # 3 x 2 ordered pairs x 2
    assert phrases[:2] == ["<a> cup left of a <b> hat"] * 2 and phrases[-1] == "<c> pen left of a <b> hat"
    left_halves = {tuple(side_by_side(x, b[0])[:, 4:12, :8].flatten().tolist()) for x in a}
    assert tuple(images[0, :, 4:12, :8].flatten().tolist()) in left_halves  # the left half is one of a's images
    again, _ = cut_mix_pixels([a, b, c], ["<a> cup", "<b> hat", "<c> pen"], mix)
    assert torch.equal(images, again)
    other, _ = cut_mix_pixels([a, b, c], ["<a> cup", "<b> hat", "<c> pen"], CutMix(2, seed=8))
    assert not torch.equal(images, other)
    with pytest.raises(CustomizationError, match="at least two concepts"):
        cut_mix_pixels([a], ["<a> cup"], mix)


def test_cut_mix_joins_a_joint_run_examples(tiny_pipe, refs, tmp_path):
    from conceptsmith.customization.custom_diffusion import CustomDiffusionConfig

    pipe, _ = tiny_pipe
    second = make_references(tmp_path / "second", color=(20, 40, 230))
    request = EditRequest(concepts=[], tokens=["<r>", "<b>"], class_words=["dog", "cat"], images=[refs, second])
    specs = concept_specs(request, phrase_format="{token} {class_word}", need_class_word=True)
    config = CustomDiffusionConfig(cut_mix=3, templates=["a photo of a {}"], flip=False)
    mixed, _ = instance_examples(pipe, specs, config, 32, seed=0)
    plain, _ = instance_examples(pipe, specs, CustomDiffusionConfig(templates=["a photo of a {}"], flip=False), 32, 0)
    assert len(mixed) == len(plain) + 6 and mixed.phrases[: len(plain)] == plain.phrases
    assert mixed.phrases[len(plain) :] == ["<r> dog left of a <b> cat"] * 3 + ["<b> cat left of a <r> dog"] * 3
    assert mixed.mask is None  # a side-by-side image is whole: the loss sees all of it
    with pytest.raises(ValueError, match="cut_mix_relation"):
        CustomDiffusionConfig(cut_mix=1, cut_mix_relation="{a} and friends")
    with pytest.raises(CustomizationError, match="at least two concepts"):
        instance_examples(pipe, specs[:1], config, 32, seed=0)


def test_class_images_come_from_the_model_and_are_cached(tiny_pipe, tmp_path):
    pipe, _ = tiny_pipe
    first = class_images(pipe, "a photo of a dog", 2, seed=3, size=16, cache_dir=tmp_path, progress=False)
    cached = sorted(p.name for p in tmp_path.rglob("*.png"))
    assert cached == ["3.png", "4.png"] and first[0].size == (16, 16)
    again = class_images(pipe, "a photo of a dog", 2, seed=3, size=16, cache_dir=tmp_path, progress=False)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))


# -- the training loop --------------------------------------------------------------------------------


def _toy_run(config: TrainingConfig, seed: int = 0):
    """Linear regression on random batches drawn from the step's generator."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(3, 4))
    target = torch.arange(12, dtype=torch.float32).view(3, 4) / 10

    def loss_fn(step):
        x = torch.randn(8, 4, generator=step.generator)
        return {"loss": ((x @ weight.T - x @ target.T) ** 2).mean(), "norm": weight.norm()}

    result = train({"w": weight}, loss_fn, config, seed=seed, run_key="toy", description="toy")
    return weight.detach().clone(), result


def test_training_loop_learns_checkpoints_and_resumes_bit_exactly(tmp_path):
    base = dict(learning_rate=0.05, progress=False, max_grad_norm=None, eval_batches=0)
    full, result = _toy_run(TrainingConfig(steps=8, **base))
    assert result.losses[-1] < 0.5 * result.losses[0] and len(result.logs["norm"]) == 8

    folder = tmp_path / "ckpt"
    _, first = _toy_run(TrainingConfig(steps=4, checkpoint_dir=str(folder), checkpoint_every=2, **base))
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-0000002.safetensors", "checkpoint-0000004.safetensors"]
    assert latest_checkpoint(folder).name == "checkpoint-0000004.safetensors"
    resumed, second = _toy_run(TrainingConfig(steps=8, checkpoint_dir=str(folder), resume=True, **base))
    assert second.resumed_from == 4 and len(second.losses) == 8
    assert torch.equal(resumed, full)  # same bits as the uninterrupted run
    assert second.losses == result.losses

    with pytest.raises(TrainingError, match="different training run"):
        _toy_run(TrainingConfig(steps=9, checkpoint_dir=str(folder), resume=True, **{**base, "learning_rate": 0.1}))
    with pytest.raises(TrainingError, match="needs a checkpoint_dir"):
        _toy_run(TrainingConfig(steps=2, resume=True, **base))


def _shared_weight_run(step_in_backward: bool, alive: list[int] | None = None):
    """Three parameters, one used twice, AdamW with weight decay, warmup then cosine; ``alive`` records how many
    gradients exist whenever one parameter's gradient is complete."""
    generator = torch.Generator().manual_seed(1)
    params = {name: torch.nn.Parameter(torch.randn(4, 4, generator=generator)) for name in ("a", "b", "c")}
    if alive is not None:
        for p in params.values():  # registered before train's own hooks, so it runs first
            p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params.values())))

    def loss_fn(step):
        x = torch.randn(8, 4, generator=step.generator)
        h = torch.tanh(x @ params["a"]) @ params["b"]
        return ((h @ params["a"]).sin() + h @ params["c"]).pow(2).mean()

    config = TrainingConfig(steps=6, learning_rate=0.05, weight_decay=0.01, lr_schedule="cosine", lr_warmup_steps=2,
                            max_grad_norm=None, eval_batches=0, progress=False, step_in_backward=step_in_backward)
    result = train(params, loss_fn, config, seed=3)
    return {name: p.detach().clone() for name, p in params.items()}, result


def test_stepping_inside_the_backward_pass_frees_gradients_and_changes_no_bit():
    alive_in, alive_after = [], []
    fused, fused_result = _shared_weight_run(True, alive_in)
    plain, plain_result = _shared_weight_run(False, alive_after)
    assert all(torch.equal(fused[name], plain[name]) for name in plain)  # AdamW per parameter: the same bits
    assert fused_result.losses == plain_result.losses
    assert max(alive_in) == 1  # each gradient is stepped and dropped before the next one completes
    assert max(alive_after) == 3  # the usual loop holds every gradient until the optimizer step


def test_stepping_inside_the_backward_pass_refuses_a_bad_loss_before_any_update():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TrainingError, match="became nan"):
        train({"p": p}, lambda step: p.sum() * float("nan"), TrainingConfig(steps=1, max_grad_norm=None, step_in_backward=True,
                                                                                 progress=False))
    assert torch.equal(p.detach(), torch.ones(2))


def test_training_loop_mixed_precision_and_errors():
    with pytest.warns(UserWarning, match="not available on cpu"):
        assert resolve_mixed_precision("fp16", torch.device("cpu")) == "no"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_mixed_precision("auto", torch.device("cpu")) == "no"
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match="does not require grad"):
        train({"p": frozen}, lambda step: frozen.sum(), TrainingConfig(steps=1, progress=False))
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TrainingError, match="became nan.*lower learning_rate"):
        train({"p": p}, lambda step: p.sum() * float("nan"), TrainingConfig(steps=1, progress=False))


# -- tokens and textual inversion -----------------------------------------------------------------------


def test_tokens_already_in_the_vocabulary_are_refused(tiny_pipe, refs):
    pipe, _ = tiny_pipe
    editor = get_editor("textual-inversion")({"steps": 1, "progress": False})
    for token, message in [("dog", "already in the vocabulary"), ("<a b>", "without spaces"), ("", "without spaces")]:
        with pytest.raises(CustomizationError, match=message):
            editor.fit(pipe, EditRequest(concepts=[], tokens=[token], class_words=["dog"], images=[refs]))


def test_textual_inversion_end_to_end(tiny_pipe, refs, tmp_path):
    pipe, _ = tiny_pipe
    before = fingerprint(pipe)
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    tokenizer, embedding = pipe.tokenizer, pipe.text_encoder.get_input_embeddings()
    config = {"steps": 4, "learning_rate": 0.05, "num_vectors": 2, "batch_size": 2, "progress": False, "gradient_checkpointing": True}
    edit = get_editor("textual-inversion")(config).fit(pipe, EditRequest(concepts=[], tokens=["<tex>"], class_words=["dog"], images=[refs]))
    # fit never touches the pipe
    assert fingerprint(pipe) == before and pipe.tokenizer is tokenizer and pipe.text_encoder.get_input_embeddings() is embedding
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags
    training = edit.metadata["training"]
    assert training["eval_loss_end"] < training["eval_loss_start"]
    assert edit.kind == "hook" and edit.hook == "custom-tokens"
    assert set(edit.tensors) == {"text_encoder.<tex>"} and edit.tensors["text_encoder.<tex>"].shape == (2, 32)

    edit = Edit.load(edit.save(tmp_path / "ti.safetensors"))
    prompts = ["a photo of a <tex>", "a photo of a dog"]
    reference = _generate(pipe, prompts[1:])
    edit.apply(pipe)
    assert pipe.tokenizer.tokenize(pipe.maybe_convert_prompt("a <tex>", pipe.tokenizer)) == ["a</w>", "<tex>", "<tex>_1"]
    edited = _generate(pipe, prompts)
    assert np.array_equal(edited[1], reference[0])  # prompts without the token are untouched
    with pytest.raises(EditError, match="already applied"):
        edit.apply(pipe)
    twin = Edit.load(tmp_path / "ti.safetensors")
    with pytest.raises(EditError, match="same content"):  # the same tokens from another file: refused by content
        twin.apply(pipe)
    assert applied_edits(pipe) == [edit]

    # the exported token, loaded by diffusers into a fresh pipe, conditions the UNet identically
    from conceptsmith.customization.textual_inversion import export_embeddings
    from conceptsmith.text import encode_prompts

    ours = encode_prompts(pipe, prompts)
    edit.revert(pipe)
    assert pipe.tokenizer is tokenizer and pipe.text_encoder.get_input_embeddings() is embedding
    assert fingerprint(pipe) == before
    [path] = export_embeddings(edit, tmp_path / "export")
    pipe.load_textual_inversion(str(path))
    torch.testing.assert_close(encode_prompts(pipe, prompts), ours)


def test_textual_inversion_on_sdxl_learns_a_vector_per_encoder(tiny_sdxl_pipe, refs, tmp_path):
    pipe, _ = tiny_sdxl_pipe
    edit = get_editor("textual-inversion")({"steps": 1, "batch_size": 1, "eval_batches": 0, "progress": False}).fit(
        pipe, EditRequest(concepts=[], tokens=["<xl>"], class_words=["dog"], images=[refs])
    )
    assert {k: list(v.shape) for k, v in edit.tensors.items()} == {"text_encoder.<xl>": [1, 32], "text_encoder_2.<xl>": [1, 32]}
    edit.apply(pipe)
    assert pipe.tokenizer_2.tokenize("a <xl>") == ["a</w>", "<xl>"]
    _generate(pipe, ["a photo of a <xl>"])
    edit.revert(pipe)
    from safetensors.torch import load_file

    from conceptsmith.customization.textual_inversion import export_embeddings

    [path] = export_embeddings(edit, tmp_path)

    assert set(load_file(path)) == {"clip_l", "clip_g"}


def test_shipped_customize_configs_validate_against_their_editors():
    from conceptsmith.config import validate

    names = set()
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = load_config(path, EditConfig)
        editor = get_editor(config.method)
        validate(config.params, editor.Config, source=str(path))
        names.add(config.method)
    assert {"custom-diffusion", "lora", "textual-inversion", "t2i-zero", "a-star"} <= names


def test_conditioning_ceiling_fits_the_whole_conditioning_and_leaves_the_pipe_alone(tiny_pipe, tiny_sdxl_pipe, refs):
    from conceptsmith.customization.conditioning_ceiling import CeilingConfig, invert_conditioning
    from conceptsmith.customization.data import default_resolution
    from conceptsmith.diffusion import Conditioning, noise_scheduler
    from conceptsmith.text import encode_prompts

    pipe, _ = tiny_pipe
    before = fingerprint(pipe)
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    config = CeilingConfig(steps=40, learning_rate=0.05, batch_size=4, progress=False)
    states = invert_conditioning(pipe, [refs], "dog", config)
    initial = encode_prompts(pipe, ["a picture of a dog"])
    assert states.shape == initial.shape and not states.requires_grad
    assert fingerprint(pipe) == before and [p.requires_grad for p in pipe.unet.parameters()] == flags
    # the inverted conditioning denoises the references better than the prompt it started from (same noise draws)
    examples = Examples.from_images(pipe.vae, load_images(refs), default_resolution(pipe), "dog", flip=True)

    def loss(conditioning):
        expanded = Conditioning(conditioning.expand(len(examples), -1, -1))
        return float(denoising_loss(pipe.unet, noise_scheduler(pipe), examples.mean, expanded, torch.Generator().manual_seed(3)).mean())

    with torch.no_grad():
        assert loss(states) < loss(initial)
    with pytest.raises(CustomizationError, match="one text encoder"):
        invert_conditioning(tiny_sdxl_pipe[0], [refs], "dog", config)
