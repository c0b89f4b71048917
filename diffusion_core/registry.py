"""Loading and caching the models a person's settings ask for; shared by the sampling CLI and the app.

::

    registry = ModelRegistry()                    # checkpoints/ (or $DIFFUSION_CHECKPOINT_DIR)
    registry.available()                          # {"cfg": PosixPath(...), ...}: what is on disk (any *.safetensors)
    model, gate = registry.for_settings(settings)
    result = pipeline.generate(settings, model, gate, device=registry.device)

A model is loaded once per name and kept; when its file changes (a training run wrote a new
checkpoint), the next request loads it again. Loading is thread-safe: concurrent requests for the
same name load it once, requests for different names load in parallel. Names resolve as
``models.load_model`` does: an existing path, then ``<checkpoint_dir>/<name>.safetensors``, then
the Hugging Face Hub repo in ``$DIFFUSION_HF_REPO``.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .checkpoints import CheckpointError, checkpoint_dir, read_config, resolve_checkpoint
from .mcl import ROUTINGS, routing_needs_gate
from .models import GUIDE_KINDS, LoadedModel, load_model
from .pipeline import guide_name

DIFFUSION_MODELS = ("ddpm", "cfg", "flow", "mcl_parts", "mcl", "mcl_shared")  # what a person samples from, in menu order (others follow)
AUXILIARY_MODELS = ("cold_blur_v2", "cold_blur", "gating", "classifier", "classifier2", "ddpm_weak")  # cold diffusion's restorer (Explore); MCL's gating
# network; the metrics' classifiers; autoguidance's bad model
SAMPLEABLE_KINDS = ("ddpm", "cfg", "flow", "mcl")  # checkpoint kinds a sampler can run
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-")
GATING = "gating"
NEEDS_GATE = tuple(r for r in ROUTINGS if r != "expert:K" and routing_needs_gate(r))  # MCL routings that use the gating network


@dataclass
class _Entry:
    model: LoadedModel
    path: Path
    stamp: tuple | None  # (mtime_ns, size) of the file when it was loaded


def _stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


class ModelRegistry:
    """Lazily loads and caches models by name (or path).

    ``checkpoint_dir``: where names are looked up (default ``$DIFFUSION_CHECKPOINT_DIR``, else
    ``checkpoints/``). ``device``: where models are placed when loaded.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike | None = None, device: str = "cpu"):
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir).expanduser()
        self.device = str(device)
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()  # guards _entries and _name_locks
        self._name_locks: dict[str, threading.Lock] = {}
        self._kinds: dict[tuple, tuple[str | None, bool]] = {}

    @property
    def directory(self) -> Path:
        """The folder names are looked up in."""
        return checkpoint_dir(self.checkpoint_dir)

    def available(self) -> dict[str, Path]:
        """The checkpoints in the checkpoint folder (``<name>.safetensors``, a name of lowercase letters,
        digits, ``_`` and ``-``), or already loaded (e.g. from the Hub): name -> file. The known
        names come first in their usual order (``ddpm``, ``cfg``, ``flow``, ``mcl``, ``gating``,
        ``classifier``), then any other checkpoint by name, so a new model appears once its file lands."""
        found = {}
        on_disk = {}
        try:
            for path in self.directory.glob("*.safetensors"):
                if set(path.stem) <= _NAME_CHARS and path.is_file():
                    on_disk[path.stem] = path
        except OSError:
            pass
        known = DIFFUSION_MODELS + AUXILIARY_MODELS
        for name in known + tuple(sorted(n for n in on_disk if n not in known)):
            if name in on_disk:
                found[name] = on_disk[name]
            else:
                with self._lock:
                    entry = self._entries.get(name)
                if entry is not None:
                    found[name] = entry.path
        return found

    def kind_of(self, name: str, path: Path) -> tuple[str | None, bool]:
        """(kind, has an objective) of a checkpoint from its metadata alone (cached until the file changes);
        ``(None, False)`` when it cannot be read."""
        stamp = _stamp(path)
        key = (str(path), stamp)
        with self._lock:
            if key in self._kinds:
                return self._kinds[key]
        try:
            config = read_config(path)
            value = (str(config.get("model", name)), "objective" in config)
        except (CheckpointError, OSError, AttributeError):
            value = (None, False)
        with self._lock:
            self._kinds[key] = value
        return value

    def available_diffusion_models(self) -> list[str]:
        """The subset of ``available()`` a person can sample from (a diffusion or flow model: a checkpoint
        with an objective), in the usual order."""
        out = []
        for name, path in self.available().items():
            if name in AUXILIARY_MODELS:
                continue
            kind, has_objective = self.kind_of(name, path)
            if has_objective and kind in SAMPLEABLE_KINDS:
                out.append(name)
        return out

    def get(self, name: str | os.PathLike) -> LoadedModel:
        """The model for a name or path, loaded on first use (raises ``CheckpointError``)."""
        key = str(name)
        with self._lock:
            name_lock = self._name_locks.setdefault(key, threading.Lock())
        with name_lock:
            with self._lock:
                entry = self._entries.get(key)
            if entry is not None:
                now = _stamp(entry.path)
                if now is None or now == entry.stamp:  # unchanged (or gone: keep serving it)
                    return entry.model
            path = resolve_checkpoint(key, self.checkpoint_dir)
            stamp = _stamp(path)
            model = load_model(path, device=self.device)
            with self._lock:
                self._entries[key] = _Entry(model, path, stamp)
            return model

    def gate_for(self, model: LoadedModel, model_name: str | os.PathLike | None = None) -> nn.Module:
        """The gating network for an MCL ensemble: ``gating.safetensors`` beside the ensemble's file
        when ``model_name`` is a path and one is there, else the ``gating`` model. Its number of
        experts must match the ensemble's."""
        name: str | Path = GATING
        if model_name is not None and Path(str(model_name)).expanduser().is_file():
            sibling = Path(str(model_name)).expanduser().resolve().parent / f"{GATING}.safetensors"
            if sibling.is_file():
                name = sibling
        gate = self.get(name)
        if gate.kind != GATING:
            raise CheckpointError(gate.path, f"is a {gate.kind} checkpoint, expected a gating network")
        k = gate.config["network"]["config"].get("num_experts")
        if k != model.num_experts:
            raise ValueError(f"the gating network {gate.path} routes to {k} experts but the MCL ensemble {model.path} has {model.num_experts}")
        return gate.net

    def for_settings(self, settings, watch_gate: bool = False) -> tuple[LoadedModel, nn.Module | None]:
        """(model, gate) for ``pipeline.Settings``: the gating network is loaded only for an MCL
        model with a routing that uses it (else ``None``); ``watch_gate=True`` also loads it for the
        other routings when it is there, to show its probabilities (a missing or bad gate then gives
        ``None``). Raises ``CheckpointError`` (a ``ValueError``) when a file is missing or bad,
        ``ValueError`` when the model cannot sample."""
        model = self.get(settings.model)
        if model.kind not in SAMPLEABLE_KINDS or model.objective is None:
            raise ValueError(f"{model.path} is a {model.kind} checkpoint, not a diffusion model ({', '.join(SAMPLEABLE_KINDS)})")
        gate = None
        if model.shared:  # hypotheses on one network: its score head is the gate, under every routing
            gate = model.score_gate()
        elif model.kind == "mcl" and routing_needs_gate(settings.routing):
            try:
                gate = self.gate_for(model, settings.model)
            except CheckpointError as e:
                needless = ", ".join(r for r in ROUTINGS if r == "expert:K" or not routing_needs_gate(r))
                raise CheckpointError(e.path, f"{e.reason} (routing {settings.routing!r} needs the gating network; routings {needless} do not)") from None
        elif model.kind == "mcl" and watch_gate:
            try:
                gate = self.gate_for(model, settings.model)
            except ValueError:  # CheckpointError included: no gate to show, and none needed
                gate = None
        return model, gate

    def guide_for(self, settings, model: LoadedModel) -> LoadedModel | None:
        """The bad model that guides ``settings`` (``pipeline.guide_name``), or None when
        autoguidance is off. For a model given as a path, the default guide is looked for beside
        it first. Raises ``ValueError`` (``CheckpointError`` included) for a guide that is missing,
        broken, or not a single diffusion network."""
        name = guide_name(settings, model.kind)
        if name is None:
            return None
        if not settings.guide and Path(str(settings.model)).expanduser().is_file():  # a model given as a path: its default guide beside it
            sibling = Path(str(settings.model)).expanduser().resolve().parent / f"{name}.safetensors"
            if sibling.is_file():
                name = str(sibling)
        try:
            guide = self.get(name)
        except CheckpointError as e:
            raise CheckpointError(e.path, f"{e.reason} (the guide model {name!r} of autoguidance)") from None
        if guide.kind not in GUIDE_KINDS or guide.objective is None:
            raise ValueError(f"the guide {name!r} is a {guide.kind} checkpoint; a guide is one of {', '.join(GUIDE_KINDS)}")
        return guide

    def clear(self) -> None:
        """Forget every loaded model."""
        with self._lock:
            self._entries.clear()

