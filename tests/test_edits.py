"""Edit artifacts: save/load validation, apply/revert (bit-exact), compose, hooks, LoRA adapters and LoRA export."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

from conceptsmith import registry
from conceptsmith.edits import (
    Edit,
    EditError,
    applied,
    applied_edits,
    base_fingerprint,
    check_scale,
    compose,
    parse_edit_spec,
)
from conceptsmith.models import fingerprint

TO_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
TO_V = "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"
TE_K = "text_encoder.encoder.layers.0.self_attn.k_proj"


def _weight(pipe, path: str) -> torch.Tensor:
    component, _, name = path.partition(".")
    return getattr(pipe, component).get_submodule(name).weight.detach()


def _snapshot(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{component}.{key}": value.clone()
        for component in ("unet", "text_encoder")
        for key, value in getattr(pipe, component).state_dict().items()
    }


def _assert_restored(pipe, snapshot: dict[str, torch.Tensor]) -> None:
    now = _snapshot(pipe)
    assert now.keys() == snapshot.keys()
    assert all(torch.equal(now[key], snapshot[key]) for key in snapshot)


def _low_rank(pipe, path: str, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    d_out, d_in = _weight(pipe, path).shape
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, rank, generator=generator) * 0.1, torch.randn(rank, d_in, generator=generator) * 0.1


def _weights_edit(pipe, deltas, method: str = "test", concepts=("cat",)) -> Edit:
    return Edit.from_weight_deltas(method, list(concepts), {"lam": 0.1}, base_fingerprint(pipe), "sd1", deltas, {"residual": 0.5})


def _mixed_edit(pipe) -> Edit:
    """Dense delta on one UNet projection, low-rank on another and on a text-encoder projection."""
    up, down = _low_rank(pipe, TO_K, 3, seed=1)
    return _weights_edit(pipe, {TO_K: up @ down, TO_V: _low_rank(pipe, TO_V, 2, seed=2), TE_K: _low_rank(pipe, TE_K, 1, seed=3)})


def _module_out(pipe, path: str, x: torch.Tensor) -> torch.Tensor:
    """Output of one module of the (possibly peft-wrapped) pipe."""
    component, _, name = path.partition(".")
    with torch.no_grad():
        return getattr(pipe, component).get_submodule(name)(x)


def _linear_out(snapshot, path: str, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What a linear layer with weight ``W_base + delta`` returns."""
    bias = snapshot.get(f"{path}.bias")
    return x @ (snapshot[f"{path}.weight"] + delta).T + (0 if bias is None else bias)


# -- apply / revert ------------------------------------------------------------------------------------


def test_apply_adds_deltas_and_revert_restores_bit_exactly(tiny_pipe):
    pipe, info = tiny_pipe
    snapshot = _snapshot(pipe)
    edit = _mixed_edit(pipe)
    assert edit.module_shapes == {TO_K: [64, 32], TO_V: [32, 32], TE_K: [32, 32]}
    edit.apply(pipe)
    up, down = edit.tensors[f"{TO_V}.up"], edit.tensors[f"{TO_V}.down"]
    assert torch.equal(_weight(pipe, TO_V), snapshot[f"{TO_V}.weight"] + up @ down)
    assert torch.equal(_weight(pipe, TO_K), snapshot[f"{TO_K}.weight"] + edit.tensors[f"{TO_K}.delta"])
    assert applied_edits(pipe) == [edit]
    assert fingerprint(pipe) != info.fingerprint and base_fingerprint(pipe) == info.fingerprint
    edit.revert(pipe)
    _assert_restored(pipe, snapshot)
    assert applied_edits(pipe) == []


def test_half_precision_weights_get_float32_sums_and_exact_revert(tiny_pipe):
    pipe, _ = tiny_pipe
    edit = _mixed_edit(pipe)
    pipe.to(dtype=torch.float16)
    snapshot = _snapshot(pipe)
    edit.apply(pipe)  # the fingerprint rounds values to fp16, so the fp16 copy is the same base
    expected = (snapshot[f"{TO_K}.weight"].float() + edit.tensors[f"{TO_K}.delta"]).to(torch.float16)
    assert torch.equal(_weight(pipe, TO_K), expected)
    edit.revert(pipe)
    _assert_restored(pipe, snapshot)


def test_out_of_order_revert_keeps_later_edits_exactly(tiny_pipe):
    pipe, _ = tiny_pipe
    snapshot = _snapshot(pipe)
    first = _weights_edit(pipe, {TO_K: _low_rank(pipe, TO_K, 2, seed=4)})
    second = _weights_edit(pipe, {TO_K: _low_rank(pipe, TO_K, 2, seed=5), TE_K: _low_rank(pipe, TE_K, 1, seed=6)})
    first.apply(pipe)
    second.apply(pipe)
    first.revert(pipe)
    assert applied_edits(pipe) == [second]
    only_second = _snapshot(pipe)
    second.revert(pipe)
    _assert_restored(pipe, snapshot)
    second.apply(pipe)
    _assert_restored(pipe, only_second)  # same bits as if `first` had never been applied


def test_apply_refuses_other_base_missing_modules_wrong_shapes_and_double_apply(tiny_pipe):
    pipe, info = tiny_pipe
    other = Edit.from_weight_deltas("uce", ["cat"], {}, "0123456789abcdef", "sd1", {TO_K: _low_rank(pipe, TO_K, 1, 0)})
    with pytest.raises(EditError, match=f"0123456789abcdef.*{info.fingerprint}"):
        other.apply(pipe)
    missing = _weights_edit(pipe, {"unet.down_blocks.7.attn2.to_k": torch.zeros(64, 32)})
    with pytest.raises(EditError, match=r"unet has no module 'down_blocks\.7\.attn2\.to_k'"):
        missing.apply(pipe)
    no_component = _weights_edit(pipe, {"text_encoder_2.encoder.layers.0.self_attn.k_proj": torch.zeros(32, 32)})
    with pytest.raises(EditError, match="no model component 'text_encoder_2'"):
        no_component.apply(pipe)
    wrong_shape = _weights_edit(pipe, {TO_K: torch.zeros(64, 48)})
    with pytest.raises(EditError, match=r"shape \[64, 32\] in this pipe.*expects \[64, 48\]"):
        wrong_shape.apply(pipe)
    assert applied_edits(pipe) == []
    edit = _mixed_edit(pipe)
    edit.apply(pipe)
    with pytest.raises(EditError, match="already applied"):
        edit.apply(pipe)
    with pytest.raises(EditError, match="not applied to this pipe"):
        other.revert(pipe)


# -- scale ---------------------------------------------------------------------------------------------


def test_scaled_weights_edit_adds_scale_times_delta_and_reverts_bit_exactly(tiny_pipe):
    pipe, _ = tiny_pipe
    snapshot = _snapshot(pipe)
    edit = _mixed_edit(pipe)
    edit.apply(pipe, scale=0.5)
    up, down = edit.tensors[f"{TO_V}.up"], edit.tensors[f"{TO_V}.down"]
    assert torch.equal(_weight(pipe, TO_V), snapshot[f"{TO_V}.weight"] + 0.5 * (up @ down))
    assert torch.equal(_weight(pipe, TO_K), snapshot[f"{TO_K}.weight"] + 0.5 * edit.tensors[f"{TO_K}.delta"])
    assert applied(pipe) == [(edit, 0.5)]
    edit.revert(pipe)
    _assert_restored(pipe, snapshot)


def test_out_of_order_revert_reapplies_later_edits_at_their_scale(tiny_pipe):
    pipe, _ = tiny_pipe
    snapshot = _snapshot(pipe)
    first = _weights_edit(pipe, {TO_K: _low_rank(pipe, TO_K, 2, seed=4)})
    second = _weights_edit(pipe, {TO_K: _low_rank(pipe, TO_K, 2, seed=5)})
    first.apply(pipe, scale=0.25)
    second.apply(pipe, scale=-2)
    first.revert(pipe)
    assert applied(pipe) == [(second, -2.0)]
    up, down = second.tensors[f"{TO_K}.up"], second.tensors[f"{TO_K}.down"]
    assert torch.equal(_weight(pipe, TO_K), snapshot[f"{TO_K}.weight"] + -2.0 * (up @ down))
    second.revert(pipe)
    _assert_restored(pipe, snapshot)


def test_scaled_lora_edit_scales_the_adapters_update_and_reverts(tiny_pipe):
    pipe, _ = tiny_pipe
    snapshot = _snapshot(pipe)
    up, down = _low_rank(pipe, TO_K, 2, seed=10)
    lora = Edit.from_lora("lora", ["sks"], {}, base_fingerprint(pipe), "sd1", {f"{TO_K}.lora_A.weight": down, f"{TO_K}.lora_B.weight": up})
    x = torch.randn(3, 32)
    lora.apply(pipe, scale=0.5)
    torch.testing.assert_close(_module_out(pipe, TO_K, x), _linear_out(snapshot, TO_K, 0.5 * up @ down, x))
    assert torch.equal(lora.tensors[f"{TO_K}.lora_B.weight"], up)  # the edit itself is not changed
    lora.revert(pipe)
    _assert_restored(pipe, snapshot)


def test_hooks_refuse_a_scale_and_bad_scales_are_refused(tiny_pipe):
    pipe, _ = tiny_pipe
    hook = _hook_edit(pipe)
    with pytest.raises(EditError, match=r"inference-time hook \('test-scale-output'\).*apply it at scale 1 \(got 0.5\)"):
        hook.apply(pipe, scale=0.5)
    both = compose([_mixed_edit(pipe), hook])
    with pytest.raises(EditError, match="contains an inference-time hook"):
        both.apply(pipe, scale=2)
    assert applied_edits(pipe) == []
    hook.apply(pipe, scale=1)
    hook.revert(pipe)
    for bad in (float("nan"), float("inf"), True, "0.5", None):
        with pytest.raises(EditError, match="must be a finite number"):
            check_scale(bad)
        with pytest.raises(EditError, match="must be a finite number"):
            _mixed_edit(pipe).apply(pipe, scale=bad)


@pytest.mark.parametrize(
    ("spec", "path", "scale"),
    [
        ("no-skull.safetensors", "no-skull.safetensors", 1.0),
        ("no-skull.safetensors:0.5", "no-skull.safetensors", 0.5),
        ("runs/a.safetensors:-1", "runs/a.safetensors", -1.0),
        ("x.safetensors:1e-1", "x.safetensors", 0.1),
        (r"C:\edits\a.safetensors", r"C:\edits\a.safetensors", 1.0),
        (r"C:\edits\a.safetensors:2", r"C:\edits\a.safetensors", 2.0),
        ("dir:with:colons/a.safetensors", "dir:with:colons/a.safetensors", 1.0),
        (":0.5", ":0.5", 1.0),
    ],
)
def test_edit_specs_parse_a_scale_only_when_the_suffix_is_a_number(spec, path, scale):
    from pathlib import Path

    assert parse_edit_spec(spec) == (Path(path), scale)


def test_edit_spec_with_a_non_finite_scale_is_refused():
    with pytest.raises(EditError, match=r"scale nan in 'a.safetensors:nan' must be a finite number"):
        parse_edit_spec("a.safetensors:nan")


def test_cli_generate_applies_an_edit_at_a_scale_and_records_it(tiny_pipe, tmp_path):
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from conceptsmith.cli import app

    pipe, _ = tiny_pipe
    path = _weights_edit(pipe, {TO_K: _low_rank(pipe, TO_K, 2, seed=30), TO_V: _low_rank(pipe, TO_V, 2, seed=31)}).save(tmp_path / "e.safetensors")
    base = ["generate", "-m", "builtin:tiny-test", "-p", "a red circle", "--seeds", "0"]
    images = {}
    for name, extra in (("full", ["-e", str(path)]), ("half", ["-e", f"{path}:0.5"]), ("zero", ["-e", f"{path}:0"]), ("plain", [])):
        result = CliRunner().invoke(app, [*base, *extra, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        images[name] = np.asarray(Image.open(tmp_path / name / "000_a-red-circle_s0.png"), dtype=np.int16)
    manifest = json.loads((tmp_path / "half" / "manifest.json").read_text())
    assert manifest["edits"][0]["scale"] == 0.5 and manifest["edits"][0]["file"] == str(path)
    assert np.array_equal(images["zero"], images["plain"])
    assert np.abs(images["half"] - images["full"]).max() > 0 and np.abs(images["half"] - images["plain"]).max() > 0

    hook = _hook_edit(pipe).save(tmp_path / "hook.safetensors")
    refused = CliRunner().invoke(app, [*base, "-e", f"{hook}:0.5", "-o", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "error: " in refused.output and "apply it at scale 1" in refused.output


@pytest.mark.usefixtures("one_thread")
def test_evaluate_scores_an_edit_at_a_scale_as_its_own_row(tiny_pipe, tmp_path, evaluator_file):
    from conceptsmith.evaluation.engine import load_bench, run_bench

    pipe, _ = tiny_pipe
    path = _weights_edit(pipe, {TO_K: _low_rank(pipe, TO_K, 2, seed=32)}).save(tmp_path / "e.safetensors")
    smoke, _ = load_bench("shapes-smoke")
    config = smoke.model_copy(update={"tasks": smoke.tasks[:1], "attacks": [], "seeds": [0], "methods": [], "neutral_prompts": []})
    run = run_bench(config, tmp_path / "out", edits=[str(path), f"{path}:0.5"], model="builtin:tiny-test",
                    evaluator=str(evaluator_file), progress=False, report=False)
    rows = run.results["rows"]
    assert [row["method"] for row in rows] == ["unedited", "e", "e:0.5"]
    assert rows[1]["edit_key"] != rows[2]["edit_key"]


def test_text_encoder_paths_resolve_with_or_without_the_text_model_level(tiny_pipe):
    pipe, _ = tiny_pipe  # transformers 5 flattens CLIPTextModel; older edits and LoRA files name `text_model.`
    before = _weight(pipe, TE_K).clone()
    edit = _weights_edit(pipe, {TE_K.replace("text_encoder.", "text_encoder.text_model."): torch.ones(32, 32)})
    edit.apply(pipe)
    assert torch.equal(_weight(pipe, TE_K), before + 1)
    edit.revert(pipe)
    assert torch.equal(_weight(pipe, TE_K), before)


def test_constructor_rejects_bad_layouts():
    with pytest.raises(EditError, match="has '.up' but no '.down'"):
        Edit("weights", "m", [], {}, "f", "sd1", {f"{TO_K}.up": torch.zeros(64, 1)})
    with pytest.raises(EditError, match="JSON-serializable"):
        Edit.from_weight_deltas("m", [], {"x": torch.zeros(1)}, "f", "sd1", {TO_K: torch.zeros(64, 32)})
    with pytest.raises(EditError, match="Unknown edit kind 'patch'"):
        Edit("patch", "m", [], {}, "f", "sd1")
    with pytest.raises(EditError, match="changes no module"):
        Edit.from_weight_deltas("m", [], {}, "f", "sd1", {})


# -- save / load ---------------------------------------------------------------------------------------


def test_save_load_round_trip_with_metadata(tiny_pipe, tmp_path):
    pipe, info = tiny_pipe
    edit = _mixed_edit(pipe)
    path = edit.save(tmp_path / "edit.safetensors")
    edit.save(path)  # overwriting is atomic too
    assert [p.name for p in tmp_path.iterdir()] == ["edit.safetensors"]  # no temporary files left behind
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["conceptsmith"])
    assert header["kind"] == "weights" and header["method"] == "test" and header["concepts"] == ["cat"]
    assert header["base_fingerprint"] == info.fingerprint and header["family"] == "sd1"
    assert header["module_shapes"][TO_K] == [64, 32] and header["params"] == {"lam": 0.1}
    assert header["metadata"]["residual"] == 0.5 and {"conceptsmith_version", "created"} <= header["metadata"].keys()
    loaded = Edit.load(path)
    assert (loaded.kind, loaded.method, loaded.concepts, loaded.params) == (edit.kind, edit.method, edit.concepts, edit.params)
    assert loaded.metadata == edit.metadata and loaded.tensors.keys() == edit.tensors.keys()
    assert all(torch.equal(loaded.tensors[key], edit.tensors[key]) for key in edit.tensors)
    edit.apply(pipe)
    expected = _snapshot(pipe)
    edit.revert(pipe)
    loaded.apply(pipe)
    _assert_restored(pipe, expected)


def _write(path, tensors, header=None, raw_metadata=None):
    metadata = raw_metadata if raw_metadata is not None else {"conceptsmith": json.dumps(header)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_load_refuses_bad_files_with_clear_messages(tiny_pipe, tmp_path):
    pipe, _ = tiny_pipe
    good = _mixed_edit(pipe)
    header, tensors = good._serialize()

    with pytest.raises(EditError, match="nothing.safetensors' does not exist"):
        Edit.load(tmp_path / "nothing.safetensors")
    pickled = tmp_path / "edit.pt"
    pickled.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(EditError, match=r"Refusing to load '.*edit\.pt'.*arbitrary code"):
        Edit.load(pickled)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(EditError, match="disguised.safetensors' is not a valid safetensors file"):
        Edit.load(disguised)
    lora = _write(tmp_path / "lora.safetensors", {"unet.x.lora_A.weight": torch.zeros(1, 2)}, raw_metadata={"format": "pt"})
    with pytest.raises(EditError, match="no ConceptSmith metadata.*load_lora_weights"):
        Edit.load(lora)
    broken = _write(tmp_path / "broken.safetensors", tensors, raw_metadata={"conceptsmith": "{not json"})
    with pytest.raises(EditError, match="broken.safetensors.*not valid JSON"):
        Edit.load(broken)
    with pytest.raises(EditError, match="unknown edit kind 'patch'"):
        Edit.load(_write(tmp_path / "kind.safetensors", tensors, {**header, "kind": "patch"}))
    with pytest.raises(EditError, match="field 'method' is missing"):
        Edit.load(_write(tmp_path / "field.safetensors", tensors, {k: v for k, v in header.items() if k != "method"}))
    with pytest.raises(EditError, match="newer ConceptSmith"):
        Edit.load(_write(tmp_path / "future.safetensors", tensors, {**header, "format_version": 99}))
    no_down = {k: v for k, v in tensors.items() if k != f"{TO_V}.down"}
    with pytest.raises(EditError, match=rf"no_down.safetensors.*Tensors missing for module '{TO_V}'"):
        Edit.load(_write(tmp_path / "no_down.safetensors", no_down, header))
    no_module = {k: v for k, v in tensors.items() if not k.startswith(TO_V)}
    with pytest.raises(EditError, match=f"tensors missing for module '{TO_V}'"):
        Edit.load(_write(tmp_path / "no_module.safetensors", no_module, header))
    with pytest.raises(EditError, match="use a path ending in .safetensors"):
        good.save(tmp_path / "edit.pt")


# -- compose -------------------------------------------------------------------------------------------


def test_compose_low_rank_edits_stays_low_rank_and_equals_sequential(tiny_pipe):
    pipe, _ = tiny_pipe
    first = _weights_edit(pipe, {TO_K: _low_rank(pipe, TO_K, 2, seed=7)}, method="uce", concepts=["cat"])
    second = _weights_edit(pipe, {TO_K: _low_rank(pipe, TO_K, 3, seed=8), TE_K: _low_rank(pipe, TE_K, 1, 9)}, "rece", ["dog", "cat"])
    merged = compose([first, second])
    assert merged.kind == "weights" and merged.method == "uce+rece" and merged.concepts == ["cat", "dog"]
    assert merged.tensors[f"{TO_K}.up"].shape == (64, 5) and f"{TO_K}.delta" not in merged.tensors
    first.apply(pipe)
    second.apply(pipe)
    sequential = _weight(pipe, TO_K).clone()
    second.revert(pipe)
    first.revert(pipe)
    merged.apply(pipe)
    torch.testing.assert_close(_weight(pipe, TO_K), sequential, rtol=1e-6, atol=1e-6)

    dense = compose([first, _weights_edit(pipe, {TO_K: torch.ones(64, 32)})])
    torch.testing.assert_close(dense.tensors[f"{TO_K}.delta"], torch.ones(64, 32) + first.tensors[f"{TO_K}.up"] @ first.tensors[f"{TO_K}.down"])
    foreign = Edit.from_weight_deltas("uce", ["cat"], {}, "fedcba9876543210", "sd1", {TO_K: torch.ones(64, 32)})
    with pytest.raises(EditError, match=f"different base models.*{first.base_fingerprint}.*fedcba9876543210"):
        compose([first, foreign])
    with pytest.raises(EditError, match="at least one edit"):
        compose([])


class _ScaleOutput:
    """Test hook: multiplies the output of the UNet's conv_out by the edit's `scale` tensor."""

    def __init__(self, edit: Edit, pipe) -> None:
        scale = edit.tensors["scale"]
        self.handle = pipe.unet.conv_out.register_forward_hook(lambda module, args, output: output * scale)

    def remove(self) -> None:
        self.handle.remove()


registry.register_hook("test-scale-output")(_ScaleOutput)


def _hook_edit(pipe, scale: float = 2.0) -> Edit:
    return Edit.from_hook("scale", ["cat"], {"s": scale}, base_fingerprint(pipe), "sd1", "test-scale-output", {"scale": torch.tensor(scale)})


def test_hook_edit_installs_and_removes_and_composes_with_weights(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "load_builtin_plugins", lambda: None)  # the unknown-hook lookup needs no plugins
    pipe, _ = tiny_pipe
    snapshot = _snapshot(pipe)
    x = torch.randn(1, 32, 8, 8)
    before = _module_out(pipe, "unet.conv_out", x)
    hook = _hook_edit(pipe)
    hook.apply(pipe)
    torch.testing.assert_close(_module_out(pipe, "unet.conv_out", x), 2 * before)
    hook.revert(pipe)
    assert torch.equal(_module_out(pipe, "unet.conv_out", x), before)

    weights = _mixed_edit(pipe)
    both = Edit.load(compose([weights, hook]).save(tmp_path / "both.safetensors"))
    assert both.kind == "composite" and [part.kind for part in both.parts] == ["weights", "hook"]
    weights.apply(pipe)
    weights_only = _snapshot(pipe)
    weights.revert(pipe)
    both.apply(pipe)
    _assert_restored(pipe, weights_only)
    torch.testing.assert_close(_module_out(pipe, "unet.conv_out", x), 2 * before)
    both.revert(pipe)
    _assert_restored(pipe, snapshot)
    assert torch.equal(_module_out(pipe, "unet.conv_out", x), before)
    with pytest.raises(EditError, match="inference-time hook.*no LoRA form"):
        both.to_lora(tmp_path / "x.safetensors")

    unknown = Edit.from_hook("x", [], {}, base_fingerprint(pipe), "sd1", "no-such-hook", {})
    with pytest.raises(EditError, match="Unknown hook 'no-such-hook'"):
        unknown.apply(pipe)
    assert applied_edits(pipe) == []


# -- LoRA ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [TO_V, TE_K], ids=["unet-only", "text-encoder-only"])
def test_a_one_component_lora_applies_without_diffusers_missing_component_warning(tiny_pipe, module):
    """diffusers warns at every load that a LoRA has no keys for a component it leaves alone (the text encoder of a
    UNet-only LoRA, the UNet of a text-encoder-only one); applying an Edit does not."""
    import logging

    pipe, _ = tiny_pipe
    up, down = _low_rank(pipe, module, 2, seed=3)
    tensors = {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}
    edit = Edit.from_lora("lora", ["sks"], {}, base_fingerprint(pipe), "sd1", tensors)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers")  # the library's loggers all propagate here
    logger.addHandler(handler)
    try:
        pipe.load_lora_weights(dict(tensors), adapter_name="direct")  # the control: diffusers' own load warns
        assert any(m.startswith("No LoRA keys associated to") for m in records), records
        pipe.delete_adapters("direct")
        pipe.unload_lora_weights()
        records.clear()
        edit.apply(pipe)
        assert applied_edits(pipe) == [edit]
        edit.revert(pipe)
    finally:
        logger.removeHandler(handler)
    assert not any("No LoRA keys" in m for m in records), records


def test_lora_edits_apply_as_active_adapters_with_folded_alpha_and_revert(tiny_pipe, tmp_path):
    pipe, _ = tiny_pipe
    snapshot = _snapshot(pipe)
    up_k, down_k = _low_rank(pipe, TO_K, 4, seed=10)
    up_t, down_t = _low_rank(pipe, TE_K, 2, seed=11)
    up_v, down_v = _low_rank(pipe, TO_V, 1, seed=12)
    state_dict = {
        f"{TO_K}.lora_A.weight": down_k,
        f"{TO_K}.lora_B.weight": up_k,
        f"{TE_K}.lora_A.weight": down_t,
        f"{TE_K}.lora_B.weight": up_t,
    }
    config = {"unet": LoraConfig(r=4, lora_alpha=8, target_modules=["to_k"]), "text_encoder": {"lora_alpha": 2}}
    lora = Edit.from_lora("lora", ["sks dog"], {"steps": 10}, base_fingerprint(pipe), "sd1", state_dict, config)
    lora = Edit.load(lora.save(tmp_path / "lora.safetensors"))
    second = Edit.from_lora("lora", ["sks cat"], {}, base_fingerprint(pipe), "sd1", {f"{TO_V}.lora_A.weight": down_v, f"{TO_V}.lora_B.weight": up_v})
    x = torch.randn(3, 32)

    lora.apply(pipe)
    assert pipe.unet.get_submodule(TO_K.removeprefix("unet.")).active_adapters  # a peft adapter, not a weight change
    torch.testing.assert_close(_module_out(pipe, TO_K, x), _linear_out(snapshot, TO_K, 2 * up_k @ down_k, x))  # alpha/r = 2
    torch.testing.assert_close(_module_out(pipe, TE_K, x), _linear_out(snapshot, TE_K, up_t @ down_t, x))
    second.apply(pipe)  # both adapters active
    torch.testing.assert_close(_module_out(pipe, TO_K, x), _linear_out(snapshot, TO_K, 2 * up_k @ down_k, x))
    torch.testing.assert_close(_module_out(pipe, TO_V, x), _linear_out(snapshot, TO_V, up_v @ down_v, x))
    weights = _weights_edit(pipe, {TO_V: _low_rank(pipe, TO_V, 1, seed=13)})
    weights.apply(pipe)
    lora.revert(pipe)  # out of order: the later edits stay applied
    assert applied_edits(pipe) == [second, weights]
    torch.testing.assert_close(_module_out(pipe, TO_K, x), _linear_out(snapshot, TO_K, torch.zeros(64, 32), x))
    extra = weights.tensors[f"{TO_V}.up"] @ weights.tensors[f"{TO_V}.down"]
    torch.testing.assert_close(_module_out(pipe, TO_V, x), _linear_out(snapshot, TO_V, up_v @ down_v + extra, x))
    weights.revert(pipe)
    second.revert(pipe)
    _assert_restored(pipe, snapshot)  # peft wrappers are gone: same keys, same bits

    compose([lora, second]).to_lora(tmp_path / "both.safetensors")
    with safe_open(str(tmp_path / "both.safetensors"), framework="pt") as handle:
        exported = handle.get_tensor(f"{TO_K}.lora_B.weight") @ handle.get_tensor(f"{TO_K}.lora_A.weight")
    torch.testing.assert_close(exported, 2 * up_k @ down_k)


def test_a_deep_copy_of_an_edited_pipe_reverts_itself(tiny_pipe):
    pipe, _ = tiny_pipe
    snapshot = _snapshot(pipe)
    edit = _mixed_edit(pipe)
    edit.apply(pipe)
    edited = _snapshot(pipe)
    clone = copy.deepcopy(pipe)
    edit.revert(clone)
    _assert_restored(clone, snapshot)
    _assert_restored(pipe, edited)


def _reference_weights(pipe, edit: Edit, paths) -> dict[str, torch.Tensor]:
    edit.apply(pipe)
    weights = {path: _weight(pipe, path).clone() for path in paths}
    edit.revert(pipe)
    return weights


def _fused_lora_weights(pipe, lora_file, paths) -> dict[str, torch.Tensor]:
    pipe.load_lora_weights(str(lora_file), adapter_name="exported")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    return {path: _weight(pipe, path).clone() for path in paths}


def _lora_rank(path, module: str) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_slice(f"{module}.lora_B.weight").get_shape()[1]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> float:
    return float((actual - expected).norm() / (expected - base).norm())


def test_to_lora_is_reproduced_by_diffusers_load_lora_weights(tiny_pipe, tmp_path):
    pipe, _ = tiny_pipe
    paths = [TO_K, TO_V, TE_K]
    base = {path: _weight(pipe, path).clone() for path in paths}
    up, down = _low_rank(pipe, TO_K, 3, seed=13)
    edit = _weights_edit(pipe, {TO_K: up @ down, TO_V: _low_rank(pipe, TO_V, 2, seed=14), TE_K: torch.randn(32, 32) * 0.1})
    expected = _reference_weights(pipe, edit, paths)
    errors = edit.to_lora(tmp_path / "edit_lora.safetensors")
    assert max(errors.values()) < 1e-6
    with safe_open(str(tmp_path / "edit_lora.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        adapter = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert f"{TO_K}.lora_A.weight" in keys and f"{TO_K}.lora_B.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight" in keys
    assert adapter["unet.r"] == adapter["unet.lora_alpha"] and adapter["unet.rank_pattern"] == adapter["unet.alpha_pattern"]
    assert _lora_rank(tmp_path / "edit_lora.safetensors", TO_K) == 3 and _lora_rank(tmp_path / "edit_lora.safetensors", TO_V) == 2

    fused = _fused_lora_weights(pipe, tmp_path / "edit_lora.safetensors", paths)
    for path in paths:
        assert _relative_error(fused[path], expected[path], base[path]) < 1e-5, path
        assert float((fused[path] - expected[path]).norm() / expected[path].norm()) < 1e-5


def test_to_lora_truncates_to_rank_and_records_the_error(tiny_pipe, tmp_path):
    pipe, _ = tiny_pipe
    delta = torch.randn(64, 32, generator=torch.Generator().manual_seed(15))
    edit = _weights_edit(pipe, {TO_K: delta, TO_V: _low_rank(pipe, TO_V, 4, seed=16)})
    errors = edit.to_lora(tmp_path / "r2.safetensors", rank=2)
    singular = torch.linalg.svdvals(delta.double())
    assert errors[TO_K] == pytest.approx(float(singular[2:].norm() / singular.norm()), rel=1e-9)
    tv_singular = torch.linalg.svdvals(edit.tensors[f"{TO_V}.up"].double() @ edit.tensors[f"{TO_V}.down"].double())
    assert errors[TO_V] == pytest.approx(float(tv_singular[2:].norm() / tv_singular.norm()), rel=1e-6)
    assert _lora_rank(tmp_path / "r2.safetensors", TO_K) == 2 and _lora_rank(tmp_path / "r2.safetensors", TO_V) == 2
    with safe_open(str(tmp_path / "r2.safetensors"), framework="pt") as handle:
        source = json.loads(handle.metadata()["conceptsmith_source"])
    assert source["rank"] == 2 and source["truncation_error"][TO_K] == errors[TO_K]
    with pytest.raises(EditError, match="positive integer"):
        edit.to_lora(tmp_path / "r0.safetensors", rank=0)
    wide = _weights_edit(pipe, {TE_K: (torch.randn(32, 40), torch.randn(40, 32))})  # e.g. many composed edits
    assert wide.to_lora(tmp_path / "wide.safetensors")[TE_K] < 1e-6
    assert _lora_rank(tmp_path / "wide.safetensors", "text_encoder.text_model." + TE_K.removeprefix("text_encoder.")) == 32


def test_to_lora_writes_convolutions_that_diffusers_fuses_exactly(tiny_pipe, tmp_path):
    """A dense change of a 3x3 convolution is factored as the linear map [out, in*3*3] and written in peft's conv
    layout (up [out, r, 1, 1], down [r, in, 3, 3]); capping the rank records the SVD tail as the error."""
    pipe, _ = tiny_pipe
    conv = "unet.down_blocks.0.resnets.0.conv1"
    weight = _weight(pipe, conv)
    assert weight.ndim == 4 and weight.shape[2:] == (3, 3)
    delta = 0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(21))
    edit = _weights_edit(pipe, {conv: delta, TO_K: _low_rank(pipe, TO_K, 2, seed=22)})
    expected = _reference_weights(pipe, edit, [conv, TO_K])
    errors = edit.to_lora(tmp_path / "conv.safetensors")
    assert errors[conv] < 1e-6
    with safe_open(str(tmp_path / "conv.safetensors"), framework="pt") as handle:
        down, up = handle.get_tensor(f"{conv}.lora_A.weight"), handle.get_tensor(f"{conv}.lora_B.weight")
    assert down.shape[1:] == weight.shape[1:] and up.shape[2:] == (1, 1) and up.shape[0] == weight.shape[0]
    fused = _fused_lora_weights(pipe, tmp_path / "conv.safetensors", [conv, TO_K])
    assert float((fused[conv] - expected[conv]).norm() / delta.norm()) < 1e-5

    singular = torch.linalg.svdvals(delta.flatten(1).double())
    capped = edit.to_lora(tmp_path / "conv_r3.safetensors", rank=3)
    assert capped[conv] == pytest.approx(float(singular[3:].norm() / singular.norm()), rel=1e-6)


def test_to_lora_sdxl_with_both_text_encoders(tiny_sdxl_pipe, tmp_path):
    pipe, info = tiny_sdxl_pipe
    te2 = "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj"
    xl_k = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    paths = [xl_k, TE_K, te2]
    deltas = {path: _low_rank(pipe, path, rank, seed) for path, rank, seed in zip(paths, (2, 1, 3), (17, 18, 19), strict=True)}
    edit = Edit.from_weight_deltas("uce", ["cat"], {}, info.fingerprint, "sdxl", deltas)
    base = {path: _weight(pipe, path).clone() for path in paths}
    expected = _reference_weights(pipe, edit, paths)
    edit.to_lora(tmp_path / "xl.safetensors")
    fused = _fused_lora_weights(pipe, tmp_path / "xl.safetensors", paths)
    for path in paths:
        assert _relative_error(fused[path], expected[path], base[path]) < 1e-5, path
