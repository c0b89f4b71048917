"""The evaluation's configuration and its rows: which models, samplers, guidance scales, routings
and autoguidance weights it samples, and how a row is split into seeded batches."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from ..guidance import AUTOGUIDE_OF
from ..mcl import ROUTINGS, make_router, routing_needs_gate
from ..pipeline import MAX_AUTOGUIDANCE, Settings
from ..samplers import NFE_PER_STEP, SAMPLERS

DIFFUSION_MODELS = ("ddpm", "cfg", "flow", "mcl")
ROUTING_CHOICES = "all (every routing), experts (all of expert:0..K-1), " + ", ".join(ROUTINGS)
ALL_ROUTINGS = ("experts",) + tuple(r for r in ROUTINGS if r != "expert:K")
NUM_CLASSES = 10
CONFIDENCE = 0.9
MAX_BATCH = 10000  # Settings.validate's limit on n
FIGURES = {
    "trajectories": "fig_trajectories.png",
    "expert_usage": "fig_expert_usage.png",
    "expert_digits": "fig_expert_digits.png",
    "quality_nfe": "fig_quality_nfe.png",
    "guidance": "fig_guidance.png",
    "gate_sigma": "fig_gate_sigma.png",
    "winner_digits": "fig_winner_digits.png",
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# Configuration and rows


@dataclass
class EvalConfig:
    models: tuple[str, ...] = DIFFUSION_MODELS
    samplers: tuple[str, ...] = ("dpmpp_2m", "ddim", "euler", "heun", "ddpm")  # the first one: main rows
    steps: int = 16  # main rows
    sweep_steps: tuple[int, ...] = (4, 8, 16, 32)
    sweep_model: str | None = None  # default: the first of --models
    guidance_scales: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 5.0)
    autoguidance: tuple[float, ...] = ()  # weights of the autoguidance rows of ddpm and mcl (none by default)
    guides: tuple[str, ...] = ("ddpm_weak",)  # the bad models those rows compare: names in the checkpoint folder, or paths
    autoguidance_routings: tuple[str, ...] = ()  # the MCL routings of its autoguidance rows (none given: Settings' default routing)
    autoguide: str = "output"  # MCL autoguidance rows: compare the guide with the output, or with the experts' "mixture" (one trunk)
    classifier2: str | None = "classifier2"  # the second, independently trained classifier (its columns), left out when its checkpoint is missing
    routings: tuple[str, ...] = ALL_ROUTINGS
    n: int = 10000  # samples per main row
    sweep_n: int = 2000  # samples per sweep row (0: no sweep)
    diversity_n: int = 1000  # images per expert in the digit-histogram figure
    usage_n: int = 256  # samples in the expert-usage figure
    diagnosis_n: int = 1000  # MNIST test images in the MCL diagnosis (0: none)
    diagnosis_levels: int = 8  # noise levels of the MCL diagnosis
    batch_size: int = 1000
    k: int = 3  # precision/recall neighbourhood size
    seed: int = 0
    device: str = "cpu"
    checkpoint_dir: str | None = None
    data_dir: str | None = None
    out_dir: str = "assets"
    figures: bool = True
    fid_inception: bool = False
    record_quality: bool = False  # write each model's headline row into its checkpoint's metadata

    def validate(self) -> EvalConfig:
        bad = [m for m in self.models if m not in DIFFUSION_MODELS]
        if bad or not self.models:
            raise ValueError(f"--models must be a non-empty subset of {','.join(DIFFUSION_MODELS)}, got {','.join(self.models) or 'nothing'}")
        bad = [s for s in self.samplers if s not in SAMPLERS]
        if bad or not self.samplers:
            raise ValueError(f"unknown sampler(s) {bad}; expected some of {', '.join(SAMPLERS)}")
        if self.sweep_model is not None and self.sweep_model not in self.models:
            raise ValueError(f"--sweep-model {self.sweep_model!r} must be one of --models ({','.join(self.models)})")
        if not 1 <= self.steps <= 1000 or any(not 1 <= s <= 1000 for s in self.sweep_steps):
            raise ValueError("steps must be between 1 and 1000")
        if any(not 0 <= g <= 20 for g in self.guidance_scales):
            raise ValueError("guidance scales must be between 0 and 20")
        if any(not 0 <= w <= MAX_AUTOGUIDANCE for w in self.autoguidance):
            raise ValueError(f"autoguidance weights must be between 0 and {MAX_AUTOGUIDANCE:g}")
        if self.autoguide not in AUTOGUIDE_OF:
            raise ValueError(f"--autoguide must be one of {', '.join(AUTOGUIDE_OF)}")
        if self.autoguidance and not self.guides:
            raise ValueError("autoguidance rows need at least one --guides model")
        if self.n < max(2, self.k + 1):
            raise ValueError(f"--n must be at least {max(2, self.k + 1)} (k + 1 for precision/recall), got {self.n}")
        if self.diversity_n < 1 or self.usage_n < 1:
            raise ValueError("--diversity-n and --usage-n must be positive")
        if not 0 <= self.diagnosis_n <= 10000 or not 1 <= self.diagnosis_levels <= 100:
            raise ValueError("--diagnosis-n must be between 0 and 10000 (the MNIST test set) and --diagnosis-levels between 1 and 100")
        if self.sweep_n and self.sweep_n < max(2, self.k + 1):
            raise ValueError(f"--sweep-n must be 0 (no sweep) or at least {self.k + 1}, got {self.sweep_n}")
        if max(self.n, self.sweep_n) > 60000:
            raise ValueError("at most 60000 samples per row (the floor draws as many real training images)")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"--batch-size must be between 1 and {MAX_BATCH}")
        return self


@dataclass
class Row:
    """One configuration: its name, table group and the settings of its (total) ``n`` samples."""

    name: str
    group: str  # ddpm | cfg | flow | mcl | sweep
    settings: Settings
    batch_size: int = 1000

    def batches(self) -> list[Settings]:
        return batch_settings(self.settings, self.batch_size)


def batch_settings(settings: Settings, batch_size: int) -> list[Settings]:
    """The settings of each batch: ``n`` split into batches of ``batch_size``, batch ``i`` seeded
    with ``seed + i``. The row's images are the concatenation of ``generate`` over these."""
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    out, start = [], 0
    while start < settings.n:
        m = min(batch_size, settings.n - start)
        out.append(replace(settings, n=m, seed=settings.seed + len(out)))
        start += m
    return out


def nfe(sampler: str, steps: int) -> int:
    """Denoiser evaluations per sample: ``steps`` times the sampler's evaluations per step, less
    the extra evaluations of the last step (to sigma = 0, always first order, e.g. Heun's)."""
    per = NFE_PER_STEP[sampler]
    return steps * per - (per - 1)


def routing_label(routing: str) -> str:
    r = routing.strip().lower()
    return r.replace("expert:", "expert_") if r.startswith("expert:") else r


def expand_routings(specs: Iterable[str], num_experts: int) -> list[str]:
    """``all`` -> every routing; ``experts`` -> expert:0..K-1; ``expert_k`` is accepted for
    ``expert:k``; order kept, duplicates dropped."""
    out: list[str] = []
    for spec in specs:
        s = str(spec).strip().lower()
        if not s:
            continue
        if s == "all":
            items = expand_routings(ALL_ROUTINGS, num_experts)
        elif s in ("experts", "expert"):
            items = [f"expert:{k}" for k in range(num_experts)]
        else:
            items = [s.replace("expert_", "expert:")]
        for item in items:
            make_router(item, num_experts)  # raises a clear ValueError
            if item not in out:
                out.append(item)
    return out


def specs_need_gate(specs: Iterable[str]) -> bool:
    """Whether any of these ``--routings`` entries (``all``, ``experts`` and ``expert_k`` included)
    uses the gating network."""
    for spec in specs:
        s = str(spec).strip().lower()
        if s == "all" or (s and s not in ("experts", "expert") and routing_needs_gate(s.replace("expert_", "expert:"))):
            return True
    return False


def main_rows(cfg: EvalConfig, num_experts: int | None = None) -> list[Row]:
    """The main table's rows, in the order of ``cfg.models``: ddpm, cfg and flow (each guidance scale), mcl (each routing)."""
    base = Settings(sampler=cfg.samplers[0], steps=cfg.steps, seed=cfg.seed, n=cfg.n)
    rows = []
    for m in cfg.models:
        if m == "ddpm":
            rows.append(Row("ddpm", "ddpm", replace(base, model="ddpm"), cfg.batch_size))
            rows += autoguidance_rows(cfg, replace(base, model="ddpm"), "ddpm")
        elif m in ("cfg", "flow"):
            for g in cfg.guidance_scales:
                rows.append(Row(f"{m} g={g:g}", m, replace(base, model=m, guidance=float(g)), cfg.batch_size))
        elif m == "mcl":
            if num_experts is None:
                raise ValueError("MCL rows need the number of experts")
            for r in expand_routings(cfg.routings, num_experts):
                rows.append(Row(f"mcl {routing_label(r)}", "mcl", replace(base, model="mcl", routing=r), cfg.batch_size))
            for r in expand_routings(cfg.autoguidance_routings, num_experts) if cfg.autoguidance_routings else (base.routing,):
                rows += autoguidance_rows(cfg, replace(base, model="mcl", routing=r, autoguide=cfg.autoguide), f"mcl {routing_label(r)}")
    return rows


def guide_label(guide: str) -> str:
    """A guide's short name for row names: a checkpoint name, or a path's folder and file stem."""
    if not guide.endswith(".safetensors"):
        return guide
    p = Path(guide)
    return f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem


def autoguidance_rows(cfg: EvalConfig, base: Settings, name: str) -> list[Row]:
    """``<name> ag=<w> <guide>``: ``base`` autoguided by each of ``cfg.guides`` at each weight of ``cfg.autoguidance``."""
    of = " of mixture" if base.autoguide == "mixture" else ""
    return [Row(f"{name} ag={w:g} {guide_label(g)}{of}", base.model, replace(base, autoguidance=float(w), guide=g), cfg.batch_size)
            for g in cfg.guides for w in cfg.autoguidance if w != 1]


def sweep_model_name(cfg: EvalConfig) -> str:
    return cfg.sweep_model or cfg.models[0]


def sweep_rows(cfg: EvalConfig) -> list[Row]:
    """Every sampler at every step count for one model (CFG at guidance 2, MCL with the app's default routing)."""
    if not cfg.sweep_n:
        return []
    model = sweep_model_name(cfg)
    base = Settings(model=model, seed=cfg.seed, n=cfg.sweep_n, guidance=2.0)
    return [
        Row(f"{model} {s} {st} steps", "sweep", replace(base, sampler=s, steps=st), cfg.batch_size)
        for s in cfg.samplers
        for st in sorted(set(cfg.sweep_steps))
    ]
