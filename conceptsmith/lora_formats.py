"""Key layouts of LoRA and textual-inversion files, both directions, in one place.

ConceptSmith names a module ``<component>.<path>`` (``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``,
``text_encoder.encoder.layers.0.self_attn.q_proj``). LoRA files name it:

* **diffusers** (``pipe.load_lora_weights``): ``<component>.<path>.lora_A.weight`` ``[r, in]`` and
  ``.lora_B.weight`` ``[out, r]``, CLIP text encoders with their ``text_model.`` level; one peft ``LoraConfig``
  per component in the header entry ``lora_adapter_metadata`` (``<component>.lora_alpha`` ...). Older
  diffusers files (``to_q_lora.down``, ``lora_linear_layer``) are read through diffusers' own converters.
* **peft** (``model.save_pretrained`` of one adapted model): ``base_model.model.<path>.lora_A.weight`` with
  ``adapter_config.json`` beside it.
* **kohya** (sd-scripts ``networks.lora``; read by A1111 / ComfyUI / diffusers): ``<prefix>_<path, '.' -> '_'>``
  + ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (scale ``alpha / rank``); prefixes ``lora_unet``,
  ``lora_te`` (SDXL: ``lora_te1`` / ``lora_te2``). sd-scripts trains SD 1.x/2.x on a UNet with diffusers' module
  names and SDXL on the original (SGM) UNet, so SDXL UNet paths use its flat numbering
  (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, ``middle_block.1``, ``output_blocks.0.1``; resnets
  ``in_layers.2`` / ``out_layers.3`` / ``emb_layers.1`` / ``skip_connection``). Header: ``ss_network_module``,
  ``ss_network_dim``, ``ss_network_alpha`` (``Dynamic`` when ranks differ, as sd-scripts' resize writes),
  ``ss_base_model_version`` (``sd_v1`` / ``sd_v2`` / ``sdxl_base_v1-0``).

Textual-inversion files (one token each):

* **diffusers** (``pipe.load_textual_inversion``): ``{token: [n, d]}``; SDXL ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``.
* **a1111** (WebUI / ComfyUI, trigger word = file name): ``{"emb_params": [n, d]}`` (sd-scripts) or a ``.pt`` with
  ``string_to_param["*"]`` and ``name``; SDXL ``clip_l`` / ``clip_g`` as above.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from conceptsmith.architectures import SDXL_UNET
from conceptsmith.export import unet_ldm_renamer
from conceptsmith.io import save_safetensors
from conceptsmith.lora_layouts import LAYOUTS
from conceptsmith.tokens import token_entries, token_parts

COMPONENTS: tuple[str, ...] = ("unet", "transformer", "text_encoder", "text_encoder_2")  # transformer: SD3 / FLUX (diffusers only)
KOHYA_PREFIXES: tuple[str, ...] = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
KOHYA_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
TI_COMPONENT = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}  # SDXL textual-inversion keys
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_PEFT_PREFIX = "base_model.model."

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (up [out, r, ...], down [r, in, ...])


class LoraFormatError(ValueError):
    """A LoRA or embedding file whose layout is unknown or does not fit the model; names the first bad key."""


# -- writing LoRA files -------------------------------------------------------------------------------


def lora_file(
    factors: Factors, layout: str, family: str, unet_shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, header)`` of a LoRA file in ``layout`` with scale 1 everywhere (alpha = rank).

    ``unet_shapes``: ``{state-dict key: shape}`` of the base UNet, which fixes SDXL's flat block numbering in
    the kohya layout (default: SDXL base's architecture, checked against the factors' shapes).
    """
    if layout not in LAYOUTS:
        raise LoraFormatError(f"Unknown LoRA format '{layout}'; choose one of {', '.join(LAYOUTS)}.")
    for module in factors:
        if module.partition(".")[0] not in COMPONENTS:
            raise LoraFormatError(f"Module '{module}' is outside the UNet and text encoders, which is all a LoRA file can hold.")
    if layout == "diffusers":
        return _diffusers_file(factors)
    return _kohya_file(factors, family, unet_shapes)


def diffusers_key(module: str) -> str:
    """``module``'s name in a diffusers LoRA file (CLIP text encoders keep their ``text_model.`` level there)."""
    component, _, name = module.partition(".")
    if component.startswith("text_encoder"):
        return f"{component}.text_model.{name.removeprefix('text_model.')}"
    return module


def _diffusers_file(factors: Factors) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, dict[str, int]] = {}
    for module, (up, down) in factors.items():
        key = diffusers_key(module)
        tensors[f"{key}.lora_A.weight"] = down
        tensors[f"{key}.lora_B.weight"] = up
        component, _, name = key.partition(".")
        ranks.setdefault(component, {})[name.removeprefix("text_model.")] = up.shape[1]
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(_adapter_metadata(ranks))}


def _adapter_metadata(ranks: dict[str, dict[str, int]]) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata``: a LoraConfig per component with alpha == rank (scale 1) everywhere."""
    metadata: dict[str, Any] = {}
    for component, module_ranks in ranks.items():
        common = _most_common(module_ranks.values())
        pattern = {name: r for name, r in module_ranks.items() if r != common}
        config = {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": pattern, "target_modules": sorted(module_ranks)}
        metadata.update({f"{component}.{key}": value for key, value in config.items()})
    return metadata


def _most_common(values: Iterable[int]) -> int:
    values = list(values)
    return max(set(values), key=values.count)


def _kohya_file(
    factors: Factors, family: str, unet_shapes: Mapping[str, Sequence[int]] | None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if family not in KOHYA_BASE_MODEL_VERSION:
        raise LoraFormatError(f"kohya LoRA files exist for SD 1.x, SD 2.x and SDXL UNets; this edit is for a '{family}' model.")
    rename = None
    if family == "sdxl":
        rename = _sgm_renamer(unet_shapes, {m: (up.shape[0], *down.shape[1:]) for m, (up, down) in factors.items()})
    # One alpha for every module (the most common rank; up carries rank / alpha where the rank differs): readers
    # that turn per-module alphas into patterns (diffusers' alpha_pattern) then have nothing to get wrong.
    ranks = [up.shape[1] for up, _ in factors.values()]
    alpha = _most_common(ranks)
    tensors: dict[str, torch.Tensor] = {}
    for module, (up, down) in factors.items():
        name = kohya_name(module, family, rename)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up if up.shape[1] == alpha else up * (up.shape[1] / alpha)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    header = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(alpha) if len(set(ranks)) == 1 else "Dynamic",
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": KOHYA_BASE_MODEL_VERSION[family],
        "ss_v2": str(family == "sd2"),
    }
    return tensors, header


def kohya_name(module: str, family: str, sgm_rename: Any = None) -> str:
    """``module``'s kohya name, e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in`` or ``lora_te1_text_model_...``.

    ``sgm_rename`` (SDXL): maps a diffusers UNet key to its SGM key (:func:`conceptsmith.export.unet_ldm_renamer`).
    """
    component, _, name = module.partition(".")
    if component == "unet":
        prefix = "lora_unet"
        if sgm_rename is not None:
            renamed = sgm_rename(f"{name}.weight")
            if renamed is None:
                raise LoraFormatError(f"UNet module '{name}' has no place in SDXL's original block layout; it cannot be written for kohya.")
            name = renamed.removesuffix(".weight")
    elif component.startswith("text_encoder"):
        prefix = {"text_encoder": "lora_te1" if family == "sdxl" else "lora_te", "text_encoder_2": "lora_te2"}[component]
        name = "text_model." + name.removeprefix("text_model.")
    else:
        raise LoraFormatError(f"Module '{module}' is not in a UNet or text encoder; kohya LoRA files cannot hold it.")
    return f"{prefix}_{name.replace('.', '_')}"


def _sgm_renamer(unet_shapes: Mapping[str, Sequence[int]] | None, weight_shapes: Mapping[str, Sequence[int]]) -> Any:
    """diffusers -> SGM UNet key renaming for the UNet of ``unet_shapes`` (default: SDXL base's architecture),
    after checking that the changed UNet modules (``weight_shapes``) have these shapes there."""
    given = unet_shapes is not None
    if unet_shapes is None:
        unet_shapes = _sdxl_base_unet_shapes()
    for module, shape in weight_shapes.items():
        component, _, name = module.partition(".")
        if component == "unet" and tuple(unet_shapes.get(f"{name}.weight", ())) != tuple(shape):
            where = "the given UNet" if given else "SDXL base's UNet (pass the edit's base model to number the blocks of another one)"
            raise LoraFormatError(f"UNet module '{name}' with weight shape {list(shape)} is not in {where}.")
    return unet_ldm_renamer(list(unet_shapes))


@functools.cache
def _sdxl_base_unet_shapes() -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of SDXL base's UNet, built on the meta device (no weights)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return {key: tuple(value.shape) for key, value in UNet2DConditionModel(**SDXL_UNET).state_dict().items()}


# -- reading LoRA files -------------------------------------------------------------------------------


def detect_layout(state: Mapping[str, Any]) -> str:
    """``kohya``, ``diffusers``, ``peft`` or ``textual-inversion``; a clear error naming the first key otherwise."""
    keys = list(state)
    if not keys:
        raise LoraFormatError("The file holds no tensors.")
    if is_textual_inversion(state):
        return "textual-inversion"
    for layout, fits in (
        ("kohya", lambda k: k.startswith(KOHYA_PREFIXES)),
        ("diffusers", lambda k: k.partition(".")[0] in COMPONENTS),
        ("peft", lambda k: k.startswith(_PEFT_PREFIX)),
    ):
        if fits(keys[0]):
            other = next((k for k in keys if not fits(k)), None)
            if other is not None:
                raise LoraFormatError(f"Key '{other}' does not fit the {layout} LoRA layout of the file's other keys (e.g. '{keys[0]}').")
            return layout
    raise LoraFormatError(
        f"Unknown file layout: key '{keys[0]}' is none of kohya (lora_unet_* / lora_te*_), diffusers (unet.* / "
        "text_encoder*.* with lora_A/lora_B), peft (base_model.model.*) or a textual-inversion embedding."
    )


def from_kohya(state: Mapping[str, torch.Tensor], unet_config: Any) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """``{peft module key: (file name, up, down)}`` of a kohya file, alpha / rank folded into ``up``.

    Names go through diffusers' own kohya readers (``_maybe_map_sgm_blocks_to_diffusers`` with ``unet_config``
    for SGM block numbers, ``_convert_non_diffusers_lora_to_diffusers``), one module at a time so that every
    result remembers the key it came from.
    """
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    for key in state:
        if not key.endswith(_KOHYA_SUFFIXES):
            raise LoraFormatError(
                f"Key '{key}' is not a LoRA tensor (.lora_down.weight / .lora_up.weight / .alpha); LyCORIS (LoHa, LoKr) "
                "and DoRA files are not supported."
            )
    result: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
    for key in state:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        down, up = state[key].float(), _pair(state, name, ".lora_up.weight").float()
        alpha = state.get(f"{name}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0  # sd-scripts: no alpha means alpha = rank
        single = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up * scale}
        try:
            single = _maybe_map_sgm_blocks_to_diffusers(single, unet_config)
            converted, _ = _convert_non_diffusers_lora_to_diffusers(single)
        except (ValueError, IndexError, KeyError) as err:
            raise LoraFormatError(f"kohya key '{name}' has no diffusers counterpart ({err}).") from None
        module, pair = _peft_pair(_to_peft(converted), name)
        result[module] = (name, *pair)
    for key in state:
        if key.endswith(".lora_up.weight") and key.removesuffix(".lora_up.weight") + ".lora_down.weight" not in state:
            raise LoraFormatError(f"Key '{key}' has no matching '.lora_down.weight'.")
    return result


def from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """``{peft module key: (file key, up, down)}`` of a diffusers-layout file (old layouts converted by diffusers)."""
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        by_component.setdefault(key.partition(".")[0], {})[key] = value
    result: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
    for tensors in by_component.values():
        converted = _to_peft(tensors)
        origin = dict(zip(converted, tensors, strict=True))  # diffusers' converters rename key by key, in order
        result.update(_group_pairs(converted, origin))
    return result


def from_peft(state: Mapping[str, torch.Tensor], component: str) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """``{peft module key: (file key, up, down)}`` of a peft ``save_pretrained`` file of ``component``."""
    converted = {f"{component}.{key.removeprefix(_PEFT_PREFIX)}": value for key, value in state.items()}
    return _group_pairs(converted, dict(zip(converted, state, strict=True)))


def _to_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One component's LoRA tensors in peft names, as diffusers' loaders convert them."""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if all(".lora_A." in key or ".lora_B." in key for key in tensors):
        return dict(tensors)
    if next(iter(tensors)).startswith("unet."):
        return convert_unet_state_dict_to_peft(tensors)
    old = any("_lora.down." in key or "_lora.up." in key for key in tensors)  # to_q_lora.down: kohya's and old diffusers'
    return convert_state_dict_to_peft(tensors, original_type=StateDictType.DIFFUSERS_OLD if old else StateDictType.DIFFUSERS)


def _group_pairs(converted: Mapping[str, torch.Tensor], origin: Mapping[str, str]) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    result: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
    for key in converted:
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            if key.endswith(suffix):
                module = key.removesuffix(suffix)
                if module not in result:
                    up = _pair(converted, module, ".lora_B.weight", origin[key])
                    down = _pair(converted, module, ".lora_A.weight", origin[key])
                    result[module] = (origin[key], up.float(), down.float())
                break
        else:
            raise LoraFormatError(f"Key '{origin[key]}' is not a LoRA tensor (no lora_A / lora_B); this layout is not supported.")
    return result


def _peft_pair(converted: Mapping[str, torch.Tensor], name: str) -> tuple[str, tuple[torch.Tensor, torch.Tensor]]:
    modules = {key.rsplit(".lora_", 1)[0] for key in converted}
    if len(modules) != 1 or len(converted) != 2:
        raise LoraFormatError(f"kohya key '{name}' converts to {sorted(converted)}, not one lora_A/lora_B pair.")
    (module,) = modules
    return module, (_pair(converted, module, ".lora_B.weight", name), _pair(converted, module, ".lora_A.weight", name))


def _pair(tensors: Mapping[str, torch.Tensor], module: str, suffix: str, named: str | None = None) -> torch.Tensor:
    if f"{module}{suffix}" not in tensors:
        raise LoraFormatError(f"Key '{named or module}' has no matching '{suffix}' tensor.")
    return tensors[f"{module}{suffix}"]


def lora_configs(header: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Per component, the ``LoraConfig`` fields of a diffusers file's ``lora_adapter_metadata`` (empty: scale 1)."""
    raw = header.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoraFormatError(f"The file's lora_adapter_metadata is not valid JSON ({err}).") from None
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return {component: config for component, config in configs.items() if "lora_alpha" in config}


# -- textual inversion --------------------------------------------------------------------------------


def is_textual_inversion(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is an embedding file (diffusers, A1111, sd-scripts or SDXL layout) rather than a LoRA."""
    if "string_to_param" in state or "emb_params" in state or set(state) == set(TI_COMPONENT):
        return True
    if len(state) == 1:
        key, value = next(iter(state.items()))
        looks_like_a_weight = "lora" in key or key.endswith((".weight", ".bias", ".alpha"))
        return not looks_like_a_weight and isinstance(value, torch.Tensor) and value.ndim in (1, 2)
    return False


def read_textual_inversion(state: Mapping[str, Any], header: Mapping[str, str], stem: str) -> tuple[str, dict[str, torch.Tensor]]:
    """``(token, {component: [n, d]})``. The token: the file's own (diffusers key, A1111 ``name``, our ``token``
    header entry), else the file name as WebUI does."""
    if set(state) == set(TI_COMPONENT):
        vectors = {TI_COMPONENT[key]: state[key] for key in TI_COMPONENT}
        token = header.get("token") or stem
    elif "string_to_param" in state:
        params = state["string_to_param"]
        if not isinstance(params, Mapping) or "*" not in params:
            raise LoraFormatError("A1111 embedding without string_to_param['*']; the file is damaged or of another kind.")
        vectors, token = {"text_encoder": params["*"]}, str(state.get("name") or stem)
    elif "emb_params" in state:
        vectors, token = {"text_encoder": state["emb_params"]}, header.get("token") or stem
    else:
        token, vector = next(iter(state.items()))
        vectors = {"text_encoder": vector}
    checked = {}
    for component, value in vectors.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.ndim not in (1, 2):
            raise LoraFormatError(f"The embedding for {component} must be a float tensor [d] or [n, d].")
        checked[component] = value.detach().float().reshape(-1, value.shape[-1]).clone()
    return token, checked


def textual_inversion_file(layout: str, token: str, vectors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, header)`` of one token's embedding file: ``diffusers`` ``{token: [n, d]}`` or ``kohya`` (A1111 /
    sd-scripts) ``{"emb_params": [n, d]}``; SDXL ``{"clip_l", "clip_g"}`` in both."""
    if set(vectors) == set(TI_COMPONENT.values()):
        tensors = {key: vectors[component] for key, component in TI_COMPONENT.items()}
    else:
        tensors = {token if layout == "diffusers" else "emb_params": vectors["text_encoder"]}
    return {k: v.float().contiguous() for k, v in tensors.items()}, {"format": "pt", "token": token}


def token_files(lora_path: str | Path, tokens: list[str], layout: str) -> dict[str, Path]:
    """Where the tokens of an exported LoRA go: diffusers ``<stem>.ti.safetensors`` (several tokens:
    ``<stem>.<token>.ti.safetensors``); kohya ``<token>.safetensors`` beside it (WebUI: the file name is the trigger word)."""
    lora_path = Path(lora_path)
    slugs = {token: re.sub(r"[^A-Za-z0-9_-]+", "", token) or "token" for token in tokens}
    if len(set(slugs.values())) != len(slugs):
        raise LoraFormatError(f"Tokens {tokens} have the same file-name form; rename one of them.")
    if layout == "kohya":
        paths = {token: lora_path.with_name(f"{slug}.safetensors") for token, slug in slugs.items()}
    elif len(tokens) == 1:
        paths = {tokens[0]: lora_path.with_name(f"{lora_path.stem}.ti.safetensors")}
    else:
        paths = {token: lora_path.with_name(f"{lora_path.stem}.{slug}.ti.safetensors") for token, slug in slugs.items()}
    clash = [token for token, path in paths.items() if path == lora_path]
    if clash:
        raise LoraFormatError(f"The embedding of {clash[0]!r} would overwrite the LoRA file '{lora_path}'; choose another LoRA file name.")
    return paths


def edit_tokens(edit: Any) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """``(token, {component: [n, d]})`` of every token ``edit`` (or one of its parts) learned."""
    tokens: list[tuple[str, dict[str, torch.Tensor]]] = []
    for part in token_parts(edit):
        entries = {component: dict(items) for component, items in token_entries(part).items()}
        for token in dict.fromkeys(t for items in entries.values() for t in items):
            tokens.append((token, {component: items[token] for component, items in entries.items() if token in items}))
    return tokens


def write_token_files(tokens: list[tuple[str, dict[str, torch.Tensor]]], lora_path: str | Path, layout: str) -> list[Path]:
    """Write each token's embedding file beside the LoRA at ``lora_path`` (:func:`token_files`); returns the paths."""
    paths = token_files(lora_path, [token for token, _ in tokens], layout)
    for token, vectors in tokens:
        tensors, header = textual_inversion_file(layout, token, vectors)
        save_safetensors(paths[token], tensors, header)
    return list(paths.values())
