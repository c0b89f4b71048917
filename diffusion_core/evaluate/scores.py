"""The metrics of one row: Frechet distance beside the floor, precision and recall, accuracy,
class entropy, confidence and modes, read by the main classifier and by the second one."""
from __future__ import annotations

import torch

from .. import metrics
from .config import CONFIDENCE, NUM_CLASSES
from .reference import Reference, _pr
from .sampling import RowSamples

# Metrics of one row


def expert_usage(experts: torch.Tensor, num_experts: int) -> list[float]:
    """Share of all (step, sample) denoiser evaluations served by each expert."""
    counts = torch.bincount(experts.reshape(-1).long(), minlength=num_experts).double()
    return (counts / counts.sum()).tolist()


def row_metrics(samples: RowSamples, out: dict, reference: Reference, floor: dict, k: int = 3, device="cpu", num_experts: int | None = None) -> dict:
    """The table's numbers for one row; ``out`` is ``metrics.classify`` of the row's images."""
    feats, preds = out["features"], out["preds"]
    mu, cov = metrics.feature_stats(feats)
    fd = metrics.frechet_from_stats(mu, cov, reference.test_mu, reference.test_cov)
    p, r = _pr(reference.pr_reference(len(feats)), feats, k, device)
    hist = metrics.class_histogram(preds, NUM_CLASSES)
    cov_ = metrics.mode_coverage(preds, NUM_CLASSES)
    m = {
        "frechet": fd,
        "frechet_floor": floor["frechet"],
        "frechet_ratio": fd / floor["frechet"] if floor["frechet"] > 0 else None,
        "precision": p,
        "recall": r,
        "accuracy": metrics.accuracy(preds, samples.labels) if samples.labels is not None else None,
        "histogram": hist.tolist(),
        "entropy": metrics.histogram_entropy(hist),
        "confident": metrics.confident_fraction(out["probs"], CONFIDENCE),
        "modes_covered": cov_["num_covered"],
        "covered_digits": cov_["covered"],
    }
    if samples.experts is not None and num_experts:
        m["expert_usage"] = expert_usage(samples.experts, num_experts)
    return m


def second_classifier_metrics(samples: RowSamples, out: dict, reference: Reference, floor: dict) -> dict:
    """What the second classifier reads of a row: digit accuracy, confidence, class entropy and the
    Frechet distance in its own feature space against its own floor."""
    mu, cov = metrics.feature_stats(out["features"])
    fd = metrics.frechet_from_stats(mu, cov, reference.test_mu, reference.test_cov)
    return {
        "accuracy": metrics.accuracy(out["preds"], samples.labels) if samples.labels is not None else None,
        "confident": metrics.confident_fraction(out["probs"], CONFIDENCE),
        "entropy": metrics.histogram_entropy(metrics.class_histogram(out["preds"], NUM_CLASSES)),
        "frechet": fd,
        "frechet_ratio": fd / floor["frechet"] if floor["frechet"] > 0 else None,
    }
