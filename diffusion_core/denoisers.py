"""The one interface every model is reached through: ``D(x, sigma, label) -> predicted clean image``.

``x`` is a noisy image in the sigma parameterization of Karras et al. 2022 (EDM),
``x = x0 + sigma * noise``; ``sigma`` is a float or a tensor of shape (B,); ``label`` is a
LongTensor (B,) or None. Samplers (``diffusion_core.samplers``) only ever call this interface.

A denoiser also tells samplers its range of noise levels (``sigma_min``, ``sigma_max``) and, for
models trained on a discrete schedule, the levels it was trained on (``discrete_sigmas``).
Wrappers (classifier-free guidance, MCL routing) are denoisers themselves.

The three network denoisers are affine in their network's output: ``D = from_output(x, sigma,
net(*net_inputs(x, sigma)))``. A network with several outputs for one input (the hypothesis heads
of a shared-trunk MCL) is turned into several denoisers with one pass that way.
"""
from __future__ import annotations

import torch
from torch import nn


def as_sigma_batch(sigma, x: torch.Tensor) -> torch.Tensor:
    """Sigma as a float tensor of shape (B,) on x's device."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(-1).expand(x.shape[0])


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]


class Denoiser(nn.Module):
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    discrete_sigmas: torch.Tensor | None = None  # increasing training levels, if any

    def forward(self, x: torch.Tensor, sigma, label: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def reset(self, batch_size: int, generator: torch.Generator | None = None) -> None:
        """Called once before a trajectory; stateful wrappers (pooled routing) draw here."""

    def serve_range_of(self, inner: Denoiser) -> None:
        """A wrapper's noise levels are those of the denoiser it wraps."""
        self.sigma_min = inner.sigma_min
        self.sigma_max = inner.sigma_max
        self.discrete_sigmas = getattr(inner, "discrete_sigmas", None)


class EpsDenoiser(Denoiser):
    """A DDPM epsilon-prediction network on a discrete schedule, as a denoiser.

    ``x_t = x / sqrt(sigma^2 + 1)`` is what the network saw in training at the (fractional)
    timestep ``t = schedule.sigma_to_t(sigma)``; then ``D = x - sigma * eps``.
    ``net`` is any callable ``net(x_t, t, label) -> eps`` (our UNet, or a diffusers UNet in tests).
    """

    def __init__(self, net, schedule):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.sigma_min = schedule.sigma_min
        self.sigma_max = schedule.sigma_max
        self.discrete_sigmas = schedule.sigmas.float()

    def net_inputs(self, x, sigma):
        """(network input, time input) for ``x`` at ``sigma`` (B,)."""
        return x * _bcast(1 / torch.sqrt(sigma**2 + 1)), self.schedule.sigma_to_t(sigma).to(x.dtype)

    def from_output(self, x, sigma, eps):
        """The clean-image estimate from the network's output."""
        return x - _bcast(sigma) * eps.to(x.dtype)

    def forward(self, x, sigma, label=None):
        sigma = as_sigma_batch(sigma, x)
        return self.from_output(x, sigma, self.net(*self.net_inputs(x, sigma), label))


class FlowDenoiser(Denoiser):
    """A rectified-flow velocity network as a denoiser: ``t = sigma / (1 + sigma)``,
    ``x_t = x / (1 + sigma)``, ``v = net(x_t, 1000 t, label)``, ``D = x_t - t v``."""

    def __init__(self, net, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.net = net
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def net_inputs(self, x, sigma):
        return x / _bcast(1 + sigma), 1000 * (sigma / (1 + sigma))

    def from_output(self, x, sigma, v):
        t = sigma / (1 + sigma)
        return x / _bcast(1 + sigma) - _bcast(t) * v.to(x.dtype)

    def forward(self, x, sigma, label=None):
        sigma = as_sigma_batch(sigma, x)
        return self.from_output(x, sigma, self.net(*self.net_inputs(x, sigma), label))


def edm_time(sigma: torch.Tensor) -> torch.Tensor:
    """The network's noise-level input for EDM: ``1000 * c_noise`` with ``c_noise = ln(sigma) / 4``
    (Karras et al. 2022, Table 1), scaled to the range of DDPM timesteps our UNet embeds."""
    return 250 * sigma.log()


class EDMDenoiser(Denoiser):
    """A network trained with EDM preconditioning (Karras et al. 2022, Table 1) as a denoiser:
    ``D = c_skip x + c_out F(c_in x, 1000 c_noise, label)`` with ``c_skip = sd^2 / (sigma^2 + sd^2)``,
    ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``, ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``sd = sigma_data``."""

    def __init__(self, net, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def net_inputs(self, x, sigma):
        return x * _bcast(edm_scalings(sigma, self.sigma_data)[2]), edm_time(sigma)

    def from_output(self, x, sigma, f):
        c_skip, c_out, _ = edm_scalings(sigma, self.sigma_data)
        return _bcast(c_skip) * x + _bcast(c_out) * f.to(x.dtype)

    def forward(self, x, sigma, label=None):
        sigma = as_sigma_batch(sigma, x)
        return self.from_output(x, sigma, self.net(*self.net_inputs(x, sigma), label))


def edm_scalings(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) of EDM's preconditioning, each of sigma's shape."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt()
