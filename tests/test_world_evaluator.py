"""The shipped evaluator `builtin:shapes-clip` loads through open_clip and recognises what the renderer draws."""

from __future__ import annotations

import numpy as np

from conceptsmith.evaluation.evaluators import load_evaluator
from conceptsmith.world import render as R
from conceptsmith.world import vocab as V


def _accuracy(evaluator, attribute: str, classes: list[str], n_per_class: int = 3) -> float:
    images, truth = [], []
    for index, name in enumerate(classes):
        for seed in range(n_per_class):
            sample = R.render((777, index, seed), templates="heldout", **{attribute: name})
            images.append(sample.pil())
            truth.append(index)
    templates = {"artist": ["an illustration by {}"], "shape": ["an illustration of a {}", "a rendering of a {}"]}.get(
        attribute, ["a {} shape"]
    )
    result = evaluator.classify(images, classes, templates=templates)
    return float((result.probs.argmax(dim=-1).numpy() == np.array(truth)).mean())


def test_shapes_clip_recognises_shapes_artists_colors_and_patterns():
    evaluator = load_evaluator("builtin:shapes-clip")
    assert "open_clip" in type(evaluator.model).__module__
    # measured on 220 held-out renders with the held-out prompt ensembles (`conceptsmith world check`): shape 0.977,
    # color 0.982, pattern 0.905, artist 1.000. Here 3 renders per class and one or two plain templates (measured on
    # this fixed set: shape 0.85 - circle/hexagon -, artist 0.94, color 0.92, pattern 0.73), asserted with margins
    assert _accuracy(evaluator, "shape", list(V.GENERATOR_SHAPES)) >= 0.75
    assert _accuracy(evaluator, "artist", list(V.ARTISTS)) >= 0.9
    assert _accuracy(evaluator, "color", list(V.COLORS)) >= 0.85
    assert _accuracy(evaluator, "pattern", list(V.PATTERNS)) >= 0.6


def _two_object_scene(relation: str = "left of") -> np.ndarray:
    labels = R.sample_labels(np.random.default_rng(5), n_objects=2, shape="circle", color="red", shape2="star",
                             color2="blue", relation=relation, artist=None, background="plain", pattern="solid",
                             pattern2="solid")
    return R.render_scene(labels, seed=5)


def _share_close_to(image, rgb, tol: float = 40.0) -> float:
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    return float((np.abs(a - np.array(rgb, np.float32)).sum(-1) < tol).mean())


def test_object_crop_shows_one_object_enlarged():
    from PIL import Image

    from conceptsmith.world.check import object_crop

    scene = _two_object_scene("left of")
    red, blue = V.COLORS["red"], V.COLORS["blue"]
    left, right = object_crop(Image.fromarray(scene), "left"), object_crop(Image.fromarray(scene), "right")
    assert left.size == right.size == (64, 64)
    assert _share_close_to(left, red) > 0.15 and _share_close_to(left, blue) == 0.0
    assert _share_close_to(right, blue) > 0.08 and _share_close_to(right, red) == 0.0
    # enlarged: the object covers more of the crop than of the scene
    assert _share_close_to(left, red) > 1.5 * _share_close_to(Image.fromarray(scene), red)
    above = _two_object_scene("above")
    top = object_crop(Image.fromarray(above), "top")
    assert _share_close_to(top, red) > 0.15 and _share_close_to(top, blue) == 0.0


def test_judge_reads_both_objects_of_rendered_two_object_scenes():
    """The ceiling of gen_two_object_acc: the judge on ground-truth renders of the check's prompts. Measured 0.86
    (16 seeds); the bare-half judge it replaced scored 0.31."""
    from conceptsmith.world.check import Judge, build_jobs, judge_jobs, render_jobs

    jobs = build_jobs(["two_object"])
    result = judge_jobs(Judge.load(), jobs, render_jobs(jobs, 4))
    assert result["gen_two_object_acc"] >= 0.7, result


def test_contrastive_batches_hold_binding_variants(monkeypatch, tmp_path):
    """With binding_groups, every batch carries freshly rendered two-object scenes in their four bindings,
    captioned with the relation each layout needs."""
    import pytest

    from conceptsmith.world import clip_train as C

    monkeypatch.setenv("CONCEPTSMITH_CACHE", str(tmp_path))
    samples = [R.render(i, n_objects=1 + i % 2, artist=None) for i in range(24)]
    images, labels = np.stack([s.image for s in samples]), [s.labels for s in samples]
    rendered: list[dict] = []
    render = R.render_scene
    monkeypatch.setattr(R, "render_scene", lambda lab, seed=0: rendered.append(lab) or render(lab, seed))
    captions: list[str] = []
    encode = C._hf_encoder()
    model = C.TextTowerCLIP(dict(C.TEXT_ENCODER_CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, projection_dim=16))
    kwargs = dict(name="t", images=images, labels=labels, mean=(0.5,) * 3, std=(0.25,) * 3, batch=8, lr=1e-3, seed=0,
                  resume=False, group_size=4, threads=1,
                  caption=lambda lab, rng: captions.append(R.make_caption(lab, rng)) or captions[-1],
                  tokenize=lambda caps, rng: C._encode_ids(encode, caps, 77, C.EOS_ID, rng))
    C._contrastive_train(model, steps=2, binding_groups=1, **kwargs)
    assert len(rendered) == 2 * 4  # one scene per binding group, four bindings each, per step
    for step in range(2):
        same, colors, places, both = rendered[4 * step : 4 * step + 4]
        assert places["relation"] == both["relation"] == R.OPPOSITE_RELATION[same["relation"]]
        assert [o["color"] for o in colors["objects"]] == [o["color"] for o in same["objects"]][::-1]
        assert f" {places['relation']} " in captions[8 * step + 6]  # the batch's last four captions are theirs
    with pytest.raises(ValueError, match="divisible by 4"):
        C._contrastive_train(model, steps=1, binding_groups=1, **{**kwargs, "group_size": 2})
