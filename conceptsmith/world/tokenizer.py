"""A transformers ``CLIPTokenizer`` built offline from open_clip's bundled BPE file.

open_clip ships OpenAI CLIP's byte-pair vocabulary (``bpe_simple_vocab_16e6.txt.gz``). CLIP's
``SimpleTokenizer`` derives its encoder from that file as: the 256 byte symbols, the same symbols
with the end-of-word marker ``</w>``, one entry per merge (the first 48894 merges after the header
line), then ``<|startoftext|>`` and ``<|endoftext|>`` -> 49408 ids. We build ``vocab`` and
``merges`` the same way, so token ids are identical to OpenAI CLIP's (tests check this against
``open_clip.tokenizer.SimpleTokenizer``). Padding uses ``<|endoftext|>`` as in Stable Diffusion 1.x.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from conceptsmith.io import atomic_directory

N_MERGES = 49152 - 256 - 2  # as in CLIP's SimpleTokenizer
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def default_bpe_path() -> Path:
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


@lru_cache(maxsize=2)
def vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], tuple[str, ...]]:
    """(token -> id, merges as "a b" strings) exactly as CLIP's SimpleTokenizer builds them."""
    path = Path(bpe_path) if bpe_path else default_bpe_path()
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = tuple(lines[1 : N_MERGES + 1])
    from open_clip.tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"unexpected BPE vocabulary size {len(vocab)} (expected {VOCAB_SIZE}) from {path}")
    return vocab, merges


def clip_tokenizer(pad_token: str = EOS, model_max_length: int = 77, bpe_path: str | None = None):
    """A ``transformers.CLIPTokenizer`` with OpenAI CLIP's ids, no download needed.

    SD 1.x pads with ``<|endoftext|>``; SD 2.x and SDXL's second encoder pad with ``!``."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges(bpe_path)
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split(" ")) for m in merges],
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


build_clip_tokenizer = clip_tokenizer


def save_clip_tokenizer(out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write the SD 1.x-style tokenizer with ``save_pretrained`` (``CLIPTokenizer.from_pretrained`` loads it),
    replacing ``out_dir`` as a whole."""
    out = Path(out_dir)
    with atomic_directory(out) as temporary:
        clip_tokenizer(model_max_length=model_max_length).save_pretrained(temporary)
    return out
