"""Text-encoder erasers: few-shot unlearning (``te-unlearn``) and AdvUnlearn (``advunlearn``).

Their losses against hand-computed values on the tiny pipeline, the direction a few steps move them, the Edit
(save / load / apply / bit-exact revert / diffusers LoRA export), the errors, the soft-prefix encoding they
use, and the measured claim on builtin:shapes: after erasing "skull" its prompt's text states move away
while a preserved shape's stay close."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from test_customization import make_references

from conceptsmith.diffusion import (
    Conditioning,
    DenoisingObjective,
    TextConditioner,
    denoising_loss,
    noise_scheduler,
    predict,
)
from conceptsmith.edits import Edit
from conceptsmith.erasure._trained import TextEncoderTraining
from conceptsmith.erasure.advunlearn import AdvUnlearnConfig, AdvUnlearnObjective
from conceptsmith.erasure.esd import esd_target
from conceptsmith.erasure.te_unlearn import AscentObjective, TEUnlearnConfig
from conceptsmith.models import fingerprint
from conceptsmith.registry import EditRequest, UnsupportedArchitectureError, get_editor
from conceptsmith.text import encode_prompts
from conceptsmith.token_positions import encode_with_embeddings, prefix_slot_ids
from conceptsmith.training import TrainingError, TrainStep, train

FAST = {"progress": False}
ADV_FAST = {**FAST, "trajectories": 2, "retain_trajectories": 2, "ddim_steps": 3, "retain_prompts": ["a photo of a dog", "a cat"]}


@pytest.fixture
def refs(tmp_path):
    return make_references(tmp_path / "refs")


def _state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for component in (pipe.unet, pipe.text_encoder) for k, v in component.state_dict().items()}


def _unchanged(pipe, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in _state(pipe).items())


def _draw(seed: int) -> TrainStep:
    return TrainStep(0, 0, torch.Generator().manual_seed(seed), torch.device("cpu"))


# -- the soft-prefix encoding ---------------------------------------------------------------------------------


def test_encode_with_embeddings_equals_the_prompt_with_those_words(tiny_pipe):
    pipe, _ = tiny_pipe
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids, positions = prefix_slot_ids(tokenizer, ["a photo of a square"], 2)
    assert positions == [1, 2] and ids.shape == (1, 77) and ids[0, 1:3].tolist() == [tokenizer.bos_token_id] * 2
    words = tokenizer("red blue", add_special_tokens=False)["input_ids"]
    vectors = encoder.get_input_embeddings().weight[words].detach().clone().requires_grad_(True)
    with torch.no_grad():
        expected = encoder(tokenizer(["red blue a photo of a square"], padding="max_length", max_length=77,
                                     return_tensors="pt").input_ids)[0]
    out = encode_with_embeddings(encoder, ids, positions, vectors)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)
    out[0].sum().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert not encoder.get_input_embeddings()._forward_hooks  # the hook is gone
    long_ids, _ = prefix_slot_ids(tokenizer, [" ".join(["word"] * 80)], 3)
    assert long_ids[0, -1] == tokenizer.eos_token_id  # a cut prompt keeps its EOS
    with pytest.raises(ValueError, match="one vector per position"):
        encode_with_embeddings(encoder, ids, positions, vectors[:1])


# -- te-unlearn -----------------------------------------------------------------------------------------------


def _ascent(pipe, refs, max_loss):
    from conceptsmith.customization.data import Examples, load_images

    config = TEUnlearnConfig(**FAST)
    run = TextEncoderTraining(pipe, config, 0)
    examples = Examples.from_images(pipe.vae, load_images(refs), 16, "square", config.templates)
    descent = DenoisingObjective(pipe.unet, noise_scheduler(pipe), run.conditioner, examples, None, 2)
    return AscentObjective(descent, max_loss), examples


def test_ascent_loss_is_the_negated_denoising_loss_capped_per_example(tiny_pipe, refs):
    pipe, _ = tiny_pipe
    objective, examples = _ascent(pipe, refs, None)
    generator = torch.Generator().manual_seed(5)  # the same draws by hand, through the pipe's own text encoder
    batch = examples.sample(2, generator)
    losses = denoising_loss(pipe.unet, noise_scheduler(pipe), batch.latents, TextConditioner.for_pipe(pipe)(batch.prompts), generator)
    out = objective(_draw(5))
    torch.testing.assert_close(out["loss"], -losses.mean())
    cap = float(losses.detach().min())  # one example at the cap, the other above it
    objective.max_loss = cap
    capped = objective(_draw(5))
    torch.testing.assert_close(capped["loss"], -torch.tensor(cap))
    assert float(capped["capped"]) == 1.0 and float(capped["denoising"]) == pytest.approx(float(losses.detach().mean()))


def test_te_unlearn_raises_the_concept_loss_and_round_trips(tiny_pipe, refs, tmp_path):
    pipe, _ = tiny_pipe
    before, state = fingerprint(pipe), _state(pipe)
    config = {**FAST, "steps": 6, "learning_rate": 1e-2, "max_loss": None}
    edit = get_editor("te-unlearn")(config).fit(pipe, EditRequest(concepts=["square"], images=[refs]))
    assert fingerprint(pipe) == before and _unchanged(pipe, state)  # fit left the pipe alone
    training = edit.metadata["training"]
    assert training["eval_loss_end"] > training["eval_loss_start"]  # ascent: the concept's images denoise worse
    assert edit.kind == "lora" and edit.metadata["images"] == [str(refs)]
    modules = set(edit.module_shapes)
    assert all(m.startswith("text_encoder.") for m in modules)
    assert {m.rsplit(".", 2)[-2] + "." + m.rsplit(".", 1)[-1] for m in modules} == {
        "mlp.fc1", "mlp.fc2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"}
    assert all(".layers.1.self_attn." in m for m in modules if "self_attn" in m)  # the last layer's attention only

    base = encode_prompts(pipe, ["square"])
    edit = Edit.load(edit.save(tmp_path / "te.safetensors"))
    edit.apply(pipe)
    edited = encode_prompts(pipe, ["square"])
    assert not torch.allclose(edited, base)
    edit.revert(pipe)
    assert _unchanged(pipe, state)

    from safetensors.torch import load_file

    from conceptsmith.customization.lora import export_diffusers

    written = export_diffusers(edit, tmp_path / "export")
    assert all(k.startswith("text_encoder.text_model.") for k in load_file(written["lora"]))
    pipe.load_lora_weights(str(written["lora"]))
    torch.testing.assert_close(encode_prompts(pipe, ["square"]), edited, rtol=1e-4, atol=1e-4)


def test_te_unlearn_full_weights_and_preservation(tiny_pipe, refs, tmp_path):
    pipe, _ = tiny_pipe
    state = _state(pipe)
    config = {**FAST, "mode": "full", "steps": 3, "learning_rate": 1e-3, "preserve_weight": 1.0, "eval_batches": 0}
    edit = get_editor("te-unlearn")(config).fit(pipe, EditRequest(concepts=["square"], images=[refs], preserve=["dog"]))
    assert edit.kind == "weights" and set(edit.metadata["logs"]) == {"denoising", "capped", "preserve"}
    assert edit.metadata["logs"]["preserve"][0] < 1e-12  # nothing has moved at the first step
    assert _unchanged(pipe, state)
    edit.apply(pipe)
    edited = encode_prompts(pipe, ["square"])
    edit.revert(pipe)
    assert _unchanged(pipe, state)
    errors = edit.to_lora(tmp_path / "full.safetensors")
    assert errors and all(m.startswith("text_encoder.") for m in errors) and max(errors.values()) < 1e-5
    pipe.load_lora_weights(str(tmp_path / "full.safetensors"))
    torch.testing.assert_close(encode_prompts(pipe, ["square"]), edited, rtol=1e-4, atol=1e-4)


def test_te_unlearn_errors(tiny_pipe, tiny_sdxl_pipe, refs, tmp_path):
    pipe, _ = tiny_pipe
    editor = get_editor("te-unlearn")
    with pytest.raises(TrainingError, match="images of the concept"):
        editor(FAST).fit(pipe, EditRequest(concepts=["square"]))
    with pytest.raises(TrainingError, match="one folder per concept"):
        editor(FAST).fit(pipe, EditRequest(concepts=["square", "dog"], images=[refs, refs, refs]))
    with pytest.raises(TrainingError, match="does not exist"):
        editor(FAST).fit(pipe, EditRequest(concepts=["square"], images=[tmp_path / "missing"]))
    with pytest.raises(TrainingError, match="preserved concepts"):
        editor({**FAST, "preserve_weight": 1.0}).fit(pipe, EditRequest(concepts=["square"], images=[refs]))
    with pytest.raises(UnsupportedArchitectureError, match=r"^te-unlearn supports SD 1\.x and SD 2\.x pipelines; got StableDiffusionXLPipeline$"):
        editor(FAST).fit(tiny_sdxl_pipe[0], EditRequest(concepts=["square"], images=[refs]))
    with pytest.raises(ValidationError, match="learning_rat"):
        editor({"learning_rat": 1e-3})
    with pytest.raises(ValidationError, match="steps"):
        editor({"steps": 0})


def test_te_unlearn_draws_its_own_images_when_asked(tiny_pipe, tmp_path):
    pipe, _ = tiny_pipe
    edit = get_editor("te-unlearn")({**FAST, "steps": 1, "generate_images": 2, "eval_batches": 0}).fit(
        pipe, EditRequest(concepts=["square"]))
    assert edit.metadata["images"] == ["generated: '{}' x 2".format("square")]


# -- advunlearn -----------------------------------------------------------------------------------------------


def _adv(pipe, **params):
    config = AdvUnlearnConfig(**{**ADV_FAST, **params})
    run = TextEncoderTraining(pipe, config, 0)
    return run, AdvUnlearnObjective(run, config, ["square"], seed=0), config


def test_advunlearn_losses_by_hand(tiny_pipe):
    pipe, _ = tiny_pipe
    run, objective, config = _adv(pipe, adv_tokens=2, negative_guidance=2.0)
    retain = objective.retain_runs.sample(torch.Generator().manual_seed(1), 1)
    assert float(objective.retain_loss(retain).detach()) == 0.0  # nothing trained yet: the trained and frozen models agree

    draws = objective.concept_runs.sample(torch.Generator().manual_seed(2), 1)
    (_, x, t, _), = draws
    cond, uncond = (Conditioning(encode_prompts(pipe, [p])) for p in ("square", ""))
    target = esd_target(predict(pipe.unet, x, t, uncond), predict(pipe.unet, x, t, cond), 2.0)
    ids, positions = prefix_slot_ids(pipe.tokenizer, ["square"], 2)
    attacked = Conditioning(encode_with_embeddings(pipe.text_encoder, ids, positions, objective.prefix)[0])
    expected = F.mse_loss(predict(pipe.unet, x, t, attacked), target)
    torch.testing.assert_close(objective.unlearn_loss(draws), expected, rtol=1e-5, atol=1e-7)
    square = pipe.tokenizer("square", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(objective.prefix, pipe.text_encoder.get_input_embeddings().weight[square * 2])

    def attack_loss() -> float:  # the attack's objective by hand: the attacked prompt vs the frozen model on the clean prompt
        with torch.no_grad():
            return float(F.mse_loss(predict(pipe.unet, x, t, objective.attacked([0], objective.prefix)),
                                    predict(pipe.unet, x, t, cond)))

    start = attack_loss()
    objective.config = config.model_copy(update={"attack_steps": 5})
    objective.attack(draws)
    assert attack_loss() < start


def test_advunlearn_steps_lower_the_objective(tiny_pipe):
    pipe, _ = tiny_pipe
    run, objective, config = _adv(pipe, attack_steps=0)
    concept = objective.concept_runs.sample(torch.Generator().manual_seed(3), 2)

    def total() -> float:
        with torch.no_grad():
            return float(objective.unlearn_loss(concept))

    start = total()
    train(run.trainable.named_parameters(), objective, config.model_copy(update={"steps": 8, "learning_rate": 1e-2}))
    assert total() < start


def test_advunlearn_edit_round_trips_and_leaves_the_pipe(tiny_pipe, tmp_path):
    pipe, _ = tiny_pipe
    before, state = fingerprint(pipe), _state(pipe)
    params = {**ADV_FAST, "steps": 4, "learning_rate": 1e-2, "attack_steps": 2, "attack_every": 2}
    edit = get_editor("advunlearn")(params).fit(pipe, EditRequest(concepts=["square"]))
    assert fingerprint(pipe) == before and _unchanged(pipe, state)
    assert set(edit.metadata["logs"]) == {"unlearn", "retain", "attack"} and edit.metadata["logs"]["retain"][0] == 0.0
    assert edit.params["prompts"] == ["square"] and edit.params["gamma"] == 0.3
    training = edit.metadata["training"]
    assert training["eval_loss_end"] < training["eval_loss_start"]  # the objective on fixed draws went down
    edit = Edit.load(edit.save(tmp_path / "adv.safetensors"))
    edit.apply(pipe)
    edited = encode_prompts(pipe, ["square"])
    edit.revert(pipe)
    assert _unchanged(pipe, state)
    errors = edit.to_lora(tmp_path / "adv-lora.safetensors")
    assert errors and all(m.startswith("text_encoder.") for m in errors)
    pipe.load_lora_weights(str(tmp_path / "adv-lora.safetensors"))
    torch.testing.assert_close(encode_prompts(pipe, ["square"]), edited, rtol=1e-4, atol=1e-4)


def test_advunlearn_errors(tiny_pipe, tiny_sdxl_pipe):
    editor = get_editor("advunlearn")
    with pytest.raises(UnsupportedArchitectureError, match=r"^advunlearn supports SD 1\.x and SD 2\.x pipelines; got StableDiffusionXLPipeline$"):
        editor(ADV_FAST).fit(tiny_sdxl_pipe[0], EditRequest(concepts=["square"]))
    with pytest.raises(TrainingError, match="concept"):
        editor(ADV_FAST).fit(tiny_pipe[0], EditRequest(concepts=[" "]))
    with pytest.raises(ValidationError, match="gama"):
        editor({"gama": 0.3})
    with pytest.raises(ValidationError, match="retain_prompts"):
        editor({"retain_prompts": []})


# -- the measured claim on builtin:shapes ---------------------------------------------------------------------

SHAPES = ["circle", "square", "triangle", "star", "heart"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, one_thread):
    from conceptsmith.evaluation.evaluators import load_evaluator
    from conceptsmith.models import load_pipeline
    from conceptsmith.world.render import reference_set

    folder = tmp_path_factory.mktemp("skulls")
    for i, sample in enumerate(reference_set("skull", n=8)):
        sample.pil().save(folder / f"skull{i}.png")
    pipe, evaluator = load_pipeline("builtin:shapes")[0], load_evaluator("builtin:shapes-clip")
    base = _judged(pipe, evaluator)
    assert base[0] >= 0.75 and base[1:] == [1.0, 1.0], base  # the unedited model draws skulls (the test can fail)
    return pipe, folder, evaluator, base


PROBES = ["a picture of a skull", "a picture of a circle", "a picture of a cross"]


def _judged(pipe, evaluator) -> list[float]:
    """Per probe prompt, the share of 4 generated images (seeds 0-3) the evaluator names as the prompt's shape."""
    from conceptsmith.generation import generate

    classes = ["skull", *SHAPES, "cross"]
    images = [image for _, _, image in generate(pipe, PROBES, [0, 1, 2, 3], progress=False)]
    names = [classes[i] for i in evaluator.classify(images, classes, ["a picture of a {}"]).logits.argmax(-1).tolist()]
    return [sum(n == p.rsplit(" ", 1)[-1] for n in names[4 * i : 4 * i + 4]) / 4 for i, p in enumerate(PROBES)]


def _measured(shapes, edit) -> tuple[list[float], list[float]]:
    """Cosine of the edited vs original text states of the probes, and the probes' judged images when edited."""
    pipe, _, evaluator, _ = shapes
    base = encode_prompts(pipe, PROBES).flatten(1)
    edit.apply(pipe)
    try:
        return F.cosine_similarity(encode_prompts(pipe, PROBES).flatten(1), base).tolist(), _judged(pipe, evaluator)
    finally:
        edit.revert(pipe)


def test_te_unlearn_erases_skull_from_builtin_shapes(shapes):
    """With these settings, images generated from the edited model (4 seeds, judged by builtin:shapes-clip) showed
    skulls 0.75 -> 0.00 and the preserved shapes 1.00 -> 1.00; without ``preserve_weight`` the ascent moves every
    prompt alike on this small encoder."""
    pipe, skulls, _, _ = shapes
    params = {**FAST, "steps": 60, "learning_rate": 1e-2, "preserve_weight": 1.0}
    edit = get_editor("te-unlearn")(params).fit(pipe, EditRequest(concepts=["skull"], images=[skulls], preserve=SHAPES))
    (skull, circle, cross), judged = _measured(shapes, edit)
    assert skull < 0.3 and circle > 0.9 and cross > 0.9, (skull, circle, cross)
    assert judged[0] <= 0.25 and judged[1:] == [1.0, 1.0], judged


def test_advunlearn_erases_skull_from_builtin_shapes(shapes):
    pipe = shapes[0]
    params = {**FAST, "steps": 50, "learning_rate": 2e-3, "ddim_steps": 10, "trajectories": 4, "attack_steps": 3,
              "attack_every": 2, "retain_prompts": [f"a picture of a {s}" for s in SHAPES]}
    edit = get_editor("advunlearn")(params).fit(pipe, EditRequest(concepts=["skull"]))
    (skull, circle, cross), judged = _measured(shapes, edit)
    assert skull < circle - 0.03 and circle > 0.95 and cross > 0.95, (skull, circle, cross)
    assert judged[0] <= 0.25 and min(judged[1:]) >= 0.75, judged  # measured: [0.0, 0.75, 1.0]
