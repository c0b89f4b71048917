"""Multiple Choice Learning: K expert denoisers, winner-takes-all losses and routers.

Training (Guzman-Rivera et al. 2012; Lee et al. 2016; Perera et al. 2024): every expert is scored
on the same noisy batch, giving per-example losses L (B, K); the loss that is back-propagated is
``sum_k w_k L_k`` with weights from ``wta_weights`` (detached):

* ``hard``: only each example's best expert gets gradient (stochastic MCL);
* ``relaxed``: the winner gets ``1 - eps``, the others share ``eps``;
* ``annealed``: softmin weights ``softmax(-L / T)``; the mean at high temperature, hard WTA as T -> 0.

Sampling: ``MCLDenoiser`` routes every sample at every step to an expert (or a mixture of them)
with a router, and remembers which expert served each sample (``last_expert``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .denoisers import Denoiser, as_sigma_batch

WTA_MODES = ("hard", "relaxed", "annealed")


def wta_weights(losses: torch.Tensor, mode: str = "hard", eps: float = 0.05, temperature: float = 1.0) -> torch.Tensor:
    """Weights (B, K) over experts from per-example losses (B, K); rows sum to 1, no gradient."""
    losses = losses.detach().float()
    b, k = losses.shape
    winner = losses.argmin(dim=1)
    if mode == "hard":
        return torch.nn.functional.one_hot(winner, k).float()
    if mode == "relaxed":
        if k == 1:
            return torch.ones_like(losses)
        w = torch.full_like(losses, eps / (k - 1))
        w[torch.arange(b), winner] = 1 - eps
        return w
    if mode == "annealed":
        if temperature <= 0:
            return torch.nn.functional.one_hot(winner, k).float()
        return torch.softmax(-losses / temperature, dim=1)
    raise ValueError(f"unknown WTA mode {mode!r}; expected one of {WTA_MODES}")


def wta_loss(losses: torch.Tensor, mode: str = "hard", eps: float = 0.05, temperature: float = 1.0) -> torch.Tensor:
    """Scalar MCL loss: the WTA-weighted per-example losses, averaged over the batch."""
    return (wta_weights(losses, mode, eps, temperature) * losses).sum(dim=1).mean()


def annealed_temperature(progress: float, t_start: float = 1.0, t_end: float = 1e-4) -> float:
    """Exponential temperature schedule from ``t_start`` (progress 0) to ``t_end`` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return t_start * (t_end / t_start) ** progress


def win_counts(losses: torch.Tensor) -> torch.Tensor:
    """How many examples each expert wins (K,)."""
    return torch.bincount(losses.detach().argmin(dim=1), minlength=losses.shape[1])


# ---------------------------------------------------------------------------------------------
# Routers


@dataclass
class Route:
    index: torch.Tensor  # (B,) expert serving each sample (argmax of weights for mixtures)
    weights: torch.Tensor | None = None  # (B, K) mixture weights, or None for a hard choice
    probs: torch.Tensor | None = None  # (B, K) gating probabilities, when a gate was used


class Router:
    name = "router"

    def reset(self, batch_size: int, num_experts: int, generator: torch.Generator | None = None) -> None:
        pass

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, mcl: "MCLDenoiser") -> Route:
        raise NotImplementedError


class ExpertRouter(Router):
    """Always expert ``k``."""

    def __init__(self, k: int):
        self.k = int(k)
        self.name = f"expert:{self.k}"

    def __call__(self, x, sigma, mcl):
        return Route(torch.full((x.shape[0],), self.k, dtype=torch.long, device=x.device))


def noise_bands(sigma: torch.Tensor, num_experts: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Default heuristic: K equal bands of log-sigma over [sigma_min, sigma_max]; expert 0 serves
    the noisiest band, expert K-1 the cleanest."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    pos = (hi - sigma.double().clamp_min(1e-12).log()) / (hi - lo)  # 0 at sigma_max, 1 at sigma_min
    return (pos * num_experts).floor().long().clamp(0, num_experts - 1)


class HeuristicRouter(Router):
    """A fixed rule from the noise level (and K) to an expert; ``rule(sigma, K, sigma_min, sigma_max)``."""

    name = "heuristic"

    def __init__(self, rule: Callable[..., torch.Tensor] = noise_bands):
        self.rule = rule

    def __call__(self, x, sigma, mcl):
        return Route(self.rule(sigma, mcl.num_experts, mcl.sigma_min, mcl.sigma_max).to(x.device))


class GatedRouter(Router):
    """Argmax of the gating network, per sample and step."""

    name = "gated"

    def __call__(self, x, sigma, mcl):
        probs = mcl.gate_probs(x, sigma)
        return Route(probs.argmax(dim=1), probs=probs)


class SoftRouter(Router):
    """Mixture of all experts' predictions weighted by the gating probabilities."""

    name = "soft"

    def __call__(self, x, sigma, mcl):
        probs = mcl.gate_probs(x, sigma)
        return Route(probs.argmax(dim=1), weights=probs, probs=probs)


class PooledRouter(Router):
    """Each sample gets one random expert (from the sampling seed) for its whole trajectory."""

    name = "pooled"

    def __init__(self):
        self.choice: torch.Tensor | None = None

    def reset(self, batch_size, num_experts, generator=None):
        self.choice = torch.randint(0, num_experts, (batch_size,), generator=generator, device="cpu")

    def __call__(self, x, sigma, mcl):
        if self.choice is None:
            raise RuntimeError("pooled routing needs reset(batch_size, ...) before sampling")
        b = x.shape[0]
        if b % len(self.choice):
            raise RuntimeError(f"pooled routing was reset for {len(self.choice)} samples, got a batch of {b}")
        return Route(self.choice.repeat(b // len(self.choice)).to(x.device))


ROUTINGS = ("expert:K", "heuristic", "gated", "soft", "pooled")


def make_router(spec: str, num_experts: int | None) -> Router:
    """``expert:K``, ``heuristic``, ``gated``, ``soft`` or ``pooled``; ``num_experts=None`` checks
    the spelling only (any K >= 0 is accepted)."""
    spec = str(spec).strip().lower()
    if spec.startswith("expert:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad routing {spec!r}: expected expert:K with K an integer") from None
        if k < 0 or (num_experts is not None and k >= num_experts):
            bound = "be at least 0" if num_experts is None else f"be in 0..{num_experts - 1}"
            raise ValueError(f"bad routing {spec!r}: expert index must {bound}")
        return ExpertRouter(k)
    routers = {"heuristic": HeuristicRouter, "gated": GatedRouter, "soft": SoftRouter, "pooled": PooledRouter}
    if spec not in routers:
        experts = "expert:K" if num_experts is None else f"expert:0..expert:{num_experts - 1}"
        raise ValueError(f"unknown routing {spec!r}; expected one of {experts}, heuristic, gated, soft, pooled")
    return routers[spec]()


class MCLDenoiser(Denoiser):
    """K expert denoisers behind a router. Only the experts a step needs are evaluated, each on
    its own samples; soft routing evaluates all and mixes their predictions."""

    def __init__(self, experts: list[Denoiser], router: Router, gate: torch.nn.Module | None = None):
        super().__init__()
        self.experts = torch.nn.ModuleList(experts)
        self.router = router
        self.gate = gate
        first = experts[0]
        self.sigma_min = first.sigma_min
        self.sigma_max = first.sigma_max
        self.discrete_sigmas = getattr(first, "discrete_sigmas", None)
        self.last_expert: torch.Tensor | None = None
        self.last_gate_probs: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def gate_probs(self, x, sigma) -> torch.Tensor:
        if self.gate is None:
            raise ValueError(f"routing {self.router.name!r} needs a gating network, and none is loaded")
        return torch.softmax(self.gate(x, sigma).float(), dim=1)

    def reset(self, batch_size, generator=None):
        self.router.reset(batch_size, self.num_experts, generator)
        self.last_expert = self.last_gate_probs = None

    def forward(self, x, sigma, label=None):
        sigma = as_sigma_batch(sigma, x)
        route = self.router(x, sigma, self)
        if route.weights is not None:
            out = sum(route.weights[:, k, None, None, None].to(x.dtype) * expert(x, sigma, label) for k, expert in enumerate(self.experts))
        else:
            out = torch.empty_like(x)
            for k in route.index.unique().tolist():
                m = route.index == k
                out[m] = self.experts[k](x[m], sigma[m], None if label is None else label[m])
        self.last_expert = route.index.detach().cpu()
        self.last_gate_probs = None if route.probs is None else route.probs.detach().cpu()
        return out
