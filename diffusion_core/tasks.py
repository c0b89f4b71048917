"""The five training tasks (what differs between train/*.py); the loop is ``training.train``."""
from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import CheckpointError
from .guidance import CFGDenoiser
from .mcl import WTA_MODES, ExpertRouter, GatedRouter, MCLDenoiser, annealed_temperature, win_counts, wta_assignment, wta_loss
from .models import load_model, save_model
from .nets import Classifier, ClassifierConfig, GatingConfig, GatingNet, UNet, UNetConfig
from .objectives import EPS_T_SAMPLING, FLOW_T_SAMPLING, TEACHER_WEIGHTS, EDMObjective, EpsilonObjective, FlowObjective, ScheduleConfig, teacher_target
from .samplers import get_sigmas, sample_dpmpp_2m
from .training import Task, fail


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DistributedDataParallel


def _save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    from torchvision.utils import save_image

    save_image((images.float().cpu().clamp(-1, 1) + 1) / 2, path, nrow=nrow, padding=2, pad_value=1.0)


@torch.no_grad()
def _sample(denoiser, n: int, label=None, steps: int = 16, seed: int = 0, device="cpu", on_step=None) -> torch.Tensor:
    """``n`` samples with DPM++ 2M from a fixed seed (the same noise every epoch)."""
    sigmas = get_sigmas("dpmpp_2m", denoiser, steps)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((n, 1, 28, 28), generator=g) * math.sqrt(float(sigmas[0]) ** 2 + 1)).to(device)
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


class DiffusionTask(Task):
    """DDPM (unconditional), or CFG when ``conditional`` (label dropout ``p_uncond``)."""

    def __init__(self, args, name: str = "ddpm", conditional: bool = False):
        super().__init__(args)
        self.name = name
        self.conditional = conditional
        if conditional and not 0 <= args.p_uncond < 1:
            fail(f"--p-uncond must be in [0, 1) (got {args.p_uncond})", status=2)
        try:
            min_snr_gamma = getattr(args, "min_snr_gamma", None)
            if min_snr_gamma is not None and args.objective != "ddpm_eps":
                raise ValueError("--min-snr-gamma applies to --objective ddpm_eps only (the ddpm CPU recipe sets it: "
                                 "add --min-snr-gamma none)")
            eps_t, edm_weight = getattr(args, "eps_t", None), getattr(args, "edm_weight", False)
            if (eps_t is not None or edm_weight) and args.objective != "ddpm_eps":
                raise ValueError("--eps-t and --edm-weight apply to --objective ddpm_eps only")
            flow_t = getattr(args, "flow_t", None)
            if flow_t is not None and args.objective != "rectified_flow":
                raise ValueError("--flow-t applies to --objective rectified_flow only")
            if args.objective == "ddpm_eps":
                self.objective = EpsilonObjective(ScheduleConfig(args.schedule, args.timesteps, args.beta_start, args.beta_end), min_snr_gamma,
                                                  t_sampling=eps_t or "uniform", edm_weight=edm_weight)
            elif args.objective == "edm":
                self.objective = EDMObjective()
            else:
                self.objective = FlowObjective(t_sampling=flow_t or "uniform")
        except ValueError as e:
            fail(f"bad objective settings: {e}", status=2)
        self.init_net = None
        init, weights_only = getattr(args, "init", None), getattr(args, "init_weights_only", False)
        if weights_only and not init:
            fail("--init-weights-only needs --init", status=2)
        if init:
            self.init_net, init_objective = unet_from_checkpoint(init, conditional)
            if not weights_only:
                self.objective = init_objective
        self.teacher = None
        teacher = getattr(args, "teacher", None)
        if teacher:
            if conditional or not isinstance(self.objective, EpsilonObjective):
                fail("--teacher applies to an unconditional --objective ddpm_eps model", status=2)
            try:
                self.teacher = load_model(teacher)
            except (CheckpointError, OSError, ValueError) as e:
                fail(f"--teacher: {e}", status=2)
            if self.teacher.kind not in ("cfg", "flow"):
                fail(f"--teacher: {teacher} is a {self.teacher.kind} checkpoint; expected a class-conditional cfg or flow", status=2)
            self.teacher.net.eval().requires_grad_(False)
            self.teacher_denoiser = self.teacher.objective.denoiser(self.teacher.net)
            self.teacher_weight = getattr(args, "teacher_weight", "blend")
            if self.teacher_weight not in TEACHER_WEIGHTS:
                fail(f"--teacher-weight must be one of {', '.join(TEACHER_WEIGHTS)}", status=2)

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
        drop = torch.rand(y.shape, generator=generator, device=generator.device).to(y.device) < self.args.p_uncond
        return torch.where(drop, torch.full_like(y, 10), y)

    def loss(self, model, x0, y, generator, progress):
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
        _save_grid(_sample(self.denoiser(model), 20, label, device=device), path, nrow=10)

    def config(self, training: dict) -> dict:
        return {"network": {"kind": "unet", "config": self.unet_config().to_dict()}, "objective": self.objective.to_dict(),
                "training": dict(training, p_uncond=getattr(self.args, "p_uncond", None), init=getattr(self.args, "init", None),
                                 teacher=getattr(self.args, "teacher", None),
                                 teacher_weight=getattr(self.args, "teacher_weight", None) if getattr(self.args, "teacher", None) else None,
                                 init_weights_only=bool(getattr(self.args, "init_weights_only", False)))}

    def export(self, model, path, training):
        kind = "flow" if self.name == "flow" else "cfg" if self.conditional else "ddpm"
        save_model(path, kind, [_unwrap(model)], self.config(training))


class Ensemble(nn.Module):
    """K UNets trained together. The training loop calls the ensemble as one module (through DDP
    and torch.compile: reaching into ``.experts`` from the loss would bypass DDP's gradient
    synchronisation)."""

    def __init__(self, nets):
        super().__init__()
        self.experts = nn.ModuleList(nets)

    def forward(self, x, t, label=None, assign=None):
        """Without ``assign``: every expert on every input, (B, K, C, H, W). With ``assign`` (B,):
        each input through its assigned expert only, (B, C, H, W). Every expert is still called
        (on an empty batch when it has no input), so all parameters are in the graph, as DDP needs."""
        if assign is None:
            return torch.stack([e(x, t, label) for e in self.experts], dim=1)
        order, outs = [], []
        for k, expert in enumerate(self.experts):
            idx = (assign == k).nonzero().squeeze(1)
            order.append(idx)
            outs.append(expert(x[idx], t[idx], None if label is None else label[idx]))
        return torch.cat(outs)[torch.argsort(torch.cat(order))]


class MCLTask(DiffusionTask):
    """K expert denoisers with a winner-takes-all loss on the same noisy batch."""

    dead_below = 0.05  # an expert winning fewer than this share of an epoch's examples is reported

    def __init__(self, args):
        super().__init__(args, name="mcl", conditional=False)
        if args.wta not in WTA_MODES:
            fail(f"--wta must be one of {WTA_MODES}", status=2)
        if args.experts < 1:
            fail("--experts must be at least 1", status=2)
        if not 0 <= args.relax_eps < 1:
            fail(f"--relax-eps must be in [0, 1) (got {args.relax_eps})", status=2)

    def build(self):
        if self.init_net is None:
            return Ensemble([UNet(self.unet_config()) for _ in range(self.args.experts)])
        experts = []
        for _ in range(self.args.experts):
            expert = copy.deepcopy(self.init_net)
            with torch.no_grad():
                for p in expert.parameters():
                    p.add_(self.args.init_noise * p.std(correction=0) * torch.randn_like(p))
            experts.append(expert)
        return Ensemble(experts)

    def expert_losses(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per-example losses (B, K) of all experts' predictions (B, K, C, H, W)."""
        return torch.stack([self.objective.loss_from_prediction(pred[:, k], batch) for k in range(pred.shape[1])], dim=1)

    def loss(self, model, x0, y, generator, progress):
        """``--mcl-update full``: every expert forward and backward on every example, the loss
        ``mean_i sum_k w_ik L_ik`` (``mcl.wta_loss``). ``routed`` (default): a no-grad pass scores
        all experts, then each example is trained through one expert only, drawn with probability
        ``w_ik`` (the winner for hard WTA). Its gradient is the full formulation's exactly for hard
        WTA and in expectation for relaxed and annealed WTA, at the cost of K forward passes
        without autograd plus one model's forward and backward."""
        batch = self.objective.training_batch(x0, generator)
        temp = annealed_temperature(progress, self.args.t_start, self.args.t_end)
        if getattr(self.args, "mcl_update", "routed") == "full":
            losses = self.expert_losses(model(batch["net_input"], batch["net_time"]), batch)  # (B, K), through DDP
            loss = wta_loss(losses, self.args.wta, eps=self.args.relax_eps, temperature=temp)
            return loss, {"wins": win_counts(losses).float(), "temperature": temp}
        with torch.no_grad():
            losses = self.expert_losses(model(batch["net_input"], batch["net_time"]), batch)
        assign = wta_assignment(losses, self.args.wta, eps=self.args.relax_eps, temperature=temp, generator=generator)
        loss = self.objective.loss_from_prediction(model(batch["net_input"], batch["net_time"], assign=assign), batch).mean()
        return loss, {"wins": win_counts(losses).float(), "temperature": temp}

    def epoch_summary(self, sums, count):
        """Adds ``wins`` (examples won per expert, all ranks) and ``win_rates``; an expert below
        ``dead_below`` is listed in ``dead_experts`` and gets a warning."""
        sums = dict(sums)
        wins = torch.as_tensor(sums.pop("wins")).double().cpu()
        rec = super().epoch_summary(sums, count)
        rates = (wins / wins.sum().clamp_min(1)).tolist()
        rec["wins"] = [int(round(w)) for w in wins.tolist()]
        rec["win_rates"] = [round(r, 4) for r in rates]
        dead = [k for k, r in enumerate(rates) if r < self.dead_below]
        if dead:
            rec["dead_experts"] = dead
            hint = "; hard WTA lets experts die, try --wta annealed or relaxed" if self.args.wta == "hard" else ""
            rec["warnings"] = [f"expert(s) {dead} won fewer than {self.dead_below:.0%} of the examples "
                               f"(win rates {rec['win_rates']}){hint}"]
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
        try:
            self.mcl = load_model(args.mcl)
        except (CheckpointError, OSError) as e:
            fail(f"--mcl {args.mcl}: {e}")
        if self.mcl.kind != "mcl":
            fail(f"--mcl {args.mcl} is a {self.mcl.kind} checkpoint, not an MCL ensemble")
        den = self.mcl.objective.denoiser(self.mcl.nets[0])
        self.sigma_range = (den.sigma_min, den.sigma_max)  # the ensemble's noise range (bands, --gate-sigma)

    def build(self):
        self.mcl.to(self.device)
        return GatingNet(GatingConfig(num_experts=self.mcl.num_experts, channels=self.args.channels))

    def training_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """``--gate-sigma loguniform``: ``n`` levels spread evenly in log-sigma over the ensemble's
        range, as a sampler's steps visit them; ``objective``: None (the MCL objective's own density)."""
        if getattr(self.args, "gate_sigma", "objective") != "loguniform":
            return None
        lo, hi = (math.log(s) for s in self.sigma_range)
        u = torch.rand((n,), generator=generator, device=generator.device, dtype=torch.float64)
        return (lo + (hi - lo) * u).exp()

    def loss(self, model, x0, y, generator, progress):
        sigma = self.training_sigmas(x0.shape[0], generator)
        if sigma is None:
            batch = self.mcl.objective.training_batch(x0, generator)
        else:
            batch = self.mcl.objective.training_batch_at(x0, sigma, generator)
        with torch.no_grad():
            target = torch.stack([self.mcl.objective.loss(e, batch) for e in self.mcl.nets], dim=1).argmin(dim=1)
        logits = model(batch["x_sigma"], batch["sigma"])
        hit = (logits.argmax(dim=1) == target).float()
        band = self.band_of(batch["sigma"])
        return F.cross_entropy(logits.float(), target), {
            "accuracy": hit.mean(),
            "band_hits": torch.zeros(self.bands, device=hit.device).index_add_(0, band, hit),
            "band_counts": torch.bincount(band, minlength=self.bands).float(),
        }

    bands = 6  # noise bands of the per-band accuracy in the epoch records

    def band_edges(self) -> torch.Tensor:
        """``bands + 1`` increasing sigmas, equal steps in log sigma over the MCL model's range."""
        lo, hi = self.sigma_range
        return torch.logspace(math.log10(lo), math.log10(hi), self.bands + 1, dtype=torch.float64)

    def band_of(self, sigma: torch.Tensor) -> torch.Tensor:
        inner = self.band_edges()[1:-1].to(sigma.device)
        return torch.bucketize(sigma.double(), inner).long()

    def epoch_summary(self, sums, count):
        """Adds ``band_accuracy``: top-1 accuracy per noise band (edges in ``band_sigmas``), and the
        chance level (1 / K) to read it against."""
        sums = dict(sums)
        hits, counts = torch.as_tensor(sums.pop("band_hits")).double().cpu(), torch.as_tensor(sums.pop("band_counts")).double().cpu()
        rec = super().epoch_summary(sums, count)
        rec["band_sigmas"] = [round(float(e), 4) for e in self.band_edges()]
        rec["band_accuracy"] = [round(float(h / c), 4) if c else None for h, c in zip(hits, counts)]
        rec["band_examples"] = [int(c) for c in counts]
        rec["chance"] = round(1 / self.mcl.num_experts, 4)
        return rec

    @torch.no_grad()
    def sample_grid(self, model, path):
        """20 samples from the frozen ensemble routed by the gate; logs how often each expert served."""
        den = MCLDenoiser([self.mcl.objective.denoiser(e) for e in self.mcl.nets], GatedRouter(), gate=model)
        served = torch.zeros(self.mcl.num_experts)
        x = _sample(den, 20, device=self.device, on_step=lambda: served.add_(torch.bincount(den.last_expert, minlength=len(served))))
        _save_grid(x, path, nrow=10)
        return {"sample_expert_use": [round(v, 4) for v in (served / served.sum()).tolist()]}

    def export(self, model, path, training):
        net = _unwrap(model)
        cfg = {"network": {"kind": "gating", "config": net.config.to_dict()},
               "training": dict(training, mcl=str(self.args.mcl), gate_sigma=getattr(self.args, "gate_sigma", "objective"))}
        save_model(path, "gating", [net], cfg)


class ClassifierTask(Task):
    """The digit classifier the metrics use: cross-entropy with small random shifts."""

    name = "classifier"

    def build(self):
        return Classifier(ClassifierConfig(channels=self.args.channels, arch=getattr(self.args, "arch", "vgg")))

    def loss(self, model, x0, y, generator, progress):
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
        _save_grid(grid.flatten(0, 1), path, nrow=10)
        return {"test_accuracy": round((pred == y).float().mean().item(), 5)}

    def export(self, model, path, training):
        net = _unwrap(model)
        training = dict(training, test_accuracy=training.get("final", {}).get("test_accuracy"))
        save_model(path, "classifier", [net], {"network": {"kind": "classifier", "config": net.config.to_dict()}, "training": training})
