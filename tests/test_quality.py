"""The quality group: CLIP score convention on hand-made embeddings, the Frechet distance against hand-computed
values on 2-D Gaussians, and FID / KID -- refused without a local Inception weights file (nothing downloaded),
computed by torchmetrics from one (random weights made here)."""

from __future__ import annotations

import json
import math
import urllib.request
from importlib.metadata import version

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from conceptsmith.evaluation.clip import ClipScore, Evaluator
from conceptsmith.evaluation.metrics import frechet_distance
from conceptsmith.evaluation.quality import (
    INCEPTION_ENV,
    InceptionFeatures,
    MissingInceptionWeights,
    QualitySpec,
    clip_score,
    clip_score_from_embeddings,
    fid,
    kid,
    quality,
)
from conceptsmith.registry import get_metric

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# CLIP score
# --------------------------------------------------------------------------------------------
class _HandMade(torch.nn.Module):
    """A 'CLIP' whose image embedding is the (red, green) of pixel (0, 0) and whose text embeddings are a table."""

    def __init__(self, texts: dict[str, list[float]]):
        super().__init__()
        self.names = list(texts)
        self.register_buffer("table", torch.tensor([texts[t] for t in self.names]))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2, 0, 0]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens[:, 0]]


def _hand_made_evaluator() -> Evaluator:
    c60, s60 = math.cos(math.pi / 3), math.sin(math.pi / 3)
    model = _HandMade({"sixty": [c60, s60], "opposite": [-1.0, 0.0], "diagonal": [2.0, 2.0]})
    return Evaluator(
        model=model,
        tokenizer=lambda texts: torch.tensor([[model.names.index(t)] for t in texts]),
        preprocess=lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1),
        spec="hand-made",
    )


def _solid(r: int, g: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (r, g, 0))


def test_clip_score_is_max_of_100_cos_and_0_averaged():
    """Known cosines 0.5, -1 and 1 score 50, 0 (clamped from -100) and 100: mean 50."""
    img = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 1.0]])  # normalized inside: scale does not matter
    txt = torch.tensor([[math.cos(math.pi / 3), math.sin(math.pi / 3)], [-2.0, 0.0], [5.0, 5.0]])
    score = clip_score_from_embeddings(img, txt, evaluator="by hand")
    assert score.per_image == pytest.approx((50.0, 0.0, 100.0)) and score.mean == pytest.approx(50.0)
    assert score.evaluator == "by hand" and score.to_dict()["convention"] == "100*cos, clamped at >= 0"
    raw = clip_score_from_embeddings(img, txt, clamp_min=None)
    assert raw.per_image == pytest.approx((50.0, -100.0, 100.0)) and raw.mean == pytest.approx(50.0 / 3)
    assert ClipScore.from_cosines(torch.tensor([0.3, -0.2]), "e").mean == pytest.approx(15.0)
    with pytest.raises(ValueError, match="paired one to one"):
        clip_score_from_embeddings(img, txt[:2])


def test_clip_score_through_the_evaluator_records_its_name():
    evaluator = _hand_made_evaluator()
    images = [_solid(255, 0), _solid(255, 0), _solid(255, 255)]
    score = clip_score(evaluator, images, ["sixty", "opposite", "diagonal"])
    assert score.per_image == pytest.approx((50.0, 0.0, 100.0), abs=1e-4) and score.evaluator == "hand-made"
    assert get_metric("clip_score").higher_is_better is True and get_metric("fid").higher_is_better is False


# --------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------
def _samples(mean, cov) -> torch.Tensor:
    """4 points whose sample mean and unbiased covariance (divisor n-1 = 3) are exactly ``mean`` and ``cov``:
    +-v1, +-v2 with 2 (v1 v1^T + v2 v2^T) / 3 = cov, i.e. v_i = sqrt(3/2) * the columns of cov^(1/2)."""
    w, q = np.linalg.eigh(np.asarray(cov, dtype=np.float64))
    root = q @ np.diag(np.sqrt(w)) @ q.T
    v = math.sqrt(1.5) * root.T
    return torch.tensor(np.stack([v[0], -v[0], v[1], -v[1]]) + np.asarray(mean, dtype=np.float64))


def test_frechet_distance_on_2d_gaussians_matches_hand_computed_values():
    a = _samples([0, 0], [[1, 0], [0, 4]])
    b = _samples([1, 2], [[4, 0], [0, 1]])
    # |mu_a - mu_b|^2 = 5; tr = 5 + 5; (S_a S_b)^1/2 = diag(2, 2): 5 + 10 - 2 * 4 = 7
    assert frechet_distance(a, b) == pytest.approx(7.0, abs=1e-9)
    c = _samples([0, 0], [[1, 0], [0, 1]])
    d = _samples([1, 2], [[2, 1], [1, 2]])
    # eigenvalues of [[2, 1], [1, 2]] are 3 and 1: 5 + 2 + 4 - 2 (sqrt(3) + 1) = 9 - 2 sqrt(3)
    assert frechet_distance(c, d) == pytest.approx(9 - 2 * math.sqrt(3), abs=1e-9)
    assert frechet_distance(d, d) == pytest.approx(0.0, abs=1e-9)


def test_quality_group_reuses_the_evaluator_for_clip_score_and_fd():
    evaluator = _hand_made_evaluator()
    images = [_solid(255, 0), _solid(255, 40), _solid(255, 255)]
    reference = [_solid(0, 255), _solid(60, 255), _solid(200, 90)]
    out = quality(evaluator, images, ["sixty", "opposite", "diagonal"], reference)
    assert set(out) == {"clip_score", "fd_clip"}
    assert out["clip_score"]["evaluator"] == "hand-made" and out["clip_score"]["scale"] == 100.0
    expected = frechet_distance(evaluator.embed_images(images), evaluator.embed_images(reference))
    assert out["fd_clip"] == pytest.approx(expected) and out["fd_clip"] > 0.1


# --------------------------------------------------------------------------------------------
# FID / KID
# --------------------------------------------------------------------------------------------
@pytest.fixture
def no_downloads(monkeypatch):
    """Every way these libraries fetch weights raises; the env var is unset."""
    import torch.hub
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(fidelity, "load_state_dict_from_url", refuse)


def _images(n: int, seed: int, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_fid_and_kid_without_weights_raise_a_clear_error_and_download_nothing(no_downloads, tmp_path):
    a, b = _images(2, 0), _images(2, 1)
    for metric in (fid, kid):
        with pytest.raises(MissingInceptionWeights, match=f"no Inception weights file given.*{INCEPTION_ENV}=PATH") as err:
            metric(a, b)
        assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
        assert "quality: {inception_weights: PATH}" in str(err.value) and "nothing is downloaded" in str(err.value)
    with pytest.raises(MissingInceptionWeights, match="no Inception weights"):
        quality(_hand_made_evaluator(), [_solid(1, 2)] * 2, ["sixty"] * 2, [_solid(3, 4)] * 2, kid=True)
    missing = tmp_path / "inception.pth"
    with pytest.raises(MissingInceptionWeights, match=f"'{missing}' not found"):
        fid(a, b, inception_weights=missing)
    with pytest.raises(ValidationError, match="no Inception weights file given"):
        QualitySpec(fid=True)
    assert QualitySpec().compute(a, b) == {} and QualitySpec().settings() == {"fid": False, "kid": False}


def test_a_bench_asking_for_fid_without_weights_fails_at_load_with_one_line(no_downloads, tmp_path):
    from typer.testing import CliRunner

    from conceptsmith.cli import app

    bench = tmp_path / "b.yaml"
    bench.write_text(
        "name: x\nmodel: builtin:shapes\nevaluator: e\nseeds: [0]\ntasks: [{name: t, erase: [a]}]\nquality: {fid: true}\n"
    )
    result = CliRunner().invoke(app, ["bench", str(bench), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "error:" in result.output and INCEPTION_ENV in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torch-fidelity's FID Inception with random weights (He-normal convolutions), saved as .safetensors."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    from safetensors.torch import save_file
    from torchmetrics.image.fid import NoTrainInceptionV3

    with pytest.MonkeyPatch.context() as patch:  # build the network without its weights
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        net = NoTrainInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_fid_and_kid_from_a_local_weights_file(no_downloads, inception_file, monkeypatch):
    a, b = _images(3, 0), _images(2, 1, size=24)  # sizes differ: batches hold one size each
    features = InceptionFeatures(inception_file)
    fa, fb = features(a), features(b)
    assert fa.shape == (3, 2048) and fb.shape == (2, 2048) and fa.dtype == torch.float64 and fa.abs().sum() > 0
    result = fid(a, b, features=features)
    assert result["n_generated"] == 3 and result["n_reference"] == 2
    assert result["value"] == pytest.approx(frechet_distance(fa, fb), rel=1e-4) and result["value"] > 0
    assert fid(a, a, features=features)["value"] == pytest.approx(0.0, abs=1e-5 * float(fa.var(0).sum()))  # eigvals noise
    first = kid(a, b, features=features, subsets=5)
    assert first == kid(a, b, features=features, subsets=5) and first["subset_size"] == 2 and math.isfinite(first["mean"])
    monkeypatch.setenv(INCEPTION_ENV, str(inception_file))  # the env var route, without a features object
    assert InceptionFeatures().path == inception_file
    settings = QualitySpec(fid=True, kid=True).settings()
    assert settings["inception_weights"] == str(inception_file) and len(settings["sha256"]) == 64
    assert settings["fid"] is True and settings["kid"] is True
    assert settings["implementations"]["fid"] == f"torchmetrics {version('torchmetrics')} FrechetInceptionDistance"
    json.dumps(settings)


def test_weights_that_are_not_the_fid_inception_are_refused(no_downloads, tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="does not hold the FID Inception weights"):
        fid(_images(2, 0), _images(2, 1), inception_weights=wrong)


def test_a_bench_with_quality_fid_and_kid_records_them(no_downloads, inception_file, evaluator_file, tmp_path):
    from conceptsmith.evaluation.engine import run_bench

    bench = tmp_path / "q.yaml"
    bench.write_text(
        f"name: q\nmodel: builtin:tiny-test\nevaluator: {evaluator_file}\nseeds: [0, 1]\n"
        "templates: ['a photo of {}']\neval_templates: ['a photo of {}']\nneutral_prompts: ['a photo of a room']\n"
        "generation: {num_inference_steps: 2, batch_size: 4}\n"
        "tasks: [{name: t, erase: [a cat], preserve: [a dog]}]\n"
        f"quality: {{fid: true, kid: true, kid_subsets: 3, inception_weights: '{inception_file}'}}\n"
    )
    run_bench(bench, tmp_path / "out", progress=False, report=False)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["quality"]["fid"] is True and results["quality"]["inception_weights"] == str(inception_file)
    assert len(results["quality"]["sha256"]) == 64 and results["quality"]["kid"] is True
    assert "KernelInceptionDistance" in results["quality"]["implementations"]["kid"]
    (row,) = results["rows"]  # the unedited model against itself: 4 preserve + neutral images on each side
    assert row["metrics"]["fid"]["n_generated"] == 4 and abs(row["metrics"]["fid"]["value"]) < 1e-3
    assert row["metrics"]["kid"]["subset_size"] == 4 and row["metrics"]["kid"]["subsets"] == 3
