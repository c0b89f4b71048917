"""Loading the checkpoints an evaluation needs and sampling its rows in seeded batches (every
batch's settings kept, so a row replays and its SHA-256 checks)."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..mcl import ROUTINGS, routing_needs_gate
from ..models import LoadedModel, load_model
from ..pipeline import Settings, generate
from .config import Row, _log

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
    autoguidance rows; ``classifier2`` unless its checkpoint is missing.

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
