"""Classifier-free guidance and MCL: WTA losses, win counts, routers and the routed denoiser."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion_core.denoisers import Denoiser, as_sigma_batch
from diffusion_core.guidance import CFGDenoiser
from diffusion_core.mcl import (
    GatedRouter,
    HeuristicRouter,
    MCLDenoiser,
    PooledRouter,
    SoftRouter,
    annealed_temperature,
    make_router,
    noise_bands,
    win_counts,
    wta_loss,
    wta_weights,
)
from diffusion_core.models import load_model

B, K = 6, 3


# --- classifier-free guidance ---------------------------------------------------------------


class Recording(Denoiser):
    """Wraps a denoiser and records the batch size of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.batches = []

    def forward(self, x, sigma, label=None):
        self.batches.append(x.shape[0])
        return self.inner(x, sigma, label)


@pytest.fixture(scope="module")
def cond_denoiser(tiny_checkpoints):
    model = load_model(tiny_checkpoints / "cfg.safetensors")
    return model.objective.denoiser(model.net), model.num_classes


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 28, 28, generator=g) * 3
    return x, torch.tensor([3.0, 3.0, 0.5, 10.0]), torch.tensor([0, 3, 7, 9])


def test_cfg_g0_is_exactly_unconditional(cond_denoiser, batch):
    inner, null = cond_denoiser
    x, sigma, y = batch
    rec = Recording(inner)
    out = CFGDenoiser(rec, 0.0, null)(x, sigma, y)
    expected = inner(x, sigma, torch.full((4,), null))
    assert torch.equal(out, expected)
    assert rec.batches == [4]  # a single pass of B
    assert not torch.allclose(expected, inner(x, sigma, y)), "labels should matter for this test to mean anything"


def test_cfg_g1_is_exactly_conditional(cond_denoiser, batch):
    inner, null = cond_denoiser
    x, sigma, y = batch
    rec = Recording(inner)
    assert torch.equal(CFGDenoiser(rec, 1.0, null)(x, sigma, y), inner(x, sigma, y))
    assert rec.batches == [4]


@pytest.mark.parametrize("g", [0.5, 2.0, 7.5])
def test_cfg_guided_is_extrapolation_in_one_pass(cond_denoiser, batch, g):
    inner, null = cond_denoiser
    x, sigma, y = batch
    rec = Recording(inner)
    out = CFGDenoiser(rec, g, null)(x, sigma, y)
    assert rec.batches == [8]  # one batched forward pass of 2B
    cond, uncond = inner(x, sigma, y), inner(x, sigma, torch.full((4,), null))
    torch.testing.assert_close(out, uncond + g * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_cfg_without_label_is_unconditional_and_rejects_nan(cond_denoiser, batch):
    inner, null = cond_denoiser
    x, sigma, _ = batch
    assert torch.equal(CFGDenoiser(inner, 3.0, null)(x, sigma, None), inner(x, sigma, torch.full((4,), null)))
    with pytest.raises(ValueError, match="finite"):
        CFGDenoiser(inner, math.nan, null)


# --- WTA losses ------------------------------------------------------------------------------


def expert_outputs_and_losses(seed=0):
    """K leaf tensors (one expert's predictions each) and the per-example losses (B, K)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(B, 5, generator=g)
    outs = [torch.randn(B, 5, generator=g).requires_grad_() for _ in range(K)]
    losses = torch.stack([(o - target).square().mean(dim=1) for o in outs], dim=1)
    return outs, target, losses


def analytic_grad(o, target):
    """d/d o[b] of the per-example loss mean((o[b] - t[b])^2), for every b (B, 5)."""
    return 2 * (o.detach() - target) / o.shape[1]


def test_hard_wta_gradient_reaches_only_each_examples_winner():
    outs, target, losses = expert_outputs_and_losses()
    winner = losses.detach().argmin(dim=1)
    assert len(set(winner.tolist())) > 1, "the test needs several winning experts"
    wta_loss(losses, "hard").backward()
    for k, o in enumerate(outs):
        for b in range(B):
            if winner[b] == k:
                torch.testing.assert_close(o.grad[b], analytic_grad(o, target)[b] / B)
            else:
                assert torch.count_nonzero(o.grad[b]) == 0, f"loser {k} got gradient on example {b}"


def test_hard_wta_on_parameters():
    """With expert networks, only experts that win some example get parameter gradients."""
    torch.manual_seed(0)
    experts = [nn.Linear(4, 4) for _ in range(K)]
    x, target = torch.randn(8, 4), torch.randn(8, 4)
    with torch.no_grad():
        experts[2].bias.add_(100.0)  # expert 2 is far off and never wins
    losses = torch.stack([(e(x) - target).square().mean(dim=1) for e in experts], dim=1)
    assert 2 not in losses.argmin(dim=1).tolist()
    wta_loss(losses, "hard").backward()
    assert experts[2].weight.grad is None or torch.count_nonzero(experts[2].weight.grad) == 0
    winners = set(losses.argmin(dim=1).tolist())
    for k in winners:
        assert torch.count_nonzero(experts[k].weight.grad) > 0


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_relaxed_wta_gives_losers_their_eps_share(eps):
    outs, target, losses = expert_outputs_and_losses()
    winner = losses.detach().argmin(dim=1)
    w = wta_weights(losses, "relaxed", eps=eps)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(B))
    for b in range(B):
        for k in range(K):
            assert w[b, k].item() == pytest.approx(1 - eps if k == winner[b] else eps / (K - 1))
    wta_loss(losses, "relaxed", eps=eps).backward()
    for k, o in enumerate(outs):
        for b in range(B):
            share = 1 - eps if k == winner[b] else eps / (K - 1)
            torch.testing.assert_close(o.grad[b], share * analytic_grad(o, target)[b] / B)


def test_relaxed_with_one_expert_is_plain_loss():
    losses = torch.rand(B, 1)
    assert torch.equal(wta_weights(losses, "relaxed"), torch.ones(B, 1))


def test_annealed_tends_to_mean_at_high_temperature():
    _, _, losses = expert_outputs_and_losses()
    w = wta_weights(losses, "annealed", temperature=1e6)
    torch.testing.assert_close(w, torch.full((B, K), 1 / K), rtol=0, atol=1e-5)
    torch.testing.assert_close(wta_loss(losses, "annealed", temperature=1e6), losses.mean(), rtol=1e-5, atol=0)


def test_annealed_tends_to_hard_wta_as_temperature_falls():
    _, _, losses = expert_outputs_and_losses()
    hard = wta_weights(losses, "hard")
    gaps = []
    for t in (1.0, 0.1, 0.01, 1e-3, 1e-5):
        gaps.append((wta_weights(losses, "annealed", temperature=t) - hard).abs().max().item())
    assert all(a >= b for a, b in zip(gaps, gaps[1:])), gaps  # monotone approach
    assert gaps[0] > 0.05 and gaps[-1] < 1e-6
    assert torch.equal(wta_weights(losses, "annealed", temperature=0), hard)
    torch.testing.assert_close(wta_loss(losses, "annealed", temperature=1e-6), wta_loss(losses, "hard"))


def test_annealed_gradient_is_softmin_weighted():
    outs, target, losses = expert_outputs_and_losses()
    t = 0.3
    w = torch.softmax(-losses.detach() / t, dim=1)
    wta_loss(losses, "annealed", temperature=t).backward()
    for k, o in enumerate(outs):
        torch.testing.assert_close(o.grad, w[:, k, None] * analytic_grad(o, target) / B)


def test_annealed_temperature_schedule():
    assert annealed_temperature(0.0, 1.0, 1e-4) == pytest.approx(1.0)
    assert annealed_temperature(1.0, 1.0, 1e-4) == pytest.approx(1e-4)
    assert annealed_temperature(0.5, 1.0, 1e-4) == pytest.approx(1e-2)
    assert annealed_temperature(-3) == annealed_temperature(0) and annealed_temperature(7) == annealed_temperature(1)
    temps = [annealed_temperature(p / 10) for p in range(11)]
    assert all(a > b for a, b in zip(temps, temps[1:]))


def test_unknown_wta_mode():
    with pytest.raises(ValueError, match="unknown WTA mode"):
        wta_weights(torch.rand(2, 3), "soft")


def test_win_counts():
    losses = torch.tensor([[0.1, 0.5, 0.9, 1.0], [0.7, 0.2, 0.3, 1.0], [0.5, 0.1, 0.9, 1.0], [0.2, 0.3, 0.4, 1.0], [0.9, 0.8, 0.05, 1.0]])
    assert win_counts(losses).tolist() == [2, 2, 1, 0]  # minlength K: expert 3 never wins


# --- routers and the routed denoiser ----------------------------------------------------------


class ToyExpert(Denoiser):
    """Distinct, cheap expert k: D = x * (k + 1) / (1 + sigma^2) + 0.1 k. Counts its calls."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.calls = []
        self.sigma_min, self.sigma_max = 0.01, 50.0

    def forward(self, x, sigma, label=None):
        self.calls.append(x.shape[0])
        s = as_sigma_batch(sigma, x)[:, None, None, None]
        return x * (self.k + 1) / (1 + s**2) + 0.1 * self.k


class ToyGate(nn.Module):
    """Logits from the first K pixels: different samples prefer different experts."""

    def forward(self, x, sigma):
        return 10 * x.flatten(1)[:, :K]


def toy_mcl(routing, gate=True):
    experts = [ToyExpert(k) for k in range(K)]
    router = make_router(routing, K) if isinstance(routing, str) else routing
    return MCLDenoiser(experts, router, ToyGate() if gate else None), experts


def toy_x(n=16, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def each_expert(experts, x, sigma):
    outs = [e(x, sigma) for e in experts]
    for e in experts:
        e.calls.clear()
    return outs


@pytest.mark.parametrize("k", range(K))
def test_expert_router_uses_only_expert_k(k):
    mcl, experts = toy_mcl(f"expert:{k}", gate=False)
    x = toy_x()
    full = each_expert(experts, x, 2.0)
    out = mcl(x, 2.0)
    assert torch.equal(out, full[k])
    assert mcl.last_expert.tolist() == [k] * 16
    assert [len(e.calls) for e in experts] == [1 if j == k else 0 for j in range(K)]


@pytest.mark.parametrize("spec,msg", [("expert:3", "expert index must be in 0..2"), ("expert:-1", "0..2"), ("expert:x", "K an integer"), ("random", "unknown routing")])
def test_bad_routing_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        make_router(spec, K)


def test_router_specs_are_normalised():
    assert isinstance(make_router(" Gated ", K), GatedRouter)
    assert isinstance(make_router("SOFT", K), SoftRouter)
    assert isinstance(make_router("pooled", K), PooledRouter)
    assert isinstance(make_router("heuristic", K), HeuristicRouter)
    assert make_router("expert:2", K).k == 2


@pytest.mark.parametrize("k", [1, 3, 5])
def test_heuristic_bands_monotone_and_cover_all_experts(k):
    lo, hi = 0.002, 80.0
    sigmas = torch.logspace(math.log10(hi), math.log10(lo), 200, dtype=torch.float64)  # noisy -> clean
    idx = noise_bands(sigmas, k, lo, hi)
    assert idx[0] == 0 and idx[-1] == k - 1  # expert 0 serves the noisiest band
    assert torch.all(idx[1:] >= idx[:-1]), "bands must be monotone in sigma"
    assert set(idx.tolist()) == set(range(k))
    counts = torch.bincount(idx, minlength=k)
    assert counts.max() - counts.min() <= 2  # equal bands in log-sigma
    assert noise_bands(torch.tensor([1e3, 1e-6]), k, lo, hi).tolist() == [0, k - 1]  # clamped outside the range


def test_heuristic_router_in_the_denoiser_and_swappable_rule():
    mcl, experts = toy_mcl("heuristic", gate=False)
    x = toy_x(4)
    for sigma, want in ((49.0, 0), (0.7, 1), (0.011, 2)):
        out = mcl(x, sigma)
        assert mcl.last_expert.tolist() == [want] * 4
        assert torch.equal(out, each_expert(experts, x, sigma)[want])
    rule = lambda sigma, k, lo, hi: (sigma > 1).long() * (k - 1)  # noqa: E731
    mcl2, _ = toy_mcl(HeuristicRouter(rule), gate=False)
    mcl2(x, torch.tensor([5.0, 0.5, 5.0, 0.5]))
    assert mcl2.last_expert.tolist() == [2, 0, 2, 0]


def test_gated_is_argmax_of_gate_and_evaluates_only_needed_experts():
    mcl, experts = toy_mcl("gated")
    x, sigma = toy_x(), 1.5
    want = ToyGate()(x, sigma).argmax(dim=1)
    assert len(set(want.tolist())) == K, "the toy gate should pick every expert for some sample"
    full = each_expert(experts, x, sigma)
    out = mcl(x, sigma)
    assert torch.equal(mcl.last_expert, want)
    for b in range(len(x)):
        assert torch.equal(out[b], full[want[b]][b])
    # each expert ran once, on exactly its own samples
    assert [e.calls for e in experts] == [[int((want == k).sum())] for k in range(K)]
    torch.testing.assert_close(mcl.last_gate_probs, torch.softmax(ToyGate()(x, sigma), dim=1))


def test_gated_skips_experts_nobody_needs():
    mcl, experts = toy_mcl("gated")
    x = toy_x()
    x.view(16, -1)[:, :K] = torch.tensor([0.0, 5.0, 0.0])  # everyone prefers expert 1
    mcl(x, 1.0)
    assert [len(e.calls) for e in experts] == [0, 1, 0]


def test_soft_is_probability_weighted_mixture():
    mcl, experts = toy_mcl("soft")
    x, sigma = toy_x(), 0.8
    probs = torch.softmax(ToyGate()(x, sigma), dim=1)
    full = each_expert(experts, x, sigma)
    manual = sum(probs[:, k, None, None, None] * o for k, o in enumerate(full))
    out = mcl(x, sigma)
    torch.testing.assert_close(out, manual)
    assert not torch.allclose(out, full[0])
    assert torch.equal(mcl.last_expert, probs.argmax(dim=1))
    assert [e.calls for e in experts] == [[16]] * K  # all experts, once each


def test_gated_without_gate_says_so():
    mcl, _ = toy_mcl("gated", gate=False)
    with pytest.raises(ValueError, match="needs a gating network"):
        mcl(toy_x(2), 1.0)


def test_pooled_is_fixed_per_sample_and_set_by_the_seed():
    mcl, experts = toy_mcl("pooled", gate=False)
    x = toy_x(32)

    def trajectory(seed):
        mcl.reset(32, torch.Generator().manual_seed(seed))
        chosen = []
        for sigma in (40.0, 5.0, 0.5, 0.02):
            out = mcl(x, sigma)
            full = each_expert(experts, x, sigma)
            for b in range(32):
                assert torch.equal(out[b], full[mcl.last_expert[b]][b])
            chosen.append(mcl.last_expert.clone())
        return chosen

    a = trajectory(7)
    assert all(torch.equal(a[0], c) for c in a[1:]), "a sample's expert must not change along its trajectory"
    assert set(a[0].tolist()) == set(range(K))
    b = trajectory(7)
    assert torch.equal(a[0], b[0])
    c = trajectory(8)
    assert not torch.equal(a[0], c[0])
    g = torch.Generator().manual_seed(7)  # the seed's generator alone decides: same draw
    assert torch.equal(a[0], torch.randint(0, K, (32,), generator=g))


def test_pooled_needs_reset_and_follows_a_doubled_cfg_batch():
    mcl, _ = toy_mcl("pooled", gate=False)
    with pytest.raises(RuntimeError, match="reset"):
        mcl(toy_x(2), 1.0)
    mcl.reset(4, torch.Generator().manual_seed(0))
    choice = mcl.router.choice.clone()
    mcl(toy_x(8), 1.0)  # CFG's 2B batch: cond half and uncond half share the choice
    assert mcl.last_expert.tolist() == choice.tolist() * 2
    with pytest.raises(RuntimeError, match="reset for 4 samples"):
        mcl(toy_x(6), 1.0)


def test_routers_with_real_experts(tiny_checkpoints):
    """The loaded tiny MCL ensemble: expert:k equals that expert's own denoiser."""
    model = load_model(tiny_checkpoints / "mcl.safetensors")
    x, sigma = toy_x(3), torch.tensor([2.0, 2.0, 2.0])
    own = [model.objective.denoiser(n)(x, sigma) for n in model.nets]
    assert not torch.allclose(own[0], own[1])
    for k in range(model.num_experts):
        assert torch.equal(model.denoiser(routing=f"expert:{k}")(x, sigma), own[k])
