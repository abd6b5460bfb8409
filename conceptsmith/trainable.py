"""What a training run trains: peft LoRA adapters or full weights on any modules of a UNet or text encoder.

Every method trains on a :func:`shared_copy` of a pipeline's model (the module tree is copied, the
tensors are shared), so the caller's pipeline is never modified. :class:`TrainableModules` puts the
trainable parameters on the chosen modules of that copy -- a peft LoRA (``mode="lora"``, the
default) or float32 clones of the weights (``mode="full"``) -- and gives the frozen model's
predictions from the same network (:meth:`TrainableModules.disabled`: adapters off, original
weights back), so no second copy of the model is ever held. :func:`trained_edit` turns trained
modules into an Edit (``lora`` or ``weights``) that applies, reverts and exports like any other.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from conceptsmith.edits import Edit, base_fingerprint
from conceptsmith.models import detect_family
from conceptsmith.training import TrainingError

TrainMode = Literal["lora", "full"]
TRAINABLE_LAYERS = (nn.Linear, nn.Conv2d)


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s module tree whose parameters and buffers are the original tensors.

    Costs almost no memory; replacing a submodule or a parameter of the copy (new LoRA layers, a
    trainable clone of one weight, gradient checkpointing flags, train mode) leaves the original
    untouched. Never modify the shared tensors in place.
    """
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def trainable_clone(module: nn.Module, name: str = "weight") -> nn.Parameter:
    """Replace ``module.<name>`` (in a :func:`shared_copy`) by a float32 trainable clone and return it."""
    original = getattr(module, name)
    clone = nn.Parameter(original.detach().float().clone(), requires_grad=True)
    setattr(module, name, clone)
    return clone


@contextlib.contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter of ``modules``; the flags are restored."""
    params = {id(p): p for m in modules if m is not None for p in m.parameters()}
    flags = [(p, p.requires_grad) for p in params.values()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def pipe_components(pipe: object) -> list[nn.Module]:
    """The torch models of a pipeline (UNet, VAE, text encoders), for :func:`frozen`."""
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return [m for m in (getattr(pipe, n, None) for n in names) if isinstance(m, nn.Module)]


def select_modules(model: nn.Module, include: str, exclude: str | None = None) -> list[str]:
    """Names of the Linear / Conv2d modules of ``model`` whose full name matches the regex ``include``
    (``re.search``) and not ``exclude``, in module order."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, TRAINABLE_LAYERS)
        and re.search(include, name)
        and not (exclude and re.search(exclude, name))
        and not _inside_adapter(name)
    ]
    return names


def _inside_adapter(name: str) -> bool:
    return any(part.startswith(("lora_", "base_layer")) for part in name.split("."))


class TrainableModules:
    """Trainable parameters on ``modules`` of a shared copy of ``model``; the copy is :attr:`module`.

    ``mode="lora"``: a peft LoRA (``r=rank``, ``lora_alpha=alpha or rank``) injected into the copy,
    adapter weights float32. ``mode="full"``: each module's ``weight`` replaced by a float32 trainable
    clone (the original tensor is kept for :meth:`disabled` and :meth:`state`). ``component`` is the
    pipeline attribute the model is (``unet``, ``text_encoder``...), the prefix of the Edit's module paths.
    """

    def __init__(
        self,
        model: nn.Module,
        component: str,
        modules: Sequence[str],
        *,
        mode: TrainMode = "lora",
        rank: int = 4,
        alpha: float | None = None,
        init: Literal["gaussian", "default"] = "gaussian",
    ) -> None:
        if not modules:
            raise TrainingError(f"No module of the {component} was selected for training; check the module selection.")
        self.component = component
        self.mode = mode
        self.names = list(modules)
        self.alpha = float(alpha or rank)
        self.module = shared_copy(model)
        self._originals: dict[str, nn.Parameter] = {}
        if mode == "lora":
            self.params = add_lora(self.module, self.names, rank, self.alpha, init)
        elif mode == "full":
            self.params = {}
            for name in self.names:
                layer = self.module.get_submodule(name)
                self._originals[name] = layer.weight
                self.params[f"{name}.weight"] = trainable_clone(layer)
        else:
            raise TrainingError(f"Unknown training mode '{mode}'; use 'lora' or 'full'.")

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters, prefixed with the component (unique across components)."""
        return {f"{self.component}.{name}": p for name, p in self.params.items()}

    @contextlib.contextmanager
    def disabled(self) -> Iterator[nn.Module]:
        """The copy computes the frozen model's output inside this block (adapters off / original weights)."""
        if self.mode == "lora":
            from peft.tuners.tuners_utils import BaseTunerLayer

            layers = [m for m in self.module.modules() if isinstance(m, BaseTunerLayer)]
            flags = [(p, p.requires_grad) for p in self.params.values()]
            for layer in layers:
                layer.enable_adapters(False)
            try:
                yield self.module
            finally:
                for layer in layers:
                    layer.enable_adapters(True)
                for p, flag in flags:
                    p.requires_grad_(flag)
        else:
            for name, original in self._originals.items():
                self.module.get_submodule(name)._parameters["weight"] = original
            try:
                yield self.module
            finally:
                for name in self._originals:
                    self.module.get_submodule(name)._parameters["weight"] = self.params[f"{name}.weight"]

    def state(self) -> dict[str, torch.Tensor]:
        """The trained change with component-prefixed keys: peft LoRA tensors, or ``<module>`` -> weight delta."""
        if self.mode == "lora":
            return lora_state_dict(self.module, self.component)
        return {
            f"{self.component}.{name}": (self.params[f"{name}.weight"].detach().float() - original.detach().float()).cpu()
            for name, original in self._originals.items()
        }


def add_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float, init: str = "gaussian") -> dict[str, nn.Parameter]:
    """Inject a peft LoRA adapter into ``model`` (a :func:`shared_copy`) and return its float32 trainable
    parameters. ``targets``: module names or name suffixes (peft's ``target_modules``)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian" if init == "gaussian" else True)
    try:
        inject_adapter_in_model(config, model, adapter_name="default")
    except ValueError as err:
        raise TrainingError(f"No module of {type(model).__name__} matches the LoRA targets {list(targets)[:4]}... ({err}).") from None
    params = {name: p for name, p in model.named_parameters() if "lora_" in name}
    if not params:
        raise TrainingError(f"No module of {type(model).__name__} matches the LoRA targets {list(targets)[:4]}.")
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(model: nn.Module, component: str) -> dict[str, torch.Tensor]:
    """The peft adapter of ``model`` as float32 CPU tensors with ``<component>.`` keys (an Edit's layout)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name="default")
    return {f"{component}.{key}": value.detach().float().cpu().clone() for key, value in state.items()}


def trained_edit(
    method: str,
    concepts: list[str],
    params: dict[str, Any],
    pipe: Any,
    trained: Sequence[TrainableModules],
    metadata: dict[str, Any] | None = None,
) -> Any:
    """The Edit of ``trained`` modules of ``pipe``'s models: ``lora`` (peft layout, alpha folded) or ``weights``."""
    base, family = base_fingerprint(pipe), detect_family(pipe)
    state: dict[str, torch.Tensor] = {}
    for part in trained:
        state.update(part.state())
    if all(part.mode == "lora" for part in trained):
        config = {part.component: {"lora_alpha": part.alpha} for part in trained}
        return Edit.from_lora(method, concepts, params, base, family, state, config, metadata=metadata)
    if any(part.mode == "lora" for part in trained):
        raise TrainingError("Train every component in one mode (all 'lora' or all 'full').")
    return Edit.from_weight_deltas(method, concepts, params, base, family, state, metadata=metadata)
