"""The Edit artifact: what an editor returns and what gets saved, applied, reverted, composed and exported.

Kinds (``Edit.kind``):

* ``weights``: per module, ``W += delta`` (tensor ``<module>.delta``) or the exact low-rank update
  ``W += up @ down`` (``<module>.up`` [d_out, r], ``<module>.down`` [r, d_in]).
* ``lora``: a peft LoRA adapter in the diffusers format (``<module>.lora_A.weight`` [r, d_in],
  ``<module>.lora_B.weight`` [d_out, r], scale folded into ``lora_B``), loaded with ``pipe.load_lora_weights``.
* ``hook``: an inference-time hook ``conceptsmith.registry.get_hook(edit.hook)`` with its small tensors.
* ``composite``: several edits of one base applied in order (made by :func:`compose`).

Module paths start with the pipeline component, e.g. ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``
or ``text_encoder.encoder.layers.0.self_attn.k_proj``.

An edit records the identity of the base it was computed on (:mod:`conceptsmith.identity`, with per-module
digests); :meth:`Edit.apply` compares the pipe's denoiser and text encoders with it and names the first module
that differs. Files of format 1 carry identity version 1 and are checked with that version's function.

Loading and applying check an edit like any input: :meth:`Edit.load` refuses NaN or infinite tensors and a JSON
header over :data:`MAX_METADATA_BYTES` or nested deeper than :data:`MAX_METADATA_DEPTH`; :meth:`Edit.apply`
refuses shapes other than the pipe's, a change of a module whose Frobenius norm (times the scale) exceeds
:data:`MAX_RELATIVE_CHANGE` times the norm of that module's weights, and an edit whose content
(:func:`content_digest`) is already applied to the pipe, unless ``repeat_ok``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from conceptsmith import __version__
from conceptsmith.errors import EditError
from conceptsmith.identity import (
    IDENTITY_VERSION,
    Fingerprint,
    base_mismatch,
    legacy_fingerprint,
    precision_hint,
)
from conceptsmith.io import save_safetensors
from conceptsmith.models import fingerprint
from conceptsmith.registry import RegistryError, get_hook
from conceptsmith.validate import check_scale
from conceptsmith.validate import parse_edit_spec as parse_edit_spec  # re-exported: the --edit syntax

Kind = Literal["weights", "lora", "hook", "composite"]
KINDS: tuple[str, ...] = ("weights", "lora", "hook", "composite")
FORMAT_VERSION = 2  # 2: the header records the base's per-module digests (``base_identity``); 1: identity version 1
METADATA_KEY = "conceptsmith"
LORA_SOURCE_KEY = "conceptsmith_source"

_BASE_ATTR = "_conceptsmith_base_fingerprint"
_STACK_ATTR = "_conceptsmith_applied"
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_WEIGHT_PARTS = ("delta", "up", "down")
#: Bounds of an edit file's JSON header (real headers are well under 1 MiB and 10 levels deep).
MAX_METADATA_BYTES = 16 * 2**20
MAX_METADATA_DEPTH = 64
#: Largest change of a module an apply accepts, as a multiple of the Frobenius norm of the module's weights:
#: erasure and customization edits change a weight by a small fraction of its norm; 100x is a broken edit or scale.
MAX_RELATIVE_CHANGE = 100.0

Undo = Callable[[Any], None]


@dataclass(eq=False)
class Edit:
    """A change of a pipeline computed on one base model; see the module docstring for the kinds."""

    kind: Kind
    method: str
    concepts: list[str]
    params: dict[str, Any]
    base_fingerprint: str
    family: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    hook: str | None = None
    parts: list[Edit] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EditError(f"Unknown edit kind '{self.kind}'; expected one of {', '.join(KINDS)}.")
        for name in ("params", "metadata"):
            try:
                json.dumps(getattr(self, name))
            except (TypeError, ValueError) as err:
                raise EditError(f"{name} of the '{self.method}' edit must be JSON-serializable ({err}).") from None
        if (self.kind == "hook") != bool(self.hook):
            raise EditError("A 'hook' edit needs a hook name, and only hook edits have one.")
        if (self.kind == "composite") != bool(self.parts):
            raise EditError("A 'composite' edit needs parts, and only composite edits have them.")
        if self.kind == "composite" and self.tensors:
            raise EditError("A 'composite' edit keeps its tensors in its parts.")
        if self.kind in ("weights", "lora") and not self.module_shapes:  # module_shapes validates the layout
            raise EditError(f"The '{self.method}' {self.kind} edit changes no module; it needs at least one.")
        self.metadata.setdefault("conceptsmith_version", __version__)
        self.metadata.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_weight_deltas(
        cls,
        method: str,
        concepts: list[str],
        params: dict[str, Any],
        base_fingerprint: str,
        family: str,
        deltas: Mapping[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
        metadata: dict[str, Any] | None = None,
    ) -> Edit:
        """A ``weights`` edit: per module a dense delta, or ``(up, down)`` with ``delta = up @ down``."""
        tensors: dict[str, torch.Tensor] = {}
        for module, delta in deltas.items():
            if isinstance(delta, tuple):
                tensors[f"{module}.up"], tensors[f"{module}.down"] = delta
            else:
                tensors[f"{module}.delta"] = delta
        return cls("weights", method, list(concepts), dict(params), base_fingerprint, family, tensors, metadata=dict(metadata or {}))

    @classmethod
    def from_lora(
        cls,
        method: str,
        concepts: list[str],
        params: dict[str, Any],
        base_fingerprint: str,
        family: str,
        state_dict: Mapping[str, torch.Tensor],
        lora_config: Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Edit:
        """A ``lora`` edit from a peft state dict with component-prefixed keys (``unet.<module>.lora_A.weight``).

        ``lora_config`` maps a component name to its ``LoraConfig`` (or dict with ``lora_alpha``,
        ``alpha_pattern``, ``use_rslora``); each module's scale is folded into ``lora_B`` so that the
        stored adapter has scale 1 (the diffusers convention when no alphas are given).
        """
        lora_config = {name: _config_dict(config) for name, config in (lora_config or {}).items()}
        tensors = dict(state_dict)
        for key, up in state_dict.items():
            if key.endswith(".lora_B.weight"):
                component, _, module = key.removesuffix(".lora_B.weight").partition(".")
                if component in lora_config:
                    tensors[key] = up * _lora_scale(lora_config[component], module, up.shape[1])
        metadata = {**(metadata or {}), "lora_config": lora_config}
        return cls("lora", method, list(concepts), dict(params), base_fingerprint, family, tensors, metadata=metadata)

    @classmethod
    def from_hook(
        cls,
        method: str,
        concepts: list[str],
        params: dict[str, Any],
        base_fingerprint: str,
        family: str,
        hook: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: dict[str, Any] | None = None,
    ) -> Edit:
        """A ``hook`` edit: ``registry.get_hook(hook)(edit, pipe)`` installs it and returns a handle with ``remove()``."""
        return cls("hook", method, list(concepts), dict(params), base_fingerprint, family, dict(tensors), hook, metadata=dict(metadata or {}))

    # -- structure ----------------------------------------------------------------------------------

    @property
    def module_shapes(self) -> dict[str, list[int]]:
        """Weight shape of every module a ``weights``/``lora`` edit changes (validates the tensor layout)."""
        if self.kind == "weights":
            return {module: _weights_shape(module, parts) for module, parts in _group(self.tensors, _weights_key).items()}
        if self.kind == "lora":
            return {module: _lora_shape(module, parts) for module, parts in _group(self.tensors, _lora_key).items()}
        return {}

    # -- persistence --------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the edit atomically as ``.safetensors`` with its JSON description in the header metadata."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise EditError(f"Cannot save an edit to '{path}': edits are .safetensors files; use a path ending in .safetensors.")
        header, tensors = self._serialize()
        save_safetensors(path, tensors, {"format": "pt", METADATA_KEY: json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Edit:
        """Read an edit written by :meth:`save`, refusing anything else with a clear :class:`EditError`."""
        path = Path(path)
        if not path.is_file():
            raise EditError(f"Edit file '{path}' does not exist (or is not a file).")
        if path.suffix != ".safetensors":
            raise EditError(
                f"Refusing to load '{path}': edits are .safetensors files written by Edit.save. Pickled files "
                "(.pt, .bin, .ckpt, .pkl) are never loaded because unpickling can run arbitrary code."
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                file_metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise EditError(
                f"'{path}' is not a valid safetensors file ({err}). It may be truncated or a pickle renamed to "
                ".safetensors; re-create it with Edit.save."
            ) from None
        if METADATA_KEY not in file_metadata:
            hint = (
                " It looks like a LoRA file: load it with pipe.load_lora_weights()."
                if any(".lora_A." in key or "lora_down" in key for key in tensors)
                else ""
            )
            raise EditError(
                f"'{path}' has no ConceptSmith metadata (no '{METADATA_KEY}' entry in its safetensors header), so "
                f"it was not written by Edit.save.{hint}"
            )
        try:
            header = _bounded_json(file_metadata[METADATA_KEY])
            _check_finite(tensors)
            return _deserialize(header, tensors)
        except json.JSONDecodeError as err:
            raise EditError(f"Cannot load edit '{path}': its metadata is not valid JSON ({err}); re-create it with Edit.save.") from None
        except EditError as err:
            raise EditError(f"Cannot load edit '{path}': {err}") from None

    def _serialize(self, parent_base: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Header and tensors; a part's header leaves out the identity digests its composite already records."""
        header: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "method": self.method,
            "concepts": self.concepts,
            "params": self.params,
            "base_fingerprint": str(self.base_fingerprint),
            "family": self.family,
            "hook": self.hook,
            "module_shapes": self.module_shapes,
            "metadata": self.metadata,
            "parts": [],
        }
        tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in self.tensors.items()}
        if parent_base != self.base_fingerprint:
            base = self.base_fingerprint
            header["base_identity"] = base.to_json() if isinstance(base, Fingerprint) else {"version": IDENTITY_VERSION}
        for index, part in enumerate(self.parts):
            part_header, part_tensors = part._serialize(self.base_fingerprint)
            header["parts"].append(part_header)
            tensors.update({f"parts.{index}.{key}": value for key, value in part_tensors.items()})
        return header, tensors

    # -- applying -----------------------------------------------------------------------------------

    def apply(self, pipe: Any, scale: float = 1.0, repeat_ok: bool = False) -> None:
        """Apply to ``pipe`` in place at strength ``scale``, after checking its base identity, modules, shapes and
        the size of the change (:data:`MAX_RELATIVE_CHANGE`).

        ``weights``: ``W + scale * delta``; ``lora``: the adapter's update times ``scale`` (``lora_B`` scaled);
        ``composite``: every part at ``scale``. Hooks have no strength: they refuse any scale but 1.
        The weights are computed in float32 and :meth:`revert` restores the original bits.
        An edit with the same content as one already applied (e.g. loaded twice from one file) is refused:
        applying it again adds its change twice; ``repeat_ok=True`` allows that (this object itself never).
        """
        scale = check_scale(scale)
        stack = _stack(pipe)
        if any(record.edit is self for record in stack):
            raise EditError(f"This {self._label()} is already applied to this pipe; revert it before applying it again.")
        repeated = None if repeat_ok else _repeated(self, stack)
        if repeated is not None:
            raise EditError(
                f"The {self._label()} has the same content (digest {repeated}) as an edit already applied to this pipe; "
                "applying it again would add its change twice. Apply it once at a larger scale (FILE:2 on the command "
                "line), or pass repeat_ok=True to apply it again."
            )
        hook = next((part for part in (self.parts or [self]) if part.kind == "hook"), None)
        if hook is not None and scale != 1.0:
            raise EditError(
                f"The {self._label()} {'is' if hook is self else 'contains'} an inference-time hook ('{hook.hook}'), which "
                f"has no strength to scale; apply it at scale 1 (got {scale:g})."
            )
        base = getattr(pipe, _BASE_ATTR) if stack else _Base.of(pipe)
        shown, problem = base.mismatch(self.base_fingerprint)
        if problem is not None:
            raise EditError(
                f"The {self._label()} was computed on base model {self.base_fingerprint} ({self.family}), but this "
                f"pipe's base model is {shown}: {problem}. Apply it to the model it was computed on, or re-run the "
                f"editor on this one.{precision_hint(pipe)}"
            )
        self._check_targets(pipe, scale)
        undo = self._apply(pipe, scale)
        if not stack:
            setattr(pipe, _BASE_ATTR, base)
        stack.append(_Applied(self, undo, scale))

    def revert(self, pipe: Any) -> None:
        """Undo :meth:`apply` exactly; edits applied after this one are undone and re-applied in order, each at its scale."""
        stack = _stack(pipe)
        index = next((i for i, record in enumerate(stack) if record.edit is self), None)
        if index is None:
            raise EditError(f"The {self._label()} is not applied to this pipe, so there is nothing to revert.")
        later = stack[index + 1 :]
        for record in reversed(stack[index:]):
            record.undo(pipe)
        del stack[index:]
        stack.extend(_Applied(record.edit, record.edit._apply(pipe, record.scale), record.scale) for record in later)
        if not stack:  # the pipe is its base again: its identity is read from the weights from now on
            delattr(pipe, _BASE_ATTR)

    def _label(self) -> str:
        return f"'{self.method}' edit of {self.concepts}"

    def _check_targets(self, pipe: Any, scale: float) -> None:
        for part in self.parts:
            part._check_targets(pipe, scale)
        for module, shape in self.module_shapes.items():
            weight = _target(pipe, module).weight
            if list(weight.shape) != shape:
                raise EditError(
                    f"Module '{module}' has weight shape {list(weight.shape)} in this pipe, but the {self._label()} "
                    f"expects {shape}: it was made for another architecture."
                )
        split = _weights_key if self.kind == "weights" else _lora_key
        for module, parts in (_group(self.tensors, split).items() if self.kind in ("weights", "lora") else ()):
            term = parts.get("delta") if "delta" in parts else (
                (parts["up"], parts["down"]) if "up" in parts else (parts["lora_B.weight"], parts["lora_A.weight"]))
            change = abs(scale) * _change_norm(term)
            base = float(torch.linalg.vector_norm(_target(pipe, module).weight.detach(), dtype=torch.float32))
            if not math.isfinite(change):
                raise EditError(f"The {self._label()} changes module '{module}' by NaN or infinite values; re-create it.")
            if base > 0 and change > MAX_RELATIVE_CHANGE * base:
                raise EditError(
                    f"The {self._label()} changes module '{module}' by {change:.3g} (Frobenius norm, at scale {scale:g}), "
                    f"more than {MAX_RELATIVE_CHANGE:g}x the norm of its weights ({base:.3g}): the edit is broken or the "
                    "scale far too large. Apply it at a smaller scale, or re-create it."
                )

    def _apply(self, pipe: Any, scale: float) -> Undo:
        """Mutate ``pipe`` (targets and scale already checked) and return the exact undo, ``undo(pipe)``."""
        if self.kind == "weights":
            return _apply_weights(self, pipe, scale)
        if self.kind == "lora":
            return _apply_lora(self, pipe, scale)
        if self.kind == "hook":
            return _apply_hook(self, pipe)
        undos: list[Undo] = []

        def undo_all(pipe: Any) -> None:
            for undo in reversed(undos):
                undo(pipe)

        try:
            for part in self.parts:
                undos.append(part._apply(pipe, scale))
        except BaseException:
            undo_all(pipe)
            raise
        return undo_all

    # -- export -------------------------------------------------------------------------------------

    def to_lora(
        self,
        path: str | Path,
        rank: int | None = None,
        layout: str = "diffusers",
        unet_shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> dict[str, float]:
        """Write the edit as a LoRA ``.safetensors`` file in ``layout`` (:mod:`conceptsmith.lora_formats`):
        ``diffusers`` (``pipe.load_lora_weights(path)``) or ``kohya`` (sd-scripts; WebUI, ComfyUI and diffusers read it).

        Dense deltas are factored by SVD (dropping only numerically zero singular values); ``rank`` caps
        every module's rank. Learned tokens are written beside the LoRA as textual-inversion files
        (:func:`conceptsmith.lora_formats.token_files`). Returns each module's relative truncation error
        ``||D - D_r||_F / ||D||_F``, also recorded in the file's metadata; ``{}`` for an edit that only learned
        tokens (then only their files are written). ``unet_shapes``: ``{key: shape}`` of the base UNet, for
        kohya's SDXL block numbering (default: SDXL base's architecture).
        """
        from conceptsmith.lora_formats import LAYOUTS, edit_tokens, lora_file, write_token_files

        path = Path(path)
        if path.suffix != ".safetensors":
            raise EditError(f"Cannot write LoRA '{path}': LoRA files are .safetensors; use a path ending in .safetensors.")
        if rank is not None and rank < 1:
            raise EditError(f"LoRA rank must be a positive integer, got {rank}.")
        if layout not in LAYOUTS:
            raise EditError(f"Unknown LoRA format '{layout}'; choose one of {', '.join(LAYOUTS)}.")
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        errors: dict[str, float] = {}
        for module, terms in self._low_rank_terms().items():
            up, down, errors[module] = _factorize_layer(terms, rank)
            if up.shape[1] > 0:
                factors[module] = (up.float().contiguous(), down.float().contiguous())
        tokens = edit_tokens(self)
        if not factors and not tokens:
            raise EditError(f"The {self._label()} changes no weights; there is nothing to write as a LoRA.")
        if factors:
            tensors, header = lora_file(factors, layout, self.family, unet_shapes)
            source = {
                "method": self.method,
                "concepts": self.concepts,
                "base_fingerprint": str(self.base_fingerprint),
                "family": self.family,
                "rank": rank,
                "truncation_error": errors,
                "conceptsmith_version": __version__,
            }
            save_safetensors(path, tensors, {**header, LORA_SOURCE_KEY: json.dumps(source)})
        write_token_files(tokens, path, layout)
        return errors if factors else {}

    def _low_rank_terms(self) -> dict[str, list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]]:
        """Per module, the summands of its weight change: dense tensors or ``(up, down)`` pairs (learned-token
        parts change no weight: :meth:`to_lora` writes them as embedding files)."""
        from conceptsmith.tokens import is_token_edit  # a cycle: tokens builds Edits

        if is_token_edit(self):
            return {}
        if self.kind == "hook":
            raise EditError(f"The {self._label()} is an inference-time hook, not a weight change; it has no LoRA form.")
        terms: dict[str, list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]] = {}
        for part in self.parts:
            for module, part_terms in part._low_rank_terms().items():
                terms.setdefault(module, []).extend(part_terms)
        if self.kind == "weights":
            for module, parts in _group(self.tensors, _weights_key).items():
                terms.setdefault(module, []).append(parts["delta"] if "delta" in parts else (parts["up"], parts["down"]))
        elif self.kind == "lora":
            for module, parts in _group(self.tensors, _lora_key).items():
                terms.setdefault(module, []).append((parts["lora_B.weight"], parts["lora_A.weight"]))
        for module, module_terms in terms.items():
            if not all(_is_2d(term) for term in module_terms) and not all(_is_conv(term) for term in module_terms):
                raise EditError(
                    f"Module '{module}' is neither a linear layer nor a convolution with LoRA-shaped factors; it cannot be "
                    "exported as LoRA."
                )
        return terms


def base_fingerprint(pipe: Any) -> Fingerprint:
    """The identity of ``pipe``'s base: while edits are applied, the one read when the first of them was applied;
    otherwise read from the weights now (:func:`conceptsmith.models.fingerprint`, never cached)."""
    return getattr(pipe, _BASE_ATTR).identity if _stack(pipe) else fingerprint(pipe)


def applied_edits(pipe: Any) -> list[Edit]:
    """Edits currently applied to ``pipe``, in application order."""
    return [record.edit for record in _stack(pipe)]


def applied(pipe: Any) -> list[tuple[Edit, float]]:
    """``(edit, scale)`` of every edit currently applied to ``pipe``, in application order."""
    return [(record.edit, record.scale) for record in _stack(pipe)]


def content_digest(edit: Edit, scale: float = 1.0) -> str:
    """16 hex digits of SHA-256 over what ``edit`` does at ``scale``: kind, method, params, base, hook and every
    tensor's bytes, parts included, and the scale (left out at 1, so an edit as computed keeps one key).
    The key of caches of what an edited pipe generates."""
    digest = hashlib.sha256()
    if scale != 1.0:
        digest.update(f"scale={scale!r}".encode())
    queue = [edit]
    while queue:
        current = queue.pop(0)
        fields = [current.kind, current.method, current.params, str(current.base_fingerprint), current.hook]
        digest.update(json.dumps(fields, sort_keys=True).encode())
        for name in sorted(current.tensors):
            tensor = current.tensors[name].detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        queue.extend(current.parts)
    return digest.hexdigest()[:16]


def compose(edits: Sequence[Edit]) -> Edit:
    """One edit equal to applying ``edits`` in order.

    All-``weights`` inputs merge into one ``weights`` edit: per module, deltas are summed (low-rank
    factors are concatenated along the rank, so the sum stays exactly low-rank). Otherwise the result
    is a ``composite`` edit whose parts apply in order.
    """
    if not edits:
        raise EditError("compose() needs at least one edit.")
    first = edits[0]
    for edit in edits[1:]:
        problem = base_mismatch(first.base_fingerprint, edit.base_fingerprint)
        if problem is not None:
            raise EditError(
                f"Cannot compose edits of different base models: the {first._label()} was computed on "
                f"{first.base_fingerprint}, the {edit._label()} on {edit.base_fingerprint} ({problem})."
            )
    flat = [part for edit in edits for part in (edit.parts or [edit])]
    concepts = list(dict.fromkeys(concept for edit in flat for concept in edit.concepts))
    method = "+".join(edit.method for edit in flat)
    if any(edit.kind != "weights" for edit in flat):
        return Edit("composite", method, concepts, {}, first.base_fingerprint, first.family, parts=flat)
    deltas: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}
    for module, terms in _merge_terms(flat).items():
        if all(isinstance(term, tuple) for term in terms):
            deltas[module] = (
                torch.cat([up.float() for up, _ in terms], dim=1),
                torch.cat([down.float() for _, down in terms], dim=0),
            )
        else:
            deltas[module] = sum(_dense(term) for term in terms)
    params = {"parts": [{"method": e.method, "concepts": e.concepts, "params": e.params} for e in flat]}
    metadata = {"parts": [e.metadata for e in flat]}
    return Edit.from_weight_deltas(method, concepts, params, first.base_fingerprint, first.family, deltas, metadata)


# -- applied-edit bookkeeping on the pipe ------------------------------------------------------------


@dataclass
class _Applied:
    edit: Edit
    undo: Undo
    scale: float
    leaf_digests: list[str] | None = None  # content digests of the edit or its parts, computed when first asked

    def digests(self) -> list[str]:
        if self.leaf_digests is None:
            self.leaf_digests = _leaf_digests(self.edit)
        return self.leaf_digests

    def __deepcopy__(self, memo: dict[int, Any]) -> _Applied:
        """A deep-copied pipe shares the (immutable) edit and undo data; weight undos resolve modules by path."""
        return _Applied(self.edit, self.undo, self.scale, self.leaf_digests)


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


def _stack(pipe: Any) -> list[_Applied]:
    stack = getattr(pipe, _STACK_ATTR, None)
    if stack is None:
        stack = []
        setattr(pipe, _STACK_ATTR, stack)
    return stack


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


def _apply_weights(edit: Edit, pipe: Any, scale: float) -> Undo:
    originals: dict[str, torch.Tensor] = {}  # by module path, so that a deep copy of the pipe reverts itself
    with torch.no_grad():
        for module, parts in _group(edit.tensors, _weights_key).items():
            weight = _target(pipe, module).weight
            if "delta" in parts:
                delta = parts["delta"].to(weight.device, torch.float32)
            else:
                delta = parts["up"].to(weight.device, torch.float32) @ parts["down"].to(weight.device, torch.float32)
            originals[module] = weight.detach().clone()
            weight.copy_((weight.float() + scale * delta).to(weight.dtype))

    def undo(pipe: Any) -> None:
        with torch.no_grad():
            for module, original in originals.items():
                _target(pipe, module).weight.copy_(original)

    return undo


class _NoMissingComponentWarning(logging.Filter):
    """Drops diffusers' warning that a LoRA has no keys for a text encoder: an edit that changes only the UNet
    has none by design, and the warning (repeated at every apply) says nothing about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


def _apply_lora(edit: Edit, pipe: Any, scale: float) -> Undo:
    name = f"conceptsmith_{uuid.uuid4().hex[:8]}"
    active = _active_adapters(pipe)
    tensors = {key: value * scale if key.endswith(".lora_B.weight") else value for key, value in edit.tensors.items()}
    quiet, diffusers_logger = _NoMissingComponentWarning(), logging.getLogger("diffusers.loaders.lora_base")
    diffusers_logger.addFilter(quiet)
    try:
        pipe.load_lora_weights(tensors, adapter_name=name)
    finally:
        diffusers_logger.removeFilter(quiet)
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
        raise EditError(f"Cannot apply the {edit._label()}: {err} Install or import the plugin that provides it.") from None
    handle = factory(edit, pipe)
    return lambda pipe: handle.remove()


# -- tensor layout -----------------------------------------------------------------------------------


def _weights_key(key: str) -> tuple[str, str]:
    module, _, part = key.rpartition(".")
    if not module or part not in _WEIGHT_PARTS:
        raise EditError(f"Unexpected tensor '{key}' in a weights edit; expected '<module>.delta' or '<module>.up' + '<module>.down'.")
    return module, part


def _lora_key(key: str) -> tuple[str, str]:
    for suffix in _LORA_SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix), suffix[1:]
    raise EditError(f"Unexpected tensor '{key}' in a lora edit; expected '<module>.lora_A.weight' and '<module>.lora_B.weight'.")


def _group(tensors: Mapping[str, torch.Tensor], split: Callable[[str], tuple[str, str]]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise EditError(f"Tensor '{key}' must be a floating-point torch.Tensor.")
        module, part = split(key)
        groups.setdefault(module, {})[part] = tensor
    return groups


def _weights_shape(module: str, parts: dict[str, torch.Tensor]) -> list[int]:
    if "delta" in parts:
        if len(parts) > 1:
            raise EditError(f"Module '{module}' has both a dense '.delta' and low-rank '.up'/'.down' tensors; keep one.")
        return list(parts["delta"].shape)
    if set(parts) != {"up", "down"}:
        present = next(iter(parts))
        missing = "down" if present == "up" else "up"
        raise EditError(f"Tensors missing for module '{module}': it has '.{present}' but no '.{missing}'.")
    up, down = parts["up"], parts["down"]
    if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
        raise EditError(f"Module '{module}': up {list(up.shape)} and down {list(down.shape)} must be [d_out, r] and [r, d_in].")
    return [up.shape[0], down.shape[1]]


def _lora_shape(module: str, parts: dict[str, torch.Tensor]) -> list[int]:
    if set(parts) != {"lora_A.weight", "lora_B.weight"}:
        missing = "lora_B" if "lora_A.weight" in parts else "lora_A"
        raise EditError(f"Tensors missing for module '{module}': no '{module}.{missing}.weight'.")
    down, up = parts["lora_A.weight"], parts["lora_B.weight"]
    if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
        raise EditError(f"Module '{module}': lora_B {list(up.shape)} and lora_A {list(down.shape)} have mismatched ranks.")
    return [up.shape[0], *down.shape[1:]]


def _change_norm(term: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> float:
    """Frobenius norm of a module's change: a dense delta, or ``up @ down`` (convolutions flattened) computed as
    ``sqrt(sum((U^T U) * (D D^T)))`` from the ``r x r`` Gram matrices, without forming the product."""
    if not isinstance(term, tuple):
        return float(torch.linalg.vector_norm(term.detach(), dtype=torch.float64))
    up, down = (t.detach().flatten(1).double() for t in term)
    return math.sqrt(max(float(((up.T @ up) * (down @ down.T)).sum()), 0.0))


def _is_2d(term: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> bool:
    return all(t.ndim == 2 for t in (term if isinstance(term, tuple) else (term,)))


def _is_conv(term: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> bool:
    """A convolution's change: a dense ``[out, in, kh, kw]`` delta, or LoRA factors ``up [out, r, 1, 1]``,
    ``down [r, in, kh, kw]`` (peft's and kohya's layout for Conv2d)."""
    if isinstance(term, tuple):
        up, down = term
        return up.ndim == 4 and down.ndim == 4 and tuple(up.shape[2:]) == (1, 1)
    return term.ndim == 4


def _factorize_layer(
    terms: list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]], rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`_factorize` for a linear layer, or for a convolution seen as the linear map ``[out, in * kh * kw]``
    (exact: a conv's LoRA is ``up[:, :, 0, 0] @ down.flatten(1)``), its factors reshaped back to conv form."""
    if all(_is_2d(term) for term in terms):
        return _factorize(terms, rank)
    first = terms[0]
    kernel = tuple((first[1] if isinstance(first, tuple) else first).shape[1:])  # (in, kh, kw)
    flat = [(term[0].flatten(1), term[1].flatten(1)) if isinstance(term, tuple) else term.flatten(1) for term in terms]
    up, down, error = _factorize(flat, rank)
    return up[:, :, None, None], down.reshape(down.shape[0], *kernel), error


def _dense(term: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    if isinstance(term, tuple):
        return term[0].float() @ term[1].float()
    return term.float()


def _merge_terms(edits: Sequence[Edit]) -> dict[str, list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]]:
    terms: dict[str, list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]] = {}
    shapes: dict[str, list[int]] = {}
    for edit in edits:
        for module, shape in edit.module_shapes.items():
            if shapes.setdefault(module, shape) != shape:
                raise EditError(f"Cannot compose: module '{module}' has shape {shapes[module]} in one edit and {shape} in another.")
        for module, parts in _group(edit.tensors, _weights_key).items():
            terms.setdefault(module, []).append(parts["delta"] if "delta" in parts else (parts["up"], parts["down"]))
    return terms


def _factorize(
    terms: list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]], rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(up, down, relative error)`` with ``up @ down`` = the sum of ``terms``, rank-capped by ``rank``."""
    if all(isinstance(term, tuple) for term in terms):
        up = torch.cat([u.double() for u, _ in terms], dim=1)
        down = torch.cat([d.double() for _, d in terms], dim=0)
        width = up.shape[1]
        if width <= min(up.shape[0], down.shape[1]) and (rank is None or width <= rank):
            return up, down, 0.0
        q_up, r_up = torch.linalg.qr(up)
        q_down, r_down = torch.linalg.qr(down.T)
        u, s, vh = torch.linalg.svd(r_up @ r_down.T)
        left, right = q_up @ u, vh @ q_down.T
    else:
        left, s, right = torch.linalg.svd(sum(_dense(term).double() for term in terms), full_matrices=False)
    tolerance = s.max() * max(left.shape[0], right.shape[1]) * torch.finfo(torch.float32).eps
    keep = int((s > tolerance).sum()) if rank is None else min(rank, int((s > tolerance).sum()))
    total = float(s.square().sum())
    error = math.sqrt(float(s[keep:].square().sum()) / total) if total > 0 else 0.0
    root = s[:keep].sqrt()
    return left[:, :keep] * root, root[:, None] * right[:keep], error


def _config_dict(config: Any) -> dict[str, Any]:
    raw = config if isinstance(config, Mapping) else vars(config)
    if "lora_alpha" not in raw:
        raise EditError(f"LoRA config {raw} has no 'lora_alpha'; pass the adapter's LoraConfig or a dict with lora_alpha.")
    return {
        "lora_alpha": raw["lora_alpha"],
        "alpha_pattern": dict(raw.get("alpha_pattern") or {}),
        "use_rslora": bool(raw.get("use_rslora", False)),
    }


def _lora_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's scaling of one module: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), alpha from alpha_pattern."""
    alpha = next(
        (value for pattern, value in config["alpha_pattern"].items() if re.match(rf"(.*\.)?({pattern})$", module)),
        config["lora_alpha"],
    )
    return alpha / (math.sqrt(rank) if config["use_rslora"] else rank)


# -- files -------------------------------------------------------------------------------------------


def _bounded_json(text: str) -> Any:
    """The header's JSON, refused over :data:`MAX_METADATA_BYTES` or deeper than :data:`MAX_METADATA_DEPTH`."""
    if len(text) > MAX_METADATA_BYTES:
        raise EditError(f"its metadata is {len(text) / 2**20:.1f} MiB of JSON, more than the {MAX_METADATA_BYTES // 2**20} MiB "
                        "an edit header holds; re-create it with Edit.save.")
    try:
        value = json.loads(text)
    except RecursionError:
        value, depth = None, MAX_METADATA_DEPTH + 1
    else:
        depth, level = 0, [value]
        while level and depth <= MAX_METADATA_DEPTH:
            depth += 1
            level = [child for item in level if isinstance(item, (dict, list))
                     for child in (item.values() if isinstance(item, dict) else item)]
    if depth > MAX_METADATA_DEPTH:
        raise EditError(f"its metadata JSON is nested more than {MAX_METADATA_DEPTH} levels deep; re-create it with Edit.save.")
    return value


def _check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise EditError(f"tensor '{key}' holds NaN or infinite values; re-create the edit (its fit diverged or the "
                            "file was damaged).")


def _repeated(edit: Edit, stack: list[_Applied]) -> str | None:
    """The content digest ``edit`` (or one of its parts) shares with an applied edit (or part), else ``None``."""
    if not stack:
        return None
    applied = {digest for record in stack for digest in record.digests()}
    return next((digest for digest in _leaf_digests(edit) if digest in applied), None)


def _leaf_digests(edit: Edit) -> list[str]:
    return [content_digest(part) for part in (edit.parts or [edit])]


def _deserialize(header: Any, tensors: dict[str, torch.Tensor], parent_base: Fingerprint | None = None) -> Edit:
    if not isinstance(header, dict):
        raise EditError("its metadata is not a JSON object.")
    version = header.get("format_version")
    if not isinstance(version, int):
        raise EditError("its metadata has no integer 'format_version'.")
    if version > FORMAT_VERSION:
        raise EditError(f"it was written in edit format {version} by a newer ConceptSmith (this one reads {FORMAT_VERSION}); upgrade conceptsmith.")
    fields = {
        "kind": str,
        "method": str,
        "concepts": list,
        "params": dict,
        "base_fingerprint": str,
        "family": str,
        "module_shapes": dict,
        "metadata": dict,
        "parts": list,
    }
    for name, expected in fields.items():
        if not isinstance(header.get(name), expected):
            raise EditError(f"its metadata field '{name}' is missing or not a {expected.__name__}.")
    if header["kind"] not in KINDS:
        raise EditError(f"unknown edit kind '{header['kind']}' (known: {', '.join(KINDS)}); it may need a newer ConceptSmith.")
    if not all(isinstance(concept, str) for concept in header["concepts"]):
        raise EditError("its metadata field 'concepts' must be a list of strings.")
    if not isinstance(header.get("hook"), (str, type(None))):
        raise EditError("its metadata field 'hook' must be a string or null.")
    base = _read_base(header, version, parent_base)
    own = dict(tensors)
    parts = []
    for index, part_header in enumerate(header["parts"]):
        prefix = f"parts.{index}."
        part_tensors = {key.removeprefix(prefix): own.pop(key) for key in list(own) if key.startswith(prefix)}
        parts.append(_deserialize(part_header, part_tensors, base))
    edit = Edit(
        header["kind"],
        header["method"],
        header["concepts"],
        header["params"],
        base,
        header["family"],
        own,
        header.get("hook"),
        parts,
        header["metadata"],
    )
    recorded = header["module_shapes"]
    actual = edit.module_shapes
    for module, shape in recorded.items():
        if module not in actual:
            raise EditError(f"tensors missing for module '{module}' (listed in its metadata, absent from the file).")
        if actual[module] != shape:
            raise EditError(f"module '{module}' has tensors of shape {actual[module]} but its metadata says {shape}.")
    extra = sorted(set(actual) - set(recorded))
    if extra:
        raise EditError(f"it holds tensors for modules its metadata does not list: {', '.join(extra)}.")
    return edit


def _read_base(header: dict[str, Any], version: int, parent_base: Fingerprint | None) -> Fingerprint:
    """The base identity a header records: format 1 carries identity version 1 (a string); format 2 its digests,
    which a composite's parts share with it."""
    value = header["base_fingerprint"]
    if version < 2:
        return Fingerprint(value, version=1)
    if "base_identity" not in header:
        return parent_base if parent_base is not None and parent_base == value else Fingerprint(value)
    try:
        return Fingerprint.from_json(value, header["base_identity"])
    except ValueError as err:
        raise EditError(f"its metadata field {err}.") from None
