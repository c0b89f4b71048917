"""Real data: the reference features of MNIST in the classifier's space, the floor (real
training images against the test set at a row's sample count) and the optional InceptionV3
features (local weights only)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import metrics
from ..data import load_mnist
from ..models import LoadedModel
from .config import _log
from .sampling import to_float

# Real data: reference features and the floor


@dataclass
class Reference:
    """Classifier features of the MNIST test set and of a seeded subset of the training set."""

    test_features: torch.Tensor  # (10000, F)
    test_labels: torch.Tensor
    test_preds: torch.Tensor
    train_features: torch.Tensor  # (max_train, F): the first n are the floor's n real images
    test_order: torch.Tensor  # seeded permutation of the test set; its first n images are the P/R reference
    test_mu: torch.Tensor = None
    test_cov: torch.Tensor = None

    def __post_init__(self):
        if self.test_mu is None:
            self.test_mu, self.test_cov = metrics.feature_stats(self.test_features)

    def pr_reference(self, n: int) -> torch.Tensor:
        """``min(n, 10000)`` test features: precision/recall compare sets of equal size."""
        return self.test_features[self.test_order[: min(n, len(self.test_order))]]

    @property
    def classifier_accuracy(self) -> float:
        return metrics.accuracy(self.test_preds, self.test_labels)


def reference_features(classifier: LoadedModel, data_dir=None, max_train: int = 10000, seed: int = 0, device="cpu", batch_size: int = 1000) -> Reference:
    """Classify the MNIST test set and ``max_train`` training images drawn with ``seed``."""
    test_x, test_y = load_mnist(data_dir, train=False)
    train_x, _ = load_mnist(data_dir, train=True)
    g = torch.Generator().manual_seed(seed)
    train_idx = torch.randperm(len(train_x), generator=g)[:max_train]
    test_order = torch.randperm(len(test_x), generator=g)
    test = metrics.classify(classifier.net, test_x, batch_size=batch_size, device=device)
    train = metrics.classify(classifier.net, train_x[train_idx], batch_size=batch_size, device=device)
    return Reference(test["features"], test_y, test["preds"], train["features"], test_order)


def _pr(real, fake, k, device) -> tuple[float, float]:
    dev = torch.device(device)
    if dev.type == "cuda":
        return metrics.precision_recall(real, fake, k=k, dtype=torch.float32, device=dev)
    return metrics.precision_recall(real, fake, k=k)


def real_floor(reference: Reference, n: int, k: int = 3, device="cpu") -> dict:
    """What real data scores at ``n`` samples: ``n`` training images against the test set
    (Frechet distance against all test images; precision/recall against ``n`` test images)."""
    if n > len(reference.train_features):
        raise ValueError(f"the reference holds {len(reference.train_features)} training features, {n} requested")
    train = reference.train_features[:n]
    mu, cov = metrics.feature_stats(train)
    fd = metrics.frechet_from_stats(mu, cov, reference.test_mu, reference.test_cov)
    p, r = _pr(reference.pr_reference(n), train, k, device)
    return {"n": n, "frechet": fd, "precision": p, "recall": r}


# InceptionV3 FID (optional, local weights only)


INCEPTION_GLOB = "inception_v3_google-*.pth"


def find_inception_weights() -> Path | None:
    """torchvision's inception_v3 weights in the local torch hub cache, or None."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(folder.glob(INCEPTION_GLOB)) if folder.is_dir() else []
    return found[-1] if found else None


def inception_missing_message() -> str:
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"InceptionV3 FID skipped: torchvision's inception_v3 weights ({INCEPTION_GLOB}) are not in the local "
        f"torch hub cache ({folder}); this command never downloads. Put the file there (or set TORCH_HOME) to enable "
        "--fid-inception. The classifier-feature metrics are unaffected."
    )


class InceptionFeatures:
    """2048-d pool features of torchvision's InceptionV3 (ImageNet weights). MNIST digits are
    repeated to 3 channels and resized to 299x299; inputs stay in [-1, 1], which is what the
    network's ``transform_input`` produces for the Google weights. Not the TF-FID network, so the
    numbers are comparable between our rows but not to published FIDs."""

    def __init__(self, weights: Path, device="cpu"):
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        net.fc = torch.nn.Identity()
        self.net = net.eval().requires_grad_(False).to(device)
        self.device = device
        self.weights = str(weights)

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor, batch_size: int = 200) -> torch.Tensor:
        out = []
        for start in range(0, len(images_u8), batch_size):
            x = to_float(images_u8[start:start + batch_size]).to(self.device)
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
            out.append(self.net(x).float().cpu())
        return torch.cat(out)


def load_inception(device="cpu", log: Callable[[str], None] = _log) -> tuple[InceptionFeatures | None, str]:
    path = find_inception_weights()
    if path is None:
        msg = inception_missing_message()
        log(msg)
        return None, msg
    try:
        return InceptionFeatures(path, device), f"InceptionV3 weights from {path}"
    except Exception as e:  # noqa: BLE001 - a corrupt or mismatched file must not stop the evaluation
        msg = f"InceptionV3 FID skipped: could not load {path} ({type(e).__name__}: {e})"
        log(msg)
        return None, msg
