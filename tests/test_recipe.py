"""The CPU training recipe's pieces: --precision and --recipe, the EDM and Min-SNR objectives
(checked against diffusers and against an ideal network), the routed MCL update (gradients
against the plain formulation), --max-minutes / --snapshot-every, and quick runs that use them."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_training import check_run, metrics, run_script

from diffusion_core import training
from diffusion_core.denoisers import EDMDenoiser
from diffusion_core.mcl_training import Ensemble, MCLTask
from diffusion_core.models import load_model
from diffusion_core.nets import UNet, UNetConfig
from diffusion_core.objectives import EDMObjective, EpsilonObjective, FlowObjective, ScheduleConfig, objective_from_dict, teacher_target
from diffusion_core.tasks import DiffusionTask, add_diffusion_args
from diffusion_core.wta import wta_assignment, wta_loss, wta_weights

# ----------------------------------------------------------------------------- precision, recipes


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: native)
    assert training.resolve_precision("auto", torch.device("cpu")) == expected
    assert training.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert training.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="unknown precision"):
        training.resolve_precision("fp16", torch.device("cpu"))


def test_native_bf16_is_read_from_cpu_flags(tmp_path):
    def cpuinfo(flags):
        f = tmp_path / "cpuinfo"
        f.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\n")
        return f

    assert training.cpu_has_native_bf16(cpuinfo("avx2 avx512f avx512_bf16"))
    assert not training.cpu_has_native_bf16(cpuinfo("avx2 avx512f"))  # AVX-512 without bf16: emulated, slower than fp32
    assert not training.cpu_has_native_bf16(tmp_path / "missing")


def test_recipe_defaults_and_explicit_flags():
    recipes = {"cpu": {"epochs": 3, "batch_size": 128}, "gpu": {"epochs": 7}}

    def parse(*argv):
        return training.parse_args(training.common_parser("t"), recipes, list(argv))

    a = parse("--device", "cpu")
    assert (a.recipe, a.epochs, a.batch_size) == ("cpu", 3, 128)
    a = parse("--device", "cpu", "--recipe", "gpu")
    assert (a.recipe, a.epochs, a.batch_size) == ("gpu", 7, 256)  # gpu keeps the parser's batch size
    a = parse("--device", "cpu", "--epochs", "5")
    assert (a.recipe, a.epochs) == ("cpu", 5)
    assert training.recipe_for("auto", "cuda:0") == "gpu" and training.recipe_for("auto", "cpu") == "cpu"


def test_time_limits_must_be_positive(capsys):
    args = training.common_parser("t").parse_args(["--max-minutes", "0"])
    with pytest.raises(SystemExit) as e:
        training.check_args(args)
    assert e.value.code == 2 and "--max-minutes must be positive" in capsys.readouterr().err


# ----------------------------------------------------------------------------- EDM


class Recorder(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t, label=None):
        self.seen = (x.clone(), t.clone())
        return self.out


def test_edm_preconditioning_matches_diffusers():
    from diffusers import EDMEulerScheduler

    sched = EDMEulerScheduler(sigma_data=0.5, prediction_type="epsilon")
    torch.manual_seed(0)
    x, f = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.randn(4, 1, 28, 28, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.3, 2.0, 80.0], dtype=torch.float64)
    net = Recorder(f)
    out = EDMDenoiser(net, sigma_data=0.5)(x, sigma)
    s4 = sigma[:, None, None, None]
    torch.testing.assert_close(net.seen[0], sched.precondition_inputs(x, s4))
    torch.testing.assert_close(net.seen[1], 1000 * sched.precondition_noise(sigma))
    torch.testing.assert_close(out, sched.precondition_outputs(x, f, s4))


def test_edm_training_target_is_what_the_ideal_network_outputs():
    """Data = one fixed image c. The ideal denoiser is D = c; the network that makes the EDM
    denoiser return c must have zero loss on the objective's training batches."""
    obj = EDMObjective()
    torch.manual_seed(1)
    c = torch.rand(1, 1, 28, 28, dtype=torch.float64) * 2 - 1

    class Ideal(torch.nn.Module):
        def forward(self, x_in, t, label=None):
            sigma = (t / 250).exp()[:, None, None, None]
            total = sigma**2 + obj.sigma_data**2
            x = x_in * total.sqrt()  # undo c_in
            c_skip, c_out = obj.sigma_data**2 / total, sigma * obj.sigma_data / total.sqrt()
            return (c - c_skip * x) / c_out

    batch = obj.training_batch(c.expand(64, -1, -1, -1), torch.Generator().manual_seed(0))
    assert obj.loss(Ideal(), batch).max() < 1e-10  # sigma is drawn in float32: ~1e-7 relative error
    assert obj.loss(lambda x, t, label=None: Ideal()(x, t) + 0.01, batch).min() > 5e-5  # and a wrong network is not
    x = c + 3.0 * torch.randn(2, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(obj.denoiser(Ideal())(x, torch.tensor([3.0, 3.0], dtype=torch.float64)), c.expand(2, -1, -1, -1))


def test_edm_noise_levels_are_log_normal_and_round_trip():
    obj = EDMObjective()
    batch = obj.training_batch(torch.zeros(20000, 1, 2, 2), torch.Generator().manual_seed(0))
    log_sigma = batch["sigma"].log()
    assert abs(log_sigma.mean() - obj.p_mean) < 0.03 and abs(log_sigma.std() - obj.p_std) < 0.03
    assert objective_from_dict(obj.to_dict()).to_dict() == obj.to_dict()
    with pytest.raises(ValueError, match="bad EDM settings"):
        EDMObjective(sigma_min=1.0, sigma_max=0.5)


# ----------------------------------------------------------------------------- Min-SNR


def test_min_snr_weights_match_diffusers_snr():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    obj = EpsilonObjective(ScheduleConfig("linear", 1000, 1e-4, 0.02), min_snr_gamma=5.0)
    batch = obj.training_batch(torch.zeros(512, 1, 2, 2), torch.Generator().manual_seed(0))
    t = batch["net_time"].long()
    snr = compute_snr(DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear"), t).double()
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    # diffusers accumulates alphabar in float32 (relative error ~1e-4 at t near 1000); ours in float64
    torch.testing.assert_close(batch["weight"].double(), expected, rtol=5e-4, atol=0)
    assert (batch["weight"] < 1).any() and (batch["weight"] == 1).any()  # both regimes drawn
    # the weight multiplies the plain per-example loss
    pred = torch.randn_like(batch["target"])
    plain = (pred - batch["target"]).square().flatten(1).mean(1)
    torch.testing.assert_close(obj.loss_from_prediction(pred, batch), plain * batch["weight"])
    assert objective_from_dict(obj.to_dict()).min_snr_gamma == 5.0
    assert "weight" not in EpsilonObjective().training_batch(torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="min_snr_gamma must be positive"):
        EpsilonObjective(min_snr_gamma=0)


# ----------------------------------------------------------------------------- epsilon with EDM's training distribution


def test_eps_lognormal_timesteps_follow_edm_density_on_the_discrete_schedule():
    obj = EpsilonObjective(ScheduleConfig("linear", 1000, 1e-4, 0.02), t_sampling="lognormal", p_mean=-1.2, p_std=1.2)
    batch = obj.training_batch(torch.zeros(50000, 1, 2, 2), torch.Generator().manual_seed(0))
    t = batch["net_time"].long()
    assert torch.equal(batch["net_time"], t.float()) and int(t.min()) >= 0 and int(t.max()) <= 999  # training timesteps only
    sigma = batch["sigma"].double()
    torch.testing.assert_close(sigma, obj.schedule.sigmas[t], rtol=1e-6, atol=0)
    # ln sigma ~ N(-1.2, 1.2^2), snapped to the grid (a step is < 2% in log-sigma above t=10) and clamped at
    # sigma_min = 0.01 (ln 0.01 = -4.6 is 2.8 std below the mean): the median and quartiles carry over
    q = torch.quantile(sigma.log().float(), torch.tensor([0.25, 0.5, 0.75]))
    expected = torch.tensor([-1.2 - 0.6745 * 1.2, -1.2, -1.2 + 0.6745 * 1.2])
    torch.testing.assert_close(q, expected, atol=0.04, rtol=0)
    # uniform timesteps put half the examples above sigma 3.3 (t > 500); EDM's density about 2%
    assert float((sigma > obj.schedule.sigmas[500]).double().mean()) < 0.03
    uniform = EpsilonObjective().training_batch(torch.zeros(50000, 1, 2, 2), torch.Generator().manual_seed(0))
    assert abs(float((uniform["sigma"] > obj.schedule.sigmas[500]).double().mean()) - 0.5) < 0.01


def test_eps_edm_weight_is_edms_loss_on_the_denoised_image():
    """Weighted epsilon loss == EDM's lambda(sigma) |D - x0|^2 with D = x - sigma eps_hat (Karras et al. 2022,
    eq. 8 with lambda = (sigma^2 + sd^2) / (sigma sd)^2), for any prediction."""
    obj = EpsilonObjective(t_sampling="lognormal", edm_weight=True)
    x0 = torch.rand(256, 1, 4, 4, dtype=torch.float64) * 2 - 1
    batch = obj.training_batch(x0, torch.Generator().manual_seed(3))
    eps_hat = torch.randn_like(batch["target"])
    sigma = batch["sigma"].double()
    denoised = batch["x_sigma"] - sigma[:, None, None, None] * eps_hat
    lam = (sigma**2 + obj.sigma_data**2) / (sigma * obj.sigma_data) ** 2
    edm = lam * (denoised - x0).square().flatten(1).mean(1)
    torch.testing.assert_close(obj.loss_from_prediction(eps_hat, batch).double(), edm, rtol=1e-5, atol=1e-9)
    back = objective_from_dict(obj.to_dict())
    assert (back.t_sampling, back.p_mean, back.p_std, back.edm_weight, back.sigma_data) == ("lognormal", -1.2, 1.2, True, 0.5)
    old = objective_from_dict({"name": "ddpm_eps", "schedule": {"kind": "linear"}, "min_snr_gamma": 5.0})
    assert (old.t_sampling, old.edm_weight, old.min_snr_gamma) == ("uniform", False, 5.0)  # older checkpoints read as before
    assert "t_sampling" not in EpsilonObjective().to_dict() and "edm_weight" not in EpsilonObjective().to_dict()
    with pytest.raises(ValueError, match="t_sampling must be one of"):
        EpsilonObjective(t_sampling="beta")
    with pytest.raises(ValueError, match="choose one loss weight"):
        EpsilonObjective(min_snr_gamma=5.0, edm_weight=True)
    with pytest.raises(ValueError, match="positive P_std"):
        EpsilonObjective(t_sampling="lognormal", p_std=0)


@pytest.mark.parametrize("obj", [EpsilonObjective(), EDMObjective(), FlowObjective()], ids=["eps", "edm", "flow"])
def test_training_batch_at_given_noise_levels(obj):
    x0 = torch.rand(5, 1, 3, 3) * 2 - 1
    sigma = torch.tensor([0.02, 0.3, 1.0, 7.0, 60.0])
    batch = obj.training_batch_at(x0, sigma, torch.Generator().manual_seed(0))
    if isinstance(obj, EpsilonObjective):  # the nearest training timestep: within half a grid step in log-sigma
        step = obj.schedule.log_sigmas.diff().max()
        assert ((batch["sigma"].double().log() - sigma.double().log()).abs() <= step / 2 + 1e-6).all()
    else:
        torch.testing.assert_close(batch["sigma"], sigma)
    # the network sees the sigma-space image x0 + sigma * noise under the objective's own input scaling
    s = batch["sigma"][:, None, None, None]
    scale = {EpsilonObjective: (s**2 + 1).sqrt(), FlowObjective: 1 + s, EDMObjective: (s**2 + 0.25).sqrt()}[type(obj)]
    torch.testing.assert_close(batch["net_input"] * scale, batch["x_sigma"], rtol=1e-5, atol=1e-5)
    noise = (batch["x_sigma"] - x0) / s
    assert abs(float(noise.std()) - 1) < 0.35  # standard normal noise (45 draws)


# ----------------------------------------------------------------------------- rectified flow's t


def test_flow_logit_normal_t_has_the_stated_density():
    g = torch.Generator().manual_seed(0)
    t = FlowObjective(t_sampling="logit_normal", logit_mean=0.5, logit_std=0.8).sample_t(200_000, g)
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean()) - 0.5) < 0.01 and abs(float(logit.std()) - 0.8) < 0.01
    u = FlowObjective().sample_t(200_000, g)
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float((u < 0.1).float().mean()) - 0.1) < 0.005  # uniform
    # logit-normal(0, 1) puts far fewer draws near the ends of the path than uniform does
    ln = FlowObjective(t_sampling="logit_normal").sample_t(200_000, g)
    assert float((ln < 0.1).float().mean()) < 0.03


def test_flow_t_sampling_round_trips_and_old_checkpoints_read_as_uniform():
    obj = FlowObjective(t_sampling="logit_normal", logit_std=1.2)
    back = objective_from_dict(obj.to_dict())
    assert (back.t_sampling, back.logit_mean, back.logit_std) == ("logit_normal", 0.0, 1.2)
    assert objective_from_dict({"name": "rectified_flow", "sigma_min": 0.002, "sigma_max": 80.0}).t_sampling == "uniform"
    x0 = torch.zeros(64, 1, 28, 28)
    b = obj.training_batch(x0, torch.Generator().manual_seed(1))
    t = b["net_time"] / 1000
    torch.testing.assert_close(b["sigma"], t / (1 - t))
    with pytest.raises(ValueError, match="t_sampling must be one of"):
        FlowObjective(t_sampling="beta")
    with pytest.raises(ValueError, match="positive std"):
        FlowObjective(t_sampling="logit_normal", logit_std=0)


def test_flow_script_recipe_uses_logit_normal_and_other_objectives_refuse_it(capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("flow_script", Path(training.__file__).resolve().parent.parent / "train" / "flow.py")
    flow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flow)
    assert flow.RECIPES["cpu"]["flow_t"] == flow.RECIPES["gpu"]["flow_t"] == "logit_normal"
    p = add_diffusion_args(training.common_parser("t"))
    p.add_argument("--p-uncond", type=float, default=0.1)
    args = p.parse_args(["--device", "cpu", "--objective", "edm", "--flow-t", "logit_normal"])
    with pytest.raises(SystemExit) as e:
        DiffusionTask(args, name="cfg", conditional=True)
    assert e.value.code == 2 and "--flow-t applies to --objective rectified_flow only" in capsys.readouterr().err


# ----------------------------------------------------------------------------- routed MCL


def _tiny_ensemble(k=3, seed=0):
    torch.manual_seed(seed)
    nets = []
    for _ in range(k):
        net = UNet(UNetConfig(base_channels=8, blocks_per_level=1, attention=False)).double()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        nets.append(net)
    return Ensemble(nets)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _mcl_task(mode, update, objective="ddpm_eps"):
    args = SimpleNamespace(wta=mode, relax_eps=0.05, t_start=0.05, t_end=1e-5, experts=3, mcl_update=update, objective=objective,
                           min_snr_gamma=None, schedule="linear", timesteps=1000, beta_start=1e-4, beta_end=0.02, init=None)
    return MCLTask(args)


@pytest.mark.parametrize("objective", ["ddpm_eps", "edm"])
def test_routed_hard_wta_has_the_plain_gradient_exactly(objective):
    x0 = torch.rand(16, 1, 28, 28, dtype=torch.float64) * 2 - 1
    grads, wins = [], []
    for update in ("full", "routed"):
        model = _tiny_ensemble()
        task = _mcl_task("hard", update, objective)
        loss, logs = task.loss(model, x0, None, torch.Generator().manual_seed(3), 0.5)
        loss.backward()
        grads.append(_grads(model))
        wins.append(logs["wins"])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)
    assert torch.equal(wins[0], wins[1]) and wins[0].sum() == 16


def test_routed_forward_is_each_examples_own_expert():
    model = _tiny_ensemble()
    x, t = torch.randn(7, 1, 28, 28, dtype=torch.float64), torch.linspace(0, 900, 7, dtype=torch.float64)
    assign = torch.tensor([2, 0, 0, 2, 1, 2, 0])
    everyone = model(x, t)
    torch.testing.assert_close(model(x, t, assign=assign), everyone[torch.arange(7), assign])
    # an expert with no example still takes part in the graph (zero gradient), as DDP needs
    model(x, t, assign=torch.zeros(7, dtype=torch.long)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad.abs().sum() == 0 for p in model.experts[1].parameters())


@pytest.mark.parametrize("mode, kw", [("relaxed", {"eps": 0.3}), ("annealed", {"temperature": 0.5})])
def test_routed_soft_wta_is_unbiased(mode, kw):
    """For one fixed assignment the routed gradient is the plain formulation's with one-hot weights
    (exact), and assignments are drawn with the WTA weights (frequencies), so the expected routed
    gradient is the plain one."""
    losses = torch.tensor([[0.2, 0.5, 0.9], [1.0, 0.1, 0.4], [0.3, 0.3, 0.2]])
    w = wta_weights(losses, mode, **kw)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([wta_assignment(losses, mode, generator=g, **kw) for _ in range(20000)])
    freq = torch.stack([(draws == k).float().mean(0) for k in range(3)], dim=1)
    assert (freq - w).abs().max() < 0.015
    # exact part: per-example losses of a real ensemble, routed vs one-hot weighted full loss
    model = _tiny_ensemble()
    obj = EpsilonObjective()
    batch = obj.training_batch(torch.rand(6, 1, 28, 28, dtype=torch.float64), torch.Generator().manual_seed(1))
    assign = torch.tensor([0, 1, 2, 2, 1, 0])
    obj.loss_from_prediction(model(batch["net_input"], batch["net_time"], assign=assign), batch).mean().backward()
    routed = _grads(model)
    model.zero_grad()
    pred = model(batch["net_input"], batch["net_time"])
    full = torch.stack([obj.loss_from_prediction(pred[:, k], batch) for k in range(3)], dim=1)
    (torch.nn.functional.one_hot(assign, 3).double() * full).sum(1).mean().backward()
    torch.testing.assert_close(routed, _grads(model))


def test_hard_assignment_is_the_winner():
    losses = torch.tensor([[0.2, 0.1, 0.9], [1.0, 2.0, 0.4]])
    assert wta_assignment(losses, "hard").tolist() == [1, 2]
    assert torch.isclose(wta_loss(losses, "hard"), torch.tensor((0.1 + 0.4) / 2))


# ----------------------------------------------------------------------------- quick runs


@pytest.mark.slow
def test_quick_cfg_edm_bf16_with_snapshots_and_time_limit(tmp_path, mnist_root):
    run_dir, out = tmp_path / "run", tmp_path / "cfg.safetensors"
    run_script("cfg", run_dir, out, mnist_root, "--quick", "--objective", "edm", "--precision", "bf16", "--snapshot-every", "5")
    model = check_run(run_dir, out, "cfg", steps=16, epochs=2)
    tr = model.config["training"]
    assert tr["precision"] == "bf16" and tr["recipe"] == "cpu" and tr["train_time_s"] > 0
    assert model.objective.to_dict()["name"] == "edm"
    snaps = metrics(run_dir, "snapshot")
    assert [s["step"] for s in snaps] == [5, 10, 15]
    assert all(load_model(s["path"]).objective.name == "edm" for s in snaps)
    # a time limit ends the invocation early (step 1 already exceeds it), resumable where it stopped
    run_dir2, out2 = tmp_path / "run2", tmp_path / "cfg2.safetensors"
    proc = run_script("cfg", run_dir2, out2, mnist_root, "--quick", "--precision", "fp32", "--max-minutes", "0.00001")
    assert "--resume carries on" in proc.stdout + proc.stderr
    tr2 = load_model(out2).config["training"]
    assert tr2["precision"] == "fp32" and tr2["steps"] == 1
    state = torch.load(run_dir2 / "state.pt", weights_only=True)
    assert state["step"] == 1 and math.isfinite(state["train_s"])
    # --stop-at: pause at step 6, then --resume finishes the schedule of the full run
    run_dir3, out3 = tmp_path / "run3", tmp_path / "cfg3.safetensors"
    run_script("cfg", run_dir3, out3, mnist_root, "--quick", "--stop-at", "6")
    assert load_model(out3).config["training"]["steps"] == 6
    run_script("cfg", run_dir3, out3, mnist_root, "--quick", "--resume")
    assert load_model(out3).config["training"]["steps"] == 16
    assert [r["step"] for r in metrics(run_dir3, "step")] == list(range(1, 17))


@pytest.mark.slow
def test_quick_mcl_min_snr_full_update(tmp_path, mnist_root):
    run_dir, out = tmp_path / "run", tmp_path / "mcl.safetensors"
    run_script("mcl", run_dir, out, mnist_root, "--quick", "--experts", 2, "--limit", 256, "--min-snr-gamma", 5, "--mcl-update", "full",
               "--mcl-arch", "separate", "--wta-scope", "step")
    model = load_model(out)
    assert model.objective.to_dict()["min_snr_gamma"] == 5 and model.config["training"]["args"]["mcl_update"] == "full"
    assert sum(metrics(run_dir, "epoch")[-1]["wins"]) == 4 * 64


@pytest.mark.slow
def test_quick_flow_is_a_conditional_rectified_flow(tmp_path, mnist_root):
    run_dir, out = tmp_path / "run", tmp_path / "flow.safetensors"
    run_script("flow", run_dir, out, mnist_root, "--quick")
    model = check_run(run_dir, out, "flow", steps=16, epochs=2)
    assert model.objective.name == "rectified_flow" and model.num_classes == 10
    assert model.objective.t_sampling == "logit_normal"  # the recipe's, recorded in the checkpoint
    den = model.denoiser(guidance=2.0)
    x = torch.randn(2, 1, 28, 28)
    assert torch.isfinite(den(x, torch.tensor([0.5, 20.0]), torch.tensor([3, 8]))).all()


@pytest.mark.slow
def test_quick_ddpm_with_edms_training_distribution(tmp_path, mnist_root):
    """--eps-t lognormal --edm-weight (Min-SNR switched off with 'none', where the CPU recipe sets it):
    still an epsilon DDPM on the discrete schedule, with the training density recorded."""
    run_dir, out = tmp_path / "run", tmp_path / "ddpm.safetensors"
    run_script("ddpm", run_dir, out, mnist_root, "--quick", "--recipe", "cpu", "--max-steps", 4,
               "--eps-t", "lognormal", "--edm-weight", "--min-snr-gamma", "none")
    model = load_model(out)
    d = model.objective.to_dict()
    assert model.kind == "ddpm" and d["name"] == "ddpm_eps" and "min_snr_gamma" not in d
    assert (d["t_sampling"], d["edm_weight"], d["p_mean"], d["sigma_data"]) == ("lognormal", True, -1.2, 0.5)
    assert model.denoiser().discrete_sigmas is not None


# ----------------------------------------------------------------------------- a class-conditional teacher for ddpm


def _two_class_gaussians(sigma: float, n: int = 400_000, s: float = 0.3, seed: int = 0):
    """1-D data: two classes at -1 and +1 (equal weight), each Gaussian with std ``s``; the exact
    class-conditional posterior mean (the ideal teacher) and the exact unconditional epsilon."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    mu = (2 * y - 1).double()
    x0 = mu + s * torch.randn(n, generator=g, dtype=torch.float64)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    x = x0 + sigma * noise
    shrink = s**2 / (s**2 + sigma**2)
    d_cond = lambda m: m + shrink * (x - m)  # noqa: E731  E[x0 | x, class at m]
    log_lik = lambda m: -(x - m) ** 2 / (2 * (s**2 + sigma**2))  # noqa: E731
    p_plus = torch.sigmoid(log_lik(1.0) - log_lik(-1.0))
    eps_exact = (x - (p_plus * d_cond(1.0) + (1 - p_plus) * d_cond(-1.0))) / sigma  # (x - E[x0 | x]) / sigma
    shape = (n, 1, 1, 1)
    batch = {"x_sigma": x.reshape(shape), "sigma": torch.full((n,), sigma, dtype=torch.float64), "target": noise.reshape(shape)}
    return batch, x, mu, d_cond(mu), eps_exact


@pytest.mark.parametrize("weight", ["blend", "full"])
@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 3.0])
def test_teacher_target_keeps_the_unconditional_optimum_and_varies_less(sigma, weight):
    """With the exact class-conditional teacher, the new target has the noise target's mean given x
    (tested against functions of x: no bias a network could learn) and lies closer to the exact
    unconditional epsilon E[eps | x], at the blend's weight and at full weight alike."""
    batch, x, mu, d_teacher, eps_exact = _two_class_gaussians(sigma)
    target = teacher_target(batch, d_teacher.reshape(-1, 1, 1, 1), weight).reshape(-1).double()
    noise = batch["target"].reshape(-1)
    diff = target - noise
    for g in (torch.ones_like(x), x, torch.tanh(3 * x), x**2):
        v = diff * g
        assert abs(v.mean()) < 5 * v.std() / math.sqrt(len(v)) + 1e-6
    if weight == "full" or sigma >= 0.3:  # (the blend leaves the noise target nearly as it is at low noise)
        assert (target - eps_exact).square().mean() < 0.95 * (noise - eps_exact).square().mean()
    if weight == "full":  # at full weight the teacher removes at least as much spread as the blend does
        blend = teacher_target(batch, d_teacher.reshape(-1, 1, 1, 1), "blend").reshape(-1).double()
        assert (target - eps_exact).square().mean() <= (blend - eps_exact).square().mean()
    # a teacher that ignores x (the class mean) is biased, and the same check sees it
    biased = teacher_target(batch, mu.reshape(-1, 1, 1, 1), weight).reshape(-1).double() - noise
    v = biased * x
    assert abs(v.mean()) > 10 * v.std() / math.sqrt(len(v))


def test_teacher_target_limits():
    """An oracle teacher (D = x0) leaves the noise target as it is; a teacher that does not denoise
    (D = x) scales it by 1 - w, w = sigma^2 / (sigma^2 + 0.25)."""
    x0, noise = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    sigma = torch.tensor([0.01, 0.5, 2.0, 80.0])
    x = x0 + sigma[:, None, None, None] * noise
    batch = {"x_sigma": x, "sigma": sigma, "target": noise}
    torch.testing.assert_close(teacher_target(batch, x0), noise, atol=2e-4, rtol=1e-4)
    w = (sigma**2 / (sigma**2 + 0.25))[:, None, None, None]
    torch.testing.assert_close(teacher_target(batch, x), (1 - w) * noise, atol=2e-4, rtol=1e-4)
    # full weight: the teacher's epsilon (x - D_T) / sigma exactly
    torch.testing.assert_close(teacher_target(batch, x0, "full"), noise, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(teacher_target(batch, x, "full"), torch.zeros_like(noise), atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="teacher weight"):
        teacher_target(batch, x, "half")


@pytest.mark.slow
def test_quick_ddpm_with_a_teacher_records_it(tmp_path, mnist_root):
    run_dir, out = tmp_path / "run", tmp_path / "ddpm.safetensors"
    run_script("ddpm", run_dir, out, mnist_root, "--quick", "--recipe", "cpu", "--max-steps", 3, "--teacher", "flow")
    model = load_model(out)
    assert model.kind == "ddpm" and model.objective.to_dict()["name"] == "ddpm_eps"
    assert model.config["training"]["teacher"] == "flow" and model.config["training"]["teacher_weight"] == "full"


@pytest.mark.parametrize("argv, message", [
    (["--teacher", "classifier"], "expected a class-conditional cfg or flow"),
    (["--teacher", "nowhere.safetensors"], "--teacher: "),
    (["--teacher", "flow", "--objective", "edm", "--min-snr-gamma", "none"], "--teacher applies to an unconditional --objective ddpm_eps model"),
])
def test_teacher_refuses_what_it_cannot_use(tmp_path, capsys, monkeypatch, argv, message):
    from test_training import _fails

    monkeypatch.chdir(tmp_path)
    err = _fails(capsys, "ddpm", ["--quick", *argv], status=2)
    assert err.startswith("error: ") and message in err


@pytest.mark.parametrize("argv, message", [
    (["--objective", "edm", "--edm-weight", "--min-snr-gamma", "none"], "--eps-t and --edm-weight apply to --objective ddpm_eps only"),
    (["--objective", "rectified_flow", "--eps-t", "lognormal", "--min-snr-gamma", "none"], "--eps-t and --edm-weight apply to --objective ddpm_eps only"),
    (["--objective", "edm", "--recipe", "cpu"], "the ddpm CPU recipe sets it: add --min-snr-gamma none"),
    (["--edm-weight", "--min-snr-gamma", "5"], "choose one loss weight"),
])
def test_eps_training_flags_refuse_nonsense(tmp_path, capsys, monkeypatch, argv, message):
    from test_training import _fails

    monkeypatch.chdir(tmp_path)
    err = _fails(capsys, "ddpm", ["--quick", *argv], status=2)
    assert err.startswith("error: ") and message in err


def test_min_snr_gamma_none_and_bad_values():
    p = add_diffusion_args(training.common_parser("x"))
    assert p.parse_args(["--min-snr-gamma", "none"]).min_snr_gamma is None
    assert p.parse_args(["--min-snr-gamma", "5"]).min_snr_gamma == 5.0
    with pytest.raises(SystemExit):
        p.parse_args(["--min-snr-gamma", "five"])


@pytest.mark.slow
def test_quick_gating_with_loguniform_noise_levels(tmp_path, mnist_root):
    """--gate-sigma loguniform: the training examples fill every noise band about equally (the
    objective's own density puts ~1% below sigma 0.05), and the checkpoint records the choice."""
    mcl_dir, mcl_out = tmp_path / "mcl", tmp_path / "mcl.safetensors"
    run_script("mcl", mcl_dir, mcl_out, mnist_root, "--quick", "--experts", 2, "--limit", 128, "--epochs", 1, "--mcl-arch", "separate", "--wta-scope", "step")
    run_dir, out = tmp_path / "run", tmp_path / "gating.safetensors"
    run_script("gating", run_dir, out, mnist_root, "--quick", "--epochs", 1, "--max-steps", 8, "--mcl", mcl_out, "--gate-sigma", "loguniform")
    assert load_model(out).config["training"]["gate_sigma"] == "loguniform"
    n = metrics(run_dir, "epoch")[-1]["band_examples"]
    assert sum(n) == 8 * 64 and min(n) >= 50  # 512 draws over 6 bands: ~85 each


@pytest.mark.slow
def test_ddpm_cpu_recipe_trains_its_first_stage_when_it_is_missing(tmp_path, mnist_root):
    """``python train/ddpm.py`` on a fresh machine: stage 1 (from flow's network, no teacher) is
    trained into runs/ddpm-stage1/ first, then stage 2 starts from it with the teacher at full weight."""
    run_dir, out = tmp_path / "run", tmp_path / "ddpm.safetensors"
    small = ("--recipe", "cpu", "--limit", 128, "--batch-size", 64, "--max-steps", 2, "--save-every", 0)
    proc = run_script("ddpm", run_dir, out, mnist_root, *small)
    stage1 = tmp_path / "runs" / "ddpm-stage1" / "ddpm.safetensors"
    assert "stage 1:" in proc.stdout and stage1.is_file()
    first, second = load_model(stage1).config["training"], load_model(out).config["training"]
    assert (first["init"], first["teacher"], first["lr"]) == ("flow", None, 2e-3)
    assert (second["init"], second["teacher"], second["teacher_weight"], second["lr"]) == ("runs/ddpm-stage1/ddpm.safetensors", "flow", "full", 1e-3)
    proc = run_script("ddpm", run_dir, out, mnist_root, *small)  # stage 1 is there now: not trained again
    assert "stage 1:" not in proc.stdout


@pytest.mark.slow
def test_quick_ddpm_weak_is_a_smaller_ddpm_with_the_teacher(tmp_path, mnist_root):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddpm_weak", Path(__file__).resolve().parent.parent / "train" / "ddpm_weak.py")
    weak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weak)
    assert weak.RECIPE["channels"] == 16 and weak.RECIPE["teacher"] == "flow"
    run_dir, out = tmp_path / "run", tmp_path / "ddpm_weak.safetensors"
    run_script("ddpm_weak", run_dir, out, mnist_root, "--quick", "--max-steps", 3)
    model = load_model(out)
    assert model.kind == "ddpm" and model.objective.to_dict()["name"] == "ddpm_eps" and model.config["training"]["teacher"] == "flow"
    assert model.guide_denoiser() is not None
