"""Parity with Hugging Face diffusers' schedulers (a test-only dependency).

One small random ``UNet2DModel`` (inside ``eps_net``, see there) is the epsilon network on both
sides, with the same initial noise and, for ancestral sampling, the same generator. Ours reaches it through
``EpsDenoiser`` (sigma space, ``x = x_vp * sqrt(1 + sigma^2)``); diffusers' schedulers call it
directly. Each of our samplers gets exactly the noise levels diffusers uses, so the comparison
tests the step math. Diffusers' options are chosen to be the textbook algorithms ours implement:

* DDIM / DDPM: ``set_alpha_to_one=True`` (the last step goes to alphabar=1, i.e. sigma=0, where our
  grids end), ``clip_sample=False`` (no clipping of x0 in the textbook update), "leading" spacing.
* Euler / Heun: Karras sigmas ending in 0 (``final_sigmas_type="zero"``); Heun's last step to 0 is
  an Euler step in both (Karras et al. 2022, Algorithm 1).
* DPM-Solver++(2M): ``final_sigmas_type="zero"``, which makes diffusers' last step first order
  (``x = D``), as in k-diffusion's and our ``sample_dpmpp_2m``; ``euler_at_final=False``.

States are float32 on both sides, diffusers' schedules are computed in float32 and ours in float64,
so agreement is to ~1e-6 (ODE samplers) and ~2e-5 (1000 ancestral steps), not to the last bit.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

# diffusers 0.42 + numpy 2 warn inside set_timesteps (np.array on a tensor); not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.usefixtures("one_torch_thread")]  # tiny tensors: one thread is faster

from diffusion_core.denoisers import EpsDenoiser  # noqa: E402
from diffusion_core.objectives import DiscreteSchedule  # noqa: E402
from diffusion_core.samplers import (  # noqa: E402
    discrete_timesteps,
    get_sampler,
    get_sigmas,
    sample_ddim,
)

TOL = 1e-4
SHAPE = (2, 1, 8, 8)
# Our DiscreteSchedule() default. Spelled out: some diffusers schedulers (Heun) default to
# Stable Diffusion's betas instead.
BETAS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def make_unet():
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8,),  # one level (plus the mid block, with attention): ~2 ms a call
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        norm_num_groups=4,
        attention_head_dim=8,
    )
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet():
    return make_unet()


_SCHEDULE = DiscreteSchedule()


def eps_net(unet, x_t, t):
    """The epsilon network both sides sample with: the random UNet around the exact epsilon of
    N(0, I) data, ``sqrt(1 - alphabar_t) x_t``, damped by ``sqrt(alphabar_t)``.

    A raw random UNet's epsilon has nothing to do with the noise, so its samples are of size
    ~ sigma_max * |eps| ~ 500, where float32 round-off alone is ~1e-4. This network keeps samples
    O(1), so an absolute tolerance of 1e-4 is a real test, while the UNet still makes it a
    nonlinear, strongly time-dependent function (``t`` may be fractional; both sides pass theirs).
    """
    sigma = _SCHEDULE.t_to_sigma(t).to(x_t.dtype).reshape(-1, 1, 1, 1)
    alpha = 1 / (1 + sigma**2).sqrt()
    return sigma * alpha * x_t + 0.5 * alpha * unet(x_t, t).sample


def _ours(unet, round_t=False):
    def net(x_t, t, label):
        return eps_net(unet, x_t, t.round() if round_t else t)

    return EpsDenoiser(net, DiscreteSchedule())


def _noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _run_diffusers(scheduler, unet, sample, generator=None, **step_kwargs):
    """The standard diffusers sampling loop."""
    if generator is not None:
        step_kwargs["generator"] = generator
    for t in scheduler.timesteps:
        eps = eps_net(unet, scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(eps, t, sample, **step_kwargs).prev_sample
    return sample


def _run_ours(name, denoiser, x, sigmas, generator=None, **kwargs):
    sampler = sample_ddim if name == "ddim" else get_sampler(name)
    *_, last = sampler(denoiser, x, sigmas, None, generator, **kwargs)
    return last.x


def _vp_sigmas(scheduler):
    """Sigma of each of a VP scheduler's timesteps (from its own alphas_cumprod), then 0."""
    ac = scheduler.alphas_cumprod[scheduler.timesteps].double()
    return torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1, dtype=torch.float64)])


def _assert_close(ours, theirs):
    err = (ours - theirs).abs().max().item()
    assert err <= TOL, f"max abs difference {err:.2e} (sample scale {theirs.abs().max().item():.2f})"


# ----------------------------------------------------------------------------- timestep grids


@pytest.mark.parametrize("steps", [1, 7, 10, 50, 333, 1000])
def test_discrete_timesteps_match_diffusers_defaults(steps):
    for cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler):
        scheduler = cls(**BETAS)  # "leading" spacing and steps_offset 0 are the defaults
        scheduler.set_timesteps(steps)
        assert discrete_timesteps(1000, steps).tolist() == scheduler.timesteps.tolist()


@pytest.mark.parametrize("steps", [10, 50])
def test_default_grids_match_diffusers(unet, steps):
    # diffusers keeps alphas_cumprod in float32, so its smallest sigma, sqrt(1 - alphabar_0) ~ 0.01
    # with alphabar_0 = 1 - 1e-4, is only good to ~1e-4 relative; ours is float64.
    rtol = 2e-4
    ours = _ours(unet)
    ddim = diffusers.DDIMScheduler(**BETAS, set_alpha_to_one=True)
    ddim.set_timesteps(steps)
    torch.testing.assert_close(get_sigmas("ddim", ours, steps), _vp_sigmas(ddim), rtol=rtol, atol=0)
    torch.testing.assert_close(get_sigmas("ddpm", ours, steps), _vp_sigmas(ddim), rtol=rtol, atol=0)
    euler = diffusers.EulerDiscreteScheduler(**BETAS, use_karras_sigmas=True)
    euler.set_timesteps(steps)
    torch.testing.assert_close(get_sigmas("euler", ours, steps), euler.sigmas.double(), rtol=rtol, atol=0)


# ----------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(unet, eta):
    steps = 20
    scheduler = diffusers.DDIMScheduler(**BETAS, set_alpha_to_one=True, clip_sample=False)
    scheduler.set_timesteps(steps)
    noise = _noise()
    theirs = _run_diffusers(scheduler, unet, noise * scheduler.init_noise_sigma, torch.Generator().manual_seed(1), eta=eta)
    sigmas = _vp_sigmas(scheduler)
    x = noise * (1 + sigmas[0] ** 2).sqrt().float()  # VP state -> sigma space
    ours = _run_ours("ddim", _ours(unet), x, sigmas, torch.Generator().manual_seed(1), eta=eta)
    _assert_close(ours, theirs)


# Respaced (50 of 1000) and the full chain. Both sides draw one standard normal of the sample's
# shape per step, after the network call, on the CPU generator, none on the last step (t = 0).
@pytest.mark.parametrize("steps", [50, 1000])
def test_ddpm_matches_diffusers(unet, steps):
    scheduler = diffusers.DDPMScheduler(**BETAS, clip_sample=False, variance_type="fixed_small")
    scheduler.set_timesteps(steps)
    noise = _noise()
    theirs = _run_diffusers(scheduler, unet, noise * scheduler.init_noise_sigma, torch.Generator().manual_seed(1))
    sigmas = _vp_sigmas(scheduler)
    x = noise * (1 + sigmas[0] ** 2).sqrt().float()
    ours = _run_ours("ddpm", _ours(unet), x, sigmas, torch.Generator().manual_seed(1))
    _assert_close(ours, theirs)


@pytest.mark.parametrize("name, cls", [("euler", "EulerDiscreteScheduler"), ("heun", "HeunDiscreteScheduler")])
def test_karras_ode_samplers_match_diffusers(unet, name, cls):
    steps = 12
    scheduler = getattr(diffusers, cls)(**BETAS, use_karras_sigmas=True)
    scheduler.set_timesteps(steps)
    # Euler and Heun work in sigma space in diffusers too: both start from the same x.
    x = _noise() * scheduler.init_noise_sigma
    theirs = _run_diffusers(scheduler, unet, x.clone())
    sigmas = torch.unique_consecutive(scheduler.sigmas).double()  # Heun repeats the inner sigmas
    assert len(sigmas) == steps + 1
    ours = _run_ours(name, _ours(unet), x.clone(), sigmas)
    _assert_close(ours, theirs)


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_matches_diffusers(unet, karras):
    steps = 12
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **BETAS,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=karras,
    )
    scheduler.set_timesteps(steps)
    noise = _noise()
    theirs = _run_diffusers(scheduler, unet, noise * scheduler.init_noise_sigma)
    sigmas = scheduler.sigmas.double()
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0
    # With Karras sigmas diffusers rounds the network's timesteps to integers (but keeps the
    # unrounded sigmas in the update), so our network rounds too; without, they are integers.
    ours = _run_ours("dpmpp_2m", _ours(unet, round_t=karras), noise * (1 + sigmas[0] ** 2).sqrt().float(), sigmas)
    _assert_close(ours, theirs)
