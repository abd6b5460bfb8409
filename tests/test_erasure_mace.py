"""MACE, full (erasure/mace.py): attention loss, per-concept LoRAs, closed-form fusion, on the tiny pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conceptsmith.attention import AttentionMapRecorder
from conceptsmith.diffusion import TextConditioner, predict
from conceptsmith.edits import Edit, EditError
from conceptsmith.erasure._closed_form import kv_weights
from conceptsmith.erasure._mace_data import concept_examples, token_mask
from conceptsmith.erasure.mace import MACE, MACEConfig, attention_mass, fuse_loras
from conceptsmith.models import fingerprint
from conceptsmith.registry import EditRequest, get_editor
from conceptsmith.training import TrainingError

FAST = {"steps": 4, "learning_rate": 1e-2, "progress": False, "templates": ["a photo of a {}", "a picture of a {}"],
        "fusion_prior_weight": 10.0, "cfr": {"n_prompts": 4, "corpus_size": 16}}


@pytest.fixture(scope="module")
def pipe(one_thread):
    """One tiny pipeline for the module; editors never mutate it and every apply is reverted."""
    from conceptsmith.models import load_pipeline

    pipe, _ = load_pipeline("builtin:tiny-test")
    start = fingerprint(pipe)
    yield pipe
    assert fingerprint(pipe) == start


def _folder(root: Path, name: str, seed: int, masks: bool = True, empty: bool = False) -> Path:
    """Three random 16x16 images of a concept, each with a square mask NAME.mask.png."""
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        if masks:
            mask = np.zeros((16, 16), np.uint8)
            if not empty:
                mask[4:12, 2 + i : 10 + i] = 255
            Image.fromarray(mask).save(folder / f"{i}.mask.png")
    return folder


def _config(tmp_path: Path, **extra) -> dict:
    config = {**FAST, **extra}
    config["cfr"] = {**FAST["cfr"], "cache_dir": str(tmp_path / "cache"), **extra.get("cfr", {})}
    return config


def _maps(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    cond = TextConditioner.for_pipe(pipe, size=16)(prompts)
    latents = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), AttentionMapRecorder(pipe.unet) as recorder:
        predict(pipe.unet, latents, 500, cond)
    return recorder.maps


# -- the attention loss ---------------------------------------------------------------------------------


def test_attention_mass_by_hand():
    # one layer, 2x2 query grid, 3 tokens; the mask (4x4) covers the top-left 2x2 block = query cell (0, 0)
    probs = torch.tensor([[[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], [[0.2, 0.2, 0.6], [0.4, 0.4, 0.2]]]])
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1
    tokens = torch.tensor([[0.0, 1.0, 1.0]])
    assert attention_mass({"a": probs}, mask, tokens).item() == pytest.approx(0.3 + 0.2)
    # a half-covered cell counts half (area resize); two layers are averaged
    mask[..., :2, 2:3] = 1
    second = torch.full((1, 1, 1, 3), 1 / 3)
    expected = ((0.3 + 0.2) + 0.5 * (0.6 + 0.3) + (6 / 16) * (2 / 3)) / 2  # layer b: 6 of 16 pixels
    assert attention_mass({"a": probs, "b": second}, mask, tokens).item() == pytest.approx(expected)


def test_attention_mass_on_the_unet_with_a_mask_of_ones(pipe):
    prompts = ["a photo of a dog", "a cat"]
    maps = _maps(pipe, prompts)
    ones = torch.ones(2, 1, 16, 16)
    # every token: softmax rows sum to one, so the mass of a layer is its number of pixels
    everything = attention_mass(maps, ones, torch.ones(2, 77))
    pixels = np.mean([m.shape[1] * m.shape[2] for m in maps.values()])
    assert torch.allclose(everything, torch.full((2,), float(pixels)), rtol=1e-5)
    # the concept's tokens: their total attention, averaged over layers
    tokens = token_mask(pipe, prompts, ["dog", "cat"])
    assert tokens.sum(1).tolist() == [1.0, 1.0] and tokens[0, 5] == 1 and tokens[1, 2] == 1
    expected = torch.stack([torch.stack([m[0, ..., 5].sum(), m[1, ..., 2].sum()]) for m in maps.values()]).mean(0)
    assert torch.allclose(attention_mass(maps, ones, tokens), expected, rtol=1e-5)


def test_training_lowers_the_attention_mass(pipe, tmp_path):
    images = [_folder(tmp_path, "dog", 0)]
    edit = MACE(_config(tmp_path, steps=8)).fit(pipe, EditRequest(concepts=["dog"], images=images))
    run = edit.metadata["training"]["dog"]
    assert run["steps"] == 8 and len(edit.metadata["losses"]["dog"]) == 8
    assert run["eval_loss_end"] < 0.95 * run["eval_loss_start"]


# -- the fusion -----------------------------------------------------------------------------------------


def test_fusion_of_one_lora_reproduces_it_on_its_embeddings():
    torch.manual_seed(0)
    weights = {"k": torch.randn(6, 10, dtype=torch.float64), "v": torch.randn(4, 10, dtype=torch.float64)}
    embeddings = torch.randn(7, 10)
    lora = {"k": (torch.randn(6, 1), torch.randn(1, 10)), "v": (torch.zeros(4, 1), torch.randn(1, 10))}
    fused = fuse_loras(weights, [embeddings], [lora], lam=1e-9)
    assert list(fused.deltas) == ["k"]  # the unchanged projection is not solved for
    new = weights["k"] + fused.dense("k")
    lora_weight = weights["k"] + lora["k"][0].double() @ lora["k"][1].double()
    assert torch.allclose(embeddings.double() @ new.T, embeddings.double() @ lora_weight.T, atol=1e-6)
    assert fused.edit_residual["k"] < 1e-6
    assert fuse_loras(weights, [embeddings], [{"k": torch.zeros(6, 10)}]) is None


def test_fusion_keeps_loras_on_separate_embeddings_apart():
    torch.manual_seed(1)
    weights = {"k": torch.randn(5, 12, dtype=torch.float64)}
    basis = torch.linalg.qr(torch.randn(12, 12))[0].T  # orthonormal rows
    first, second = basis[:4], basis[4:8]
    loras = [{"k": (torch.randn(5, 1), torch.randn(1, 12))}, {"k": torch.randn(5, 12)}]
    fused = fuse_loras(weights, [first, second], loras, lam=1e-9)
    for e, lora in zip((first, second), loras):
        delta = lora["k"][0] @ lora["k"][1] if isinstance(lora["k"], tuple) else lora["k"]
        target = e.double() @ (weights["k"] + delta.double()).T
        assert torch.allclose(e.double() @ (weights["k"] + fused.dense("k")).T, target, atol=1e-6)


# -- the editor -----------------------------------------------------------------------------------------


def test_two_concepts_one_edit_round_trip(pipe, tmp_path):
    images = [_folder(tmp_path, "dog", 0), _folder(tmp_path, "cat", 1)]
    request = EditRequest(concepts=["dog", "cat"], preserve=["car"], images=images)
    editor = get_editor("mace")(_config(tmp_path))
    edit = editor.fit(pipe, request)
    assert edit.kind == "weights" and edit.method == "mace" and edit.concepts == ["dog", "cat"]
    assert set(edit.metadata["training"]) == {"dog", "cat"}
    fusion = edit.metadata["fusion"]
    assert fusion["n_edit_vectors"] == 2 * 2 * 77 and fusion["n_preserve_vectors"] == 77
    assert set(edit.module_shapes) == set(kv_weights(pipe))
    # every K/V LoRA factor trains but the last layer's value (no later attention map reads it): not fused
    assert list(fusion["edit_residual"]) == list(kv_weights(pipe))[:-1]

    path = edit.save(tmp_path / "mace.safetensors")
    loaded = Edit.load(path)
    assert loaded.method == "mace" and loaded.params["templates"] == FAST["templates"]
    assert all(torch.equal(loaded.tensors[k], v) for k, v in edit.tensors.items())
    before = {n: w.clone() for n, w in kv_weights(pipe).items()}
    loaded.apply(pipe)
    assert any(not torch.equal(w, before[n]) for n, w in kv_weights(pipe).items())
    loaded.revert(pipe)
    assert all(torch.equal(w, before[n]) for n, w in kv_weights(pipe).items())

    errors = edit.to_lora(tmp_path / "mace-lora.safetensors")
    assert max(errors.values()) < 1e-4
    with safe_open(str(tmp_path / "mace-lora.safetensors"), framework="pt") as handle:
        assert any(key.endswith("attn2.to_k.lora_A.weight") for key in handle.keys())


def test_full_mode_and_a_pipe_left_untouched(pipe, tmp_path):
    start = fingerprint(pipe)
    edit = MACE(_config(tmp_path, mode="full", steps=2)).fit(pipe, EditRequest(concepts=["dog"], images=[_folder(tmp_path, "dog", 0)]))
    assert fingerprint(pipe) == start
    assert edit.metadata["fusion"]["n_edit_vectors"] == 2 * 77
    assert edit.params["mode"] == "full" and edit.params["cfr"]["edit_concept_tokens"] is False


def test_renderer_images_and_masks_on_shapesworld(pipe):
    from conceptsmith.world.render import object_masks, render, render_scene

    sample = render((0, 3), n_objects=1, shape="skull", artist=None, watermark=False)
    mask = object_masks(sample.labels)[0]
    empty = render_scene({**sample.labels, "objects": []}, seed=sample.labels["noise_seed"])
    changed = np.abs(sample.image.astype(int) - empty.astype(int)).sum(-1) > 0
    assert changed[mask == 1].mean() > 0.99 and not changed[(mask == 0) & ~_near(mask)].any()

    skull, artist = concept_examples(pipe, ["bony head", "Oskar Brindlewood"], [], "renderer", ["a picture of a {}"], 2, 0)
    assert len(skull) == 2 and skull.mask.shape == (2, 1, 16, 16)
    assert 0.1 < float(skull.mask.mean()) < 0.9 and float(artist.mask.min()) == 1.0


def _near(mask: np.ndarray, k: int = 2) -> np.ndarray:
    """Pixels within ``k`` of the mask (the dark outline ring is drawn around the shape)."""
    near = mask > 0
    for axis in (0, 1):
        for shift in range(-k, k + 1):
            near = near | np.roll(mask > 0, shift, axis=axis)
    return near


# -- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no images", "none were given"),
        ("one folder for two concepts", r"one image folder \(or file\) per concept"),
        ("no masks", "have no mask"),
        ("empty masks", r"is empty \(all black\)"),
        ("renderer, unknown concept", "is neither"),
        ("renderer and image folders", "draws every image itself"),
        ("concept missing from a template", "the templates must contain the concept"),
    ],
)
def test_data_errors_are_one_clear_message(pipe, tmp_path, case, message):
    concepts, images, extra = ["dog"], [], {}
    if case == "one folder for two concepts":
        concepts, images = ["dog", "cat"], [_folder(tmp_path, "dog", 0)]
    elif case == "no masks":
        images = [_folder(tmp_path, "dog", 0, masks=False)]
    elif case == "empty masks":
        images = [_folder(tmp_path, "dog", 0, empty=True)]
    elif case == "renderer, unknown concept":
        extra = {"images": "renderer"}
    elif case == "renderer and image folders":
        images, extra = [_folder(tmp_path, "dog", 0)], {"images": "renderer"}
    elif case == "concept missing from a template":
        images, extra = [_folder(tmp_path, "dog", 0)], {"templates": ["a photo of an animal"]}
    with pytest.raises(TrainingError, match=message):
        MACE(_config(tmp_path, **extra)).fit(pipe, EditRequest(concepts=concepts, images=images))


def test_request_and_config_errors(pipe, tmp_path):
    images = [_folder(tmp_path, "dog", 0)]
    with pytest.raises(EditError, match="both erased and preserved"):
        MACE(_config(tmp_path)).fit(pipe, EditRequest(concepts=["dog"], preserve=["dog"], images=images))
    with pytest.raises(EditError, match="is the concept being erased"):
        MACE(_config(tmp_path)).fit(pipe, EditRequest(concepts=["dog"], guide="dog", images=images))
    with pytest.raises(EditError, match="No concept to erase"):
        MACE(_config(tmp_path)).fit(pipe, EditRequest(concepts=[], images=images))
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs"):
        MACEConfig(fusion_lamda=1.0)
    # a partial cfr mapping keeps MACE's exact CFR; it can still be switched on explicitly
    assert MACEConfig(cfr={"lam": 1.0}).cfr.edit_concept_tokens is False
    assert MACEConfig(cfr={"edit_concept_tokens": True}).cfr.edit_concept_tokens is True


def test_shipped_config_is_the_default():
    import yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "erase" / "mace.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert data["method"] == "mace" and MACEConfig.model_validate(data["params"]) == MACEConfig()
