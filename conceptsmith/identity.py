"""The base identity of a pipeline: which weights (and which sampler) an Edit or a cache belongs to.

Definition (identity version 2). Every tensor of every model component of the pipe (UNet or
transformer, text encoder(s), VAE, and any other ``torch.nn.Module`` component) is hashed whole with
BLAKE2b, together with its name and shape; floating-point tensors are hashed after a cast to
float16, so the identity is that of the weights at float16 precision. The scheduler's class and
config are hashed as one more component. The fingerprint is 16 hex digits of the digest over the
per-component digests; per-component and per-module digests travel with it (:class:`Fingerprint`),
so a refusal can name the first module that differs.

Precision: an fp32 base, its fp16 copy (round to nearest, as ``.to(torch.float16)`` and
checkpoint converters do) and an fp16 checkpoint loaded in fp32 have one identity. A bfloat16 copy
keeps 3 fewer mantissa bits than float16, so it is a different identity (no rounding rule can make
fp16 and bf16 copies of one fp32 base agree: rounding twice differs from rounding once).

What does not count: wrappers that leave the weights alone. ``torch.compile``'s ``_orig_mod.``
level; unfused peft adapters (``base_layer`` weights are hashed under the plain names, the adapter
tensors are skipped; a fused adapter changed the weights and does count); rows a text encoder's
token-embedding table gained for added tokens (only the tokenizer's base vocabulary rows count).
Tokenizers, feature extractors and other non-module components do not count either.

Nothing is cached across calls: every call reads every weight (cost on SD 1.5: ``bench/closed_form.py
--only fingerprint``), except inside :func:`remembered`, which an editor's ``fit`` runs in (fit never changes
the pipe's weights, so the identity is read once per fit). Tensors are hashed in ``torch.get_num_threads()`` threads (hashing and casting
release the GIL).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

IDENTITY_VERSION = 2
#: Components an Edit is bound to: the denoiser and the text encoders. The VAE and the scheduler only
#: turn latents into images, so an edit applies across them; caches of images are keyed by all of it.
EDIT_COMPONENTS = re.compile(r"unet|transformer|text_encoder(_\d+)?")
_TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
_WRAPPER_LEVELS = {"_orig_mod", "base_layer"}
_LEGACY_SAMPLES = 4096


class IdentityError(ValueError):
    """A pipe whose weights cannot be read for its identity (e.g. on the meta device)."""


class Fingerprint(str):
    """16 hex digits naming a base (a ``str``), with the digests it was made of.

    ``components`` maps a component name (``unet``, ``vae``, ``scheduler``, ...) to its digest and
    ``modules`` a module path (``unet.down_blocks.0.resnets.0.conv1``) to the digest of its tensors;
    both are empty for a fingerprint known only as a string. ``version`` is the identity version
    (1: the sampled digest of UNet and text encoders that edits written before version 2 carry).
    """

    version: int
    components: dict[str, str]
    modules: dict[str, str]

    def __new__(
        cls,
        value: str,
        version: int = IDENTITY_VERSION,
        components: dict[str, str] | None = None,
        modules: dict[str, str] | None = None,
    ) -> Fingerprint:
        made = super().__new__(cls, value)
        made.version = version
        made.components = dict(components or {})
        made.modules = dict(modules or {})
        return made

    def to_json(self) -> dict[str, Any]:
        """The digests behind the string (what an Edit file records as ``base_identity``)."""
        return {"version": self.version, "components": self.components, "modules": self.modules}

    @classmethod
    def from_json(cls, value: str, data: Any) -> Fingerprint:
        """Inverse of :meth:`to_json`; ``ValueError`` names what is malformed."""
        if not isinstance(data, dict) or not isinstance(data.get("version"), int):
            raise ValueError("'base_identity' must be an object with an integer 'version'")
        tables = {name: data.get(name) or {} for name in ("components", "modules")}
        for name, table in tables.items():
            if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
                raise ValueError(f"'base_identity.{name}' must map names to digest strings")
        return cls(value, data["version"], tables["components"], tables["modules"])


_REMEMBERED: dict[int, Fingerprint | None] = {}  # id(pipe) -> identity, only inside `remembered(pipe)`


@contextlib.contextmanager
def remembered(pipe: Any) -> Iterator[None]:
    """Inside this block :func:`fingerprint` reads ``pipe``'s weights once; for code that leaves them as they
    were (an editor's ``fit``). Blocks nest; the identity is forgotten when the outermost one ends."""
    key = id(pipe)
    if key in _REMEMBERED:
        yield
        return
    _REMEMBERED[key] = None
    try:
        yield
    finally:
        del _REMEMBERED[key]


def fingerprint(pipe: Any) -> Fingerprint:
    """The base identity of ``pipe``'s current weights and scheduler (see the module docstring)."""
    known = _REMEMBERED.get(id(pipe))
    if known is not None:
        return known
    identity = _read_fingerprint(pipe)
    if id(pipe) in _REMEMBERED:
        _REMEMBERED[id(pipe)] = identity
    return identity


def _read_fingerprint(pipe: Any) -> Fingerprint:
    entries: list[tuple[str, str, torch.Tensor]] = []  # (component, tensor name, tensor)
    components: dict[str, str] = {}
    for component, value in _components(pipe):
        if isinstance(value, torch.nn.Module):
            entries += [(component, name, tensor) for name, tensor in _named_tensors(pipe, component, value)]
        elif _is_scheduler(value):
            components[component] = _digest(_scheduler_json(value).encode())
    threads = max(1, torch.get_num_threads())
    tensors = [tensor for _, _, tensor in entries]
    if threads > 1 and len(tensors) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            digests = list(pool.map(_tensor_digest, tensors))
    else:
        digests = [_tensor_digest(tensor) for tensor in tensors]
    grouped: dict[str, dict[str, list[str]]] = {}  # component -> module -> lines
    for (component, name, tensor), digest in zip(entries, digests, strict=True):
        module, _, leaf = name.rpartition(".")
        line = f"{leaf}:{list(tensor.shape)}:{_kind(tensor)}:{digest}"
        grouped.setdefault(component, {}).setdefault(module, []).append(line)
    modules: dict[str, str] = {}
    for component, table in grouped.items():
        own = {f"{component}.{module}" if module else component: _digest("\n".join(sorted(lines)).encode()) for module, lines in table.items()}
        modules.update(own)
        components[component] = _digest("\n".join(f"{name}={digest}" for name, digest in sorted(own.items())).encode())
    total = _digest("\n".join(f"{name}={digest}" for name, digest in sorted(components.items())).encode())
    return Fingerprint(total, IDENTITY_VERSION, dict(sorted(components.items())), modules)


def base_mismatch(expected: str, actual: str) -> str | None:
    """Why the base ``actual`` (a pipe's) is not the base ``expected`` (an Edit's), or None if it is: e.g.
    ``unet.down_blocks.0.resnets.0.conv1 differs (and 3 more modules)`` or ``text_encoder_2 is missing``.

    With per-component digests on both sides only :data:`EDIT_COMPONENTS` are compared and the answer
    names the first module that differs; otherwise the strings must be equal.
    """
    theirs, ours = getattr(expected, "components", None), getattr(actual, "components", None)
    if not theirs or not ours:
        return None if str(expected) == str(actual) else "its fingerprint differs"
    names = sorted(name for name in theirs.keys() | ours.keys() if EDIT_COMPONENTS.fullmatch(name))
    differing = [name for name in names if theirs.get(name) != ours.get(name)]
    if not differing:
        return None
    for name in differing:
        if name not in ours:
            return f"{name} is missing"
        if name not in theirs:
            return f"{name} is unexpected (the edit's base has none)"
    modules_theirs, modules_ours = getattr(expected, "modules", {}), getattr(actual, "modules", {})
    modules = [m for m in modules_theirs if _component(m) in differing]
    modules += [m for m in modules_ours if _component(m) in differing and m not in modules_theirs]
    changed = [m for m in modules if modules_theirs.get(m) != modules_ours.get(m)]
    if not changed:
        return f"{differing[0]} differs"
    first, more = changed[0], len(changed) - 1
    what = "is missing" if first not in modules_ours else "is unexpected" if first not in modules_theirs else "differs"
    return f"{first} {what}" + (f" (and {more} more module{'s' if more > 1 else ''})" if more else "")


def precision_hint(pipe: Any) -> str:
    """A sentence for a refusal when ``pipe`` holds bfloat16 weights (their identity differs from fp16/fp32 copies)."""
    for component, value in _components(pipe):
        if isinstance(value, torch.nn.Module) and EDIT_COMPONENTS.fullmatch(component):
            if any(p.dtype == torch.bfloat16 for p in value.parameters()):
                return (
                    " This pipe's weights are bfloat16, which keeps fewer digits than the float16 the identity compares:"
                    " load the base in float16 or float32 to apply edits made on it."
                )
    return ""


def legacy_fingerprint(pipe: Any) -> str:
    """Identity version 1, which edit files of format 1 carry: strided samples of the UNet and text-encoder
    tensors rounded to float16, names and shapes, 16 hex digits of SHA-256."""
    digest = hashlib.sha256()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // _LEGACY_SAMPLES)
            sample = flat[::step].to("cpu", torch.float16).contiguous()
            digest.update(f"{component}.{name}:{tuple(tensor.shape)}".encode())
            digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


# -- internals ---------------------------------------------------------------------------------------


def _components(pipe: Any) -> Iterator[tuple[str, Any]]:
    """(name, object) of the pipe's components: a diffusers pipeline's registered ones, else its attributes."""
    config = getattr(pipe, "config", None)
    if isinstance(config, dict):  # registered components are recorded as (library, class) pairs
        names = [key for key, value in config.items() if isinstance(value, (list, tuple))]
    else:
        names = list(vars(pipe))
    for name in sorted(names):
        if not name.startswith("_"):
            yield name, getattr(pipe, name, None)


def _is_scheduler(value: Any) -> bool:
    from diffusers import SchedulerMixin

    return isinstance(value, SchedulerMixin)


def _scheduler_json(scheduler: Any) -> str:
    config = {key: value for key, value in dict(scheduler.config).items() if not key.startswith("_")}
    return json.dumps(
        {"class": type(scheduler).__name__, "config": config},
        sort_keys=True,
        default=lambda value: value.tolist() if hasattr(value, "tolist") else str(value),
    )


def _named_tensors(pipe: Any, component: str, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The component's state-dict tensors under wrapper-free names (see the module docstring)."""
    adapters = _adapter_layer_names(model)
    embedding, rows = _token_embedding(pipe, component, model)
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        if any(part in adapters for part in parts):
            continue
        name = ".".join(part for part in parts if part not in _WRAPPER_LEVELS)
        if embedding is not None and name.startswith(f"{embedding}."):
            if rows is not None:  # the table's base rows, in place of whatever holds them
                yield f"{embedding}.weight", rows
                rows = None
            continue
        yield name, tensor


def _adapter_layer_names(model: torch.nn.Module) -> set[str]:
    """Names of the adapter submodules peft added (``lora_A``, ``lora_B``, ...), empty without peft layers."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return set()
    return {name for module in model.modules() if isinstance(module, BaseTunerLayer) for name in module.adapter_layer_names}


def _token_embedding(pipe: Any, component: str, model: torch.nn.Module) -> tuple[str | None, torch.Tensor | None]:
    """(wrapper-free path, base-vocabulary rows) of a text encoder's token-embedding table, or (None, None)."""
    tokenizer = getattr(pipe, _TOKENIZER_OF.get(component, ""), None)
    get = getattr(model, "get_input_embeddings", None)
    if tokenizer is None or get is None:
        return None, None
    table = get()
    path = next((name for name, module in model.named_modules() if module is table), None)
    weight = getattr(table, "weight", None)
    if path is None or not isinstance(weight, torch.Tensor):
        return None, None
    path = ".".join(part for part in path.split(".") if part not in _WRAPPER_LEVELS)
    return path, weight.detach()[: int(tokenizer.vocab_size)]


def _kind(tensor: torch.Tensor) -> str:
    return "f16" if tensor.is_floating_point() else str(tensor.dtype).removeprefix("torch.")


def _tensor_digest(tensor: torch.Tensor) -> str:
    """BLAKE2b of the tensor's bytes (floating point: as float16), whole."""
    if tensor.is_meta:
        raise IdentityError(
            "Cannot fingerprint a pipe whose weights are on the meta device (e.g. sequential CPU offload or "
            "init_empty_weights): compute the identity before offloading, or load the weights."
        )
    data = tensor.detach().to("cpu", torch.float16 if tensor.is_floating_point() else tensor.dtype)
    return hashlib.blake2b(data.contiguous().reshape(-1).view(torch.uint8).numpy(), digest_size=8).hexdigest()


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _component(module: str) -> str:
    return module.partition(".")[0]
