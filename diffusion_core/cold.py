"""Cold diffusion (Bansal et al., NeurIPS 2023, "Cold Diffusion: Inverting Arbitrary Image Transforms
Without Noise"): a network trained to undo a degradation that is not Gaussian noise, here a
Gaussian blur of increasing strength.

This is its own small interface beside the denoiser (``denoisers.py``), not a denoiser: the
degraded image at level ``s`` is ``D(x0, s)``, a deterministic function of the clean image, and the
restoration network ``R(x_s, s)`` predicts ``x0``. There is no sigma, so none of the samplers of
``samplers.py`` applies; the two samplers of the paper are here::

    deg = BlurDegradation(levels=20)
    x_s = deg(x0, s)                          # level s in 0..levels (0: the clean image)
    restorer = Restorer(net, deg)             # R(x_s, s) -> x0_hat
    for step in restore_improved(restorer, x_s, s):   # or restore_naive
        ...                                   # step.level, step.x (the image at level s - 1), step.x0

The blur is the heat equation with reflecting borders, computed exactly in the cosine basis: the
2-D DCT-II of the image is multiplied by ``exp(-sigma^2 |omega|^2 / 2)``, the transfer function of a
Gaussian of standard deviation ``sigma`` pixels. It keeps the image's mean.

How far the last level goes is a choice. The paper blurs until only the mean is left (a flat
image, here about ``sigma_max = 30`` px) and generates from a flat start plus a little noise (its
Section 5.1). A flat image holds nothing but the digit's brightness, so restoring it can only be a
guess, and the best guess in squared error is the blurred average that Algorithm 1 gives, not the
sharp digit of Algorithm 2. We stop at ``sigma_max = 10`` px, where the coarsest cosine modes
(about a dozen of the 784) survive: a blob that still says where the ink is. Generation starts
from those modes drawn from a Gaussian fitted to the fully blurred training images
(``StartDistribution``), plus a little noise. At ``sigma_max = 30`` every mode but the mean keeps
under 0.4% of itself, and a start fitted with ``threshold=1e-2`` is exactly the paper's flat one.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

DEGRADATIONS = ("blur",)


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``C`` (n, n): ``C @ x`` transforms a column, ``C.T`` inverts it."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


@dataclass(frozen=True)
class BlurConfig:
    levels: int = 20  # degradation levels 1..levels (0 is the clean image)
    sigma_min: float = 0.5  # the blur's standard deviation (pixels) at level 1
    sigma_max: float = 7.0  # ... and at the last level, geometric in between (30 px would leave a flat image; cold_blur has 10)
    size: int = 28
    train_noise: float = 0.01  # Gaussian noise added to the network's input in training (robustness to the start's noise)


class BlurDegradation:
    """``D(x0, s)``: Gaussian blur of standard deviation ``sigmas[s]`` pixels (``sigmas[0] = 0``)."""

    name = "blur"

    def __init__(self, config: BlurConfig | dict | None = None):
        if isinstance(config, dict):
            config = BlurConfig(**{k: v for k, v in config.items() if k != "name"})
        self.config = c = config or BlurConfig()
        if c.levels < 1 or not 0 < c.sigma_min <= c.sigma_max:
            raise ValueError(f"a blur needs levels >= 1 and 0 < sigma_min <= sigma_max (got {c})")
        self.levels = c.levels
        geo = torch.logspace(math.log10(c.sigma_min), math.log10(c.sigma_max), c.levels, dtype=torch.float64)
        self.sigmas = torch.cat([torch.zeros(1, dtype=torch.float64), geo])
        self._dct = dct_matrix(c.size).float()
        omega = math.pi * torch.arange(c.size, dtype=torch.float64) / c.size
        freq2 = omega[:, None] ** 2 + omega[None, :] ** 2  # |omega|^2 of each cosine mode
        self._gains = torch.exp(-0.5 * self.sigmas[:, None, None] ** 2 * freq2).float()  # (levels + 1, size, size)

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self.config)}

    def check_level(self, s: int) -> int:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= self.levels:
            raise ValueError(f"blur level must be an integer from 0 to {self.levels} (got {s!r})")
        return s

    def __call__(self, x0: torch.Tensor, s) -> torch.Tensor:
        """Blur ``x0`` (B, C, H, W) to level ``s``: an int, or a LongTensor (B,) of levels."""
        if not isinstance(s, torch.Tensor):
            self.check_level(s)
        elif s.numel() and not (0 <= int(s.min()) and int(s.max()) <= self.levels):
            raise ValueError(f"blur level must be an integer from 0 to {self.levels}")
        s = torch.as_tensor(s, dtype=torch.long).reshape(-1).expand(x0.shape[0]).cpu()
        c = self._dct.to(x0.device, x0.dtype)
        gains = self._gains[s].to(x0.device, x0.dtype)[:, None]  # (B, 1, H, W)
        coeffs = c @ x0 @ c.T
        return c.T @ (coeffs * gains) @ c


class Restorer:
    """``R(x_s, s) -> x0_hat``: the restoration network, called in float32 with its level input
    ``1000 s / levels`` (the range the UNet's time embedding was built for)."""

    def __init__(self, net: nn.Module, degradation: BlurDegradation):
        self.net = net
        self.degradation = degradation

    def net_time(self, s: torch.Tensor) -> torch.Tensor:
        return 1000.0 * s.float() / self.degradation.levels

    def __call__(self, x: torch.Tensor, s) -> torch.Tensor:
        s = torch.as_tensor(s, dtype=torch.long, device=x.device).reshape(-1).expand(x.shape[0])
        with torch.no_grad():
            return self.net(x, self.net_time(s)).float()


class ColdStep(NamedTuple):
    level: int  # the level this step started from
    x: torch.Tensor  # the image at level - 1
    x0: torch.Tensor  # the network's estimate of the clean image at ``level``


def restore_naive(restorer: Restorer, x: torch.Tensor, level: int) -> Iterator[ColdStep]:
    """Algorithm 1 of Bansal et al.: ``x_{s-1} = D(R(x_s, s), s - 1)``. Every step re-degrades the
    estimate, so its errors are not corrected by the next one."""
    deg = restorer.degradation
    for s in range(deg.check_level(level), 0, -1):
        x0 = restorer(x, s)
        x = deg(x0, s - 1)
        yield ColdStep(s, x, x0)


def restore_improved(restorer: Restorer, x: torch.Tensor, level: int) -> Iterator[ColdStep]:
    """Algorithm 2 of Bansal et al.: ``x_{s-1} = x_s - D(x0_hat, s) + D(x0_hat, s - 1)``, with
    ``x0_hat = R(x_s, s)``. Only the difference between two levels of the estimate is added, so
    an error in the estimate moves ``x`` by how much it changes between neighbouring levels, not
    by the whole error as in Algorithm 1 (the paper shows it exact, whatever the estimate, for
    degradations of the form ``x0 + s e``)."""
    deg = restorer.degradation
    for s in range(deg.check_level(level), 0, -1):
        x0 = restorer(x, s)
        x = x - deg(x0, s) + deg(x0, s - 1)
        yield ColdStep(s, x, x0)


COLD_SAMPLERS = {"naive": restore_naive, "improved": restore_improved}
COLD_SAMPLER_NAMES = tuple(COLD_SAMPLERS)


def restore(restorer: Restorer, x: torch.Tensor, level: int, sampler: str = "improved") -> torch.Tensor:
    """The restored image (the last step's ``x``; ``x`` itself at level 0)."""
    if sampler not in COLD_SAMPLERS:
        raise ValueError(f"unknown cold-diffusion sampler {sampler!r}; expected one of {', '.join(COLD_SAMPLERS)}")
    for step in COLD_SAMPLERS[sampler](restorer, x, level):
        x = step.x
    return x


def degrade_and_restore(restorer: Restorer, x0: torch.Tensor, level: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``x0`` degraded to ``level`` and restored from there by each sampler: (the degraded image,
    {sampler name: the restored image, clamped to [-1, 1]})."""
    x_s = restorer.degradation(x0, level)
    return x_s, {name: restore(restorer, x_s, level, name).clamp(-1, 1) for name in COLD_SAMPLERS}


def generate(restorer: Restorer, start: StartDistribution, n: int, seed: int, sampler: str = "improved",
             device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` digits that nobody drew: starts drawn from ``start`` with a CPU generator seeded with
    ``seed`` (the one place a cold-diffusion seed becomes noise), restored from the last level by
    ``sampler``. Returns (the starts, the restored images), both on the CPU."""
    x = start.sample(n, torch.Generator(device="cpu").manual_seed(int(seed)))
    out = restore(restorer, x.to(device), restorer.degradation.levels, sampler)
    return x, out.cpu()


class StartDistribution:
    """Where generation starts: the fully degraded image ``D(x0, levels)`` of a digit ``x0`` that
    nobody drew. The last level keeps only the cosine modes whose gain is above ``threshold``
    (``modes``); their coefficients are drawn from a mixture of Gaussians (``weights``, ``means``,
    lower Cholesky factors ``scale_trils``) fitted to the fully blurred training images, one
    component per digit class when the labels are given (the blurred digits form clusters that one
    Gaussian blurs together), and ``noise`` (a standard deviation) is added to every pixel. Stored as
    the checkpoint's ``generation`` (``to_dict``); a single Gaussian (``mean``, ``scale_tril``) is
    the one-component case."""

    def __init__(self, modes, means, scale_trils, noise: float, size: int = 28, weights=None):
        self.modes = torch.as_tensor(modes, dtype=torch.long).reshape(-1, 2)
        m = len(self.modes)
        self.means = torch.atleast_2d(torch.as_tensor(means, dtype=torch.float64))
        k = len(self.means)
        self.scale_trils = torch.as_tensor(scale_trils, dtype=torch.float64)
        if self.scale_trils.ndim == 2:
            self.scale_trils = self.scale_trils[None]
        self.weights = torch.full((k,), 1.0 / max(k, 1), dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if m == 0 or k == 0 or float(noise) < 0:
            raise ValueError("a start distribution needs at least one mode, one component and noise >= 0")
        if self.means.shape != (k, m) or self.scale_trils.shape != (k, m, m) or len(self.weights) != k:
            raise ValueError(f"a start distribution of {k} components over {m} modes needs means ({k}, {m}), scale_trils ({k}, {m}, {m}) "
                             f"and {k} weights (got {tuple(self.means.shape)}, {tuple(self.scale_trils.shape)}, {len(self.weights)})")
        if not torch.all(self.weights >= 0) or float(self.weights.sum()) <= 0:
            raise ValueError("start distribution weights must be non-negative and not all zero")
        if int(self.modes.min()) < 0 or int(self.modes.max()) >= size:
            raise ValueError(f"start modes must lie in 0..{size - 1}")
        self.weights = self.weights / self.weights.sum()
        self.noise = float(noise)
        self.size = size
        self._dct = dct_matrix(size)

    @staticmethod
    def _gaussian(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cov = torch.atleast_2d(torch.cov(z.T)) + 1e-9 * torch.eye(z.shape[1], dtype=torch.float64)
        return z.mean(0), torch.linalg.cholesky(cov)

    @classmethod
    def fit(cls, images: torch.Tensor, degradation: BlurDegradation, noise: float, threshold: float = 1e-3,
            labels: torch.Tensor | None = None) -> StartDistribution:
        """Fit to ``images`` (N, 1, H, W) blurred to the last level of ``degradation``: one Gaussian,
        or with ``labels`` one per class weighted by the class's share of the images."""
        gains = degradation._gains[-1].double()
        modes = (gains > threshold).nonzero()
        c = dct_matrix(degradation.config.size)
        coeffs = c @ degradation(images.float(), degradation.levels).double()[:, 0] @ c.T
        z = coeffs[:, modes[:, 0], modes[:, 1]]  # (N, M)
        if labels is None:
            mean, tril = cls._gaussian(z)
            return cls(modes, mean[None], tril[None], noise, degradation.config.size)
        classes = torch.unique(labels)
        fits = [cls._gaussian(z[labels == k]) for k in classes]
        weights = torch.stack([(labels == k).double().mean() for k in classes])
        return cls(modes, torch.stack([f[0] for f in fits]), torch.stack([f[1] for f in fits]), noise, degradation.config.size, weights)

    def to_dict(self) -> dict:
        r = lambda t: [round(float(v), 6) for v in t]  # noqa: E731
        return {"modes": self.modes.tolist(), "weights": r(self.weights), "means": [r(m) for m in self.means],
                "scale_trils": [[r(row) for row in L] for L in self.scale_trils], "noise": self.noise}

    @classmethod
    def from_dict(cls, d: dict, size: int = 28) -> StartDistribution:
        if "means" in d:
            return cls(d["modes"], d["means"], d["scale_trils"], d["noise"], size, d.get("weights"))
        return cls(d["modes"], [d["mean"]], [d["scale_tril"]], d["noise"], size)  # one Gaussian (the first cold_blur)

    def sample(self, n: int, generator: torch.Generator, noise: float | None = None) -> torch.Tensor:
        """``n`` starts (n, 1, size, size), float32; every random number comes from ``generator``
        (each start's component when there are several, then the modes' coefficients, then the pixel
        noise)."""
        noise = self.noise if noise is None else float(noise)
        k = len(self.weights)
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator) if k > 1 else torch.zeros(n, dtype=torch.long)
        white = torch.randn((n, self.means.shape[1]), generator=generator, dtype=torch.float64)
        z = self.means[comp] + torch.einsum("nij,nj->ni", self.scale_trils[comp], white)
        coeffs = torch.zeros((n, self.size, self.size), dtype=torch.float64)
        coeffs[:, self.modes[:, 0], self.modes[:, 1]] = z
        x = (self._dct.T @ coeffs @ self._dct).float()[:, None]
        return x + noise * torch.randn((n, 1, self.size, self.size), generator=generator)
