"""Evaluation: the metrics table and the MCL analysis figures from one command.

    python -m diffusion_core.evaluate                       # full run (GPU; 10,000 samples per row)
    python -m diffusion_core.evaluate --quick --device cpu  # small n, minutes on a CPU
    python -m diffusion_core.evaluate --models mcl --routings experts,gated --n 2000

Rows of the main table (one sampler, one step count): ``ddpm``; ``cfg g=<scale>`` and ``flow g=<scale>`` for
each guidance scale; ``mcl expert_0`` .. ``mcl expert_{K-1}``, ``mcl heuristic``, ``mcl gated``,
``mcl soft``, ``mcl pooled``, ``mcl sampled``, ``mcl winrate``, ``mcl x0gate``, ``mcl scout``,
``mcl sticky`` (every routing of ``mcl.ROUTINGS``, each with its ``expert_evals_per_step``). A
second table, the sampler sweep, runs one model with every sampler
at several step counts (the quality-against-NFE figure).

For every row the samples (quantized to uint8, as a user sees them) are classified by the shipped
``classifier`` checkpoint, and in its feature space we report:

* Frechet distance against the whole MNIST test set, beside the *floor*: the same distance for
  ``n`` real training images (``n`` = the row's sample count, so the small-sample bias matches),
  and the ratio of the two;
* improved precision and recall (Kynkaanniemi et al. 2019, k=3) against ``n`` test images;
* class accuracy (requested digit vs prediction) for class-conditional rows, the class
  histogram, its normalized entropy, the fraction classified with confidence > 0.9 and the mode
  coverage (digits holding at least 1% of the samples);
* NFE (denoiser evaluations per sample), wall time, and for MCL rows the share of denoiser
  evaluations served by each expert.

Rows are sampled in batches of ``--batch-size``: batch ``i`` is ``pipeline.generate`` with the
row's settings, ``n`` = the batch size and ``seed`` = ``--seed + i``. ``results.json`` lists
these settings per row (``batches``) with a SHA-256 of the row's images, so any row can be
regenerated (``Settings.from_dict(b)`` for each batch) and checked. All rows share the same seeds,
so they start from the same noise.

Figures (PNG) in ``--out-dir``: trajectories per routing, the gated router's expert usage over the
noise level, digit histograms per expert, quality against NFE per sampler, and CFG guidance
against accuracy and Frechet distance.

MCL diagnosis (``--diagnosis-n`` MNIST test images, ``--diagnosis-levels`` noise levels; in
results.json under ``mcl_diagnosis`` and in results.md): each image is noised at every level and
the expert with the smallest error on the clean image wins it. Reported: the experts' shares of
wins and the winner's entropy per level, the shares per digit per level, the gate's mean
probabilities, their entropy and how often the gate picks the winner, and one sentence per expert
on what it specialises in (``specialisation_summary``). Figures ``fig_gate_sigma.png`` (wins,
gate probabilities and entropies against sigma) and ``fig_winner_digits.png`` (digit x expert
heatmap per level). Colours of experts come from ``diffusion_core.palette``.

``--fid-inception`` adds an InceptionV3 FID column, only if torchvision's ``inception_v3``
weights are already in the local torch hub cache; nothing is ever downloaded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import metrics
from .checkpoints import update_config
from .data import MNISTNotFound, load_mnist
from .mcl import ROUTINGS, make_router, routing_cost, routing_needs_gate
from .models import LoadedModel, load_model
from .palette import FLOOR_COLOR, expert_color, sampler_color
from .pipeline import APP_AUTOGUIDANCE, APP_GUIDANCE, DEFAULT_GUIDES, MAX_AUTOGUIDANCE, Settings, generate, trajectory
from .samplers import NFE_PER_STEP, SAMPLERS

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


# ---------------------------------------------------------------------------------------------
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
    classifier2: str | None = "classifier2"  # the second, independently trained classifier (its columns), when its checkpoint is there
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

    def validate(self) -> "EvalConfig":
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
            rows += autoguidance_rows(cfg, replace(base, model="mcl"), f"mcl {routing_label(base.routing)}")
    return rows


def guide_label(guide: str) -> str:
    """A guide's short name for row names: a checkpoint name, or a path's folder and file stem."""
    if not guide.endswith(".safetensors"):
        return guide
    p = Path(guide)
    return f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem


def autoguidance_rows(cfg: EvalConfig, base: Settings, name: str) -> list[Row]:
    """``<name> ag=<w> <guide>``: ``base`` autoguided by each of ``cfg.guides`` at each weight of ``cfg.autoguidance``."""
    return [Row(f"{name} ag={w:g} {guide_label(g)}", base.model, replace(base, autoguidance=float(w), guide=g), cfg.batch_size)
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


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class Models:
    diffusion: dict[str, LoadedModel]
    classifier: LoadedModel
    gating: LoadedModel | None = None
    paths: dict[str, str] = field(default_factory=dict)
    guides: dict[str, LoadedModel] = field(default_factory=dict)  # autoguidance's bad models, by the name the rows use
    classifier2: LoadedModel | None = None

    def guide(self, settings: Settings) -> LoadedModel | None:
        return self.guides[settings.guide] if settings.autoguidance != 1 else None

    @property
    def gate(self):
        """The gating network the MCL rows route with: a shared model's score head, else the gating checkpoint's."""
        m = self.diffusion.get("mcl")
        if m is not None and m.shared:
            return m.score_gate()
        return None if self.gating is None else self.gating.net

    @property
    def num_experts(self) -> int | None:
        m = self.diffusion.get("mcl")
        return m.num_experts if m is not None else None


def checkpoint_ref(name: str, checkpoint_dir=None):
    """A ``.safetensors`` path as it is; for a name, ``<checkpoint_dir>/<name>.safetensors`` when a
    folder is given, else the name (resolved by ``checkpoints.resolve_checkpoint``: checkpoints/,
    $DIFFUSION_CHECKPOINT_DIR, the Hub)."""
    if str(name).endswith(".safetensors") or not checkpoint_dir:
        return name
    return Path(checkpoint_dir) / f"{name}.safetensors"


def _load(name: str, checkpoint_dir, device) -> LoadedModel:
    model = load_model(checkpoint_ref(name, checkpoint_dir), device=device)
    if model.kind != name:
        raise ValueError(f"checkpoint {model.path} holds a {model.kind!r} model, expected {name!r}")
    return model


def load_models(names: Iterable[str], checkpoint_dir=None, device="cpu", need_gating: bool = False, want_gating: bool = False,
                guides: Iterable[str] = (), classifier2: str | None = None) -> Models:
    """The diffusion models, the classifier and (for MCL) the gating network; the ``guides`` of the
    autoguidance rows; ``classifier2`` when its checkpoint is there.

    ``need_gating``: a missing gating checkpoint is an error; ``want_gating``: it is loaded when present."""
    diffusion = {n: _load(n, checkpoint_dir, device) for n in names}
    classifier = _load("classifier", checkpoint_dir, device)
    guide_models = {}
    for g in guides:
        guide_models[g] = load_model(checkpoint_ref(g, checkpoint_dir), device=device)
        guide_models[g].guide_denoiser()  # a clear error now for a checkpoint that cannot guide
    second = None
    if classifier2:
        try:
            second = load_model(checkpoint_ref(classifier2, checkpoint_dir), device=device)
        except (ValueError, OSError) as e:
            _log(f"no second classifier ({e}); its columns stay empty")
        if second is not None and second.kind != "classifier":
            raise ValueError(f"--classifier2 {classifier2}: a {second.kind} checkpoint, expected a classifier")
    gating = None
    if "mcl" in diffusion and not diffusion["mcl"].shared and (need_gating or want_gating):  # a shared model's score head is its gate
        try:
            gating = _load("gating", checkpoint_dir, device)
        except (ValueError, OSError) as e:
            if need_gating:
                gated = ", ".join(r for r in ROUTINGS if r != "expert:K" and routing_needs_gate(r))
                raise ValueError(f"routings {gated} need the gating checkpoint: {e}. Leave them out of --routings to evaluate without it.") from None
        if gating is not None and gating.net.config.num_experts != diffusion["mcl"].num_experts:
            raise ValueError(f"gating checkpoint routes {gating.net.config.num_experts} experts, the MCL checkpoint has {diffusion['mcl'].num_experts}")
    extra = {**({"gating": gating} if gating else {}), **({"classifier2": second} if second else {}),
             **{f"guide {g}": m for g, m in guide_models.items()}}
    paths = {k: m.path for k, m in {**diffusion, "classifier": classifier, **extra}.items()}
    return Models(diffusion, classifier, gating, paths, guide_models, second)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass
class RowSamples:
    images: torch.Tensor  # (N, 28, 28) uint8
    labels: torch.Tensor | None  # (N,) requested digits, for class-conditional models
    experts: torch.Tensor | None  # (steps, N) expert per sample and step, for MCL
    seconds: float  # wall time of sampling


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def sample_row(row: Row, model: LoadedModel, gate=None, device="cpu", guide: LoadedModel | None = None) -> RowSamples:
    """Generate a row's samples batch by batch through ``pipeline.generate``."""
    images, labels, experts = [], [], []
    _sync(device)
    t0 = time.perf_counter()
    for s in row.batches():
        res = generate(s, model, gate, device, guide=guide)
        images.append(res.images)
        if res.labels is not None:
            labels.append(res.labels)
        if res.experts is not None:
            experts.append(res.experts)
    _sync(device)
    seconds = time.perf_counter() - t0
    return RowSamples(
        images=torch.cat(images),
        labels=torch.cat(labels) if labels else None,
        experts=torch.cat(experts, dim=1) if experts else None,
        seconds=seconds,
    )


def sample_rows(rows: Iterable[Row], models: Models, device="cpu"):
    """Yield ``(row, RowSamples)`` for each row."""
    for row in rows:
        yield row, sample_row(row, models.diffusion[row.settings.model], models.gate, device, models.guide(row.settings))


def replay_batches(batches: list[dict], model: LoadedModel, gate=None, device="cpu", guide: LoadedModel | None = None) -> torch.Tensor:
    """The uint8 images of a row from its ``results.json`` ``batches`` entry (``guide``: its autoguidance's bad model)."""
    return torch.cat([generate(Settings.from_dict(dict(b)), model, gate, device, guide=guide).images for b in batches])


def images_sha256(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().cpu().numpy().tobytes()).hexdigest()


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [-1, 1], as ``data.load_mnist`` scales MNIST."""
    return images.float().div(127.5).sub(1).unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# Real data: reference features and the floor


@dataclass
class Reference:
    """Classifier features of the MNIST test set and of a seeded subset of the training set."""

    test_features: torch.Tensor  # (10000, F)
    test_labels: torch.Tensor
    test_preds: torch.Tensor
    train_features: torch.Tensor  # (max_train, F): the first n are the floor's n real images
    test_order: torch.Tensor  # seeded permutation of the test set; its first n images are the P/R reference
    test_mu: torch.Tensor = None
    test_cov: torch.Tensor = None

    def __post_init__(self):
        if self.test_mu is None:
            self.test_mu, self.test_cov = metrics.feature_stats(self.test_features)

    def pr_reference(self, n: int) -> torch.Tensor:
        """``min(n, 10000)`` test features: precision/recall compare sets of equal size."""
        return self.test_features[self.test_order[: min(n, len(self.test_order))]]

    @property
    def classifier_accuracy(self) -> float:
        return metrics.accuracy(self.test_preds, self.test_labels)


def reference_features(classifier: LoadedModel, data_dir=None, max_train: int = 10000, seed: int = 0, device="cpu", batch_size: int = 1000) -> Reference:
    """Classify the MNIST test set and ``max_train`` training images drawn with ``seed``."""
    test_x, test_y = load_mnist(data_dir, train=False)
    train_x, _ = load_mnist(data_dir, train=True)
    g = torch.Generator().manual_seed(seed)
    train_idx = torch.randperm(len(train_x), generator=g)[:max_train]
    test_order = torch.randperm(len(test_x), generator=g)
    test = metrics.classify(classifier.net, test_x, batch_size=batch_size, device=device)
    train = metrics.classify(classifier.net, train_x[train_idx], batch_size=batch_size, device=device)
    return Reference(test["features"], test_y, test["preds"], train["features"], test_order)


def _pr(real, fake, k, device) -> tuple[float, float]:
    dev = torch.device(device)
    if dev.type == "cuda":
        return metrics.precision_recall(real, fake, k=k, dtype=torch.float32, device=dev)
    return metrics.precision_recall(real, fake, k=k)


def real_floor(reference: Reference, n: int, k: int = 3, device="cpu") -> dict:
    """What real data scores at ``n`` samples: ``n`` training images against the test set
    (Frechet distance against all test images; precision/recall against ``n`` test images)."""
    if n > len(reference.train_features):
        raise ValueError(f"the reference holds {len(reference.train_features)} training features, {n} requested")
    train = reference.train_features[:n]
    mu, cov = metrics.feature_stats(train)
    fd = metrics.frechet_from_stats(mu, cov, reference.test_mu, reference.test_cov)
    p, r = _pr(reference.pr_reference(n), train, k, device)
    return {"n": n, "frechet": fd, "precision": p, "recall": r}


# ---------------------------------------------------------------------------------------------
# Metrics of one row


def expert_usage(experts: torch.Tensor, num_experts: int) -> list[float]:
    """Share of all (step, sample) denoiser evaluations served by each expert."""
    counts = torch.bincount(experts.reshape(-1).long(), minlength=num_experts).double()
    return (counts / counts.sum()).tolist()


def row_metrics(samples: RowSamples, out: dict, reference: Reference, floor: dict, k: int = 3, device="cpu", num_experts: int | None = None) -> dict:
    """The table's numbers for one row; ``out`` is ``metrics.classify`` of the row's images."""
    feats, preds = out["features"], out["preds"]
    mu, cov = metrics.feature_stats(feats)
    fd = metrics.frechet_from_stats(mu, cov, reference.test_mu, reference.test_cov)
    p, r = _pr(reference.pr_reference(len(feats)), feats, k, device)
    hist = metrics.class_histogram(preds, NUM_CLASSES)
    cov_ = metrics.mode_coverage(preds, NUM_CLASSES)
    m = {
        "frechet": fd,
        "frechet_floor": floor["frechet"],
        "frechet_ratio": fd / floor["frechet"] if floor["frechet"] > 0 else None,
        "precision": p,
        "recall": r,
        "accuracy": metrics.accuracy(preds, samples.labels) if samples.labels is not None else None,
        "histogram": hist.tolist(),
        "entropy": metrics.histogram_entropy(hist),
        "confident": metrics.confident_fraction(out["probs"], CONFIDENCE),
        "modes_covered": cov_["num_covered"],
        "covered_digits": cov_["covered"],
    }
    if samples.experts is not None and num_experts:
        m["expert_usage"] = expert_usage(samples.experts, num_experts)
    return m


def second_classifier_metrics(samples: RowSamples, out: dict, reference: Reference, floor: dict) -> dict:
    """What the second classifier reads of a row: digit accuracy, confidence, class entropy and the
    Frechet distance in its own feature space against its own floor."""
    mu, cov = metrics.feature_stats(out["features"])
    fd = metrics.frechet_from_stats(mu, cov, reference.test_mu, reference.test_cov)
    return {
        "accuracy": metrics.accuracy(out["preds"], samples.labels) if samples.labels is not None else None,
        "confident": metrics.confident_fraction(out["probs"], CONFIDENCE),
        "entropy": metrics.histogram_entropy(metrics.class_histogram(out["preds"], NUM_CLASSES)),
        "frechet": fd,
        "frechet_ratio": fd / floor["frechet"] if floor["frechet"] > 0 else None,
    }


# ---------------------------------------------------------------------------------------------
# MCL analyses


def expert_usage_by_sigma(sigmas, experts: torch.Tensor, num_experts: int, bins: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of samples routed to each expert at each noise level.

    ``sigmas`` (S,): the level of each step; ``experts`` (S, N): the expert of each sample there.
    Without ``bins``, steps at the same sigma are pooled and each distinct sigma is one point;
    with ``bins``, steps are pooled into ``bins`` equal bins of log(sigma) (empty bins dropped).
    Returns ``(sigma, fractions)``: sigma (P,) decreasing (bin centres in log space), fractions
    (P, K) whose rows sum to 1.
    """
    s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    e = torch.as_tensor(experts).long()
    if e.dim() != 2 or e.shape[0] != s.shape[0]:
        raise ValueError(f"experts must have shape (steps, N) with steps = len(sigmas) = {s.shape[0]}, got {tuple(e.shape)}")
    if (s <= 0).any():
        raise ValueError("sigmas must be positive")
    if bins is None:
        centres, group = torch.unique(s, return_inverse=True)
    else:
        ls = s.log()
        lo, hi = float(ls.min()), float(ls.max())
        width = (hi - lo) / bins if hi > lo else 1.0
        group = ((ls - lo) / width).floor().long().clamp(0, bins - 1)
        centres = torch.exp(lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * width)
    counts = torch.zeros(len(centres), num_experts, dtype=torch.float64)
    for i in range(len(s)):
        counts[group[i]] += torch.bincount(e[i], minlength=num_experts).double()
    keep = counts.sum(1) > 0
    centres, counts = centres[keep], counts[keep]
    order = torch.argsort(centres, descending=True)
    centres, counts = centres[order], counts[order]
    return centres, counts / counts.sum(1, keepdim=True)


def routing_usage(settings: Settings, model: LoadedModel, gate=None, device="cpu") -> tuple[list[float], torch.Tensor]:
    """Run one trajectory; the sigma of each step and the expert of each sample there (S, N)."""
    sig, exp = [], []
    for step in trajectory(settings, model, gate, device):
        sig.append(step.sigma)
        exp.append(step.expert)
    return sig, torch.stack(exp)


@dataclass
class TrajectoryStrip:
    label: str
    steps: list[int]  # step indices shown
    sigmas: list[float]  # noise level at which each shown prediction was made
    images: torch.Tensor  # (C, 28, 28) uint8: the denoiser's prediction of the clean image
    experts: list[int | None]  # expert that made each shown prediction (argmax for soft)
    final: torch.Tensor  # (28, 28) uint8 sample


def column_steps(steps: int, columns: int) -> list[int]:
    """``columns`` step indices spread evenly over 0..steps-1, first and last included."""
    if steps <= columns:
        return list(range(steps))
    return sorted({round(i * (steps - 1) / (columns - 1)) for i in range(columns)})


def trajectory_strip(settings: Settings, model: LoadedModel, gate=None, device="cpu", columns: int = 8, label: str | None = None) -> TrajectoryStrip:
    """The predicted clean image at ``columns`` steps of one sample (``settings.n`` is set to 1)."""
    settings = replace(settings, n=1)
    show = set(column_steps(settings.steps, columns))
    idx, sig, imgs, exps, last = [], [], [], [], None
    for step in trajectory(settings, model, gate, device):
        last = step
        if step.index in show:
            idx.append(step.index)
            sig.append(step.sigma)
            imgs.append(step.denoised[0].detach().float().cpu().clamp(-1, 1))
            exps.append(None if step.expert is None else int(step.expert[0]))
    to_u8 = lambda t: ((t + 1) * 127.5).round().to(torch.uint8)[0]  # noqa: E731
    return TrajectoryStrip(
        label or routing_label(settings.routing),
        idx,
        sig,
        torch.stack([to_u8(t) for t in imgs]),
        exps,
        to_u8(last.x[0].detach().float().cpu().clamp(-1, 1)),
    )


# ---------------------------------------------------------------------------------------------
# InceptionV3 FID (optional, local weights only)


INCEPTION_GLOB = "inception_v3_google-*.pth"


def find_inception_weights() -> Path | None:
    """torchvision's inception_v3 weights in the local torch hub cache, or None."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(folder.glob(INCEPTION_GLOB)) if folder.is_dir() else []
    return found[-1] if found else None


def inception_missing_message() -> str:
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"InceptionV3 FID skipped: torchvision's inception_v3 weights ({INCEPTION_GLOB}) are not in the local "
        f"torch hub cache ({folder}); this command never downloads. Put the file there (or set TORCH_HOME) to enable "
        "--fid-inception. The classifier-feature metrics are unaffected."
    )


class InceptionFeatures:
    """2048-d pool features of torchvision's InceptionV3 (ImageNet weights). MNIST digits are
    repeated to 3 channels and resized to 299x299; inputs stay in [-1, 1], which is what the
    network's ``transform_input`` produces for the Google weights. Not the TF-FID network, so the
    numbers are comparable between our rows but not to published FIDs."""

    def __init__(self, weights: Path, device="cpu"):
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        net.fc = torch.nn.Identity()
        self.net = net.eval().requires_grad_(False).to(device)
        self.device = device
        self.weights = str(weights)

    @torch.no_grad()
    def __call__(self, images_u8: torch.Tensor, batch_size: int = 200) -> torch.Tensor:
        out = []
        for start in range(0, len(images_u8), batch_size):
            x = to_float(images_u8[start:start + batch_size]).to(self.device)
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
            out.append(self.net(x).float().cpu())
        return torch.cat(out)


def load_inception(device="cpu", log: Callable[[str], None] = _log) -> tuple[InceptionFeatures | None, str]:
    path = find_inception_weights()
    if path is None:
        msg = inception_missing_message()
        log(msg)
        return None, msg
    try:
        return InceptionFeatures(path, device), f"InceptionV3 weights from {path}"
    except Exception as e:  # noqa: BLE001 - a corrupt or mismatched file must not stop the evaluation
        msg = f"InceptionV3 FID skipped: could not load {path} ({type(e).__name__}: {e})"
        log(msg)
        return None, msg


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib Figure objects, no pyplot state: usable by the app as well)


def _figure(**kw):
    from matplotlib.figure import Figure

    return Figure(**kw)


def _expert_handles(num_experts: int):
    from matplotlib.patches import Patch

    return [Patch(facecolor=expert_color(k), label=f"expert {k}") for k in range(num_experts)]


def plot_trajectories(strips: list[TrajectoryStrip], num_experts: int, title: str = ""):
    """Rows: routing strategies; columns: denoising steps (the predicted clean image); the frame
    of each image has the colour of the expert that made the prediction; last column: the sample."""
    cols = max(len(s.images) for s in strips) + 1
    fig = _figure(figsize=(1.25 * cols + 1.4, 1.35 * len(strips) + 1.4), layout="constrained")
    axes = fig.subplots(len(strips), cols, squeeze=False)
    for r, strip in enumerate(strips):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(strip.images):
                ax.imshow(strip.images[c].numpy(), cmap="gray", vmin=0, vmax=255)
                k = strip.experts[c]
                for sp in ax.spines.values():
                    sp.set_edgecolor("#999999" if k is None else expert_color(k))
                    sp.set_linewidth(1 if k is None else 3.5)
                if r == 0:
                    ax.set_title(f"step {strip.steps[c] + 1}\nσ={strip.sigmas[c]:.3g}", fontsize=8)
            elif c == cols - 1:
                ax.imshow(strip.final.numpy(), cmap="gray", vmin=0, vmax=255)
                if r == 0:
                    ax.set_title("sample", fontsize=8)
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(strip.label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title or "Denoising trajectories by routing (predicted clean image; frame: expert used)", fontsize=10)
    fig.legend(handles=_expert_handles(num_experts), loc="outside lower center", ncol=min(num_experts, 8), fontsize=8, frameon=False)
    return fig


def usage_bin_edges(sigma: torch.Tensor) -> torch.Tensor:
    """Edges (P+1,) around decreasing levels (P,): geometric midpoints, outer edges mirrored in log space."""
    ls = torch.as_tensor(sigma, dtype=torch.float64).log()
    if len(ls) == 1:
        return torch.exp(torch.stack([ls[0] + 0.5, ls[0] - 0.5]))
    mid = (ls[1:] + ls[:-1]) / 2
    return torch.exp(torch.cat([ls[:1] + (ls[0] - mid[0]), mid, ls[-1:] - (mid[-1] - ls[-1])]))


def plot_expert_usage(sigma: torch.Tensor, fractions: torch.Tensor, title: str = ""):
    """Stacked area of the share of samples routed to each expert, over the noise level."""
    fig = _figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    k = fractions.shape[1]
    edges = usage_bin_edges(sigma)
    y = torch.cat([fractions, fractions[-1:]]).T.numpy()  # each level's shares hold over its bin
    ax.stackplot(edges.numpy(), y, colors=[expert_color(i) for i in range(k)], labels=[f"expert {i}" for i in range(k)], step="post", alpha=0.9)
    ax.set_xscale("log")
    ax.set_xlim(float(edges[0]), float(edges[-1]))  # sampling runs from high noise (left) to low
    ax.set_ylim(0, 1)
    ax.set_xlabel("noise level σ (sampling proceeds left to right)")
    ax.set_ylabel("share of samples routed to the expert")
    fig.suptitle(title or "Temporal specialisation: the gated router's choice of expert", fontsize=11)  # spans the legend too
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def plot_expert_digits(histograms: list[torch.Tensor], title: str = ""):
    """One panel per expert: the share of each digit (as classified) among its samples."""
    k = len(histograms)
    fig = _figure(figsize=(2.3 * k + 1, 3.2), layout="constrained")
    axes = fig.subplots(1, k, sharey=True, squeeze=False)[0]
    ymax = max(float((h / h.sum()).max()) for h in histograms)
    for i, (ax, h) in enumerate(zip(axes, histograms)):
        frac = (h.double() / h.sum()).numpy()
        ax.bar(range(NUM_CLASSES), frac, color=expert_color(i))
        ax.axhline(1 / NUM_CLASSES, color=FLOOR_COLOR, linestyle="--", linewidth=1, label="uniform")
        cov = metrics.mode_coverage(torch.repeat_interleave(torch.arange(NUM_CLASSES), h.long()), NUM_CLASSES)["num_covered"]
        ax.set_title(f"expert {i}  (n={int(h.sum())})\nentropy {metrics.histogram_entropy(h) + 0.0:.2f}, {cov}/10 digits", fontsize=9)
        ax.set_xticks(range(NUM_CLASSES))
        ax.set_xlabel("digit (classifier)")
        ax.set_ylim(0, min(1.0, ymax * 1.15 + 0.02))
    axes[0].set_ylabel("share of the expert's samples")
    axes[0].legend(fontsize=8, frameon=False)
    fig.suptitle(title or "Inter-class diversity: digits generated by each expert", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# MCL diagnosis: who wins where, and what the gate thinks
#
# Real test images x0 are noised at S fixed levels (x = x0 + sigma * noise, the same noise for
# every expert); each expert's loss is its squared error on x0 (for an epsilon-network it is the
# training loss times sigma^2, so the winner is the same). From the (S, N, K) losses: the winner
# of each example at each level, the experts' shares of wins per level, the winner's entropy per
# level, the shares per digit; and the gate, shown the same noisy images: its mean probabilities,
# their entropy and how often its argmax is the winner.


def diagnosis_levels(sigma_min: float, sigma_max: float, levels: int) -> torch.Tensor:
    """``levels`` noise levels spaced geometrically from ``sigma_max`` down to ``sigma_min`` (float64)."""
    if levels < 1 or not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need at least one level and 0 < sigma_min <= sigma_max, got {levels}, {sigma_min}, {sigma_max}")
    if levels == 1:
        return torch.tensor([math.sqrt(sigma_min * sigma_max)], dtype=torch.float64)
    return torch.logspace(math.log10(sigma_max), math.log10(sigma_min), levels, dtype=torch.float64)


@torch.no_grad()
def expert_losses(experts, x0: torch.Tensor, sigmas, generator: torch.Generator | None = None, batch_size: int = 500, gate=None):
    """Squared error on x0 (per example, mean over pixels) of each expert at each level: (S, N, K);
    with ``gate`` also its probabilities on the same noisy images (S, N, K), else None."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    s_n, n, k = len(sigmas), len(x0), len(experts)
    losses = torch.empty(s_n, n, k, dtype=torch.float64)
    probs = None if gate is None else torch.empty(s_n, n, k, dtype=torch.float64)
    device = next((p.device for e in experts for p in e.parameters()), torch.device("cpu"))
    for i, sigma in enumerate(sigmas.tolist()):
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        for a in range(0, n, batch_size):
            clean = x0[a:a + batch_size].to(device)
            x = clean + sigma * noise[a:a + batch_size].to(device)
            s = torch.full((len(x),), sigma, device=device)
            for j, expert in enumerate(experts):
                losses[i, a:a + len(x), j] = (expert(x, s) - clean).float().pow(2).flatten(1).mean(dim=1).double().cpu()
            if gate is not None:
                probs[i, a:a + len(x)] = torch.softmax(gate(x, s).float(), dim=1).double().cpu()
    return losses, probs


def winner_shares(winners: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Share of the examples each expert wins at each level: winners (S, N) -> (S, K)."""
    w = torch.as_tensor(winners).long()
    return torch.stack([torch.bincount(row, minlength=num_experts).double() / max(len(row), 1) for row in w])


def normalized_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of a distribution (.., K) divided by log K: 1 uniform, 0 one expert."""
    p = torch.as_tensor(p, dtype=torch.float64)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    k = p.shape[-1]
    h = -(p * p.clamp_min(1e-300).log()).sum(dim=-1)
    return (h / math.log(k)).clamp(0, 1) if k > 1 else torch.zeros_like(h)


def winner_share_by_digit(winners: torch.Tensor, labels: torch.Tensor, num_experts: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(S, C, K): at each level, the share of digit c's examples that expert k wins (a digit with no
    examples has a row of zeros)."""
    w = torch.as_tensor(winners).long()
    y = torch.as_tensor(labels).long()
    out = torch.zeros(w.shape[0], num_classes, num_experts, dtype=torch.float64)
    out.index_put_((torch.arange(w.shape[0])[:, None].expand_as(w), y.expand_as(w), w), torch.ones(w.shape, dtype=torch.float64), accumulate=True)
    return out / out.sum(dim=2, keepdim=True).clamp_min(1)


def gate_summary(probs: torch.Tensor, winners: torch.Tensor) -> dict:
    """The gate's mean probabilities (S, K), the mean normalized entropy of its per-example
    probabilities (S,), the share of examples whose argmax is the winner (S,), its cross-entropy
    against the winner in nats (S,), and the baselines to read those against (S,): ``majority``,
    the accuracy of naming the level's most frequent winner for every image, and
    ``majority_ce``, the cross-entropy of giving every image the level's shares of wins (the best
    a gate that sees only sigma can reach; chance, 1/K and log K, is their floor)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    w = torch.as_tensor(winners).long()
    shares = winner_shares(w, p.shape[2])
    ce = -p.gather(2, w[..., None]).squeeze(2).clamp_min(1e-12).log().mean(dim=1)
    base_ce = -(shares * shares.clamp_min(1e-12).log()).sum(dim=1)
    return {"mean_probs": p.mean(dim=1), "entropy": normalized_entropy(p).mean(dim=1),
            "accuracy": (p.argmax(dim=2) == w).double().mean(dim=1), "cross_entropy": ce,
            "majority": shares.max(dim=1).values, "majority_ce": base_ce}


def mcl_diagnosis(model: LoadedModel, x0: torch.Tensor, labels: torch.Tensor, levels: int = 8, gate=None, seed: int = 0, batch_size: int = 500) -> dict:
    """Winners and gate on ``x0`` (N, 1, 28, 28) in [-1, 1] with digit ``labels``, at ``levels``
    noise levels over the experts' range; JSON-ready lists (see ``specialisation_summary``)."""
    experts = model.expert_denoisers()
    sigmas = diagnosis_levels(experts[0].sigma_min, experts[0].sigma_max, levels)
    g = torch.Generator().manual_seed(seed)
    losses, probs = expert_losses(experts, x0, sigmas, g, batch_size, gate)
    winners = losses.argmin(dim=2)
    shares = winner_shares(winners, model.num_experts)
    d = {"n": len(x0), "sigmas": sigmas.tolist(), "num_experts": model.num_experts,
         "winner_share": shares.tolist(), "winner_entropy": normalized_entropy(shares).tolist(),
         "winner_share_overall": winner_shares(winners.reshape(1, -1), model.num_experts)[0].tolist(),
         "winner_share_by_digit": winner_share_by_digit(winners, labels, model.num_experts).tolist(),
         "digit_counts": torch.bincount(torch.as_tensor(labels).long(), minlength=NUM_CLASSES).tolist(),
         "gate": None}
    if probs is not None:
        d["gate"] = {k: v.tolist() for k, v in gate_summary(probs, winners).items()}
    training = model.config.get("training") or {}
    if training.get("wta_scope") == "example":
        # trained with one winner per clean image: its owner, by the training rule (the sum over levels of
        # each hypothesis's loss relative to the mean of the K), is what the score head learnt to predict
        rel = losses / losses.mean(dim=2, keepdim=True).clamp_min(1e-300)
        owners = rel.sum(dim=0).argmin(dim=1)
        d["owner_share"] = winner_shares(owners[None], model.num_experts)[0].tolist()
        d["owner_share_by_digit"] = winner_share_by_digit(owners[None], labels, model.num_experts)[0].tolist()
        if probs is not None:
            d["score_vs_owner"] = {k: v.tolist() for k, v in gate_summary(probs, owners[None].expand_as(winners)).items()}
    return d


def specialisation_summary(diag: dict, top: int = 2) -> list[str]:
    """One sentence per expert (where in the noise range and on which digits it wins) and one on
    the gate, from ``mcl_diagnosis``'s numbers."""
    sig = diag["sigmas"]
    share = torch.tensor(diag["winner_share"])
    by_digit = torch.tensor(diag["winner_share_by_digit"]).mean(dim=0)  # (C, K), averaged over levels
    k = diag["num_experts"]
    lines = []
    for e in range(k):
        lvl = int(share[:, e].argmax())
        digits = by_digit[:, e].argsort(descending=True)[:top].tolist()
        lines.append(f"expert {e}: wins {diag['winner_share_overall'][e]:.0%} of (example, level) pairs; most at sigma {sig[lvl]:.3g} "
                     f"({share[lvl, e]:.0%}); its digits: " + ", ".join(f"{d} ({by_digit[d, e]:.0%} of them)" for d in digits))
    h = diag["winner_entropy"]
    lines.append(f"winner entropy (1 = every expert wins equally): {min(h):.2f} to {max(h):.2f} over sigma {sig[-1]:.3g}..{sig[0]:.3g}")
    g = diag.get("gate")
    if g:
        acc = g["accuracy"]
        top_noisy = int(torch.tensor(g["mean_probs"][0]).argmax())
        lines.append(f"gate: picks the winner for {sum(acc) / len(acc):.0%} of examples on average (chance {1 / k:.0%}), "
                     f"{acc[0]:.0%} at the noisiest level and {acc[-1]:.0%} at the cleanest"
                     + (f" (naming each level's most frequent winner: {g['majority'][0]:.0%} and {g['majority'][-1]:.0%})" if "majority" in g else "")
                     + f"; at sigma {sig[0]:.3g} it gives expert "
                     f"{top_noisy} {g['mean_probs'][0][top_noisy]:.0%} on average (entropy {g['entropy'][0]:.2f})")
    return lines


def diagnosis_markdown(diag: dict) -> str:
    k = diag["num_experts"]
    head = "| sigma | " + " | ".join(f"wins e{e}" for e in range(k)) + " | winner entropy |"
    gate = diag.get("gate")
    if gate:
        head += " " + " | ".join(f"gate p(e{e})" for e in range(k)) + " | gate entropy | gate picks winner | most frequent winner's share |"
    rows = [head, "|" + "---:|" * (head.count("|") - 1)]
    for i, s in enumerate(diag["sigmas"]):
        r = f"| {s:.3g} | " + " | ".join(f"{v:.2f}" for v in diag["winner_share"][i]) + f" | {diag['winner_entropy'][i]:.2f} |"
        if gate:
            r += " " + " | ".join(f"{v:.2f}" for v in gate["mean_probs"][i]) + f" | {gate['entropy'][i]:.2f} | {gate['accuracy'][i]:.2f} |"
            if "majority" in gate:  # results.json files from before the baseline lack it
                r += f" {gate['majority'][i]:.2f} |"
        rows.append(r)
    parts = [f"MCL diagnosis: {diag['n']} MNIST test images noised at {len(diag['sigmas'])} levels; "
             "the winner of an example is the expert with the smallest error on the clean image.", "", *rows, "",
             *[f"* {line}" for line in specialisation_summary(diag)]]
    for key, what in (("gate", "its winner at that level"), ("score_vs_owner", "its owner (the hypothesis it trained through: lowest summed relative loss over the levels)")):
        g = diag.get(key)
        if not g or "cross_entropy" not in g:
            continue
        parts += ["", f"Score head (or gate) against {what}, per noise level, beside the best a predictor that sees only the noise level can do:", "",
                  "| sigma | accuracy | noise-level-only accuracy | cross-entropy (nats) | noise-level-only cross-entropy |", "|---:|---:|---:|---:|---:|"]
        parts += [f"| {sig:.3g} | {g['accuracy'][i]:.3f} | {g['majority'][i]:.3f} | {g['cross_entropy'][i]:.3f} | {g['majority_ce'][i]:.3f} |"
                  for i, sig in enumerate(diag["sigmas"])]
    return "\n".join(parts)


def plot_gate_sigma(diag: dict, title: str = ""):
    """Left: the experts' shares of wins against sigma; middle: the gate's mean probabilities;
    right: the winner's entropy, the gate's entropy and how often the gate picks the winner."""
    sig = torch.tensor(diag["sigmas"])
    k = diag["num_experts"]
    gate = diag.get("gate")
    fig = _figure(figsize=(13 if gate else 9, 4.2), layout="constrained")
    axes = fig.subplots(1, 3 if gate else 2, squeeze=False)[0]
    panels = [("experts' share of wins", diag["winner_share"])] + ([("gate's mean probability", gate["mean_probs"])] if gate else [])
    for ax, (name, values) in zip(axes, panels):
        y = torch.tensor(values).T.numpy()
        ax.stackplot(sig.numpy(), y, colors=[expert_color(e) for e in range(k)], alpha=0.9)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("noise level sigma")
        ax.invert_xaxis()
    ax = axes[-1]
    ax.plot(sig.numpy(), diag["winner_entropy"], "o-", color="black", label="winner entropy")
    if gate:
        ax.plot(sig.numpy(), gate["entropy"], "s--", color="#555555", label="gate entropy (mean)")
        ax.plot(sig.numpy(), gate["accuracy"], "^-", color="#d62728", label="gate picks the winner")
        ax.axhline(1 / k, color="#d62728", lw=0.8, ls=":", label=f"chance 1/{k}")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("noise level sigma")
    ax.set_title("entropy (1 = uniform) and gate accuracy", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.suptitle(title or "MCL: who wins at each noise level, and what the gate says", fontsize=11)
    fig.legend(handles=_expert_handles(k), loc="outside lower center", ncol=min(k, 8), fontsize=8, frameon=False)
    return fig


def plot_winner_digits(diag: dict, title: str = ""):
    """One heatmap per noise level: rows digits, columns experts, cell the share of the digit's
    examples the expert wins."""
    data = torch.tensor(diag["winner_share_by_digit"])  # (S, C, K)
    s, c, k = data.shape
    cols = min(s, 4)
    rows = math.ceil(s / cols)
    fig = _figure(figsize=(2.6 * cols + 1.2, 2.9 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows * cols):
        ax = axes.flat[i]
        if i >= s:
            ax.axis("off")
            continue
        im = ax.imshow(data[i].numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"sigma {diag['sigmas'][i]:.3g}", fontsize=9)
        ax.set_xticks(range(k))
        ax.set_yticks(range(c))
        ax.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("digit")
        if i // cols == rows - 1:
            ax.set_xlabel("expert")
    fig.colorbar(im, ax=list(axes.flat), shrink=0.6, label="share of the digit's examples won")
    fig.suptitle(title or "MCL: the winning expert's share per digit at each noise level", fontsize=11)
    return fig


def plot_quality_vs_nfe(points: list[dict], floor: float | None = None, title: str = ""):
    """``points``: dicts with sampler, nfe, frechet. One line per sampler; the real-data floor dashed."""
    fig = _figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    from matplotlib.ticker import ScalarFormatter

    for i, s in enumerate(dict.fromkeys(p["sampler"] for p in points)):
        pts = sorted((p["nfe"], p["frechet"]) for p in points if p["sampler"] == s)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="osD^v"[i % 5], color=sampler_color(s), label=s, alpha=0.9)
    if floor is not None:
        ax.axhline(floor, color=FLOOR_COLOR, linestyle="--", label="real data (floor)")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    if all(p["frechet"] > 0 for p in points) and (floor is None or floor > 0):
        ax.set_yscale("log")
    ax.set_xlabel("function evaluations per sample (NFE)")
    ax.set_ylabel("Frechet distance (classifier features)")
    ax.set_title(title or "Quality against the number of function evaluations")
    ax.legend(frameon=False)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_guidance(series: dict[str, tuple[list[float], list[float], list[float]]], floor: float | None = None, title: str = ""):
    """Guidance scale against Frechet distance (left axis) and class accuracy (right axis), one
    pair of curves per model: ``series`` maps a model name to (scales, accuracies, frechets)."""
    fig = _figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    ax2 = ax.twinx()
    c_fd, c_acc = "#0072B2", "#D55E00"
    lines, all_scales = [], set()
    for i, (model, (scales, accuracies, frechets)) in enumerate(series.items()):
        style = ("-", "--", ":")[i % 3]
        lines += ax.plot(scales, frechets, marker="o", linestyle=style, color=c_fd, label=f"{model}: Frechet distance")
        lines += ax2.plot(scales, accuracies, marker="s", linestyle=style, color=c_acc, label=f"{model}: class accuracy")
        all_scales.update(scales)
    span = sorted(all_scales)
    if floor is not None and span:
        lines += ax.plot(span, [floor] * len(span), linestyle="--", color=FLOOR_COLOR, label="Frechet floor (real data)")
    ax.set_xlabel("guidance scale (0: unconditional, 1: conditional)")
    ax.set_ylabel("Frechet distance (classifier features)", color=c_fd)
    ax2.set_ylabel("accuracy (requested digit = classified)", color=c_acc)
    if span:
        lines += ax2.plot(span, [1 / NUM_CLASSES] * len(span), linestyle=":", color=c_acc, alpha=0.5, label="chance accuracy")
    ax2.set_ylim(0, 1.02)
    ax.set_ylim(bottom=0)
    ax.set_title(title or "Classifier-free guidance: accuracy and quality")
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", frameon=False, fontsize="small")
    ax.grid(True, alpha=0.3)
    return fig


# ---------------------------------------------------------------------------------------------
# Table


def _fmt(v, spec: str) -> str:
    if v is None:
        return "–"
    return format(v + 0.0, spec)  # + 0.0 turns -0.0 into 0.0


TABLE_COLUMNS = ("row", "sampler", "steps", "NFE", "FD", "FD floor", "FD/floor", "precision", "recall", "accuracy", "entropy", f"conf>{CONFIDENCE:g}", "modes",
                 "FD/floor (2)", "accuracy (2)", f"conf>{CONFIDENCE:g} (2)", "time (s)")  # (2): the second classifier


def format_table(records: list[dict]) -> str:
    """A markdown table of result rows (``results.json`` entries)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|"]
    for r in records:
        m, s = r["metrics"], r["settings"]
        m2 = m.get("second_classifier") or {}
        cells = [
            r["name"], s["sampler"], str(s["steps"]), str(r["nfe"]),
            _fmt(m["frechet"], ".3g"), _fmt(m["frechet_floor"], ".3g"), _fmt(m["frechet_ratio"], ".2f"),
            _fmt(m["precision"], ".3f"), _fmt(m["recall"], ".3f"), _fmt(m["accuracy"], ".3f"),
            _fmt(m["entropy"], ".3f"), _fmt(m["confident"], ".3f"), f"{m['modes_covered']}/{NUM_CLASSES}",
            _fmt(m2.get("frechet_ratio"), ".2f"), _fmt(m2.get("accuracy"), ".3f"), _fmt(m2.get("confident"), ".3f"),
            _fmt(r["sample_seconds"], ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _finite(obj):
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate(cfg: EvalConfig, log: Callable[[str], None] = _log, command: str | None = None) -> dict:
    """Run every row, write results.json, results.md and the figures to ``cfg.out_dir``; return the results."""
    cfg.validate()
    t_all = time.perf_counter()
    device = torch.device(cfg.device)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    routings_need_gate = "mcl" in cfg.models and specs_need_gate(cfg.routings)
    sweep_gated = cfg.sweep_n and sweep_model_name(cfg) == "mcl"
    models = load_models(cfg.models, cfg.checkpoint_dir, device, need_gating=bool(routings_need_gate or sweep_gated), want_gating=cfg.figures,
                         guides=cfg.guides if cfg.autoguidance else (), classifier2=cfg.classifier2)
    K = models.num_experts
    rows = main_rows(cfg, K)
    sweep = sweep_rows(cfg)

    t0 = time.perf_counter()
    max_n = max(cfg.n, cfg.sweep_n)
    reference = reference_features(models.classifier, cfg.data_dir, max_n, cfg.seed, device, cfg.batch_size)
    floors = {n: real_floor(reference, n, cfg.k, device) for n in sorted({cfg.n, cfg.sweep_n} - {0})}
    log(f"reference: classifier accuracy on the MNIST test set {reference.classifier_accuracy:.4f}; "
        + "; ".join(f"floor at n={n}: FD {f['frechet']:.4g}, precision {f['precision']:.3f}, recall {f['recall']:.3f}" for n, f in floors.items())
        + f" ({time.perf_counter() - t0:.1f} s)")
    reference2 = floors2 = None
    if models.classifier2 is not None:
        reference2 = reference_features(models.classifier2, cfg.data_dir, max_n, cfg.seed, device, cfg.batch_size)
        floors2 = {n: real_floor(reference2, n, cfg.k, device) for n in floors}
        log(f"second classifier: accuracy on the MNIST test set {reference2.classifier_accuracy:.4f}; "
            + "; ".join(f"floor at n={n}: FD {f['frechet']:.4g}" for n, f in floors2.items()))

    inception, inception_note = (None, "not requested")
    if cfg.fid_inception:
        inception, inception_note = load_inception(device, log)
        if inception is not None:
            test_x, _ = load_mnist(cfg.data_dir, train=False)
            test_u8 = ((test_x[:, 0] + 1) * 127.5).round().to(torch.uint8)
            inc_test = inception(test_u8, cfg.batch_size)
            inc_mu, inc_cov = metrics.feature_stats(inc_test)

    records, sweep_records, expert_preds = [], [], {}
    all_rows = [(r, "main") for r in rows] + [(r, "sweep") for r in sweep]
    for i, (row, table) in enumerate(all_rows, 1):
        model = models.diffusion[row.settings.model]
        t_row = time.perf_counter()
        samples = sample_row(row, model, models.gate, device, models.guide(row.settings))
        out = metrics.classify(models.classifier.net, to_float(samples.images), batch_size=cfg.batch_size, device=device)
        m = row_metrics(samples, out, reference, floors[row.settings.n], cfg.k, device, K if row.settings.model == "mcl" else None)
        if reference2 is not None:
            out2 = metrics.classify(models.classifier2.net, to_float(samples.images), batch_size=cfg.batch_size, device=device)
            m["second_classifier"] = second_classifier_metrics(samples, out2, reference2, floors2[row.settings.n])
        if inception is not None and table == "main":
            f = inception(samples.images, cfg.batch_size)
            mu, cov = metrics.feature_stats(f)
            m["fid_inception"] = metrics.frechet_from_stats(mu, cov, inc_mu, inc_cov)
        if row.group == "mcl" and row.settings.routing.startswith("expert:"):
            expert_preds[int(row.settings.routing.split(":")[1])] = out["preds"]
        rec = {
            "name": row.name,
            "group": row.group,
            "settings": row.settings.to_dict(),
            "batch_size": row.batch_size,
            "batches": [b.to_dict() for b in row.batches()],
            "images_sha256": images_sha256(samples.images),
            "nfe": nfe(row.settings.sampler, row.settings.steps),
            **({"expert_evals_per_step": routing_cost(row.settings.routing, K, models.diffusion["mcl"].shared)} if row.settings.model == "mcl" else {}),
            "sample_seconds": samples.seconds,
            "seconds": time.perf_counter() - t_row,
            "metrics": m,
        }
        (records if table == "main" else sweep_records).append(rec)
        log(f"[{i}/{len(all_rows)}] {row.name} ({row.settings.sampler}, {row.settings.steps} steps, n={row.settings.n}): "
            f"FD {m['frechet']:.4g} (floor {m['frechet_floor']:.4g}), sampling {samples.seconds:.1f} s, total {rec['seconds']:.1f} s")

    diagnosis = None
    if "mcl" in models.diffusion and cfg.diagnosis_n:
        t0 = time.perf_counter()
        test_x, test_y = load_mnist(cfg.data_dir, train=False)
        pick = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.diagnosis_n]
        diagnosis = mcl_diagnosis(models.diffusion["mcl"], test_x[pick], test_y[pick], cfg.diagnosis_levels, models.gate, cfg.seed, cfg.batch_size)
        log(f"MCL diagnosis on {cfg.diagnosis_n} test images at {cfg.diagnosis_levels} noise levels ({time.perf_counter() - t0:.1f} s):\n  "
            + "\n  ".join(specialisation_summary(diagnosis)))

    figures = {}
    if cfg.figures:
        t0 = time.perf_counter()
        figures = make_figures(cfg, models, records, sweep_records, floors, expert_preds, out_dir, device, log, diagnosis)
        log(f"figures: {len(figures)} written to {out_dir} ({time.perf_counter() - t0:.1f} s)")

    recorded = record_quality(records, models.paths, command) if cfg.record_quality else {}
    for name, row in recorded.items():
        log(f"recorded the quality of row {row!r} in {models.paths.get(name) or models.paths[f'guide {name}']}")

    results = {
        "format": "diffusion_core.evaluate/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "config": asdict(cfg),
        "environment": {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(), "torch": torch.__version__, "python": platform.python_version()},
        "checkpoints": {k: {"path": p, "sha256": file_sha256(p)} for k, p in models.paths.items()},
        "reference": {"test_images": len(reference.test_features), "classifier_test_accuracy": reference.classifier_accuracy,
                      "classifier2_test_accuracy": None if reference2 is None else reference2.classifier_accuracy},
        "floors": {str(n): f for n, f in floors.items()},
        "inception": {"enabled": inception is not None, "note": inception_note},
        "rows": records,
        "sweep": sweep_records,
        "mcl_diagnosis": diagnosis,
        "figures": figures,
        "recorded_quality": recorded,
        "seconds": time.perf_counter() - t_all,
    }
    results = _finite(results)
    with open(out_dir / "results.json", "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
    (out_dir / "results.md").write_text(results_markdown(results) + "\n")
    return results


# Row names as main_rows writes them (the app's defaults first: guidance, routing, autoguidance and its guide).
_AG = {k: f" ag={w:g} {DEFAULT_GUIDES[k]}" if w != 1 else "" for k, w in APP_AUTOGUIDANCE.items()}
HEADLINE_ROWS = {"ddpm": (f"ddpm{_AG['ddpm']}", "ddpm"), "cfg": (f"cfg g={APP_GUIDANCE['cfg']:g}",), "flow": (f"flow g={APP_GUIDANCE['flow']:g}",),
                 "mcl": (f"mcl {routing_label(Settings().routing)}{_AG['mcl']}", f"mcl {routing_label(Settings().routing)}", "mcl heuristic")}
# The row a model card shows beside its headline, when the headline is autoguided.
UNGUIDED_ROWS = {"ddpm": "ddpm", "mcl": f"mcl {routing_label(Settings().routing)}"}


def quality_summary(record: dict, command: str) -> dict:
    """The numbers of one result row, as a model card shows them."""
    m, s = record["metrics"], record["settings"]
    how = f"{s['sampler']}, {s['steps']} steps, {s['n']} samples, seed {s['seed']}"
    if record["group"] in ("cfg", "flow"):
        how += f", guidance {s['guidance']:g}"
    if record["group"] == "mcl":
        how += f", {s['routing']} routing"
    if s.get("autoguidance", 1) != 1:
        how += f", autoguidance {s['autoguidance']:g} ({guide_label(s['guide'])})"
    q = {"measured on": how, "Frechet distance": round(m["frechet"], 3), "real-data floor": round(m["frechet_floor"], 3),
         "distance / floor": None if m["frechet_ratio"] is None else round(m["frechet_ratio"], 2),
         "precision": round(m["precision"], 3), "recall": round(m["recall"], 3)}
    if m["accuracy"] is not None:
        q["digit accuracy"] = round(m["accuracy"], 4)
    q.update({"class entropy": round(m["entropy"], 3), "confidence > 0.9": round(m["confident"], 3)})
    m2 = m.get("second_classifier")
    if m2:
        q["second classifier"] = {k: round(v, 4 if k == "accuracy" else 3) for k, v in
                                  (("accuracy", m2["accuracy"]), ("distance / floor", m2["frechet_ratio"]), ("confidence > 0.9", m2["confident"]))
                                  if v is not None}
    q["command"] = command
    return q


def record_quality(records: list[dict], paths: dict, command: str) -> dict[str, str]:
    """Write each diffusion model's headline row (DDPM; CFG and flow at the app's default guidance; MCL with
    the app's default routing) into its checkpoint's ``quality`` metadata, which the app's model
    cards show. Returns {model: row name} for the checkpoints updated."""
    by_name = {r["name"]: r for r in records}
    done = {}
    for model, candidates in HEADLINE_ROWS.items():
        row = next((by_name[c] for c in candidates if c in by_name), None)
        if row is not None and model in paths:
            q = quality_summary(row, command)
            plain = by_name.get(UNGUIDED_ROWS.get(model, ""))
            if row["settings"].get("autoguidance", 1) != 1 and plain is not None:
                p = plain["metrics"]
                q["without autoguidance"] = {"distance / floor": round(p["frechet_ratio"], 2), "confidence > 0.9": round(p["confident"], 3),
                                             "class entropy": round(p["entropy"], 3)}
            update_config(paths[model], {"quality": q})
            done[model] = row["name"]
    for guide in set(DEFAULT_GUIDES.values()):  # a weak model's card: its quality alone (the ag=0 row)
        row = by_name.get(f"ddpm ag=0 {guide}")
        if row is not None and f"guide {guide}" in paths:
            update_config(paths[f"guide {guide}"], {"quality": quality_summary(row, command)})
            done[guide] = row["name"]
    return done


def results_markdown(results: dict) -> str:
    cfg = results["config"]
    parts = [f"Main rows: n={cfg['n']} samples each, {cfg['samplers'][0]} sampler, {cfg['steps']} steps, seed {cfg['seed']}. "
             f"Metrics in the feature space of the MNIST classifier (test accuracy {results['reference']['classifier_test_accuracy']:.4f}); "
             "FD floor: real training images against the test set at the same sample count.", "", format_table(results["rows"])]
    if any("fid_inception" in r["metrics"] for r in results["rows"]):
        parts += ["", "| row | InceptionV3 FID |", "|---|---:|"] + [f"| {r['name']} | {r['metrics']['fid_inception']:.3g} |" for r in results["rows"]]
    if results.get("mcl_diagnosis"):
        parts += ["", diagnosis_markdown(results["mcl_diagnosis"])]
    if results["sweep"]:
        parts += ["", f"Sampler sweep: {results['sweep'][0]['settings']['model']}, n={cfg['sweep_n']} samples each.", "", format_table(results["sweep"])]
    return "\n".join(parts)


def make_figures(cfg: EvalConfig, models: Models, records, sweep_records, floors, expert_preds, out_dir: Path, device, log=_log, diagnosis: dict | None = None) -> dict:
    """Write the figures (those whose models are available; the MCL diagnosis's two when
    ``diagnosis`` is given); returns {name: path}."""
    written = {}

    def save(name, fig):
        path = out_dir / FIGURES[name]
        fig.savefig(path, dpi=150)
        written[name] = str(path)

    mcl = models.diffusion.get("mcl")
    K = models.num_experts
    if mcl is not None:
        base = Settings(model="mcl", sampler=cfg.samplers[0], steps=cfg.steps, seed=cfg.seed, n=1)
        routes = expand_routings(cfg.routings, K)
        if models.gate is None:
            routes = [r for r in routes if not routing_needs_gate(r)]
        strips = [trajectory_strip(replace(base, routing=r), mcl, models.gate, device) for r in routes]
        if strips:
            save("trajectories", plot_trajectories(strips, K, f"MCL denoising trajectories, one initial noise (seed {cfg.seed}, {cfg.samplers[0]}, {cfg.steps} steps); frame: expert used (soft: largest weight)"))
        if models.gate is not None:
            sig, exp = routing_usage(replace(base, n=cfg.usage_n, routing="gated"), mcl, models.gate, device)
            s, frac = expert_usage_by_sigma(sig, exp, K)
            save("expert_usage", plot_expert_usage(s, frac, f"Temporal specialisation: gated routing of {cfg.usage_n} samples ({cfg.samplers[0]}, {cfg.steps} steps)"))
        else:
            log("expert-usage figure skipped: no gating checkpoint")
        hists = []
        for k in range(K):
            preds = expert_preds.get(k)
            if preds is None or len(preds) < cfg.diversity_n:
                row = Row(f"mcl expert_{k}", "mcl", replace(base, routing=f"expert:{k}", n=cfg.diversity_n), cfg.batch_size)
                samples = sample_row(row, mcl, models.gate, device)
                preds = metrics.classify(models.classifier.net, to_float(samples.images), batch_size=cfg.batch_size, device=device)["preds"]
            hists.append(metrics.class_histogram(preds[: cfg.diversity_n], NUM_CLASSES))
        save("expert_digits", plot_expert_digits(hists, f"Inter-class diversity: digits generated by each expert ({cfg.diversity_n} images each)"))
        if diagnosis is not None:
            n = diagnosis["n"]
            save("gate_sigma", plot_gate_sigma(diagnosis, f"MCL: who wins at each noise level, and what the gate says ({n} MNIST test images)"))
            save("winner_digits", plot_winner_digits(diagnosis, f"MCL: the winning expert's share per digit at each noise level ({n} MNIST test images)"))
    else:
        log("MCL figures skipped: mcl is not among --models")

    if sweep_records:
        pts = [{"sampler": r["settings"]["sampler"], "nfe": r["nfe"], "frechet": r["metrics"]["frechet"]} for r in sweep_records]
        model = sweep_records[0]["settings"]["model"]
        save("quality_nfe", plot_quality_vs_nfe(pts, floors.get(cfg.sweep_n, {}).get("frechet"), f"Quality against NFE: {model}, {cfg.sweep_n} samples per point"))

    series = {}
    for model in ("cfg", "flow"):
        rows = sorted((r for r in records if r["group"] == model), key=lambda r: r["settings"]["guidance"])
        if rows:
            series[model] = ([r["settings"]["guidance"] for r in rows], [r["metrics"]["accuracy"] for r in rows], [r["metrics"]["frechet"] for r in rows])
            floor = rows[0]["metrics"]["frechet_floor"]
    if series:
        save("guidance", plot_guidance(series, floor, f"Classifier-free guidance ({cfg.samplers[0]}, {cfg.steps} steps, {cfg.n} samples per point)"))
    return written


# ---------------------------------------------------------------------------------------------
# CLI


QUICK = {"n": 500, "sweep_n": 200, "diversity_n": 200, "usage_n": 64, "diagnosis_n": 200}
CPU_BATCH = 100  # on a CPU, batches of 1000 take twice as long per image as batches of 100 (page faults)


def _csv(cast):
    def parse(text):
        items = [t.strip() for t in str(text).split(",") if t.strip()]
        try:
            return tuple(cast(t) for t in items)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffusion_core.evaluate",
        description="Metrics table, results.json and MCL analysis figures for the ddpm/cfg/flow/mcl checkpoints.",
    )
    d = EvalConfig()
    p.add_argument("--models", type=_csv(str), default=d.models, help="subset of ddpm,cfg,flow,mcl (default: all)")
    p.add_argument("--samplers", type=_csv(str), default=d.samplers, help=f"samplers; the first one runs the main rows, all run in the sweep (default: {','.join(d.samplers)})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"steps of the main rows (default {d.steps})")
    p.add_argument("--sweep-steps", type=_csv(int), default=d.sweep_steps, help="step counts of the sampler sweep (default 4,8,16,32)")
    p.add_argument("--sweep-model", default=None, help="model of the sampler sweep (default: the first of --models)")
    p.add_argument("--guidance-scales", type=_csv(float), default=d.guidance_scales, help="guidance scales of the cfg and flow rows (default 0,1,2,3,5)")
    p.add_argument("--routings", type=_csv(str), default=d.routings, help=f"MCL rows: {ROUTING_CHOICES} (default: all)")
    p.add_argument("--autoguidance", type=_csv(float), default=d.autoguidance, metavar="W,...",
                   help="autoguidance weights: a ddpm row (and an mcl row with the default routing) for each weight and guide (default: none)")
    p.add_argument("--guides", type=_csv(str), default=d.guides, metavar="NAME,...",
                   help=f"the bad models of the autoguidance rows: checkpoint names or .safetensors paths (default {','.join(d.guides)})")
    p.add_argument("--classifier2", default=d.classifier2, help="the second classifier's checkpoint (its columns; 'none': without it; "
                   f"default {d.classifier2}, when present)")
    p.add_argument("--n", type=int, default=None, help=f"samples per main row (default {d.n}; {QUICK['n']} with --quick)")
    p.add_argument("--sweep-n", type=int, default=None, help=f"samples per sweep row, 0 for no sweep (default {d.sweep_n}; {QUICK['sweep_n']} with --quick)")
    p.add_argument("--diversity-n", type=int, default=None, help=f"images per expert in the digit-histogram figure (default {d.diversity_n}; {QUICK['diversity_n']} with --quick)")
    p.add_argument("--usage-n", type=int, default=None, help=f"samples in the expert-usage figure (default {d.usage_n}; {QUICK['usage_n']} with --quick)")
    p.add_argument("--diagnosis-n", type=int, default=None, help=f"MNIST test images in the MCL diagnosis, 0 for none (default {d.diagnosis_n}; {QUICK['diagnosis_n']} with --quick)")
    p.add_argument("--diagnosis-levels", type=int, default=d.diagnosis_levels, help=f"noise levels of the MCL diagnosis (default {d.diagnosis_levels})")
    p.add_argument("--batch-size", type=int, default=None, help=f"images per sampling batch; batch i uses seed + i (default {d.batch_size} "
                   f"on CUDA, {CPU_BATCH} on the CPU, where larger batches are slower per image)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--checkpoint-dir", default=None, help="folder with ddpm/cfg/flow/mcl/gating/classifier.safetensors (default: checkpoints/ or $DIFFUSION_CHECKPOINT_DIR)")
    p.add_argument("--data-dir", default=None, help="torchvision MNIST root (default $MNIST_DIR or ./data)")
    p.add_argument("--out-dir", default=d.out_dir, help="where results.json, results.md and the figures go (default assets/)")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True, help="write the figures (default yes)")
    p.add_argument("--quick", action="store_true", help="small sample counts for a fast check")
    p.add_argument("--fid-inception", action="store_true", help="also InceptionV3 FID, if torchvision's weights are in the local torch hub cache (never downloads)")
    p.add_argument("--record-quality", action="store_true", help="write each model's headline row (ddpm; cfg at the app's default "
                   "guidance; mcl with its default routing) into the checkpoint's metadata, for the app's model cards")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    d = EvalConfig()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = {}
    for name in QUICK:
        v = getattr(args, name)
        sizes[name] = v if v is not None else (QUICK[name] if args.quick else getattr(d, name))
    return EvalConfig(
        models=tuple(m.lower() for m in args.models),
        samplers=tuple(s.lower() for s in args.samplers),
        steps=args.steps,
        sweep_steps=args.sweep_steps,
        sweep_model=args.sweep_model,
        guidance_scales=args.guidance_scales,
        autoguidance=args.autoguidance,
        guides=args.guides,
        classifier2=None if str(args.classifier2).lower() in ("none", "") else args.classifier2,
        routings=args.routings,
        batch_size=args.batch_size or (d.batch_size if device.startswith("cuda") else CPU_BATCH),
        seed=args.seed,
        device=device,
        checkpoint_dir=args.checkpoint_dir,
        data_dir=args.data_dir,
        out_dir=args.out_dir,
        figures=args.figures,
        fid_inception=args.fid_inception,
        record_quality=args.record_quality,
        diagnosis_levels=args.diagnosis_levels,
        **sizes,
    )


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    command = " ".join(["python -m diffusion_core.evaluate", *map(shlex.quote, argv)])
    try:
        results = evaluate(config_from_args(args), command=command)
    except (ValueError, MNISTNotFound) as e:  # configuration, checkpoint (CheckpointError) and data problems
        raise SystemExit(f"error: {e}") from None
    print(results_markdown(results))
    print(f"\nresults.json, results.md and {len(results['figures'])} figures in {args.out_dir} ({results['seconds']:.1f} s)", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
