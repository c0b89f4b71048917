"""Training objectives over one shared definition of the noise level.

The noise level is Karras et al.'s (EDM) sigma: a noisy image is ``x = x0 + sigma * noise``.
Each objective draws training inputs, returns per-example losses (MCL needs them) and turns a
trained network into a denoiser ``D(x, sigma, label) -> x0`` (see ``diffusion_core.denoisers``).

* ``EpsilonObjective``: DDPM epsilon-prediction on a discrete schedule (Ho et al. 2020). The
  network sees ``x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) eps`` which is the sigma-space
  image scaled by ``1 / sqrt(sigma^2 + 1)`` with ``sigma_t = sqrt((1 - alphabar_t) / alphabar_t)``.
  With ``min_snr_gamma`` the per-example loss is weighted by ``min(SNR, gamma) / SNR``
  (Min-SNR-gamma, Hang et al. 2023; ``SNR = alphabar / (1 - alphabar) = 1 / sigma^2``).
  ``t_sampling="lognormal"`` draws the timesteps with EDM's density instead of uniformly
  (``ln sigma ~ N(P_mean, P_std^2)``, each draw taken to the nearest training timestep in
  log-sigma), and ``edm_weight`` weights the epsilon loss by ``1 + sigma^2 / sigma_data^2``, which
  is EDM's ``lambda(sigma) |D - x0|^2`` written for an epsilon network (``D = x - sigma eps``).
  Both only shape training: the network stays an epsilon predictor on the discrete schedule
  (the VP preconditioning of Karras et al. 2022, Table 1, trained with EDM's distribution).
* ``EDMObjective``: Karras et al. 2022 (EDM): variance-exploding, ``sigma`` log-normal
  (``ln sigma ~ N(P_mean, P_std^2)``), the network preconditioned (``EDMDenoiser``) and trained on
  ``F_target = (x0 - c_skip x) / c_out``, which is EDM's loss weight ``lambda(sigma)`` on ``|D - x0|^2``.
* ``FlowObjective``: rectified flow (velocity prediction, Liu et al. 2022):
  ``x_t = (1 - t) x0 + t eps``, target ``eps - x0``, which is sigma-space at ``sigma = t / (1 - t)``.
  ``t`` is uniform, or logit-normal (``t = sigmoid(m + s u)``, ``u ~ N(0, 1)``; Esser et al. 2024,
  the Stable Diffusion 3 study, found it the best of their rectified-flow timestep densities): the
  latter spends training on the middle of the path, where a digit takes its shape, as EDM's
  log-normal sigma does.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .denoisers import EDMDenoiser, EpsDenoiser, FlowDenoiser, edm_scalings, edm_time


@dataclass
class ScheduleConfig:
    kind: str = "linear"  # "linear" or "cosine"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


class DiscreteSchedule:
    """A discrete DDPM noise schedule and its map between timesteps and sigmas.

    ``sigma_to_t`` interpolates linearly in log-sigma between the discrete levels, so a denoiser
    can be queried at any sigma in ``[sigma_min, sigma_max]`` (as k-diffusion and diffusers do).
    """

    def __init__(self, config: ScheduleConfig | dict | None = None, **kwargs):
        if config is None:
            config = ScheduleConfig(**kwargs)
        elif isinstance(config, dict):
            config = ScheduleConfig(**config)
        self.config = config
        n = config.num_timesteps
        if n < 2:
            raise ValueError("num_timesteps must be at least 2")
        if config.kind == "linear":
            betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float64)
        elif config.kind == "cosine":  # Nichol & Dhariwal 2021
            s = 0.008
            steps = torch.arange(n + 1, dtype=torch.float64) / n
            f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"unknown schedule kind {config.kind!r}; expected 'linear' or 'cosine'")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # float64, increasing
        self.log_sigmas = self.sigmas.log()

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of ``sigma`` by linear interpolation in log-sigma (clamped to the range)."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        log_sigmas = self.log_sigmas.to(log_sigma.device)
        idx = torch.searchsorted(log_sigmas, log_sigma.clamp(log_sigmas[0], log_sigmas[-1]).contiguous())
        low = (idx - 1).clamp(0, len(log_sigmas) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low + w

    def nearest_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The training timestep (long) nearest to each ``sigma`` in log-sigma (clamped to the range)."""
        return self.sigma_to_t(sigma).round().long()

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        log_sigmas = self.log_sigmas.to(t.device)
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def _per_example_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).square().flatten(1).mean(dim=1)


class Objective:
    """Base class. A batch from ``training_batch`` holds the network inputs and the target, so
    several networks (MCL experts) can be scored on the same noise and noise levels."""

    name = "objective"

    def training_batch(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        raise NotImplementedError

    def training_batch_at(self, x0: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """A training batch at the noise levels ``sigma`` (B,) chosen by the caller instead of
        drawn from the objective's density (a discrete schedule takes the nearest timestep); the
        gating network trains on levels spread evenly in log-sigma this way."""
        raise NotImplementedError

    def loss(self, net, batch: dict, label: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example loss (B,) of ``net`` on a batch from ``training_batch``."""
        return self.loss_from_prediction(net(batch["net_input"], batch["net_time"], label), batch)

    def loss_from_prediction(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per-example loss (B,) of a network output ``pred`` (B, C, H, W) on ``batch``, with the
        batch's per-example ``weight`` when it has one."""
        loss = _per_example_mse(pred, batch["target"])
        return loss * batch["weight"] if "weight" in batch else loss

    def denoiser(self, net):
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError


TEACHER_WEIGHTS = ("full", "blend")


def teacher_target(batch: dict, teacher_x0: torch.Tensor, weight: str = "blend", sigma_data: float = 0.5) -> torch.Tensor:
    """An epsilon batch's target with a class-conditional teacher: ``noise + w (x0 - D_T) / sigma``,
    where ``teacher_x0`` is the teacher's ``D_T(x, sigma, y)`` given each image's true label ``y``.
    That is ``(1 - w) noise + w eps_T`` for the teacher's epsilon ``eps_T = (x - D_T) / sigma``.
    ``weight="full"``: ``w = 1``, the teacher's epsilon alone; ``"blend"``:
    ``w = sigma^2 / (sigma^2 + sigma_data^2)``, which fades the teacher out at low noise.

    For an exact teacher ``E[D_T(x, sigma, y) | x] = E[x0 | x]`` (the tower property over the
    label), so the target's mean given the noisy image, which is what the loss's minimiser
    predicts, is the noise target's at any ``w``: the unconditional model is unchanged (the
    argument of Stable Target Field, Xu et al. 2023). What the teacher removes is the spread of
    clean images within a class, the bulk of the target's variance at high noise; the blend keeps
    the noise target at low noise, where the teacher's own error divided by sigma would dominate."""
    if weight not in TEACHER_WEIGHTS:
        raise ValueError(f"teacher weight must be one of {', '.join(TEACHER_WEIGHTS)}, got {weight!r}")
    x, sigma, noise = batch["x_sigma"].float(), batch["sigma"].float(), batch["target"].float()
    s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
    w = torch.ones_like(s) if weight == "full" else s.square() / (s.square() + sigma_data**2)
    x0 = x - s * noise
    return noise + w * (x0 - teacher_x0.float()) / s


EPS_T_SAMPLING = ("uniform", "lognormal")


class EpsilonObjective(Objective):
    """DDPM epsilon prediction; see the module docstring for ``min_snr_gamma``, ``t_sampling``
    (with ``p_mean``, ``p_std``) and ``edm_weight`` (with ``sigma_data``). A checkpoint without
    these fields was trained with uniform timesteps and no EDM weight."""

    name = "ddpm_eps"

    def __init__(self, schedule: DiscreteSchedule | ScheduleConfig | dict | None = None, min_snr_gamma: float | None = None,
                 t_sampling: str = "uniform", p_mean: float = -1.2, p_std: float = 1.2, edm_weight: bool = False,
                 sigma_data: float = 0.5):
        self.schedule = schedule if isinstance(schedule, DiscreteSchedule) else DiscreteSchedule(schedule)
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be positive (got {min_snr_gamma})")
        if t_sampling not in EPS_T_SAMPLING:
            raise ValueError(f"t_sampling must be one of {', '.join(EPS_T_SAMPLING)}, got {t_sampling!r}")
        if not (math.isfinite(p_mean) and math.isfinite(p_std) and p_std > 0 and sigma_data > 0):
            raise ValueError(f"log-normal timesteps need a finite P_mean, a positive P_std and sigma_data, got {p_mean}, {p_std}, {sigma_data}")
        if edm_weight and min_snr_gamma is not None:
            raise ValueError("choose one loss weight: min_snr_gamma or edm_weight")
        self.min_snr_gamma = min_snr_gamma
        self.t_sampling, self.p_mean, self.p_std = t_sampling, float(p_mean), float(p_std)
        self.edm_weight, self.sigma_data = bool(edm_weight), float(sigma_data)

    def sample_t(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        """``n`` training timesteps (long) from ``t_sampling``."""
        if self.t_sampling == "uniform":
            return torch.randint(0, self.schedule.num_timesteps, (n,), generator=generator, device=device)
        log_sigma = self.p_mean + self.p_std * torch.randn((n,), generator=generator, device=device, dtype=torch.float64)
        return self.schedule.nearest_t(log_sigma.exp())

    def training_batch(self, x0, generator=None):
        dev = generator.device if generator is not None else x0.device
        return self._batch_at_t(x0, self.sample_t(x0.shape[0], generator, dev).to(x0.device), generator)

    def training_batch_at(self, x0, sigma, generator=None):
        return self._batch_at_t(x0, self.schedule.nearest_t(sigma).to(x0.device), generator)

    def _batch_at_t(self, x0, t, generator):
        dev = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=dev).to(x0.device, x0.dtype)
        ab = self.schedule.alphas_cumprod.to(x0.device)[t].float()[:, None, None, None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        sigma = self.schedule.sigmas.to(x0.device)[t].float()
        batch = {"net_input": x_t, "net_time": t.float(), "target": noise, "sigma": sigma, "x_sigma": x0 + sigma[:, None, None, None] * noise}
        if self.min_snr_gamma is not None:
            snr = 1 / sigma.double() ** 2
            batch["weight"] = (snr.clamp(max=self.min_snr_gamma) / snr).float()
        elif self.edm_weight:
            batch["weight"] = 1 + sigma.square() / self.sigma_data**2
        return batch

    def denoiser(self, net):
        return EpsDenoiser(net, self.schedule)

    def to_dict(self):
        d = {"name": self.name, "schedule": asdict(self.schedule.config)}
        if self.min_snr_gamma is not None:
            d["min_snr_gamma"] = self.min_snr_gamma
        if self.t_sampling != "uniform":
            d.update(t_sampling=self.t_sampling, p_mean=self.p_mean, p_std=self.p_std)
        if self.edm_weight:
            d.update(edm_weight=True, sigma_data=self.sigma_data)
        return d


class EDMObjective(Objective):
    """Karras et al. 2022 (EDM), variance exploding: see the module docstring."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not (sigma_data > 0 and p_std > 0 and 0 < sigma_min < sigma_max):
            raise ValueError(f"bad EDM settings: sigma_data={sigma_data}, p_std={p_std}, sigma range [{sigma_min}, {sigma_max}]")
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def training_batch(self, x0, generator=None):
        n = x0.shape[0]
        dev = generator.device if generator is not None else x0.device
        sigma = (self.p_mean + self.p_std * torch.randn((n,), generator=generator, device=dev)).exp().to(x0.device)
        return self.training_batch_at(x0, sigma, generator)

    def training_batch_at(self, x0, sigma, generator=None):
        dev = generator.device if generator is not None else x0.device
        sigma = sigma.to(x0.device, torch.float32)
        noise = torch.randn(x0.shape, generator=generator, device=dev).to(x0.device, x0.dtype)
        x = x0 + sigma[:, None, None, None] * noise
        c_skip, c_out, c_in = (c[:, None, None, None] for c in edm_scalings(sigma, self.sigma_data))
        return {"net_input": c_in * x, "net_time": edm_time(sigma), "target": (x0 - c_skip * x) / c_out, "sigma": sigma, "x_sigma": x}

    def denoiser(self, net):
        return EDMDenoiser(net, self.sigma_data, self.sigma_min, self.sigma_max)

    def to_dict(self):
        return {"name": self.name, "sigma_data": self.sigma_data, "p_mean": self.p_mean, "p_std": self.p_std,
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


FLOW_T_SAMPLING = ("uniform", "logit_normal")


class FlowObjective(Objective):
    """Rectified flow; the network's time input is ``1000 * t``. ``t_sampling``: the training
    density of ``t``, ``uniform`` or ``logit_normal`` (``logit_mean``, ``logit_std``); it only
    shapes training, and a checkpoint without the field was trained with ``uniform``."""

    name = "rectified_flow"

    def __init__(self, sigma_max: float = 80.0, sigma_min: float = 0.002, t_sampling: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0):
        if t_sampling not in FLOW_T_SAMPLING:
            raise ValueError(f"t_sampling must be one of {', '.join(FLOW_T_SAMPLING)}, got {t_sampling!r}")
        if not (math.isfinite(logit_mean) and math.isfinite(logit_std) and logit_std > 0):
            raise ValueError(f"logit-normal t needs a finite mean and a positive std, got {logit_mean}, {logit_std}")
        self.sigma_max = sigma_max
        self.sigma_min = sigma_min
        self.t_sampling = t_sampling
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)

    def sample_t(self, n: int, generator=None, device="cpu") -> torch.Tensor:
        """``n`` training times in (0, 1) from ``t_sampling`` (before the clamp to the sigma range)."""
        if self.t_sampling == "logit_normal":
            u = torch.randn((n,), generator=generator, device=device)
            return torch.sigmoid(self.logit_mean + self.logit_std * u)
        return torch.rand((n,), generator=generator, device=device)

    def training_batch(self, x0, generator=None):
        n = x0.shape[0]
        dev = generator.device if generator is not None else x0.device
        t = self.sample_t(n, generator, dev).to(x0.device)
        t_max = self.sigma_max / (1 + self.sigma_max)
        t = (t * t_max).clamp_min(self.sigma_min / (1 + self.sigma_min))
        return self._batch_at_t(x0, t, generator)

    def training_batch_at(self, x0, sigma, generator=None):
        sigma = sigma.to(x0.device, torch.float32)
        return self._batch_at_t(x0, sigma / (1 + sigma), generator)

    def _batch_at_t(self, x0, t, generator):
        dev = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=dev).to(x0.device, x0.dtype)
        tt = t[:, None, None, None]
        x_t = (1 - tt) * x0 + tt * noise
        sigma = t / (1 - t)
        return {"net_input": x_t, "net_time": 1000 * t, "target": noise - x0, "sigma": sigma, "x_sigma": x0 + sigma[:, None, None, None] * noise}

    def denoiser(self, net):
        return FlowDenoiser(net, sigma_min=self.sigma_min, sigma_max=self.sigma_max)

    def to_dict(self):
        d = {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "t_sampling": self.t_sampling}
        if self.t_sampling == "logit_normal":
            d.update(logit_mean=self.logit_mean, logit_std=self.logit_std)
        return d


def objective_from_dict(d: dict) -> Objective:
    d = dict(d)
    name = d.pop("name", None)
    if name == EpsilonObjective.name:
        keys = ("min_snr_gamma", "t_sampling", "p_mean", "p_std", "edm_weight", "sigma_data")
        return EpsilonObjective(ScheduleConfig(**d.get("schedule", {})), **{k: d[k] for k in keys if k in d})
    if name == EDMObjective.name:
        return EDMObjective(**d)
    if name == FlowObjective.name:
        return FlowObjective(**d)
    names = [EpsilonObjective.name, EDMObjective.name, FlowObjective.name]
    raise ValueError(f"unknown objective {name!r}; expected one of {names}")
