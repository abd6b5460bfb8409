"""Users' own files as Edits: ``conceptsmith import FILE -m MODEL -o EDIT``.

* A LoRA (kohya / sd-scripts, diffusers, peft; :mod:`conceptsmith.lora_formats`) becomes a ``weights`` edit:
  per linear module the exact low-rank update ``(up, down)``, per convolution its dense change, with the
  file's scale folded in (kohya ``alpha / rank``; diffusers and peft ``lora_alpha / r`` with ``alpha_pattern``
  and rsLoRA, the ``LoraConfig`` of the file's ``lora_adapter_metadata`` or ``adapter_config.json``). As a
  ``weights`` edit it composes, scales, merges (including the closed-form merge) and exports like any other.
* A textual-inversion embedding (diffusers ``{token: vectors}``, A1111 ``string_to_param`` / ``emb_params``,
  SDXL ``clip_l`` + ``clip_g``) becomes a ``custom-tokens`` edit, the form textual inversion's own edits take.

The edit is bound to the model it was imported for (its base fingerprint). Every module must exist in that
model with the file's shapes; the first key that does not is named in the error. Weights are read only from
``.safetensors`` or with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from conceptsmith.edits import Edit, base_fingerprint, locate_module
from conceptsmith.lora_formats import (
    LoraFormatError,
    detect_layout,
    from_diffusers,
    from_kohya,
    from_peft,
    lora_configs,
    read_textual_inversion,
)
from conceptsmith.models import detect_family
from conceptsmith.tokens import check_new_tokens, components, token_edit

#: Files looked for, in order, when the path given is a folder (diffusers, peft and diffusers TI file names).
FOLDER_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "learned_embeds.safetensors",
                "pytorch_lora_weights.bin", "adapter_model.bin", "learned_embeds.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_LoraPairs = dict[str, tuple[str, torch.Tensor, torch.Tensor]]


def import_file(path: str | Path, pipe: Any, *, token: str | None = None, concepts: list[str] | None = None) -> Edit:
    """The Edit of the LoRA or embedding at ``path`` (a file, or a folder holding one of :data:`FOLDER_FILES`) for ``pipe``.

    ``token``: the token an embedding gets (default: the file's own, else the file name). ``concepts``: what
    the edit is about, also the phrases a closed-form merge constrains (default: the token, or the file name).
    """
    path = _resolve_path(Path(path))
    state, header = read_weights(path)
    layout = detect_layout(state)
    if layout == "textual-inversion":
        return _embedding_edit(pipe, path, state, header, token, concepts)
    if layout == "kohya":
        if getattr(pipe, "unet", None) is None:
            raise LoraFormatError(f"'{path}' is a kohya LoRA for a UNet, but this model has none.")
        pairs, configs = from_kohya(state, pipe.unet.config), {}
    elif layout == "diffusers":
        pairs, configs = from_diffusers(state), lora_configs(header)
    else:
        config = _peft_config(path)
        component = _peft_component(pipe, state)
        pairs, configs = from_peft(state, component), {component: config}
    return _lora_edit(pipe, path, layout, pairs, configs, header, concepts)


def read_weights(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, header metadata)`` of a ``.safetensors`` file, or of a pickle read with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
        except (SafetensorError, OSError) as err:
            raise LoraFormatError(f"'{path}' is not a valid safetensors file ({err}).") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise LoraFormatError(f"'{path}' is neither .safetensors nor a PyTorch file ({', '.join(PICKLE_SUFFIXES)}).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler's refusals come in many types
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        reason = f"it holds a pickled {found[1]}" if found else str(err).strip().splitlines()[0][:200]
        raise LoraFormatError(
            f"'{path}' cannot be read with torch.load(weights_only=True): {reason}. Files that need full unpickling are "
            "never loaded because unpickling can run arbitrary code; convert it to .safetensors."
        ) from None
    if not isinstance(state, Mapping):
        raise LoraFormatError(f"'{path}' holds a {type(state).__name__}, not a dict of tensors.")
    return dict(state), {}


def _resolve_path(path: Path) -> Path:
    if path.is_dir():
        found = next((path / name for name in FOLDER_FILES if (path / name).is_file()), None)
        if found is None:
            raise LoraFormatError(f"Folder '{path}' holds none of {', '.join(FOLDER_FILES)}; pass the LoRA or embedding file itself.")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist (pass a LoRA or embedding file, or its folder).")
    return path


def _peft_config(path: Path) -> dict[str, Any]:
    config_path = path.with_name("adapter_config.json")
    if not config_path.is_file():
        raise LoraFormatError(f"'{path}' is a peft adapter (base_model.model.* keys) but '{config_path}' (its LoraConfig) is missing.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LoraFormatError(f"'{config_path}' is not valid JSON ({err}).") from None
    if config.get("peft_type", "LORA") != "LORA" or "lora_alpha" not in config:
        raise LoraFormatError(f"'{config_path}' is not a LoRA config (peft_type {config.get('peft_type')!r}); only LoRA adapters import.")
    return config


def _peft_component(pipe: Any, state: Mapping[str, torch.Tensor]) -> str:
    """The pipeline component whose modules a peft adapter (of one model) names."""
    present = [c for c in ("unet", "transformer", "text_encoder", "text_encoder_2") if isinstance(getattr(pipe, c, None), torch.nn.Module)]
    misses: dict[str, str] = {}
    for component in present:
        pairs = from_peft(state, component)
        missing = next((origin for module, (origin, _, _) in pairs.items() if _find(pipe, module) is None), None)
        if missing is None:
            return component
        misses[component] = missing
    first = next(iter(misses.items()), ("model", next(iter(state))))
    raise LoraFormatError(f"Key '{first[1]}' of the peft adapter matches no module of this model's {' / '.join(present)}.")


def _find(pipe: Any, module: str) -> tuple[str, torch.Size] | None:
    """``(path as an edit names it, weight shape)`` of the module a LoRA file calls ``module``; None if absent."""
    found = locate_module(pipe, module)
    weight = None if found is None else getattr(found[1], "weight", None)
    return (found[0], weight.shape) if isinstance(weight, torch.Tensor) else None


def _lora_edit(
    pipe: Any, path: Path, layout: str, pairs: _LoraPairs, configs: dict[str, Any], header: Mapping[str, str], concepts: list[str] | None
) -> Edit:
    tensors: dict[str, torch.Tensor] = {}
    for module, (origin, up, down) in pairs.items():
        found = _find(pipe, module)
        if found is None:
            raise LoraFormatError(f"Key '{origin}' of '{path.name}' matches no module of this model (looked for '{module}').")
        target, shape = found
        if tuple(shape) != (up.shape[0], *down.shape[1:]) or up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                f"Key '{origin}' of '{path.name}' has LoRA shapes up {list(up.shape)} / down {list(down.shape)}, but module "
                f"'{target}' of this model has weight shape {list(shape)}: the file was made for another base model."
            )
        tensors[f"{target}.lora_A.weight"], tensors[f"{target}.lora_B.weight"] = down, up
    concepts = list(concepts or [path.stem])
    params = {"source": path.name, "format": layout, "phrases": concepts, "prompt_templates": ["{}"]}
    metadata = {"source_header": {k: v for k, v in header.items() if len(v) <= 512 and k != "format"}}
    # Edit.from_lora folds each module's scale (peft's alpha / r, alpha_pattern, rsLoRA) into lora_B.
    folded = Edit.from_lora("import", concepts, params, base_fingerprint(pipe), detect_family(pipe), tensors, configs)
    deltas: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}
    for key, up in folded.tensors.items():
        if key.endswith(".lora_B.weight"):
            module = key.removesuffix(".lora_B.weight")
            down = folded.tensors[f"{module}.lora_A.weight"]
            deltas[module] = (up, down) if up.ndim == 2 else (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return Edit.from_weight_deltas("import", concepts, params, folded.base_fingerprint, folded.family, deltas, metadata)


def _embedding_edit(
    pipe: Any, path: Path, state: Mapping[str, Any], header: Mapping[str, str], token: str | None, concepts: list[str] | None
) -> Edit:
    file_token, vectors = read_textual_inversion(state, header, path.stem)
    token = token or file_token
    present = components(pipe)
    if sorted(vectors) != sorted(present):
        raise LoraFormatError(
            f"The embedding '{path.name}' has vectors for {sorted(vectors)}, but this model's text encoders are {present}: "
            "it was made for another model family (SDXL embeddings hold clip_l and clip_g)."
        )
    counts = {rows.shape[0] for rows in vectors.values()}
    if len(counts) != 1:
        raise LoraFormatError(f"The embedding '{path.name}' has different vector counts per text encoder ({sorted(counts)}).")
    for component, rows in vectors.items():
        width = int(getattr(pipe, component).get_input_embeddings().embedding_dim)
        if rows.shape[1] != width:
            raise LoraFormatError(
                f"The embedding '{path.name}' has {rows.shape[1]}-d vectors for {component}, which embeds tokens in {width} "
                "dims: it was made for another base model."
            )
    check_new_tokens(pipe, [token])
    tensors = {f"{component}.{token}": rows for component, rows in vectors.items()}
    params = {"source": path.name, "format": "textual-inversion", "phrases": list(concepts or [token]), "prompt_templates": ["{}"]}
    return token_edit(pipe, "import", list(concepts or [token]), params, tensors)
