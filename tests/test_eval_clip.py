"""The open_clip evaluator wrapper on a tiny open_clip config built in code (random weights, no downloads)."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from conftest import TINY_CLIP
from PIL import Image

from conceptsmith.evaluation.clip import DEFAULT_TEMPLATES, Evaluator  # noqa: E402
from conceptsmith.evaluation.evaluators import (  # noqa: E402
    _eval_transform,
    _simple_tokenizer,
    load_evaluator,
    register_evaluator,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.CLIP(**json.loads(json.dumps(TINY_CLIP)))
    open_clip.set_model_preprocess_cfg(
        model, {"size": 32, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
    )
    return model.eval()


@pytest.fixture(scope="module")
def parts():
    model = _tiny_model()
    return model, _simple_tokenizer(77)


@pytest.fixture
def evaluator(parts):
    model, tokenizer = parts
    return Evaluator(model, tokenizer, _eval_transform(model), spec="tiny", batch_size=3)


def _images(n: int, seed: int = 0, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_embeddings_are_normalized_batched_and_cached(evaluator):
    calls = []
    original = evaluator.model.encode_image

    def counting(x, *a, **k):
        calls.append(x.shape[0])
        return original(x, *a, **k)

    evaluator.model.encode_image = counting
    try:
        imgs = _images(7)
        e1 = evaluator.embed_images(imgs)
        assert e1.shape == (7, 16) and e1.dtype == torch.float32
        torch.testing.assert_close(e1.norm(dim=-1), torch.ones(7))
        assert calls == [3, 3, 1]  # batches of batch_size
        e2 = evaluator.embed_images(imgs[::-1] + imgs[:2])  # all cached
        assert calls == [3, 3, 1]
        torch.testing.assert_close(e2[:7], e1.flip(0))
        assert evaluator.cache_sizes["images"] == 7
        # the same pixels as uint8 tensor (CHW), float tensor in [0, 1] and numpy array hit the cache
        arr = np.array(imgs[0])
        chw = torch.from_numpy(arr).permute(2, 0, 1)
        for same in (arr, chw, chw.float() / 255.0):
            torch.testing.assert_close(evaluator.embed_images([same])[0], e1[0])
        assert calls == [3, 3, 1]
        # a batched 4-D tensor is split into images
        assert evaluator.embed_images(torch.stack([chw, chw])).shape == (2, 16)
    finally:
        del evaluator.model.encode_image


def test_text_embeddings_cached_and_match_model(evaluator, parts):
    model, tokenizer = parts
    texts = ["a photo of the circle", "a photo of the star", "a photo of the circle"]
    e = evaluator.embed_texts(texts)
    assert evaluator.cache_sizes["texts"] == 2
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    torch.testing.assert_close(e, ref, atol=1e-5, rtol=1e-5)


def test_template_ensemble_and_zero_shot(evaluator):
    classes = ["circle", "star", "square"]
    templates = ["a photo of the {}", "a drawing of a {}", "{}, a shape"]
    cls = evaluator.class_embeddings(classes, templates)
    for i, c in enumerate(classes):
        per = evaluator.embed_texts([t.format(c) for t in templates])
        mean = per.mean(0)
        torch.testing.assert_close(cls[i], mean / mean.norm())
    imgs = _images(5, seed=1)
    out = evaluator.classify(imgs, classes, templates)
    img = evaluator.embed_images(imgs)
    logits = evaluator.logit_scale * img @ cls.T
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.probs, logits.softmax(-1))
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(5))
    assert out.pred.tolist() == logits.argmax(-1).tolist()
    assert out.labels() == [classes[i] for i in out.pred.tolist()]
    assert out.templates == tuple(templates)
    assert evaluator.classify(imgs, classes).templates == DEFAULT_TEMPLATES
    assert abs(evaluator.logit_scale - 1 / 0.07) < 1e-3


def test_clip_score_records_convention(evaluator):
    imgs = _images(4, seed=2)
    texts = ["a circle", "a star", "a red square", "a night sky"]
    cos = (evaluator.embed_images(imgs) * evaluator.embed_texts(texts)).sum(-1).double()
    s = evaluator.clip_score(imgs, texts)
    expected = (100 * cos).clamp_min(0)
    assert s.scale == 100 and s.clamp_min == 0 and s.evaluator == "tiny"
    np.testing.assert_allclose(s.per_image, expected.numpy(), atol=1e-6)
    assert s.mean == pytest.approx(float(expected.mean()))
    raw = evaluator.clip_score(imgs, texts, scale=1.0, clamp_min=None)
    np.testing.assert_allclose(raw.per_image, cos.numpy(), atol=1e-7)
    d = s.to_dict()
    assert d["convention"] == "100*cos, clamped at >= 0" and len(d["per_image"]) == 4
    with pytest.raises(ValueError, match="paired"):
        evaluator.cosine(imgs, texts[:3])


def test_image_similarity(evaluator):
    a, b = _images(3, seed=3), _images(2, seed=4)
    ea, eb = evaluator.embed_images(a).double(), evaluator.embed_images(b).double()
    assert evaluator.image_similarity(a, b) == pytest.approx(float((ea @ eb.T).mean()))
    assert evaluator.image_similarity(a, a, paired=True) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        evaluator.image_similarity(a, b, paired=True)


def _save(model, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_load_local_checkpoint_forms(tmp_path, parts):
    model, tokenizer = parts
    imgs = _images(2, seed=5)
    with torch.no_grad():
        ref = Evaluator(model, tokenizer, _eval_transform(model))
        ref_img, ref_txt = ref.embed_images(imgs), ref.embed_texts(["a star"])

    # 1) weights file with <stem>.json (plain open_clip model config) beside it
    _save(model, tmp_path / "tiny.safetensors")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CLIP))
    ev = load_evaluator(str(tmp_path / "tiny.safetensors"))
    torch.testing.assert_close(ev.embed_images(imgs), ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ev.embed_texts(["a star"]), ref_txt, atol=1e-5, rtol=1e-5)
    assert ev.describe()["embed_dim"] == 16 and ev.describe()["spec"].endswith("tiny.safetensors")

    # 2) a local directory in open_clip's own format (open_clip_config.json + weights)
    d = tmp_path / "dir"
    d.mkdir()
    _save(model, d / "open_clip_model.safetensors")
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    ev = load_evaluator(str(d))
    torch.testing.assert_close(ev.embed_images(imgs), ref_img, atol=1e-5, rtol=1e-5)

    # 3) a named architecture: "ARCH@weights", arch=..., and open_clip's "NAME/PRETRAINED" with a file
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "cs-tiny-test-arch.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "cfgs")
    bare = tmp_path / "bare.safetensors"
    _save(model, bare)
    for e in (
        load_evaluator(f"cs-tiny-test-arch@{bare}"),
        load_evaluator(str(bare), arch="cs-tiny-test-arch"),
        load_evaluator(str(bare), arch=TINY_CLIP),
        load_evaluator(f"cs-tiny-test-arch/{bare}"),
    ):
        torch.testing.assert_close(e.embed_texts(["a star"]), ref_txt, atol=1e-5, rtol=1e-5)


def test_load_errors(tmp_path, parts):
    model, _ = parts
    _save(model, tmp_path / "orphan.safetensors")
    with pytest.raises(FileNotFoundError, match="no architecture"):
        load_evaluator(str(tmp_path / "orphan.safetensors"))
    with pytest.raises(ValueError, match="unknown builtin"):
        load_evaluator("builtin:nope")
    with pytest.raises(ValueError, match="cannot read evaluator spec"):
        load_evaluator("not-a-spec")


def test_builtin_adapter(parts):
    """A builtin loader may return open_clip's (model, preprocess, tokenizer) triple in any order."""
    model, tokenizer = parts
    register_evaluator("cs-tiny-triple", lambda device="cpu": (model, _eval_transform(model), tokenizer))
    register_evaluator("cs-tiny-model", lambda device="cpu": model)
    a = load_evaluator("builtin:cs-tiny-triple")
    b = load_evaluator("builtin:cs-tiny-model")
    assert a.spec == "builtin:cs-tiny-triple"
    imgs = _images(2, seed=6)
    torch.testing.assert_close(a.embed_images(imgs), b.embed_images(imgs))
    torch.testing.assert_close(a.embed_texts(["x y"]), b.embed_texts(["x y"]))


def test_shapes_clip_loader_parts_are_adapted(tmp_path, parts):
    """What ShapesWorld's load_shapes_clip returns -- open_clip's (model, preprocess, tokenizer) from a
    local-dir -- becomes an Evaluator with the same embeddings as the model itself."""
    from conceptsmith.world import clip_train

    model, tokenizer = parts
    _save(model, tmp_path / "open_clip_model.safetensors")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    register_evaluator(
        "cs-tiny-world", lambda device="cpu": clip_train.load_shapes_clip(device, weights_dir=tmp_path)
    )
    ev = load_evaluator("builtin:cs-tiny-world")
    ref = Evaluator(model, tokenizer, _eval_transform(model))
    imgs = _images(2, seed=7)
    torch.testing.assert_close(ev.embed_images(imgs), ref.embed_images(imgs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        ev.embed_texts(["a red star"]), ref.embed_texts(["a red star"]), atol=1e-5, rtol=1e-5
    )
