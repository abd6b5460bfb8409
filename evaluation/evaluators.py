"""Loading CLIP evaluators: one door for every evaluator (``load_evaluator``):
* ``"builtin:shapes-clip"`` -- ShapesWorld's own tiny CLIP (``conceptsmith.world.clip_train``);
* ``"NAME/PRETRAINED"`` -- any open_clip architecture and pretrained tag, e.g. ``"ViT-L-14/openai"``
  (``PRETRAINED`` may also be a path to a weights file);
* ``"hf-hub:org/repo"`` / ``"local-dir:/path"`` -- open_clip's own schemas, passed through;
* a local directory holding ``open_clip_config.json`` and weights;
* a local weights file (``.safetensors``/``.bin``/``.pt``) with its architecture either in a JSON file
  beside it (``<stem>.json`` or ``open_clip_config.json``; plain open_clip model config or the
  ``{"model_cfg": ..., "preprocess_cfg": ...}`` form) or named with ``arch=`` / ``"ARCH@/path"``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from conceptsmith.evaluation.clip import Evaluator
from conceptsmith.world.clip_train import load_shapes_clip

__all__ = ["load_evaluator", "register_evaluator"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_BUILTINS: dict[str, Callable[..., Any]] = {}


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def register_evaluator(name: str, loader: Callable[..., Any]) -> None:
    """Register ``builtin:<name>``; ``loader(device=...)`` returns an Evaluator or open_clip parts."""
    _BUILTINS[name] = loader


def _shapes_clip_loader(device: str | torch.device = "cpu") -> Any:
    try:
        return load_shapes_clip(device=device)
    except TypeError:
        return load_shapes_clip()


register_evaluator("shapes-clip", _shapes_clip_loader)


def _eval_transform(model: torch.nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    import open_clip  # lazy: optional/heavy
    from open_clip.transform import PreprocessCfg, image_transform_v2  # lazy: optional/heavy

    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    known = set(PreprocessCfg.__dataclass_fields__)
    return image_transform_v2(PreprocessCfg(**{k: v for k, v in cfg.items() if k in known}), is_train=False)


def _default_tokenizer(model: torch.nn.Module) -> Callable[[list[str]], torch.Tensor]:
    import open_clip  # lazy: optional/heavy

    ctx = open_clip.get_model_tokenize_cfg(model).get("context_length")
    return _simple_tokenizer(int(ctx or 77))


@functools.lru_cache(maxsize=4)
def _simple_tokenizer(context_length: int) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's CLIP BPE tokenizer (building it parses the BPE file, so it is shared)."""
    import open_clip  # lazy: optional/heavy

    return open_clip.SimpleTokenizer(context_length=context_length)


def _from_parts(parts: Any, spec: str, device: str | torch.device, batch_size: int) -> Evaluator:
    """Adapt what a builtin loader returns: an Evaluator, a model, or (model, preprocess, tokenizer)."""
    if isinstance(parts, Evaluator):
        parts.spec = spec
        return parts
    if isinstance(parts, dict):
        model, preprocess, tokenizer = parts["model"], parts.get("preprocess"), parts.get("tokenizer")
    elif isinstance(parts, torch.nn.Module):
        model, preprocess, tokenizer = parts, None, None
    else:
        items = list(parts)
        model = next(p for p in items if isinstance(p, torch.nn.Module))
        rest = [p for p in items if p is not model]
        transforms = [p for p in rest if _looks_like_transform(p)]
        # open_clip's create_model_and_transforms returns (model, train, val): the eval one is last
        preprocess = transforms[-1] if transforms else None
        tokenizer = next((p for p in rest if p not in transforms and callable(p)), None)
    return Evaluator(
        model=model,
        tokenizer=tokenizer or _default_tokenizer(model),
        preprocess=preprocess or _eval_transform(model),
        spec=spec,
        device=device,
        batch_size=batch_size,
    )


def _looks_like_transform(obj: Any) -> bool:
    return type(obj).__module__.startswith("torchvision") or hasattr(obj, "transforms")


def _config_beside(weights: Path) -> Path | None:
    for cand in (weights.with_suffix(".json"), weights.parent / "open_clip_config.json"):
        if cand.is_file():
            return cand
    return None


def _model_from_config(cfg: dict[str, Any], device: str | torch.device) -> torch.nn.Module:
    """Instantiate an open_clip model from a config dict, as open_clip's factory does."""
    import open_clip  # lazy: optional/heavy
    from open_clip.transform import PreprocessCfg  # lazy: optional/heavy

    pp = asdict(PreprocessCfg())
    if "model_cfg" in cfg:
        pp.update(cfg.get("preprocess_cfg", {}))
        cfg = cfg["model_cfg"]
    cfg = json.loads(json.dumps(cfg))  # deep copy
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError("an open_clip model config needs 'embed_dim', 'vision_cfg' and 'text_cfg'")
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    if "hf_model_name" in cfg["text_cfg"]:
        cfg["text_cfg"]["hf_model_pretrained"] = False
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = cls(**cfg)
    pp["size"] = model.visual.image_size
    open_clip.set_model_preprocess_cfg(model, pp)
    return model.to(device)


def _parse_arch_path(spec: str) -> tuple[str | None, str]:
    if "@" in spec:
        arch, path = spec.split("@", 1)
        if Path(path).suffix in _WEIGHT_SUFFIXES:
            return arch, path
    return None, spec


def load_evaluator(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    arch: str | dict[str, Any] | None = None,
) -> Evaluator:
    """Load an evaluator; see the module docstring for the accepted ``spec`` forms.

    ``arch`` names the open_clip architecture (or gives its config dict) of a bare weights file.
    Local files never trigger downloads; ``NAME/PRETRAINED`` tags download through open_clip unless
    the weights are cached (``HF_HUB_OFFLINE=1`` makes a missing cache an error).
    """
    import open_clip  # lazy: optional/heavy

    spec = str(spec)
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in _BUILTINS:
            raise ValueError(
                f"unknown builtin evaluator {spec!r}; known: {sorted('builtin:' + k for k in _BUILTINS)}"
            )
        return _from_parts(_BUILTINS[name](device=device), spec, device, batch_size)

    if spec.startswith(("hf-hub:", "local-dir:")):
        model, _, preprocess = open_clip.create_model_and_transforms(spec, device=device)
        return Evaluator(model, open_clip.get_tokenizer(spec), preprocess, spec, device, batch_size)

    arch_in_spec, path_str = _parse_arch_path(spec)
    arch = arch or arch_in_spec
    path = Path(path_str).expanduser()
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{path} is a directory without open_clip_config.json")
        return load_evaluator(f"local-dir:{path}", device=device, batch_size=batch_size)
    if path.suffix in _WEIGHT_SUFFIXES and (path.is_file() or arch is not None):
        if not path.is_file():
            raise FileNotFoundError(f"evaluator weights not found: {path}")
        if isinstance(arch, dict):
            model = _model_from_config(arch, device)
        elif arch is not None:
            model = open_clip.create_model(arch, pretrained=None, device=device, pretrained_text=False)
        else:
            cfg_path = _config_beside(path)
            if cfg_path is None:
                raise FileNotFoundError(
                    f"no architecture for {path}: put the open_clip model config in {path.with_suffix('.json')} "
                    "or open_clip_config.json beside it, or name it with arch='ViT-B-32' / 'ViT-B-32@path'"
                )
            model = _model_from_config(json.loads(cfg_path.read_text()), device)
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        tokenizer = _default_tokenizer(model) if not isinstance(arch, str) else open_clip.get_tokenizer(arch)
        return Evaluator(model, tokenizer, _eval_transform(model), spec, device, batch_size)

    if "/" not in spec:
        raise ValueError(
            f"cannot read evaluator spec {spec!r}: use 'builtin:NAME', 'ARCH/PRETRAINED' (e.g. 'ViT-L-14/openai'), "
            "'hf-hub:org/repo', a local directory, or a weights file"
        )
    name, pretrained = spec.split("/", 1)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device
        )
    except RuntimeError as exc:
        tags = open_clip.list_pretrained_tags_by_model(name) if name in open_clip.list_models() else []
        raise RuntimeError(
            f"cannot load evaluator {spec!r}: {exc}. Known tags for {name!r}: {tags or 'none'}. Pretrained weights "
            "come from open_clip's download cache (nothing is downloaded when HF_HUB_OFFLINE=1); without them use "
            "'builtin:shapes-clip' or a local checkpoint."
        ) from exc
    return Evaluator(model, open_clip.get_tokenizer(name), preprocess, spec, device, batch_size)
