"""Load a text-to-image pipeline through one door: hub id, local dir, single file or ``builtin:<name>``.

Every editor, evaluator and CLI command obtains its pipeline here, together with a
:class:`ModelInfo` that records the family (which decides how prompts condition the UNet),
the cross-attention geometry, and a fingerprint of the base weights that Edits are bound to.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open

from conceptsmith import identity
from conceptsmith.attention import find_cross_attention
from conceptsmith.config import ModelConfig, load_config
from conceptsmith.devices import DeviceError, resolve_device, resolve_dtype
from conceptsmith.identity import Fingerprint
from conceptsmith.mmdit import is_mmdit, joint_attention, mmdit_family
from conceptsmith.resources import shipped_config
from conceptsmith.validate import looks_like_path, missing_model

Family = Literal["sd1", "sd2", "sdxl", "sd3", "flux"]

#: Modules whose import registers further ``builtin:`` models (imported lazily on first lookup).
BUILTIN_PROVIDERS: tuple[str, ...] = ("conceptsmith.world.pipeline",)


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded; the message names the spec and the fix."""


@dataclass(frozen=True)
class ModelInfo:
    """What an editor needs to know about a loaded pipeline."""

    spec: str
    family: Family
    text_embed_dim: int
    cross_attention_layers: int
    fingerprint: str


@dataclass(frozen=True)
class _Builtin:
    loader: Callable[[torch.dtype, str], object]
    description: str


_BUILTINS: dict[str, _Builtin] = {}


def register_builtin(name: str, loader: Callable[[torch.dtype, str], object], description: str) -> None:
    """Make ``builtin:<name>`` loadable; ``loader(dtype, device)`` returns a diffusers pipeline."""
    _BUILTINS[name] = _Builtin(loader, description)


def list_builtins() -> dict[str, str]:
    """Registered builtin models (name -> description), providers imported."""
    _import_providers()
    return {name: b.description for name, b in sorted(_BUILTINS.items())}


def _import_providers() -> None:
    for module in BUILTIN_PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


@dataclass(frozen=True)
class LoadSpec:
    """A model spec resolved for loading: what to load, in which precision, on which device."""

    spec: str
    dtype: torch.dtype
    device: torch.device
    single_file_config: str | None = None
    config: str | None = None  # the model config file the spec came from, if any


def resolve_model(
    spec: str,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    single_file_config: str | None = None,
) -> LoadSpec:
    """``spec`` with its precision and device; a model config (a ``.yaml`` file, or a name under
    ``configs/models/`` such as ``sd14``) gives its own ``spec``, ``dtype``, ``device`` and
    ``single_file_config``, which explicit arguments override. Unset: float32 on
    :func:`conceptsmith.devices.default_device`."""
    spec = spec.strip()
    path = _model_config_path(spec)
    if path is None:
        return LoadSpec(spec, resolve_dtype(dtype), resolve_device(device), single_file_config)
    config = load_config(path, ModelConfig)
    try:
        resolved = resolve_device(config.device if device is None else device)
    except DeviceError as err:
        if device is not None:
            raise
        raise DeviceError(f"{path} sets device: {config.device}. {err}") from None
    return LoadSpec(
        config.spec.strip(),
        resolve_dtype(config.dtype if dtype is None else dtype),
        resolved,
        single_file_config or config.single_file_config,
        str(path),
    )


def _model_config_path(spec: str) -> Path | None:
    """The model config ``spec`` names: a ``.yaml`` / ``.yml`` path, or the name of a shipped
    ``configs/models/<name>.yaml`` (when no local file or folder of that name exists)."""
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml"):
        return path
    if spec and not any(c in spec for c in "/\\:.") and not path.exists():
        shipped = shipped_config(f"models/{spec}.yaml")
        if shipped.is_file():
            return shipped
    return None


def load_pipeline(
    spec: str,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    single_file_config: str | None = None,
) -> tuple[object, ModelInfo]:
    """Load ``spec`` on ``device`` in ``dtype`` and describe it.

    ``spec`` is a hub id (``CompVis/stable-diffusion-v1-4``), a local diffusers directory, a
    single ``.safetensors`` checkpoint (``single_file_config`` may name a local diffusers
    directory with the matching architecture, for offline use), ``builtin:<name>``, or a model
    config (``configs/models/sd14.yaml`` or its name ``sd14``). ``dtype``: float32 | float16 |
    bfloat16; ``device``: cpu | cuda | cuda:N | mps | auto; ``None`` takes the model config's
    value, else float32 on :func:`conceptsmith.devices.default_device` (see :func:`resolve_model`).
    """
    target = resolve_model(spec, dtype, device, single_file_config)
    spec, dtype, device = target.spec, target.dtype, target.device
    if not spec:
        raise ModelLoadError("Empty model spec: pass a hub id, a local directory, a .safetensors file or builtin:<name>.")
    if spec.startswith("builtin:"):
        pipe = _load_builtin(spec.removeprefix("builtin:"), dtype, str(device))
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            pipe = _load_directory(path, dtype)
        elif path.is_file():
            pipe = _load_single_file(path, dtype, target.single_file_config)
        elif looks_like_path(spec):
            raise ModelLoadError(missing_model(spec))
        else:
            pipe = _load_hub(spec, dtype)
    pipe = pipe.to(device)
    return pipe, describe(pipe, spec)


def describe(pipe: object, spec: str = "<in-memory>") -> ModelInfo:
    """ModelInfo of an already loaded pipeline."""
    if is_mmdit(pipe):  # the text width the transformer reads, and its joint-attention blocks
        return ModelInfo(
            spec=spec,
            family=detect_family(pipe),
            text_embed_dim=int(pipe.transformer.config.joint_attention_dim),
            cross_attention_layers=len(joint_attention(pipe.transformer)),
            fingerprint=fingerprint(pipe),
        )
    layers = find_cross_attention(pipe.unet)
    return ModelInfo(
        spec=spec,
        family=detect_family(pipe),
        text_embed_dim=layers[0].d_in if layers else int(pipe.unet.config.cross_attention_dim),
        cross_attention_layers=len(layers),
        fingerprint=fingerprint(pipe),
    )


def detect_family(pipe: object) -> Family:
    """SDXL conditions on two encoders plus time ids; SD 2.x uses linear projections and 1024-d text;
    SD3 and FLUX are MMDiT pipelines (a ``transformer``, no UNet), told apart by the transformer's class."""
    if is_mmdit(pipe):
        return mmdit_family(pipe.transformer)
    unet_config = pipe.unet.config
    if getattr(pipe, "text_encoder_2", None) is not None or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("cross_attention_dim") == 1024 or unet_config.get("use_linear_projection"):
        return "sd2"
    return "sd1"


def fingerprint(pipe: object) -> Fingerprint:
    """The base identity of ``pipe``: every tensor of every model component (UNet or transformer, text
    encoders, VAE), whole, at float16 precision, plus the scheduler's class and config; 16 hex digits
    that carry per-component and per-module digests. :mod:`conceptsmith.identity` defines it."""
    return identity.fingerprint(pipe)


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword: ``dtype`` where diffusers deprecated ``torch_dtype``, else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    name = "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    return {name: dtype}


def _load_builtin(name: str, dtype: torch.dtype, device: str) -> object:
    if name not in _BUILTINS:
        _import_providers()
    if name not in _BUILTINS:
        known = ", ".join(f"builtin:{n}" for n in sorted(_BUILTINS)) or "none registered"
        raise ModelLoadError(f"Unknown builtin model 'builtin:{name}'. Known builtins: {known}.")
    return _BUILTINS[name].loader(dtype, device)


def _load_directory(path: Path, dtype: torch.dtype) -> object:
    from diffusers import DiffusionPipeline

    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"'{path}' is a directory but not a diffusers pipeline (no model_index.json). "
            "Pass the folder written by pipe.save_pretrained(), or a single .safetensors checkpoint."
        )
    # only pipelines that have a safety checker take the keyword (SD3 / FLUX would warn that they ignore it)
    unchecked = {"safety_checker": None} if '"safety_checker"' in (path / "model_index.json").read_text() else {}
    return DiffusionPipeline.from_pretrained(path, **unchecked, **dtype_kwargs(dtype))


def _load_single_file(path: Path, dtype: torch.dtype, config: str | None) -> object:
    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"Refusing to load '{path}': only .safetensors checkpoints are loaded (pickled formats such as "
            f"{path.suffix or 'this one'} can execute code). Convert it to .safetensors first."
        )
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    if config is not None and not (Path(config).expanduser() / "model_index.json").is_file():
        raise ModelLoadError(
            f"single_file_config '{config}' is not a diffusers pipeline directory (no model_index.json). Pass the "
            "folder pipe.save_pretrained() wrote for a model of the checkpoint's architecture (only its configs are read)."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            is_xl = any(key.startswith("conditioner.embedders.1") for key in handle.keys())
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(
            f"'{path}' is not a readable .safetensors checkpoint ({err}): the file is truncated or damaged, or not a "
            "safetensors file. Download or export it again."
        ) from err
    pipeline_cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    kwargs: dict[str, object] = dtype_kwargs(dtype)
    if config is not None:
        kwargs["config"] = str(Path(config).expanduser())
        hint = f"Check that '{config}' is a diffusers directory of the same architecture as the checkpoint."
    else:
        hint = (
            "Offline, pass single_file_config (CLI: --single-file-config) = a local diffusers directory of the same "
            "architecture."
        )
    try:
        pipe = pipeline_cls.from_single_file(str(path), **kwargs)
    except (OSError, ValueError, KeyError, SingleFileComponentError) as err:
        raise ModelLoadError(
            f"Could not load single-file checkpoint '{path}' as {pipeline_cls.__name__}: {err}. {hint}"
        ) from err
    # diffusers leaves parameters the file lacks on the meta device instead of failing
    missing = [
        f"{name}.{param}"
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        if isinstance(module := getattr(pipe, name, None), torch.nn.Module)
        for param, tensor in module.named_parameters()
        if tensor.is_meta
    ]
    if missing:
        raise ModelLoadError(
            f"Single-file checkpoint '{path}' has no weights for {len(missing)} parameters of the configured "
            f"architecture (e.g. '{missing[0]}'). {hint}"
        )
    return pipe


def _load_hub(spec: str, dtype: torch.dtype) -> object:
    from diffusers import DiffusionPipeline

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}
    try:
        return DiffusionPipeline.from_pretrained(
            spec, safety_checker=None, local_files_only=offline, **dtype_kwargs(dtype)
        )
    except (OSError, ValueError) as err:
        where = "offline (HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache" if offline else "from the hub"
        raise ModelLoadError(
            f"Could not resolve hub model '{spec}' {where}. On a machine with network access run "
            f"`huggingface-cli download {spec} --local-dir ./{spec.split('/')[-1]}` and pass that directory "
            f"(--model ./{spec.split('/')[-1]}), or use --model builtin:shapes."
        ) from err
