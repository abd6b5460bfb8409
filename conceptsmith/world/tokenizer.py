"""A transformers ``CLIPTokenizer`` built offline from open_clip's bundled CLIP BPE vocabulary.

Token ids are identical to OpenAI CLIP's (and so to every Stable Diffusion tokenizer): the
vocabulary is the 256 byte symbols, the same with the end-of-word marker, the first
49152 - 256 - 2 merges, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
"""

from __future__ import annotations

import functools
import gzip

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_MERGE_COUNT = 49152 - 256 - 2


@functools.cache
def _vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = tuple(lines[1 : _MERGE_COUNT + 1])
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return tuple((token, index) for index, token in enumerate(tokens)), merges


def clip_tokenizer(pad_token: str = EOS, model_max_length: int = 77) -> CLIPTokenizer:
    """CLIP's tokenizer; SD 1.x pads with ``<|endoftext|>``, SD 2.x / SDXL's second encoder with ``!``."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split()) for m in merges],
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
