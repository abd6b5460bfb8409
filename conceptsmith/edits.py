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

The file layout is :mod:`conceptsmith.edit_format`, the stack of edits applied to a pipe
:mod:`conceptsmith.edit_stack`, the low-rank forms of ``to_lora`` and ``compose`` :mod:`conceptsmith.low_rank`;
this module re-exports what callers import from it (``FORMAT_VERSION``, ``content_digest``, ``locate_module``,
``MAX_RELATIVE_CHANGE``, and the ``--edit`` syntax ``parse_edit_spec``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from conceptsmith import __version__
from conceptsmith.edit_format import FORMAT_VERSION as FORMAT_VERSION  # ``X as X``: re-exported here
from conceptsmith.edit_format import (
    KINDS,
    METADATA_KEY,
    bounded_json,
    check_finite,
    deserialize,
    serialize,
    weight_shapes,
)
from conceptsmith.edit_format import content_digest as content_digest
from conceptsmith.edit_stack import MAX_RELATIVE_CHANGE as MAX_RELATIVE_CHANGE
from conceptsmith.edit_stack import Undo as Undo
from conceptsmith.edit_stack import applied_base, apply_edit, revert_edit, stack_of
from conceptsmith.edit_stack import locate_module as locate_module
from conceptsmith.errors import EditError
from conceptsmith.identity import Fingerprint, base_mismatch
from conceptsmith.io import save_safetensors
from conceptsmith.low_rank import factorize_layer, lora_config_dict, lora_scale, low_rank_terms, merged_deltas
from conceptsmith.models import fingerprint
from conceptsmith.validate import check_scale
from conceptsmith.validate import parse_edit_spec as parse_edit_spec

Kind = Literal["weights", "lora", "hook", "composite"]
LORA_SOURCE_KEY = "conceptsmith_source"
#: Bounds of an edit file's JSON header (real headers are well under 1 MiB and 10 levels deep).
MAX_METADATA_BYTES = 16 * 2**20
MAX_METADATA_DEPTH = 64


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
        lora_config = {name: lora_config_dict(config) for name, config in (lora_config or {}).items()}
        tensors = dict(state_dict)
        for key, up in state_dict.items():
            if key.endswith(".lora_B.weight"):
                component, _, module = key.removesuffix(".lora_B.weight").partition(".")
                if component in lora_config:
                    tensors[key] = up * lora_scale(lora_config[component], module, up.shape[1])
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
        return weight_shapes(self.kind, self.tensors)

    @property
    def label(self) -> str:
        """How messages name the edit: its method and concepts."""
        return f"'{self.method}' edit of {self.concepts}"

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
            header = bounded_json(file_metadata[METADATA_KEY], MAX_METADATA_BYTES, MAX_METADATA_DEPTH)
            check_finite(tensors)
            return deserialize(header, tensors, cls)
        except json.JSONDecodeError as err:
            raise EditError(f"Cannot load edit '{path}': its metadata is not valid JSON ({err}); re-create it with Edit.save.") from None
        except EditError as err:
            raise EditError(f"Cannot load edit '{path}': {err}") from None

    def _serialize(self, parent_base: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Header and tensors (:func:`conceptsmith.edit_format.serialize`)."""
        return serialize(self, parent_base)

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
        apply_edit(self, pipe, check_scale(scale), repeat_ok)

    def revert(self, pipe: Any) -> None:
        """Undo :meth:`apply` exactly; edits applied after this one are undone and re-applied in order, each at its scale."""
        revert_edit(self, pipe)

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
        for module, terms in low_rank_terms(self).items():
            up, down, errors[module] = factorize_layer(terms, rank)
            if up.shape[1] > 0:
                factors[module] = (up.float().contiguous(), down.float().contiguous())
        tokens = edit_tokens(self)
        if not factors and not tokens:
            raise EditError(f"The {self.label} changes no weights; there is nothing to write as a LoRA.")
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


def base_fingerprint(pipe: Any) -> Fingerprint:
    """The identity of ``pipe``'s base: while edits are applied, the one read when the first of them was applied;
    otherwise read from the weights now (:func:`conceptsmith.models.fingerprint`, never cached)."""
    base = applied_base(pipe)
    return base if base is not None else fingerprint(pipe)


def applied_edits(pipe: Any) -> list[Edit]:
    """Edits currently applied to ``pipe``, in application order."""
    return [record.edit for record in stack_of(pipe)]


def applied(pipe: Any) -> list[tuple[Edit, float]]:
    """``(edit, scale)`` of every edit currently applied to ``pipe``, in application order."""
    return [(record.edit, record.scale) for record in stack_of(pipe)]


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
                f"Cannot compose edits of different base models: the {first.label} was computed on "
                f"{first.base_fingerprint}, the {edit.label} on {edit.base_fingerprint} ({problem})."
            )
    flat = [part for edit in edits for part in (edit.parts or [edit])]
    concepts = list(dict.fromkeys(concept for edit in flat for concept in edit.concepts))
    method = "+".join(edit.method for edit in flat)
    if any(edit.kind != "weights" for edit in flat):
        return Edit("composite", method, concepts, {}, first.base_fingerprint, first.family, parts=flat)
    deltas = merged_deltas(flat)
    params = {"parts": [{"method": e.method, "concepts": e.concepts, "params": e.params} for e in flat]}
    metadata = {"parts": [e.metadata for e in flat]}
    return Edit.from_weight_deltas(method, concepts, params, first.base_fingerprint, first.family, deltas, metadata)
