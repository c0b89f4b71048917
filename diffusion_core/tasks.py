"""The five training tasks (what differs between train/*.py); the loop is ``training.train``."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .guidance import CFGDenoiser
from .mcl import WTA_MODES, MCLDenoiser, ExpertRouter, annealed_temperature, win_counts, wta_loss
from .models import load_model, save_model
from .nets import Classifier, ClassifierConfig, GatingConfig, GatingNet, UNet, UNetConfig, gating_inputs
from .objectives import EpsilonObjective, FlowObjective, ScheduleConfig
from .samplers import get_sigmas, sample_dpmpp_2m
from .training import Task


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DistributedDataParallel


def _save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    from torchvision.utils import save_image

    save_image((images.float().cpu().clamp(-1, 1) + 1) / 2, path, nrow=nrow, padding=2, pad_value=1.0)


@torch.no_grad()
def _sample(denoiser, n: int, label=None, steps: int = 16, seed: int = 0, device="cpu") -> torch.Tensor:
    sigmas = get_sigmas("dpmpp_2m", denoiser, steps)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((n, 1, 28, 28), generator=g) * math.sqrt(float(sigmas[0]) ** 2 + 1)).to(device)
    denoiser.reset(n, g)
    for step in sample_dpmpp_2m(denoiser, x, sigmas, label, g):
        x = step.x
    return x


def add_diffusion_args(p):
    p.add_argument("--objective", choices=["ddpm_eps", "rectified_flow"], default="ddpm_eps")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--beta-start", type=float, default=1e-4)
    p.add_argument("--beta-end", type=float, default=0.02)
    p.add_argument("--attention", action=__import__("argparse").BooleanOptionalAction, default=True)
    return p


class DiffusionTask(Task):
    """DDPM (unconditional), or CFG when ``conditional`` (label dropout ``p_uncond``)."""

    def __init__(self, args, name: str = "ddpm", conditional: bool = False):
        super().__init__(args)
        self.name = name
        self.conditional = conditional
        if args.objective == "ddpm_eps":
            self.objective = EpsilonObjective(ScheduleConfig(args.schedule, args.timesteps, args.beta_start, args.beta_end))
        else:
            self.objective = FlowObjective()

    def unet_config(self) -> UNetConfig:
        return UNetConfig(base_channels=self.args.channels, blocks_per_level=self.args.blocks,
                          attention=self.args.attention, num_classes=10 if self.conditional else None)

    def build(self):
        return UNet(self.unet_config())

    def labels(self, y, generator):
        if not self.conditional:
            return None
        drop = torch.rand(y.shape, generator=generator, device=generator.device).to(y.device) < self.args.p_uncond
        return torch.where(drop, torch.full_like(y, 10), y)

    def loss(self, model, x0, y, generator, progress):
        batch = self.objective.training_batch(x0, generator)
        return self.objective.loss(model, batch, self.labels(y, generator)).mean(), {}

    def denoiser(self, model):
        den = self.objective.denoiser(model)
        return CFGDenoiser(den, 2.0, null_label=10) if self.conditional else den

    def sample_grid(self, model, path):
        device = next(model.parameters()).device
        label = torch.arange(20, device=device) % 10 if self.conditional else None
        _save_grid(_sample(self.denoiser(model), 20, label, device=device), path, nrow=10)

    def config(self, training: dict) -> dict:
        return {"network": {"kind": "unet", "config": self.unet_config().to_dict()}, "objective": self.objective.to_dict(),
                "training": dict(training, p_uncond=getattr(self.args, "p_uncond", None))}

    def export(self, model, path, training):
        save_model(path, "cfg" if self.conditional else "ddpm", [_unwrap(model)], self.config(training))


class Ensemble(nn.Module):
    """K UNets trained together; ``forward`` is not used, experts are scored one by one."""

    def __init__(self, nets):
        super().__init__()
        self.experts = nn.ModuleList(nets)


class MCLTask(DiffusionTask):
    """K expert denoisers with a winner-takes-all loss on the same noisy batch."""

    def __init__(self, args):
        super().__init__(args, name="mcl", conditional=False)
        if args.wta not in WTA_MODES:
            raise SystemExit(f"error: --wta must be one of {WTA_MODES}")

    def build(self):
        return Ensemble([UNet(self.unet_config()) for _ in range(self.args.experts)])

    def loss(self, model, x0, y, generator, progress):
        batch = self.objective.training_batch(x0, generator)
        experts = _unwrap(model).experts if not hasattr(model, "module") else model.module.experts
        losses = torch.stack([self.objective.loss(e, batch) for e in experts], dim=1)  # (B, K)
        temp = annealed_temperature(progress, self.args.t_start, self.args.t_end)
        loss = wta_loss(losses, self.args.wta, eps=self.args.relax_eps, temperature=temp)
        return loss, {"wins": win_counts(losses).float(), "temperature": temp}

    def epoch_summary(self, sums, count):
        wins = sums.pop("wins")
        rec = super().epoch_summary(sums, count)
        rates = (wins / wins.sum()).tolist()
        rec["win_rates"] = [round(r, 4) for r in rates]
        dead = [k for k, r in enumerate(rates) if r < 0.05]
        if dead:
            print(f"WARNING: expert(s) {dead} won fewer than 5% of examples this epoch (win rates {rec['win_rates']})", flush=True)
        return rec

    def sample_grid(self, model, path):
        device = next(model.parameters()).device
        rows = []
        for k in range(self.args.experts):
            den = MCLDenoiser([self.objective.denoiser(e) for e in model.experts], ExpertRouter(k))
            rows.append(_sample(den, 10, device=device))
        _save_grid(torch.cat(rows), path, nrow=10)

    def config(self, training):
        cfg = super().config(training)
        cfg["training"].update(wta=self.args.wta, relax_eps=self.args.relax_eps, t_start=self.args.t_start, t_end=self.args.t_end)
        return cfg

    def export(self, model, path, training):
        experts = list(_unwrap(model).experts)
        half = sum(p.numel() for p in model.parameters()) * 4 > 15 * 2**20
        save_model(path, "mcl", experts, self.config(training), half=half)


class GatingTask(Task):
    """A gating network on a frozen MCL ensemble: the target is each example's winning expert."""

    name = "gating"

    def __init__(self, args):
        super().__init__(args)
        self.mcl = load_model(args.mcl)
        if self.mcl.kind != "mcl":
            raise SystemExit(f"error: {args.mcl} is a {self.mcl.kind} checkpoint, not an MCL ensemble")

    def build(self):
        device = torch.device(self.args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.mcl.to(device)
        return GatingNet(GatingConfig(num_experts=self.mcl.num_experts, channels=self.args.channels))

    def loss(self, model, x0, y, generator, progress):
        batch = self.mcl.objective.training_batch(x0, generator)
        with torch.no_grad():
            target = torch.stack([self.mcl.objective.loss(e, batch) for e in self.mcl.nets], dim=1).argmin(dim=1)
        logits = model(batch["x_sigma"], batch["sigma"])
        acc = (logits.argmax(dim=1) == target).float().mean()
        return F.cross_entropy(logits.float(), target), {"accuracy": acc}

    def export(self, model, path, training):
        net = _unwrap(model)
        cfg = {"network": {"kind": "gating", "config": net.config.to_dict()}, "training": dict(training, mcl=str(self.args.mcl))}
        save_model(path, "gating", [net], cfg)


class ClassifierTask(Task):
    """The digit classifier the metrics use: cross-entropy with small random shifts."""

    name = "classifier"

    def build(self):
        return Classifier(ClassifierConfig(channels=self.args.channels))

    def loss(self, model, x0, y, generator, progress):
        shifts = torch.randint(-2, 3, (2,), generator=generator, device=generator.device).tolist()
        x = torch.roll(x0, shifts=shifts, dims=(2, 3))
        logits = model(x)
        return F.cross_entropy(logits.float(), y), {"accuracy": (logits.argmax(1) == y).float().mean()}

    @torch.no_grad()
    def sample_grid(self, model, path):
        from .data import load_mnist

        device = next(model.parameters()).device
        x, y = load_mnist(self.args.data_dir, train=False)
        acc = sum((model(x[i:i + 1000].to(device)).argmax(1).cpu() == y[i:i + 1000]).sum().item() for i in range(0, len(x), 1000)) / len(x)
        self.test_accuracy = acc
        print(f"test accuracy {acc:.4f}", flush=True)

    def export(self, model, path, training):
        net = _unwrap(model)
        training = dict(training, test_accuracy=getattr(self, "test_accuracy", None))
        save_model(path, "classifier", [net], {"network": {"kind": "classifier", "config": net.config.to_dict()}, "training": training})
