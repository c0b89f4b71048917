"""The training tasks of the single-network scripts (ddpm, ddpm_weak, cfg, flow, cold_blur,
classifier); MCL and its gating network are in ``mcl_training``. The loop is ``training.train``."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import CheckpointError
from .cold import BlurConfig, BlurDegradation, Restorer, StartDistribution
from .cold import generate as generate_cold
from .guidance import CFGDenoiser
from .models import load_model, save_model
from .nets import Classifier, ClassifierConfig, UNet, UNetConfig
from .objectives import (
    EPS_T_SAMPLING,
    FLOW_T_SAMPLING,
    TEACHER_WEIGHTS,
    EDMObjective,
    EpsilonObjective,
    FlowObjective,
    ScheduleConfig,
    teacher_target,
)
from .pipeline import Settings, initial_noise
from .samplers import get_sigmas, sample_dpmpp_2m
from .training import Task, fail


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DistributedDataParallel


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    from torchvision.utils import save_image

    save_image((images.float().cpu().clamp(-1, 1) + 1) / 2, path, nrow=nrow, padding=2, pad_value=1.0)


@torch.no_grad()
def sample_fixed(denoiser, n: int, label=None, steps: int = 16, seed: int = 0, device="cpu", on_step=None) -> torch.Tensor:
    """``n`` samples with DPM++ 2M from a fixed seed (the same noise every epoch)."""
    sigmas = get_sigmas("dpmpp_2m", denoiser, steps)
    noise, g = initial_noise(Settings(seed=seed, n=n))
    x = (noise * math.sqrt(float(sigmas[0]) ** 2 + 1)).to(device)
    denoiser.reset(n, g)
    for step in sample_dpmpp_2m(denoiser, x, sigmas, label, g):
        x = step.x
        if on_step is not None:
            on_step()
    return x


def _optional_float(text: str) -> float | None:
    """A float, or ``none`` for None (to switch off a value a recipe sets)."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def add_diffusion_args(p):
    p.add_argument("--objective", choices=["ddpm_eps", "edm", "rectified_flow"], default="ddpm_eps",
                   help="ddpm_eps: DDPM epsilon prediction on the discrete schedule; edm: Karras et al. 2022 "
                        "(preconditioned, log-normal sigma, variance exploding 0.002..80); rectified_flow: velocity")
    p.add_argument("--min-snr-gamma", type=_optional_float, default=None, metavar="GAMMA",
                   help="ddpm_eps: weight each example's loss by min(SNR, GAMMA) / SNR (Min-SNR, Hang et al. 2023; 5 is usual; "
                        "none: no weight, where a recipe sets one)")
    p.add_argument("--eps-t", choices=EPS_T_SAMPLING, default=None,
                   help="ddpm_eps: training density of the timesteps (default uniform; lognormal: EDM's log-normal sigma, "
                        "each draw taken to the nearest training timestep)")
    p.add_argument("--edm-weight", action="store_true",
                   help="ddpm_eps: weight each example's loss by 1 + sigma^2 / 0.25, EDM's loss weight written for an epsilon network")
    p.add_argument("--flow-t", choices=FLOW_T_SAMPLING, default=None,
                   help="rectified_flow: training density of t (default uniform; logit_normal: Esser et al. 2024)")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--beta-start", type=float, default=1e-4)
    p.add_argument("--beta-end", type=float, default=0.02)
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="fine-tune from a trained ddpm/cfg/flow checkpoint (its network and objective are used); "
                        "an unconditional model takes a CFG network's unconditional branch, converted exactly")
    p.add_argument("--init-weights-only", action="store_true",
                   help="with --init: take only the network's weights and train it with this run's --objective "
                        "(a warm start across objectives: the features carry over, the output head relearns)")
    p.add_argument("--init-noise", type=float, default=0.02,
                   help="MCL with --init: relative noise added to each expert's copy to break their symmetry")
    return p


def unet_from_checkpoint(path, conditional: bool):
    """A trained UNet (and its objective) to start from (a ddpm, cfg or flow checkpoint). For an unconditional target, a
    class-conditional network becomes unconditional by folding its null-class embedding (the
    constant it adds to the time embedding when the label is dropped) into the time MLP's last
    bias: the same function as the CFG network at guidance 0."""
    import dataclasses

    try:
        src = load_model(path)
    except (CheckpointError, ValueError) as e:
        fail(f"--init: {e}", status=2)
    if src.kind not in ("ddpm", "cfg", "flow"):
        fail(f"--init: {path} is a {src.kind} checkpoint; expected ddpm, cfg or flow", status=2)
    net = src.net
    num_classes = net.config.num_classes
    if conditional and not num_classes:
        fail(f"--init: {path} is unconditional; a conditional model needs a conditional start", status=2)
    if not conditional and num_classes:
        state = {k: v for k, v in net.state_dict().items() if not k.startswith("label_emb.")}
        state["time_mlp.2.bias"] = state["time_mlp.2.bias"] + net.label_emb.weight[num_classes]
        net = UNet(dataclasses.replace(net.config, num_classes=None))
        net.load_state_dict(state)
    return net.train().requires_grad_(True), src.objective


@dataclass(frozen=True)
class DiffusionConfig:
    """What a diffusion training run is, read from the command line and checked once. The flags
    that only some scripts have (``--p-uncond``: cfg and flow; ``--teacher``: ddpm) take their
    defaults where a script lacks them."""

    conditional: bool
    objective: str  # ddpm_eps | edm | rectified_flow
    schedule: ScheduleConfig
    min_snr_gamma: float | None = None
    eps_t: str | None = None
    edm_weight: bool = False
    flow_t: str | None = None
    p_uncond: float = 0.0
    init: str | None = None
    init_weights_only: bool = False
    teacher: str | None = None
    teacher_weight: str = "blend"

    @classmethod
    def from_args(cls, args, conditional: bool) -> DiffusionConfig:
        """The checked configuration; ``fail`` (exit status 2) with a message for flags that do not go together."""
        flag = lambda name, default=None: vars(args).get(name, default)  # noqa: E731
        c = cls(conditional, args.objective, ScheduleConfig(args.schedule, args.timesteps, args.beta_start, args.beta_end),
                flag("min_snr_gamma"), flag("eps_t"), bool(flag("edm_weight", False)), flag("flow_t"), flag("p_uncond", 0.0),
                flag("init"), bool(flag("init_weights_only", False)), flag("teacher"), flag("teacher_weight", "blend"))
        if conditional and not 0 <= c.p_uncond < 1:
            fail(f"--p-uncond must be in [0, 1) (got {c.p_uncond})", status=2)
        if c.min_snr_gamma is not None and c.objective != "ddpm_eps":
            fail("bad objective settings: --min-snr-gamma applies to --objective ddpm_eps only (the ddpm CPU recipe sets it: "
                 "add --min-snr-gamma none)", status=2)
        if (c.eps_t is not None or c.edm_weight) and c.objective != "ddpm_eps":
            fail("bad objective settings: --eps-t and --edm-weight apply to --objective ddpm_eps only", status=2)
        if c.flow_t is not None and c.objective != "rectified_flow":
            fail("bad objective settings: --flow-t applies to --objective rectified_flow only", status=2)
        if c.init_weights_only and not c.init:
            fail("--init-weights-only needs --init", status=2)
        if c.teacher and c.teacher_weight not in TEACHER_WEIGHTS:
            fail(f"--teacher-weight must be one of {', '.join(TEACHER_WEIGHTS)}", status=2)
        return c

    def make_objective(self):
        try:
            if self.objective == "ddpm_eps":
                return EpsilonObjective(self.schedule, self.min_snr_gamma, t_sampling=self.eps_t or "uniform", edm_weight=self.edm_weight)
            if self.objective == "edm":
                return EDMObjective()
            return FlowObjective(t_sampling=self.flow_t or "uniform")
        except ValueError as e:
            fail(f"bad objective settings: {e}", status=2)


class DiffusionTask(Task):
    """DDPM (unconditional), or CFG when ``conditional`` (label dropout ``p_uncond``)."""

    def __init__(self, args, name: str = "ddpm", conditional: bool = False):
        super().__init__(args)
        self.name = name
        self.conditional = conditional
        self.run_config = c = DiffusionConfig.from_args(args, conditional)
        self.objective = c.make_objective()
        self.init_net = None
        if c.init:
            self.init_net, init_objective = unet_from_checkpoint(c.init, conditional)
            if not c.init_weights_only:
                self.objective = init_objective
        self.teacher = None
        if c.teacher:
            if conditional or not isinstance(self.objective, EpsilonObjective):
                fail("--teacher applies to an unconditional --objective ddpm_eps model", status=2)
            try:
                self.teacher = load_model(c.teacher)
            except (CheckpointError, OSError, ValueError) as e:
                fail(f"--teacher: {e}", status=2)
            if self.teacher.kind not in ("cfg", "flow"):
                fail(f"--teacher: {c.teacher} is a {self.teacher.kind} checkpoint; expected a class-conditional cfg or flow", status=2)
            self.teacher.net.eval().requires_grad_(False)
            self.teacher_denoiser = self.teacher.objective.denoiser(self.teacher.net)
            self.teacher_weight = c.teacher_weight

    def unet_config(self) -> UNetConfig:
        if self.init_net is not None:
            return self.init_net.config
        return UNetConfig(base_channels=self.args.channels, blocks_per_level=self.args.blocks,
                          attention=self.args.attention, num_classes=10 if self.conditional else None)

    def build(self):
        if self.teacher is not None:
            self.teacher.to(self.device)
        return self.init_net if self.init_net is not None else UNet(self.unet_config())

    def labels(self, y, generator):
        if not self.conditional:
            return None
        drop = torch.rand(y.shape, generator=generator, device=generator.device).to(y.device) < self.run_config.p_uncond
        return torch.where(drop, torch.full_like(y, 10), y)

    def loss(self, model, x0, y, generator, progress, index=None):
        batch = self.objective.training_batch(x0, generator)
        if self.teacher is not None:
            with torch.no_grad():
                batch["target"] = teacher_target(batch, self.teacher_denoiser(batch["x_sigma"], batch["sigma"], y), self.teacher_weight)
        return self.objective.loss(model, batch, self.labels(y, generator)).mean(), {}

    def denoiser(self, model):
        den = self.objective.denoiser(model)
        return CFGDenoiser(den, 2.0, null_label=10) if self.conditional else den

    def sample_grid(self, model, path):
        device = next(model.parameters()).device
        label = torch.arange(20, device=device) % 10 if self.conditional else None
        save_grid(sample_fixed(self.denoiser(model), 20, label, device=device), path, nrow=10)

    def config(self, training: dict) -> dict:
        c = self.run_config
        return {"network": {"kind": "unet", "config": self.unet_config().to_dict()}, "objective": self.objective.to_dict(),
                "training": dict(training, p_uncond=c.p_uncond if c.conditional else None, init=c.init, teacher=c.teacher,
                                 teacher_weight=c.teacher_weight if c.teacher else None, init_weights_only=c.init_weights_only)}

    def export(self, model, path, training):
        kind = "flow" if self.name == "flow" else "cfg" if self.conditional else "ddpm"
        save_model(path, kind, [unwrap(model)], self.config(training))


class ClassifierTask(Task):
    """The digit classifier the metrics use: cross-entropy with small random shifts."""

    name = "classifier"

    def build(self):
        return Classifier(ClassifierConfig(channels=self.args.channels, arch=getattr(self.args, "arch", "vgg")))

    def loss(self, model, x0, y, generator, progress, index=None):
        shifts = torch.randint(-2, 3, (2,), generator=generator, device=generator.device).tolist()
        x = torch.roll(x0, shifts=shifts, dims=(2, 3))
        logits = model(x)
        return F.cross_entropy(logits.float(), y), {"accuracy": (logits.argmax(1) == y).float().mean()}

    @torch.no_grad()
    def sample_grid(self, model, path):
        """Test accuracy (first 1000 test images with --quick), and a grid whose row d shows test
        images the classifier calls d (blank where it calls fewer than ten so)."""
        from .data import load_mnist

        x, y = load_mnist(self.args.data_dir, train=False)
        if self.args.quick:
            x, y = x[:1000], y[:1000]
        pred = torch.cat([model(x[i:i + 1000].to(self.device)).argmax(1).cpu() for i in range(0, len(x), 1000)])
        grid = torch.ones(10, 10, 1, 28, 28)
        for d in range(10):
            chosen = x[pred == d][:10]
            grid[d, : len(chosen)] = chosen
        save_grid(grid.flatten(0, 1), path, nrow=10)
        return {"test_accuracy": round((pred == y).float().mean().item(), 5)}

    def export(self, model, path, training):
        net = unwrap(model)
        training = dict(training, test_accuracy=training.get("final", {}).get("test_accuracy"))
        save_model(path, "classifier", [net], {"network": {"kind": "classifier", "config": net.config.to_dict()}, "training": training})


class ColdTask(Task):
    """Cold diffusion (``diffusion_core.cold``): a UNet learns ``R(D(x0, s) + small noise, s) = x0``
    for the blur levels s drawn uniformly from 1..levels, with the L1 loss of Bansal et al. The
    blur is computed in float32 outside autocast (its cosine transform needs the precision)."""

    name = "cold_blur_v2"  # the first, cold_blur (blur to 10 px), stays for the links made with it

    def __init__(self, args):
        super().__init__(args)
        if getattr(args, "name", None):
            self.name = args.name
        try:
            self.degradation = BlurDegradation(BlurConfig(levels=args.levels, sigma_max=args.sigma_max, train_noise=args.train_noise))
        except (TypeError, ValueError) as e:
            fail(f"bad blur settings: {e}", status=2)
        if args.train_noise < 0 or args.start_noise < 0:
            fail("--train-noise and --start-noise must be at least 0", status=2)
        self.init_net = unet_from_checkpoint(args.init, conditional=False)[0] if getattr(args, "init", None) else None
        from .data import (
            load_mnist,  # generation's start: the fully blurred training images' surviving modes
        )

        images, labels = load_mnist(args.data_dir, train=True)
        n = args.limit or None
        self.start = StartDistribution.fit(images[:n], self.degradation, args.start_noise, labels=labels[:n])  # one Gaussian per digit

    def unet_config(self) -> UNetConfig:
        if self.init_net is not None:
            return self.init_net.config
        return UNetConfig(base_channels=self.args.channels, blocks_per_level=self.args.blocks, attention=self.args.attention)

    def build(self):
        return self.init_net if self.init_net is not None else UNet(self.unet_config())

    def loss(self, model, x0, y, generator, progress, index=None):
        deg = self.degradation
        s = torch.randint(1, deg.levels + 1, (x0.shape[0],), generator=generator, device=generator.device).to(x0.device)
        with torch.autocast(x0.device.type, enabled=False):
            x_s = deg(x0, s.cpu())
            x_s = x_s + deg.config.train_noise * torch.randn(x_s.shape, generator=generator, device=generator.device).to(x0.device)
        pred = model(x_s, 1000.0 * s.float() / deg.levels)
        return (pred.float() - x0).abs().mean(), {}

    def generate(self, model, n: int, seed: int = 0, sampler: str = "improved") -> torch.Tensor:
        device = next(model.parameters()).device
        return generate_cold(Restorer(model, self.degradation), self.start, n, seed, sampler, device)[1]

    def sample_grid(self, model, path):
        save_grid(self.generate(model, 20), path, nrow=10)

    def export(self, model, path, training):
        config = {"network": {"kind": "unet", "config": self.unet_config().to_dict()}, "degradation": self.degradation.to_dict(),
                  "generation": self.start.to_dict(), "training": dict(training, init=getattr(self.args, "init", None))}
        save_model(path, "cold", [unwrap(model)], config)
