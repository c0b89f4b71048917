"""Sample-quality metrics computed in a classifier's feature space.

* Frechet distance between Gaussians fitted to two feature sets (the FID recipe, here with the
  MNIST classifier of ``diffusion_core.nets`` as the feature extractor).
* Improved precision and recall (Kynkaanniemi et al. 2019) with k-nearest-neighbour manifolds.
* Label statistics of generated samples: class histogram, its normalized entropy, mode coverage,
  accuracy against requested labels and the fraction of confidently classified samples.
* ``classify``: one batched, gradient-free pass of a classifier that yields features, logits,
  probabilities and predicted labels for all of the above.

Everything is torch-first: inputs may be torch tensors or numpy arrays, and scalar results are
returned as plain Python numbers. Statistics for the Frechet distance are computed in float64.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _as_tensor(x, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    return t.to(dtype=dtype or t.dtype, device=device if device is not None else t.device)


def _as_features(x, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    t = _as_tensor(x, dtype=dtype)
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains non-finite values")
    return t


# --------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------

def feature_stats(feats) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64.

    The covariance uses the ``N - 1`` normalization, as ``numpy.cov`` and the reference FID code.
    """
    x = _as_features(feats, "feats")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to estimate a covariance, got {x.shape[0]}")
    mu = x.mean(dim=0)
    xc = x - mu
    cov = xc.T @ xc / (x.shape[0] - 1)
    return mu, cov


def _psd_sqrt(mat: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    evals, evecs = torch.linalg.eigh(mat)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def _trace_sqrt_product(cov1: torch.Tensor, cov2: torch.Tensor) -> torch.Tensor:
    """``tr((cov1 cov2)^(1/2))`` for PSD matrices, computed stably.

    ``cov1 cov2`` is not symmetric, but it is similar to the PSD matrix
    ``cov1^(1/2) cov2 cov1^(1/2)``, so both have the same (non-negative) eigenvalues; the trace of
    the square root is the sum of their square roots. Only symmetric eigen-decompositions are
    needed, so this also works for singular covariances (fewer samples than dimensions) without
    the diagonal offset that a general ``sqrtm`` needs.
    """
    s1 = _psd_sqrt(cov1)
    m = s1 @ cov2 @ s1
    m = 0.5 * (m + m.T)  # remove round-off asymmetry before eigvalsh
    return torch.linalg.eigvalsh(m).clamp_min(0).sqrt().sum()


def frechet_from_stats(mu1, cov1, mu2, cov2) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu1, cov1) and N(mu2, cov2).

    ``d^2 = |mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))``, in float64. Round-off
    can make the result of two (near-)identical distributions a tiny negative number; it is
    clamped at 0.
    """
    mu1 = _as_tensor(mu1, dtype=torch.float64).reshape(-1)
    mu2 = _as_tensor(mu2, dtype=torch.float64, device=mu1.device).reshape(-1)
    cov1 = _as_tensor(cov1, dtype=torch.float64, device=mu1.device)
    cov2 = _as_tensor(cov2, dtype=torch.float64, device=mu1.device)
    d = mu1.shape[0]
    if mu2.shape[0] != d or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {tuple(mu1.shape)}, mu2 {tuple(mu2.shape)}, "
            f"cov1 {tuple(cov1.shape)}, cov2 {tuple(cov2.shape)}"
        )
    cov1 = 0.5 * (cov1 + cov1.T)
    cov2 = 0.5 * (cov2 + cov2.T)
    diff = mu1 - mu2
    dist = diff.dot(diff) + torch.trace(cov1) + torch.trace(cov2) - 2 * _trace_sqrt_product(cov1, cov2)
    return max(float(dist), 0.0)


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets of shape (N, D) and (M, D)."""
    mu_a, cov_a = feature_stats(feats_a)
    mu_b, cov_b = feature_stats(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return frechet_from_stats(mu_a, cov_a, mu_b, cov_b)


# --------------------------------------------------------------------------------------------
# Improved precision and recall
# --------------------------------------------------------------------------------------------

def knn_radii(feats, k: int = 3, batch_size: int = 1000) -> torch.Tensor:
    """Distance of every point (N, D) to its k-th nearest neighbour in the same set, itself excluded.

    Distances are computed ``batch_size`` rows at a time, so memory is ``O(batch_size * N)``.
    """
    x = _as_tensor(feats)
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must satisfy 1 <= k < N (N={n}), got k={k}")
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, batch_size):
        rows = x[start:start + batch_size]
        d = torch.cdist(rows, x)
        # Exclude each point itself by index (its computed self-distance may not be exactly 0).
        idx = torch.arange(rows.shape[0], device=x.device)
        d[idx, idx + start] = math.inf
        radii[start:start + rows.shape[0]] = d.kthvalue(k, dim=1).values
    return radii


def _inside_manifold(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Boolean (Q,): whether each query lies within ``radii[j]`` of at least one ``points[j]``."""
    inside = torch.empty(queries.shape[0], dtype=torch.bool, device=queries.device)
    for start in range(0, queries.shape[0], batch_size):
        d = torch.cdist(queries[start:start + batch_size], points)
        inside[start:start + d.shape[0]] = (d <= radii[None]).any(dim=1)
    return inside


def precision_recall(
    real_feats,
    fake_feats,
    k: int = 3,
    batch_size: int = 1000,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Each set's manifold is the union of balls around its points, the radius of a point being the
    distance to its k-th nearest neighbour within its own set (itself excluded).

    * precision: fraction of fake samples inside the real manifold (are the samples realistic?)
    * recall: fraction of real samples inside the fake manifold (is the data distribution covered?)

    Pairwise distances are computed in row blocks of ``batch_size`` with ``torch.cdist``, so
    10k x 10k sets need only ``batch_size * 10k`` distances in memory at a time. The default
    float64 keeps the matrix-multiply form of ``cdist`` accurate; pass ``dtype=torch.float32``
    (and a CUDA ``device``) for speed on large sets.
    """
    real = _as_features(real_feats, "real_feats", dtype=dtype)
    fake = _as_features(fake_feats, "fake_feats", dtype=dtype)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    if device is not None:
        real, fake = real.to(device), fake.to(device)
    real_radii = knn_radii(real, k, batch_size)
    fake_radii = knn_radii(fake, k, batch_size)
    precision = _inside_manifold(fake, real, real_radii, batch_size).double().mean().item()
    recall = _inside_manifold(real, fake, fake_radii, batch_size).double().mean().item()
    return precision, recall


# --------------------------------------------------------------------------------------------
# Label statistics
# --------------------------------------------------------------------------------------------

def _as_labels(labels, name: str = "labels") -> torch.Tensor:
    t = _as_tensor(labels).reshape(-1)
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError(f"{name} must be integers")
    return t.long()


def class_histogram(labels, num_classes: int = 10) -> torch.Tensor:
    """Counts (num_classes,) of each class index in ``labels``."""
    t = _as_labels(labels)
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(t.min())}, {int(t.max())}]")
    return torch.bincount(t.cpu(), minlength=num_classes)


def histogram_entropy(counts, normalized: bool = True) -> float:
    """Shannon entropy (nats) of the distribution given by non-negative ``counts``.

    With ``normalized=True`` it is divided by ``log(len(counts))``, so a uniform histogram gives 1
    and a single occupied class gives 0 (a histogram with one bin gives 0).
    """
    c = _as_tensor(counts, dtype=torch.float64).reshape(-1)
    if (c < 0).any():
        raise ValueError("counts must be non-negative")
    total = c.sum()
    if total <= 0:
        raise ValueError("counts must not all be zero")
    p = c[c > 0] / total
    h = float(-(p * p.log()).sum())
    if normalized:
        return h / math.log(c.numel()) if c.numel() > 1 else 0.0
    return h


def mode_coverage(labels, num_classes: int = 10, min_fraction: float = 0.01, min_count: int = 1) -> dict:
    """How many classes appear among ``labels`` (e.g. the samples of one MCL expert).

    A class is covered when its count is at least ``min_count`` and at least ``min_fraction`` of
    all samples, so a handful of stray samples does not count as covering a mode.

    Returns ``{"num_covered": int, "fraction": float, "covered": list[int], "counts": list[int]}``,
    ``fraction`` being ``num_covered / num_classes``.
    """
    counts = class_histogram(labels, num_classes)
    total = int(counts.sum())
    covered = (counts >= min_count) & (counts.double() >= min_fraction * total)
    if total == 0:
        covered = torch.zeros_like(covered)
    idx = torch.nonzero(covered).reshape(-1).tolist()
    return {
        "num_covered": len(idx),
        "fraction": len(idx) / num_classes,
        "covered": idx,
        "counts": counts.tolist(),
    }


def accuracy(pred_labels, target_labels) -> float:
    """Fraction of predictions equal to their targets."""
    p, t = _as_labels(pred_labels, "pred_labels"), _as_labels(target_labels, "target_labels")
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: {tuple(p.shape)} vs {tuple(t.shape)}")
    if p.numel() == 0:
        raise ValueError("no labels given")
    return (p == t.to(p.device)).double().mean().item()


def confident_fraction(probs, threshold: float = 0.9) -> float:
    """Fraction of samples whose top class probability is at least ``threshold``; probs is (N, C)."""
    p = _as_tensor(probs)
    if p.dim() != 2 or p.shape[0] == 0:
        raise ValueError(f"probs must have shape (N, C) with N > 0, got {tuple(p.shape)}")
    return (p.max(dim=1).values >= threshold).double().mean().item()


# --------------------------------------------------------------------------------------------
# Running the classifier
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def classify(classifier: nn.Module, images: torch.Tensor, batch_size: int = 500, device=None) -> dict:
    """Run ``classifier`` over images (N, 1, 28, 28) in [-1, 1], batch by batch, in eval mode.

    The classifier must expose ``features(x)`` and a linear head ``fc`` (``logits = fc(features)``),
    like ``diffusion_core.nets.Classifier``; dropout is thus never applied. ``device`` defaults to
    the classifier's own device. The classifier's train/eval mode is restored afterwards.

    Returns CPU float32 tensors ``features`` (N, F), ``logits`` (N, C), ``probs`` (N, C) and the
    LongTensor ``preds`` (N,).
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must have shape (N, C, H, W) with N > 0, got {tuple(images.shape)}")
    if device is None:
        param = next(classifier.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = classifier.training
    classifier.eval()
    feats, logits = [], []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device=device, dtype=torch.float32)
            f = classifier.features(x)
            feats.append(f.float().cpu())
            logits.append(classifier.fc(f).float().cpu())
    finally:
        classifier.train(was_training)
    features, logits_t = torch.cat(feats), torch.cat(logits)
    probs = logits_t.softmax(dim=1)
    return {"features": features, "logits": logits_t, "probs": probs, "preds": probs.argmax(dim=1)}
