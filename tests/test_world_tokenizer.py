"""The offline CLIP tokenizer: token ids identical to OpenAI CLIP's (open_clip's SimpleTokenizer)."""

from __future__ import annotations

import pytest
from open_clip.tokenizer import SimpleTokenizer

from conceptsmith.world import render as R
from conceptsmith.world import vocab as V
from conceptsmith.world.tokenizer import EOS, clip_tokenizer, save_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizers():
    return clip_tokenizer(), SimpleTokenizer()


def _captions():
    caps = [R.render(i, split="evaluator").caption for i in range(40)]
    caps += [R.render(i, templates="heldout").caption for i in range(20)]
    caps += list(V.ARTISTS) + list(V.INDIRECT_DESCRIPTIONS)
    caps += ["A  Photo of   a CAT!!", "don't stop 12345 déjà-vu", "x,y;z (ok) <tag> naïve café", "ünïcödé ★ emoji 🙂"]
    return caps


def test_ids_match_open_clip(tokenizers):
    hf, simple = tokenizers
    bos, eos = simple.sot_token_id, simple.eot_token_id
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token) == (49406, 49407, EOS) == (bos, eos, EOS)
    assert len(hf) == 49408
    for caption in _captions():
        assert hf(caption).input_ids == [bos, *simple.encode(caption), eos], caption


def test_artist_names_are_several_tokens(tokenizers):
    _, simple = tokenizers
    for name in V.ARTISTS:
        assert len(simple.encode(name)) >= 4, name


def test_padding_and_roundtrip(tokenizers, tmp_path):
    hf, _ = tokenizers
    ids = hf(["a red circle"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and ids[:5] == [49406, 320, 736, 7117, 49407] and set(ids[4:]) == {49407}
    from transformers import CLIPTokenizer

    save_clip_tokenizer(tmp_path / "tok")
    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    text = "a picture of a striped star by Zephyrine Mallowtusk"
    assert again(text).input_ids == hf(text).input_ids and again.model_max_length == 77
    sd2 = clip_tokenizer(pad_token="!")
    assert sd2.pad_token_id == 0
