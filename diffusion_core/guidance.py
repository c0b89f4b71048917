"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper."""
from __future__ import annotations

import math

import torch

from .denoisers import Denoiser, as_sigma_batch


class CFGDenoiser(Denoiser):
    """``D_g(x, sigma, y) = D(x, sigma, null) + g * (D(x, sigma, y) - D(x, sigma, null))``.

    Both branches are computed in one batched forward pass of 2B. ``g=0`` is exactly the
    unconditional denoiser, ``g=1`` exactly the conditional one (no forward of the other branch
    is needed then, so those two cases cost a single pass of B). ``null_label`` is the extra class
    index the network was trained with under label dropout.
    """

    def __init__(self, inner: Denoiser, scale: float, null_label: int):
        super().__init__()
        if not math.isfinite(scale):
            raise ValueError(f"guidance scale must be a finite number, got {scale}")
        self.inner = inner
        self.scale = float(scale)
        self.null_label = int(null_label)
        self.sigma_min = inner.sigma_min
        self.sigma_max = inner.sigma_max
        self.discrete_sigmas = getattr(inner, "discrete_sigmas", None)

    def reset(self, batch_size, generator=None):
        self.inner.reset(batch_size, generator)

    def forward(self, x, sigma, label=None):
        null = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        if label is None or self.scale == 0:
            return self.inner(x, sigma, null)
        label = label.to(x.device).long()
        if self.scale == 1:
            return self.inner(x, sigma, label)
        sigma = as_sigma_batch(sigma, x)
        out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([label, null]))
        cond, uncond = out.chunk(2)
        return uncond + self.scale * (cond - uncond)
