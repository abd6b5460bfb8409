"""Edits applied to a pipe: the stack of applied edits kept on the pipe, the check of each edit against the pipe's
base, modules and weight norms, and how each kind is applied and exactly undone.

The stack lives on the pipe object (so a deep copy of the pipe carries it) with the base identity read when its
first edit was applied: while edits are applied, the weights no longer are the base's.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from conceptsmith.edit_format import content_digest, module_terms
from conceptsmith.errors import EditError
from conceptsmith.identity import (
    IDENTITY_VERSION,
    Fingerprint,
    base_mismatch,
    legacy_fingerprint,
    precision_hint,
)
from conceptsmith.low_rank import change_norm
from conceptsmith.models import fingerprint
from conceptsmith.registry import RegistryError, get_hook

if TYPE_CHECKING:
    from conceptsmith.edits import Edit

#: Largest change of a module an apply accepts, as a multiple of the Frobenius norm of the module's weights:
#: erasure and customization edits change a weight by a small fraction of its norm; 100x is a broken edit or scale.
MAX_RELATIVE_CHANGE = 100.0

Undo = Callable[[Any], None]

_BASE_ATTR = "_conceptsmith_base_fingerprint"
_STACK_ATTR = "_conceptsmith_applied"


@dataclass
class Applied:
    """One applied edit: the edit, the exact undo of its change and its scale."""

    edit: Edit
    undo: Undo
    scale: float
    leaf_digests: list[str] | None = None  # content digests of the edit or its parts, computed when first asked

    def digests(self) -> list[str]:
        if self.leaf_digests is None:
            self.leaf_digests = _leaf_digests(self.edit)
        return self.leaf_digests

    def __deepcopy__(self, memo: dict[int, Any]) -> Applied:
        """A deep-copied pipe shares the (immutable) edit and undo data; weight undos resolve modules by path."""
        return Applied(self.edit, self.undo, self.scale, self.leaf_digests)


@dataclass(frozen=True)
class _Base:
    """The identity of a pipe's base, read when the first edit of its stack is applied (both versions)."""

    identity: Fingerprint
    legacy: str

    @classmethod
    def of(cls, pipe: Any) -> _Base:
        return cls(fingerprint(pipe), legacy_fingerprint(pipe))

    def mismatch(self, expected: str) -> tuple[str, str | None]:
        """(this base's fingerprint in ``expected``'s version, why it is not ``expected`` or None)."""
        if getattr(expected, "version", IDENTITY_VERSION) == 1:
            problem = None if expected == self.legacy else "its identity (version 1, of an edit file of format 1) differs"
            return self.legacy, problem
        return self.identity, base_mismatch(expected, self.identity)


def stack_of(pipe: Any) -> list[Applied]:
    """The edits applied to ``pipe``, in application order (the list kept on the pipe)."""
    stack = getattr(pipe, _STACK_ATTR, None)
    if stack is None:
        stack = []
        setattr(pipe, _STACK_ATTR, stack)
    return stack


def applied_base(pipe: Any) -> Fingerprint | None:
    """The identity of ``pipe``'s base read when the first of its applied edits was applied; None if none is."""
    return getattr(pipe, _BASE_ATTR).identity if stack_of(pipe) else None


def apply_edit(edit: Edit, pipe: Any, scale: float, repeat_ok: bool) -> None:
    """``Edit.apply`` with a checked ``scale``: refuse a repeat, a scaled hook, another base, other modules or shapes
    and an absurd change; then apply and push the edit on the pipe's stack."""
    stack = stack_of(pipe)
    if any(record.edit is edit for record in stack):
        raise EditError(f"This {edit.label} is already applied to this pipe; revert it before applying it again.")
    repeated = None if repeat_ok else _repeated(edit, stack)
    if repeated is not None:
        raise EditError(
            f"The {edit.label} has the same content (digest {repeated}) as an edit already applied to this pipe; "
            "applying it again would add its change twice. Apply it once at a larger scale (FILE:2 on the command "
            "line), or pass repeat_ok=True to apply it again."
        )
    hook = next((part for part in (edit.parts or [edit]) if part.kind == "hook"), None)
    if hook is not None and scale != 1.0:
        raise EditError(
            f"The {edit.label} {'is' if hook is edit else 'contains'} an inference-time hook ('{hook.hook}'), which "
            f"has no strength to scale; apply it at scale 1 (got {scale:g})."
        )
    base = getattr(pipe, _BASE_ATTR) if stack else _Base.of(pipe)
    shown, problem = base.mismatch(edit.base_fingerprint)
    if problem is not None:
        raise EditError(
            f"The {edit.label} was computed on base model {edit.base_fingerprint} ({edit.family}), but this "
            f"pipe's base model is {shown}: {problem}. Apply it to the model it was computed on, or re-run the "
            f"editor on this one.{precision_hint(pipe)}"
        )
    _check_targets(edit, pipe, scale)
    undo = _apply(edit, pipe, scale)
    if not stack:
        setattr(pipe, _BASE_ATTR, base)
    stack.append(Applied(edit, undo, scale))


def revert_edit(edit: Edit, pipe: Any) -> None:
    """``Edit.revert``: undo the edits from ``edit`` on, newest first, and re-apply the later ones in order."""
    stack = stack_of(pipe)
    index = next((i for i, record in enumerate(stack) if record.edit is edit), None)
    if index is None:
        raise EditError(f"The {edit.label} is not applied to this pipe, so there is nothing to revert.")
    later = stack[index + 1 :]
    for record in reversed(stack[index:]):
        record.undo(pipe)
    del stack[index:]
    stack.extend(Applied(record.edit, _apply(record.edit, pipe, record.scale), record.scale) for record in later)
    if not stack:  # the pipe is its base again: its identity is read from the weights from now on
        delattr(pipe, _BASE_ATTR)


def _repeated(edit: Edit, stack: list[Applied]) -> str | None:
    """The content digest ``edit`` (or one of its parts) shares with an applied edit (or part), else ``None``."""
    if not stack:
        return None
    applied = {digest for record in stack for digest in record.digests()}
    return next((digest for digest in _leaf_digests(edit) if digest in applied), None)


def _leaf_digests(edit: Edit) -> list[str]:
    return [content_digest(part) for part in (edit.parts or [edit])]


def _check_targets(edit: Edit, pipe: Any, scale: float) -> None:
    """Refuse modules ``pipe`` lacks, other weight shapes, and changes over :data:`MAX_RELATIVE_CHANGE` times
    a module's weight norm (NaN included), parts included."""
    for part in edit.parts:
        _check_targets(part, pipe, scale)
    for module, shape in edit.module_shapes.items():
        weight = _target(pipe, module).weight
        if list(weight.shape) != shape:
            raise EditError(
                f"Module '{module}' has weight shape {list(weight.shape)} in this pipe, but the {edit.label} "
                f"expects {shape}: it was made for another architecture."
            )
    for module, term in module_terms(edit.kind, edit.tensors).items():
        change = abs(scale) * change_norm(term)
        base = float(torch.linalg.vector_norm(_target(pipe, module).weight.detach(), dtype=torch.float32))
        if not math.isfinite(change):
            raise EditError(f"The {edit.label} changes module '{module}' by NaN or infinite values; re-create it.")
        if base > 0 and change > MAX_RELATIVE_CHANGE * base:
            raise EditError(
                f"The {edit.label} changes module '{module}' by {change:.3g} (Frobenius norm, at scale {scale:g}), "
                f"more than {MAX_RELATIVE_CHANGE:g}x the norm of its weights ({base:.3g}): the edit is broken or the "
                "scale far too large. Apply it at a smaller scale, or re-create it."
            )


def _apply(edit: Edit, pipe: Any, scale: float) -> Undo:
    """Mutate ``pipe`` (targets and scale already checked) and return the exact undo, ``undo(pipe)``."""
    if edit.kind == "weights":
        return _apply_weights(edit, pipe, scale)
    if edit.kind == "lora":
        return _apply_lora(edit, pipe, scale)
    if edit.kind == "hook":
        return _apply_hook(edit, pipe)
    undos: list[Undo] = []

    def undo_all(pipe: Any) -> None:
        for undo in reversed(undos):
            undo(pipe)

    try:
        for part in edit.parts:
            undos.append(_apply(part, pipe, scale))
    except BaseException:
        undo_all(pipe)
        raise
    return undo_all


# -- modules -----------------------------------------------------------------------------------------


def locate_module(pipe: Any, path: str) -> tuple[str, torch.nn.Module] | None:
    """``(path as found, module)`` for ``<component>.<path>``: inside ``torch.compile``'s wrapper, the wrapped layer
    if peft wrapped it, CLIP text encoders with and without the ``text_model.`` level; None if there is none."""
    component, _, name = path.partition(".")
    root = getattr(pipe, component, None)
    if not isinstance(root, torch.nn.Module):
        return None
    root = getattr(root, "_orig_mod", root)
    candidates = [name]
    if component.startswith("text_encoder"):
        candidates.append(name.removeprefix("text_model.") if name.startswith("text_model.") else f"text_model.{name}")
    for candidate in candidates:
        try:
            module = root.get_submodule(candidate)
        except AttributeError:
            continue
        return f"{component}.{candidate}", getattr(module, "base_layer", module)
    return None


def _target(pipe: Any, path: str) -> torch.nn.Module:
    """The module at ``<component>.<path>`` (:func:`locate_module`), which must hold a weight tensor."""
    component, _, name = path.partition(".")
    if not isinstance(getattr(pipe, component, None), torch.nn.Module):
        raise EditError(f"This pipe has no model component '{component}' (needed by module '{path}').")
    found = locate_module(pipe, path)
    if found is None:
        raise EditError(f"This pipe's {component} has no module '{name}' (edit module '{path}'): it was made for another architecture.")
    module = found[1]
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise EditError(f"Module '{path}' of this pipe has no weight tensor to edit.")
    return module


# -- applying each kind ------------------------------------------------------------------------------


def _apply_weights(edit: Edit, pipe: Any, scale: float) -> Undo:
    originals: dict[str, torch.Tensor] = {}  # by module path, so that a deep copy of the pipe reverts itself
    with torch.no_grad():
        for module, term in module_terms("weights", edit.tensors).items():
            weight = _target(pipe, module).weight
            if isinstance(term, tuple):
                delta = term[0].to(weight.device, torch.float32) @ term[1].to(weight.device, torch.float32)
            else:
                delta = term.to(weight.device, torch.float32)
            originals[module] = weight.detach().clone()
            weight.copy_((weight.float() + scale * delta).to(weight.dtype))

    def undo(pipe: Any) -> None:
        with torch.no_grad():
            for module, original in originals.items():
                _target(pipe, module).weight.copy_(original)

    return undo


#: diffusers' loggers that warn about a component without LoRA keys (text encoders; the denoiser).
_LORA_LOADER_LOGGERS = ("diffusers.loaders.lora_base", "diffusers.loaders.peft")


class _NoMissingComponentWarning(logging.Filter):
    """Drops diffusers' warning that a LoRA has no keys for a component: an edit that changes only the UNet (or
    only a text encoder) has none for the other by design, and the warning (repeated at every apply) says nothing
    about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


def _apply_lora(edit: Edit, pipe: Any, scale: float) -> Undo:
    name = f"conceptsmith_{uuid.uuid4().hex[:8]}"
    active = _active_adapters(pipe)
    tensors = {key: value * scale if key.endswith(".lora_B.weight") else value for key, value in edit.tensors.items()}
    quiet = _NoMissingComponentWarning()
    for logger in _LORA_LOADER_LOGGERS:
        logging.getLogger(logger).addFilter(quiet)
    try:
        pipe.load_lora_weights(tensors, adapter_name=name)
    finally:
        for logger in _LORA_LOADER_LOGGERS:
            logging.getLogger(logger).removeFilter(quiet)
    pipe.set_adapters([*active, name])  # loading activates only the new adapter; keep the others on

    def undo(pipe: Any) -> None:
        pipe.delete_adapters(name)
        if not any(pipe.get_list_adapters().values()):
            pipe.unload_lora_weights()  # drop the empty peft wrappers: the modules are the original ones again

    return undo


def _active_adapters(pipe: Any) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: dict[str, None] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if isinstance(model, torch.nn.Module):
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    names.update(dict.fromkeys(module.active_adapters))
    return list(names)


def _apply_hook(edit: Edit, pipe: Any) -> Undo:
    try:
        factory = get_hook(edit.hook)
    except RegistryError as err:
        raise EditError(f"Cannot apply the {edit.label}: {err} Install or import the plugin that provides it.") from None
    handle = factory(edit, pipe)
    return lambda pipe: handle.remove()
