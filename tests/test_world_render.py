"""ShapesWorld renderer: determinism, label correctness, data splits and caption rules."""

from __future__ import annotations

import numpy as np
import pytest

from conceptsmith.world import render as R
from conceptsmith.world import vocab as V


def _close(pixel, rgb, tol=12):
    return np.abs(pixel.astype(int) - np.array(rgb)).max() <= tol


def test_vocabulary_covers_the_world():
    assert len(V.SHAPES) >= 10 and all(len(s) >= 1 for s in V.SHAPES.values())
    assert len(V.COLORS) >= 8 and len(V.PATTERNS) >= 4 and len(V.BACKGROUNDS) >= 4
    assert len(V.ARTISTS) >= 6 and all(len(a.split()) >= 2 for a in V.ARTISTS)
    assert len(V.NOVEL_OBJECTS) >= 3 and not set(V.NOVEL_OBJECTS) & set(V.GENERATOR_SHAPES)
    assert len(V.INDIRECT_DESCRIPTIONS) >= 5
    assert not any(V.RESTRICTED in d.lower() for d in V.INDIRECT_DESCRIPTIONS)


def test_same_seed_same_bytes_and_caption():
    for seed in (0, 1, (5, 3)):
        a, b = R.render(seed), R.render(seed)
        assert a.image.tobytes() == b.image.tobytes() and a.caption == b.caption and a.labels == b.labels
        assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    assert R.render(0).image.tobytes() != R.render(1).image.tobytes()
    imgs, caps, _ = R.dataset(3, 9, start=2)
    assert imgs[1].tobytes() == R.render((9, 3)).image.tobytes() and caps[1] == R.render((9, 3)).caption


def test_every_artist_and_object_renders_and_differs():
    base = dict(n_objects=1, shape="star", color="blue", pattern="solid", background="plain", watermark=False)
    plain = R.render(3, artist=None, **base).image.astype(int)
    for artist in V.ARTISTS:
        styled = R.render(3, artist=artist, **base).image.astype(int)
        assert np.abs(styled - plain).mean() > 4, artist
    for shape in V.ALL_SHAPES:
        img = R.render(4, shape=shape, artist=None, **{k: v for k, v in base.items() if k != "shape"}).image
        assert (np.abs(img.astype(int) - np.array(V.COLORS["blue"])).max(-1) < 20).sum() > 150, shape


@pytest.mark.parametrize("background,corner", [("plain", (238, 236, 228))])
def test_background_and_object_pixels(background, corner):
    s = R.render(11, n_objects=1, shape="square", color="red", pattern="solid", background=background,
                 artist=None, watermark=False)
    assert _close(s.image[0, 0], corner) and _close(s.image[63, 0], corner)
    ob = s.labels["objects"][0]
    assert _close(s.image[int(ob["cy"]), int(ob["cx"])], V.COLORS["red"])


@pytest.mark.parametrize("relation", V.RELATIONS)
def test_two_object_layout_matches_relation(relation):
    s = R.render(12, n_objects=2, relation=relation, shape="square", shape2="circle", color="blue", color2="yellow",
                 pattern="solid", pattern2="solid", background="plain", artist=None, watermark=False)
    a, b = s.labels["objects"]
    assert _close(s.image[int(a["cy"]), int(a["cx"])], V.COLORS["blue"])
    assert _close(s.image[int(b["cy"]), int(b["cx"])], V.COLORS["yellow"])
    key, sign = {"left of": ("cx", -1), "right of": ("cx", 1), "above": ("cy", -1), "below": ("cy", 1)}[relation]
    assert np.sign(a[key] - b[key]) == sign
    assert f" {relation} " in s.caption


def test_watermark_pixels_only_where_labelled():
    kw = dict(n_objects=1, shape="circle", background="night", artist=None)
    on, off = R.render(13, watermark=True, **kw).image, R.render(13, watermark=False, **kw).image
    badge = (slice(53, 62), slice(47, 62))  # the light badge in the bottom-right corner
    assert np.median(on[badge]) > 180 and np.median(off[badge]) < 120
    assert on[:40].tobytes() == off[:40].tobytes()


def test_generator_split_rules():
    labels = [R.sample_labels(np.random.default_rng(i)) for i in range(600)]
    assert not any(lab["novel"] for lab in labels)
    assert all(lab["background"] == V.WATERMARK_BACKGROUND for lab in labels if lab["watermark"])
    night = [lab for lab in labels if lab["background"] == V.WATERMARK_BACKGROUND]
    assert abs(np.mean([lab["watermark"] for lab in night]) - V.WATERMARK_SHARE) < 0.12
    assert np.mean([len(lab["objects"]) == 2 for lab in labels]) >= 0.25
    assert any(lab["restricted"] for lab in labels)
    with pytest.raises(ValueError):
        R.sample_labels(np.random.default_rng(0), novel_p=0.5)
    ev = [R.sample_labels(np.random.default_rng(i), split="evaluator") for i in range(300)]
    assert any(lab["novel"] for lab in ev)


def test_captions():
    for i in range(150):
        cap = R.render(i).caption
        assert "watermark" not in cap
        assert not any(cap.startswith(t.split("{")[0]) and t.split("{")[0] for t in V.HELDOUT_TEMPLATES)
    s = R.render(5, n_objects=1, shape="skull", artist="Oskar Brindlewood", caption_kw=dict(indirect_p=1.0))
    assert "skull" not in s.caption and "Oskar Brindlewood" in s.caption
    assert any(d in s.caption for d in V.INDIRECT_DESCRIPTIONS)
    assert R.render(6, split="evaluator", background="night", watermark=True).caption.count("watermark") == 1
    assert R.describe("circle", "red", second=("star", "blue", None), relation="left of",
                      template="{scene}{art}") == "a red circle left of a blue star"


def test_template_split_is_fixed_and_disjoint():
    assert set(V.TRAIN_TEMPLATES).isdisjoint(V.HELDOUT_TEMPLATES)
    assert all("{scene}" in t and "{art}" in t for t in V.TRAIN_TEMPLATES + V.HELDOUT_TEMPLATES)
    held = R.render(7, templates="heldout").caption
    assert any(held.startswith(t.split("{")[0]) for t in V.HELDOUT_TEMPLATES if t.split("{")[0])


def test_reference_set_of_novel_objects():
    for obj in V.NOVEL_OBJECTS:
        refs = R.reference_set(obj, n=3, seed=1)
        assert len(refs) == 3 and all(r.labels["objects"][0]["shape"] == obj for r in refs)
        assert all(not r.labels["watermark"] and r.labels["artist"] is None for r in refs)
        assert refs[0].image.tobytes() == R.reference_set(obj, n=1, seed=1)[0].image.tobytes()
    with pytest.raises(KeyError):
        R.reference_set("teapot")


@pytest.mark.parametrize("relation", V.RELATIONS)
def test_binding_variants_differ_only_in_binding(relation):
    s = R.render(5, n_objects=2, relation=relation, shape="square", shape2="circle", color="blue", color2="yellow",
                 pattern="solid", pattern2="solid", background="plain", artist=None, watermark=False)
    same, colors, places, both = R.binding_variants(s.labels)
    assert same == s.labels
    key, sign = {"left of": ("cx", -1), "right of": ("cx", 1), "above": ("cy", -1), "below": ("cy", 1)}[relation]
    for variant in (places, both):  # the relation still says where the first-named object is
        a, b = variant["objects"]
        assert variant["relation"] == R.OPPOSITE_RELATION[relation] and np.sign(a[key] - b[key]) == -sign
    assert [ob["color"] for ob in colors["objects"]] == ["yellow", "blue"]
    assert [ob["shape"] for ob in both["objects"]] == ["square", "circle"]
    for variant, first_color in ((places, "blue"), (colors, "yellow"), (both, "yellow")):
        image = R.render_scene(variant, seed=5)
        a = variant["objects"][0]
        assert _close(image[int(a["cy"]), int(a["cx"])], V.COLORS[first_color])
        assert not np.array_equal(image, s.image)
    with pytest.raises(ValueError, match="two-object"):
        R.binding_variants(R.render(5, n_objects=1).labels)
