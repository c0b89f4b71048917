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
        self.serve_range_of(inner)

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


class AutoguidanceDenoiser(Denoiser):
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"):
    ``D_w(x, sigma, y) = D_bad(x, sigma, y) + w * (D_good(x, sigma, y) - D_bad(x, sigma, y))``.

    ``bad`` is a weaker version of ``good`` (a smaller network, trained for less, or another
    model's unconditional branch); it needs no labels, so it guides unconditional models, where
    classifier-free guidance cannot. ``w=1`` is exactly the good denoiser and ``w=0`` exactly the
    bad one (each then costs one pass); otherwise a step costs both networks, as CFG does.
    What the good denoiser reports about a step (an MCL ensemble's expert and gate probabilities)
    passes through, since the image is still served by it.
    """

    def __init__(self, good: Denoiser, bad: Denoiser, weight: float):
        super().__init__()
        if not math.isfinite(weight):
            raise ValueError(f"autoguidance weight must be a finite number, got {weight}")
        self.good = good
        self.bad = bad
        self.weight = float(weight)
        self.serve_range_of(good)

    def reset(self, batch_size, generator=None):
        self.good.reset(batch_size, generator)
        self.bad.reset(batch_size, generator)

    def forward(self, x, sigma, label=None):
        if self.weight == 1:
            return self.good(x, sigma, label)
        if self.weight == 0:
            return self.bad(x, sigma, label)
        bad = self.bad(x, sigma, label)
        return bad + self.weight * (self.good(x, sigma, label) - bad)

    # the good model's per-step records (MCL routing), for the samplers' Step
    @property
    def last_expert(self):
        return getattr(self.good, "last_expert", None)

    @property
    def last_gate_probs(self):
        return getattr(self.good, "last_gate_probs", None)

    @property
    def watch_gate(self):
        return getattr(self.good, "watch_gate", False)

    @watch_gate.setter
    def watch_gate(self, value):
        if hasattr(self.good, "watch_gate"):
            self.good.watch_gate = value
