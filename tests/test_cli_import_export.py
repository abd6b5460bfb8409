"""`conceptsmith import` and `conceptsmith export-lora` end to end: exported files load with diffusers alone (in a
process that never imports ConceptSmith), imported LoRAs merge in closed form and generate."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conceptsmith.cli import app
from conceptsmith.edits import Edit, base_fingerprint
from conceptsmith.lora_formats import kohya_name

runner = CliRunner()

#: Loads the saved pipeline, each exported LoRA and its embedding files with diffusers only, fuses, and compares
#: the weights and the prompt embedding with what the parent measured with the edit applied.
DIFFUSERS_ONLY = r"""
import json, sys
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

job = json.load(open(sys.argv[1]))
expected = load_file(job["expected"])
for case in job["cases"]:
    pipe = DiffusionPipeline.from_pretrained(job["pipeline"])
    pipe.load_lora_weights(case["lora"])
    for token, path in case["tokens"].items():
        state = load_file(path)
        if "clip_l" in state:
            pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(path, token=token)
    pipe.fuse_lora(components=[c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None])
    pipe.unload_lora_weights()
    for key, value in expected.items():
        if key != "prompt_embeds":
            component, _, name = key.partition(".")
            torch.testing.assert_close(getattr(pipe, component).get_submodule(name).weight, value, rtol=0, atol=1e-5)
    embeds = pipe.encode_prompt(job["prompt"], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    torch.testing.assert_close(embeds, expected["prompt_embeds"], rtol=0, atol=1e-4)
    print("diffusers reproduced", case["name"])
assert not [name for name in sys.modules if name.startswith("conceptsmith")]
"""


def _run(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


def _weight(pipe, module: str) -> torch.Tensor:
    component, _, name = module.partition(".")
    return getattr(pipe, component).get_submodule(name).weight


def _customization_edit(pipe, family: str, token: str, vectors: int) -> Edit:
    """A Custom-Diffusion-like edit: weight changes (low-rank linears, a dense 3x3 conv and 1x1 conv, every text
    encoder's attention and MLP) plus a learned token."""
    from conceptsmith.tokens import components, token_edit

    generator = torch.Generator().manual_seed(7)
    block = "unet.down_blocks.1.attentions.0"
    linear = [f"{block}.transformer_blocks.0.attn2.to_k", f"{block}.transformer_blocks.0.attn2.to_v",
              "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0", "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2"]
    encoders = components(pipe)
    for c in encoders:  # CLIPTextModelWithProjection keeps its `text_model.` level
        layer = f"{c}.{'text_model.' if hasattr(getattr(pipe, c), 'text_model') else ''}encoder.layers.1"
        linear += [f"{layer}.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")]
    deltas: dict = {}
    for module in linear:
        out, inp = _weight(pipe, module).shape
        deltas[module] = (0.05 * torch.randn(out, 2, generator=generator), 0.05 * torch.randn(2, inp, generator=generator))
    for module in ("unet.down_blocks.0.resnets.0.conv1", f"{block}.proj_in"):
        deltas[module] = 0.02 * torch.randn(_weight(pipe, module).shape, generator=generator)
    base = base_fingerprint(pipe)
    weights = Edit.from_weight_deltas("custom-diffusion", [f"{token} toy"], {}, base, family, deltas)
    width = {c: getattr(pipe, c).get_input_embeddings().embedding_dim for c in encoders}
    rows = {f"{c}.{token}": torch.randn(vectors, width[c], generator=generator) for c in encoders}
    tokens = token_edit(pipe, "custom-diffusion", [f"{token} toy"], {}, rows)
    return Edit("composite", "custom-diffusion", [f"{token} toy"], {}, base, family, parts=[weights, tokens])


def _check_exports_load_with_diffusers_alone(pipe, family: str, token: str, vectors: int, tmp_path) -> None:
    pipe.save_pretrained(tmp_path / "pipeline")
    edit = _customization_edit(pipe, family, token, vectors)
    edit.save(tmp_path / "edit.safetensors")
    prompt = f"a photo of {token} toy"
    edit.apply(pipe)
    expected = {module: _weight(pipe, module).detach().clone() for module in edit.parts[0].module_shapes}
    expected["prompt_embeds"] = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    edit.revert(pipe)
    save_file({k: v.contiguous() for k, v in expected.items()}, str(tmp_path / "expected.safetensors"))

    slug = token.strip("<>")
    cases = []
    for layout, extra, ti_file in (("diffusers", [], "lora.ti.safetensors"), ("kohya", ["-m", tmp_path / "pipeline"], f"{slug}.safetensors")):
        out = tmp_path / layout / "lora.safetensors"
        result = _run("export-lora", tmp_path / "edit.safetensors", "--format", layout, "-o", out, *extra)
        assert result.exit_code == 0, result.output
        assert f"wrote {out}: {len(expected) - 1} modules, max relative truncation error" in result.output
        assert f"wrote {tmp_path / layout / ti_file}: token {token}" in result.output
        cases.append({"name": layout, "lora": str(out), "tokens": {token: str(tmp_path / layout / ti_file)}})
    job = {"pipeline": str(tmp_path / "pipeline"), "expected": str(tmp_path / "expected.safetensors"), "prompt": prompt, "cases": cases}
    (tmp_path / "job.json").write_text(json.dumps(job))
    child = subprocess.run([sys.executable, "-c", DIFFUSERS_ONLY, str(tmp_path / "job.json")], capture_output=True, text=True,
                           timeout=300, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.split() == ["diffusers", "reproduced", "diffusers", "diffusers", "reproduced", "kohya"]


def test_sd1_exports_in_both_formats_load_with_diffusers_alone(tiny_pipe, tmp_path):
    _check_exports_load_with_diffusers_alone(tiny_pipe[0], "sd1", "<cat-toy>", 2, tmp_path)


def test_sdxl_exports_in_both_formats_load_with_diffusers_alone(tiny_sdxl_pipe, tmp_path):
    _check_exports_load_with_diffusers_alone(tiny_sdxl_pipe[0], "sdxl", "<xl-toy>", 1, tmp_path)


def _kv_lora(pipe, path, seed: int) -> None:
    """A kohya file (rank 2, alpha 1) on every cross-attention K and V: a Custom-Diffusion-style LoRA."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in pipe.unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            key = kohya_name(f"unet.{name}", "sd1")
            out, inp = module.weight.shape
            state[f"{key}.lora_up.weight"] = 0.2 * torch.randn(out, 2, generator=generator)
            state[f"{key}.lora_down.weight"] = 0.2 * torch.randn(2, inp, generator=generator)
            state[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(state, str(path), metadata={"ss_network_dim": "2", "ss_network_alpha": "1", "ss_base_model_version": "sd_v1"})


def test_two_imported_loras_merge_in_closed_form_and_generate(tiny_pipe, tmp_path):
    from conceptsmith.text import encode_prompts

    pipe, info = tiny_pipe
    edits = {}
    for seed, concept in enumerate(("red circle", "blue star")):
        lora, edit = tmp_path / f"{seed}.safetensors", tmp_path / f"{seed}.edit.safetensors"
        _kv_lora(pipe, lora, seed)
        result = _run("import", lora, "-m", "builtin:tiny-test", "-c", concept, "-o", edit)
        assert result.exit_code == 0, result.output
        assert result.output == f"imported kohya LoRA '{seed}.safetensors': 14 modules (unet 14) for builtin:tiny-test [{info.fingerprint}] -> {edit}\n"
        edits[concept] = edit
    merged = tmp_path / "merged.safetensors"
    result = _run("merge", *edits.values(), "--method", "closed-form", "-m", "builtin:tiny-test", "-o", merged)
    assert result.exit_code == 0, result.output

    # the closed-form merge keeps each imported LoRA's K/V outputs on its own phrase's tokens
    merged_edit = Edit.load(merged)
    assert merged_edit.kind == "weights" and merged_edit.concepts == ["red circle", "blue star"]
    for concept, path in edits.items():
        states = encode_prompts(pipe, [concept])[0, 1:4]  # the phrase's two tokens and EOS
        alone = Edit.load(path)
        outputs = []
        for edit in (alone, merged_edit):
            edit.apply(pipe)
            outputs.append({m: states @ _weight(pipe, m).detach().T for m in alone.module_shapes})
            edit.revert(pipe)
        for module, value in outputs[0].items():
            torch.testing.assert_close(outputs[1][module], value, rtol=0, atol=1e-4)

    out = tmp_path / "images"
    result = _run("generate", "-m", "builtin:tiny-test", "-e", merged, "-p", "a red circle and a blue star", "--seeds", "0", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["edits"][0]["method"] == "closed-form-merge" and (out / manifest["images"][0]["file"]).is_file()


def test_import_cli_takes_an_embedding_and_names_the_first_bad_key_of_an_unknown_file(tmp_path):
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "shinyzq.safetensors"))
    edit = tmp_path / "shinyzq.edit.safetensors"
    result = _run("import", tmp_path / "shinyzq.safetensors", "-m", "builtin:tiny-test", "-o", edit)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("imported textual-inversion embedding 'shinyzq.safetensors': token shinyzq (text_encoder)")
    result = _run("generate", "-m", "builtin:tiny-test", "-e", edit, "-p", "a shinyzq circle", "-o", tmp_path / "gen")
    assert result.exit_code == 0, result.output

    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "vae.safetensors"))
    result = _run("import", tmp_path / "vae.safetensors", "-m", "builtin:tiny-test", "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 2
    assert result.output.startswith("error: Unknown file layout: key 'first_stage_model.decoder.conv_in.weight' is none of kohya")
    assert len(result.output.strip().splitlines()) == 1
    result = _run("export-lora", edit, "--format", "webui", "-o", tmp_path / "l.safetensors")
    assert result.exit_code == 2 and "Unknown LoRA format 'webui'; choose one of diffusers, kohya" in result.output
