"""Training Multiple Choice Learning: K hypotheses with a winner-takes-all loss, and a gating network.

``MCLTask`` (train/mcl.py) trains one of two architectures (``--mcl-arch``):

* ``separate``: K UNets (``Ensemble``), the formulation of the study this demo builds on; a
  gating network is trained afterwards on the frozen experts (``GatingTask``, train/gating.py);
* ``shared``: one UNet trunk with K light hypothesis heads and a score head (``nets.SharedMCLNet``,
  Rupprecht et al. 2017; Letzelter et al. 2023). One trunk pass gives every hypothesis and the
  scores; the score head is trained with cross-entropy against the hard winner, on detached trunk
  features, beside the WTA loss.

Where the winner is decided (``--wta-scope``):

* ``step``: per noisy example, the hypothesis with the lowest loss on this step's noise (MCL as
  usual);
* ``example``: per clean image, over the noise levels it was trained at. Every example keeps a row
  of relative losses (each hypothesis's loss over the mean of the K, so that every noise level
  counts alike), an exponential average over its visits (``--assign-momentum``). On a visit the
  example is trained through the hypothesis its row ranks first, then the row takes in this
  visit's losses: the assignment step of k-means, once per epoch. The rows start from k-means on
  the images (``--assign-init kmeans``, no labels), or empty (``none``: a first visit uses its own
  losses). The rows are part of the resume state. Each hypothesis becomes a denoiser of its own
  part of the data at every noise level (Bao et al. 2022 on why such a partition helps).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoints import CheckpointError
from .mcl import ExpertRouter, GatedRouter, MCLDenoiser, SharedMCLDenoiser
from .models import load_model, save_model
from .nets import GatingConfig, GatingNet, SharedMCLConfig, SharedMCLNet, UNet, route_each
from .tasks import DiffusionTask, sample_fixed, save_grid, unwrap
from .training import Task, fail
from .wta import WTA_MODES, annealed_temperature, win_counts, wta_assignment, wta_loss

MCL_ARCHS = ("separate", "shared")
WTA_SCOPES = ("step", "example")


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
        return route_each(assign, len(self.experts), lambda k, idx: self.experts[k](x[idx], t[idx], None if label is None else label[idx]))


def kmeans_distances(images: torch.Tensor, k: int, seed: int = 0, iterations: int = 30, pool: int = 2) -> torch.Tensor:
    """Squared distances (N, K) of each image to the centroids of k-means (Lloyd's algorithm from
    k-means++ seeding, Arthur & Vassilvitskii 2007) on the images average-pooled by ``pool``;
    deterministic for a seed."""
    x = torch.nn.functional.avg_pool2d(images.float(), pool).flatten(1).double() if pool > 1 else images.float().flatten(1).double()
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):  # k-means++: each next centre drawn in proportion to the squared distance to the nearest one
        d = torch.cdist(x, centers).square().min(dim=1).values
        centers = torch.cat([centers, x[torch.multinomial(d / d.sum(), 1, generator=g)]])
    for _ in range(iterations):
        assign = torch.cdist(x, centers).argmin(dim=1)
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centers[c] = members.mean(dim=0)
    return torch.cdist(x, centers).square()


def _gather_rows(idx: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (indices, rows) of this step, concatenated, so that each process keeps the
    same per-example table (the ranks' batches are disjoint slices of one permutation and equal
    in size, training.shard_indices). One process: returned unchanged."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return idx, rows
    world = dist.get_world_size()
    all_idx, all_rows = [torch.empty_like(idx) for _ in range(world)], [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(all_idx, idx.contiguous())
    dist.all_gather(all_rows, rows.contiguous())
    return torch.cat(all_idx), torch.cat(all_rows)


class MCLTask(DiffusionTask):
    """K hypotheses with a winner-takes-all loss on the same noisy batch (see the module docstring)."""

    dead_below = 0.05  # an expert winning fewer than this share of an epoch's examples is reported

    def __init__(self, args):
        super().__init__(args, name="mcl", conditional=False)
        self.arch = getattr(args, "mcl_arch", "separate")
        if getattr(args, "name", None):  # the run folder and checkpoint: runs/<name>, checkpoints/<name>.safetensors
            self.name = args.name
        elif self.arch == "shared":
            self.name = "mcl_parts"
        self.scope = getattr(args, "wta_scope", "step")
        if args.wta not in WTA_MODES:
            fail(f"--wta must be one of {WTA_MODES}", status=2)
        if self.arch not in MCL_ARCHS:
            fail(f"--mcl-arch must be one of {MCL_ARCHS}", status=2)
        if self.scope not in WTA_SCOPES:
            fail(f"--wta-scope must be one of {WTA_SCOPES}", status=2)
        if args.experts < 1:
            fail("--experts must be at least 1", status=2)
        if not 0 <= args.relax_eps < 1:
            fail(f"--relax-eps must be in [0, 1) (got {args.relax_eps})", status=2)
        self.momentum = float(getattr(args, "assign_momentum", 0.5))
        if not 0 < self.momentum <= 1:
            fail(f"--assign-momentum must be in (0, 1] (got {self.momentum})", status=2)
        self.head_blocks = int(getattr(args, "head_blocks", 1))
        weight = float(getattr(args, "score_weight", 0.1))
        if not (math.isfinite(weight) and weight >= 0):
            fail(f"--score-weight must be a non-negative number (got {weight})", status=2)
        if self.arch == "separate" and getattr(args, "mcl_update", "routed") == "full" and self.scope == "example":
            fail("--wta-scope example trains each example through its own expert: use --mcl-update routed", status=2)
        self.table: torch.Tensor | None = None  # (N, K) relative losses per training example (scope example); NaN: not visited yet

    # -- the networks

    def build(self):
        k = self.args.experts
        if self.arch == "shared":
            try:
                if self.init_net is not None:
                    return SharedMCLNet.from_unet(self.init_net, k, self.head_blocks, noise=self.args.init_noise)
                return SharedMCLNet(self.build_config())
            except ValueError as e:
                fail(f"--head-blocks: {e}", status=2)
        if self.init_net is None:
            return Ensemble([UNet(self.unet_config()) for _ in range(k)])
        experts = []
        for _ in range(k):
            expert = copy.deepcopy(self.init_net)
            with torch.no_grad():
                for p in expert.parameters():
                    p.add_(self.args.init_noise * p.std(correction=0) * torch.randn_like(p))
            experts.append(expert)
        return Ensemble(experts)

    # -- the assignment of examples to hypotheses

    def state_dict(self) -> dict:
        return {} if self.table is None else {"table": self.table.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.table = None if state.get("table") is None else state["table"].clone()

    def assign(self, losses: torch.Tensor, index: torch.Tensor | None, temperature: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(the hypothesis each example trains through (B,), the hard winner the score head learns (B,))
        from this step's losses (B, K)."""
        a = self.args
        if self.scope == "step":
            return wta_assignment(losses, a.wta, eps=a.relax_eps, temperature=temperature, generator=generator), losses.argmin(dim=1)
        if index is None:
            raise ValueError("--wta-scope example needs the training examples' indices")
        rel = (losses / losses.mean(dim=1, keepdim=True).clamp_min(1e-12)).float()
        n = self.n_examples
        if self.table is None or self.table.shape != (n, losses.shape[1]):
            self.table = self.initial_table(n, losses.shape[1])
        idx = index.cpu()
        row = self.table[idx].to(rel.device)
        seen = ~row.isnan().any(dim=1)
        scores = torch.where(seen[:, None], row, rel)  # a first visit ranks by its own losses
        chosen = wta_assignment(scores, a.wta, eps=a.relax_eps, temperature=temperature, generator=generator)
        owner = scores.argmin(dim=1)
        new = torch.where(seen[:, None], (1 - self.momentum) * row + self.momentum * rel, rel).detach()
        idx, new = _gather_rows(index.to(rel.device), new)  # under torchrun every rank writes every rank's rows
        self.table[idx.cpu()] = new.cpu()
        return chosen, owner

    @property
    def n_examples(self) -> int:
        return self.args.limit or 60000

    def initial_table(self, n: int, k: int) -> torch.Tensor:
        """The rows before any visit: ``--assign-init none`` leaves them empty (a first visit ranks
        by its own losses); ``kmeans`` (the default) fills them with each training image's squared
        distances to the K centroids of k-means on the images (``kmeans``; no labels), relative to
        their mean like the losses, so the hypotheses start from a partition of the data instead
        of from noise, and the visits refine it."""
        if getattr(self.args, "assign_init", "kmeans") == "none":
            return torch.full((n, k), float("nan"))
        from .data import load_mnist

        images, _ = load_mnist(self.args.data_dir, train=True)
        d = kmeans_distances(images[:n], k, seed=self.args.seed)
        return (d / d.mean(dim=1, keepdim=True).clamp_min(1e-12)).float()

    def expert_losses(self, pred: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per-example losses (B, K) of all experts' predictions (B, K, C, H, W)."""
        return torch.stack([self.objective.loss_from_prediction(pred[:, k], batch) for k in range(pred.shape[1])], dim=1)

    # -- the loss

    def loss(self, model, x0, y, generator, progress, index=None):
        """``shared``: one trunk pass; every head scored without autograd; each example trained
        through the hypothesis ``assign`` gives it, plus ``score_weight`` times the score head's
        cross-entropy against the hard winner (the score head sees detached features, so the
        weight only sets its share of the gradient norm that is clipped).

        ``separate``, ``--mcl-update full``: every expert forward and backward on every example,
        the loss ``mean_i sum_k w_ik L_ik`` (``mcl.wta_loss``). ``routed`` (default): a no-grad pass
        scores all experts, then each example is trained through one expert only, drawn with
        probability ``w_ik`` (the winner for hard WTA). Its gradient is the full formulation's
        exactly for hard WTA and in expectation for relaxed and annealed WTA."""
        batch = self.objective.training_batch(x0, generator)
        temp = annealed_temperature(progress, self.args.t_start, self.args.t_end)
        logs = {"temperature": temp}
        if self.arch == "shared":
            seen = {}

            def choose(every):
                seen["losses"] = losses = self.expert_losses(every, batch)
                seen["chosen"], seen["owner"] = self.assign(losses, index, temp, generator)
                return seen["chosen"]

            out, _, logits, _ = model(batch["net_input"], batch["net_time"], assign=choose)
            denoise = self.objective.loss_from_prediction(out, batch).mean()
            ce = F.cross_entropy(logits.float(), seen["owner"])
            hit = (logits.argmax(dim=1) == seen["owner"]).float().mean()
            weight = float(getattr(self.args, "score_weight", 0.1))
            return denoise + weight * ce, dict(logs, wins=win_counts(seen["losses"]).float(), owned=self._counts(seen["chosen"], logits.shape[1]),
                                               denoise_loss=denoise.detach(), score_ce=ce.detach(), score_accuracy=hit)
        if getattr(self.args, "mcl_update", "routed") == "full":
            losses = self.expert_losses(model(batch["net_input"], batch["net_time"]), batch)  # (B, K), through DDP
            loss = wta_loss(losses, self.args.wta, eps=self.args.relax_eps, temperature=temp)
            return loss, dict(logs, wins=win_counts(losses).float())
        with torch.no_grad():
            losses = self.expert_losses(model(batch["net_input"], batch["net_time"]), batch)
        assign, _ = self.assign(losses, index, temp, generator)
        loss = self.objective.loss_from_prediction(model(batch["net_input"], batch["net_time"], assign=assign), batch).mean()
        return loss, dict(logs, wins=win_counts(losses).float(), owned=self._counts(assign, losses.shape[1]))

    @staticmethod
    def _counts(chosen: torch.Tensor, k: int) -> torch.Tensor:
        return torch.bincount(chosen.detach(), minlength=k).float()

    def epoch_summary(self, sums, count):
        """Adds ``wins`` (examples won per expert at their step's noise, all ranks), ``win_rates``,
        and ``owned`` / ``owned_rates`` (the examples trained through each); an expert below
        ``dead_below`` is listed in ``dead_experts`` and gets a warning."""
        sums = dict(sums)
        wins = torch.as_tensor(sums.pop("wins")).double().cpu()
        owned = sums.pop("owned", None)
        rec = super().epoch_summary(sums, count)
        rates = (wins / wins.sum().clamp_min(1)).tolist()
        rec["wins"] = [int(round(w)) for w in wins.tolist()]
        rec["win_rates"] = [round(r, 4) for r in rates]
        if owned is not None:
            owned = torch.as_tensor(owned).double().cpu()
            rec["owned"] = [int(round(w)) for w in owned.tolist()]
            rec["owned_rates"] = [round(r, 4) for r in (owned / owned.sum().clamp_min(1)).tolist()]
        if self.scope == "example":  # the experts' shares of the data: what one expert per trajectory should be drawn with
            rates = rec["owned_rates"]
        dead = [k for k, r in enumerate(rates) if r < self.dead_below]
        if dead and len(rates) > 1:
            rec["dead_experts"] = dead
            hint = "; hard WTA lets experts die, try --wta annealed or relaxed" if self.args.wta == "hard" else ""
            rec["warnings"] = [f"expert(s) {dead} won fewer than {self.dead_below:.0%} of the examples "
                               f"(win rates {[round(r, 4) for r in rates]}){hint}"]
        return rec

    def denoiser_for(self, model, routing):
        if self.arch == "shared":
            return SharedMCLDenoiser(unwrap(model), self.objective, routing)
        return MCLDenoiser([self.objective.denoiser(e) for e in model.experts], routing)

    def sample_grid(self, model, path):
        device = next(model.parameters()).device
        rows = [sample_fixed(self.denoiser_for(model, ExpertRouter(k)), 10, device=device) for k in range(self.args.experts)]
        save_grid(torch.cat(rows), path, nrow=10)

    def config(self, training):
        cfg = super().config(training)
        if self.arch == "shared":
            net = self.build_config()
            cfg["network"] = {"kind": "mcl_shared", "config": net.to_dict()}
        cfg["training"].update(wta=self.args.wta, relax_eps=self.args.relax_eps, t_start=self.args.t_start, t_end=self.args.t_end,
                               mcl_arch=self.arch, wta_scope=self.scope,
                               **({"assign_momentum": self.momentum, "assign_init": getattr(self.args, "assign_init", "kmeans")} if self.scope == "example" else {}),
                               **({"score_weight": float(getattr(self.args, "score_weight", 0.1))} if self.arch == "shared" else {}))
        return cfg

    def build_config(self) -> SharedMCLConfig:
        return SharedMCLConfig(self.unet_config().to_dict(), self.args.experts, self.head_blocks)

    def export(self, model, path, training):
        net = unwrap(model)
        if self.arch == "shared":
            save_model(path, "mcl", [net], self.config(training))
            return
        experts = list(net.experts)
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
        if self.mcl.shared:
            fail(f"--mcl {args.mcl} holds hypotheses on one network with their own score head, which routes them; "
                 "a gating network is for an ensemble of separate experts (train/mcl.py --mcl-arch separate)")
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

    def loss(self, model, x0, y, generator, progress, index=None):
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
        x = sample_fixed(den, 20, device=self.device, on_step=lambda: served.add_(torch.bincount(den.last_expert, minlength=len(served))))
        save_grid(x, path, nrow=10)
        return {"sample_expert_use": [round(v, 4) for v in (served / served.sum()).tolist()]}

    def export(self, model, path, training):
        net = unwrap(model)
        cfg = {"network": {"kind": "gating", "config": net.config.to_dict()},
               "training": dict(training, mcl=str(self.args.mcl), gate_sigma=getattr(self.args, "gate_sigma", "objective"))}
        save_model(path, "gating", [net], cfg)


