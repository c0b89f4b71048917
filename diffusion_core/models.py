"""Models as stored in checkpoints, and the denoisers built from them.

A checkpoint's config (see ``diffusion_core.checkpoints``) says what the file holds::

    {"model": "ddpm" | "cfg" | "flow" | "mcl" | "gating" | "classifier" | "cold",
     "network": {"kind": "unet" | "mcl_shared" | "gating" | "classifier", "config": {...}},
     "objective": {...},          # diffusion models (see objectives.objective_from_dict)
     "num_experts": K,            # mcl: tensors "experts.<k>.<param>" (separate UNets), or "net.<param>" for
                                  # one mcl_shared network holding every hypothesis; otherwise "net.<param>"
     "degradation": {...}, "generation": {...},   # cold: the degradation (cold.BlurConfig) and the flat start's statistics
     "training": {...}, "quality": {...}}   # metadata for model cards; training.history: loss curve and sample grids
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .checkpoints import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from .guidance import AutoguidanceDenoiser, CFGDenoiser
from .mcl import MCLDenoiser, ScoreGate, SharedMCLDenoiser, hypothesis_denoisers, make_router
from .nets import build_network, count_parameters
from .objectives import Objective, objective_from_dict

MODEL_KINDS = ("ddpm", "cfg", "flow", "mcl", "gating", "classifier", "cold")  # flow: a cfg or ddpm network trained as rectified flow;
# cold: a restoration network for a degradation that is not noise (cold.py; its config holds "degradation" and "generation")
GUIDE_KINDS = ("ddpm", "cfg", "flow")  # what can serve as autoguidance's bad model (one network)


@dataclass
class LoadedModel:
    kind: str
    config: dict
    nets: list[nn.Module]  # one network, or the K experts of an MCL ensemble
    objective: Objective | None = None
    path: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def net(self) -> nn.Module:
        return self.nets[0]

    @property
    def shared(self) -> bool:
        """An MCL model whose hypotheses share one network (``nets.SharedMCLNet``)."""
        return self.kind == "mcl" and self.config["network"]["kind"] == "mcl_shared"

    @property
    def num_experts(self) -> int:
        if self.shared:
            return self.net.num_experts
        return len(self.nets) if self.kind == "mcl" else 1

    def expert_denoisers(self) -> list:
        """An MCL model's experts, each alone as a denoiser (for a shared model, the trunk and one head)."""
        if self.kind != "mcl":
            raise ValueError(f"a {self.kind} model has no experts")
        if self.shared:
            return hypothesis_denoisers(self.net, self.objective)
        return [self.objective.denoiser(n) for n in self.nets]

    def score_gate(self) -> nn.Module:
        """A shared MCL model's score head, as a gating network (``mcl.ScoreGate``)."""
        if not self.shared:
            raise ValueError(f"{self.path} has no score head (a {self.kind} model{'' if self.kind != 'mcl' else ' of separate experts'})")
        return ScoreGate(self.net, self.objective)

    @property
    def num_classes(self) -> int | None:
        net = self.config["network"]["config"]
        return (net.get("unet") or {}).get("num_classes") if self.shared else net.get("num_classes")

    @property
    def num_parameters(self) -> int:
        return sum(count_parameters(n) for n in self.nets)

    @property
    def win_rates(self) -> list[float] | None:
        """MCL: each expert's share of wins in the last training epoch, from the checkpoint's
        metadata (``training.final.win_rates``); for hypotheses trained with per-example winners,
        each one's share of the data (``owned_rates``). None when it is not recorded."""
        if self.kind != "mcl":
            return None
        training = self.config.get("training") or {}
        final = training.get("final") or {}
        rates = final.get("owned_rates") if training.get("wta_scope") == "example" else None
        rates = rates or final.get("win_rates")
        return None if rates is None else [float(r) for r in rates]

    def restorer(self):
        """A cold-diffusion model as ``cold.Restorer`` (its degradation attached)."""
        if self.kind != "cold":
            raise ValueError(f"a {self.kind} model is not a cold-diffusion restorer")
        from .cold import BlurDegradation, Restorer

        return Restorer(self.net, BlurDegradation(self.config["degradation"]))

    @property
    def history(self) -> dict | None:
        """The training history recorded when the model trained (``training.history``), or None."""
        return (self.config.get("training") or {}).get("history")

    def to(self, device) -> LoadedModel:
        for n in self.nets:
            n.to(device)
        return self

    def denoiser(self, guidance: float | None = None, routing: str | None = None, gate: nn.Module | None = None,
                 autoguidance: float = 1.0, guide: LoadedModel | None = None, autoguide: str = "output"):
        """The model as a denoiser: CFG-wrapped for class-conditional models (guidance scale
        ``guidance``), routed for MCL ensembles (``routing``; the routings that use the gating
        network need ``gate``; the checkpoint's training win rates reach the router), and, for
        unconditional models, autoguided by ``guide`` with weight ``autoguidance`` (1: off;
        a class-conditional guide serves its unconditional branch; ``autoguide="mixture"``: of an
        MCL model on one trunk, the guide is compared with its experts' mixture, see
        ``guidance.AutoguidanceDenoiser``)."""
        if self.objective is None:
            raise ValueError(f"a {self.kind} model is not a diffusion model")
        if self.shared:
            den = SharedMCLDenoiser(self.net, self.objective, make_router(routing or "gated", self.num_experts, self.win_rates))
        elif self.kind == "mcl":
            experts = [self.objective.denoiser(n) for n in self.nets]
            den = MCLDenoiser(experts, make_router(routing or "gated", len(experts), self.win_rates), gate)
        else:
            den = self.objective.denoiser(self.net)
        if self.num_classes:
            den = CFGDenoiser(den, 1.0 if guidance is None else guidance, null_label=self.num_classes)
        if autoguidance != 1:
            if self.num_classes:
                raise ValueError("guidance without labels (autoguidance) is for the unconditional models; "
                                 f"the {self.kind} model has classifier-free guidance")
            if guide is None:
                raise ValueError("autoguidance needs a guide model (the bad version of this one)")
            den = AutoguidanceDenoiser(den, guide.guide_denoiser(), autoguidance, of=autoguide)
        return den

    def guide_denoiser(self):
        """This model as the bad model of autoguidance: an unconditional denoiser (for a
        class-conditional model, its unconditional branch: guidance 0)."""
        if self.objective is None or self.kind not in GUIDE_KINDS:
            raise ValueError(f"a {self.kind} checkpoint cannot guide: a guide is one of {', '.join(GUIDE_KINDS)}")
        return self.denoiser(guidance=0.0)


def _state(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _first_problem(e: Exception, limit: int = 300) -> str:
    """The first specific line of an error (load_state_dict puts a generic header first)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def model_from_tensors(tensors: dict, config: dict, path="<memory>") -> LoadedModel:
    try:
        kind = config["model"]
        net_kind = config["network"]["kind"]
        net_config = config["network"]["config"]
    except (KeyError, TypeError):
        raise CheckpointError(path, "config lacks model/network entries") from None
    if kind not in MODEL_KINDS:
        raise CheckpointError(path, f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    try:
        objective = objective_from_dict(config["objective"]) if "objective" in config else None
        if kind == "cold":
            from .cold import BlurDegradation

            BlurDegradation(config["degradation"])  # a readable degradation, or the error below
        k = int(config.get("num_experts", 1)) if kind == "mcl" and net_kind != "mcl_shared" else 1
        prefixes = [f"experts.{i}." for i in range(k)] if kind == "mcl" and net_kind != "mcl_shared" else ["net."]
        nets = []
        for prefix in prefixes:
            net = build_network(net_kind, net_config)
            net.load_state_dict(_state(tensors, prefix), strict=True)
            net.eval().requires_grad_(False)
            nets.append(net)
    except KeyError as e:
        raise CheckpointError(path, f"config lacks {e}") from None
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(path, f"tensors do not match the config: {_first_problem(e)}") from None
    expected = sum(len(n.state_dict()) for n in nets)
    if expected != len(tensors):
        raise CheckpointError(path, f"holds {len(tensors)} tensors, its config describes {expected}")
    return LoadedModel(kind, config, nets, objective, str(path))


def load_model(name_or_path, device="cpu", directory=None) -> LoadedModel:
    """Load ``ddpm``/``cfg``/``mcl``/``gating``/``classifier`` or a path; see ``resolve_checkpoint``
    (``directory`` replaces ``$DIFFUSION_CHECKPOINT_DIR``/``checkpoints/`` for names)."""
    path = resolve_checkpoint(name_or_path, directory)
    tensors, config = load_checkpoint(path)
    return model_from_tensors(tensors, config, path).to(device)


def save_model(path, kind: str, nets: list[nn.Module], config: dict, half: bool = False) -> Path:
    """Save networks under the naming ``load_model`` expects; ``config`` must hold network/objective."""
    config = dict(config, model=kind)
    if kind == "mcl" and config["network"]["kind"] == "mcl_shared":  # one network holds every hypothesis
        config["num_experts"] = nets[0].num_experts
        tensors = {f"net.{k}": v for k, v in nets[0].state_dict().items()}
    elif kind == "mcl":
        config["num_experts"] = len(nets)
        tensors = {f"experts.{i}.{k}": v for i, n in enumerate(nets) for k, v in n.state_dict().items()}
    else:
        tensors = {f"net.{k}": v for k, v in nets[0].state_dict().items()}
    return save_checkpoint(path, tensors, config, half=half)
