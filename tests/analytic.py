"""Exact denoisers of simple data distributions, for checking samplers against the truth.

In the sigma parameterization (``x = x0 + sigma * noise``) the ideal denoiser is the posterior
mean ``D(x, sigma) = E[x0 | x]``; for these distributions it is known in closed form, and for the
Gaussian so is the probability-flow ODE solution ``dx/dsigma = (x - D(x, sigma)) / sigma``.
"""
from __future__ import annotations

import torch


def _sigma(sigma, x):
    """Sigma (float, 0-dim or (B,) tensor) broadcastable against x of shape (B, ...)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    return sigma.reshape(-1, *([1] * (x.dim() - 1)))


class GaussianDenoiser:
    """Data ``x0 ~ N(mu, s^2)`` independently per pixel; ``mu`` and ``s`` broadcast against an image."""

    sigma_min, sigma_max, discrete_sigmas = 0.002, 80.0, None

    def __init__(self, mu, s):
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.s = torch.as_tensor(s, dtype=torch.float64)

    def __call__(self, x, sigma, label=None):
        sigma = _sigma(sigma, x)
        mu, s2 = self.mu.to(x), self.s.to(x) ** 2
        return mu + s2 / (s2 + sigma**2) * (x - mu)

    def noisy(self, shape, sigma, generator):
        """Exact samples of the noisy marginal ``N(mu, s^2 + sigma^2)``."""
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
        return self.mu + (self.s**2 + sigma**2).sqrt() * z

    def ode_solution(self, x_start, sigma_start, sigma_end):
        """The exact probability-flow ODE solution from ``x_start`` at ``sigma_start`` to ``sigma_end``:
        ``x - mu`` scales as ``sqrt(s^2 + sigma^2)``."""
        s2 = self.s**2
        return self.mu + ((s2 + sigma_end**2) / (s2 + sigma_start**2)).sqrt() * (x_start - self.mu)


class PointMixtureDenoiser:
    """Data is ``centers[i]`` (each an image) with probability ``weights[i]``.

    ``D`` is the posterior-weighted mean of the centers, with posterior
    ``softmax_i(log w_i - |x - c_i|^2 / (2 sigma^2))``.
    """

    sigma_min, sigma_max, discrete_sigmas = 0.002, 80.0, None

    def __init__(self, centers, weights):
        self.centers = torch.as_tensor(centers, dtype=torch.float64)  # (K, ...)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)  # (K,)

    def __call__(self, x, sigma, label=None):
        sigma = _sigma(sigma, x).reshape(-1, 1)
        c = self.centers.to(x)
        d2 = (x.flatten(1)[:, None, :] - c.flatten(1)[None]).square().sum(-1)  # (B, K)
        post = torch.softmax(self.weights.to(x).log() - d2 / (2 * sigma**2), dim=1)
        return (post @ c.flatten(1)).reshape(x.shape)

    def nearest(self, x):
        """(index of the nearest center, distance to it) per sample."""
        d = torch.cdist(x.flatten(1).to(torch.float64), self.centers.flatten(1))
        dist, idx = d.min(dim=1)
        return idx, dist
