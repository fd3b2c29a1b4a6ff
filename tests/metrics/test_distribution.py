"""KID, IS, precision / recall / density / coverage against torch-fidelity and `prdc` on the same features,
and the classifier extractor against torch-fidelity's own pipeline; uint8 quantisation; the Inception path
up to its weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.metrics.classifier import DEFAULT_CLASSIFIER_PATH, load_classifier
from ldm.metrics.distribution import (
    Reference,
    distribution_scores,
    inception_score,
    kid,
    knn_radii,
    nearest,
    prdc,
)
from ldm.metrics.features import ClassifierFeatures, from_uint8, register_classifier_with_fidelity, to_uint8


def feature_sets(n_real: int = 120, n_fake: int = 100, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n_real, dim, generator=g), torch.randn(n_fake, dim, generator=g) * 1.3 + 0.4


def test_kid_equals_torch_fidelity_on_whole_sets_and_vanishes_on_one_distribution():
    metric_kid = pytest.importorskip("torch_fidelity.metric_kid")
    real, fake = feature_sets(100, 100)
    # subsets as large as the sets hold every row (in another order): the MMD is the same for any draw
    ours, spread = kid(real, fake, subsets=3, subset_size=100)
    ref = metric_kid.kid_features_to_metric(fake, real, kid_subsets=3, kid_subset_size=100, verbose=False)
    assert ours == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-6) and spread < 1e-12
    # the unbiased estimate between two draws of one distribution is about zero, and KID grows with the shift
    same, _ = kid(real, torch.randn(100, 8, generator=torch.Generator().manual_seed(1)), subsets=10, subset_size=50)
    assert abs(same) < 0.2 * ours
    # a linear kernel gives the closed form |mean x - mean y|^2 less the diagonal terms
    lin, _ = kid(real, fake, subsets=1, subset_size=100, degree=1, gamma=1.0, coef0=0.0)
    x, y = real.double(), fake.double()
    m = 100
    expected = ((x.sum(0).square().sum() - x.square().sum()) / (m * (m - 1))
                + (y.sum(0).square().sum() - y.square().sum()) / (m * (m - 1)) - 2 * x.mean(0) @ y.mean(0))
    assert lin == pytest.approx(float(expected), rel=1e-9)


def test_inception_score_equals_torch_fidelity_and_its_closed_forms():
    metric_isc = pytest.importorskip("torch_fidelity.metric_isc")
    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(0)) * 3
    ours = inception_score(logits, splits=4)
    ref = metric_isc.isc_features_to_metric(logits, splits=4, shuffle=False)
    assert ours[0] == pytest.approx(ref["inception_score_mean"], rel=1e-9)
    assert ours[1] == pytest.approx(ref["inception_score_std"], rel=1e-6, abs=1e-12)
    assert inception_score(torch.zeros(20, 10), splits=2)[0] == pytest.approx(1.0)  # no class preferred: 1
    confident = torch.eye(10).repeat(4, 1) * 100  # every class equally often, each sample sure: K
    assert inception_score(confident, splits=2)[0] == pytest.approx(10.0, rel=1e-6)


def test_prdc_equals_the_prdc_package_and_precision_recall_torch_fidelity():
    prdc_pkg = pytest.importorskip("prdc")
    metric_prc = pytest.importorskip("torch_fidelity.metric_prc")
    real, fake = feature_sets()
    ours = prdc(real, fake, k=5)
    ref = prdc_pkg.compute_prdc(real.double().numpy(), fake.double().numpy(), nearest_k=5)
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(float(ref[key]), abs=1e-12), key
    tf = metric_prc.prc_features_to_metric(fake, real, prc_neighborhood=5, prc_batch_size=64, save_cpu_ram=True,
                                           verbose=False)
    assert (ours["precision"], ours["recall"]) == pytest.approx((tf["precision"], tf["recall"]))
    # reference radii computed once give the same numbers; a set against itself is fully covered
    assert prdc(real, fake, 5, knn_radii(real, 5)) == ours
    assert prdc(real, real, 5)["coverage"] == 1.0 and prdc(real, real, 5)["precision"] == 1.0
    # a reference scores the manifold scores against its first rows, as many as there are samples
    ref = Reference.of(real, 5, manifold_rows=len(fake))
    scores = distribution_scores(fake, torch.zeros(len(fake), 10), ref, "FD", "", kid_subsets=1)
    assert {k: scores[k] for k in ours} == prdc(real[: len(fake)], fake, 5) and len(ref.features) == len(real)


def test_nearest_excludes_itself_when_asked():
    x = torch.tensor([[0.0], [1.0], [3.0]])
    d, i = nearest(x, x, 1, exclude_self=True, chunk=2)
    assert i[:, 0].tolist() == [1, 0, 1] and d[:, 0].tolist() == [1.0, 1.0, 2.0]
    assert nearest(x, x, 1)[0].sum() == 0


def test_uint8_quantisation_round_trips_eight_bit_data():
    v = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    data = torch.from_numpy(v.numpy().astype(np.float32) / 127.5 - 1.0)  # as the Fashion-MNIST loader does
    assert torch.equal(to_uint8(data), v) and torch.equal(from_uint8(v), data)
    assert to_uint8(torch.tensor([-3.0, 3.0, 0.0])).tolist() == [0, 255, 128]  # clamped; 127.5 rounds to even


@pytest.fixture(scope="module")
def classifier():
    """The committed classifier: trained features, large enough for torch-fidelity's float32 KID."""
    if not DEFAULT_CLASSIFIER_PATH.exists():
        pytest.skip("data/fmnist_classifier.safetensors not trained")
    return load_classifier(), DEFAULT_CLASSIFIER_PATH


def test_classifier_scores_equal_torch_fidelity_with_the_classifier_registered(classifier):
    """torch-fidelity's own pipeline (its data loading, feature extraction and FID/KID/IS/PR code) on the
    project's classifier is the oracle for the extractor and the scores together."""
    torch_fidelity = pytest.importorskip("torch_fidelity")
    net, path = classifier
    g = torch.Generator().manual_seed(0)
    real = to_uint8(torch.rand(150, 1, 28, 28, generator=g) * 2 - 1)  # as many as samples: KID's subsets hold all
    fake = to_uint8(torch.rand(150, 1, 28, 28, generator=g) - 1)  # darker: far enough for float32 KID
    name = register_classifier_with_fidelity()
    assert register_classifier_with_fidelity() == name  # registered once

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    ref = torch_fidelity.calculate_metrics(
        input1=Images(fake), input2=Images(real), feature_extractor=name, feature_extractor_weights_path=str(path),
        fid=True, kid=True, isc=True, prc=True, kid_subsets=2, kid_subset_size=150, isc_splits=5,
        samples_shuffle=False, prc_neighborhood=5, cuda=False, save_cpu_ram=True, cache=False, verbose=False,
        batch_size=32)
    extractor = ClassifierFeatures(net)
    fr, ff = extractor(real), extractor(fake)
    ours = distribution_scores(ff["features"], ff["logits"], Reference.of(fr["features"]), extractor.fd_key,
                               extractor.suffix, kid_subsets=2)
    assert ours["FD_fmnist"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)
    assert ours["KID_fmnist"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-4)
    assert ours["precision"] == pytest.approx(ref["precision"]) and ours["recall"] == pytest.approx(ref["recall"])
    assert inception_score(ff["logits"], 5)[0] == pytest.approx(ref["inception_score_mean"], rel=1e-5)
    assert set(ours) >= {"KID_fmnist_std", "IS_fmnist", "IS_fmnist_std", "density", "coverage"}


def test_inception_refuses_in_one_sentence_when_its_weights_cannot_be_had(monkeypatch, tmp_path):
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from ldm.metrics.features import InceptionFeatures

    def offline(*args, **kwargs):
        raise OSError("no network")  # what urllib raises without one (URLError is an OSError)

    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError, match=r"cannot load the Inception weights from https://.*--features fmnist"):
        InceptionFeatures()
    (tmp_path / "bad.pth").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="bad.pth"):
        InceptionFeatures(tmp_path / "bad.pth")


@pytest.mark.slow
def test_inception_features_of_grayscale_images_with_local_weights(monkeypatch, tmp_path):
    """With random weights in the format torch-fidelity loads (real ones download on a user's machine)."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from ldm.metrics.features import InceptionFeatures

    with monkeypatch.context() as m:
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    extractor = InceptionFeatures(tmp_path / "inception.pth")
    out = extractor(to_uint8(torch.rand(2, 1, 28, 28) * 2 - 1))
    assert out["features"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert torch.isfinite(out["features"]).all() and extractor.fd_key == "FID"
