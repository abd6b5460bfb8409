"""Prompts -> CLIP tokens -> the text embeddings a UNet is conditioned on.

* :func:`encode_prompts` reproduces each family's conditioning exactly: SD 1.x / 2.x use the text
  encoder's ``last_hidden_state`` (final layer norm included), SDXL concatenates the penultimate
  hidden states of its two encoders along the feature axis (768 + 1280 = 2048).
* CLIP's text transformer is causal: the state of token ``t`` depends only on tokens ``<= t``.
  Encoding only the first ``k`` columns of the padded 77-token ids therefore gives exactly the
  first ``k`` rows of the full encoding, at a fraction of the cost (``max_length=k``). The ids are
  always produced by padding to 77 first, so SD 1.x (padded with EOS) and SD 2.x / SDXL's second
  tokenizer (padded with ``!``) are both handled.
* MMDiT pipelines (SD3, FLUX) are encoded by their own ``encode_prompt`` (:func:`encode_mmdit`): the
  transformer reads one joint token sequence (SD3: 77 CLIP rows, the two CLIP encoders' penultimate
  states concatenated and zero-padded to T5's width, then T5 rows; FLUX: T5 rows) and a pooled CLIP
  vector. T5 is not causal, so these are always encoded at the pipeline's full sequence length. A
  :class:`TextSegment` (:func:`text_segments`) is the run of rows one tokenizer produced; passed where a
  pipeline is expected, every function below treats it as a one-encoder pipeline whose conditioning is
  that run (positions count from the segment's start).
* :func:`phrase_positions` finds a concept phrase's tokens inside a prompt, and
  :func:`concept_token_embeddings` picks the rows a closed-form editor edits under a token policy:

  ``last_word``   the last token of the phrase (UCE's current official script)
  ``phrase``      every token of the phrase
  ``phrase+eos``  the phrase tokens and the EOS token
  ``all``         every position up to the context length (77), BOS, EOS and padding included
                  (UCE's original script)
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from conceptsmith.mmdit import is_mmdit, mmdit_family

__all__ = [
    "TOKEN_POLICIES",
    "TextSegment",
    "TokenPolicy",
    "TokenizedPrompts",
    "concept_token_embeddings",
    "concept_token_positions",
    "context_length",
    "encode_mmdit",
    "encode_prompts",
    "encode_with_embeddings",
    "phrase_positions",
    "prefix_slot_ids",
    "text_encoders",
    "text_segments",
    "tokenize",
]

TokenPolicy = Literal["last_word", "phrase", "phrase+eos", "all"]
TOKEN_POLICIES: tuple[str, ...] = get_args(TokenPolicy)

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


def _first_tokenizer(pipe_or_tokenizer: object) -> object:
    if _is_tokenizer(pipe_or_tokenizer):
        return pipe_or_tokenizer
    if is_mmdit(pipe_or_tokenizer):  # token positions are per run: CLIP's and T5's differ
        raise ValueError(
            f"{type(pipe_or_tokenizer).__name__} tokenizes a prompt once per run of its joint text sequence; "
            "pass one of conceptsmith.text.text_segments(pipe) instead of the pipeline."
        )
    return text_encoders(pipe_or_tokenizer)[0][0]


def _texts(pipe_or_tokenizer: object, texts: list[str | None], tokenizer: object) -> list[str | None]:
    """Given a pipeline, expand textual-inversion tokens as its ``encode_prompt`` does."""
    if _is_tokenizer(pipe_or_tokenizer):
        return texts
    return [None if t is None else _convert(pipe_or_tokenizer, [t], tokenizer)[0] for t in texts]


def context_length(tokenizer: object, encoder: torch.nn.Module | None = None) -> int:
    """Padded sequence length the pipelines use (``tokenizer.model_max_length``, 77 for CLIP)."""
    length = getattr(tokenizer, "model_max_length", None)
    if length is None or length > 100_000:  # "unset" sentinel of transformers
        config = getattr(encoder, "config", None)
        length = getattr(config, "max_position_embeddings", None) or _DEFAULT_CONTEXT
    return int(length)


def _check_prompts(prompts: Sequence[str], what: str = "prompts") -> list[str]:
    if isinstance(prompts, str):
        raise TypeError(f"{what} must be a list of strings, not a single string: wrap it as [{prompts!r}].")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"Empty {what} list: pass at least one prompt.")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{what} must be strings; got {bad[:3]!r}.")
    return prompts


def tokenize(pipe_or_tokenizer: object, prompts: Sequence[str], *, warn: bool = True) -> TokenizedPrompts:
    """Tokenize ``prompts`` exactly as the diffusers pipelines do (pad to 77, truncate).

    Accepts a pipeline (its first tokenizer is used; textual-inversion tokens are expanded as the
    pipeline does) or a tokenizer. With ``warn``, every prompt longer than the limit triggers a
    ``UserWarning`` naming the words that were cut.
    """
    tokenizer = _first_tokenizer(pipe_or_tokenizer)
    prompts = _texts(pipe_or_tokenizer, _check_prompts(prompts), tokenizer)
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
                f"Prompt {_short(prompt)} is {len(ids)} tokens long, over the tokenizer limit of {length} "
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


def _short(prompt: str, limit: int = 60) -> str:
    return repr(prompt if len(prompt) <= limit else prompt[: limit - 3] + "...")


def _convert(pipe: object, prompts: list[str], tokenizer: object) -> list[str]:
    """Textual-inversion multi-vector expansion, as the pipelines apply it before tokenizing."""
    convert = getattr(pipe, "maybe_convert_prompt", None)
    return list(convert(prompts, tokenizer)) if callable(convert) else prompts


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _device(module: torch.nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


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


def _encode(
    pipe: object,
    prompts: list[str],
    *,
    max_length: int | str | None,
    clip_skip: int | None,
    batch_size: int,
    convert: bool,
    warn: bool = True,
) -> torch.Tensor:
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
        texts = _convert(pipe, prompts, tokenizer) if convert else prompts
        tokenized = tokenize(tokenizer, texts, warn=warn and index == 0)
        context = context_length(tokenizer, encoder)
        if length is None:
            length = _resolve_length(max_length, tokenized, context)
        ids = tokenized.input_ids[:, :length]
        use_mask = bool(getattr(getattr(encoder, "config", None), "use_attention_mask", False)) and not dual
        mask = tokenized.attention_mask[:, :length] if use_mask else None
        device = _device(encoder)
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
    for an MMDiT pipeline the transformer's joint token sequence (:func:`encode_mmdit`), for a
    :class:`TextSegment` its run of rows.

    ``max_length=None`` gives the full padded context (``L = 77``); an int ``k`` encodes only the
    first ``k`` positions of the padded ids (exact, since CLIP's text transformer is causal; only
    float rounding differs, ~1e-6, because the matmul shapes change);
    ``"longest"`` stops at the longest prompt's EOS. ``clip_skip`` follows diffusers' meaning.
    Prompts are encoded in batches of ``batch_size``.
    """
    prompts = _check_prompts(prompts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return _encode(
        pipe, prompts, max_length=max_length, clip_skip=clip_skip, batch_size=batch_size, convert=True
    )


# --------------------------------------------------------------------------------------------
# MMDiT pipelines (SD3, FLUX): the joint token sequence and the pooled vector
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSegment:
    """Rows ``offset : offset + length`` of an MMDiT pipeline's ``prompt_embeds``: the tokens of one tokenizer.

    ``tokenizer`` pads and truncates to ``length``, as the pipeline does; ``text_encoder`` is the encoder
    that produces the rows (for SD3's CLIP run, the first of the two CLIP encoders).
    """

    pipe: object
    name: str
    tokenizer: object
    text_encoder: torch.nn.Module
    offset: int
    length: int


def sequence_length(pipe: object) -> int:
    """T5 tokens ``pipe.encode_prompt`` encodes by default (SD3: 256, FLUX: 512): the length edits are computed at."""
    return int(inspect.signature(pipe.encode_prompt).parameters["max_sequence_length"].default)


def _segment(pipe: object, name: str, tokenizer: object, encoder: torch.nn.Module, offset: int, length: int) -> TextSegment:
    tokenizer = copy.copy(tokenizer)  # the pipeline's tokenizer, padded to this run's length
    tokenizer.model_max_length = length
    return TextSegment(pipe, name, tokenizer, encoder, offset, length)


def text_segments(pipe: object) -> list[TextSegment]:
    """The runs of an MMDiT pipeline's joint token sequence, in order.

    SD3: ``clip`` (77 rows) then ``t5`` (absent when the pipeline has no T5 encoder: its rows are zeros);
    FLUX: ``t5``.
    """
    if not is_mmdit(pipe):
        raise ValueError(f"{type(pipe).__name__} is not an MMDiT pipeline: its text conditioning is one CLIP token run.")
    length = sequence_length(pipe)
    if mmdit_family(pipe.transformer) == "flux":
        return [_segment(pipe, "t5", pipe.tokenizer_2, pipe.text_encoder_2, 0, length)]
    clip = context_length(pipe.tokenizer, pipe.text_encoder)
    segments = [_segment(pipe, "clip", pipe.tokenizer, pipe.text_encoder, 0, clip)]
    if getattr(pipe, "text_encoder_3", None) is not None:
        segments.append(_segment(pipe, "t5", pipe.tokenizer_3, pipe.text_encoder_3, clip, length))
    return segments


def encode_mmdit(
    pipe: object, prompts: Sequence[str], *, clip_skip: int | None = None, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds [n, L, d], pooled [n, p])`` (float32) of an MMDiT pipeline, from its own
    ``encode_prompt`` at its default sequence length, without classifier-free guidance's negatives.

    SD3: ``L = 77 + 256``, ``d = 4096``, ``p = 2048``; FLUX: ``L = 512``, ``d = 4096``, ``p = 768``.
    ``clip_skip`` (SD3 only) follows diffusers' meaning.
    """
    prompts = _check_prompts(prompts)
    family = mmdit_family(pipe.transformer)
    options: dict[str, object] = {"max_sequence_length": sequence_length(pipe)}
    if clip_skip is not None:
        if family != "sd3":
            raise ValueError(f"clip_skip is not an option of {type(pipe).__name__}.encode_prompt; drop it.")
        options["clip_skip"] = clip_skip
    states, pooled = [], []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            if family == "sd3":
                embeds, _, vector, _ = pipe.encode_prompt(chunk, None, None, do_classifier_free_guidance=False, **options)
            else:
                embeds, vector, _ = pipe.encode_prompt(chunk, None, **options)
            states.append(embeds.float())
            pooled.append(vector.float())
    return torch.cat(states), torch.cat(pooled)


# --------------------------------------------------------------------------------------------
# Concept phrases and token policies
# --------------------------------------------------------------------------------------------


def _phrase_ids(tokenizer: object, phrase: str) -> list[int]:
    if not isinstance(phrase, str):
        raise TypeError(f"Concept phrase must be a string, got {phrase!r}.")
    ids = list(tokenizer(phrase, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])
    if not phrase.strip() or not ids:
        raise ValueError(
            f"Concept phrase {phrase!r} is empty (it has no tokens). Name the concept with the words it has in "
            "the prompt, e.g. phrase 'van gogh' in prompt 'a painting by van gogh'. An empty guide or anchor "
            "(UCE's '' guide) has no concept tokens: use policy='all' or encode_prompts(pipe, [''])."
        )
    return ids


def _occurrences(tokenizer: object, prompt: str, phrase: str) -> list[list[int]]:
    """Token positions of each non-overlapping occurrence of ``phrase`` in ``prompt`` (BOS = 0)."""
    needle = _phrase_ids(tokenizer, phrase)
    tokenized = tokenize(tokenizer, [prompt], warn=False)
    ids = tokenized.input_ids[0, : tokenized.lengths[0]].tolist()
    found, start = [], 0
    while start + len(needle) <= len(ids):
        if ids[start : start + len(needle)] == needle:
            found.append(list(range(start, start + len(needle))))
            start += len(needle)
        else:
            start += 1
    if found:
        return found
    words = " ".join(tokenizer.convert_ids_to_tokens(needle))
    if tokenized.cut[0] is not None:
        full = list(tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
        if any(full[i : i + len(needle)] == needle for i in range(len(full))):
            raise ValueError(
                f"Concept phrase {phrase!r} occurs in prompt {_short(prompt)} only after the "
                f"{context_length(tokenizer)}-token limit, in the part that is cut ({tokenized.cut[0]!r}). "
                "Shorten the prompt or move the concept towards its start."
            )
    raise ValueError(
        f"Concept phrase {phrase!r} does not occur in prompt {_short(prompt)} (compared as whole CLIP tokens "
        f"[{words}], case-insensitive). Use the concept's exact words as they appear in the prompt."
    )


def phrase_positions(tokenizer: object, prompt: str, phrase: str) -> list[int]:
    """Positions of ``phrase``'s tokens in the tokenized ``prompt`` (position 0 is BOS).

    Whole tokens only, case-insensitive (CLIP lowercases); multi-token words give several
    positions; a repeated phrase gives the positions of every occurrence, in order. A ``ValueError``
    naming phrase and prompt is raised when the phrase is absent, empty or cut by the limit.
    ``tokenizer`` may also be a pipeline (its first tokenizer, textual-inversion tokens expanded).
    """
    source, tokenizer = tokenizer, _first_tokenizer(tokenizer)
    prompt, phrase = _texts(source, [prompt, phrase], tokenizer)
    return [p for occurrence in _occurrences(tokenizer, prompt, phrase) for p in occurrence]


def _as_phrases(prompts: list[str], phrases: Sequence[str] | str | None, policy: str) -> list[str | None]:
    if policy not in TOKEN_POLICIES:
        raise ValueError(f"Unknown token policy {policy!r}; choose one of {', '.join(TOKEN_POLICIES)}.")
    if phrases is None:
        if policy != "all":
            raise ValueError(
                f"Token policy {policy!r} needs the concept phrase of each prompt (phrases=...)."
            )
        return [None] * len(prompts)
    if isinstance(phrases, str):
        return [phrases] * len(prompts)
    phrases = list(phrases)
    if len(phrases) != len(prompts):
        raise ValueError(
            f"Got {len(prompts)} prompts but {len(phrases)} phrases: pass one phrase per prompt (or a single string)."
        )
    return phrases


def _positions(
    tokenizer: object, tokenized: TokenizedPrompts, phrases: list[str | None], policy: str
) -> list[list[int]]:
    context = tokenized.input_ids.shape[1]
    result = []
    for prompt, phrase, n_real in zip(tokenized.prompts, phrases, tokenized.lengths, strict=True):
        if policy == "all":
            result.append(list(range(context)))
            continue
        occurrences = _occurrences(tokenizer, prompt, phrase)
        if policy == "last_word":
            result.append([occ[-1] for occ in occurrences])
        elif policy == "phrase":
            result.append([p for occ in occurrences for p in occ])
        else:  # phrase+eos
            result.append([p for occ in occurrences for p in occ] + [n_real - 1])
    return result


def concept_token_positions(
    tokenizer: object,
    prompts: Sequence[str],
    phrases: Sequence[str] | str | None,
    policy: TokenPolicy = "last_word",
) -> list[list[int]]:
    """Per prompt, the token positions ``policy`` selects for its concept phrase (see module doc).

    ``phrases``: one per prompt, or one string for all; ignored (may be ``None``) for ``"all"``.
    """
    source, tokenizer = tokenizer, _first_tokenizer(tokenizer)
    prompts = _check_prompts(prompts)
    phrase_list = _texts(source, _as_phrases(prompts, phrases, policy), tokenizer)
    tokenized = tokenize(tokenizer, _texts(source, prompts, tokenizer), warn=False)
    return _positions(tokenizer, tokenized, phrase_list, policy)


def concept_token_embeddings(
    pipe: object,
    prompts: Sequence[str],
    phrases: Sequence[str] | str | None,
    policy: TokenPolicy = "last_word",
    *,
    return_positions: bool = False,
    batch_size: int = 64,
) -> torch.Tensor | tuple[torch.Tensor, list[list[int]]]:
    """The text-embedding rows ``[k, d]`` (float32) of the concept tokens ``policy`` selects.

    Rows are stacked prompt by prompt, positions ascending inside a prompt. Only the first
    ``max(position) + 1`` tokens are encoded (exact: CLIP is causal). With ``return_positions``
    also returns the positions per prompt (``rows = sum(len(p) for p in positions)``).
    """
    prompts = _check_prompts(prompts)
    phrase_list = _as_phrases(prompts, phrases, policy)
    tokenizer = _first_tokenizer(pipe)
    converted = _convert(pipe, prompts, tokenizer)
    if policy != "all":
        phrase_list = [_convert(pipe, [p], tokenizer)[0] for p in phrase_list]
    tokenized = tokenize(tokenizer, converted, warn=True)
    positions = _positions(tokenizer, tokenized, phrase_list, policy)
    needed = max(max(p) for p in positions) + 1
    states = _encode(
        pipe, converted, max_length=needed, clip_skip=None, batch_size=batch_size, convert=False, warn=False
    )
    rows = torch.cat([states[i, p] for i, p in enumerate(positions)], dim=0)
    return (rows, positions) if return_positions else rows


# --------------------------------------------------------------------------------------------
# Soft prompts: encoding with some input embeddings replaced
# --------------------------------------------------------------------------------------------


def prefix_slot_ids(tokenizer: object, prompts: Sequence[str], count: int) -> tuple[torch.Tensor, list[int]]:
    """Token ids ``[n, context]`` of ``prompts`` with ``count`` free slots right after BOS, and those positions.

    The slots hold the BOS id (a placeholder: :func:`encode_with_embeddings` replaces their input
    embeddings, and it never wins CLIP's EOS pooling). Prompts are shortened by ``count`` tokens so
    the context length stays; a prompt cut that way keeps its EOS as the last token.
    """
    prompts = _check_prompts(prompts)
    context = context_length(tokenizer)
    if not 0 < count < context - 1:
        raise ValueError(f"count must be between 1 and {context - 2} (the context length minus BOS and EOS), got {count}.")
    ids = tokenize(tokenizer, prompts, warn=False).input_ids
    slots = torch.full((ids.shape[0], count), int(tokenizer.bos_token_id), dtype=ids.dtype)
    out = torch.cat([ids[:, :1], slots, ids[:, 1 : context - count]], dim=1)
    eos = int(tokenizer.eos_token_id)
    lost = ~(out == eos).any(dim=1)
    out[lost, -1] = eos
    return out, list(range(1, count + 1))


def encode_with_embeddings(
    encoder: torch.nn.Module,
    input_ids: torch.Tensor,
    positions: Sequence[int],
    vectors: torch.Tensor,
    **kwargs: object,
) -> object:
    """Run ``encoder`` on ``input_ids`` with the input (token) embeddings at ``positions`` replaced by ``vectors``.

    ``vectors``: ``[len(positions), d]`` (the same for every row) or ``[n, len(positions), d]``;
    gradients flow to them (soft-prompt attacks and adversarial training, e.g. AdvUnlearn's prefix).
    The replacement is a forward hook on ``encoder.get_input_embeddings()``, so position embeddings,
    the causal mask and EOS pooling are the encoder's own. Returns the encoder's output (``[0]``:
    the last hidden state); ``kwargs`` go to the encoder (``output_hidden_states=True``...).
    """
    index = list(positions)
    if vectors.shape[-2] != len(index):
        raise ValueError(f"Got {vectors.shape[-2]} vectors for {len(index)} positions; give one vector per position.")

    def replace(module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, index] = vectors.to(output.device, output.dtype).expand(output.shape[0], -1, -1)
        return output

    handle = encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        return encoder(input_ids.to(_device(encoder)), **kwargs)
    finally:
        handle.remove()
