"""Where models run and in which precision: one place resolves ``--device`` / ``--dtype`` for every command.

* :func:`default_device`: ``cuda`` when a CUDA GPU is visible, else ``mps`` (Apple silicon), else ``cpu``;
  ``accelerate launch --cpu`` (``ACCELERATE_USE_CPU``) forces ``cpu``.
* :func:`resolve_device`: a name (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``) -> ``torch.device``, with
  an error that says what to pass instead when the device is not there. Under a multi-process launch
  (``accelerate launch`` / ``torchrun`` set ``LOCAL_RANK``) a bare ``cuda`` is this process's own GPU.
* :func:`resolve_dtype`: ``float32`` | ``float16`` | ``bfloat16`` -> ``torch.dtype``.
* :func:`process_state`: accelerate's ``PartialState`` for a run on a device, so that the processes of
  one launch find each other (NCCL on GPUs, gloo on CPUs) and work can be sharded by process index.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from conceptsmith.config import DEVICE_PATTERN

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DeviceError(ValueError):
    """A device or dtype that cannot be used here; the message says what to pass instead."""


def default_device() -> str:
    """``cuda`` when available, else ``mps``, else ``cpu`` (``cpu`` under ``accelerate launch --cpu``)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in {"1", "true", "yes"}:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The ``torch.device`` for ``name`` (``None`` / ``auto``: :func:`default_device`), checked to exist here."""
    text = "auto" if name is None else str(name).strip().lower()
    if not re.match(DEVICE_PATTERN, text):
        raise DeviceError(f"Unknown device '{name}'; pass cuda, cuda:N, mps, cpu or auto.")
    if text == "auto":
        text = default_device()
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"Device '{text}' was requested but no CUDA GPU is visible (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda or 'none'}). Pass --device cpu (or mps on Apple silicon); on a machine with an NVIDIA "
                "GPU, check the driver (nvidia-smi), CUDA_VISIBLE_DEVICES and that torch is a CUDA build."
            )
        count = torch.cuda.device_count()
        if text == "cuda":  # this process's GPU under a multi-process launch, as accelerate assigns it
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % count)
        index = int(text.split(":")[1])
        if index >= count:
            raise DeviceError(f"Device '{text}' does not exist: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}.")
        return torch.device("cuda", index)
    if text == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("Device 'mps' was requested but Apple's Metal backend is not available here; pass --device cpu.")
    return torch.device(text)


def resolve_dtype(name: str | torch.dtype | None = None) -> torch.dtype:
    """``float32`` | ``float16`` | ``bfloat16`` (or a ``torch.dtype`` of those) -> ``torch.dtype``; ``None``: float32."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise DeviceError(f"Unsupported dtype {name}; allowed values: {', '.join(DTYPES)}.")
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise DeviceError(f"Unknown dtype '{name}'; allowed values: {', '.join(DTYPES)}.")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")


def process_state(device: torch.device) -> Any:
    """accelerate's ``PartialState`` for a run on ``device``: one process, or one of a launch's processes.

    CPU runs pass ``cpu=True`` so that the CPU processes of ``accelerate launch --multi_gpu`` / ``torchrun``
    join one gloo group; GPU runs let accelerate give each process its own GPU (``cuda:LOCAL_RANK``).
    """
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu")


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without parameters)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
