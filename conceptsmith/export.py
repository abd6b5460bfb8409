"""Ship an (edited) pipeline as one ``.safetensors`` checkpoint in the original Stable Diffusion key layout.

WebUI-style tools and diffusers' ``from_single_file`` read the layout of the original (CompVis /
Stability "LDM") checkpoints, not diffusers' per-component folders. :func:`export_single_file`
writes the UNet, VAE and text encoder(s) of a diffusers pipeline in that layout:

* UNet: ``model.diffusion_model.*``; VAE: ``first_stage_model.*``;
* text encoder(s): SD 1.x ``cond_stage_model.transformer.text_model.*`` (Hugging Face CLIP names);
  SD 2.x ``cond_stage_model.model.*`` (OpenCLIP names); SDXL ``conditioner.embedders.0.transformer.text_model.*``
  (CLIP ViT-L) and ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG).

The mapping is the inverse of the one diffusers applies when it reads such a file. The LDM UNet
numbers its blocks flat (``input_blocks.<i>``: conv_in, then every resnet(+attention) layer and every
downsampler in order; ``output_blocks.<i>`` likewise for the up path, with the upsampler inside a
level's last layer); the LDM VAE counts its decoder levels from the bottom (``decoder.up.<n-1-i>``)
and keeps 1x1 convolutions where diffusers uses linear attention projections; OpenCLIP fuses the
q/k/v projections into one ``in_proj`` and stores ``text_projection`` transposed.

SD 2.x pipelines carry 23 of OpenCLIP ViT-H's 24 text blocks (SD 2.x conditions on the penultimate
block's output) and no text projection; the file holds what the pipeline has, as diffusers' reader
expects, and LDM-style loaders leave the unused last block at its initial values.

The scheduler and tokenizers are not part of the file (the LDM layout has no place for them); a
loader takes them from the architecture's config (diffusers: ``from_single_file(config=<dir>)``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from conceptsmith import __version__
from conceptsmith.edits import applied_edits, base_fingerprint
from conceptsmith.io import save_safetensors
from conceptsmith.models import detect_family, fingerprint

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
#: Where each family keeps its text encoder(s): pipeline component -> (layout, key prefix).
TEXT_ENCODER_LAYOUTS: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {"text_encoder": ("clip", "cond_stage_model.transformer.")},
    "sd2": {"text_encoder": ("open_clip", "cond_stage_model.model.")},
    "sdxl": {
        "text_encoder": ("clip", "conditioner.embedders.0.transformer."),
        "text_encoder_2": ("open_clip", "conditioner.embedders.1.model."),
    },
}

# ModelSpec (https://github.com/Stability-AI/ModelSpec) header fields that WebUI-style tools display.
_MODELSPEC_IMPLEMENTATION = {
    "sd1": "https://github.com/CompVis/stable-diffusion",
    "sd2": "https://github.com/Stability-AI/stablediffusion",
    "sdxl": "https://github.com/Stability-AI/generative-models",
}

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's size/crop conditioning
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",  # class_embed_type "timestep" / "projection"
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}

_BLOCK = re.compile(
    r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_VAE_BLOCK = re.compile(
    r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


class ExportError(ValueError):
    """A pipeline that cannot be written as a single LDM-layout file; the message says why and what to do."""


def export_single_file(
    pipe: Any,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``pipe``'s UNet, VAE and text encoder(s) to ``path`` as one LDM-layout ``.safetensors`` file.

    Families (:func:`conceptsmith.models.detect_family`): SD 1.x, SD 2.x and SDXL base. ``dtype``
    casts floating-point tensors (e.g. ``torch.float16`` halves the file); by default every tensor
    keeps its dtype, so a round trip is bit-exact. ``metadata`` adds string entries to the file
    header. The file is written to a temporary file beside ``path`` and moved into place, so an
    interrupted export never leaves a partial checkpoint. Returns ``path``.

    Applied ConceptSmith ``weights`` edits are exported as part of the weights; inference-time hook
    edits and unfused peft LoRA adapters are refused (they are not in the weights).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ExportError(
            f"Cannot export to '{path}': single-file checkpoints are written as .safetensors only."
        )
    _refuse_hooks(applied_edits(pipe))
    family = detect_family(pipe)
    tensors = {}
    for key, tensor in ldm_state_dict(pipe, family=family).items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous()

    prediction = getattr(getattr(pipe, "scheduler", None), "config", {}).get("prediction_type", "epsilon")
    provenance = {
        "library_version": __version__,
        "family": family,
        "fingerprint": fingerprint(pipe),
        "base_fingerprint": base_fingerprint(pipe),
        "edits": [{"kind": e.kind, "method": e.method, "concepts": e.concepts} for e in applied_edits(pipe)],
    }
    header = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _modelspec_architecture(family, prediction),
        "modelspec.implementation": _MODELSPEC_IMPLEMENTATION[family],
        "modelspec.title": path.stem,
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "conceptsmith": json.dumps(provenance),
    }
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ExportError(f"Metadata entries must be strings, got {key!r}: {value!r}.")
        header[key] = value
    save_safetensors(path, tensors, header)
    return path


def ldm_state_dict(pipe: Any, family: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors :func:`export_single_file` writes, by LDM key (sharing storage with ``pipe`` where possible)."""
    family = family or detect_family(pipe)
    if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise ExportError(
            "Export needs a pipeline with a UNet and a VAE (a Stable Diffusion text-to-image pipeline)."
        )
    if family == "sdxl" and getattr(pipe, "text_encoder", None) is None:
        raise ExportError(
            "This SDXL pipeline has no first text encoder (an SDXL refiner?); only SDXL base pipelines are exported."
        )
    tensors = _prefixed(UNET_PREFIX, unet_to_ldm(_plain_state_dict(pipe.unet, "unet")))
    tensors.update(_prefixed(VAE_PREFIX, vae_to_ldm(_plain_state_dict(pipe.vae, "vae"))))
    for component, (layout, prefix) in TEXT_ENCODER_LAYOUTS[family].items():
        state = _plain_state_dict(getattr(pipe, component), component)
        convert = clip_to_ldm if layout == "clip" else open_clip_to_ldm
        tensors.update(_prefixed(prefix, convert(state)))
    return tensors


# -- per-component key mappings (diffusers names -> LDM names, prefixes excluded) ---------------------


def unet_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in the LDM ``UNetModel`` layout."""
    return _rename_all(state, unet_ldm_renamer(list(state)), "UNet")


def unet_ldm_renamer(keys: list[str]) -> Callable[[str], str | None]:
    """``rename(diffusers_key) -> LDM key`` (None: no place in the LDM layout) for a UNet with these state-dict
    keys, which fix the flat block numbering (kohya's SDXL LoRA names use it too)."""
    down_layers = _count(keys, "down_blocks", "resnets")
    up_layers = _count(keys, "up_blocks", "resnets")
    has_downsampler = _present(keys, "down_blocks", "downsamplers")
    up_has_attention = _present(keys, "up_blocks", "attentions")
    down_start = _starts([n + (b in has_downsampler) for b, n in enumerate(down_layers)], first=1)
    up_start = _starts(up_layers, first=0)

    def rename(key: str) -> str | None:
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP_LEVEL:
            return f"{_UNET_TOP_LEVEL[module]}.{param}"
        if match := _BLOCK.fullmatch(key):
            direction, block, kind, layer, rest = match.groups()
            block, layer = int(block), int(layer)
            if direction == "down_blocks":
                if kind == "resnets":
                    return _resnet(f"input_blocks.{down_start[block] + layer}.0", rest)
                if kind == "attentions":
                    return f"input_blocks.{down_start[block] + layer}.1.{rest}"
                if kind == "downsamplers" and layer == 0 and rest.startswith("conv."):
                    return f"input_blocks.{down_start[block] + down_layers[block]}.0.op.{rest.removeprefix('conv.')}"
                return None
            if kind == "resnets":
                return _resnet(f"output_blocks.{up_start[block] + layer}.0", rest)
            if kind == "attentions":
                return f"output_blocks.{up_start[block] + layer}.1.{rest}"
            if kind == "upsamplers" and layer == 0 and rest.startswith("conv."):
                slot = 2 if block in up_has_attention else 1  # after [resnet, attention] or [resnet]
                return f"output_blocks.{up_start[block] + up_layers[block] - 1}.{slot}.{rest}"
            return None
        if match := _MID.fullmatch(key):
            kind, layer, rest = match.groups()
            if kind == "resnets":  # middle_block = [resnet, attention, resnet]
                return _resnet(f"middle_block.{2 * int(layer)}", rest)
            return f"middle_block.{2 * int(layer) + 1}.{rest}"
        return None

    return rename


def vae_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the LDM ``AutoencoderKL`` layout."""
    up_levels = len(_count(list(state), "decoder.up_blocks", "resnets"))

    def rename(key: str) -> str | None:
        module, _, param = key.rpartition(".")
        if module in _VAE_TOP_LEVEL:
            return f"{_VAE_TOP_LEVEL[module]}.{param}"
        if match := _VAE_BLOCK.fullmatch(key):
            coder, direction, level, kind, layer, rest = match.groups()
            if coder == "encoder" and direction == "down_blocks":
                where = f"encoder.down.{level}"
            elif coder == "decoder" and direction == "up_blocks":  # LDM counts decoder levels from the bottom
                where = f"decoder.up.{up_levels - 1 - int(level)}"
            else:
                return None
            if kind == "resnets":
                return _mapped_rest(f"{where}.block.{layer}", rest, _VAE_RESNET)
            if layer == "0" and rest.startswith("conv."):
                return f"{where}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
            return None
        if match := _VAE_MID.fullmatch(key):
            coder, kind, layer, rest = match.groups()
            if kind == "resnets":
                return _mapped_rest(f"{coder}.mid.block_{int(layer) + 1}", rest, _VAE_RESNET)
            if layer == "0":
                return _mapped_rest(f"{coder}.mid.attn_1", rest, _VAE_ATTENTION)
        return None

    converted = _rename_all(state, rename, "VAE")
    for key, tensor in converted.items():
        # LDM's VAE attention projects with 1x1 convolutions where diffusers uses linear layers.
        if (
            re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight", key)
            and tensor.ndim == 2
        ):
            converted[key] = tensor.reshape(*tensor.shape, 1, 1)
    return converted


def clip_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP text model, in the Hugging Face names LDM checkpoints keep (``text_model.*``)."""
    converted = {}
    for key, tensor in state.items():
        # transformers >= 5.6 dropped CLIPTextModel's ``text_model.`` level; LDM files keep it.
        if key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            key = f"text_model.{key}"
        converted[key] = tensor
    return converted


def open_clip_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP text model in OpenCLIP's names (fused ``in_proj``, transposed ``text_projection``)."""
    rest: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue  # a buffer (arange), not a weight; OpenCLIP has no such entry
        if qkv := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            layer, which, param = qkv.groups()
            fused.setdefault(f"transformer.resblocks.{layer}.attn.in_proj_{param}", {})[which] = tensor
        else:
            rest[key] = tensor

    def rename(key: str) -> str | None:
        if key in _OPEN_CLIP_TOP_LEVEL:
            return _OPEN_CLIP_TOP_LEVEL[key]
        if key == "text_projection.weight":
            return "text_projection"
        if match := _CLIP_LAYER.fullmatch(key):
            return _mapped_rest(f"transformer.resblocks.{match[1]}", match[2], _OPEN_CLIP_LAYER)
        return None

    converted = _rename_all(rest, rename, "text encoder")
    if "text_projection" in converted:  # OpenCLIP projects x @ text_projection, Hugging Face x @ weight.T
        converted["text_projection"] = converted["text_projection"].T.contiguous()
    for key, parts in fused.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ExportError(
                f"Text encoder attention '{key}' lacks one of its q/k/v projections ({sorted(parts)})."
            )
        converted[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # OpenCLIP fuses q, k, v
    return converted


# -- helpers ---------------------------------------------------------------------------------------


def _refuse_hooks(edits: Iterable[Any]) -> None:
    for edit in edits:
        if edit.kind == "hook":
            raise ExportError(
                f"The applied '{edit.method}' edit of {edit.concepts} is an inference-time hook, not a weight change, "
                "so a checkpoint file cannot carry it. Revert it before exporting, or export a weights-kind edit."
            )
        _refuse_hooks(getattr(edit, "parts", ()))


def _plain_state_dict(module: Any, component: str) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    wrapped = [key for key in state if ".base_layer." in key or ".lora_" in key]
    if wrapped:
        raise ExportError(
            f"The {component} carries peft LoRA adapters (e.g. '{wrapped[0]}'), which are not part of its weights. "
            "Fuse them first (pipe.fuse_lora(); pipe.unload_lora_weights()), or export before loading them "
            "and ship the adapter with Edit.to_lora()."
        )
    return state


def _rename_all(
    state: Mapping[str, torch.Tensor], rename: Callable[[str], str | None], what: str
) -> dict[str, torch.Tensor]:
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        new = rename(key)
        if new is None:
            unknown.append(key)
        elif new in converted:
            raise ExportError(f"{what} parameters '{key}' and another one both map to LDM key '{new}'.")
        else:
            converted[new] = tensor
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ExportError(
            f"{what} parameters without a place in the Stable Diffusion checkpoint layout: {shown}. "
            "This architecture is not an SD 1.x / 2.x / SDXL one; save it with save_pretrained() instead."
        )
    return converted


def _resnet(where: str, rest: str) -> str | None:
    return _mapped_rest(where, rest, _UNET_RESNET)


def _mapped_rest(where: str, rest: str, names: Mapping[str, str]) -> str | None:
    """``<where>.<names[module]>.<param>`` for ``rest = <module>.<param>``; None for an unknown module."""
    module, _, param = rest.rpartition(".")
    return f"{where}.{names[module]}.{param}" if module in names else None


def _count(keys: list[str], blocks: str, kind: str) -> list[int]:
    """Per block of ``<blocks>.<b>.<kind>.<l>.*``, the number of layers ``l``."""
    counts: dict[int, int] = {}
    pattern = re.compile(rf"{re.escape(blocks)}\.(\d+)\.{kind}\.(\d+)\.")
    for key in keys:
        if match := pattern.match(key):
            block, layer = int(match[1]), int(match[2])
            counts[block] = max(counts.get(block, 0), layer + 1)
    if sorted(counts) != list(range(len(counts))):
        raise ExportError(f"Blocks {sorted(counts)} of '{blocks}' are not numbered 0..n-1.")
    return [counts[b] for b in range(len(counts))]


def _present(keys: list[str], blocks: str, kind: str) -> set[int]:
    """The blocks that have ``<blocks>.<b>.<kind>.*`` modules."""
    pattern = re.compile(rf"{re.escape(blocks)}\.(\d+)\.{kind}\.")
    return {int(match[1]) for key in keys if (match := pattern.match(key))}


def _starts(sizes: list[int], first: int) -> list[int]:
    """Flat LDM index of each level's first layer, given the number of layers per level."""
    starts, position = [], first
    for size in sizes:
        starts.append(position)
        position += size
    return starts


def _prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: tensor for key, tensor in state.items()}


def _modelspec_architecture(family: str, prediction: str) -> str:
    if family == "sd1":
        return "stable-diffusion-v1"
    if family == "sd2":
        return "stable-diffusion-v2-768-v" if prediction == "v_prediction" else "stable-diffusion-v2-512"
    return "stable-diffusion-xl-v1-base"

