"""Prompts -> CLIP tokens -> the text embeddings a pipeline's denoiser is conditioned on.

* :func:`encode_prompts` reproduces each family's conditioning exactly: SD 1.x / 2.x use the text
  encoder's ``last_hidden_state`` (final layer norm included), SDXL concatenates the penultimate
  hidden states of its two encoders along the feature axis (768 + 1280 = 2048).
* CLIP's text transformer is causal: the state of token ``t`` depends only on tokens ``<= t``.
  Encoding only the first ``k`` columns of the padded 77-token ids therefore gives exactly the
  first ``k`` rows of the full encoding, at a fraction of the cost (``max_length=k``). The ids are
  always produced by padding to 77 first, so SD 1.x (padded with EOS) and SD 2.x / SDXL's second
  tokenizer (padded with ``!``) are both handled.
* MMDiT pipelines (SD3, FLUX) are encoded by their own ``encode_prompt``
  (:func:`conceptsmith.text_segments.encode_mmdit`); a
  :class:`~conceptsmith.text_segments.TextSegment` (one run of their joint token sequence) is accepted
  wherever a pipeline is, as a one-encoder pipeline whose conditioning is that run.
* A concept phrase's token positions, the rows a closed-form editor edits and soft prompts live in
  :mod:`conceptsmith.token_positions`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from conceptsmith.devices import module_device
from conceptsmith.mmdit import is_mmdit
from conceptsmith.prompts import check_prompts
from conceptsmith.text_segments import TextSegment, encode_mmdit

__all__ = [
    "TokenizedPrompts",
    "context_length",
    "convert_prompts",
    "convert_texts",
    "encode_prompt_list",
    "encode_prompts",
    "first_tokenizer",
    "short_prompt",
    "text_encoders",
    "tokenize",
]

_DEFAULT_CONTEXT = 77


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedPrompts:
    """Prompts tokenized as the pipelines do (padded to the context length, truncated).

    ``input_ids``: ``[n, context]``; ``lengths[i]``: real tokens of prompt ``i`` (BOS and EOS
    included, so the EOS sits at ``lengths[i] - 1``); ``cut[i]``: the text that did not fit, or
    ``None``.
    """

    prompts: tuple[str, ...]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: tuple[int, ...]
    cut: tuple[str | None, ...]

    @property
    def eos_positions(self) -> list[int]:
        return [n - 1 for n in self.lengths]


def text_encoders(pipe: object) -> list[tuple[object, torch.nn.Module]]:
    """The (tokenizer, text encoder) pairs that condition ``pipe``'s UNet, in concatenation order."""
    pairs = []
    for suffix in ("", "_2"):
        tokenizer = getattr(pipe, f"tokenizer{suffix}", None)
        encoder = getattr(pipe, f"text_encoder{suffix}", None)
        if tokenizer is not None and encoder is not None:
            pairs.append((tokenizer, encoder))
    if not pairs:
        raise ValueError(f"{type(pipe).__name__} has no tokenizer/text_encoder pair to encode prompts with.")
    return pairs


def _is_dual(pipe: object) -> bool:
    """SDXL-style conditioning: penultimate states of (up to) two encoders, concatenated."""
    return getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe, "tokenizer_2", None) is not None


def _is_tokenizer(obj: object) -> bool:
    return callable(obj) and hasattr(obj, "convert_ids_to_tokens")


def first_tokenizer(pipe_or_tokenizer: object) -> object:
    """The tokenizer itself, or a pipeline's (or a :class:`~conceptsmith.text_segments.TextSegment`'s) first
    tokenizer; an MMDiT pipeline is refused (its token positions are per run)."""
    if _is_tokenizer(pipe_or_tokenizer):
        return pipe_or_tokenizer
    if is_mmdit(pipe_or_tokenizer):  # token positions are per run: CLIP's and T5's differ
        raise ValueError(
            f"{type(pipe_or_tokenizer).__name__} tokenizes a prompt once per run of its joint text sequence; "
            "pass one of conceptsmith.text_segments.text_segments(pipe) instead of the pipeline."
        )
    return text_encoders(pipe_or_tokenizer)[0][0]


def convert_texts(pipe_or_tokenizer: object, texts: list[str | None], tokenizer: object) -> list[str | None]:
    """Given a pipeline, expand textual-inversion tokens as its ``encode_prompt`` does (``None`` entries kept)."""
    if _is_tokenizer(pipe_or_tokenizer):
        return texts
    return [None if t is None else convert_prompts(pipe_or_tokenizer, [t], tokenizer)[0] for t in texts]


def context_length(tokenizer: object, encoder: torch.nn.Module | None = None) -> int:
    """Padded sequence length the pipelines use (``tokenizer.model_max_length``, 77 for CLIP)."""
    length = getattr(tokenizer, "model_max_length", None)
    if length is None or length > 100_000:  # "unset" sentinel of transformers
        config = getattr(encoder, "config", None)
        length = getattr(config, "max_position_embeddings", None) or _DEFAULT_CONTEXT
    return int(length)


def tokenize(pipe_or_tokenizer: object, prompts: Sequence[str], *, warn: bool = True) -> TokenizedPrompts:
    """Tokenize ``prompts`` exactly as the diffusers pipelines do (pad to 77, truncate).

    Accepts a pipeline (its first tokenizer is used; textual-inversion tokens are expanded as the
    pipeline does) or a tokenizer. With ``warn``, every prompt longer than the limit triggers a
    ``UserWarning`` naming the words that were cut.
    """
    tokenizer = first_tokenizer(pipe_or_tokenizer)
    prompts = convert_texts(pipe_or_tokenizer, check_prompts(prompts), tokenizer)
    length = context_length(tokenizer)
    padded = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    full = tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
    cut: list[str | None] = []
    for prompt, ids in zip(prompts, full, strict=True):
        if len(ids) <= length:
            cut.append(None)
            continue
        text = _cut_text(tokenizer, prompt, ids, length)
        cut.append(text)
        if warn:
            warnings.warn(
                f"Prompt {short_prompt(prompt)} is {len(ids)} tokens long, over the tokenizer limit of {length} "
                f"(BOS and EOS included); these words were cut and are not seen by the model: {text!r}",
                UserWarning,
                stacklevel=3,
            )
    mask = padded["attention_mask"]
    return TokenizedPrompts(
        prompts=tuple(prompts),
        input_ids=padded["input_ids"],
        attention_mask=mask,
        lengths=tuple(int(n) for n in mask.sum(dim=1)),
        cut=tuple(cut),
    )


def _cut_text(tokenizer: object, prompt: str, ids: list[int], length: int) -> str:
    """The part of ``prompt`` beyond the limit (original spelling when offsets are available)."""
    try:
        offsets = tokenizer(prompt, truncation=False, verbose=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        start = offsets[length - 1][0]
        return prompt[start:].strip()
    except (NotImplementedError, KeyError, IndexError, TypeError, ValueError):
        return tokenizer.decode(ids[length - 1 : -1]).strip()


def short_prompt(prompt: str, limit: int = 60) -> str:
    """``prompt`` quoted for an error message, cut to ``limit`` characters."""
    return repr(prompt if len(prompt) <= limit else prompt[: limit - 3] + "...")


def convert_prompts(pipe: object, prompts: list[str], tokenizer: object) -> list[str]:
    """Textual-inversion multi-vector expansion, as the pipelines apply it before tokenizing."""
    convert = getattr(pipe, "maybe_convert_prompt", None)
    return list(convert(prompts, tokenizer)) if callable(convert) else prompts


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _resolve_length(max_length: int | str | None, tokenized: TokenizedPrompts | None, context: int) -> int:
    if max_length is None:
        return context
    if max_length == "longest":
        return max(tokenized.lengths)
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError(f"max_length must be an int, 'longest' or None, got {max_length!r}.")
    if not 1 <= max_length <= context:
        raise ValueError(f"max_length must be between 1 and the context length {context}, got {max_length}.")
    return max_length


def encode_prompt_list(
    pipe: object,
    prompts: list[str],
    *,
    max_length: int | str | None,
    clip_skip: int | None,
    batch_size: int,
    convert: bool,
    warn: bool = True,
) -> torch.Tensor:
    """:func:`encode_prompts` of a checked prompt list; ``convert=False`` for prompts whose textual-inversion
    tokens are already expanded (:func:`convert_prompts`), ``warn=False`` to keep quiet about cut prompts."""
    if isinstance(pipe, TextSegment):
        tokenized = tokenize(pipe.tokenizer, prompts, warn=warn)
        length = _resolve_length(max_length, tokenized, pipe.length)
        states = encode_mmdit(pipe.pipe, prompts, clip_skip=clip_skip, batch_size=batch_size)[0]
        return states[:, pipe.offset : pipe.offset + length]
    if is_mmdit(pipe):
        if max_length == "longest":
            raise ValueError("max_length='longest' needs one tokenizer; for an MMDiT pipeline encode a TextSegment.")
        states = encode_mmdit(pipe, prompts, clip_skip=clip_skip, batch_size=batch_size)[0]
        return states if max_length is None else states[:, : _resolve_length(max_length, None, states.shape[1])]
    dual = _is_dual(pipe)
    outputs = []
    length = None
    for index, (tokenizer, encoder) in enumerate(text_encoders(pipe)):
        texts = convert_prompts(pipe, prompts, tokenizer) if convert else prompts
        tokenized = tokenize(tokenizer, texts, warn=warn and index == 0)
        context = context_length(tokenizer, encoder)
        if length is None:
            length = _resolve_length(max_length, tokenized, context)
        ids = tokenized.input_ids[:, :length]
        use_mask = bool(getattr(getattr(encoder, "config", None), "use_attention_mask", False)) and not dual
        mask = tokenized.attention_mask[:, :length] if use_mask else None
        device = module_device(encoder)
        chunks = []
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                chunk_ids = ids[start : start + batch_size].to(device)
                chunk_mask = None if mask is None else mask[start : start + batch_size].to(device)
                chunks.append(_run_encoder(encoder, chunk_ids, chunk_mask, dual=dual, clip_skip=clip_skip))
        outputs.append(torch.cat(chunks, dim=0))
    states = (
        outputs[0] if len(outputs) == 1 else torch.cat([o.to(outputs[0].device) for o in outputs], dim=-1)
    )
    return states.float()


def _run_encoder(
    encoder: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    dual: bool,
    clip_skip: int | None,
) -> torch.Tensor:
    if dual:  # SDXL: penultimate layer (clip_skip counts further back), no final layer norm
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-((clip_skip or 0) + 2)]
    if clip_skip is None:  # SD 1.x / 2.x: last_hidden_state (final layer norm applied)
        return encoder(ids, attention_mask=mask)[0]
    out = encoder(ids, attention_mask=mask, output_hidden_states=True)
    # transformers 5 flattened CLIPTextModel (no .text_model); older versions nest it
    final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
    return final_norm(out.hidden_states[-(clip_skip + 1)])


def encode_prompts(
    pipe: object,
    prompts: Sequence[str],
    *,
    max_length: int | Literal["longest"] | None = None,
    clip_skip: int | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Text embeddings ``[n, L, d]`` (float32, on the text encoder's device) exactly as ``pipe``
    conditions its UNet on ``prompts`` (what ``pipe.encode_prompt`` returns as ``prompt_embeds``);
    for an MMDiT pipeline the transformer's joint token sequence
    (:func:`~conceptsmith.text_segments.encode_mmdit`), for a :class:`~conceptsmith.text_segments.TextSegment`
    its run of rows.

    ``max_length=None`` gives the full padded context (``L = 77``); an int ``k`` encodes only the
    first ``k`` positions of the padded ids (exact, since CLIP's text transformer is causal; only
    float rounding differs, ~1e-6, because the matmul shapes change);
    ``"longest"`` stops at the longest prompt's EOS. ``clip_skip`` follows diffusers' meaning.
    Prompts are encoded in batches of ``batch_size``.
    """
    prompts = check_prompts(prompts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return encode_prompt_list(
        pipe, prompts, max_length=max_length, clip_skip=clip_skip, batch_size=batch_size, convert=True
    )
