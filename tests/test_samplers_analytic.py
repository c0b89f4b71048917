"""The samplers against the truth: exact denoisers of known data distributions (tests/analytic.py).

* Gaussian data: the probability-flow ODE has a closed-form solution, so the deterministic samplers'
  global error is measured exactly and must fall at the method's order (Euler and DDIM(eta=0): 1;
  Heun and DPM-Solver++(2M): 2). Ancestral samplers (DDPM, DDIM eta>0) must reproduce the data's
  mean and variance, and their O(1/steps) bias must shrink at weak order 1.
* A mixture of points: every sampler must land on the points with the right weights, and just
  before its final jump to sigma=0 the sample must look like point + sigma_min * N(0, I), as the
  true noisy marginal does.

All computations are float64 so round-off does not hide the discretization error.
"""
import math

import numpy as np
import pytest
import torch
from analytic import GaussianDenoiser, PointMixtureDenoiser

from diffusion_core.objectives import DiscreteSchedule
from diffusion_core.samplers import get_sampler, get_sigmas, karras_sigmas, sample_ddim

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread is faster


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# name -> (sampler, keyword arguments); "ddim" is the deterministic eta=0 variant.
SAMPLERS = {
    "euler": (get_sampler("euler"), {}),
    "heun": (get_sampler("heun"), {}),
    "dpmpp_2m": (get_sampler("dpmpp_2m"), {}),
    "ddim": (sample_ddim, {"eta": 0.0}),
    "ddpm": (get_sampler("ddpm"), {}),
    "ddpm_nonoise": (get_sampler("ddpm_nonoise"), {}),
    "ddim_eta1": (sample_ddim, {"eta": 1.0}),
    "ddim_eta0.5": (sample_ddim, {"eta": 0.5}),
}
ANCESTRAL = ["ddpm", "ddim_eta1", "ddim_eta0.5"]


def _run(name, denoiser, x, sigmas, generator=None):
    """All step records of sampler ``name``."""
    sampler, kwargs = SAMPLERS[name]
    return list(sampler(denoiser, x, sigmas, None, generator, **kwargs))


def _slope(ns, errs):
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


# Per-pixel Gaussian data (one image of 2x2 pixels with different means and spreads).
GAUSS = GaussianDenoiser([[0.3, -0.5], [1.0, 0.0]], [[0.5, 1.0], [1.5, 0.2]])


def _uneven_karras(n):
    """Karras' rho=7 map applied to a ramp whose steps alternate 1 : 2, so consecutive step-size
    ratios stay far from 1 however fine the grid: multistep coefficients must handle them."""
    du = torch.tensor([1.0 if i % 2 == 0 else 2.0 for i in range(n - 1)], dtype=torch.float64)
    ramp = torch.cat([torch.zeros(1, dtype=torch.float64), du.cumsum(0) / du.sum()])
    lo, hi = SIGMA_MIN ** (1 / 7), SIGMA_MAX ** (1 / 7)
    return torch.cat([(hi + ramp * (lo - hi)) ** 7, torch.zeros(1, dtype=torch.float64)])


GRIDS = {
    # stop at sigma_min and compare there: measures the ODE solver alone
    "karras": lambda n: karras_sigmas(n, SIGMA_MIN, SIGMA_MAX)[:-1],
    "uneven": lambda n: _uneven_karras(n)[:-1],
    # the full default grid including the final jump sigma_min -> 0. That jump is one first-order
    # step of size sigma_min whose error (~ sigma_min^2 / (2 s^2) |x - mu| ~ 5e-5 here) does not
    # shrink with n, but stays below the solvers' error over the step counts used.
    "karras_to_zero": lambda n: karras_sigmas(n, SIGMA_MIN, SIGMA_MAX),
}
ODE_ORDERS = {"euler": 1, "ddim": 1, "heun": 2, "dpmpp_2m": 2}
STEP_COUNTS = [16, 32, 64, 128]


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("name", list(ODE_ORDERS))
def test_ode_samplers_converge_to_exact_ode_solution_at_their_order(name, grid):
    x_T = GAUSS.noisy((8, 1, 2, 2), SIGMA_MAX, _gen(0))
    errs = []
    for n in STEP_COUNTS:
        sigmas = GRIDS[grid](n)
        final = _run(name, GAUSS, x_T.clone(), sigmas)[-1].x
        exact = GAUSS.ode_solution(x_T, SIGMA_MAX, float(sigmas[-1]))
        errs.append((final - exact).abs().max().item())
    order = _slope(STEP_COUNTS, errs)
    assert abs(order - ODE_ORDERS[name]) < 0.3, (name, grid, order, errs)
    # and the error is small in absolute terms (x_T is O(80), the data O(1))
    assert errs[-1] < {1: 0.1, 2: 5e-3}[ODE_ORDERS[name]], errs


def test_ddim_eta0_is_euler_in_sigma_space():
    x_T = GAUSS.noisy((8, 1, 2, 2), SIGMA_MAX, _gen(0))
    sigmas = karras_sigmas(10, SIGMA_MIN, SIGMA_MAX)
    ddim = _run("ddim", GAUSS, x_T.clone(), sigmas)[-1].x
    euler = _run("euler", GAUSS, x_T.clone(), sigmas)[-1].x
    torch.testing.assert_close(ddim, euler, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- ancestral samplers

# Gaussian data for the stochastic tests (spreads of order 1: the variance check is relative).
GAUSS_WIDE = GaussianDenoiser([[0.3, -0.5], [1.0, 0.0]], [[0.5, 1.0], [1.5, 0.7]])
GAUSS_WIDE.discrete_sigmas = DiscreteSchedule().sigmas  # so get_sigmas gives the DDPM timesteps


def _moments(name, n_samples, sigmas, seed=0):
    gen = _gen(seed)
    x = GAUSS_WIDE.noisy((n_samples, 1, 2, 2), float(sigmas[0]), gen)
    out = _run(name, GAUSS_WIDE, x, sigmas, gen)[-1].x
    return out.mean(0), out.var(0)


# (``sample_ddpm`` is ``sample_ddim`` with eta=1, so "ddim_eta1" would repeat "ddpm" here to the bit.)
@pytest.mark.parametrize("name", ["ddpm", "ddim_eta0.5"])
def test_ancestral_samplers_match_gaussian_moments(name):
    # The full T=1000 DDPM chain (the default grid for 1000 steps).
    n = 10_000
    sigmas = get_sigmas("ddpm", GAUSS_WIDE, 1000)
    mean, var = _moments(name, n, sigmas)
    mu, s = GAUSS_WIDE.mu, GAUSS_WIDE.s
    assert ((mean - mu).abs() < 4.5 * s / math.sqrt(n)).all(), (mean, mu)
    # Statistical tolerance plus the sampler's known O(1/steps) bias: the posterior variance
    # beta-tilde leaves out Var(x0 | x_t), so the variance comes out ~1.5% low at T = 1000 for s=0.5
    # (computed exactly by propagating the Gaussian through the chain).
    rel = var / s**2 - 1
    assert (rel.abs() < 4.5 * math.sqrt(2 / n) + 0.02).all(), rel


def test_ancestral_variance_bias_shrinks_at_weak_order_one():
    # With few steps DDPM under-disperses (by ~35%, ~19%, ~10% at 25, 50, 100 Karras steps); the
    # deficit must vanish like 1/steps, i.e. the sampler converges to the true distribution.
    ns, deficits = [25, 50, 100], []
    for n in ns:
        _, var = _moments("ddpm", 10_000, karras_sigmas(n, SIGMA_MIN, SIGMA_MAX), seed=n)
        deficits.append((1 - var / GAUSS_WIDE.s**2).mean().item())
    order = _slope(ns, deficits)
    assert 0.7 < order < 1.3, (order, deficits)


# ----------------------------------------------------------------------------- point mixture

MIX = PointMixtureDenoiser(torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.5]]).reshape(3, 1, 1, 2), [0.2, 0.5, 0.3])
MIX.discrete_sigmas = DiscreteSchedule().sigmas


def _mixture_run(name, steps, n_samples=4000, seed=0):
    gen = _gen(seed)
    # default grids: the discrete DDPM timesteps for ancestral sampling, Karras' for the ODE
    sigmas = get_sigmas("ddpm" if name in ANCESTRAL else "euler", MIX, steps)
    # exact draws of the noisy marginal at sigmas[0]
    k = torch.multinomial(MIX.weights, n_samples, replacement=True, generator=gen)
    x = MIX.centers[k] + float(sigmas[0]) * torch.randn((n_samples, 1, 1, 2), generator=gen, dtype=torch.float64)
    records = _run(name, MIX, x, sigmas, gen)
    return sigmas, records


def _check_mixture(sigmas, records, n_samples=4000):
    # the samples are the points ...
    idx, dist = MIX.nearest(records[-1].x)
    assert (dist < 1e-6).float().mean() > 0.999, dist.max()
    # ... with the right weights (binomial tolerance per point)
    freq = torch.bincount(idx, minlength=3).double() / n_samples
    w = MIX.weights
    assert ((freq - w).abs() < 4.5 * (w * (1 - w) / n_samples).sqrt()).all(), (freq, w)
    # Just before the final jump the sample should be distributed as the true noisy marginal
    # point + sigma * N(0, I_2), so E |x - nearest point|^2 / sigma^2 = 2 (chi-square, 2 dof, sd 2).
    sigma = float(sigmas[-2])
    _, dist = MIX.nearest(records[-2].x)
    stat = (dist**2).mean().item() / sigma**2
    assert abs(stat - 2) < 4.5 * 2 / math.sqrt(n_samples), stat
    return stat


@pytest.mark.parametrize("name", ANCESTRAL)
def test_ancestral_samplers_on_point_mixture(name):
    _check_mixture(*_mixture_run(name, 100))


@pytest.mark.parametrize("name, steps", [("euler", 512), ("ddim", 512), ("heun", 64), ("dpmpp_2m", 64)])
def test_ode_samplers_on_point_mixture(name, steps):
    _check_mixture(*_mixture_run(name, steps))
    # and with fewer steps they are off (the residual check above is not vacuous)
    sigmas, records = _mixture_run(name, 8)
    _, dist = MIX.nearest(records[-2].x)
    assert (dist**2).mean().item() / float(sigmas[-2]) ** 2 > 5


# ----------------------------------------------------------------------------- DDPM without its noise


def test_ddpm_without_noise_collapses_to_the_mean_where_ddpm_keeps_the_variance():
    # The classic exercise: drop sigma_t z from DDPM's step. On Gaussian data the exact denoiser
    # shrinks towards the mean, and without the fresh noise nothing puts the spread back, so the
    # chain's output variance collapses (here below 1% of the data's) while its mean stays right.
    n = 4000
    sigmas = get_sigmas("ddpm_nonoise", GAUSS_WIDE, 1000)
    assert torch.equal(sigmas, get_sigmas("ddpm", GAUSS_WIDE, 1000))  # the same timesteps as DDPM
    mean, var = _moments("ddpm_nonoise", n, sigmas)
    _, var_ddpm = _moments("ddpm", n, sigmas)
    assert (var < 0.01 * GAUSS_WIDE.s**2).all(), var
    assert (var_ddpm > 0.9 * GAUSS_WIDE.s**2).all(), var_ddpm
    assert ((mean - GAUSS_WIDE.mu).abs() < 0.05).all(), mean
    # It is not DDIM with eta 0, which keeps the full noise weight and so the data's spread.
    gen = _gen(0)
    x = GAUSS_WIDE.noisy((n, 1, 2, 2), float(sigmas[0]), gen)
    ddim = _run("ddim", GAUSS_WIDE, x, sigmas)[-1].x
    assert (ddim.var(0) > 0.9 * GAUSS_WIDE.s**2).all()


def test_ddpm_without_noise_is_ddpm_minus_its_noise_term():
    # One step from the same state: DDPM's result minus the noise it drew is the no-noise result.
    sigmas = get_sigmas("ddpm", GAUSS_WIDE, 1000)[500:502]
    x = GAUSS_WIDE.noisy((64, 1, 2, 2), float(sigmas[0]), _gen(1))
    g = _gen(2)
    ddpm = _run("ddpm", GAUSS_WIDE, x, sigmas, g)[0].x
    z = torch.randn(x.shape, generator=_gen(2), dtype=torch.float32).double()
    nonoise = _run("ddpm_nonoise", GAUSS_WIDE, x, sigmas)[0].x
    ab, ab_next = 1 / (1 + float(sigmas[0]) ** 2), 1 / (1 + float(sigmas[1]) ** 2)
    beta_tilde = (1 - ab_next) / (1 - ab) * (1 - ab / ab_next)  # Ho et al.'s posterior variance (VP frame)
    torch.testing.assert_close(ddpm - nonoise, math.sqrt(beta_tilde / ab_next) * z, rtol=1e-6, atol=1e-9)
