"""Cross-attention layers of a UNet: discovery of their K/V projections, and attention-map recording.

Every closed-form editor edits the same matrices: ``to_k`` and ``to_v`` of each cross-attention
layer, the only places where text embeddings enter the UNet. :func:`find_cross_attention` finds
them in any ``UNet2DConditionModel`` (SD 1.x: 16 layers, SD 2.x: 16, SDXL: 70), in execution
order (down blocks, mid block, up blocks). It works on the meta device, so full-size
architectures can be inspected without allocating their weights.

:class:`AttentionMapRecorder` wraps the processors of those layers during a generation and
collects per-token cross-attention maps (softmax over the text tokens, averaged over heads),
restoring the original processors on exit, also when the generation raises.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttentionMapRecorder",
    "CrossAttentionLayer",
    "find_cross_attention",
    "kv_projections",
]


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One cross-attention layer of a UNet.

    ``name`` is the module path of the diffusers ``Attention`` relative to the UNet
    (``"down_blocks.1.attentions.0.transformer_blocks.0.attn2"``). ``to_k`` / ``to_v`` are the
    projection ``nn.Linear`` modules (the base layer when a peft adapter wraps them), of shape
    ``[d_out, d_in]`` where ``d_in`` is the text-embedding width the UNet is conditioned on.
    """

    name: str
    module: nn.Module = field(repr=False, compare=False)
    to_k: nn.Linear = field(repr=False, compare=False)
    to_v: nn.Linear = field(repr=False, compare=False)
    d_in: int
    d_out: int
    heads: int = 1

    @property
    def block(self) -> str:
        """``"down"``, ``"mid"`` or ``"up"`` (``"other"`` for unusual module paths)."""
        return _block_kind(self.name)


_BLOCK_ORDER = {"down": 0, "mid": 1, "up": 2, "other": 3}


def _block_kind(name: str) -> str:
    head = name.split(".", 1)[0]
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head, "other")


def _unwrap_linear(module: nn.Module) -> nn.Module:
    """The underlying ``nn.Linear`` of a (possibly peft-wrapped) projection."""
    while hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
        module = module.base_layer
    return module


def _cross_attention_dims(unet: nn.Module) -> set[int]:
    dim = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    if dim is None:
        raise ValueError(
            f"{type(unet).__name__} has no config.cross_attention_dim: pass a diffusers UNet2DConditionModel "
            "(or a pipeline that has one as .unet)."
        )
    if isinstance(dim, (list, tuple)):
        return {int(d) for d in dim}
    return {int(dim)}


def _get_unet(unet_or_pipe: nn.Module | object) -> nn.Module:
    if isinstance(unet_or_pipe, nn.Module):
        return unet_or_pipe
    unet = getattr(unet_or_pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise TypeError(
            f"Expected a UNet2DConditionModel or a pipeline with .unet, got {type(unet_or_pipe).__name__}."
        )
    return unet


def _is_cross_attention(name: str, module: nn.Module, dims: set[int]) -> bool:
    to_k = getattr(module, "to_k", None)
    to_v = getattr(module, "to_v", None)
    if not isinstance(to_k, nn.Module) or not isinstance(to_v, nn.Module):
        return False
    flag = getattr(module, "is_cross_attention", None)
    if flag is None:
        flag = name.rsplit(".", 1)[-1] == "attn2"
    if not flag:
        return False
    in_features = getattr(_unwrap_linear(to_k), "in_features", None)
    return in_features in dims


def find_cross_attention(unet: nn.Module | object) -> list[CrossAttentionLayer]:
    """Every cross-attention layer of ``unet`` (or ``pipe.unet``), in execution order.

    A layer qualifies when it is an attention module flagged as cross-attention (diffusers'
    ``Attention.is_cross_attention``; ``attn2`` for modules without the flag) and its ``to_k``
    reads vectors of the UNet's ``cross_attention_dim``. Self-attention layers whose width
    happens to equal the text width are therefore excluded.
    """
    unet = _get_unet(unet)
    dims = _cross_attention_dims(unet)
    layers = []
    for name, module in unet.named_modules():
        if not name or not _is_cross_attention(name, module, dims):
            continue
        to_k = _unwrap_linear(module.to_k)
        to_v = _unwrap_linear(module.to_v)
        layers.append(
            CrossAttentionLayer(
                name=name,
                module=module,
                to_k=to_k,
                to_v=to_v,
                d_in=int(to_k.in_features),
                d_out=int(to_k.out_features),
                heads=int(getattr(module, "heads", 1)),
            )
        )
    layers.sort(key=lambda layer: _BLOCK_ORDER[layer.block])  # stable: keeps order inside a block
    return layers


def kv_projections(unet: nn.Module | object) -> dict[str, nn.Linear]:
    """``{"<layer>.to_k": Linear, "<layer>.to_v": Linear, ...}`` for every cross-attention layer.

    Keys are module paths relative to the UNet (prefix ``"unet."`` for a pipeline-level path).
    """
    projections: dict[str, nn.Linear] = {}
    for layer in find_cross_attention(unet):
        projections[f"{layer.name}.to_k"] = layer.to_k
        projections[f"{layer.name}.to_v"] = layer.to_v
    return projections


# --------------------------------------------------------------------------------------------
# Attention-map recording
# --------------------------------------------------------------------------------------------


def _attention_probs(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
) -> torch.Tensor:
    """Cross-attention probabilities ``[batch, heads, queries, tokens]`` of a diffusers ``Attention``.

    Mirrors the pre-processing of diffusers' standard processors (spatial/group norm, 4-d
    inputs, cross norm, q/k norms, additive mask) so the maps are those the layer uses.
    """
    if getattr(attn, "spatial_norm", None) is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch, n_tokens = encoder_hidden_states.shape[0], encoder_hidden_states.shape[1]
    if getattr(attn, "group_norm", None) is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if getattr(attn, "norm_cross", None):
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

    query = attn.to_q(hidden_states)
    key = attn.to_k(encoder_hidden_states)
    heads = attn.heads
    head_dim = key.shape[-1] // heads
    query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)

    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, n_tokens, batch)
        scores = scores + mask.view(batch, heads, -1, mask.shape[-1]).float()
    return scores.softmax(dim=-1)


def spatial_shape(n_queries: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of a layer's query grid, from the latent size the UNet was called with."""
    if latent_hw is not None:
        height, width = latent_hw
        factor = 1
        while factor <= max(height, width):
            h, w = math.ceil(height / factor), math.ceil(width / factor)
            if h * w == n_queries:
                return h, w
            factor *= 2
    side = math.isqrt(n_queries)
    if side * side == n_queries:
        return side, side
    return n_queries, 1


class _RecordingProcessor:
    """Wraps a layer's processor: the output is the original processor's, untouched; the maps are
    computed on the side from the same inputs when the recorder asks for them."""

    def __init__(self, original: Callable, recorder: AttentionMapRecorder, layer_name: str):
        self.original = original
        self.recorder = recorder
        self.layer_name = layer_name

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None and self.recorder._should_record():
            grad = torch.enable_grad() if self.recorder.keep_grad else torch.no_grad()
            with grad:
                probs = _attention_probs(
                    attn, hidden_states, encoder_hidden_states, attention_mask, kwargs.get("temb")
                )
                self.recorder._add(self.layer_name, probs)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


def _wrap(original: Callable, recorder: AttentionMapRecorder, layer_name: str) -> _RecordingProcessor:
    """A recording processor whose ``__call__`` advertises the original's signature.

    diffusers' ``Attention.forward`` drops ``cross_attention_kwargs`` that the processor's
    signature does not name, so the wrapper must expose the same parameter names.
    """
    try:
        signature = inspect.signature(type(original).__call__)
    except (TypeError, ValueError):
        return _RecordingProcessor(original, recorder, layer_name)

    def __call__(self, *args, **kwargs):  # noqa: N807
        return _RecordingProcessor.__call__(self, *args, **kwargs)

    __call__.__signature__ = signature
    cls = type(f"Recording{type(original).__name__}", (_RecordingProcessor,), {"__call__": __call__})
    return cls(original, recorder, layer_name)


class AttentionMapRecorder:
    """Context manager collecting cross-attention maps during a generation.

    ``with AttentionMapRecorder(pipe, token_indices=[5, 6]) as rec: pipe(prompt, ...)``

    Args:
        pipe: a diffusers pipeline (or a bare UNet).
        token_indices: text-token positions to keep (columns of the softmax over all tokens);
            ``None`` keeps every token (77).
        steps: indices of the UNet calls to record (0 = first denoising step; one UNet call per
            step in the standard pipelines, classifier-free guidance batched); ``None`` = all.
        layers: layer names to record, or a predicate on the name; ``None`` = every
            cross-attention layer.
        per_step: also keep each recorded step's maps (``step_maps``); otherwise only running
            means are kept (memory does not grow with the number of steps).
        device: where maps are accumulated (float32).
        keep_grad: compute maps with autograd enabled (for attention losses); maps then stay on
            the compute device and are not detached.

    After (or during) the run:
        ``maps``: ``{layer_name: Tensor[batch, h, w, k]}`` mean over recorded steps and heads;
        ``step_maps``: ``{layer_name: {step: Tensor[batch, h, w, k]}}`` when ``per_step``;
        :meth:`by_resolution` and :meth:`aggregate` average over layers.
    The batch axis is the UNet batch (with classifier-free guidance: unconditional first,
    then conditional, as the pipelines concatenate them).
    """

    def __init__(
        self,
        pipe: object,
        token_indices: Iterable[int] | None = None,
        steps: Iterable[int] | None = None,
        layers: Iterable[str] | Callable[[str], bool] | None = None,
        per_step: bool = False,
        device: str | torch.device = "cpu",
        keep_grad: bool = False,
    ):
        self.unet = _get_unet(pipe)
        self.token_indices = None if token_indices is None else [int(i) for i in token_indices]
        self.steps = None if steps is None else {int(s) for s in steps}
        self.per_step = per_step
        self.device = torch.device(device)
        self.keep_grad = keep_grad
        all_layers = find_cross_attention(self.unet)
        if layers is None:
            selected = all_layers
        elif callable(layers):
            selected = [layer for layer in all_layers if layers(layer.name)]
        else:
            wanted = list(layers)
            known = {layer.name for layer in all_layers}
            unknown = [name for name in wanted if name not in known]
            if unknown:
                raise ValueError(
                    f"Unknown cross-attention layer(s) {unknown}; known layers: {sorted(known)}."
                )
            selected = [layer for layer in all_layers if layer.name in set(wanted)]
        if not selected:
            raise ValueError("No cross-attention layer selected to record.")
        self.layers = selected
        self._originals: dict[str, Callable] = {}
        self._hook = None
        self._active = False
        self.reset()

    # ---------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        """Forget everything recorded so far (the step counter restarts at 0)."""
        self.step = -1  # index of the current UNet call
        self._latent_hw: tuple[int, int] | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self.step_maps: dict[str, dict[int, torch.Tensor]] = {}
        self.recorded_steps: list[int] = []

    def __enter__(self) -> AttentionMapRecorder:
        if self._active:
            raise RuntimeError("AttentionMapRecorder is already active; it cannot be entered twice.")
        self._originals = {layer.name: layer.module.processor for layer in self.layers}
        try:
            for layer in self.layers:
                layer.module.set_processor(_wrap(self._originals[layer.name], self, layer.name))
            self._hook = self.unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)
        except BaseException:
            self._restore()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for layer in self.layers:
            if layer.name in self._originals:
                layer.module.set_processor(self._originals[layer.name])
        self._originals = {}
        self._active = False

    def _on_unet_call(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        self.step += 1
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            self._latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        if self._should_record() and (not self.recorded_steps or self.recorded_steps[-1] != self.step):
            self.recorded_steps.append(self.step)
        return None

    def _should_record(self) -> bool:
        return self.steps is None or self.step in self.steps

    # ---------------------------------------------------------------- collection
    def _add(self, name: str, probs: torch.Tensor) -> None:
        maps = probs.mean(dim=1)  # heads -> [batch, queries, tokens]
        if self.token_indices is not None:
            n_tokens = maps.shape[-1]
            bad = [i for i in self.token_indices if not -n_tokens <= i < n_tokens]
            if bad:
                raise IndexError(f"token_indices {bad} out of range for {n_tokens} text tokens.")
            maps = maps[..., self.token_indices]
        h, w = spatial_shape(maps.shape[1], self._latent_hw)
        maps = maps.reshape(maps.shape[0], h, w, maps.shape[-1])
        if not self.keep_grad:
            maps = maps.detach().to(self.device, torch.float32)
        if name in self._sums and self._sums[name].shape == maps.shape:
            self._sums[name] = self._sums[name] + maps
            self._counts[name] += 1
        else:  # first map of this layer (or the batch / size changed: start over for it)
            self._sums[name] = maps
            self._counts[name] = 1
        if self.per_step:
            self.step_maps.setdefault(name, {})[max(self.step, 0)] = maps

    # ---------------------------------------------------------------- results
    @property
    def maps(self) -> dict[str, torch.Tensor]:
        """``{layer_name: Tensor[batch, h, w, k]}``: mean over the recorded steps (and heads)."""
        return {name: total / self._counts[name] for name, total in self._sums.items()}

    def by_resolution(self) -> dict[tuple[int, int], torch.Tensor]:
        """Mean over layers sharing a spatial size: ``{(h, w): Tensor[batch, h, w, k]}``."""
        groups: dict[tuple[int, int], list[torch.Tensor]] = {}
        for tensor in self.maps.values():
            groups.setdefault((tensor.shape[1], tensor.shape[2]), []).append(tensor)
        return {size: torch.stack(tensors).mean(0) for size, tensors in sorted(groups.items())}

    def aggregate(
        self, size: tuple[int, int] | int | None = None, layers: Iterable[str] | str | None = None
    ) -> torch.Tensor:
        """Mean over layers (optionally only ``layers``, names or a regex), each map resized
        (bilinear) to ``size`` (default: the largest recorded size): ``Tensor[batch, h, w, k]``."""
        maps = self.maps
        if layers is not None:
            if isinstance(layers, str):
                pattern = re.compile(layers)
                maps = {n: m for n, m in maps.items() if pattern.search(n)}
            else:
                wanted = set(layers)
                maps = {n: m for n, m in maps.items() if n in wanted}
        if not maps:
            raise ValueError("No attention maps recorded (did the pipeline run inside the `with` block?).")
        if size is None:
            size = max(((m.shape[1], m.shape[2]) for m in maps.values()), key=lambda s: s[0] * s[1])
        elif isinstance(size, int):
            size = (size, size)
        resized = []
        for tensor in maps.values():
            if (tensor.shape[1], tensor.shape[2]) != tuple(size):
                tensor = F.interpolate(
                    tensor.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False
                )
                tensor = tensor.permute(0, 2, 3, 1)
            resized.append(tensor)
        return torch.stack(resized).mean(0)
