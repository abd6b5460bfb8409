"""MMDiT pipelines (SD3, FLUX): the joint token sequence their transformer reads, and its runs.

The transformer reads one joint token sequence and a pooled CLIP vector, both from the pipeline's own
``encode_prompt`` (:func:`encode_mmdit`): SD3's sequence is 77 CLIP rows (the two CLIP encoders'
penultimate states concatenated and zero-padded to T5's width) then T5 rows; FLUX's is T5 rows. T5 is not
causal, so these are always encoded at the pipeline's full sequence length (:func:`sequence_length`).

A :class:`TextSegment` (:func:`text_segments`) is the run of rows one tokenizer produced. Passed where a
pipeline is expected, :mod:`conceptsmith.text` and :mod:`conceptsmith.token_positions` treat it as a
one-encoder pipeline whose conditioning is that run (positions count from the segment's start).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from conceptsmith.mmdit import is_mmdit, mmdit_family
from conceptsmith.prompts import check_prompts

__all__ = ["TextSegment", "encode_mmdit", "sequence_length", "text_segments"]


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

    SD3: ``clip`` (the ``tokenizer_max_length`` = 77 rows its ``encode_prompt`` pads CLIP to) then ``t5``
    (absent when the pipeline has no T5 encoder: its rows are zeros); FLUX: ``t5``.
    """
    if not is_mmdit(pipe):
        raise ValueError(f"{type(pipe).__name__} is not an MMDiT pipeline: its text conditioning is one CLIP token run.")
    length = sequence_length(pipe)
    if mmdit_family(pipe.transformer) == "flux":
        return [_segment(pipe, "t5", pipe.tokenizer_2, pipe.text_encoder_2, 0, length)]
    clip = int(pipe.tokenizer_max_length)
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
    prompts = check_prompts(prompts)
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
