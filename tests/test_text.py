"""Prompt encoding (exactly as each family conditions its UNet), the causal shortcut, concept
phrase positions and token policies, on tiny random SD 1.x / SD 2.x / SDXL-like pipelines."""

from __future__ import annotations

import warnings

import pytest
import torch

from conceptsmith.text import encode_prompts, tokenize
from conceptsmith.token_positions import (
    TOKEN_POLICIES,
    concept_token_embeddings,
    concept_token_positions,
    phrase_positions,
)
from conceptsmith.world.tokenizer import clip_tokenizer

PROMPTS = ["a castle by Greg Rutkowski, trending", "a cat and a cat", ""]
ARTIST = PROMPTS[0]  # BOS a castle by greg rut kowski , trending EOS -> greg at 4, EOS at 9
BOS_ID, EOS_ID = 49406, 49407


def _sd2_like(pipe):
    """SD 2.x differs on the text side by the tokenizer padding with '!' (id 0) and a gelu encoder
    whose config keeps the legacy bos/eos ids 0/2."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    components = {
        **pipe.components,
        "text_encoder": CLIPTextModel(config).eval(),
        "tokenizer": clip_tokenizer("!"),
    }
    return StableDiffusionPipeline(**components, requires_safety_checker=False)


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def family_pipe(request):
    if request.param == "sdxl":
        return request.getfixturevalue("tiny_sdxl_pipe")[0]
    pipe = request.getfixturevalue("tiny_pipe")[0]
    return _sd2_like(pipe) if request.param == "sd2" else pipe


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def _pipeline_embeds(pipe, prompts, **kwargs):
    with torch.no_grad():
        return pipe.encode_prompt(
            prompt=prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False, **kwargs
        )[0]


# ------------------------------------------------------------------------------------ encoding


def test_encoding_equals_the_pipelines_own(family_pipe):
    ours = encode_prompts(family_pipe, PROMPTS)
    assert ours.dtype == torch.float32 and ours.shape == (3, 77, family_pipe.unet.config.cross_attention_dim)
    assert torch.equal(ours, _pipeline_embeds(family_pipe, PROMPTS))


def test_clip_skip_follows_diffusers(tiny_pipe, tiny_sdxl_pipe):
    xl = tiny_sdxl_pipe[0]
    assert torch.equal(encode_prompts(xl, PROMPTS, clip_skip=1), _pipeline_embeds(xl, PROMPTS, clip_skip=1))
    # SD 1.x: diffusers' clip_skip path reads text_encoder.text_model, which transformers 5 removed;
    # its definition is the final layer norm applied to hidden_states[-(clip_skip + 1)].
    sd = tiny_pipe[0]
    ids = tokenize(sd, PROMPTS).input_ids
    with torch.no_grad():
        states = sd.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = sd.text_encoder.final_layer_norm(states)
    assert torch.equal(encode_prompts(sd, PROMPTS, clip_skip=1), expected)


def test_causal_shortcut_is_exact_for_the_encoded_positions(family_pipe):
    tokenizers = [family_pipe.tokenizer] + [
        getattr(family_pipe, "tokenizer_2", None) or family_pipe.tokenizer
    ]
    pads = {int(tokenize(t, ["a cat"]).input_ids[0, -1]) for t in tokenizers}
    assert pads <= {EOS_ID, 0}  # SD 1.x pads with EOS, SD 2.x / SDXL's second tokenizer with "!" (id 0)
    full = encode_prompts(family_pipe, PROMPTS)
    longest = max(tokenize(family_pipe, PROMPTS).lengths)
    for k in (1, 4, longest, longest + 3, 77):
        part = encode_prompts(family_pipe, PROMPTS, max_length=k)
        assert part.shape[1] == k
        torch.testing.assert_close(part, full[:, :k], rtol=1e-5, atol=1e-5)
    assert encode_prompts(family_pipe, PROMPTS, max_length="longest").shape[1] == longest
    # the same statement from the other side: a different continuation leaves the prefix unchanged
    cat, dog = encode_prompts(family_pipe, ["a photo of a cat", "a photo of a dog on the moon"])
    torch.testing.assert_close(cat[:5], dog[:5], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cat[5], dog[5])


def test_one_text_encoder_call_per_batch(tiny_sdxl_pipe):
    pipe = tiny_sdxl_pipe[0]
    calls = []
    handles = [
        enc.register_forward_hook(lambda *_: calls.append(1))
        for enc in (pipe.text_encoder, pipe.text_encoder_2)
    ]
    prompts = [f"a photo of {n} cats" for n in range(5)]
    try:
        whole = encode_prompts(pipe, prompts)
        assert len(calls) == 2  # one batched call per encoder, no per-prompt loop
        chunked = encode_prompts(pipe, prompts, batch_size=2)
        assert len(calls) == 2 + 2 * 3
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_textual_inversion_tokens_are_expanded_like_the_pipeline(tiny_pipe):
    pipe = tiny_pipe[0]
    pipe.load_textual_inversion({"<cat-toy>": torch.randn(2, 32)}, token="<cat-toy>")  # a 2-vector embedding
    prompts = ["a photo of <cat-toy>", "<cat-toy> on a beach"]
    assert torch.equal(encode_prompts(pipe, prompts), _pipeline_embeds(pipe, prompts))
    rows, positions = concept_token_embeddings(pipe, prompts, "<cat-toy>", "phrase", return_positions=True)
    assert positions == [[4, 5], [1, 2]]
    assert phrase_positions(pipe, prompts[0], "<cat-toy>") == [4, 5]  # a pipe expands like encode_prompt
    assert concept_token_positions(pipe, prompts, "<cat-toy>", "phrase+eos") == [[4, 5, 6], [1, 2, 6]]
    assert tokenize(pipe, prompts).lengths == (7, 7)
    full = _pipeline_embeds(pipe, prompts)
    torch.testing.assert_close(rows, torch.cat([full[0, [4, 5]], full[1, [1, 2]]]), rtol=1e-5, atol=1e-5)


def test_encode_input_errors(tiny_pipe):
    pipe = tiny_pipe[0]
    with pytest.raises(ValueError, match="Empty prompts list"):
        encode_prompts(pipe, [])
    with pytest.raises(TypeError, match="wrap it as"):
        encode_prompts(pipe, "a cat")
    for bad in (0, 78):
        with pytest.raises(ValueError, match="between 1 and the context length 77"):
            encode_prompts(pipe, ["a cat"], max_length=bad)


# ------------------------------------------------------------------------------------ truncation


def test_over_long_prompt_warns_naming_the_cut_words(tiny_sdxl_pipe):
    pipe = tiny_sdxl_pipe[0]
    fits = "a photo of " + "red " * 72  # 75 word tokens + BOS + EOS = 77: nothing cut
    too_long = "a photo of " + "red " * 72 + "Zebra giraffe"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompts(pipe, [fits])
    with pytest.warns(UserWarning, match="these words were cut") as record:
        encode_prompts(pipe, [fits, too_long])
    assert len(record) == 1  # one warning although SDXL tokenizes twice
    assert "'Zebra giraffe'" in str(record[0].message)
    assert tokenize(pipe, [too_long], warn=False).cut == ("Zebra giraffe",)


# ------------------------------------------------------------------------------------ phrases


def test_phrase_positions(tok):
    assert phrase_positions(tok, ARTIST, "greg rutkowski") == [4, 5, 6]  # BOS offset; rutkowski = 2 tokens
    assert phrase_positions(tok, ARTIST, "RUTKOWSKI") == [5, 6]  # case-insensitive like CLIP
    assert phrase_positions(tok, "cat", "cat") == [1]
    assert phrase_positions(tok, "a cat and a cat", "cat") == [2, 5]  # every occurrence
    assert phrase_positions(tok, "a cat and a cat", "a cat") == [1, 2, 4, 5]
    assert phrase_positions(tok, ARTIST, ",") == [7]


def test_phrase_position_errors(tok, tiny_pipe):
    with pytest.raises(ValueError, match=r"'dog' does not occur in prompt 'a photo of a cat'"):
        phrase_positions(tok, "a photo of a cat", "dog")
    with pytest.raises(ValueError, match="does not occur"):  # whole tokens only: 'cat' is not in 'cats'
        phrase_positions(tiny_pipe[0], "two cats", "cat")
    for empty in ("", "   "):
        with pytest.raises(ValueError, match="is empty .*policy='all' or encode_prompts"):
            phrase_positions(tok, "a photo of a cat", empty)
    long_prompt = "a photo of " + "red " * 80 + "zebra"
    with pytest.raises(ValueError, match="only after the 77-token limit"):
        phrase_positions(tok, long_prompt, "zebra")


def test_token_policies_select_the_documented_positions(tok):
    prompts = [ARTIST, "a cat and a cat"]
    phrases = ["greg rutkowski", "cat"]
    assert set(TOKEN_POLICIES) == {"last_word", "phrase", "phrase+eos", "all"}
    assert concept_token_positions(tok, prompts, phrases, "last_word") == [[6], [2, 5]]
    assert concept_token_positions(tok, prompts, phrases, "phrase") == [[4, 5, 6], [2, 5]]
    assert concept_token_positions(tok, prompts, phrases, "phrase+eos") == [[4, 5, 6, 9], [2, 5, 6]]
    assert concept_token_positions(tok, prompts, None, "all") == [list(range(77))] * 2
    assert concept_token_positions(tok, ["cat", "a cat"], "cat", "last_word") == [
        [1],
        [2],
    ]  # one phrase for all


def test_concept_token_embeddings_are_rows_of_the_full_encoding(tiny_sdxl_pipe):
    pipe = tiny_sdxl_pipe[0]
    full = encode_prompts(pipe, [ARTIST, "a cat and a cat", ""])
    for policy in TOKEN_POLICIES:
        prompts, phrases = [ARTIST, "a cat and a cat", ""], ["greg rutkowski", "cat", None]
        if policy != "all":
            prompts, phrases = prompts[:2], phrases[:2]
        rows, positions = concept_token_embeddings(pipe, prompts, phrases, policy, return_positions=True)
        assert positions == concept_token_positions(pipe, prompts, phrases, policy)
        expected = torch.cat([full[i, p] for i, p in enumerate(positions)])
        assert rows.shape == (sum(map(len, positions)), 64) and rows.dtype == torch.float32
        torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-5)
    # "all": BOS, words, EOS and every padding position of each prompt, bit-identical to the full encoding
    assert rows.shape[0] == 3 * 77 and torch.equal(rows, full.reshape(-1, 64))


def test_concept_token_embedding_errors(tiny_pipe):
    pipe = tiny_pipe[0]
    with pytest.raises(ValueError, match="Unknown token policy 'last'; choose one of last_word"):
        concept_token_embeddings(pipe, ["a cat"], ["cat"], "last")
    with pytest.raises(ValueError, match="needs the concept phrase"):
        concept_token_embeddings(pipe, ["a cat"], None, "phrase")
    with pytest.raises(ValueError, match="2 prompts but 1 phrases"):
        concept_token_embeddings(pipe, ["a cat", "a dog"], ["cat"], "phrase")
    with pytest.raises(ValueError, match="is empty"):
        concept_token_embeddings(pipe, ["a cat"], [""], "last_word")
    with pytest.raises(ValueError, match="'van gogh' does not occur in prompt 'a cat'"):
        concept_token_embeddings(pipe, ["a cat"], ["van gogh"], "phrase+eos")
