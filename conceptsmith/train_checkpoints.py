"""Resumable training checkpoints of :func:`conceptsmith.training.train` as ``.safetensors``.

A checkpoint holds the trained parameters, the optimizer state, the loss history and a signature of
the run (method, data, shapes, hyper-parameters) in the header; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from conceptsmith.io import atomic_write
from conceptsmith.training import TrainingError

if TYPE_CHECKING:
    from conceptsmith.training import TrainingConfig, TrainResult

CHECKPOINT_KEY = "conceptsmith_checkpoint"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.safetensors$")


# -- checkpoints ---------------------------------------------------------------------------------------


def signature(run_key: str, named: Mapping[str, nn.Parameter], config: TrainingConfig) -> str:
    ignored = {"steps", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "progress", "step_in_backward"}
    hyper = {k: v for k, v in config.training_fields().items() if k not in ignored}
    shapes = {name: list(p.shape) for name, p in named.items()}
    blob = json.dumps({"run": run_key, "shapes": shapes, "config": hyper}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``folder`` (``checkpoint-<step>.safetensors``), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
    return max(found)[1] if found else None


def save_checkpoint(
    folder: Path, step: int, named: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer, accelerator: Any, signature: str, result: TrainResult
) -> Path:
    tensors = {f"param.{name}": p.detach().cpu().contiguous().clone() for name, p in named.items()}
    index = {id(p): i for i, p in enumerate(named.values())}
    state = optimizer.state_dict()
    order = [index[id(p)] for group in optimizer.param_groups for p in group["params"]]
    for slot, values in state["state"].items():
        for key, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim.{order[slot]}.{key}"] = tensor.detach().cpu().contiguous().clone()
    groups = [{k: v for k, v in group.items() if k != "params"} for group in state["param_groups"]]
    scaler = getattr(accelerator, "scaler", None)
    header = {
        "step": step,
        "signature": signature,
        "names": list(named),
        "param_groups": groups,
        "losses": result.losses,
        "logs": result.logs,
        "eval_start": result.eval_start,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    path = Path(folder) / f"checkpoint-{step:07d}.safetensors"
    metadata = {"format": "pt", CHECKPOINT_KEY: json.dumps(header, default=_json_default)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return str(value)


def load_checkpoint(
    path: Path, named: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer, accelerator: Any, signature: str, result: TrainResult
) -> int:
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {})[CHECKPOINT_KEY])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise TrainingError(f"Cannot read checkpoint '{path}' ({err}); delete it to start over.") from None
    if header.get("signature") != signature or header.get("names") != list(named):
        raise TrainingError(
            f"Checkpoint '{path}' belongs to a different training run (other method, data, parameters or "
            "hyper-parameters). Use another checkpoint_dir, or delete it to start over."
        )
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(tensors[f"param.{name}"].to(p.device, p.dtype))
    index = {id(p): i for i, p in enumerate(named.values())}
    order = [index[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for slot, flat in enumerate(order):
        prefix = f"optim.{flat}."
        values = {key.removeprefix(prefix): t for key, t in tensors.items() if key.startswith(prefix)}
        if values:
            state[slot] = values
    groups = []
    for group, saved in zip(optimizer.state_dict()["param_groups"], header["param_groups"]):
        restored = dict(saved)
        restored["betas"] = tuple(restored.get("betas", group["betas"]))
        restored["params"] = group["params"]
        groups.append(restored)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and header.get("scaler"):
        scaler.load_state_dict(header["scaler"])
    result.losses = list(header.get("losses", []))
    result.eval_start = header.get("eval_start")
    result.logs = {k: list(v) for k, v in header.get("logs", {}).items()}
    return int(header["step"])


def prune(folder: Path, keep: int) -> None:
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name)))
    for _, path in found[:-keep]:
        path.unlink(missing_ok=True)

