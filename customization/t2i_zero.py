"""Multi-Concept T2I-Zero (arXiv 2310.07419): training-free multi-concept composition as a ``hook`` edit.

Two inference-time tweaks, for the concept phrases named in the edit (``edit.concepts``, e.g.
``["<a> dog", "cat"]``; custom tokens work once their token edit is applied):

* **Correction by Similarities** (text embeddings only): for every token ``c`` of a concept phrase,
  the conditioning rows ``f_j`` of the other tokens in the window ``|j - c| <= gamma`` (after BOS, up
  to EOS, tokens of other concepts excluded) are weighted per feature by ``S_j = f_c * f_j``,
  thresholded (``S_j < tau -> 0``) and normalized over ``j``; then
  ``f_c <- (1 - alpha) f_c + alpha sum_j S_j * f_j``. Features where no ``S_j`` passes keep ``f_c``.
* **Cross-Token Non-Maximum Suppression** (cross-attention): each concept's attention map (sum over
  its tokens, mean over heads) is Gaussian-smoothed (``sigma`` map pixels); at every pixel only the
  concept with the largest smoothed value keeps its attention, the other concepts' attention
  probabilities there are multiplied by ``suppression`` (0 removes them; no renormalization).

Only prompts that name at least ``min_concepts`` (default 2) of the concepts are changed, so
single-concept prompts generate exactly as without the edit.

Installation (``edit.apply(pipe)``): ``pipe.encode_prompt`` is wrapped (to learn, per prompt, where
the concept tokens are and to correct the embeddings) and every cross-attention layer gets an
attention processor that applies the suppression to the conditional rows of the batch (rows of
prompts without two concepts, and unconditional rows, go through the original processor). ``revert``
restores both. Prompts passed as ``prompt_embeds`` are not touched (no token positions known).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from conceptsmith.attention import find_cross_attention, spatial_shape
from conceptsmith.customization import CustomizationError
from conceptsmith.edits import Edit, base_fingerprint
from conceptsmith.models import detect_family
from conceptsmith.registry import (
    UNET_FAMILIES,
    Editor,
    EditorConfig,
    EditRequest,
    register_editor,
    register_hook,
)
from conceptsmith.text import tokenize
from conceptsmith.token_positions import phrase_positions

# -- shared machinery (also used by A-STAR) -------------------------------------------------------------


class PromptTracker:
    """Wraps ``pipe.encode_prompt`` to know, for every row of the UNet batch, where each concept's tokens are.

    ``positions(batch)``: per UNet batch row, a list (one entry per concept) of token positions, or
    ``None`` for rows without known concepts (unconditional rows of classifier-free guidance: the
    pipelines concatenate ``[negative, positive]``). ``transform(embeds, rows)`` may rewrite the
    positive prompt embeddings (``rows``: concept positions per embedding row, ``lengths``: real
    tokens of each row's prompt, BOS and EOS included).
    """

    def __init__(
        self,
        pipe: Any,
        phrases: Sequence[str],
        transform: Callable[[torch.Tensor, list[list[list[int]]], list[int]], torch.Tensor] | None = None,
        on_encode: Callable[[], None] | None = None,
    ) -> None:
        self.pipe = pipe
        self.phrases = list(phrases)
        self.transform = transform
        self.on_encode = on_encode
        self.rows: list[list[list[int]]] = []
        self.lengths: list[int] = []
        self._had_attr = "encode_prompt" in vars(pipe)
        self._previous = pipe.encode_prompt
        tracker = self

        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            return tracker._encode(*args, **kwargs)

        pipe.encode_prompt = encode_prompt

    def remove(self) -> None:
        if self._had_attr:
            self.pipe.encode_prompt = self._previous
        elif "encode_prompt" in vars(self.pipe):
            del self.pipe.encode_prompt

    def _expand(self, text: str) -> str:
        convert = getattr(self.pipe, "maybe_convert_prompt", None)
        return convert(text, self.pipe.tokenizer) if callable(convert) else text

    def concept_positions(self, prompt: str) -> list[list[int]]:
        """Positions (BOS = 0) of each concept phrase's tokens in ``prompt`` ([] when absent)."""
        found = []
        for phrase in self.phrases:
            try:
                found.append(phrase_positions(self.pipe.tokenizer, self._expand(prompt), self._expand(phrase)))
            except ValueError:
                found.append([])
        return found

    def _encode(self, *args: Any, **kwargs: Any) -> Any:
        out = self._previous(*args, **kwargs)
        prompt = kwargs.get("prompt", args[0] if args else None)
        self.rows, self.lengths = [], []
        if self.on_encode is not None:
            self.on_encode()
        if prompt is None:
            return out
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds = out[0]
        if not prompts or embeds.shape[0] % len(prompts):
            return out
        per_prompt = embeds.shape[0] // len(prompts)
        positions = [self.concept_positions(p) for p in prompts]
        lengths = tokenize(self.pipe.tokenizer, [self._expand(p) for p in prompts], warn=False).lengths
        self.rows = [positions[i // per_prompt] for i in range(embeds.shape[0])]
        self.lengths = [lengths[i // per_prompt] for i in range(embeds.shape[0])]
        if self.transform is not None:
            out = (self.transform(embeds, self.rows, self.lengths), *out[1:])
        return out

    def positions(self, batch: int) -> list[list[list[int]] | None]:
        n = len(self.rows)
        if n == 0:
            return [None] * batch
        if batch == 2 * n:
            return [None] * n + list(self.rows)
        if batch == n:
            return list(self.rows)
        return [None] * batch


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``[n, h, w]`` maps (reflect padding); ``sigma <= 0`` returns them unchanged."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(2 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    out = maps[:, None]
    h, w = maps.shape[-2:]
    pad_h, pad_w = min(radius, h - 1), min(radius, w - 1)  # reflect padding needs pad < size
    if pad_w > 0:
        k = kernel[radius - pad_w : radius + pad_w + 1]
        out = F.conv2d(F.pad(out, (pad_w, pad_w, 0, 0), mode="reflect"), (k / k.sum()).view(1, 1, 1, -1))
    if pad_h > 0:
        k = kernel[radius - pad_h : radius + pad_h + 1]
        out = F.conv2d(F.pad(out, (0, 0, pad_h, pad_h), mode="reflect"), (k / k.sum()).view(1, 1, -1, 1))
    return out[:, 0]


def check_phrases(pipe: Any, phrases: Sequence[str], method: str) -> list[str]:
    phrases = [p for p in phrases if isinstance(p, str)]
    if not phrases:
        raise CustomizationError(f"{method} composes concepts named in prompts: give the concept phrases (e.g. '<a> dog', 'cat').")
    tokenizer = pipe.tokenizer
    empty = [p for p in phrases if not tokenizer(p, add_special_tokens=False)["input_ids"]]
    if empty:
        raise CustomizationError(f"Concept phrase(s) {empty} have no tokens.")
    return phrases


# -- Correction by Similarities ------------------------------------------------------------------------


def correct_by_similarities(
    embeds: torch.Tensor, rows: list[list[list[int]]], lengths: list[int], *, alpha: float, tau: float, gamma: int, min_concepts: int = 1
) -> torch.Tensor:
    """Apply the correction to ``embeds`` ``[B, L, d]``; ``rows[b]``: concept positions; ``lengths[b]``: real tokens
    incl. EOS. Rows naming fewer than ``min_concepts`` of the concepts are left as they are."""
    out = embeds.clone()
    for b, concepts in enumerate(rows):
        if sum(1 for positions in concepts if positions) < min_concepts:
            continue
        taken = {p for positions in concepts for p in positions}
        for positions in concepts:
            for c in positions:
                window = [
                    j for j in range(max(1, c - gamma), min(lengths[b], c + gamma + 1))
                    if j != c and (j in positions or j not in taken)
                ]
                if not window:
                    continue
                f_c = embeds[b, c].float()
                f_j = embeds[b, window].float()
                s = f_c[None] * f_j
                s = torch.where(s >= tau, s, torch.zeros_like(s)).clamp(min=0)
                total = s.sum(0)
                weighted = (s * f_j).sum(0) / total.clamp(min=1e-12)
                correction = torch.where(total > 0, weighted, f_c)
                out[b, c] = ((1 - alpha) * f_c + alpha * correction).to(embeds.dtype)
    return out


# -- Cross-Token Non-Maximum Suppression ---------------------------------------------------------------


class _State:
    def __init__(self, tracker: PromptTracker | None = None) -> None:
        self.tracker = tracker
        self.latent_hw: tuple[int, int] | None = None


class NMSProcessor:
    """Cross-attention processor that suppresses, per pixel, every concept but the strongest one."""

    def __init__(self, original: Any, state: _State, sigma: float, suppression: float, min_concepts: int = 2) -> None:
        self.original = original
        self.state = state
        self.sigma = sigma
        self.suppression = suppression
        self.min_concepts = min_concepts

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = None
        if encoder_hidden_states is not None and self.state.tracker is not None:
            rows = self.state.tracker.positions(encoder_hidden_states.shape[0])
            if not any(r is not None and sum(1 for p in r if p) >= max(2, self.min_concepts) for r in rows):
                rows = None
        if rows is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return attention_with(attn, hidden_states, encoder_hidden_states, attention_mask, temb, lambda p: self._suppress(p, rows))

    def _suppress(self, probs: torch.Tensor, rows: list[list[list[int]] | None]) -> torch.Tensor:
        batch = len(rows)
        heads = probs.shape[0] // batch
        probs = probs.view(batch, heads, probs.shape[1], probs.shape[2]).clone()
        h, w = spatial_shape(probs.shape[2], self.state.latent_hw)
        for b, concepts in enumerate(rows):
            if concepts is None:
                continue
            present = [(k, positions) for k, positions in enumerate(concepts) if positions]
            if len(present) < max(2, self.min_concepts):
                continue
            maps = torch.stack([probs[b][..., positions].sum(-1).mean(0) for _, positions in present]).float()
            smoothed = gaussian_smooth(maps.view(len(present), h, w), self.sigma).reshape(len(present), -1)
            winner = smoothed.argmax(0)
            for index, (_, positions) in enumerate(present):
                losing = (winner != index).to(probs.dtype)
                factor = 1 - (1 - self.suppression) * losing  # [queries]
                probs[b][..., positions] = probs[b][..., positions] * factor[None, :, None]
        return probs.view(batch * heads, probs.shape[2], probs.shape[3])


def attention_with(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
    modify: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """diffusers' classic attention computation with ``modify`` applied to the probabilities ``[B*heads, q, k]``."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = encoder_hidden_states.shape
    attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    query = attn.head_to_batch_dim(query)
    key = attn.head_to_batch_dim(key)
    value = attn.head_to_batch_dim(value)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    probs = modify(attn.get_attention_scores(query, key, attention_mask))
    hidden_states = torch.bmm(probs.to(value.dtype), value)
    hidden_states = attn.batch_to_head_dim(hidden_states)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


# -- the hook and the editor ---------------------------------------------------------------------------


class T2IZeroConfig(EditorConfig):
    """Defaults mirror ``configs/customize/t2i-zero.yaml``."""

    correction: bool = Field(True, description="Correction by Similarities on the concept embeddings")
    alpha: float = Field(0.3, ge=0, le=1, description="correction strength")
    tau: float = Field(0.0, description="threshold of the element-wise similarities")
    gamma: int = Field(3, ge=1, description="window (tokens) around each concept token")
    nms: bool = Field(True, description="Cross-Token Non-Maximum Suppression in cross-attention")
    sigma: float = Field(1.0, ge=0, description="Gaussian smoothing of the maps, in map pixels")
    suppression: float = Field(0.0, ge=0, le=1, description="factor on the attention of non-maximal concepts")
    min_concepts: int = Field(2, ge=1, description="only prompts naming at least this many of the concepts are changed")


class _Handle:
    def __init__(self, remove: Callable[[], None]) -> None:
        self._remove = remove

    def remove(self) -> None:
        self._remove()


def _install_processors(pipe: Any, make: Callable[[Any], Any]) -> Callable[[], None]:
    layers = find_cross_attention(pipe.unet)
    originals = [(layer.module, layer.module.processor) for layer in layers]
    for module, original in originals:
        module.set_processor(make(original))

    def restore() -> None:
        for module, original in originals:
            module.set_processor(original)

    return restore


def _latent_size_hook(pipe: Any, state: _State) -> Any:
    def record(module: Any, args: Any, kwargs: Any) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            state.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    return pipe.unet.register_forward_pre_hook(record, with_kwargs=True)


@register_hook("t2i-zero", "Multi-Concept T2I-Zero: correction by similarities + cross-token non-maximum suppression")
def install_t2i_zero(edit: Edit, pipe: Any) -> _Handle:
    config = T2IZeroConfig.model_validate({k: v for k, v in edit.params.items() if k in T2IZeroConfig.model_fields})

    def transform(embeds: torch.Tensor, rows: list[list[list[int]]], lengths: list[int]) -> torch.Tensor:
        return correct_by_similarities(
            embeds, rows, lengths, alpha=config.alpha, tau=config.tau, gamma=config.gamma, min_concepts=config.min_concepts
        )

    tracker = PromptTracker(pipe, edit.concepts, transform if config.correction and config.alpha > 0 else None)
    state = _State(tracker)
    restore = _install_processors(pipe, lambda original: NMSProcessor(original, state, config.sigma, config.suppression, config.min_concepts)) if config.nms else None
    size_hook = _latent_size_hook(pipe, state)

    def remove() -> None:
        size_hook.remove()
        if restore is not None:
            restore()
        tracker.remove()

    return _Handle(remove)


@register_editor("t2i-zero", description="Multi-Concept T2I-Zero: training-free composition by embedding correction + attention NMS")
class T2IZero(Editor):
    Config = T2IZeroConfig
    supports = UNET_FAMILIES

    def fit(self, pipe: Any, request: EditRequest) -> Edit:
        phrases = check_phrases(pipe, request.concepts, "T2I-Zero")
        return Edit.from_hook("t2i-zero", phrases, self.config.model_dump(), base_fingerprint(pipe), detect_family(pipe), "t2i-zero", {})
