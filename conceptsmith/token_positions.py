"""Concept tokens: where a concept phrase sits in a tokenized prompt, the text-embedding rows a closed-form
editor edits, and soft prompts (input embeddings replaced at chosen positions).

* :func:`phrase_positions` finds a concept phrase's tokens inside a prompt, and
  :func:`concept_token_embeddings` picks the rows a closed-form editor edits under a token policy:

  ``last_word``   the last token of the phrase (UCE's current official script)
  ``phrase``      every token of the phrase
  ``phrase+eos``  the phrase tokens and the EOS token
  ``all``         every position up to the context length (77), BOS, EOS and padding included
                  (UCE's original script)

* :func:`prefix_slot_ids` and :func:`encode_with_embeddings` encode prompts with free slots whose input
  embeddings are optimized (soft-prompt attacks, AdvUnlearn's adversarial prefix).

Where a pipeline is expected, a :class:`~conceptsmith.text_segments.TextSegment` is accepted too (positions
then count from the segment's start).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

from conceptsmith.devices import module_device
from conceptsmith.prompts import check_prompts
from conceptsmith.text import (
    TokenizedPrompts,
    context_length,
    convert_prompts,
    convert_texts,
    encode_prompt_list,
    first_tokenizer,
    short_prompt,
    tokenize,
)

__all__ = [
    "TOKEN_POLICIES",
    "TokenPolicy",
    "concept_token_embeddings",
    "concept_token_positions",
    "encode_with_embeddings",
    "phrase_positions",
    "prefix_slot_ids",
]

TokenPolicy = Literal["last_word", "phrase", "phrase+eos", "all"]
TOKEN_POLICIES: tuple[str, ...] = get_args(TokenPolicy)


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
                f"Concept phrase {phrase!r} occurs in prompt {short_prompt(prompt)} only after the "
                f"{context_length(tokenizer)}-token limit, in the part that is cut ({tokenized.cut[0]!r}). "
                "Shorten the prompt or move the concept towards its start."
            )
    raise ValueError(
        f"Concept phrase {phrase!r} does not occur in prompt {short_prompt(prompt)} (compared as whole CLIP tokens "
        f"[{words}], case-insensitive). Use the concept's exact words as they appear in the prompt."
    )


def phrase_positions(tokenizer: object, prompt: str, phrase: str) -> list[int]:
    """Positions of ``phrase``'s tokens in the tokenized ``prompt`` (position 0 is BOS).

    Whole tokens only, case-insensitive (CLIP lowercases); multi-token words give several
    positions; a repeated phrase gives the positions of every occurrence, in order. A ``ValueError``
    naming phrase and prompt is raised when the phrase is absent, empty or cut by the limit.
    ``tokenizer`` may also be a pipeline (its first tokenizer, textual-inversion tokens expanded).
    """
    source, tokenizer = tokenizer, first_tokenizer(tokenizer)
    prompt, phrase = convert_texts(source, [prompt, phrase], tokenizer)
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
    source, tokenizer = tokenizer, first_tokenizer(tokenizer)
    prompts = check_prompts(prompts)
    phrase_list = convert_texts(source, _as_phrases(prompts, phrases, policy), tokenizer)
    tokenized = tokenize(tokenizer, convert_texts(source, prompts, tokenizer), warn=False)
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
    prompts = check_prompts(prompts)
    phrase_list = _as_phrases(prompts, phrases, policy)
    tokenizer = first_tokenizer(pipe)
    converted = convert_prompts(pipe, prompts, tokenizer)
    if policy != "all":
        phrase_list = [convert_prompts(pipe, [p], tokenizer)[0] for p in phrase_list]
    tokenized = tokenize(tokenizer, converted, warn=True)
    positions = _positions(tokenizer, tokenized, phrase_list, policy)
    needed = max(max(p) for p in positions) + 1
    states = encode_prompt_list(
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
    prompts = check_prompts(prompts)
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
        return encoder(input_ids.to(module_device(encoder)), **kwargs)
    finally:
        handle.remove()
