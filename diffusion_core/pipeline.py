"""Settings -> images: the one path from a person's choices to pixels, shared by the sampling
CLI, the app and the evaluation.

``Settings`` holds every choice (model, sampler, steps, seed, number of images, digit, guidance
scale, routing, eta) and validates it with clear messages. ``trajectory`` yields the sampler's
per-step records; ``generate`` runs it to the end. All randomness comes from one CPU
``torch.Generator`` seeded with ``seed``, so the same settings give the same images anywhere.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch

from .guidance import AUTOGUIDE_OF
from .mcl import make_router, routing_needs_gate
from .samplers import SAMPLERS, Step, get_sampler, get_sigmas

SAMPLER_NAMES = tuple(SAMPLERS)  # what a Settings may name (the UI lists them without importing a sampler)

MAX_SEED = 2**63 - 1
MAX_STEPS = 1000
MAX_GUIDANCE = 20.0
MAX_AUTOGUIDANCE = 5.0
# The app's classifier-free guidance per class-conditional model kind, chosen so that two
# independently trained classifiers both read the requested digit (docs/autoguidance.md); cfg's is
# also Settings' default.
APP_GUIDANCE = {"cfg": 1.3, "flow": 1.2}
# The bad model that guides each unconditional model kind when a setting names none (autoguidance).
DEFAULT_GUIDES = {"ddpm": "ddpm_weak", "mcl": "ddpm_weak"}
# The app's autoguidance weight per unconditional model kind, from the evaluation's sweep
# (docs/autoguidance.md); Settings' own default stays 1 (off), so settings saved before autoguidance
# existed give the same images.
APP_AUTOGUIDANCE = {"ddpm": 2.5, "mcl": 1.0}
# A checkpoint whose own sweep chose otherwise than its kind: name -> (weight, what the guide is
# compared with). mcl_parts is guided on its experts' mixture, the best of the weights swept
# (docs/mcl.md has the measurements and benchmarks/mcl_study.py the commands).
APP_AUTOGUIDANCE_OF_MODEL = {"mcl_parts": (3.0, "mixture")}


class AppDefaults(NamedTuple):
    guidance: float  # classifier-free guidance (class-conditional models)
    autoguidance: float  # autoguidance's weight (unconditional models; 1 is off)
    autoguide: str  # what the guide is compared with (Settings.autoguide)


def app_defaults(kind: str, conditional: bool, name: str = "") -> AppDefaults:
    """The guidance the app starts a model from: ``APP_GUIDANCE`` for a class-conditional model
    (Settings' default for other kinds); for an unconditional one the checkpoint's own
    ``APP_AUTOGUIDANCE_OF_MODEL``, else its kind's ``APP_AUTOGUIDANCE``. The values that do not
    apply are Settings' defaults (1, off, for autoguidance)."""
    if conditional:
        return AppDefaults(float(APP_GUIDANCE.get(kind, APP_GUIDANCE["cfg"])), 1.0, "output")
    weight, of = APP_AUTOGUIDANCE_OF_MODEL.get(name, (APP_AUTOGUIDANCE.get(kind, 1.0), "output"))
    return AppDefaults(float(APP_GUIDANCE["cfg"]), float(weight), of)


@dataclass
class Settings:
    model: str = "cfg"
    sampler: str = "dpmpp_2m"
    steps: int = 16
    seed: int = 0
    n: int = 1
    digit: int | None = None  # CFG: the requested digit; None cycles 0-9
    guidance: float = APP_GUIDANCE["cfg"]  # CFG scale: 0 unconditional, 1 conditional, > 1 guided; the default from the guidance sweep
    routing: str = "sampled"  # MCL: expert:K, heuristic, gated, soft, pooled, sampled[:T], winrate, guided[:W], x0gate, scout, sticky[:SIGMA]; the default by measurement (docs/mcl.md)
    eta: float = 0.0  # DDIM stochasticity
    autoguidance: float = 1.0  # unconditional models: D_bad + w (D - D_bad); 1 is the model alone (off), 0 the guide alone
    guide: str = ""  # the bad model of autoguidance: a checkpoint name ("": DEFAULT_GUIDES for the model's kind)
    autoguide: str = "output"  # what autoguidance compares the guide with: the denoiser's "output", or (MCL on one trunk) its experts' "mixture"

    def validate(self, max_n: int = 10000, num_experts: int | None = None) -> Settings:
        """Check every field; raise ValueError with a message a person can act on."""
        def as_int(name, v):
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            if isinstance(v, float) and v.is_integer():
                return int(v)
            if isinstance(v, str):
                try:
                    return int(v.strip())
                except ValueError:
                    pass
            raise ValueError(f"{name} must be an integer, got {v!r}")

        def as_float(name, v):
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number, got {v!r}") from None
            if not math.isfinite(f):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            return f

        self.steps = as_int("steps", self.steps)
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        self.seed = as_int("seed", self.seed)
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and 2^63-1, got {self.seed}")
        self.n = as_int("n", self.n)
        if not 1 <= self.n <= max_n:
            raise ValueError(f"number of images must be between 1 and {max_n}, got {self.n}")
        if self.digit is not None and self.digit != "":
            self.digit = as_int("digit", self.digit)
            if not 0 <= self.digit <= 9:
                raise ValueError(f"digit must be between 0 and 9, got {self.digit}")
        else:
            self.digit = None
        self.guidance = as_float("guidance", self.guidance)
        if not 0 <= self.guidance <= MAX_GUIDANCE:
            raise ValueError(f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {self.guidance:g}")
        self.eta = as_float("eta", self.eta)
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be between 0 and 1, got {self.eta:g}")
        self.autoguidance = as_float("autoguidance", self.autoguidance)
        if not 0 <= self.autoguidance <= MAX_AUTOGUIDANCE:
            raise ValueError(f"autoguidance must be between 0 and {MAX_AUTOGUIDANCE:g}, got {self.autoguidance:g}")
        if self.guide is None:
            self.guide = ""
        if not isinstance(self.guide, str) or len(self.guide) > 200:
            raise ValueError(f"guide must be a checkpoint name, got {self.guide!r}")
        self.guide = self.guide.strip()
        if self.autoguide not in AUTOGUIDE_OF:
            raise ValueError(f"autoguide must be one of {', '.join(AUTOGUIDE_OF)}, got {str(self.autoguide)[:40]!r}")
        if not isinstance(self.sampler, str) or self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {', '.join(SAMPLERS)}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a name (ddpm, cfg, mcl) or a checkpoint path")
        self.routing = str(self.routing).strip().lower()
        make_router(self.routing, num_experts)  # validates the spelling
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["autoguide"] == "output":  # the settings of before it keep their JSON, byte for byte
            del d["autoguide"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Settings:
        return cls(**known_fields(cls, d))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return cls.from_dict(parse_json(text))


def known_fields(cls, d) -> dict:
    """``d`` checked to be a dict whose keys are all fields of the dataclass ``cls``."""
    if not isinstance(d, dict):
        raise ValueError("settings must be a JSON object")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown}; expected some of {sorted(known)}")
    return d


def parse_json(text: str, what: str = "settings"):
    """``json.loads`` with a message a person can act on, also for a text nested too deeply to
    parse (thousands of ``[``: Python's parser gives up with a RecursionError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} are not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{what} are nested too deeply to be settings (a JSON object of plain values is expected)") from None


def labels_for(settings: Settings, conditional: bool) -> torch.Tensor | None:
    """The digit of each image: the chosen digit, or 0..9 cycling when none is chosen."""
    if not conditional:
        return None
    if settings.digit is not None:
        return torch.full((settings.n,), settings.digit, dtype=torch.long)
    return torch.arange(settings.n, dtype=torch.long) % 10


def guide_name(settings: Settings, kind: str) -> str | None:
    """The checkpoint that guides these settings (autoguidance), or None when it is off."""
    if settings.autoguidance == 1:
        return None
    name = settings.guide or DEFAULT_GUIDES.get(kind)
    if not name:
        raise ValueError(f"guidance without labels (autoguidance) is for the unconditional models ({', '.join(DEFAULT_GUIDES)}), "
                         f"not a {kind} model")
    return name


def build_denoiser(settings: Settings, model, gate=None, guide=None):
    """The denoiser for these settings from a ``LoadedModel`` (and gating net for MCL, and the
    guide ``LoadedModel`` when ``settings.autoguidance`` is not 1)."""
    if model.kind == "mcl":
        make_router(settings.routing, model.num_experts)  # index in range for this ensemble
        if routing_needs_gate(settings.routing) and gate is None and not getattr(model, "shared", False):  # a shared model's score head is its gate
            raise ValueError(f"routing {settings.routing!r} needs the gating checkpoint, which is not available")
    return model.denoiser(guidance=settings.guidance, routing=settings.routing, gate=gate,
                          autoguidance=settings.autoguidance, guide=guide, autoguide=settings.autoguide)


def initial_noise(settings: Settings) -> tuple[torch.Tensor, torch.Generator]:
    """The noise every trajectory of these settings starts from, (n, 1, 28, 28) at unit variance,
    and the generator (seeded with ``settings.seed``, on the CPU) that every later draw of the
    sampler and the router comes from: the one place a seed becomes noise."""
    g = torch.Generator(device="cpu").manual_seed(settings.seed)
    return torch.randn((settings.n, 1, 28, 28), generator=g, dtype=torch.float32), g


@dataclass
class Run:
    """A trajectory about to run: its starting ``noise`` (unit variance, what the app shows first),
    the state ``x`` it starts from (the noise at the first sigma), the ``sigmas`` and the ``steps``,
    a generator of one ``Step`` per sampler step."""

    noise: torch.Tensor
    x: torch.Tensor
    sigmas: torch.Tensor
    steps: Iterator[Step]


def start(settings: Settings, model, gate=None, device="cpu", watch_gate: bool = False, guide=None) -> Run:
    """Validate ``settings`` and set up their trajectory. ``watch_gate``: MCL steps carry the
    gating network's probabilities even under a routing that does not use them
    (``MCLDenoiser.watch_gate``; the images do not change). ``guide``: the bad model of
    autoguidance (``registry.guide_for``)."""
    settings.validate(num_experts=model.num_experts if model.kind == "mcl" else None)
    denoiser = build_denoiser(settings, model, gate, guide)
    if watch_gate and hasattr(denoiser, "watch_gate"):
        denoiser.watch_gate = True
    sigmas = get_sigmas(settings.sampler, denoiser, settings.steps)
    noise, g = initial_noise(settings)
    x = (noise * math.sqrt(float(sigmas[0]) ** 2 + 1)).to(device)
    label = labels_for(settings, bool(model.num_classes))
    label = None if label is None else label.to(device)
    denoiser.reset(settings.n, g)
    kwargs = {"eta": settings.eta} if settings.sampler == "ddim" else {}
    return Run(noise, x, sigmas, get_sampler(settings.sampler)(denoiser, x, sigmas, label, g, **kwargs))


def trajectory(settings: Settings, model, gate=None, device="cpu", watch_gate: bool = False, guide=None) -> Iterator[Step]:
    """Yield one ``Step`` per sampler step for these settings (``start(...).steps``)."""
    yield from start(settings, model, gate, device, watch_gate, guide).steps


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N,1,H,W) -> uint8 (N,H,W)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]


@dataclass
class Result:
    images: torch.Tensor  # (N, 28, 28) uint8
    labels: torch.Tensor | None  # (N,) when conditional
    experts: torch.Tensor | None  # (steps, N) when MCL
    settings: Settings


def generate(settings: Settings, model, gate=None, device="cpu", guide=None) -> Result:
    last, experts = None, []
    for step in trajectory(settings, model, gate, device, guide=guide):
        last = step
        if step.expert is not None:
            experts.append(step.expert)
    return Result(
        images=to_uint8(last.x),
        labels=labels_for(settings, bool(model.num_classes)),
        experts=torch.stack(experts) if experts else None,
        settings=settings,
    )
