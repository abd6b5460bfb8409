"""Metric formulas against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conceptsmith.evaluation.clip import Classification
from conceptsmith.evaluation.metrics import (
    Accuracy,
    acc_e,
    accuracy_from_probs,
    both_concepts_present_rate,
    classification_accuracy,
    clip_i,
    clip_t,
    erasure_summary,
    fd_clip,
    frechet_distance,
    frechet_distance_gaussians,
    gaussian_fit,
    harmonic_concept,
    harmonic_overall,
    paired_specificity,
)


def test_accuracy_both_conventions():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]])
    acc = accuracy_from_probs(probs, [0, 0, 2, 1])
    assert acc.argmax == pytest.approx(2 / 4)  # rows 0 and 2 are top-1 hits
    assert acc.prob == pytest.approx((0.7 + 0.4 + 0.4 + 0.1) / 4)
    assert acc.n == 4 and acc.get("prob") == acc.prob and acc.get("argmax") == acc.argmax
    with pytest.raises(ValueError):
        acc.get("top5")
    with pytest.raises(ValueError):
        accuracy_from_probs(probs, [0, 1])
    assert math.isnan(accuracy_from_probs(torch.empty(0, 3), []).argmax)


def test_classification_accuracy_by_name():
    probs = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    c = Classification(("circle", "star"), ("{}",), probs.log(), probs, 1.0)
    acc = classification_accuracy(c, "circle")
    assert (acc.argmax, acc.prob) == (pytest.approx(0.5), pytest.approx(0.4))
    acc = classification_accuracy(c, ["circle", "star"])
    assert (acc.argmax, acc.prob) == (pytest.approx(1.0), pytest.approx(0.7))
    with pytest.raises(KeyError):
        classification_accuracy(c, "square")


def test_harmonic_means_hand_values():
    # H_o = 3 / (1/0.8 + 1/0.9 + 1/0.6) = 3 / 4.027777...; H_c = 2 / (1/0.8 + 1/0.9) = 2 / 2.361111...
    assert harmonic_overall(0.2, 0.9, 0.4) == pytest.approx(3 / (1.25 + 10 / 9 + 5 / 3))
    assert harmonic_overall(0.2, 0.9, 0.4) == pytest.approx(0.7448275862068966)
    assert harmonic_concept(0.2, 0.9) == pytest.approx(0.8470588235294118)
    assert harmonic_overall(0.0, 1.0, 0.0) == pytest.approx(1.0)
    # limits: a term of 0 makes the harmonic mean 0
    assert harmonic_overall(1.0, 0.9, 0.1) == 0.0 and harmonic_concept(0.1, 0.0) == 0.0
    with pytest.raises(ValueError):
        harmonic_concept(13.5, 98.4)  # percentages are rejected: the functions take fractions
    # from Accuracy objects, per convention
    e, s, g = Accuracy(0.2, 0.3, 10), Accuracy(0.9, 0.8, 10), Accuracy(0.4, 0.5, 10)
    assert harmonic_overall(e, s, g, mode="prob") == pytest.approx(3 / (1 / 0.7 + 1 / 0.8 + 1 / 0.5))
    summary = erasure_summary(e, s, g)
    assert summary["argmax"]["h_o"] == pytest.approx(0.7448275862068966)
    assert summary["prob"]["h_c"] == pytest.approx(2 / (1 / 0.7 + 1 / 0.8))
    assert "MACE" in summary["prob"]["convention"] and summary["n"]["acc_g"] == 10
    assert "h_o" not in erasure_summary(e, s)["argmax"]


def test_fd_diagonal_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([4.0, 1.0, 0.25]), torch.tensor([1.0, 9.0, 0.25])
    # ||mu1-mu2||^2 + sum (sqrt a - sqrt b)^2 = (1 + 0 + 4) + (1 + 4 + 0) = 10
    fd = frechet_distance_gaussians(mu1, torch.diag(a), mu2, torch.diag(b))
    assert fd == pytest.approx(10.0, abs=1e-10)
    # the same Gaussians in a rotated basis: invariant
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    fd_rot = frechet_distance_gaussians(
        q @ mu1.double(), q @ torch.diag(a).double() @ q.T, q @ mu2.double(), q @ torch.diag(b).double() @ q.T
    )
    assert fd_rot == pytest.approx(10.0, abs=1e-9)


def test_fd_general_against_eigenvalues_of_product():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    y = (
        torch.randn(40, 6, generator=g, dtype=torch.float64)
        @ torch.randn(6, 6, generator=g, dtype=torch.float64)
        + 0.3
    )
    mu1, s1 = gaussian_fit(x)
    mu2, s2 = gaussian_fit(y)
    torch.testing.assert_close(s1, torch.from_numpy(np.cov(x.numpy(), rowvar=False)))
    # tr sqrt(S1 S2) = sum sqrt(eigenvalues of S1 S2) (real, non-negative for PSD S1, S2)
    cross = torch.linalg.eigvals(s1 @ s2).real.clamp_min(0).sqrt().sum()
    expected = float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(x, x + 2.0) == pytest.approx(6 * 4.0, rel=1e-9)  # pure mean shift
    # rank-deficient covariances (n < D) stay finite and non-negative
    assert 0.0 <= frechet_distance(x[:3], y[:4]) < math.inf
    with pytest.raises(ValueError):
        gaussian_fit(x[:1])


class _StubEvaluator:
    """Embeddings given directly: an 'image' is an index into a fixed embedding table."""

    def __init__(self, image_emb, text_emb=None, probs=None, classnames=()):
        self.image_emb = torch.nn.functional.normalize(
            torch.as_tensor(image_emb, dtype=torch.float32), dim=-1
        )
        self.text_emb = text_emb
        self.probs = probs
        self.classnames = tuple(classnames)

    def embed_images(self, images):
        return self.image_emb[list(images)]

    def cosine(self, images, texts):
        t = torch.nn.functional.normalize(torch.stack([self.text_emb[s] for s in texts]).float(), dim=-1)
        return (self.embed_images(images) * t).sum(-1)

    def image_similarity(self, a, b, paired=False):
        from conceptsmith.evaluation.clip import Evaluator

        return Evaluator.image_similarity(self, a, b, paired=paired)

    def classify(self, images, classnames, templates=None):
        p = self.probs[list(images)]
        return Classification(tuple(classnames), ("{}",), p.log(), p, 1.0)


def test_specificity_clip_i_clip_t_and_fd_clip():
    emb = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]
    ev = _StubEvaluator(
        emb, text_emb={"a circle": torch.tensor([1.0, 0.0]), "a star": torch.tensor([0.0, 2.0])}
    )
    s = 1 / math.sqrt(2)
    # paired: cos(e0, e2) = s, cos(e1, e3) = -s -> mean 0
    assert paired_specificity(ev, [0, 1], [2, 3]) == pytest.approx(0.0, abs=1e-7)
    assert paired_specificity(ev, [0, 2], [0, 2]) == pytest.approx(1.0)
    # all pairs of {e0, e1} x {e2}: (s + s) / 2
    assert clip_i(ev, [0, 1], [2]) == pytest.approx(s)
    # CLIP-T strips the modifier token before embedding the prompt
    assert clip_t(ev, [0, 2], ["a <new1> circle", "a star"], strip_tokens=["<new1>"]) == pytest.approx(
        (1 + s) / 2
    )
    assert fd_clip(ev, [0, 1, 2, 3], [0, 1, 2, 3]) == pytest.approx(0.0, abs=1e-9)
    assert fd_clip(ev, [0, 1], [2, 3]) > 0


def test_both_concepts_present_and_acc_wrappers():
    classes = ["circle", "star", "square", "heart"]
    probs = torch.tensor(
        [
            [0.45, 0.40, 0.10, 0.05],  # circle+star -> both
            [0.50, 0.10, 0.35, 0.05],  # circle+square -> not the pair
            [0.31, 0.35, 0.05, 0.29],  # star+circle
            [0.05, 0.05, 0.45, 0.45],  # square+heart
        ]
    )
    ev = _StubEvaluator(torch.eye(4), probs=probs, classnames=classes)
    assert both_concepts_present_rate(ev, [0, 1, 2, 3], ("circle", "star"), classes) == pytest.approx(2 / 4)
    pairs = [("circle", "star"), ("circle", "square"), ("heart", "star"), ("heart", "square")]
    assert both_concepts_present_rate(ev, [0, 1, 2, 3], pairs, classes) == pytest.approx(3 / 4)
    acc = acc_e(ev, [0, 1, 2], "circle", classes)
    assert acc.argmax == pytest.approx(2 / 3) and acc.prob == pytest.approx((0.45 + 0.5 + 0.31) / 3)


def test_bench_metrics_are_registered_specs_with_their_direction():
    import conceptsmith.evaluation.bench_metrics as bench_metrics
    from conceptsmith.registry import get_metric

    for name in (*bench_metrics.ERASURE_METRICS, *bench_metrics.CUSTOM_METRICS):
        spec = get_metric(name)
        assert spec.name == name and callable(spec.compute) and spec.description and spec.aggregation in ("mean", "none")
    assert get_metric("acc_e").higher_is_better is False and get_metric("acc_s").higher_is_better is True
    assert get_metric("fd_clip").higher_is_better is False and get_metric("h_o").higher_is_better is True
    assert get_metric("clip_i").sections == ("single",) and "composition" in get_metric("clip_t").sections
