"""Fréchet distance, PSNR and SSIM against closed forms and torchmetrics; the classifier yardstick."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.checkpoint import CheckpointError, export_safetensors
from ldm.metrics.classifier import (
    DEFAULT_CLASSIFIER_PATH,
    FMNISTClassifier,
    classifier_outputs,
    conditional_accuracy,
    load_classifier,
)
from ldm.metrics.first_stage_eval import codebook_stats
from ldm.metrics.frechet import feature_statistics, frechet_distance
from ldm.metrics.image import psnr, ssim
from tests.data.test_fmnist import needs_data


def test_frechet_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_of_a_set_with_itself_is_zero_and_matches_torchmetrics():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g)
    b = torch.randn(500, 8, generator=g) * 1.5 + 0.3
    mu, s = feature_statistics(a)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-6)
    ours = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    tm = pytest.importorskip("torchmetrics.image.fid")
    ref = tm._compute_fid(a.double().mean(0), torch.cov(a.double().T), b.double().mean(0), torch.cov(b.double().T))
    assert ours == pytest.approx(float(ref), rel=1e-5)


def test_psnr_closed_form_and_ssim_against_torchmetrics():
    x = torch.zeros(2, 1, 16, 16)
    y = x + 0.1  # mse 0.01 on a range of 2: 10 log10(4 / 0.01)
    torch.testing.assert_close(psnr(x, y), torch.full((2,), 10 * np.log10(400.0), dtype=torch.float32))
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 32, 32, generator=g) * 2 - 1
    b = (a + 0.2 * torch.randn(3, 1, 32, 32, generator=g)).clamp(-1, 1)
    assert torch.allclose(ssim(a, a), torch.ones(3))
    tmf = pytest.importorskip("torchmetrics.functional.image")
    ref = tmf.structural_similarity_index_measure(b, a, data_range=2.0, reduction="none")
    # torchmetrics also averages the border windows of a reflect-padded image; ours keeps the
    # valid windows only (Wang et al.'s reference code), so pad by the window radius to compare
    pad = lambda t: torch.nn.functional.pad(t, (5, 5, 5, 5), mode="reflect")  # noqa: E731
    torch.testing.assert_close(ssim(pad(b), pad(a)), ref, atol=1e-5, rtol=1e-5)


def test_codebook_stats():
    stats = codebook_stats(torch.tensor([[0, 0], [1, 2]]), n_embed=8)
    assert stats["codebook_usage"] == 3 / 8
    p = torch.tensor([0.5, 0.25, 0.25])
    assert stats["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))


def test_classifier_round_trip_and_errors(tmp_path):
    net = FMNISTClassifier().eval()
    export_safetensors(net.state_dict(), tmp_path / "c.safetensors")
    loaded = load_classifier(tmp_path / "c.safetensors")
    x = torch.rand(2, 1, 28, 28) * 2 - 1  # 28x28 is padded to 32x32
    torch.testing.assert_close(loaded.features(x), net.features(x))
    assert loaded.features(x).shape == (2, 128) and loaded(x).shape == (2, 10)
    with pytest.raises(FileNotFoundError, match="scripts/train_classifier.py"):
        load_classifier(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="grayscale or RGB"):
        net(torch.zeros(1, 2, 32, 32))
    export_safetensors({"x": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="missing key"):
        load_classifier(tmp_path / "bad.safetensors")


@needs_data
def test_committed_classifier_is_accurate():
    if not DEFAULT_CLASSIFIER_PATH.exists():
        pytest.skip("data/fmnist_classifier.safetensors not trained")
    from ldm.data.fmnist import FashionMNIST

    test = FashionMNIST("test", limit=1000)
    x = torch.stack([test[i]["image"] for i in range(1000)])
    y = torch.from_numpy(test.labels.astype("int64"))
    assert conditional_accuracy(load_classifier(), x, y) > 0.9


def test_prior_evaluation_helpers():
    from ldm.metrics.prior_eval import generate, sample_scores, sweep

    class FakePrior:
        device = torch.device("cpu")

        def sample(self, n, cond=None, generator=None, temperature=1.0):
            return torch.rand(n, 1, 32, 32, generator=generator) * 2 - 1

    images, labels = generate(FakePrior(), 25, num_classes=10, batch_size=10, progress=False, temperature=0.5)
    assert images.shape == (25, 1, 32, 32) and labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    again, _ = generate(FakePrior(), 25, num_classes=10, batch_size=10, progress=False)
    assert torch.equal(images, again)  # seeded per batch
    assert not torch.equal(images[:10], images[10:20])  # with a different seed for each batch
    torch.manual_seed(0)
    net = FMNISTClassifier().eval()
    with torch.no_grad():
        feats, preds = net.features(images), net(images).argmax(1)  # (25, 128), (25,)
    # against statistics of the same features shifted by 0.5 in each of the 128 dimensions the FD is
    # 128 * 0.5^2 (same covariance); against their own statistics it is zero. The accuracy counts the
    # classifier's agreement with the labels given.
    ref = feature_statistics(feats + 0.5)
    scores = sample_scores(images, labels, net, ref)
    assert set(scores) == {"FD_fmnist", "conditional_accuracy"}
    assert scores["FD_fmnist"] == pytest.approx(128 * 0.25, rel=1e-3)
    assert sample_scores(images, preds, net, feature_statistics(feats))["FD_fmnist"] == pytest.approx(0, abs=1e-3)
    assert sample_scores(images, preds, net, ref)["conditional_accuracy"] == 1.0
    assert sample_scores(images, (preds + 1) % 10, net, ref)["conditional_accuracy"] == 0.0
    assert sample_scores(images, labels, net, ref)["conditional_accuracy"] == float((preds == labels).float().mean())
    assert "conditional_accuracy" not in sample_scores(images, None, net, ref)
    assert sweep({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]


def test_classifier_runs_in_float32_inside_bf16_autocast():
    torch.manual_seed(0)
    net = FMNISTClassifier().eval()
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats, preds = classifier_outputs(net, x, batch_size=4)
    logits = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16  # autocast is on
        feats_ac, preds_ac = classifier_outputs(net, x, batch_size=4)
        logits_ac = net(x)
        features_ac = net.features(x)
    assert feats_ac.dtype == logits_ac.dtype == torch.float32
    assert torch.equal(feats_ac, feats) and torch.equal(preds_ac, preds)
    assert torch.equal(logits_ac, logits) and torch.equal(features_ac, feats)
    torch.testing.assert_close(classifier_outputs(net, x.bfloat16())[0],
                               classifier_outputs(net, x.bfloat16().float())[0], rtol=0, atol=0)


def test_classifier_input_is_prepared_in_one_place():
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prepare = FMNISTClassifier.prepare
    assert torch.equal(prepare(x), x)
    torch.testing.assert_close(prepare(x.expand(2, 3, 32, 32)), x)  # RGB with equal channels is that gray
    raw = x[..., 2:30, 2:30]
    assert torch.equal(prepare(raw)[..., 2:30, 2:30], raw) and torch.all(prepare(raw)[..., :2, :] == -1)
    small = prepare(torch.full((2, 1, 16, 16), 0.5))
    assert small.shape == (2, 1, 32, 32) and torch.allclose(small, torch.full_like(small, 0.5))
    assert prepare(torch.zeros(1, 3, 64, 48)).shape == (1, 1, 32, 32)
