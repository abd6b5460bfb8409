"""The base identity (conceptsmith.identity): whole tensors of every component plus the scheduler, wrappers that do
not change weights ignored, float16 precision, refusals that name the module, edit files of format 1, cache keys."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from conceptsmith.edits import Edit, EditError, applied_edits, base_fingerprint
from conceptsmith.identity import IdentityError, legacy_fingerprint
from conceptsmith.models import describe, fingerprint, register_builtin

TO_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
TE_V = "text_encoder.encoder.layers.1.self_attn.v_proj"


def _module(pipe, path: str) -> torch.nn.Module:
    component, _, name = path.partition(".")
    return getattr(pipe, component).get_submodule(name)


def _edit(pipe, path: str = TO_K) -> Edit:
    weight = _module(pipe, path).weight
    delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.1
    return Edit.from_weight_deltas("test", ["cat"], {}, base_fingerprint(pipe), "sd1", {path: delta})


def _nudge(tensor: torch.Tensor, index: int = 1) -> None:
    """Change one element by far more than float16's resolution."""
    with torch.no_grad():
        tensor.view(-1)[index] += 0.25


def test_every_element_of_every_component_counts_not_samples(tiny_pipe):
    """Identity version 1 hashed strided samples of UNet and text encoders; version 2 reads every element of
    every component, the VAE included."""
    pipe, info = tiny_pipe
    legacy = legacy_fingerprint(pipe)
    assert set(info.fingerprint.components) == {"unet", "text_encoder", "vae", "scheduler"}
    big = max(pipe.unet.parameters(), key=lambda p: p.numel())
    assert big.numel() > 2 * 4096  # so element 1 falls between the version-1 stride's samples
    _nudge(big)
    assert legacy_fingerprint(pipe) == legacy  # the old samples miss it
    changed = fingerprint(pipe)
    assert changed != info.fingerprint
    assert {name for name in changed.components if changed.components[name] != info.fingerprint.components[name]} == {"unet"}

    pipe2, info2 = copy.deepcopy(pipe), describe(pipe)
    _nudge(pipe2.vae.decoder.conv_out.weight)
    vae_changed = fingerprint(pipe2)
    assert vae_changed != info2.fingerprint
    assert vae_changed.components["unet"] == info2.fingerprint.components["unet"]
    assert vae_changed.modules["vae.decoder.conv_out"] != info2.fingerprint.modules["vae.decoder.conv_out"]


def test_the_schedulers_class_and_config_count(tiny_pipe):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    pipe, info = tiny_pipe
    original = pipe.scheduler.config
    pipe.scheduler = DDIMScheduler.from_config(original, timestep_spacing="trailing")
    respaced = fingerprint(pipe)
    pipe.scheduler = EulerDiscreteScheduler.from_config(original)
    other_class = fingerprint(pipe)
    assert len({info.fingerprint, respaced, other_class}) == 3
    for changed in (respaced, other_class):
        assert {n for n in changed.components if changed.components[n] != info.fingerprint.components[n]} == {"scheduler"}


def test_float16_copy_is_the_same_base_bfloat16_is_not_and_the_refusal_says_why(tiny_pipe):
    pipe, info = tiny_pipe
    edit = _edit(pipe)
    half = copy.deepcopy(pipe).to(dtype=torch.float16)
    assert fingerprint(half) == info.fingerprint
    edit.apply(half)  # made on float32, applied to the float16 copy
    edit.revert(half)
    half.to(dtype=torch.float32)
    assert fingerprint(half) == info.fingerprint  # a float16 checkpoint loaded as float32: exact upcast

    brain = copy.deepcopy(pipe).to(dtype=torch.bfloat16)
    assert fingerprint(brain) != info.fingerprint
    with pytest.raises(EditError, match=r"differs.*bfloat16.*load the base in float16 or float32"):
        edit.apply(brain)


def test_torch_compile_wrapper_is_not_part_of_the_identity_and_edits_apply_through_it(tiny_pipe):
    pipe, info = tiny_pipe
    edit = _edit(pipe)
    before = _module(pipe, TO_K).weight.detach().clone()
    pipe.unet = torch.compile(pipe.unet)  # wrapping only: nothing is compiled until the first call
    assert next(iter(pipe.unet.state_dict())).startswith("_orig_mod.")
    assert fingerprint(pipe) == info.fingerprint
    edit.apply(pipe)
    assert not torch.equal(pipe.unet._orig_mod.get_submodule(TO_K.removeprefix("unet.")).weight, before)
    edit.revert(pipe)
    assert torch.equal(pipe.unet._orig_mod.get_submodule(TO_K.removeprefix("unet.")).weight, before)


def test_unfused_peft_adapter_is_ignored_a_fused_one_counts(tiny_pipe):
    pipe, info = tiny_pipe
    weight = _module(pipe, TO_K).weight
    generator = torch.Generator().manual_seed(3)
    lora = {
        f"{TO_K}.lora_A.weight": torch.randn(2, weight.shape[1], generator=generator),
        f"{TO_K}.lora_B.weight": torch.randn(weight.shape[0], 2, generator=generator),
    }
    pipe.load_lora_weights(lora, adapter_name="user")
    assert any(".base_layer." in key for key in pipe.unet.state_dict())
    with_adapter = fingerprint(pipe)
    assert with_adapter == info.fingerprint and with_adapter.modules == info.fingerprint.modules
    pipe.fuse_lora()
    assert fingerprint(pipe) != info.fingerprint


def test_added_token_rows_are_ignored_original_rows_count(tiny_pipe):
    pipe, info = tiny_pipe
    pipe.tokenizer.add_tokens(["<new-token>"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    table = pipe.text_encoder.get_input_embeddings().weight
    assert table.shape[0] == pipe.tokenizer.vocab_size + 1
    with torch.no_grad():
        table[-1] = 3.0  # the new token's row
    assert fingerprint(pipe) == info.fingerprint
    _nudge(table, index=5 * table.shape[1])  # row 5 of the original vocabulary
    changed = fingerprint(pipe)
    assert changed != info.fingerprint
    differing = [m for m in changed.modules if changed.modules[m] != info.fingerprint.modules.get(m)]
    assert differing == ["text_encoder.embeddings.token_embedding"]


def test_token_edits_leave_the_base_identity_alone(tiny_pipe):
    from conceptsmith.customization.textual_inversion import token_edit

    pipe, info = tiny_pipe
    tokens = token_edit(pipe, "textual-inversion", ["<sks>"], {}, {"text_encoder.<sks>": torch.randn(1, 32)})
    tokens.apply(pipe)
    assert len(pipe.tokenizer) == pipe.tokenizer.vocab_size + 1  # the hook's tokenizer copy and extended table
    assert fingerprint(pipe) == info.fingerprint
    tokens.revert(pipe)


def test_refusal_names_the_first_module_that_differs_also_from_a_saved_file(tiny_pipe, tmp_path):
    pipe, _ = tiny_pipe
    edit = _edit(pipe)
    loaded = Edit.load(edit.save(tmp_path / "e.safetensors"))
    assert loaded.base_fingerprint.modules == edit.base_fingerprint.modules
    other = copy.deepcopy(pipe)
    _nudge(_module(other, TE_V).weight)
    _nudge(_module(other, TO_K).weight)
    for candidate in (edit, loaded):
        with pytest.raises(EditError, match=rf"{TE_V} differs \(and 1 more module\)"):
            candidate.apply(other)
    assert applied_edits(other) == []


def test_edits_apply_across_vae_and_scheduler_but_caches_see_them(tiny_pipe):
    from diffusers import EulerDiscreteScheduler

    pipe, info = tiny_pipe
    edit = _edit(pipe)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    _nudge(pipe.vae.decoder.conv_out.weight)
    own = fingerprint(pipe)
    assert own != info.fingerprint and own.components["unet"] == info.fingerprint.components["unet"]
    edit.apply(pipe)  # bound to the UNet and text encoder only
    assert base_fingerprint(pipe) == own  # the pipe's own base, VAE and scheduler included
    edit.revert(pipe)


def test_base_identity_is_read_again_once_every_edit_is_reverted(tiny_pipe):
    pipe, info = tiny_pipe
    edit = _edit(pipe)
    edit.apply(pipe)
    assert base_fingerprint(pipe) == info.fingerprint != fingerprint(pipe)
    edit.revert(pipe)
    _nudge(_module(pipe, TE_V).weight)  # changed outside ConceptSmith after the revert
    assert base_fingerprint(pipe) == fingerprint(pipe) != info.fingerprint
    with pytest.raises(EditError, match=f"{TE_V} differs"):
        edit.apply(pipe)


def test_meta_weights_are_refused_clearly(tiny_pipe):
    pipe, _ = tiny_pipe
    pipe.vae.to("meta")
    with pytest.raises(IdentityError, match="meta device"):
        fingerprint(pipe)


def _as_format_1(path, edit: Edit) -> None:
    """Write ``edit`` the way edit files of format 1 were written (no ``base_identity``)."""
    header, tensors = edit._serialize()
    header = {key: value for key, value in header.items() if key != "base_identity"} | {"format_version": 1}
    save_file(tensors, str(path), metadata={"format": "pt", "conceptsmith": json.dumps(header)})


def test_edit_files_of_format_1_are_checked_with_identity_version_1(tiny_pipe, tmp_path):
    pipe, _ = tiny_pipe
    old = Edit.from_weight_deltas("uce", ["cat"], {}, legacy_fingerprint(pipe), "sd1", {TO_K: _edit(pipe).tensors[f"{TO_K}.delta"]})
    _as_format_1(tmp_path / "old.safetensors", old)
    loaded = Edit.load(tmp_path / "old.safetensors")
    assert loaded.base_fingerprint.version == 1
    current = _edit(pipe, TE_V)  # identity version 2, same base
    before = {path: _module(pipe, path).weight.detach().clone() for path in (TO_K, TE_V)}
    for first, second in ((loaded, current), (current, loaded)):  # the stack keeps both versions of the base's identity
        first.apply(pipe)
        second.apply(pipe)
        first.revert(pipe)
        second.revert(pipe)
        assert all(torch.equal(_module(pipe, path).weight, weight) for path, weight in before.items())
    resaved = Edit.load(loaded.save(tmp_path / "resaved.safetensors"))
    assert resaved.base_fingerprint.version == 1  # saving again keeps the version it was checked with

    other = copy.deepcopy(pipe)
    with torch.no_grad():
        for parameter in other.unet.parameters():
            parameter.add_(0.25)
    with pytest.raises(EditError, match="identity \\(version 1"):
        loaded.apply(other)


# -- benchmark caches ----------------------------------------------------------------------------------


def _variant(name: str, change) -> str:
    from conftest import build_tiny_pipe

    def load(dtype=torch.float32, device="cpu"):
        pipe = build_tiny_pipe(dtype, device)
        change(pipe)
        return pipe

    register_builtin(name, load, "tiny test pipeline, one component changed")
    return f"builtin:{name}"


def _other_scheduler(pipe) -> None:
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")


def _other_vae(pipe) -> None:
    _nudge(pipe.vae.decoder.conv_out.weight)


@pytest.mark.usefixtures("one_thread")
def test_bench_cache_is_keyed_by_scheduler_and_vae(tmp_path, evaluator_file):
    from conceptsmith.evaluation.engine import load_bench, run_bench

    smoke, _ = load_bench("shapes-smoke")
    config = smoke.model_copy(update={"tasks": smoke.tasks[:1], "attacks": [], "seeds": [0], "methods": [], "neutral_prompts": []})
    models = ["builtin:tiny-test", _variant("tiny-test-ddim-trailing", _other_scheduler), _variant("tiny-test-vae", _other_vae)]
    for model in models:
        run = run_bench(config, tmp_path / model.replace(":", "-"), model=model, evaluator=str(evaluator_file),
                        cache_dir=tmp_path / "cache", progress=False, report=False)
        assert run.generated > 0 and run.cached == 0  # nothing served from another model's folder
    folders = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(folders) == 3


def test_class_image_cache_sees_an_applied_lora_edit_the_identity_ignores(tiny_pipe, tmp_path):
    """An applied LoRA edit is an unfused adapter: the identity is the base's, so the class-image cache key
    also names the applied edits (else the edited model would be served the base model's images)."""
    from conceptsmith.customization.data import class_images

    pipe, info = tiny_pipe
    weight = _module(pipe, TO_K).weight
    generator = torch.Generator().manual_seed(5)
    state = {f"{TO_K}.lora_A.weight": torch.randn(2, weight.shape[1], generator=generator),
             f"{TO_K}.lora_B.weight": torch.randn(weight.shape[0], 2, generator=generator)}
    lora = Edit.from_lora("lora", ["sks"], {}, info.fingerprint, "sd1", state)
    class_images(pipe, "a photo of a dog", 1, size=16, cache_dir=tmp_path, progress=False)
    lora.apply(pipe)
    assert fingerprint(pipe) == info.fingerprint
    class_images(pipe, "a photo of a dog", 1, size=16, cache_dir=tmp_path, progress=False)
    lora.revert(pipe)
    assert len(list(tmp_path.iterdir())) == 2


def test_an_editors_fit_reads_the_base_identity_once(tiny_pipe, monkeypatch):
    import conceptsmith.identity as identity
    from conceptsmith.registry import EditRequest, get_editor

    pipe, _ = tiny_pipe
    reads = []
    read = identity._read_fingerprint
    monkeypatch.setattr(identity, "_read_fingerprint", lambda pipe: reads.append(1) or read(pipe))
    edit = get_editor("uce")({}).fit(pipe, EditRequest(concepts=["cat"], preserve=["dog"]))
    assert len(reads) == 1
    assert edit.base_fingerprint == fingerprint(pipe)  # outside a fit every call reads the weights again
    fingerprint(pipe)
    assert len(reads) == 3
