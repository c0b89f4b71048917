import math

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusion_core import metrics
from diffusion_core.nets import Classifier


def _rng(seed=0):
    return torch.Generator().manual_seed(seed)


def _random_spd(d, seed):
    a = torch.randn(d, d, generator=_rng(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def _random_orthogonal(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_rng(seed), dtype=torch.float64))
    return q


# ----------------------------------------------------------------------------- Frechet distance

def test_feature_stats_match_numpy():
    x = torch.randn(200, 5, generator=_rng(1))
    mu, cov = metrics.feature_stats(x)
    assert mu.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), x.double().numpy().mean(0), atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.double().numpy(), rowvar=False), atol=1e-12)


def test_identical_sets_have_zero_distance():
    x = torch.randn(500, 16, generator=_rng(2)) * 3 + 1
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert metrics.frechet_distance(x.numpy(), x.clone()) == pytest.approx(0.0, abs=1e-8)


def test_singular_covariance_against_itself_is_zero():
    # Fewer samples than dimensions: the covariance is rank deficient.
    x = torch.randn(10, 32, generator=_rng(3))
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_diagonal_gaussians_exact_stats():
    f64 = dict(dtype=torch.float64)
    mu1 = torch.tensor([0.0, 1.0, -2.0, 0.5], **f64)
    mu2 = torch.tensor([1.0, 1.0, 0.0, 0.5], **f64)
    s1 = torch.tensor([1.0, 2.0, 0.5, 1.0], **f64)
    s2 = torch.tensor([2.0, 2.0, 1.5, 0.1], **f64)
    expected = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())  # 5 + 1 + 0 + 1 + 0.81
    got = metrics.frechet_from_stats(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2))
    assert got == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(7.81)


def test_diagonal_gaussians_from_samples():
    n = 20000
    mu1, s1 = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 1.0])
    mu2, s2 = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([2.0, 0.5, 1.0])
    a = mu1 + s1 * torch.randn(n, 3, generator=_rng(4), dtype=torch.float64)
    b = mu2 + s2 * torch.randn(n, 3, generator=_rng(5), dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())  # 6.25
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=0.03)


def test_rotated_diagonal_gaussians():
    # Commuting covariances Q diag(s^2) Q^T: the rotation does not change the distance.
    d = 6
    q = _random_orthogonal(d, 6)
    s1 = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    s2 = torch.linspace(3.0, 0.1, d, dtype=torch.float64)
    mu1 = torch.randn(d, generator=_rng(7), dtype=torch.float64)
    mu2 = torch.randn(d, generator=_rng(8), dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    got = metrics.frechet_from_stats(mu1 @ q.T, q @ torch.diag(s1**2) @ q.T, mu2 @ q.T, q @ torch.diag(s2**2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("d", [2, 16, 64])
def test_general_covariances_match_scipy_sqrtm(d):
    cov1, cov2 = _random_spd(d, 10 + d), _random_spd(d, 20 + d)
    mu1 = torch.randn(d, generator=_rng(30 + d), dtype=torch.float64)
    mu2 = torch.randn(d, generator=_rng(40 + d), dtype=torch.float64)
    c1, c2 = cov1.numpy(), cov2.numpy()
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    expected = float(((mu1 - mu2) ** 2).sum()) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)
    got = metrics.frechet_from_stats(mu1, cov1, mu2, cov2)
    assert got == pytest.approx(expected, rel=1e-8)
    # Symmetric in its arguments.
    assert metrics.frechet_from_stats(mu2, cov2, mu1, cov1) == pytest.approx(got, rel=1e-8)


def test_frechet_distance_matches_stats_path():
    a = torch.randn(300, 8, generator=_rng(50))
    b = torch.randn(400, 8, generator=_rng(51)) @ _random_spd(8, 52).float() + 0.3
    mu_a, cov_a = metrics.feature_stats(a)
    mu_b, cov_b = metrics.feature_stats(b)
    expected_np = (
        float(((mu_a - mu_b) ** 2).sum())
        + np.trace(cov_a.numpy()) + np.trace(cov_b.numpy())
        - 2 * np.trace(scipy.linalg.sqrtm(cov_a.numpy() @ cov_b.numpy()).real)
    )
    assert metrics.frechet_distance(a, b) == pytest.approx(expected_np, rel=1e-8)


def test_frechet_shape_errors():
    with pytest.raises(ValueError):
        metrics.frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError):
        metrics.frechet_distance(torch.randn(1, 3), torch.randn(10, 3))
    with pytest.raises(ValueError):
        metrics.frechet_from_stats(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(2))


# ----------------------------------------------------------------------------- precision / recall

def test_knn_radii_excludes_self():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(metrics.knn_radii(x, k=1).numpy(), [1.0, 1.0, 2.0, 4.0])
    np.testing.assert_allclose(metrics.knn_radii(x, k=2, batch_size=3).numpy(), [3.0, 2.0, 3.0, 6.0])
    with pytest.raises(ValueError):
        metrics.knn_radii(x, k=4)


def test_set_against_itself_has_precision_and_recall_one():
    x = torch.randn(600, 8, generator=_rng(60))
    assert metrics.precision_recall(x, x, k=3) == (1.0, 1.0)
    assert metrics.precision_recall(x, x.clone(), k=3, dtype=torch.float32, batch_size=128) == (1.0, 1.0)


def test_far_apart_sets_have_zero_precision_and_recall():
    real = torch.randn(300, 4, generator=_rng(61))
    fake = torch.randn(200, 4, generator=_rng(62)) + 100.0
    assert metrics.precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_tight_cluster_inside_real_has_high_precision_low_recall():
    # The cluster sits on a real point, far inside that point's k-NN ball (radius ~0.1).
    real = torch.randn(1000, 2, generator=_rng(63))
    fake = real[0] + 0.001 * torch.randn(500, 2, generator=_rng(64))
    assert float(metrics.knn_radii(real, k=3)[0]) > 0.01
    precision, recall = metrics.precision_recall(real, fake, k=3)
    assert precision == 1.0
    assert recall < 0.05


def test_one_of_two_modes_gives_half_recall():
    centers = torch.tensor([[-50.0, 0.0], [50.0, 0.0]])
    real = torch.cat([torch.randn(400, 2, generator=_rng(65)) + centers[0], torch.randn(400, 2, generator=_rng(66)) + centers[1]])
    fake = torch.randn(400, 2, generator=_rng(67)) + centers[0]
    precision, recall = metrics.precision_recall(real, fake, k=5)
    assert precision > 0.95
    assert 0.45 < recall <= 0.5


def test_precision_recall_independent_of_batch_size():
    real = torch.randn(257, 5, generator=_rng(68))
    fake = 1.3 * torch.randn(190, 5, generator=_rng(69)) + 0.5
    ref = metrics.precision_recall(real, fake, k=3, batch_size=1000)
    assert metrics.precision_recall(real, fake, k=3, batch_size=7) == ref
    assert 0.0 < ref[0] < 1.0 and 0.0 < ref[1] < 1.0


def test_precision_recall_swaps_with_arguments():
    real = torch.randn(200, 3, generator=_rng(70))
    fake = 0.5 * torch.randn(150, 3, generator=_rng(71))
    p, r = metrics.precision_recall(real, fake)
    assert metrics.precision_recall(fake, real) == (r, p)


# ----------------------------------------------------------------------------- label statistics

def test_class_histogram_counts():
    counts = metrics.class_histogram(torch.tensor([0, 1, 1, 9, 9, 9]), num_classes=10)
    assert counts.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 3]
    assert metrics.class_histogram(np.array([2, 2]), num_classes=3).tolist() == [0, 0, 2]
    with pytest.raises(ValueError):
        metrics.class_histogram(torch.tensor([10]), num_classes=10)


def test_histogram_entropy_known_values():
    assert metrics.histogram_entropy(torch.full((10,), 7)) == pytest.approx(1.0)
    assert metrics.histogram_entropy(torch.tensor([0, 0, 5, 0, 0, 0, 0, 0, 0, 0])) == 0.0
    two = torch.tensor([4, 4] + [0] * 8)
    assert metrics.histogram_entropy(two) == pytest.approx(math.log(2) / math.log(10))
    assert metrics.histogram_entropy(two, normalized=False) == pytest.approx(math.log(2))
    assert metrics.histogram_entropy(torch.full((10,), 3), normalized=False) == pytest.approx(math.log(10))
    labels = torch.arange(10).repeat(50)
    assert metrics.histogram_entropy(metrics.class_histogram(labels)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        metrics.histogram_entropy(torch.zeros(10))


def test_mode_coverage_counts():
    labels = torch.cat([torch.full((100,), c) for c in range(4)] + [torch.tensor([7])])
    cov = metrics.mode_coverage(labels, num_classes=10, min_fraction=0.01)
    # Class 7 has 1 of 401 samples (< 1%), so it does not count.
    assert cov["num_covered"] == 4
    assert cov["covered"] == [0, 1, 2, 3]
    assert cov["fraction"] == pytest.approx(0.4)
    assert cov["counts"][7] == 1
    assert metrics.mode_coverage(labels, min_fraction=0.0)["num_covered"] == 5
    assert metrics.mode_coverage(labels, min_fraction=0.0, min_count=2)["num_covered"] == 4
    assert metrics.mode_coverage(torch.arange(10).repeat(3))["fraction"] == 1.0


def test_accuracy_and_confident_fraction():
    assert metrics.accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        metrics.accuracy(torch.tensor([1, 2]), torch.tensor([1, 2, 3]))
    probs = torch.tensor([[0.95, 0.05], [0.5, 0.5], [0.1, 0.9], [0.2, 0.8]])
    assert metrics.confident_fraction(probs, threshold=0.9) == pytest.approx(0.5)
    assert metrics.confident_fraction(probs, threshold=0.5) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- classify

def test_classify_outputs_and_eval_mode():
    torch.manual_seed(0)
    clf = Classifier(channels=4, feature_dim=8, num_classes=10)
    clf.train()
    images = torch.rand(11, 1, 28, 28, generator=_rng(80)) * 2 - 1
    out = metrics.classify(clf, images, batch_size=4)
    assert clf.training  # mode restored
    assert out["features"].shape == (11, 8)
    assert out["logits"].shape == (11, 10)
    assert not out["logits"].requires_grad
    torch.testing.assert_close(out["logits"], clf.fc(out["features"]).detach())
    torch.testing.assert_close(out["probs"].sum(1), torch.ones(11))
    assert torch.equal(out["preds"], out["logits"].argmax(1))
    # Eval mode (BatchNorm running stats, no dropout): results do not depend on the batching.
    out_full = metrics.classify(clf, images, batch_size=500)
    torch.testing.assert_close(out_full["logits"], out["logits"])
    clf.eval()
    torch.testing.assert_close(clf(images).detach(), out["logits"])
