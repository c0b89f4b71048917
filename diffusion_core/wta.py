"""Winner-takes-all losses for Multiple Choice Learning (Guzman-Rivera et al. 2012; Lee et al.
2016; Perera et al. 2024).

Every expert is scored on the same noisy batch, giving per-example losses L (B, K); the loss that
is back-propagated is ``sum_k w_k L_k`` with weights from ``wta_weights`` (detached):

* ``hard``: only each example's best expert gets gradient (stochastic MCL);
* ``relaxed``: the winner gets ``1 - eps``, the others share ``eps``;
* ``annealed``: softmin weights ``softmax(-L / T)``; the mean at high temperature, hard WTA as T -> 0.

Routed training (``wta_assignment``) trains each example through one expert instead. Sampling
from the experts is ``diffusion_core/mcl.py``; the training task is ``mcl_training.py``.
"""
from __future__ import annotations

import torch

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


def wta_assignment(losses: torch.Tensor, mode: str = "hard", eps: float = 0.05, temperature: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One expert per example (B,) for routed MCL training: the winner for hard WTA, else a draw
    with probabilities ``wta_weights``. Training example i through expert ``a_i`` alone has the
    gradient of ``wta_loss`` in expectation (exactly, for hard WTA)."""
    if mode == "hard":
        return losses.detach().argmin(dim=1)
    w = wta_weights(losses, mode, eps, temperature)
    dev = generator.device if generator is not None else w.device
    return torch.multinomial(w.to(dev), 1, generator=generator).squeeze(1).to(losses.device)


def win_counts(losses: torch.Tensor) -> torch.Tensor:
    """How many examples each expert wins (K,)."""
    return torch.bincount(losses.detach().argmin(dim=1), minlength=losses.shape[1])
