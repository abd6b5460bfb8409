"""The layout of an edit: its tensor keys, its JSON header, the checks on reading a file, and its content digest.

An edit file is a ``.safetensors`` file whose header metadata holds the edit's JSON description under
:data:`METADATA_KEY`; a composite's parts are stored in the same file, their tensors under ``parts.<i>.``.
Tensor keys per kind (:mod:`conceptsmith.edits` describes the kinds):

* ``weights``: ``<module>.delta`` (dense), or ``<module>.up`` [d_out, r] and ``<module>.down`` [r, d_in];
* ``lora``: ``<module>.lora_A.weight`` [r, d_in, ...] and ``<module>.lora_B.weight`` [d_out, r, ...] (diffusers).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from conceptsmith.errors import EditError
from conceptsmith.identity import IDENTITY_VERSION, Fingerprint

if TYPE_CHECKING:
    from conceptsmith.edits import Edit

KINDS: tuple[str, ...] = ("weights", "lora", "hook", "composite")
FORMAT_VERSION = 2  # 2: the header records the base's per-module digests (``base_identity``); 1: identity version 1
METADATA_KEY = "conceptsmith"

#: One summand of a module's weight change: a dense delta, or factors ``(up, down)`` with ``delta = up @ down``.
Term = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_WEIGHT_PARTS = ("delta", "up", "down")
_HEADER_FIELDS: dict[str, type] = {
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


# -- tensor layout -----------------------------------------------------------------------------------


def weight_shapes(kind: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """Weight shape of every module a ``weights``/``lora`` edit's tensors change, refusing a malformed layout;
    ``{}`` for the other kinds."""
    if kind == "weights":
        return {module: _weights_shape(module, parts) for module, parts in _group(tensors, _weights_key).items()}
    if kind == "lora":
        return {module: _lora_shape(module, parts) for module, parts in _group(tensors, _lora_key).items()}
    return {}


def module_terms(kind: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, Term]:
    """Per module, the change a ``weights``/``lora`` edit stores: its dense delta or ``(up, down)``
    (``(lora_B, lora_A)`` for LoRA); ``{}`` for the other kinds."""
    if kind == "weights":
        return {
            module: parts["delta"] if "delta" in parts else (parts["up"], parts["down"])
            for module, parts in _group(tensors, _weights_key).items()
        }
    if kind == "lora":
        return {
            module: (parts["lora_B.weight"], parts["lora_A.weight"])
            for module, parts in _group(tensors, _lora_key).items()
        }
    return {}


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


# -- header ------------------------------------------------------------------------------------------


def serialize(edit: Edit, parent_base: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header and tensors of ``edit``; a part's header leaves out the identity digests its composite already records."""
    header: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": edit.kind,
        "method": edit.method,
        "concepts": edit.concepts,
        "params": edit.params,
        "base_fingerprint": str(edit.base_fingerprint),
        "family": edit.family,
        "hook": edit.hook,
        "module_shapes": edit.module_shapes,
        "metadata": edit.metadata,
        "parts": [],
    }
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in edit.tensors.items()}
    if parent_base != edit.base_fingerprint:
        base = edit.base_fingerprint
        header["base_identity"] = base.to_json() if isinstance(base, Fingerprint) else {"version": IDENTITY_VERSION}
    for index, part in enumerate(edit.parts):
        part_header, part_tensors = serialize(part, edit.base_fingerprint)
        header["parts"].append(part_header)
        tensors.update({f"parts.{index}.{key}": value for key, value in part_tensors.items()})
    return header, tensors


def deserialize(
    header: Any, tensors: dict[str, torch.Tensor], edit_type: type[Edit], parent_base: Fingerprint | None = None
) -> Edit:
    """The ``edit_type`` a header of :func:`serialize` and its tensors describe, refusing any inconsistency
    (messages continue "Cannot load edit '<path>': ")."""
    if not isinstance(header, dict):
        raise EditError("its metadata is not a JSON object.")
    version = header.get("format_version")
    if not isinstance(version, int):
        raise EditError("its metadata has no integer 'format_version'.")
    if version > FORMAT_VERSION:
        raise EditError(f"it was written in edit format {version} by a newer ConceptSmith (this one reads {FORMAT_VERSION}); upgrade conceptsmith.")
    for name, expected in _HEADER_FIELDS.items():
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
        parts.append(deserialize(part_header, part_tensors, edit_type, base))
    edit = edit_type(
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


# -- checks on reading -------------------------------------------------------------------------------


def bounded_json(text: str, max_bytes: int, max_depth: int) -> Any:
    """The header's JSON, refused over ``max_bytes`` or nested deeper than ``max_depth``."""
    if len(text) > max_bytes:
        raise EditError(f"its metadata is {len(text) / 2**20:.1f} MiB of JSON, more than the {max_bytes // 2**20} MiB "
                        "an edit header holds; re-create it with Edit.save.")
    try:
        value = json.loads(text)
    except RecursionError:
        value, depth = None, max_depth + 1
    else:
        depth, level = 0, [value]
        while level and depth <= max_depth:
            depth += 1
            level = [child for item in level if isinstance(item, (dict, list))
                     for child in (item.values() if isinstance(item, dict) else item)]
    if depth > max_depth:
        raise EditError(f"its metadata JSON is nested more than {max_depth} levels deep; re-create it with Edit.save.")
    return value


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse a tensor holding NaN or infinite values."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise EditError(f"tensor '{key}' holds NaN or infinite values; re-create the edit (its fit diverged or the "
                            "file was damaged).")


# -- content -----------------------------------------------------------------------------------------


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
