"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper."""
from __future__ import annotations

import math

import torch

from .denoisers import Denoiser, as_sigma_batch

# What autoguidance compares the guide with (AutoguidanceDenoiser's ``of``; Settings.autoguide).
AUTOGUIDE_OF = ("output", "mixture")


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

    ``of="mixture"`` (MCL on one trunk): the guide is compared with the experts' score-weighted
    mixture ``D_mix`` (the posterior mean of the whole data, which a weak version of a single model
    resembles) rather than with the served expert ``D_k``, and the expert's own offset passes
    unscaled: ``D_bad + w (D_mix - D_bad) + (D_k - D_mix) = D_k + (w - 1) (D_mix - D_bad)``. Scaling
    ``D_k - D_bad`` instead would also scale ``D_k - D_mix``, pushing each image further into its
    expert's part (the ``guided:W`` routing). It reads ``good.last_mixture``, which
    ``mcl.SharedMCLDenoiser`` derives from the same pass, so it costs what ``of="output"`` does.
    """

    def __init__(self, good: Denoiser, bad: Denoiser, weight: float, of: str = "output"):
        super().__init__()
        if not math.isfinite(weight):
            raise ValueError(f"autoguidance weight must be a finite number, got {weight}")
        if of not in AUTOGUIDE_OF:
            raise ValueError(f"autoguidance acts on one of {', '.join(AUTOGUIDE_OF)}, got {of!r}")
        if of == "mixture" and not getattr(good, "records_mixture", False):
            raise ValueError("autoguidance of the experts' mixture needs an MCL model with its experts on one network (mcl_parts, mcl_shared)")
        self.good = good
        self.bad = bad
        self.weight = float(weight)
        self.of = of
        self.serve_range_of(good)

    def reset(self, batch_size, generator=None):
        self.good.reset(batch_size, generator)
        self.bad.reset(batch_size, generator)

    def forward(self, x, sigma, label=None):
        if self.weight == 1:
            return self.good(x, sigma, label)
        if self.weight == 0 and self.of == "output":
            return self.bad(x, sigma, label)
        bad = self.bad(x, sigma, label)
        good = self.good(x, sigma, label)
        if self.of == "mixture":
            return good + (self.weight - 1.0) * (self.good.last_mixture - bad)
        return bad + self.weight * (good - bad)

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
