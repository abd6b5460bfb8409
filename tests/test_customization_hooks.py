"""Training-free composition hooks: Multi-Concept T2I-Zero and A-STAR (unit math + on the tiny pipeline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptsmith.customization import CustomizationError
from conceptsmith.customization.a_star import retention_loss, segregation_loss
from conceptsmith.customization.t2i_zero import NMSProcessor, _State, correct_by_similarities, gaussian_smooth
from conceptsmith.edits import Edit, applied_edits
from conceptsmith.generation import generate
from conceptsmith.registry import EditRequest, get_editor

MULTI, SINGLE = "a dog next to a cat", "a photo of a dog"


def _images(pipe, prompts):
    return [np.asarray(image, dtype=np.float64) for _, _, image in generate(pipe, prompts, [0], progress=False)]


def _installed(pipe):
    return {
        "encode_prompt": "encode_prompt" in vars(pipe),
        "step": "step" in vars(pipe.scheduler),
        "processors": {name: type(p) for name, p in pipe.unet.attn_processors.items()},
        "hooks": len(pipe.unet._forward_pre_hooks),
    }


def test_correction_by_similarities_follows_its_formula():
    torch.manual_seed(0)
    embeds = torch.randn(1, 8, 6)
    rows, lengths = [[[2], [5]]], [7]
    assert torch.equal(correct_by_similarities(embeds, rows, lengths, alpha=0.0, tau=0.0, gamma=2), embeds)
    assert torch.equal(correct_by_similarities(embeds, rows, lengths, alpha=0.5, tau=1e9, gamma=2), embeds)  # nothing passes tau
    out = correct_by_similarities(embeds, rows, lengths, alpha=0.5, tau=0.0, gamma=2)
    f_c, window = embeds[0, 2], embeds[0, [1, 3, 4]]  # |j - 2| <= 2, j >= 1, the other concept (5) excluded
    s = (f_c * window).clamp(min=0)
    expected = torch.where(s.sum(0) > 0, (s * window).sum(0) / s.sum(0).clamp(min=1e-12), f_c)
    torch.testing.assert_close(out[0, 2], 0.5 * f_c + 0.5 * expected)
    untouched = [i for i in range(8) if i not in (2, 5)]
    assert torch.equal(out[0, untouched], embeds[0, untouched])
    assert torch.equal(correct_by_similarities(embeds, [[[2], []]], lengths, alpha=0.5, tau=0.0, gamma=2, min_concepts=2), embeds)


def test_cross_token_nms_keeps_one_concept_per_pixel():
    probs = torch.rand(2 * 2, 16, 6)  # batch 2 x heads 2, 4x4 queries, 6 tokens
    probs = probs / probs.sum(-1, keepdim=True)
    state = _State()
    state.latent_hw = (4, 4)
    processor = NMSProcessor(None, state, sigma=0.0, suppression=0.0)
    out = processor._suppress(probs, [None, [[1], [3, 4]]]).view(2, 2, 16, 6)
    assert torch.equal(out[0], probs.view(2, 2, 16, 6)[0])  # unconditional row untouched
    first, second = out[1][..., 1].sum(0), out[1][..., [3, 4]].sum(-1).sum(0)
    assert torch.all((first == 0) | (second == 0)) and torch.all((first > 0) | (second > 0))
    assert torch.equal(out[1][..., [0, 2, 5]], probs.view(2, 2, 16, 6)[1][..., [0, 2, 5]])
    smooth = gaussian_smooth(torch.zeros(1, 5, 5).index_put_((torch.tensor([0]), torch.tensor([2]), torch.tensor([2])), torch.tensor(1.0)), 1.0)
    assert float(smooth[0, 2, 2]) == float(smooth.max()) and torch.allclose(smooth, smooth.flip(-1)) and torch.allclose(smooth, smooth.transpose(1, 2))
    torch.testing.assert_close(gaussian_smooth(torch.full((1, 3, 4), 2.0), 1.5), torch.full((1, 3, 4), 2.0))  # constants stay


def test_a_star_losses():
    apart = torch.zeros(2, 4, 4)
    apart[0, :2], apart[1, 2:] = 1, 1
    assert float(segregation_loss(apart)) == 0
    assert abs(float(segregation_loss(torch.ones(2, 4, 4))) - 0.5) < 1e-6
    assert float(retention_loss(apart, apart, 0.5)) == 0
    assert float(retention_loss(apart, apart.flip(0), 0.5)) == 1


@pytest.mark.parametrize("method", ["t2i-zero", "a-star"])
def test_hooks_change_only_multi_concept_prompts_and_revert_exactly(tiny_pipe, method, tmp_path):
    pipe, _ = tiny_pipe
    config = {"suppression": 0.0, "alpha": 0.5} if method == "t2i-zero" else {"until": 1.0, "step_size": 50.0}
    edit = get_editor(method)(config).fit(pipe, EditRequest(concepts=["dog", "cat"]))
    assert edit.kind == "hook" and edit.hook == method and edit.concepts == ["dog", "cat"]
    edit = Edit.load(edit.save(tmp_path / "hook.safetensors"))
    before, installed = _images(pipe, [MULTI, SINGLE]), _installed(pipe)
    edit.apply(pipe)
    after = _images(pipe, [MULTI, SINGLE])
    assert not np.array_equal(after[0], before[0])
    assert np.array_equal(after[1], before[1])  # a prompt with one of the concepts generates as before
    edit.revert(pipe)
    assert _installed(pipe) == installed and applied_edits(pipe) == []
    assert all(np.array_equal(x, y) for x, y in zip(_images(pipe, [MULTI, SINGLE]), before))


def test_hooks_compose_with_custom_tokens_and_each_other(tiny_pipe):
    from conceptsmith.tokens import token_edit

    pipe, _ = tiny_pipe
    tokens = token_edit(pipe, "textual-inversion", ["<pet>"], {}, {"text_encoder.<pet>": torch.randn(1, 32, generator=torch.Generator().manual_seed(0))})
    zero = get_editor("t2i-zero")().fit(pipe, EditRequest(concepts=["<pet> dog", "cat"]))
    star = get_editor("a-star")({"until": 1.0}).fit(pipe, EditRequest(concepts=["<pet> dog", "cat"]))
    tokens.apply(pipe)
    plain = _images(pipe, ["a <pet> dog and a cat"])
    zero.apply(pipe)
    star.apply(pipe)
    composed = _images(pipe, ["a <pet> dog and a cat"])
    assert not np.array_equal(composed[0], plain[0])
    zero.revert(pipe)  # out of order: A-STAR is re-installed on top
    assert applied_edits(pipe) == [tokens, star]
    star.revert(pipe)
    assert np.array_equal(_images(pipe, ["a <pet> dog and a cat"])[0], plain[0])
    tokens.revert(pipe)


def test_hooks_run_on_sdxl_and_need_concepts(tiny_sdxl_pipe):
    pipe, _ = tiny_sdxl_pipe
    for method in ("t2i-zero", "a-star"):
        with pytest.raises(CustomizationError, match="concept phrases"):
            get_editor(method)().fit(pipe, EditRequest(concepts=[]))
        edit = get_editor(method)({"until": 1.0} if method == "a-star" else {}).fit(pipe, EditRequest(concepts=["dog", "cat"]))
        before = _images(pipe, [MULTI])
        edit.apply(pipe)
        after = _images(pipe, [MULTI])
        edit.revert(pipe)
        assert not np.array_equal(before[0], after[0])
