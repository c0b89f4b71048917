"""Shared pieces of the app's logic: the app's limits and labels, what a checkpoint on disk is
(``ModelInfo``, ``available_models``), the menus, which controls apply, validation of raw control
or API values (``parse_settings``) and ``user_errors``, which turns bad input into ``gr.Error``."""
from __future__ import annotations

import logging
import math
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints import CheckpointError, read_config
from ..mcl import ROUTING_COST, ROUTING_HELP, make_router
from ..models import GUIDE_KINDS
from ..pipeline import DEFAULT_GUIDES, SAMPLER_NAMES, Settings, app_defaults

log = logging.getLogger(__name__)

MAX_IMAGES = 16  # images per request in the app
MAX_COMPARE_ROWS = 12
SCALE = 8  # final images: each 28x28 sample becomes 224x224
GAP = 4  # pixels between tiles of a grid (after upscaling)
BACKGROUND = 255  # grid gaps
SHARE_VERSION = "1"
SHARE_FIELDS = ("model", "digit", "guidance", "sampler", "steps", "eta", "routing", "seed", "n", "autoguidance", "guide", "autoguide")
MAX_VALUE_CHARS = 64  # longer strings in a field are refused before parsing

MODEL_LABELS = {
    "ddpm": "DDPM (unconditional)",
    "cfg": "CFG (choose a digit)",
    "flow": "Flow matching (choose a digit)",
    "mcl_parts": "MCL: experts that own parts of the data (one network, score head)",
    "mcl": "MCL: five separate expert UNets (gating network)",
    "mcl_shared": "MCL, experts on one network (2-epoch study model)",
}
CARD_TITLES = dict(MODEL_LABELS, cold_blur_v2="Cold diffusion (blur)", cold_blur="Cold diffusion (blur), the first restorer", gating="Gating network", classifier="Classifier", classifier2="Second classifier",
                   ddpm_weak="Weak DDPM (autoguidance's guide)")
MODEL_BLURBS = {
    "ddpm": "A denoising diffusion model trained on all digits; it draws a random digit.",
    "cfg": "Class-conditional with classifier-free guidance: pick a digit and how strongly to steer towards it.",
    "flow": "Rectified flow (flow matching), class-conditional with classifier-free guidance: it learns the velocity "
            "that carries noise to a digit along straight lines (x_t = (1 - t) x0 + t noise).",
    "mcl": "Multiple Choice Learning: several expert denoisers, each specialised by winner-takes-all training (here by digit: "
           "each expert draws two or three digits); a router picks the expert for each image and step.",
    "mcl_parts": "Multiple Choice Learning on one network, trained by python train/mcl.py: five hypothesis heads on a shared UNet "
                 "trunk, each the owner of a part of the data (winner-takes-all per training image), and a score head that says "
                 "which expert owns the image being drawn; six epochs from the ddpm. The app guides it by the weak DDPM "
                 "through the experts' mixture (autoguidance 3). Its measurements are in docs/mcl.md.",
    "mcl_shared": "Multiple Choice Learning on one network: five hypothesis heads on a shared UNet trunk, each the owner of a part "
                  "of the data (winner-takes-all per training image, over all its noise levels), and a score head that says which "
                  "expert owns the image being drawn. A study model (docs/mcl.md): its images are not yet as good as mcl's.",
    "cold_blur_v2": "Cold diffusion (Bansal et al. 2023): a UNet that undoes a Gaussian blur of 20 strengths (0.5 to 7 pixels) "
                    "instead of noise. Explore restores a blurred digit with the paper's two samplers and generates from a full blur.",
    "cold_blur": "The first cold-diffusion restorer (blur of 0.5 to 10 pixels). At 10 pixels an 8 and a 3 leave the same blob, so "
                 "generation from a full blur under-draws some digits; cold_blur_v2 replaced it. Kept so that links made with it "
                 "keep their pixels.",
    "gating": "The gating network that routes mcl's experts (gated, sampled, soft, sticky, x0gate and scout routing); "
              "the app also draws its probabilities beside every MCL trajectory.",
    "classifier": "The MNIST classifier behind the quality metrics (accuracy, FID-style features).",
    "classifier2": "A second MNIST classifier of another architecture and seed: the evaluation's independent reading of every row.",
    "ddpm_weak": "A smaller DDPM trained for a fraction of the time: the bad model that autoguidance steers the DDPM and MCL "
                 "away from (D_bad + w (D - D_bad)). It is not offered on its own.",
}
SAMPLER_LABELS = {
    "dpmpp_2m": "DPM-Solver++ (2M)",
    "ddim": "DDIM",
    "ddpm": "DDPM (ancestral)",
    "ddpm_nonoise": "DDPM without noise (fails)",
    "euler": "Euler",
    "heun": "Heun (2nd order)",
}
SAMPLER_NOTES = {"ddpm_nonoise": (
    "*DDPM without noise* drops the fresh noise `σ_t z` from DDPM's step and keeps the rest, so the image holds less noise "
    "than the next step expects: the network reads it as cleaner than it is, each guess is pulled towards the average, and "
    "nothing puts the spread back. Every seed ends in nearly the same image (with our DDPM, a thin 1). DDIM at eta 0 is "
    "deterministic too, but it puts the predicted noise back at the full level of the next step, so it stays on the "
    "schedule and keeps the variety."),
}


def sampler_help(sampler: str) -> str | None:
    """The sampler menu's note on ``sampler`` (None: no note)."""
    return SAMPLER_NOTES.get(sampler)


ROUTING_LABELS = {
    "gated": "gated: the gating network picks",
    "sampled": "sampled: drawn from the gate's probabilities",
    "soft": "soft: mixture weighted by the gate",
    "heuristic": "heuristic: by noise level",
    "pooled": "pooled: one random expert per image",
    "winrate": "winrate: one expert per image, by training wins",
    "guided": "guided: winrate, guided towards the expert's part",
    "x0gate": "x0gate: the gate reads the clean-image guess",
    "scout": "scout: gate on a scout expert's guess",
    "sticky": "sticky: gated, then each image keeps its expert",
}
# The routings the app's menu offers: on the shipped ensemble, those that draw all ten digits
# (class entropy >= 0.97 in the MCL evaluation, docs/evaluation.md), the default (sampled, the best distance) first.
# The experts specialise by digit, so one expert alone, and the routings that let one expert
# decide the digit (gated, heuristic, sticky, x0gate, scout), draw a few digits only; they stay
# available by name in Compare, the API, the CLI and the evaluation.
MENU_ROUTINGS = ("sampled", "winrate", "pooled", "soft")
COMPARE_AXES = ("sampler", "routing", "guidance", "eta", "autoguidance")
# Guidance without labels: the sentence under its slider (the app's weight: pipeline.APP_AUTOGUIDANCE).
AUTOGUIDANCE_HELP = ("Autoguidance steers the model away from a smaller, less trained version of itself: "
                     "D_bad + w (D - D_bad). 1 is the model alone, 0 the weak model alone; two network calls a step, as CFG.")
AUTOGUIDE_CHOICES = [("the expert's output", "output"), ("the experts' mixture", "mixture")]
AUTOGUIDE_HELP = ("The output: D_bad + w (D_k - D_bad), on the chosen expert's image. The mixture: D_k + (w - 1) (D_mix - D_bad), "
                  "the chosen expert's image moved by how far the score-weighted mixture of all experts (the posterior mean) "
                  "is from the weak model, so the expert still decides the digit and guidance only sharpens it.")
DEFAULT_GUIDANCES = "0, 1, 2, 4, 8"


# ---------------------------------------------------------------------------------------------
# Models on disk


@dataclass(frozen=True)
class ModelInfo:
    """What the app needs to know about a checkpoint without loading its weights."""

    name: str
    kind: str
    conditional: bool
    num_experts: int
    path: str
    objective: str | None = None  # ddpm_eps, edm, rectified_flow
    shared: bool = False  # MCL hypotheses on one network, with a score head (nets.SharedMCLNet)

    @property
    def is_mcl(self) -> bool:
        return self.kind == "mcl"

    @property
    def is_flow(self) -> bool:
        return self.objective == "rectified_flow"


_info_cache: dict[tuple, ModelInfo] = {}
_info_lock = threading.Lock()


def model_info(name: str, path) -> ModelInfo:
    """``ModelInfo`` from a checkpoint's metadata (cached until the file changes)."""
    path = Path(path)
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size, name)
    with _info_lock:
        if key in _info_cache:
            return _info_cache[key]
    config = read_config(path)
    kind = config.get("model", name)
    net = config.get("network", {}).get("config", {})
    info = ModelInfo(
        name=name,
        kind=kind,
        conditional=bool(net.get("num_classes") or (net.get("unet") or {}).get("num_classes")) and kind != "classifier",
        num_experts=int(config.get("num_experts", 1)) if kind == "mcl" else 1,
        path=str(path),
        objective=(config.get("objective") or {}).get("name"),
        shared=config.get("network", {}).get("kind") == "mcl_shared",
    )
    with _info_lock:
        _info_cache[key] = info
    return info


def available_models(registry) -> dict[str, ModelInfo]:
    """The diffusion models a person can sample from, in the usual order: name -> ModelInfo."""
    found = registry.available()
    out = {}
    for name in registry.available_diffusion_models():
        try:
            out[name] = model_info(name, found[name])
        except (OSError, CheckpointError) as e:  # a file being rewritten, or broken: leave it out
            log.warning("skipping checkpoint %s: %s", name, e)
    return out


def model_label(info: ModelInfo) -> str:
    """The menu label of a model: its usual label, or for another checkpoint its name, kind and objective."""
    if info.name in MODEL_LABELS:
        return MODEL_LABELS[info.name]
    what = "flow matching" if info.is_flow else info.kind
    return f"{info.name} ({what}{', choose a digit' if info.conditional else ''})"


def model_choices(models: Mapping[str, ModelInfo]) -> list[tuple[str, str]]:
    """(label, name) of every model whose checkpoint exists (``available_models``), in menu order."""
    return [(model_label(info), n) for n, info in models.items()]


def sampler_choices() -> list[tuple[str, str]]:
    order = ["dpmpp_2m", "ddim", "ddpm", "ddpm_nonoise", "euler", "heun"]
    return [(SAMPLER_LABELS.get(s, s), s) for s in order if s in SAMPLER_NAMES]


def routing_label(routing: str) -> str:
    if routing.startswith("expert:"):
        return f"expert {routing.split(':', 1)[1]} only"
    return ROUTING_LABELS.get(routing, routing)


def routing_choices(num_experts: int, keep: str | None = None) -> list[tuple[str, str]]:
    """(label, routing) for the routing menu: ``MENU_ROUTINGS``, plus ``keep`` when it is another
    valid routing for ``num_experts`` experts (a share link's, so that the link still reproduces)."""
    choices = [(routing_label(r), r) for r in MENU_ROUTINGS]
    if keep and keep not in MENU_ROUTINGS:
        try:
            make_router(keep, num_experts)
        except ValueError:
            return choices
        choices.append((routing_label(keep), keep))
    return choices


def routing_help(routing: str | None, shared: bool = False) -> str:
    """One sentence on what a routing does and its cost, for the line under the routing menu
    (``shared``: the experts are heads on one network, so one pass serves them all)."""
    key = str(routing or "").strip().lower()
    key = "expert:K" if key.startswith("expert:") else key.split(":", 1)[0]
    if key not in ROUTING_HELP:
        return "Which expert denoises each image at each step."
    if shared:
        gate = ROUTING_HELP[key].replace("the gating network", "the score head").replace("The gating network", "The score head")
        gate = gate.replace(" (K times the cost)", "")
        cost = "2 passes" if key == "scout" else "1 pass"
        return f"{gate} Cost: {cost} of the shared network per image per step."
    cost = ROUTING_COST[key]
    return f"{ROUTING_HELP[key]} Cost: {cost} expert evaluation{'' if cost == '1' else 's'} per image per step."


def digit_choices() -> list[tuple[str, str]]:
    return [("any", "any")] + [(str(d), str(d)) for d in range(10)]


@dataclass(frozen=True)
class Visibility:
    """Which controls apply to a model and sampler."""

    digit: bool
    guidance: bool
    autoguidance: bool
    autoguide: bool  # what autoguidance compares the guide with: an MCL on one network only
    routing: bool
    eta: bool
    num_experts: int


def visibility(info: ModelInfo | None, sampler: str | None) -> Visibility:
    cond = bool(info and info.conditional)
    mcl = bool(info and info.is_mcl)
    return Visibility(digit=cond, guidance=cond, autoguidance=bool(info) and not cond, autoguide=bool(info and info.shared), routing=mcl, eta=sampler == "ddim", num_experts=info.num_experts if mcl else 0)


def random_seed() -> int:
    return secrets.randbelow(2**32)


# ---------------------------------------------------------------------------------------------
# Validation


def _check_length(name: str, value) -> None:
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        raise ValueError(f"{name} is too long ({len(value)} characters)")


def _parse_digit(value):
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("", "any", "none", "random", "all"):
            return None
        return v
    if isinstance(value, float) and math.isnan(value):
        raise ValueError("digit must be between 0 and 9 (or 'any'), got nan")
    return value


def _name(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a name, got {value!r}")
    return value.strip().lower()


def default_guidance(info: ModelInfo | None) -> float:
    """The app's classifier-free guidance for a model (``pipeline.app_defaults``)."""
    return app_defaults(info.kind, info.conditional, info.name).guidance if info is not None else float(Settings().guidance)


def default_autoguidance(info: ModelInfo | None) -> float:
    """The app's autoguidance weight for a model (``pipeline.app_defaults``; 1, off, for class-conditional models)."""
    return app_defaults(info.kind, info.conditional, info.name).autoguidance if info is not None else 1.0


def default_autoguide(info: ModelInfo | None) -> str:
    """What the app's autoguidance compares the guide with for a model (``pipeline.app_defaults``)."""
    return app_defaults(info.kind, info.conditional, info.name).autoguide if info is not None else Settings().autoguide


def guide_names(models: Mapping[str, ModelInfo]) -> list[str]:
    """The guides (autoguidance's bad models) a person may name: the default guides, then every
    single-network diffusion model of the menu."""
    names = list(dict.fromkeys(DEFAULT_GUIDES.values()))
    return names + [n for n, info in models.items() if info.kind in GUIDE_KINDS and n not in names]


def parse_settings(models: Mapping[str, ModelInfo], *, model=None, sampler=None, steps=None, seed=None, n=None,
                   digit=None, guidance=None, routing=None, eta=None, autoguidance=None, guide=None, autoguide=None) -> Settings:
    """Raw values from the controls, the API or a share link -> validated, canonical ``Settings``.

    ``None`` means the default. Raises ``ValueError`` with a clear message. Settings that do not
    apply to the model (digit and guidance without classes, routing outside MCL, eta outside
    DDIM) are reset to their defaults, so equal images have equal settings.
    """
    d = Settings()
    raw = dict(model=model, sampler=sampler, steps=steps, seed=seed, n=n, digit=digit, guidance=guidance, routing=routing, eta=eta,
               autoguidance=autoguidance, guide=guide, autoguide=autoguide)
    for k, v in raw.items():
        _check_length(k, v)
    model = d.model if model is None else _name(model, "model")
    if model not in models:
        names = ", ".join(models) or "none (no checkpoints found)"
        raise ValueError(f"unknown model {model!r}; available models: {names}")
    info = models[model]
    s = Settings(
        model=model,
        sampler=d.sampler if sampler is None else _name(sampler, "sampler"),
        steps=d.steps if steps is None else steps,
        seed=d.seed if seed is None else seed,
        n=d.n if n is None else n,
        digit=_parse_digit(digit),
        guidance=d.guidance if guidance is None else guidance,
        routing=d.routing if routing is None else _name(routing, "routing"),
        eta=d.eta if eta is None else eta,
        autoguidance=d.autoguidance if autoguidance is None or autoguidance == "" else autoguidance,
        guide=d.guide if guide is None else _name(guide, "guide"),
        autoguide=d.autoguide if autoguide is None or autoguide == "" else _name(autoguide, "autoguide"),
    )
    if isinstance(s.steps, (int, float)) and not isinstance(s.steps, bool) and math.isfinite(s.steps) and not float(s.steps).is_integer():
        raise ValueError(f"steps must be a whole number, got {s.steps!r}")
    s.validate(max_n=MAX_IMAGES, num_experts=info.num_experts if info.is_mcl else None)
    if not info.conditional:
        s.digit, s.guidance = d.digit, d.guidance
    if not info.is_mcl:
        s.routing = d.routing
    if s.sampler != "ddim":
        s.eta = d.eta
    if info.conditional or s.autoguidance == 1:
        s.autoguidance, s.guide, s.autoguide = d.autoguidance, d.guide, d.autoguide
    else:
        if s.autoguide == "mixture" and not info.shared:
            raise ValueError(f"autoguide=mixture compares the guide with the experts' mixture of an MCL model on one network "
                             f"(mcl_parts, mcl_shared); {model} has none: use autoguide=output")
        s.guide = s.guide or DEFAULT_GUIDES.get(info.kind, "")
        allowed = guide_names(models)
        if s.guide not in allowed:
            raise ValueError(f"unknown guide model {s.guide!r} for autoguidance; expected one of {', '.join(allowed)}")
    s.guidance, s.eta, s.autoguidance = float(s.guidance), float(s.eta), float(s.autoguidance)
    return s


def settings_from_json(models: Mapping[str, ModelInfo], text: str) -> Settings:
    """Settings JSON (as the app shows it or ``diffusion_core.sample`` writes it) -> validated Settings."""
    if not isinstance(text, str) or len(text) > 10_000:
        raise ValueError("settings must be a JSON text of at most 10000 characters")
    s = Settings.from_json(text)
    return parse_settings(models, **s.to_dict())
