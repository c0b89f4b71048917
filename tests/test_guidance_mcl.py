"""Classifier-free guidance and MCL: WTA losses, win counts, routers and the routed denoiser."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion_core.denoisers import Denoiser, as_sigma_batch
from diffusion_core.guidance import CFGDenoiser
from diffusion_core.mcl import (
    ROUTING_COST,
    ROUTING_HELP,
    ROUTINGS,
    EstimateGatedRouter,
    GatedRouter,
    HeuristicRouter,
    MCLDenoiser,
    PooledRouter,
    SampledRouter,
    SoftRouter,
    StickyRouter,
    WinRateRouter,
    draw_experts,
    make_router,
    noise_bands,
    routing_cost,
    routing_generator,
    routing_needs_gate,
)
from diffusion_core.models import load_model
from diffusion_core.pipeline import Settings, build_denoiser, generate
from diffusion_core.samplers import get_sampler, karras_sigmas
from diffusion_core.wta import annealed_temperature, win_counts, wta_loss, wta_weights

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


def test_watch_gate_shows_the_gate_without_changing_the_route():
    x, sigma = toy_x(), 1.5
    gate_probs = torch.softmax(ToyGate()(x, sigma), dim=1)
    plain, experts = toy_mcl("expert:1")
    out = plain(x, sigma)
    assert plain.last_gate_probs is None and not plain.last_gate_routed  # off by default
    watched, _ = toy_mcl("expert:1")
    watched.watch_gate = True
    assert torch.equal(watched(x, sigma), out) and watched.last_expert.tolist() == [1] * len(x)
    torch.testing.assert_close(watched.last_gate_probs, gate_probs)
    assert not watched.last_gate_routed and watched.last_evals == len(x)  # the gate is not an expert evaluation
    gated, _ = toy_mcl("gated")
    gated.watch_gate = True
    gated(x, sigma)
    assert gated.last_gate_routed and torch.equal(gated.last_expert, gate_probs.argmax(dim=1))
    no_gate, _ = toy_mcl("expert:1", gate=False)
    no_gate.watch_gate = True
    no_gate(x, sigma)
    assert no_gate.last_gate_probs is None  # nothing to watch


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


# --- the routers of issue 9: sampled, winrate, x0gate, scout, sticky ------------------------------


class ConstGate(nn.Module):
    """A gate with known probabilities: the same ``probs`` (K,) for every sample, or one row per
    sample when ``probs`` is (B, K). Records what it was shown."""

    def __init__(self, probs):
        super().__init__()
        self.logp = torch.as_tensor(probs, dtype=torch.float64).log()
        self.seen = []

    def forward(self, x, sigma):
        self.seen.append((x.clone(), torch.as_tensor(sigma).clone()))
        logp = self.logp if self.logp.dim() == 2 else self.logp.expand(x.shape[0], -1)
        return logp.float()


def test_draw_experts_inverse_cdf_by_hand():
    probs = torch.tensor([[0.25, 0.5, 0.25]] * 5, dtype=torch.float64)
    u = torch.tensor([0.0, 0.1, 0.25, 0.74, 0.75], dtype=torch.float64)  # cdf 0.25, 0.75, 1.0 (exact in binary)
    assert draw_experts(probs, u).tolist() == [0, 0, 1, 1, 2]
    assert draw_experts(torch.tensor([[2.0, 0.0, 2.0]] * 3), torch.tensor([0.1, 0.5, 0.99])).tolist() == [0, 2, 2]  # rows normalised; 0 never drawn
    assert draw_experts(torch.tensor([[0.5, 0.5]]), torch.tensor([1.0 - 1e-12])).tolist() == [1]


def test_routing_generator_is_seeded_and_leaves_the_sampler_alone():
    g = torch.Generator().manual_seed(11)
    torch.randn(5, generator=g)  # the sampler has drawn its initial noise
    state = g.get_state()
    a = torch.rand(4, generator=routing_generator(g, "sampled"))
    assert torch.equal(g.get_state(), state), "the sampler's noise stream must not move"
    assert torch.equal(a, torch.rand(4, generator=routing_generator(torch.Generator().manual_seed(11), "sampled")))
    assert not torch.equal(a, torch.rand(4, generator=routing_generator(torch.Generator().manual_seed(12), "sampled")))
    assert not torch.equal(a, torch.rand(4, generator=routing_generator(g, "winrate")))


def z_ok(count, n, p, z=5.0):
    """A binomial count within z standard deviations of n * p."""
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1e-9


def test_sampled_follows_the_gate_probabilities():
    p = [0.6, 0.3, 0.1]
    gate = ConstGate(p)
    mcl = MCLDenoiser([ToyExpert(k) for k in range(K)], SampledRouter(), gate)
    n, steps = 2000, 5
    mcl.reset(n, torch.Generator().manual_seed(0))
    x = torch.zeros(n, 1, 28, 28)
    routes = []
    for sigma in (20.0, 5.0, 1.0, 0.3, 0.05):
        mcl(x, sigma)
        routes.append(mcl.last_expert.clone())
        torch.testing.assert_close(mcl.last_gate_probs, torch.tensor([p] * n))
    r = torch.stack(routes)
    counts = torch.bincount(r.reshape(-1), minlength=K)
    assert all(z_ok(int(c), n * steps, q) for c, q in zip(counts, p)), counts
    # drawn afresh at every step: about 1 - sum p^2 = 54% of samples change expert between two steps
    changed = (r[1:] != r[:-1]).double().mean().item()
    assert abs(changed - (1 - sum(q * q for q in p))) < 0.03
    # per-sample probabilities: a sample whose gate is certain always gets its expert
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.5, 0.5]])
    mcl2 = MCLDenoiser([ToyExpert(k) for k in range(K)], SampledRouter(), ConstGate(rows.repeat(400, 1)))
    mcl2.reset(1200, torch.Generator().manual_seed(1))
    mcl2(torch.zeros(1200, 1, 28, 28), 1.0)
    e = mcl2.last_expert.view(400, 3)
    assert (e[:, 0] == 0).all() and (e[:, 1] == 2).all() and set(e[:, 2].tolist()) == {1, 2}
    assert z_ok(int((e[:, 2] == 1).sum()), 400, 0.5)


def test_sampled_same_seed_same_routes_and_needs_reset():
    def routes(seed):
        mcl = MCLDenoiser([ToyExpert(k) for k in range(K)], make_router("sampled", K), ConstGate([0.4, 0.4, 0.2]))
        mcl.reset(64, torch.Generator().manual_seed(seed))
        out = []
        for sigma in (10.0, 1.0, 0.1):
            mcl(toy_x(64), sigma)
            out.append(mcl.last_expert.clone())
        return torch.stack(out)

    assert torch.equal(routes(3), routes(3))
    assert not torch.equal(routes(3), routes(4))
    # by hand: the k-th step's uniforms are the routing generator's k-th draw of 64
    gen = routing_generator(torch.Generator().manual_seed(3), "sampled")
    want = torch.stack([draw_experts(torch.tensor([[0.4, 0.4, 0.2]] * 64), torch.rand(64, generator=gen, dtype=torch.float64)) for _ in range(3)])
    assert torch.equal(routes(3), want)
    mcl = MCLDenoiser([ToyExpert(k) for k in range(K)], SampledRouter(), ConstGate([0.4, 0.4, 0.2]))
    with pytest.raises(RuntimeError, match="reset"):
        mcl(toy_x(2), 1.0)


def test_sampled_temperature_draws_from_the_tempered_probabilities():
    p = [0.6, 0.3, 0.1]
    n, steps = 2000, 4

    def routes(spec):
        mcl = MCLDenoiser([ToyExpert(k) for k in range(K)], make_router(spec, K), ConstGate(p))
        mcl.reset(n, torch.Generator().manual_seed(7))
        out = []
        for sigma in (10.0, 1.0, 0.3, 0.05):
            mcl(toy_x(n), sigma)
            out.append(mcl.last_expert.clone())
            torch.testing.assert_close(mcl.last_gate_probs, torch.tensor([p] * n))  # the chart keeps the untempered probabilities
        return torch.stack(out)

    assert torch.equal(routes("sampled:1"), routes("sampled"))  # T = 1 is sampled, draw for draw
    for t in (0.5, 2.0):
        q = [v ** (1 / t) for v in p]
        q = [v / sum(q) for v in q]  # by hand: 0.5 -> 0.783, 0.196, 0.022; 2 -> 0.473, 0.334, 0.193
        counts = torch.bincount(routes(f"sampled:{t:g}").reshape(-1), minlength=K)
        assert all(z_ok(int(c), n * steps, want) for c, want in zip(counts, q)), (t, counts, q)
    # a very low temperature is the argmax (gated), a very high one a uniform draw; no NaN from underflow
    assert (routes("sampled:0.001") == 0).all()
    counts = torch.bincount(routes("sampled:100").reshape(-1), minlength=K)
    assert all(z_ok(int(c), n * steps, 1 / K, z=6) for c in counts), counts  # p ** 0.01 is within 2% of uniform
    assert make_router("sampled:2", K).name == "sampled:2" and make_router("sampled:1", K).name == "sampled"
    for bad in ("sampled:0", "sampled:-1", "sampled:abc", "sampled:inf", "sampled:nan", "sampled:101", "sampled:"):
        with pytest.raises(ValueError, match="sampled:T"):
            make_router(bad, K)


def test_winrate_follows_the_given_rates_once_per_trajectory():
    rates = [0.7, 0.0, 0.3]
    mcl = MCLDenoiser([ToyExpert(k) for k in range(K)], make_router("winrate", K, rates))
    n = 3000
    mcl.reset(n, torch.Generator().manual_seed(5))
    x = toy_x(n)
    seen = []
    for sigma in (30.0, 2.0, 0.02):
        out = mcl(x, sigma)
        seen.append(mcl.last_expert.clone())
    assert all(torch.equal(seen[0], s) for s in seen[1:]), "one expert for the whole trajectory"
    full = each_expert(mcl.experts, x, 0.02)
    assert all(torch.equal(out[b], full[seen[-1][b]][b]) for b in range(0, n, 97))
    counts = torch.bincount(seen[0], minlength=K).tolist()
    assert counts[1] == 0, "an expert that never won is never drawn"
    assert z_ok(counts[0], n, 0.7) and z_ok(counts[2], n, 0.3), counts
    # same seed, same draw; the draw is the inverse CDF of the seed's routing generator
    u = torch.rand(n, generator=routing_generator(torch.Generator().manual_seed(5), "winrate"), dtype=torch.float64)
    assert torch.equal(seen[0], draw_experts(torch.tensor([rates] * n), u))
    mcl.reset(4, torch.Generator().manual_seed(0))
    mcl(toy_x(8), 1.0)  # CFG's doubled batch repeats the choice
    assert mcl.last_expert.tolist() == mcl.router.choice.tolist() * 2


def test_winrate_without_rates_is_uniform():
    router = WinRateRouter()
    router.reset(3000, 3, torch.Generator().manual_seed(0))
    counts = torch.bincount(router.choice, minlength=3).tolist()
    assert all(z_ok(c, 3000, 1 / 3) for c in counts), counts


@pytest.mark.parametrize("rates,msg", [([0.5, 0.5], "2 entries, the ensemble has 3"), ([0.5, -0.1, 0.6], "non-negative"),
                                       ([0.0, 0.0, 0.0], "not all zero"), ([0.2, float("nan"), 0.3], "finite"), (["a", 1, 2], "numbers")])
def test_bad_win_rates(rates, msg):
    with pytest.raises(ValueError, match=msg):
        make_router("winrate", K, rates)


def test_win_rates_come_from_the_checkpoint(tiny_checkpoints, tmp_path):
    import shutil

    from diffusion_core.checkpoints import load_checkpoint, update_config

    plain = load_model(tiny_checkpoints / "mcl.safetensors")
    assert plain.win_rates is None and plain.denoiser(routing="winrate").router.win_rates is None
    path = shutil.copy(tiny_checkpoints / "mcl.safetensors", tmp_path / "mcl.safetensors")
    training = load_checkpoint(path)[1]["training"]
    update_config(path, {"training": dict(training, final={"win_rates": [0.1, 0.6, 0.3], "wins": [1, 6, 3]})})
    model = load_model(path)
    assert model.win_rates == [0.1, 0.6, 0.3]
    den = model.denoiser(routing="winrate")
    assert den.router.rates(3).tolist() == pytest.approx([0.1, 0.6, 0.3])
    assert model.denoiser(routing="x0gate").router.scout_expert(3) == 1  # the most frequent winner
    assert load_model(tiny_checkpoints / "cfg.safetensors").win_rates is None
    update_config(path, {"training": dict(training, final={"win_rates": [0.5, 0.5]})})
    with pytest.raises(ValueError, match="2 entries, the ensemble has 3"):
        load_model(path).denoiser(routing="pooled")


class PixelGate(nn.Module):
    """Logits 10 * (first K pixels); records the sigma it was given."""

    def __init__(self):
        super().__init__()
        self.sigmas = []

    def forward(self, x, sigma):
        self.sigmas.append(torch.as_tensor(sigma).clone())
        return 10 * x.flatten(1)[:, :K]


def test_x0gate_routes_on_the_previous_estimate():
    experts = [ToyExpert(k) for k in range(K)]
    gate = PixelGate()
    mcl = MCLDenoiser(experts, make_router("x0gate", K, [0.2, 0.2, 0.6]), gate)
    mcl.reset(16)
    x = toy_x()
    out1 = mcl(x, 10.0)  # first call: no estimate yet -> the scout (most wins: expert 2), no gate
    assert mcl.last_expert.tolist() == [2] * 16 and mcl.last_gate_probs is None and gate.sigmas == []
    assert torch.equal(out1, each_expert(experts, x, 10.0)[2])
    x2 = toy_x(seed=1)
    out2 = mcl(x2, 1.0)
    want = (10 * out1.flatten(1)[:, :K]).argmax(dim=1)  # the gate on the previous output, not on x2
    assert len(set(want.tolist())) > 1
    assert torch.equal(mcl.last_expert, want)
    assert torch.equal(gate.sigmas[-1], torch.full((16,), mcl.sigma_min))  # shown as a clean image
    full = each_expert(experts, x2, 1.0)
    assert all(torch.equal(out2[b], full[want[b]][b]) for b in range(16))
    assert mcl.last_evals == 16  # one expert evaluation per sample
    mcl.reset(16)
    mcl(x, 10.0)
    assert mcl.last_expert.tolist() == [2] * 16, "reset forgets the previous trajectory's estimate"


def test_scout_costs_at_most_two_and_reuses_the_scout():
    experts = [ToyExpert(k) for k in range(K)]
    mcl = MCLDenoiser(experts, make_router("scout", K), PixelGate())  # no rates: expert 0 scouts
    x, sigma = toy_x(), 0.5
    full = each_expert(experts, x, sigma)
    want = (10 * full[0].flatten(1)[:, :K]).argmax(dim=1)
    assert 0 in want.tolist() and len(set(want.tolist())) > 1
    out = mcl(x, sigma)
    assert torch.equal(mcl.last_expert, want)
    assert all(torch.equal(out[b], full[want[b]][b]) for b in range(16))
    # the scout ran once on all 16, every other expert only on its own samples
    assert experts[0].calls == [16]
    assert [e.calls for e in experts[1:]] == [[int((want == k).sum())] if (want == k).any() else [] for k in range(1, K)]
    assert mcl.last_evals == 16 + int((want != 0).sum()) <= 2 * 16


class EstimateGate(nn.Module):
    """A gate trained on (noisy image, estimate, sigma): logits from the estimate's first pixels."""

    takes_estimate = True

    def forward(self, x, sigma, estimate):
        return 10 * estimate.flatten(1)[:, :K] - 10 * x.flatten(1)[:, :K]


def test_a_gate_that_takes_the_estimate_gets_both_images():
    experts = [ToyExpert(k) for k in range(K)]
    mcl = MCLDenoiser(experts, make_router("scout", K), EstimateGate())
    x, sigma = toy_x(), 2.0
    est = each_expert(experts, x, sigma)[0]
    mcl(x, sigma)
    assert torch.equal(mcl.last_expert, (10 * est.flatten(1)[:, :K] - 10 * x.flatten(1)[:, :K]).argmax(dim=1))


class SigmaGate(nn.Module):
    """Prefers expert 0 above sigma 2, expert 1 between, and expert 2 below sigma 0.5; from the
    first pixel's sign it shifts the choice by one for half the samples."""

    def forward(self, x, sigma):
        s = torch.as_tensor(sigma).reshape(-1).expand(x.shape[0])
        base = (s <= 2).long() + (s <= 0.5).long()
        k = (base + (x.flatten(1)[:, 0] > 0).long()) % K
        return 10 * torch.nn.functional.one_hot(k, K).float()


def test_sticky_keeps_the_choice_made_at_the_lock_level():
    x = toy_x()
    shift = (x.flatten(1)[:, 0] > 0).long()
    mcl = MCLDenoiser([ToyExpert(k) for k in range(K)], make_router("sticky", K), SigmaGate())
    mcl.reset(16)
    got = []
    for sigma in (10.0, 3.0, 1.5, 0.8, 0.3, 0.01):
        mcl(x, sigma)
        got.append(mcl.last_expert.clone())
    gated = lambda base: (base + shift) % K  # noqa: E731
    assert torch.equal(got[0], gated(0)) and torch.equal(got[1], gated(0))  # sigma > 1: the gate as usual
    assert torch.equal(got[2], gated(1))  # 1.5 > 1 still follows the gate
    for g in got[3:]:  # first call at sigma <= 1 (0.8) locks the gate's choice there: expert 1 + shift
        assert torch.equal(g, gated(1)), "the choice made at sigma 0.8 is kept although the gate now prefers expert 2"
    mcl.reset(16)
    mcl(x, 0.3)
    assert torch.equal(mcl.last_expert, gated(2)), "reset unlocks"
    early = MCLDenoiser([ToyExpert(k) for k in range(K)], make_router("sticky:5", K), SigmaGate())
    early.reset(16)
    for sigma in (10.0, 3.0, 0.3):
        early(x, sigma)
    assert torch.equal(early.last_expert, gated(0)), "sticky:5 locks at the first call below 5 (sigma 3, where the gate picks 0 + shift)"
    with pytest.raises(RuntimeError, match="locked 16 samples"):
        early(toy_x(4), 0.1)


@pytest.mark.parametrize("spec,msg", [("sticky:0", "positive noise level"), ("sticky:-1", "positive noise level"),
                                      ("sticky:nan", "positive noise level"), ("sticky:x", "sticky:SIGMA"),
                                      ("sampledd", "unknown routing"), ("x0-gate", "unknown routing"), ("", "unknown routing")])
def test_bad_routing_specs_are_refused(spec, msg):
    with pytest.raises(ValueError, match=msg):
        make_router(spec, K)


def test_every_routing_has_help_cost_and_a_router():
    assert set(ROUTING_HELP) == set(ROUTINGS) == set(ROUTING_COST)
    assert all(isinstance(t, str) and 20 < len(t) < 200 for t in ROUTING_HELP.values())
    specs = [r.replace("expert:K", "expert:1") for r in ROUTINGS]
    assert {s: routing_cost(s, 5) for s in specs} == {"expert:1": 1, "heuristic": 1, "gated": 1, "soft": 5, "pooled": 1, "sampled": 1,
                                                       "winrate": 1, "guided": 5, "x0gate": 1, "scout": 2, "sticky": 1}
    assert [s for s in specs if routing_needs_gate(s)] == ["gated", "soft", "sampled", "guided", "x0gate", "scout", "sticky"]
    assert make_router("guided", K).scale == 1.5 and make_router(" Guided:2 ", K).scale == 2.0
    assert routing_needs_gate(" Sticky:0.5 ") and not routing_needs_gate("expert:7")
    assert isinstance(make_router("Sampled", K), SampledRouter) and isinstance(make_router("sticky:2.5", K), StickyRouter)
    assert make_router("sticky:2.5", K).lock_sigma == 2.5 and make_router("sticky", K).name == "sticky"
    assert isinstance(make_router("scout", K), EstimateGatedRouter) and make_router("scout", K).scout
    with pytest.raises(ValueError, match="unknown routing"):
        routing_cost("bogus", 3)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "ddim"])
@pytest.mark.parametrize("routing", [r.replace("expert:K", "expert:2") for r in ROUTINGS])
def test_expert_evaluations_per_image_per_step(routing, sampler):
    """Over whole trajectories, counted in the experts themselves: at most 2 evaluations per image
    per denoiser call for every routing but soft (exactly K)."""
    experts = [ToyExpert(k) for k in range(K)]
    mcl = MCLDenoiser(experts, make_router(routing, K, [0.3, 0.3, 0.4]), SigmaGate())
    calls = []

    class Counting(Denoiser):
        def __init__(self):
            super().__init__()
            self.inner, self.sigma_min, self.sigma_max = mcl, mcl.sigma_min, mcl.sigma_max

        def forward(self, x, sigma, label=None):
            calls.append(x.shape[0])
            return mcl(x, sigma, label)

    n = 12
    g = torch.Generator().manual_seed(0)
    x = toy_x(n) * 20
    mcl.reset(n, g)
    for _ in get_sampler(sampler)(Counting(), x, karras_sigmas(8, 0.02, 20.0), None, g):
        pass
    evaluated = sum(sum(e.calls) for e in experts)
    assert evaluated == mcl.expert_evals
    per_call = evaluated / sum(calls)
    if routing in ("soft", "guided"):  # a mixture of every expert
        assert per_call == K
    else:
        assert 1 <= per_call <= 2 == routing_cost("scout", K)
        assert per_call <= routing_cost(routing, K)


NEW_ROUTINGS = ["sampled", "winrate", "x0gate", "scout", "sticky", "sticky:3"]


def test_every_routing_through_the_pipeline_is_reproducible(tiny_checkpoints, one_torch_thread):
    model = load_model(tiny_checkpoints / "mcl.safetensors")
    gate = load_model(tiny_checkpoints / "gating.safetensors").net
    for routing in NEW_ROUTINGS:
        s = dict(model="mcl", routing=routing, n=3, steps=4, seed=9, sampler="ddpm")
        a, b = generate(Settings(**s), model, gate), generate(Settings(**s), model, gate)
        assert torch.equal(a.images, b.images) and torch.equal(a.experts, b.experts), routing
        assert a.experts.shape == (4, 3)
        if routing == "winrate":
            assert all(torch.equal(a.experts[0], e) for e in a.experts)
        with pytest.raises(ValueError, match="needs the gating checkpoint") if routing_needs_gate(routing) else _nothing():
            build_denoiser(Settings(**s), model, None)
    with pytest.raises(ValueError, match="unknown routing 'nope'"):
        Settings(model="mcl", routing="nope").validate()
    with pytest.raises(ValueError, match="sticky:SIGMA"):
        Settings(model="mcl", routing="sticky:soon").validate()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
