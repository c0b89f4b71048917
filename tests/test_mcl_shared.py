"""Hypotheses on one shared network (``nets.SharedMCLNet``): its one pass against K separate
evaluations of the same weights, the score head as an estimate of the winners' frequencies, the
per-example assignment of ``mcl_training.MCLTask`` and its resume, checkpoints, routing and the
app's chart."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_core.checkpoints import load_checkpoint
from diffusion_core.mcl import SharedMCLDenoiser, make_router, routing_cost
from diffusion_core.mcl_training import MCLTask
from diffusion_core.models import load_model, model_from_tensors, save_model
from diffusion_core.nets import HypothesisNet, ScoreHead, SharedMCLConfig, SharedMCLNet, UNet, UNetConfig
from diffusion_core.objectives import EpsilonObjective, FlowObjective

ROOT = Path(__file__).resolve().parent.parent
TINY = UNetConfig(base_channels=8, blocks_per_level=1, attention=False)


def _net(k=3, head_blocks=1, seed=0, dtype=torch.float64) -> SharedMCLNet:
    torch.manual_seed(seed)
    net = SharedMCLNet(SharedMCLConfig(TINY.to_dict(), k, head_blocks)).to(dtype)
    with torch.no_grad():  # no zero-initialised layer left: every part of the network matters
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _task(scope="step", wta="hard", k=3, limit=64, **kw):
    args = SimpleNamespace(wta=wta, relax_eps=0.05, t_start=0.05, t_end=1e-5, experts=k, mcl_update="routed", objective="ddpm_eps",
                           min_snr_gamma=None, schedule="linear", timesteps=1000, beta_start=1e-4, beta_end=0.02, init=None,
                           mcl_arch="shared", wta_scope=scope, head_blocks=1, assign_momentum=0.5, score_weight=0.1, limit=limit,
                           channels=8, blocks=1, attention=False, seed=0, data_dir=None, **{"assign_init": "none", **kw})
    return MCLTask(args)


# ----------------------------------------------------------------------------- one pass = K evaluations


@pytest.mark.parametrize("head_blocks", [0, 1, 2])
@pytest.mark.parametrize("objective", [EpsilonObjective(), FlowObjective()])
def test_one_pass_gives_every_hypothesis_as_k_separate_evaluations(head_blocks, objective):
    """The shared denoiser's hypotheses, from one trunk pass, are each hypothesis evaluated alone
    (its own copy of the trunk and its head, as separate UNet-like networks), and so are the
    per-example losses the training step scores."""
    net = _net(head_blocks=head_blocks)
    den = SharedMCLDenoiser(net, objective, make_router("soft", 3))
    x, sigma = torch.randn(6, 1, 28, 28, dtype=torch.float64) * 3, torch.tensor([0.05, 0.3, 1.0, 2.0, 8.0, 40.0], dtype=torch.float64)
    preds, probs = den.hypotheses(x, sigma)
    for k in range(3):
        alone = objective.denoiser(HypothesisNet(copy.deepcopy(net), k))
        torch.testing.assert_close(preds[:, k], alone(x, sigma), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(6, dtype=torch.float32))
    # the training forward: the K outputs without autograd, and each example's own head with it
    batch = objective.training_batch(torch.rand(6, 1, 28, 28, dtype=torch.float64) * 2 - 1, torch.Generator().manual_seed(1))
    chosen = torch.tensor([2, 0, 1, 1, 0, 2])
    out, every, logits, got = net(batch["net_input"], batch["net_time"], assign=lambda e: chosen)
    for k in range(3):
        alone = HypothesisNet(net, k)(batch["net_input"], batch["net_time"])
        torch.testing.assert_close(every[:, k], alone, rtol=1e-10, atol=1e-12)
        loss_alone = objective.loss_from_prediction(alone, batch)
        torch.testing.assert_close(objective.loss_from_prediction(every[:, k], batch), loss_alone, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, every[torch.arange(6), chosen], rtol=1e-10, atol=1e-12)
    assert torch.equal(got, chosen) and logits.shape == (6, 3)


def test_a_warm_start_is_the_unet_it_starts_from():
    torch.manual_seed(0)
    unet = UNet(TINY).double()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.tensor([1.0, 10.0, 300.0, 999.0], dtype=torch.float64)
    for head_blocks in (0, 1, 2):
        outs, logits = SharedMCLNet.from_unet(unet, 4, head_blocks).double()(x, t)
        torch.testing.assert_close(outs, unet(x, t)[:, None].expand_as(outs), rtol=1e-12, atol=1e-12)
        assert torch.equal(logits, torch.zeros(4, 4, dtype=torch.float64))  # an untrained score head says 1/K
    noisy = SharedMCLNet.from_unet(unet, 4, 1, noise=0.02, generator=torch.Generator().manual_seed(0)).double()(x, t)[0]
    assert (noisy[:, 0] - noisy[:, 1]).abs().max() > 0  # the heads differ once perturbed


def test_only_the_assigned_head_gets_gradient_and_every_head_is_in_the_graph():
    net = _net()
    x, t = torch.randn(5, 1, 28, 28, dtype=torch.float64), torch.full((5,), 100.0, dtype=torch.float64)
    out, _, logits, _ = net(x, t, assign=lambda e: torch.zeros(5, dtype=torch.long))
    (out.sum() + logits.sum()).backward()
    assert all(p.grad is not None for p in net.parameters())  # DDP needs every parameter in the graph
    assert all(p.grad.abs().sum() == 0 for h in (1, 2) for p in net.heads[h].parameters())
    assert any(p.grad.abs().sum() > 0 for p in net.heads[0].parameters())


# ----------------------------------------------------------------------------- the score head


def test_score_head_cross_entropy_is_minimised_at_the_cells_masses():
    """Toy problem with known cells: clean values uniform on [0, 1], three fixed hypotheses at 0.1,
    0.5 and 0.9, so the winner (nearest hypothesis) has cells [0, 0.3), [0.3, 0.7) and [0.7, 1] of
    mass 0.3, 0.4 and 0.3. A score head that sees nothing of the input, trained by the task's rule
    (cross-entropy against the hard winner of the step's losses), converges to those masses."""
    task = _task(scope="step")
    head = ScoreHead(4, 4, 8, 3, 4)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    hyp = torch.tensor([0.1, 0.5, 0.9])
    g = torch.Generator().manual_seed(0)
    h, mid, emb = torch.zeros(256, 4, 8, 8), torch.zeros(256, 4, 2, 2), torch.zeros(256, 8)
    for _ in range(400):
        x0 = torch.rand(256, generator=g)
        losses = (x0[:, None] - hyp[None]).square()
        _, winner = task.assign(losses, None, 1.0, g)
        loss = F.cross_entropy(head(h, mid, emb), winner)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = torch.softmax(head(h[:1], mid[:1], emb[:1]), dim=1)[0].detach()
    torch.testing.assert_close(p, torch.tensor([0.3, 0.4, 0.3]), atol=0.03, rtol=0)
    # and the expected cross-entropy at the masses is below that of any nearby distribution
    masses = torch.tensor([0.3, 0.4, 0.3])

    def expected_ce(q):
        return -(masses * q.log()).sum()

    for d in ([0.05, -0.05, 0], [-0.05, 0.05, 0], [0, 0.05, -0.05]):
        assert expected_ce(masses) < expected_ce(masses + torch.tensor(d))


# ----------------------------------------------------------------------------- per-example assignment


def test_per_example_assignment_keeps_each_example_with_its_owner():
    task = _task(scope="example", limit=8)
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 3, 5])
    first = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [2.0, 3.0, 1.0]])
    chosen, owner = task.assign(first, idx, 1.0, g)
    assert chosen.tolist() == owner.tolist() == [0, 1, 2]  # a first visit ranks by its own losses
    assert task.table[[1, 2, 4, 6, 7]].isnan().all()  # examples not visited have no row
    # a second visit at a level where another hypothesis wins by a little: the owner stays
    second = torch.tensor([[1.1, 1.0, 3.0], [1.0, 1.1, 2.0], [2.0, 1.0, 1.1]])
    chosen, owner = task.assign(second, idx, 1.0, g)
    assert chosen.tolist() == owner.tolist() == [0, 1, 2]
    # relative losses: scaling one visit's losses (another noise level) changes nothing
    t2 = _task(scope="example", limit=8)
    t2.assign(first * 100, idx, 1.0, g)
    t2.assign(second * 0.01, idx, 1.0, g)
    torch.testing.assert_close(t2.table, task.table, equal_nan=True)
    # and it is part of the task's state
    restored = _task(scope="example", limit=8)
    restored.load_state_dict(task.state_dict())
    torch.testing.assert_close(restored.table, task.table, equal_nan=True)


def test_kmeans_start_separates_clusters_it_can_see():
    """Images of three kinds (blank, left half lit, right half lit), shuffled: k-means finds the
    three, and every image's row ranks its own cluster first."""
    from diffusion_core.mcl_training import kmeans_distances

    g = torch.Generator().manual_seed(0)
    kinds = torch.randint(0, 3, (90,), generator=g)
    x = torch.full((90, 1, 28, 28), -1.0)
    x[kinds == 1, :, :, :14] = 1
    x[kinds == 2, :, :, 14:] = 1
    x += 0.1 * torch.randn(x.shape, generator=g)
    own = kmeans_distances(x, 3, seed=0).argmin(dim=1)
    for k in range(3):  # one cluster per kind
        assert len(set(own[kinds == k].tolist())) == 1
    assert len(set(own.tolist())) == 3
    torch.testing.assert_close(kmeans_distances(x, 3, seed=0), kmeans_distances(x, 3, seed=0))  # deterministic


def _env():
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _train(run_dir, out, mnist_root, *extra):
    cmd = [sys.executable, str(ROOT / "train" / "mcl.py"), "--no-progress", "--quick", "--limit", "256", "--experts", "3",
           "--mcl-arch", "shared", "--wta-scope", "example", "--wta", "hard", "--data-dir", str(mnist_root),
           "--run-dir", str(run_dir), "--out", str(out), "--save-every", "0", *map(str, extra)]
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, mnist_root):
    d = tmp_path_factory.mktemp("shared")
    run_dir, out = d / "run", d / "mcl.safetensors"
    _train(run_dir, out, mnist_root, "--epochs", 3)
    return SimpleNamespace(run_dir=run_dir, out=out)


@pytest.mark.slow
def test_per_example_assignment_is_the_same_after_a_resume(shared_run, tmp_path, mnist_root):
    """Stopped after the first epoch and resumed, the run ends with the same per-example table,
    the same shares of the data and the same weights as the run that went through."""
    run_dir, out = tmp_path / "run", tmp_path / "mcl.safetensors"
    _train(run_dir, out, mnist_root, "--epochs", 3, "--stop-at", 4)
    stopped = torch.load(run_dir / "state.pt", weights_only=True)
    assert stopped["step"] == 4 and stopped["task"]["table"].shape == (256, 3)
    assert not stopped["task"]["table"].isnan().any()  # every example was visited in epoch 0
    proc = _train(run_dir, out, mnist_root, "--epochs", 3, "--resume")
    assert "resumed from" in proc.stdout
    a = torch.load(shared_run.run_dir / "state.pt", weights_only=True)["task"]["table"]
    b = torch.load(run_dir / "state.pt", weights_only=True)["task"]["table"]
    assert torch.equal(a, b)
    ta, _ = load_checkpoint(shared_run.out)
    tb, _ = load_checkpoint(out)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    ma, mb = load_model(shared_run.out), load_model(out)
    assert ma.config["training"]["final"]["owned"] == mb.config["training"]["final"]["owned"]


@pytest.mark.slow
def test_a_shared_checkpoint_loads_and_routes_with_its_score_head(shared_run):
    model = load_model(shared_run.out)
    assert model.kind == "mcl" and model.shared and model.num_experts == 3 and len(model.nets) == 1
    training = model.config["training"]
    assert training["mcl_arch"] == "shared" and training["wta_scope"] == "example"
    final = training["final"]
    assert sum(final["owned"]) == 4 * 64 and model.win_rates == pytest.approx(final["owned_rates"])  # winrate draws with the data's shares
    assert {"score_ce", "score_accuracy", "denoise_loss"} <= set(final)
    x, sigma = torch.randn(4, 1, 28, 28) * 5, torch.full((4,), 5.0)
    soft = model.denoiser(routing="soft")
    preds, probs = soft.hypotheses(x, sigma)
    torch.testing.assert_close(soft(x, sigma), (probs[:, :, None, None, None] * preds).sum(dim=1))  # soft: the score-weighted mean, one pass
    assert soft.last_evals == 4 and soft.last_gate_probs.shape == (4, 3)
    for k in range(3):
        one = model.denoiser(routing=f"expert:{k}")
        torch.testing.assert_close(one(x, sigma), preds[:, k])
        torch.testing.assert_close(one.last_gate_probs, probs)  # the chart shows the score head under every routing
    gated = model.denoiser(routing="gated")
    gated(x, sigma)
    assert torch.equal(gated.last_expert, probs.argmax(dim=1))
    # a round trip through the file format
    tensors, config = load_checkpoint(shared_run.out)
    again = model_from_tensors(tensors, config)
    assert again.shared and again.num_experts == 3


def test_routing_costs_one_pass_on_a_shared_network():
    assert routing_cost("soft", 5) == 5 and routing_cost("soft", 5, shared=True) == 1
    assert routing_cost("scout", 5, shared=True) == 2 and routing_cost("sampled", 5, shared=True) == 1


def test_save_model_writes_one_network_for_shared_hypotheses(tmp_path):
    net = _net().float()
    path = save_model(tmp_path / "m.safetensors", "mcl", [net], {"network": {"kind": "mcl_shared", "config": net.config.to_dict()},
                                                               "objective": EpsilonObjective().to_dict()})
    tensors, config = load_checkpoint(path)
    assert config["num_experts"] == 3 and all(k.startswith("net.") for k in tensors)
    assert load_model(path).num_experts == 3


@pytest.mark.slow
def test_gating_refuses_a_shared_model(shared_run, tmp_path, mnist_root):
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "gating.py"), "--quick", "--no-progress", "--mcl", str(shared_run.out),
                           "--data-dir", str(mnist_root), "--run-dir", str(tmp_path / "g")], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "score head" in proc.stderr and "Traceback" not in proc.stderr


def test_the_chart_names_the_score_head(shared_run):
    from diffusion_core.ui.render import SCORE_HEAD_SENTENCE, Recording, expert_chart

    s, n, k = 4, 3, 3
    rec = Recording(np.zeros((n, 28, 28), np.uint8), [], [], [], np.zeros((s, n), int), np.full((s, n, k), 1 / 3), k, score_head=True)
    fig = expert_chart(rec, "sampled")
    titles = [a.get_title(loc="left") for a in fig.axes]
    assert any(SCORE_HEAD_SENTENCE in t for t in titles)
    rec.score_head = False
    assert not any(SCORE_HEAD_SENTENCE in a.get_title(loc="left") for a in expert_chart(rec, "sampled").axes)



@pytest.mark.parametrize("flags, message", [(["--head-blocks", "9"], "--head-blocks: head_blocks must be in 0..2"),
                                            (["--head-blocks", "9", "--init", "ddpm"], "--head-blocks: head_blocks must be in 0..2"),
                                            (["--score-weight", "-1"], "--score-weight must be a non-negative number"),
                                            (["--assign-momentum", "0"], "--assign-momentum must be in (0, 1]")])
@pytest.mark.slow
def test_bad_shared_flags_are_clear_errors(flags, message, tmp_path, mnist_root):
    cmd = [sys.executable, str(ROOT / "train" / "mcl.py"), "--no-progress", "--mcl-arch", "shared", "--wta-scope", "example",
           "--limit", "256", "--batch-size", "64", "--channels", "8", "--blocks", "1", "--epochs", "1", "--data-dir", str(mnist_root),
           "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "m.safetensors"), *flags]
    if "--init" not in flags:
        cmd.append("--quick")
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_part_guided_routing_is_cfg_with_the_part_as_label(scale):
    """guided:W serves D_mix + W (D_k - D_mix): D_mix the score-weighted mixture of the hypotheses
    (what soft serves), D_k the trajectory's own hypothesis, drawn as winrate draws it. W = 1 gives
    winrate's images, W = 0 soft's."""
    net = _net()
    rates = [0.2, 0.5, 0.3]
    x, sigma = torch.randn(8, 1, 28, 28, dtype=torch.float64) * 2, torch.full((8,), 1.5, dtype=torch.float64)
    dens = {r: SharedMCLDenoiser(net, EpsilonObjective(), make_router(r, 3, win_rates=rates)) for r in (f"guided:{scale}", "winrate", "soft")}
    for d in dens.values():
        d.reset(8, torch.Generator().manual_seed(3))
    guided = dens[f"guided:{scale}"](x, sigma)
    k = dens["winrate"].router.choice
    assert torch.equal(dens[f"guided:{scale}"].last_expert, k)  # the same draw as winrate's
    preds = torch.stack([EpsilonObjective().denoiser(HypothesisNet(copy.deepcopy(net), j))(x, sigma) for j in range(3)], dim=1)
    probs = torch.softmax(net(*EpsilonObjective().denoiser(net).net_inputs(x, sigma))[1].float(), dim=1).double()
    mix = (probs[:, :, None, None, None] * preds).sum(dim=1)
    expected = mix + scale * (preds[torch.arange(8), k] - mix)
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-6)
    if scale == 1.0:
        torch.testing.assert_close(guided, dens["winrate"](x, sigma), rtol=1e-5, atol=1e-6)
    if scale == 0.0:
        torch.testing.assert_close(guided, dens["soft"](x, sigma), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["guided:-1", "guided:x", "guided:nan", "guided:11"])
def test_bad_guided_specs_are_refused(spec):
    with pytest.raises(ValueError, match="guided:W"):
        make_router(spec, 3)
