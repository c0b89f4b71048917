"""Samplers: short functions over the denoiser interface ``D(x, sigma, label) -> x0``.

Each sampler takes the initial noisy image ``x`` (already at noise level ``sigmas[0]``), a
decreasing tensor of noise levels ending in 0, and yields one ``Step`` record per step. The last
record's ``x`` is the sample. All randomness (ancestral noise) comes from ``generator``, drawn on
the CPU and moved to ``x``'s device, so a seed gives the same noise on any machine.

The images live in sigma space (``x = x0 + sigma * noise``). For DDIM and DPM-Solver++ this is
exactly equivalent to the variance-preserving formulations (divide the VP state by
sqrt(alphabar)), which is why they agree with diffusers' VP schedulers.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass
class Step:
    index: int  # 0-based step number
    sigma: float  # noise level at which the denoiser was queried in this step
    sigma_next: float  # noise level of ``x`` after the step
    x: torch.Tensor  # state after the step
    denoised: torch.Tensor  # the denoiser's prediction of the clean image in this step
    expert: torch.Tensor | None = None  # (B,) expert index per sample, for MCL denoisers
    gate_probs: torch.Tensor | None = None  # (B, K) gating probabilities, for gated/soft routing


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float32, device="cpu").to(x.device, x.dtype)


def _step(i, sigmas, x, denoised, denoiser) -> Step:
    return Step(
        index=i,
        sigma=float(sigmas[i]),
        sigma_next=float(sigmas[i + 1]),
        x=x,
        denoised=denoised,
        expert=getattr(denoiser, "last_expert", None),
        gate_probs=getattr(denoiser, "last_gate_probs", None),
    )


def _to_d(x, sigma, denoised):
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, label=None, generator=None) -> Iterator[Step]:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i], label)
        record_den = denoised
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        yield _step(i, sigmas, x, record_den, denoiser)


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, label=None, generator=None) -> Iterator[Step]:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1); the last step to sigma=0 is Euler."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i], label)
        step = _step(i, sigmas, None, denoised, denoiser)
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], denoiser(x_2, sigmas[i + 1], label))
            x = x + (d + d_2) / 2 * dt
        step.x = x
        yield step


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, label=None, generator=None) -> Iterator[Step]:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep in lambda = -log(sigma); first and last steps first order."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i], label)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam, lam_next = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
            h = lam_next - lam
            if old_denoised is None:
                d = denoised
            else:
                h_last = lam - (-math.log(sigmas[i - 1]))
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * d
        old_denoised = denoised
        yield _step(i, sigmas, x, denoised, denoiser)


def _ddim_step(x, denoised, sigma: float, sigma_next: float, eta: float) -> tuple[torch.Tensor, float]:
    """DDIM's update (Song et al. 2021, eq. 12) in sigma space, ``alphabar = 1 / (1 + sigma^2)``:
    the deterministic part and the standard deviation of the fresh noise to add to it."""
    ab, ab_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    std_vp = eta * math.sqrt((1 - ab_next) / (1 - ab)) * math.sqrt(max(0.0, 1 - ab / ab_next))  # sigma_t(eta), VP frame
    eps = (x - denoised) / sigma
    mean = denoised + math.sqrt(max(0.0, 1 - ab_next - std_vp**2) / ab_next) * eps
    return mean, std_vp / math.sqrt(ab_next)


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, label=None, generator=None, eta: float = 0.0) -> Iterator[Step]:
    """DDIM (Song et al. 2021) in sigma space; ``alphabar = 1 / (1 + sigma^2)``.

    ``eta=0`` is deterministic (and equals Euler in sigma space); ``eta=1`` is DDPM ancestral
    sampling with the posterior variance (Ho et al. 2020, Algorithm 2).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma, label)
        if sigma_next == 0:
            x = denoised
        else:
            x, std = _ddim_step(x, denoised, sigma, sigma_next, eta)
            if std > 0:
                x = x + std * _randn_like(x, generator)
        yield _step(i, sigmas, x, denoised, denoiser)


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, label=None, generator=None) -> Iterator[Step]:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2, posterior variance beta-tilde)."""
    yield from sample_ddim(denoiser, x, sigmas, label, generator, eta=1.0)


@torch.no_grad()
def sample_ddpm_nonoise(denoiser, x, sigmas, label=None, generator=None) -> Iterator[Step]:
    """DDPM's ancestral step with its noise term ``sigma_t z`` removed: the posterior mean only
    (the classic exercise on Ho et al. 2020, Algorithm 2). It fails on purpose: the mean carries
    only ``sqrt(1 - alphabar_{t-1} - beta-tilde_t)`` of noise where the next step expects
    ``sqrt(1 - alphabar_{t-1})``, so every step sees a cleaner image than its noise level says
    and pulls its guess towards the average; the spread is never put back, and every seed ends
    in nearly the same image (``tests/test_ddpm_nonoise.py``).
    DDIM with eta 0 is deterministic too, but keeps the full noise weight (``eta = 0`` in
    ``_ddim_step``: no beta-tilde is taken out), so its image stays on the noise schedule."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma, label)
        x = denoised if sigma_next == 0 else _ddim_step(x, denoised, sigma, sigma_next, 1.0)[0]
        yield _step(i, sigmas, x, denoised, denoiser)


# ---------------------------------------------------------------------------------------------
# Noise-level grids


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 (eq. 5) spacing of ``n`` levels from sigma_max to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def discrete_timesteps(num_train: int, n: int) -> torch.Tensor:
    """The training timesteps used when sampling in ``n`` steps, from high to low noise.

    All T timesteps when n == T; otherwise "leading" respacing as in DDIM and diffusers'
    default: ``t_i = i * (T // n)``.
    """
    if n >= num_train:
        return torch.arange(num_train - 1, -1, -1)
    return (torch.arange(n) * (num_train // n)).flip(0)


def discrete_sigmas_for(discrete: torch.Tensor, n: int) -> torch.Tensor:
    ts = discrete_timesteps(len(discrete), n)
    return torch.cat([discrete.double()[ts], torch.zeros(1, dtype=torch.float64)])


DISCRETE_GRID_SAMPLERS = ("ddpm", "ddpm_nonoise", "ddim")  # on the training timesteps of a discrete-time model


def get_sigmas(sampler: str, denoiser, steps: int) -> torch.Tensor:
    """The default noise-level grid of a sampler for a denoiser: the training timesteps (respaced)
    for ``ddpm``, ``ddpm_nonoise`` and ``ddim`` on discrete-time models, Karras spacing otherwise."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    discrete = getattr(denoiser, "discrete_sigmas", None)
    if sampler in DISCRETE_GRID_SAMPLERS and discrete is not None:
        return discrete_sigmas_for(discrete, steps)
    return karras_sigmas(steps, denoiser.sigma_min, denoiser.sigma_max)


SAMPLERS: dict[str, Callable[..., Iterator[Step]]] = {
    "ddpm": sample_ddpm,
    "ddpm_nonoise": sample_ddpm_nonoise,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}

# Function evaluations per step (the last Heun step is a single Euler evaluation).
NFE_PER_STEP = {"ddpm": 1, "ddpm_nonoise": 1, "ddim": 1, "euler": 1, "heun": 2, "dpmpp_2m": 1}


def get_sampler(name: str) -> Callable[..., Iterator[Step]]:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
