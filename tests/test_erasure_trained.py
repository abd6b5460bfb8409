"""The trained erasers ESD and Concept Ablation, and the core pieces they train with (tiny random models)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from conceptsmith.diffusion import FrozenTrajectories, TextConditioner, predict
from conceptsmith.edits import Edit, compose
from conceptsmith.erasure._trained import unet_modules
from conceptsmith.erasure.concept_ablation import ablation_loss
from conceptsmith.erasure.esd import esd_target
from conceptsmith.registry import EditRequest, get_editor
from conceptsmith.trainable import TrainableModules, select_modules
from conceptsmith.training import TrainingError

FAST = {"steps": 6, "trajectories": 2, "ddim_steps": 4, "learning_rate": 1e-3, "progress": False}


def unet_state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def same_state(pipe, state) -> bool:
    current = pipe.unet.state_dict()
    return set(current) == set(state) and all(torch.equal(state[k], v) for k, v in current.items())


def prediction(pipe) -> torch.Tensor:
    cond = TextConditioner.for_pipe(pipe, size=32)(["a cat"])
    with torch.no_grad():
        return predict(pipe.unet, torch.ones(1, 4, 8, 8), 500, cond)


def test_esd_target_and_ablation_loss_match_hand_computed_values():
    eps_u, eps_c = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 1.0])
    assert torch.equal(esd_target(eps_u, eps_c, 2.0), torch.tensor([-3.0, -2.0]))  # 1 - 2(3-1), 0 - 2(1-0)
    target, anchor_frozen, anchor = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 3.0])
    # mean((1,2)^2) = 2.5 ; anchor term mean((0,2)^2) = 2 ; weight 0.5
    assert float(ablation_loss(target, anchor_frozen, anchor, 0.5)) == pytest.approx(3.5)
    assert float(ablation_loss(target, anchor_frozen, None, 0.5)) == pytest.approx(2.5)


@pytest.mark.parametrize(
    "variant, inside, outside",
    [("x", "attn2.to_q", "attn1.to_q"), ("x-strict", "attn2.to_v", "attn2.to_q"), ("u", "attn1.to_k", "attn2.to_k"), ("all", "attn2.to_k", None)],
)
def test_esd_variants_select_their_parameter_sets(tiny_pipe, variant, inside, outside):
    names = unet_modules(tiny_pipe[0].unet, variant)
    assert any(n.endswith(inside) for n in names)
    if outside is not None:
        assert not any(n.endswith(outside) for n in names)
    if variant == "u":
        assert not any(n.startswith("time_embedding") or n == "conv_out" for n in names)
    with pytest.raises(TrainingError, match="Unknown variant 'xx'"):
        unet_modules(tiny_pipe[0].unet, "xx")


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_trainable_modules_give_the_frozen_model_from_the_same_network(tiny_pipe, mode):
    pipe, _ = tiny_pipe
    names = select_modules(pipe.unet, r"attn2\.to_(k|v)$")
    trainable = TrainableModules(pipe.unet, "unet", names, mode=mode, rank=2)
    with torch.no_grad():
        for p in trainable.named_parameters().values():
            p.add_(0.5)  # a trained adapter / weight
    cond = TextConditioner.for_pipe(pipe, size=32)(["a cat"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = predict(pipe.unet, x, 10, cond)
        trained = predict(trainable.module, x, 10, cond)
        with trainable.disabled() as frozen_unet:
            assert frozen_unet is trainable.module  # the same network, no second copy
            frozen = predict(frozen_unet, x, 10, cond)
        after = predict(trainable.module, x, 10, cond)
    assert torch.equal(frozen, original)
    assert not torch.allclose(trained, original)
    assert torch.equal(after, trained)  # adapters / trained weights are back after the block
    assert all(p.requires_grad for p in trainable.named_parameters().values())
    assert set(trainable.state()) and all(k.startswith("unet.") for k in trainable.state())


def test_frozen_trajectories_keep_every_state_and_are_seeded(tiny_pipe):
    pipe, _ = tiny_pipe
    cond = TextConditioner.for_pipe(pipe, size=32)
    conds, uncond = [cond(["a cat"]).detach()], cond([""]).detach()

    def make() -> FrozenTrajectories:
        return FrozenTrajectories(lambda x, t, c: predict(pipe.unet, x, t, c), pipe.scheduler.config, (4, 8, 8), conds, uncond,
                                  trajectories=2, ddim_steps=5, guidance=3.0, seed=3, device=torch.device("cpu"), progress=False)

    a, b = make(), make()
    assert len(a.states) == 2 and len(a.states[0]) == 5 and len(a.timesteps) == 5
    assert all(torch.equal(x, y) for xs, ys in zip(a.states, b.states) for x, y in zip(xs, ys))
    draws = a.sample(torch.Generator().manual_seed(0), 4)
    assert len(draws) == 4 and all(x.shape == (1, 4, 8, 8) for _, x, _, _ in draws)


@pytest.mark.parametrize("method, params", [("esd", {"variant": "x"}), ("esd", {"variant": "u", "mode": "full", "learning_rate": 1e-5}),
                                            ("concept-ablation", {"anchor": "a dog"})])
def test_trained_erasers_lower_their_loss_and_round_trip(tiny_pipe, tmp_path, method, params):
    pipe, _ = tiny_pipe
    before = unet_state(pipe)
    editor = get_editor(method)({**FAST, "steps": 12, **params})
    edit = editor.fit(pipe, EditRequest(concepts=["a cat"], seed=0))
    assert same_state(pipe, before)  # fit never modifies the pipe
    training = edit.metadata["training"]
    assert training["eval_loss_end"] < training["eval_loss_start"]  # the objective on fixed draws went down
    assert edit.metadata["train_seconds"] > 0
    path = edit.save(tmp_path / "edit.safetensors")
    loaded = Edit.load(path)
    original = prediction(pipe)
    loaded.apply(pipe)
    assert not torch.allclose(prediction(pipe), original)
    loaded.revert(pipe)
    assert same_state(pipe, before)  # bit-exact
    report = loaded.to_lora(tmp_path / "lora.safetensors")
    assert (tmp_path / "lora.safetensors").is_file() and report
    closed_form = get_editor("uce")({}).fit(pipe, EditRequest(concepts=["a dog"]))
    both = compose([loaded, closed_form])  # with a closed-form edit, in one artifact
    both.apply(pipe)
    assert not torch.allclose(prediction(pipe), original)
    both.revert(pipe)
    assert same_state(pipe, before)


def test_trained_erasers_refuse_bad_input(tiny_pipe):
    pipe, _ = tiny_pipe
    with pytest.raises(ValidationError, match="variant"):
        get_editor("esd")({"variant": "y"})
    with pytest.raises(ValidationError, match="steps"):
        get_editor("esd")({"steps": 0})
    with pytest.raises(ValidationError, match="stepz"):
        get_editor("esd")({"stepz": 3})
    with pytest.raises(TrainingError, match="is the concept being erased"):
        get_editor("concept-ablation")({**FAST, "anchor": "A Cat"}).fit(pipe, EditRequest(concepts=["a cat"]))
    with pytest.raises(TrainingError, match="needs an anchor"):
        get_editor("concept-ablation")(FAST).fit(pipe, EditRequest(concepts=["a cat"]))
    with pytest.raises(TrainingError, match="at least one non-empty concept"):
        get_editor("esd")(FAST).fit(pipe, EditRequest(concepts=[]))


@pytest.mark.parametrize("method, params", [("esd", {}), ("concept-ablation", {"anchor": "a dog"})])
def test_unet_erasers_train_on_sdxl(tiny_sdxl_pipe, method, params):
    """Two text encoders, pooled embeddings and time ids reach the UNet in the frozen runs and in training."""
    pipe, _ = tiny_sdxl_pipe
    edit = get_editor(method)({**FAST, **params}).fit(pipe, EditRequest(concepts=["a cat"], seed=0))
    assert edit.family == "sdxl" and all(m.startswith("unet.") for m in edit.module_shapes)
    edit.apply(pipe)
    edit.revert(pipe)


def test_training_benchmark_reference_agrees_with_the_library(tiny_pipe):
    """bench/training_erasure.py's reference (a second UNet, the published step) trains the same weights as the
    library's ESD when fed the library's states: the benchmark compares like with like."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "training_erasure.py"
    spec = importlib.util.spec_from_file_location("bench_training_erasure", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.agreement(tiny_pipe[0], steps=3)
    assert result["steps"] == 3 and result["modules"] > 0
    assert result["max_rel_diff"] < 1e-6
    assert result["max_rel_diff_of_update"] < 1e-2  # Adam's first steps amplify float32 rounding of tiny gradients
