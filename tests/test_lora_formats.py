"""LoRA and embedding file layouts: kohya / diffusers / peft / A1111 in (``import_file``), diffusers / kohya out
(``Edit.to_lora``), checked against diffusers' own readers and peft's own merge."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conceptsmith.edits import Edit, base_fingerprint, compose
from conceptsmith.imports import import_file
from conceptsmith.lora_formats import LoraFormatError, from_kohya, kohya_name

SD_TO_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
SD_PROJ_IN = "unet.down_blocks.0.attentions.0.proj_in"  # a 1x1 Conv2d in SD 1.x
TE_Q = "text_encoder.encoder.layers.0.self_attn.q_proj"


def _weight(pipe, module: str) -> torch.Tensor:
    component, _, name = module.partition(".")
    return getattr(pipe, component).get_submodule(name).weight.detach().clone()


def _applied_weights(pipe, edit: Edit, modules: list[str]) -> dict[str, torch.Tensor]:
    edit.apply(pipe)
    weights = {m: _weight(pipe, m) for m in modules}
    edit.revert(pipe)
    return weights


def _fused_by_diffusers(pipe, lora, modules: list[str]) -> dict[str, torch.Tensor]:
    """What diffusers' own loader makes of a LoRA file or state dict: the fused weights of ``modules``."""
    pipe = copy.deepcopy(pipe)
    pipe.load_lora_weights(lora)
    components = [c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    pipe.fuse_lora(components=components)
    pipe.unload_lora_weights()
    return {m: _weight(pipe, m) for m in modules}


def _factors(shape: tuple[int, ...], rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(up, down)`` for a weight of ``shape`` (conv: up [out, r, 1, 1], down [r, in, kh, kw])."""
    generator = torch.Generator().manual_seed(seed)
    up = 0.1 * torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=generator)
    down = 0.1 * torch.randn(rank, *shape[1:], generator=generator)
    return up, down


def _dense(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


# -- kohya names ----------------------------------------------------------------------------------------


def test_kohya_names_follow_sd_scripts_and_every_full_size_unet_layer_reads_back_through_diffusers():
    """SD 1.5 keeps diffusers' block names, SDXL uses the original (SGM) numbering as sd-scripts writes it; for every
    Linear / Conv2d of the real SD 1.5 and SDXL UNets (built on the meta device), diffusers' own kohya reader maps
    the name written back to the same module."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from conceptsmith.architectures import SD15_UNET, SDXL_UNET
    from conceptsmith.lora_formats import _sgm_renamer

    for family, config in (("sd1", SD15_UNET), ("sdxl", SDXL_UNET)):
        with init_empty_weights():
            unet = UNet2DConditionModel(**config)
        rename = _sgm_renamer(None, {}) if family == "sdxl" else None  # the default layout is SDXL base's
        modules = [f"unet.{n}" for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        state = {}
        for module in modules:
            name = kohya_name(module, family, rename)
            state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = torch.zeros(1, 1), torch.zeros(1, 1)
        assert sorted(from_kohya(state, unet.config)) == sorted(modules), family
        assert len(modules) > 250

    xl = _sgm_renamer(None, {})
    assert kohya_name("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "sdxl", xl) == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q")
    assert kohya_name("unet.up_blocks.0.attentions.1.transformer_blocks.9.attn2.to_out.0", "sdxl", xl) == (
        "lora_unet_output_blocks_1_1_transformer_blocks_9_attn2_to_out_0")
    assert kohya_name("unet.mid_block.attentions.0.proj_in", "sdxl", xl) == "lora_unet_middle_block_1_proj_in"
    assert kohya_name("unet.down_blocks.1.resnets.0.time_emb_proj", "sdxl", xl) == "lora_unet_input_blocks_4_0_emb_layers_1"
    assert kohya_name("unet.up_blocks.1.upsamplers.0.conv", "sdxl", xl) == "lora_unet_output_blocks_5_2_conv"
    assert kohya_name("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "sd1") == (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
    assert kohya_name(TE_Q, "sd1") == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_name(TE_Q, "sdxl", xl) == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_name("text_encoder_2.text_model.encoder.layers.3.mlp.fc1", "sdxl", xl) == "lora_te2_text_model_encoder_layers_3_mlp_fc1"


# -- import: LoRA ---------------------------------------------------------------------------------------


def test_kohya_import_honours_alpha_and_agrees_with_diffusers_loader(tiny_pipe, tmp_path):
    """A hand-made sd-scripts file (alpha 3 at rank 2 and 8 at rank 4, a 1x1 conv, text-encoder layers) becomes a
    weights edit whose applied weights are ``W + alpha / r * up @ down``, the same as diffusers' loader fuses.
    (diffusers' reader needs a text encoder's out_proj in the file to recognize the layout; ours does not.)"""
    pipe, info = tiny_pipe
    plan = {SD_TO_K: (2, 3.0), SD_PROJ_IN: (2, 3.0), TE_Q: (4, 8.0), TE_Q.replace("q_proj", "out_proj"): (4, 8.0)}
    state, expected = {}, {}
    for seed, (module, (rank, alpha)) in enumerate(plan.items()):
        weight = _weight(pipe, module)
        up, down = _factors(tuple(weight.shape), rank, seed)
        name = kohya_name(module, "sd1")
        state.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(alpha)})
        expected[module] = weight + alpha / rank * _dense(up, down)
    save_file(state, str(tmp_path / "style.safetensors"), metadata={"ss_network_dim": "2", "ss_base_model_version": "sd_v1"})

    edit = import_file(tmp_path / "style.safetensors", pipe, concepts=["watercolor style"])
    assert edit.kind == "weights" and edit.base_fingerprint == info.fingerprint and edit.concepts == ["watercolor style"]
    assert set(edit.module_shapes) == set(plan) and edit.params["format"] == "kohya"
    assert edit.metadata["source_header"]["ss_base_model_version"] == "sd_v1"
    assert f"{SD_PROJ_IN}.delta" in edit.tensors and f"{SD_TO_K}.up" in edit.tensors  # conv dense, linear low-rank
    applied = _applied_weights(pipe, Edit.load(edit.save(tmp_path / "edit.safetensors")), list(plan))
    fused = _fused_by_diffusers(pipe, str(tmp_path / "style.safetensors"), list(plan))
    for module in plan:
        torch.testing.assert_close(applied[module], expected[module], rtol=0, atol=1e-5)
        torch.testing.assert_close(fused[module], expected[module], rtol=0, atol=1e-5)


def test_diffusers_file_with_adapter_metadata_and_a_peft_folder_import_with_their_scales(tiny_pipe, tmp_path):
    """diffusers' lora_adapter_metadata (lora_alpha 8 at r 4, alpha_pattern 2 for to_v) and a real peft
    ``save_pretrained`` folder (rsLoRA) import with peft's scaling: their applied weights equal peft's merge."""
    from peft import LoraConfig, get_peft_model

    pipe, _ = tiny_pipe
    to_v = SD_TO_K.replace("to_k", "to_v")
    state, expected = {}, {}
    for seed, (module, scale) in enumerate(((SD_TO_K, 8 / 4), (to_v, 2 / 4))):
        weight = _weight(pipe, module)
        up, down = _factors(tuple(weight.shape), 4, seed)
        state.update({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up})
        expected[module] = weight + scale * up @ down
    metadata = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_v": 2}, "unet.rank_pattern": {}}
    save_file(state, str(tmp_path / "pytorch_lora_weights.safetensors"), metadata={"lora_adapter_metadata": json.dumps(metadata)})
    edit = import_file(tmp_path, pipe)  # a folder holding pytorch_lora_weights.safetensors
    assert edit.params["format"] == "diffusers" and edit.concepts == ["pytorch_lora_weights"]
    applied = _applied_weights(pipe, edit, list(expected))
    for module, weight in expected.items():
        torch.testing.assert_close(applied[module], weight, rtol=0, atol=1e-5)

    config = LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    adapted = get_peft_model(copy.deepcopy(pipe.text_encoder), config)
    adapted.save_pretrained(tmp_path / "peft")
    merged = adapted.merge_and_unload()
    edit = import_file(tmp_path / "peft" / "adapter_model.safetensors", pipe)
    assert edit.params["format"] == "peft" and all(m.startswith("text_encoder.") for m in edit.module_shapes)
    modules = list(edit.module_shapes)
    applied = _applied_weights(pipe, edit, modules)
    for module in modules:
        torch.testing.assert_close(applied[module], merged.get_submodule(module.partition(".")[2]).weight, rtol=0, atol=1e-5)


def test_unknown_layouts_and_keys_that_fit_no_module_name_the_first_bad_key(tiny_pipe, tiny_sdxl_pipe, tmp_path):
    pipe, _ = tiny_pipe

    def write(name: str, tensors: dict) -> str:
        save_file(tensors, str(tmp_path / name))
        return str(tmp_path / name)

    with pytest.raises(LoraFormatError, match="Unknown file layout: key 'model.bias'"):  # safetensors keeps keys sorted
        import_file(write("a.safetensors", {"model.weight": torch.zeros(2, 2), "model.bias": torch.zeros(2)}), pipe)
    loha = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}
    with pytest.raises(LoraFormatError, match="'lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a' is not a LoRA tensor"):
        import_file(write("b.safetensors", loha), pipe)
    name = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn2_to_k"
    absent = {f"{name}.lora_down.weight": torch.zeros(2, 32), f"{name}.lora_up.weight": torch.zeros(32, 2)}
    with pytest.raises(LoraFormatError, match=f"Key '{name}' of 'c.safetensors' matches no module"):
        import_file(write("c.safetensors", absent), pipe)
    mixed = {f"{SD_TO_K}.lora_A.weight": torch.zeros(2, 32), "lora_unet_x.lora_down.weight": torch.zeros(2, 2)}
    with pytest.raises(LoraFormatError, match=f"Key '{SD_TO_K}.lora_A.weight' does not fit the kohya LoRA layout"):
        import_file(write("d.safetensors", mixed), pipe)
    xl_pipe, _ = tiny_sdxl_pipe  # an SDXL LoRA (64-d cross-attention) given to the SD 1.x model
    xl_k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    xl_edit = Edit.from_weight_deltas("t", [], {}, base_fingerprint(xl_pipe), "sdxl", {xl_k: _factors((32, 64), 2, 0)})
    xl_edit.to_lora(tmp_path / "xl.safetensors")
    with pytest.raises(LoraFormatError, match=rf"Key '{xl_k}.lora_A.weight' .* made for another base model"):
        import_file(tmp_path / "xl.safetensors", pipe)
    torch.save({"lora_te_x.lora_down.weight": torch.zeros(1), "note": LoraFormatError("any object")}, tmp_path / "e.pt")
    with pytest.raises(LoraFormatError, match=r"weights_only=True\): it holds a pickled conceptsmith.lora_formats.LoraFormatError.*convert it to .safetensors"):
        import_file(tmp_path / "e.pt", pipe)
    with pytest.raises(FileNotFoundError):
        import_file(tmp_path / "missing.safetensors", pipe)


# -- import: textual inversion -----------------------------------------------------------------------------


def _token_rows(pipe, edit: Edit, token: str, component: str = "text_encoder") -> torch.Tensor:
    edit.apply(pipe)
    tokenizer = pipe.tokenizer if component == "text_encoder" else pipe.tokenizer_2
    ids = torch.tensor(tokenizer.convert_tokens_to_ids([token]))
    rows = getattr(pipe, component).get_input_embeddings()(ids)
    edit.revert(pipe)
    return rows


def test_embeddings_import_from_diffusers_a1111_sd_scripts_and_sdxl_files(tiny_pipe, tiny_sdxl_pipe, tmp_path):
    pipe, _ = tiny_pipe
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    torch.save({"<cat-toy>": vector}, tmp_path / "learned_embeds.bin")  # diffusers' textual_inversion.py output
    edit = import_file(tmp_path, pipe)
    assert edit.hook == "custom-tokens" and edit.params["tokens"] == ["<cat-toy>"] and edit.concepts == ["<cat-toy>"]
    torch.testing.assert_close(_token_rows(pipe, edit, "<cat-toy>")[0], vector)

    rows = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": rows}, "name": "mystyle", "step": 500}, tmp_path / "a.pt")
    edit = import_file(tmp_path / "a.pt", pipe)
    assert edit.params["tokens"] == ["mystyle"]
    torch.testing.assert_close(_token_rows(pipe, edit, "mystyle_1")[0], rows[1])  # multi-vector: <t>, <t>_1

    save_file({"emb_params": rows}, str(tmp_path / "painterly.safetensors"))
    assert import_file(tmp_path / "painterly.safetensors", pipe).params["tokens"] == ["painterly"]  # the trigger is the file name
    assert import_file(tmp_path / "painterly.safetensors", pipe, token="<p>").params["tokens"] == ["<p>"]
    with pytest.raises(ValueError, match="already in the vocabulary"):
        import_file(tmp_path / "painterly.safetensors", pipe, token="cat")

    xl_pipe, _ = tiny_sdxl_pipe
    clip_l, clip_g = torch.randn(1, 32), torch.randn(1, 32)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xl.safetensors"), metadata={"token": "<xl>"})
    edit = import_file(tmp_path / "xl.safetensors", xl_pipe)
    assert edit.params["tokens"] == ["<xl>"]
    torch.testing.assert_close(_token_rows(xl_pipe, edit, "<xl>", "text_encoder_2")[0], clip_g[0])
    with pytest.raises(LoraFormatError, match=r"vectors for \['text_encoder', 'text_encoder_2'\].*another model family"):
        import_file(tmp_path / "xl.safetensors", pipe)
    save_file({"emb_params": torch.randn(1, 768)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(LoraFormatError, match="768-d vectors for text_encoder, which embeds tokens in 32 dims"):
        import_file(tmp_path / "wide.safetensors", pipe)


# -- export ------------------------------------------------------------------------------------------------


def _token_edit(pipe, tokens: dict[str, torch.Tensor]) -> Edit:
    from conceptsmith.tokens import token_edit

    return token_edit(pipe, "textual-inversion", list(tokens), {}, {f"text_encoder.{t}": v for t, v in tokens.items()})


def test_to_lora_writes_learned_tokens_beside_the_lora_in_both_layouts(tiny_pipe, tmp_path):
    pipe, info = tiny_pipe
    weights = Edit.from_weight_deltas("cd", ["<a> dog"], {}, info.fingerprint, "sd1", {SD_TO_K: _factors((32, 32), 2, 0)})
    vectors = {"<a>": torch.randn(1, 32), "<b>": torch.randn(2, 32)}
    one = Edit("composite", "cd", ["<a> dog"], {}, info.fingerprint, "sd1", parts=[weights, _token_edit(pipe, {"<a>": vectors["<a>"]})])
    assert one.to_lora(tmp_path / "cd.safetensors")[SD_TO_K] == 0.0
    with safe_open(str(tmp_path / "cd.ti.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == ["<a>"] and handle.metadata()["token"] == "<a>"
        torch.testing.assert_close(handle.get_tensor("<a>"), vectors["<a>"])

    both = compose([one, _token_edit(pipe, {"<b>": vectors["<b>"]})])
    both.to_lora(tmp_path / "kohya" / "cd.safetensors", layout="kohya")
    for token, stem in (("<a>", "a"), ("<b>", "b")):  # A1111 / sd-scripts layout, trigger word = file name
        with safe_open(str(tmp_path / "kohya" / f"{stem}.safetensors"), framework="pt") as handle:
            assert list(handle.keys()) == ["emb_params"]
            torch.testing.assert_close(handle.get_tensor("emb_params"), vectors[token])
    both.to_lora(tmp_path / "two.safetensors")
    assert (tmp_path / "two.a.ti.safetensors").is_file() and (tmp_path / "two.b.ti.safetensors").is_file()

    only_tokens = _token_edit(pipe, {"<c>": torch.randn(1, 32)})
    assert only_tokens.to_lora(tmp_path / "ti.safetensors") == {}
    assert not (tmp_path / "ti.safetensors").exists() and (tmp_path / "ti.ti.safetensors").is_file()
    with pytest.raises(LoraFormatError, match="would overwrite the LoRA file"):
        one.to_lora(tmp_path / "a.safetensors", layout="kohya")
    with pytest.raises(ValueError, match="Unknown LoRA format 'webui'"):
        one.to_lora(tmp_path / "x.safetensors", layout="webui")


def test_kohya_export_of_an_sdxl_edit_numbers_blocks_by_the_base_unet(tiny_sdxl_pipe, tmp_path):
    """Without the base UNet the SDXL numbering is SDXL base's, which refuses modules it does not have; with it,
    diffusers' SDXL loader (which maps the numbering back by the UNet's config) fuses the exact change."""
    pipe, info = tiny_sdxl_pipe
    module = "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"
    edit = Edit.from_weight_deltas("t", ["x"], {}, info.fingerprint, "sdxl", {module: _factors((32, 64), 3, 4)})
    with pytest.raises(LoraFormatError, match=r"with weight shape \[32, 64\] is not in SDXL base's UNet"):
        edit.to_lora(tmp_path / "xl.safetensors", layout="kohya")
    shapes = {key: tuple(value.shape) for key, value in pipe.unet.state_dict().items()}
    edit.to_lora(tmp_path / "xl.safetensors", layout="kohya", unet_shapes=shapes)
    with safe_open(str(tmp_path / "xl.safetensors"), framework="pt") as handle:
        header = handle.metadata()
        assert list(handle.keys())[0].startswith("lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_v.")
    assert (header["ss_network_dim"], header["ss_network_alpha"], header["ss_base_model_version"]) == ("3", "3", "sdxl_base_v1-0")
    expected = _applied_weights(pipe, edit, [module])
    torch.testing.assert_close(_fused_by_diffusers(pipe, str(tmp_path / "xl.safetensors"), [module])[module], expected[module], rtol=0, atol=1e-5)
