"""The training scripts end to end on CPU: every script's --quick run, SIGKILL and --resume, and a
2-process torchrun (gloo) run; plus the loop's helpers and its error messages.

The script runs are subprocesses (OMP_NUM_THREADS=1) working in a temporary directory, so a
default path can never reach the repository's runs/ or checkpoints/. Quick runs are a few
optimizer steps of a tiny network on a few hundred images; the whole file takes about a minute
on two cores.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from diffusion_core.checkpoints import load_checkpoint
from diffusion_core.data import load_mnist
from diffusion_core.mcl_training import kmeans_distances
from diffusion_core.models import load_model
from diffusion_core.training import lr_factor, shard_indices

ROOT = Path(__file__).resolve().parent.parent
STATE_KEYS = {"model", "ema", "opt", "sched", "gen", "step", "epoch", "batch_in_epoch", "wall_s", "args"}
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **extra)
    return env


def _cmd(script: str, run_dir: Path, out: Path, mnist_root: Path, *args) -> list[str]:
    return [str(ROOT / "train" / f"{script}.py"), "--no-progress", "--data-dir", str(mnist_root),
            "--run-dir", str(run_dir), "--out", str(out), *map(str, args)]


def run_script(script, run_dir, out, mnist_root, *args, timeout=240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *_cmd(script, run_dir, out, mnist_root, *args)], cwd=run_dir.parent,
                          env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def metrics(run_dir: Path, kind: str) -> list[dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["type"] == kind]


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def grid_size(rows: int, cols: int = 10) -> tuple[int, int]:
    """torchvision.utils.make_grid with padding 2 for 28x28 images."""
    return cols * 30 + 2, rows * 30 + 2


def check_run(run_dir: Path, out: Path, kind: str, steps: int, epochs: int):
    """Artifacts every run must leave; returns the loaded model."""
    model = load_model(out)
    assert model.kind == kind
    training = model.config["training"]
    assert training["steps"] == steps and training["epochs"] == epochs
    assert training["quick"] is True and training["world_size"] == 1
    assert training["final"]["step"] == steps and training["final"]["epoch"] == epochs - 1
    assert training["wall_time_s"] > 0 and training["images_seen"] == steps * training["batch_size"]
    # one step record per step (--quick logs every step), one epoch record per epoch
    assert [r["step"] for r in metrics(run_dir, "step")] == list(range(1, steps + 1))
    assert [r["epoch"] for r in metrics(run_dir, "epoch")] == list(range(epochs))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(run_dir, "step"))
    assert png_size(run_dir / "loss.png")[0] > 100
    for e in range(epochs):
        assert (run_dir / f"samples_epoch{e:03d}.png").is_file()
    state = torch.load(run_dir / "state.pt", weights_only=True)
    assert STATE_KEYS <= set(state) and state["step"] == steps
    assert not list(run_dir.glob(".*tmp*")) and not list(out.parent.glob(".*tmp*"))
    return model


def _diffusion_output_ok(model, label=None):
    den = model.denoiser(guidance=1.5) if model.num_classes else model.denoiser()
    x = torch.randn(2, 1, 28, 28)
    y = den(x, torch.tensor([1.0, 5.0]), label)
    assert y.shape == x.shape and torch.isfinite(y).all()


# ----------------------------------------------------------------------------- quick runs

QUICK_DDPM = ("--quick", "--save-every", "2")  # 512 images, batch 64: 2 epochs of 8 steps


@pytest.fixture(scope="module")
def ddpm_ref(tmp_path_factory, mnist_root):
    run_dir = tmp_path_factory.mktemp("ddpm") / "run"
    out = run_dir.parent / "ddpm.safetensors"
    proc = run_script("ddpm", run_dir, out, mnist_root, *QUICK_DDPM)
    return SimpleNamespace(run_dir=run_dir, out=out, proc=proc)


@pytest.fixture(scope="module")
def mcl_run(tmp_path_factory, mnist_root):
    run_dir = tmp_path_factory.mktemp("mcl") / "run"
    out = run_dir.parent / "mcl.safetensors"
    proc = run_script("mcl", run_dir, out, mnist_root, "--quick", "--experts", 3, "--limit", 256,  # 2 epochs of 4 steps
                      "--mcl-arch", "separate", "--wta-scope", "step", "--wta", "annealed")  # the ensemble train/gating.py routes
    return SimpleNamespace(run_dir=run_dir, out=out, proc=proc)


@pytest.mark.slow
def test_quick_ddpm(ddpm_ref):
    model = check_run(ddpm_ref.run_dir, ddpm_ref.out, "ddpm", steps=16, epochs=2)
    assert model.num_classes is None and model.config["network"]["config"]["base_channels"] == 8
    _diffusion_output_ok(model)
    assert png_size(ddpm_ref.run_dir / "samples_epoch001.png") == grid_size(2)
    first, last = metrics(ddpm_ref.run_dir, "epoch")
    assert last["loss"] < first["loss"]  # it learns something even in 16 steps
    assert "exported" in ddpm_ref.proc.stdout


@pytest.mark.slow
def test_quick_cfg_defaults_to_its_own_run_dir(tmp_path, mnist_root):
    # no --run-dir / --out: a quick run writes under runs/cfg-quick/, never over checkpoints/cfg.safetensors
    cmd = [sys.executable, str(ROOT / "train" / "cfg.py"), "--quick", "--epochs", "1", "--max-steps", "4", "--no-progress", "--data-dir", str(mnist_root)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "runs" / "cfg-quick"
    out = run_dir / "cfg.safetensors"
    assert not (tmp_path / "checkpoints").exists()
    model = check_run(run_dir, out, "cfg", steps=4, epochs=1)
    assert model.num_classes == 10 and model.config["training"]["p_uncond"] == 0.1
    _diffusion_output_ok(model, label=torch.tensor([3, 7]))


@pytest.mark.slow
def test_quick_classifier(tmp_path, mnist_root):
    run_dir, out = tmp_path / "run", tmp_path / "classifier.safetensors"
    proc = run_script("classifier", run_dir, out, mnist_root, "--quick", "--epochs", 1, "--max-steps", 4)
    model = check_run(run_dir, out, "classifier", steps=4, epochs=1)
    acc = metrics(run_dir, "epoch")[-1]["test_accuracy"]
    assert 0 <= acc <= 1 and model.config["training"]["test_accuracy"] == acc
    assert "test_accuracy=" in proc.stdout
    assert model.net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert png_size(run_dir / "samples_epoch000.png") == grid_size(10)


@pytest.mark.slow
def test_quick_mcl_logs_win_rates_every_epoch(mcl_run):
    model = check_run(mcl_run.run_dir, mcl_run.out, "mcl", steps=8, epochs=2)
    assert model.num_experts == 3
    _diffusion_output_ok(SimpleNamespace(num_classes=None, denoiser=lambda: model.denoiser(routing="expert:2")))
    epochs = metrics(mcl_run.run_dir, "epoch")
    for rec in epochs:
        assert len(rec["wins"]) == 3 and sum(rec["wins"]) == 4 * 64  # every example of the epoch won by one expert
        assert sum(rec["win_rates"]) == pytest.approx(1, abs=1e-3)
        dead = [k for k, r in enumerate(rec["win_rates"]) if r < 0.05]
        assert rec.get("dead_experts", []) == dead and bool(rec.get("warnings")) == bool(dead)
    printed = [line for line in mcl_run.proc.stdout.splitlines() if "win_rates=" in line]
    assert len(printed) == 2
    warned = any(rec.get("warnings") for rec in epochs)
    assert ("WARNING" in mcl_run.proc.stderr) == warned
    assert png_size(mcl_run.run_dir / "samples_epoch000.png") == grid_size(3)  # a row per expert


@pytest.mark.slow
def test_quick_gating_on_quick_mcl(tmp_path, mnist_root, mcl_run):
    run_dir, out = tmp_path / "run", tmp_path / "gating.safetensors"
    run_script("gating", run_dir, out, mnist_root, "--quick", "--epochs", 1, "--max-steps", 4, "--mcl", mcl_run.out)
    model = check_run(run_dir, out, "gating", steps=4, epochs=1)
    assert model.config["network"]["config"]["num_experts"] == 3
    assert model.config["training"]["mcl"] == str(mcl_run.out)
    assert model.net(torch.zeros(5, 1, 28, 28), torch.full((5,), 2.0)).shape == (5, 3)
    rec = metrics(run_dir, "epoch")[-1]
    use = rec["sample_expert_use"]
    assert len(use) == 3 and sum(use) == pytest.approx(1, abs=1e-3)
    # per-noise-band accuracy: 6 bands over the ensemble's sigma range, adding up to the overall accuracy
    assert len(rec["band_sigmas"]) == 7 and rec["band_sigmas"] == sorted(rec["band_sigmas"]) and rec["chance"] == pytest.approx(1 / 3, abs=1e-3)
    n = rec["band_examples"]
    assert sum(n) == 4 * 64 and len(rec["band_accuracy"]) == 6
    hits = sum((a or 0) * c for a, c in zip(rec["band_accuracy"], n))
    assert hits / sum(n) == pytest.approx(rec["accuracy"], abs=1e-3)


# ----------------------------------------------------------------------------- SIGKILL and --resume


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, mnist_root, ddpm_ref):
    run_dir, out = tmp_path / "run", tmp_path / "ddpm.safetensors"
    cmd = [sys.executable, *_cmd("ddpm", run_dir, out, mnist_root, *QUICK_DDPM)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state_path = run_dir / "state.pt"
    deadline = time.time() + 120
    while not state_path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    log, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{log}"
    assert not out.exists()
    saved = torch.load(state_path, weights_only=True)["step"]
    assert 0 < saved < 16

    proc = run_script("ddpm", run_dir, out, mnist_root, *QUICK_DDPM, "--resume")
    assert f"resumed from {state_path} at step {saved} " in proc.stdout
    check_run(run_dir, out, "ddpm", steps=16, epochs=2)  # steps 1..16 logged exactly once each
    # same seed, same data order, same noise: the killed and resumed run ends bit for bit where
    # the uninterrupted one did (CPU, one thread)
    a, _ = load_checkpoint(ddpm_ref.out)
    b, _ = load_checkpoint(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
    assert [r["loss"] for r in metrics(run_dir, "step")] == [r["loss"] for r in metrics(ddpm_ref.run_dir, "step")]
    assert [r["loss"] for r in metrics(run_dir, "epoch")] == [r["loss"] for r in metrics(ddpm_ref.run_dir, "epoch")]


# ----------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, mnist_root):
    run_dir, out = tmp_path / "run", tmp_path / "out" / "mcl.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_cmd("mcl", run_dir, out, mnist_root, "--quick", "--experts", 2, "--limit", 256, "--epochs", 1)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(DIFFUSION_DIST_BACKEND="gloo"), capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # rank 0 alone logs and exports; the loop checks that both replicas hold the same weights
    assert output.count("exported ") == 1 and output.count("win_rates=") == 1
    assert [p.name for p in out.parent.iterdir()] == ["mcl.safetensors"]
    model = load_model(out)
    training = model.config["training"]
    assert model.num_experts == 2 and training["world_size"] == 2 and training["batch_size"] == 128
    (rec,) = metrics(run_dir, "epoch")
    assert rec["step"] == training["steps"] == 2  # 256 images / (64 x 2 processes)
    assert sum(rec["wins"]) == 2 * 64 * 2  # win counts summed over both processes
    assert len(metrics(run_dir, "step")) == 2
    # the resume state keeps every rank's own random generators (each rank draws different noise)
    state = torch.load(run_dir / "state.pt", weights_only=True)
    ranks = state["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["gen"], ranks[1]["gen"])
    # the default per-image assignment: the table rank 0 saves holds the rows both ranks visited
    # (every one of the 256 images, half of them on rank 1), not only its own half
    assert training["wta_scope"] == "example"
    images, _ = load_mnist(mnist_root, train=True)
    d = kmeans_distances(images[:256], 2, seed=0)
    start = d / d.mean(dim=1, keepdim=True)
    table = state["task"]["table"]
    assert table.shape == (256, 2) and bool((table - start).abs().amax(dim=1).gt(1e-6).all())


# ----------------------------------------------------------------------------- helpers and errors


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_indices_give_each_rank_its_own_images(world):
    n, bs = 103, 4
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    steps = n // (bs * world)
    seen = torch.cat([shard_indices(perm, b, r, world, bs) for b in range(steps) for r in range(world)])
    assert len(seen) == steps * world * bs and len(seen.unique()) == len(seen)
    for r in range(world):
        assert all(len(shard_indices(perm, b, r, world, bs)) == bs for b in range(steps))


def test_lr_factor_warmup_then_cosine():
    f = [lr_factor(s, 10, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[99] < 1e-3
    assert lr_factor(150, 10, 100) == pytest.approx(0.0)


def test_mcl_epoch_summary_reports_a_dead_expert():
    from diffusion_core.mcl_training import MCLTask

    args = SimpleNamespace(objective="ddpm_eps", schedule="linear", timesteps=1000, beta_start=1e-4, beta_end=0.02,
                           attention=True, wta="hard", experts=3, relax_eps=0.05, t_start=0.05, t_end=1e-5)
    task = MCLTask(args)
    rec = task.epoch_summary({"wins": torch.tensor([60.0, 2.0, 38.0]), "loss": 5.0}, 10)
    assert rec["wins"] == [60, 2, 38] and rec["win_rates"] == [0.6, 0.02, 0.38] and rec["loss"] == 0.5
    assert rec["dead_experts"] == [1] and "[1]" in rec["warnings"][0] and "relaxed" in rec["warnings"][0]
    healthy = task.epoch_summary({"wins": torch.tensor([30.0, 30.0, 40.0]), "loss": 5.0}, 10)
    assert "warnings" not in healthy and "dead_experts" not in healthy


def _script(name):
    spec = importlib.util.spec_from_file_location(f"train_{name}", ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fails(capsys, script, argv, status=1) -> str:
    with pytest.raises(SystemExit) as e:
        _script(script).main(["--no-progress", *map(str, argv)])
    assert e.value.code == status
    return capsys.readouterr().err


@pytest.mark.slow
def test_bad_mcl_checkpoint_is_a_clear_error(tmp_path, capsys, monkeypatch, ddpm_ref):
    monkeypatch.chdir(tmp_path)
    err = _fails(capsys, "gating", ["--quick", "--mcl", tmp_path / "missing.safetensors"])
    assert err.startswith("error: --mcl ") and "missing.safetensors" in err and "not found" in err
    err = _fails(capsys, "gating", ["--quick", "--mcl", ddpm_ref.out])
    assert "is a ddpm checkpoint, not an MCL ensemble" in err


def test_missing_mnist_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [])  # no download attempt, whatever the network
    monkeypatch.chdir(tmp_path)
    err = _fails(capsys, "ddpm", ["--quick", "--data-dir", tmp_path / "nothing", "--run-dir", tmp_path / "run"])
    assert err.startswith("error: MNIST not found under") and str(tmp_path / "nothing") in err and "--data-dir" in err


@pytest.mark.slow
def test_bad_arguments_are_clear_errors(tmp_path, capsys, monkeypatch, mnist_root, ddpm_ref):
    monkeypatch.chdir(tmp_path)
    common = ["--data-dir", mnist_root, "--run-dir", tmp_path / "run", "--out", tmp_path / "x.safetensors"]
    err = _fails(capsys, "ddpm", [*common, "--batch-size", 0, "--ema-decay", 1.5], status=2)
    assert "--batch-size must be at least 1" in err and "--ema-decay must be in [0, 1)" in err
    err = _fails(capsys, "ddpm", [*common, "--limit", 10, "--batch-size", 32], status=2)
    assert "10 training images are fewer than one batch" in err
    # resuming with another network: name the flags that differ instead of a state_dict traceback
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "state.pt").write_bytes((ddpm_ref.run_dir / "state.pt").read_bytes())
    err = _fails(capsys, "ddpm", [*common, *QUICK_DDPM, "--channels", 4, "--resume"])
    assert "holds a different network" in err and "'channels': (8, 4)" in err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_benchmark_loop_smoke(tmp_path, mnist_root):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "benchmark_loop.py"), "--device", "cpu", "--steps", "2", "--warmup", "1",
                           "--channels", "8", "--batch-size", "16", "--mcl-experts", "2", "--precision", "fp32",
                           "--data-dir", str(mnist_root), "--json", str(out)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert [r["loop"] for r in report["results"]] == ["ours", "plain", "mcl-shared", "mcl-routed", "mcl-full"]
    assert report["precision"] == "fp32" and "MCL K=2, routed update" in report["results"][3]["what"]
    assert "shared trunk" in report["results"][2]["what"]
    # with no --blocks / --objective: the UNet of train/cfg.py's CPU recipe, which made the shipped cfg
    assert (report["network"]["blocks"], report["objective"]) == (1, "edm")
    for r in report["results"]:
        assert r["images_per_s"] > 0 and torch.isfinite(torch.tensor(r["final_loss"]))
        assert f"{r['images_per_s']:.0f}" in proc.stdout
    assert report["results"][1]["speedup_vs_plain"] == 1.0


def test_benchmark_loop_runs_only_the_mcl_loops_asked_for(tmp_path, mnist_root):
    out = tmp_path / "bench.json"
    base = [sys.executable, str(ROOT / "train" / "benchmark_loop.py"), "--device", "cpu", "--steps", "1", "--warmup", "0", "--channels", "8",
            "--batch-size", "8", "--mcl-experts", "2", "--precision", "fp32", "--data-dir", str(mnist_root), "--json", str(out)]
    proc = subprocess.run([*base, "--mcl-loops", "shared"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["loop"] for r in json.loads(out.read_text())["results"]] == ["ours", "plain", "mcl-shared"]
    bad = subprocess.run([*base, "--mcl-loops", "shared,gated"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2 and "--mcl-loops must be some of shared,routed,full" in bad.stderr


def test_init_from_cfg_gives_its_unconditional_branch_exactly(tiny_checkpoints):
    """--init converts a CFG network into an unconditional UNet computing the same function as the
    CFG denoiser at guidance 0 (the null class folded into the time-embedding bias)."""
    from diffusion_core.models import load_model
    from diffusion_core.tasks import unet_from_checkpoint

    cfg = load_model(tiny_checkpoints / "cfg.safetensors")
    net, objective = unet_from_checkpoint(tiny_checkpoints / "cfg.safetensors", conditional=False)
    assert net.config.num_classes is None and net.label_emb is None
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.tensor([0.05, 0.5, 5.0, 50.0])
    with torch.no_grad():
        want = cfg.denoiser(guidance=0.0)(x, sigma)
        got = objective.denoiser(net.eval())(x, sigma)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(got, cfg.denoiser(guidance=1.0)(x, sigma, torch.full((4,), 3)), atol=1e-3)


def test_init_weights_only_warm_starts_across_objectives(tiny_checkpoints, tmp_path):
    """--init-weights-only takes a flow network's weights (its unconditional branch for a DDPM) and
    trains them with the run's own objective: epsilon prediction, recorded in the config."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from explore_fixtures import add_tiny_flow

    from diffusion_core.models import load_model
    from diffusion_core.objectives import EpsilonObjective
    from diffusion_core.tasks import DiffusionTask, add_diffusion_args, unet_from_checkpoint
    from diffusion_core.training import common_parser, parse_args

    flow = add_tiny_flow(tmp_path)
    parser = lambda: add_diffusion_args(common_parser("test"))  # noqa: E731
    args = parse_args(parser(), {}, ["--init", str(flow), "--init-weights-only", "--min-snr-gamma", "5", "--device", "cpu"])
    task = DiffusionTask(args, name="ddpm", conditional=False)
    assert isinstance(task.objective, EpsilonObjective) and task.objective.min_snr_gamma == 5
    want, _ = unet_from_checkpoint(flow, conditional=False)
    got = task.build()
    assert got.config.num_classes is None
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    config = task.config({})
    assert config["objective"]["name"] == "ddpm_eps" and config["training"]["init_weights_only"] is True
    # without the flag the run keeps the source's objective (a plain fine-tune)
    plain = DiffusionTask(parse_args(parser(), {}, ["--init", str(flow), "--device", "cpu"]), name="ddpm")
    assert plain.objective.to_dict() == load_model(flow).objective.to_dict()
    with pytest.raises(SystemExit):
        DiffusionTask(parse_args(parser(), {}, ["--init-weights-only"]), name="ddpm")
