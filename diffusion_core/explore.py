"""The numerical side of the app's Explore tab: the forward process, one-step denoising and SDEdit,
all through the one denoiser interface ``D(x, sigma, label) -> x0``.

The tab's **noise level** ``t`` runs from 0 (the clean digit) to 1 (pure noise) and is read in a
schedule's own convention (``NoiseScale``):

* a DDPM schedule (linear or cosine, ``T`` steps): ``t`` is the fractional timestep ``t (T - 1)``,
  ``x_t = sqrt(alphabar) x0 + sqrt(1 - alphabar) eps``;
* rectified flow: ``x_t = (1 - t) x0 + t eps``;
* EDM (no native ``t``): Karras's spacing from ``sigma_min`` (t = 0) to ``sigma_max`` (t = 1).

Each is ``x_t = a x0 + b eps`` and reaches a denoiser as the sigma-space image ``x = x_t / a``
at ``sigma = b / a``: one noise draw ``eps`` shows the same digit dissolving under every schedule.

**SDEdit** (Meng et al. 2022) noises a digit to the level ``t`` and lets a sampler carry it back:
the sampler's usual noise grid for ``steps`` steps is cut at the grid level closest (in log sigma)
to ``t``'s sigma, and the sampler starts there from ``x0 + sigma * eps``. With a class-conditional
model and a target digit, classifier-free guidance steers the result (turn a 3 into an 8).
**Inpainting**: with ``region`` set, the denoiser's prediction is replaced by the known digit
outside the region at every call (``InpaintDenoiser``), so the sampler repaints the region only.

``EditSettings`` holds every choice of an SDEdit result; its JSON (``kind: "sdedit"``) replays on
the command line (``python -m diffusion_core.sample --settings sdedit.json --grid out.png``).
All randomness (``eps`` and the sampler's noise) comes from one CPU generator seeded with ``seed``.
"""
from __future__ import annotations

import base64
import functools
import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .denoisers import Denoiser
from .objectives import DiscreteSchedule, EDMObjective, EpsilonObjective, FlowObjective, ScheduleConfig
from .pipeline import Settings, build_denoiser, parse_json
from .samplers import Step, get_sampler, get_sigmas

TEST_DIGITS_FILE = Path(__file__).with_name("mnist_test_1000.npz")  # the first 1000 MNIST test digits
LEVEL_MIN, LEVEL_MAX = 0.0, 1.0
FLOW_T_QUERY_MAX = 0.999  # a flow model is queried at t <= this (t = 1 is sigma = infinity)
ERROR_SIGMAS = np.logspace(-3, 3, 49)  # the one-step error curve's noise levels: beyond every training range
REGIONS = ("none", "top", "bottom", "left", "right", "centre")
MAX_DRAWING_CHARS = 3000  # an encoded 28x28 digit is at most ~1.1k characters
DISPLAY_SCHEDULES = ("linear", "cosine", "flow")


# ---------------------------------------------------------------------------------------------
# Digits: MNIST test digits shipped with the app, and drawings


@functools.lru_cache(maxsize=1)
def test_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) of the shipped MNIST test digits."""
    with np.load(TEST_DIGITS_FILE, allow_pickle=False) as z:
        return z["images"], z["labels"]


def test_digit(index) -> np.ndarray:
    """MNIST test digit ``index`` (28, 28) uint8; ``ValueError`` outside the shipped range."""
    images, _ = test_digits()
    if isinstance(index, bool) or not isinstance(index, (int, float, str, np.integer)):
        raise ValueError(f"digit index must be a whole number, got {index!r}")
    try:
        f = float(index)
    except ValueError:
        raise ValueError(f"digit index must be a whole number, got {index!r}") from None
    if not math.isfinite(f) or not f.is_integer():
        raise ValueError(f"digit index must be a whole number, got {index!r}")
    i = int(f)
    if not 0 <= i < len(images):
        raise ValueError(f"digit index must be between 0 and {len(images) - 1}, got {i}")
    return images[i]


def write_test_digits(mnist_root, path=TEST_DIGITS_FILE, count: int = 1000) -> Path:
    """Write the first ``count`` MNIST test digits (from torchvision's ``mnist_root``) to ``path``."""
    from torchvision.datasets import MNIST

    ds = MNIST(str(mnist_root), train=False, download=False)
    np.savez_compressed(path, images=ds.data[:count].numpy().astype(np.uint8), labels=ds.targets[:count].numpy().astype(np.uint8))
    return Path(path)


def _ink(img) -> np.ndarray:
    """Any drawing (a Gradio sketchpad value, an array or a PIL image) -> ink in [0, 1] (H, W):
    opaque strokes on a transparent layer, or whatever differs from the background colour."""
    if isinstance(img, dict):  # gr.Sketchpad / ImageEditor value: {"background", "layers", "composite"}
        img = img.get("composite") if img.get("composite") is not None else img.get("background")
    if img is None:
        raise ValueError("the drawing is empty: draw a digit first")
    a = np.asarray(img)
    if a.dtype == object or a.ndim not in (2, 3) or a.size == 0:
        raise ValueError("the drawing must be an image")
    a = a.astype(np.float64)
    if a.max() > 1.0:
        a = a / 255.0
    if a.ndim == 3 and a.shape[2] == 4:
        alpha = a[..., 3]
        if alpha.min() < 0.5:  # a transparent canvas: the strokes are what is opaque
            return alpha
        a = a[..., :3]
    gray = a if a.ndim == 2 else a[..., :3].mean(axis=2)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return np.abs(gray - np.median(border))


def digit_from_drawing(img, threshold: float = 0.1) -> np.ndarray:
    """A drawn digit -> a 28x28 uint8 MNIST-style digit (white on black): the ink's bounding box
    scaled so its longer side is 20 pixels, then centred by its centre of mass, as MNIST was made.
    ``ValueError`` when there is no ink."""
    from PIL import Image

    ink = _ink(img)
    if ink.size == 0 or ink.max() < threshold:
        raise ValueError("the drawing is empty: draw a digit first")
    ink = ink / ink.max()
    ys, xs = np.nonzero(ink > threshold)
    crop = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    s = 20.0 / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize((nw, nh), Image.Resampling.LANCZOS), dtype=np.float64)
    total = small.sum()
    if total <= 0:
        raise ValueError("the drawing is empty: draw a digit first")
    cy = (small.sum(axis=1) * np.arange(nh)).sum() / total
    cx = (small.sum(axis=0) * np.arange(nw)).sum() / total
    out = np.zeros((28, 28), dtype=np.float64)
    top, left = int(round(13.5 - cy)), int(round(13.5 - cx))
    top, left = min(max(top, 0), 28 - nh), min(max(left, 0), 28 - nw)
    out[top : top + nh, left : left + nw] = small
    return np.clip(out, 0, 255).round().astype(np.uint8)


def encode_digit(img: np.ndarray) -> str:
    """(28, 28) uint8 -> a short URL-safe text (zlib + base64url), exact."""
    img = np.asarray(img)
    if img.shape != (28, 28) or img.dtype != np.uint8:
        raise ValueError("a digit is a 28x28 uint8 image")
    return base64.urlsafe_b64encode(zlib.compress(img.tobytes(), 9)).decode().rstrip("=")


def decode_digit(text: str) -> np.ndarray:
    """Inverse of ``encode_digit``; ``ValueError`` ("the drawing is malformed") for anything else."""
    if not isinstance(text, str) or not text or len(text) > MAX_DRAWING_CHARS:
        raise ValueError(f"the drawing is malformed: expected an encoded 28x28 digit of at most {MAX_DRAWING_CHARS} characters")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        d = zlib.decompressobj()
        data = d.decompress(raw, 28 * 28 + 1)
        if not d.eof or len(data) != 28 * 28:
            raise ValueError
    except (ValueError, zlib.error, TypeError):
        raise ValueError("the drawing is malformed: it does not decode to a 28x28 digit") from None
    return np.frombuffer(data, dtype=np.uint8).reshape(28, 28).copy()


def to_model_space(img: np.ndarray) -> torch.Tensor:
    """(28, 28) uint8 -> (1, 1, 28, 28) float in [-1, 1], as the models were trained."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)[None, None]


# ---------------------------------------------------------------------------------------------
# Noise levels


def _check_level(level, low: float = LEVEL_MIN, what: str = "noise level") -> float:
    try:
        t = float(level)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number between {low:g} and {LEVEL_MAX:g}, got {level!r}") from None
    if not math.isfinite(t) or not low <= t <= LEVEL_MAX:
        raise ValueError(f"{what} must be between {low:g} and {LEVEL_MAX:g}, got {level!r}")
    return t


@dataclass(frozen=True)
class NoiseScale:
    """A schedule's convention for the noise level ``t`` in [0, 1]: ``x_t = a(t) x0 + b(t) eps``."""

    kind: str  # "linear" / "cosine" (DDPM), "flow" or "edm"
    schedule: DiscreteSchedule | None = None
    sigma_min: float = 0.002  # the training range of a model on this scale, in sigma
    sigma_max: float = 80.0

    @property
    def label(self) -> str:
        return {"linear": "DDPM, linear", "cosine": "DDPM, cosine", "flow": "rectified flow", "edm": "EDM"}.get(self.kind, self.kind)

    def coefficients(self, t: float) -> tuple[float, float]:
        """(a, b) at level ``t``."""
        t = float(t)
        if self.kind == "flow":
            return 1.0 - t, t
        sigma = self.sigma(t)
        a = 1.0 / math.sqrt(1.0 + sigma * sigma)
        return a, sigma * a

    def sigma(self, t: float) -> float:
        """The sigma of level ``t`` (infinite at t = 1 under the flow convention)."""
        t = float(t)
        if self.kind == "flow":
            return math.inf if t >= 1 else t / (1.0 - t)
        if self.schedule is not None:
            if t <= 0:
                return 0.0
            return float(self.schedule.t_to_sigma(torch.tensor(t * (self.schedule.num_timesteps - 1), dtype=torch.float64)))
        if t <= 0:
            return 0.0
        rho = 7.0
        lo, hi = self.sigma_min ** (1 / rho), self.sigma_max ** (1 / rho)
        return (lo + t * (hi - lo)) ** rho

    def query_sigma(self, t: float) -> float:
        """The sigma a model is asked about at level ``t`` (finite: the flow's t is capped at 0.999)."""
        return self.sigma(min(float(t), FLOW_T_QUERY_MAX) if self.kind == "flow" else t)

    def level_of_sigma(self, sigma: float) -> float:
        """Inverse of ``sigma`` (by bisection; monotone on every scale)."""
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if self.sigma(mid) < sigma:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    def curves(self, n: int = 201) -> dict[str, np.ndarray]:
        """``t``, signal level ``a^2`` (alpha-bar for DDPM) and log-SNR ``log(a^2 / b^2)`` over [0, 1]."""
        t = np.linspace(0, 1, n)
        ab = np.array([self.coefficients(x) for x in t])
        a2, b2 = ab[:, 0] ** 2, ab[:, 1] ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            logsnr = np.where((a2 > 0) & (b2 > 0), np.log(np.maximum(a2, 1e-300) / np.maximum(b2, 1e-300)), np.nan)
        return {"t": t, "signal": a2, "log_snr": logsnr}


SCHEDULE_LENGTHS = (200, 1000, 5000)  # the linear schedule's lengths T on offer in the forward process
FINAL_ALPHABAR = 1e-5  # ... each with its beta range scaled so that alpha-bar_T is this


@functools.lru_cache(maxsize=8)
def linear_schedule_for_length(T: int, final_alphabar: float = FINAL_ALPHABAR) -> ScheduleConfig:
    """A linear schedule of ``T`` steps whose betas are ``k (1e-4 .. 0.02)``, with ``k`` found by
    bisection so that alpha-bar at the last step is ``final_alphabar`` (the course exercise comparing
    T = 200, 1000 and 5000; our training schedule, T = 1000 with k = 1, ends at 4e-5)."""
    if isinstance(T, bool) or not isinstance(T, int) or T not in SCHEDULE_LENGTHS:
        raise ValueError(f"schedule length T must be one of {', '.join(map(str, SCHEDULE_LENGTHS))}, got {T!r}")
    target = math.log(final_alphabar)
    lo, hi = 1e-3, 0.999 / 0.02  # beta_end below 1
    for _ in range(80):
        k = (lo + hi) / 2
        betas = torch.linspace(1e-4 * k, 0.02 * k, T, dtype=torch.float64)
        if float(torch.log1p(-betas).sum()) > target:
            lo = k
        else:
            hi = k
    k = (lo + hi) / 2
    return ScheduleConfig(kind="linear", num_timesteps=T, beta_start=1e-4 * k, beta_end=0.02 * k)


@functools.lru_cache(maxsize=8)
def display_scale(kind: str, T: int = 1000) -> NoiseScale:
    """The forward process's three schedules: DDPM linear (``T`` steps, betas scaled so that the
    final alpha-bar is 1e-5), DDPM cosine (T = 1000, our training's) and rectified flow."""
    if kind == "flow":
        return NoiseScale("flow")
    if kind in ("linear", "cosine"):
        sched = DiscreteSchedule(linear_schedule_for_length(T) if kind == "linear" else ScheduleConfig(kind=kind))
        return NoiseScale(kind, sched, sched.sigma_min, sched.sigma_max)
    raise ValueError(f"unknown schedule {kind!r}; expected one of {', '.join(DISPLAY_SCHEDULES)}")


def model_scale(model) -> NoiseScale:
    """The noise scale a loaded model was trained on (its objective's convention and training range)."""
    obj = model.objective
    if isinstance(obj, EpsilonObjective):
        s = obj.schedule
        return NoiseScale(s.config.kind, s, s.sigma_min, s.sigma_max)
    if isinstance(obj, FlowObjective):
        return NoiseScale("flow", None, obj.sigma_min, obj.sigma_max)
    if isinstance(obj, EDMObjective):
        return NoiseScale("edm", None, obj.sigma_min, obj.sigma_max)
    raise ValueError(f"a {model.kind} model has no noise scale")


def noise(seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """The noise ``eps`` (1, 1, 28, 28) of a seed, and the generator (for a sampler's later draws)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((1, 1, 28, 28), generator=g, dtype=torch.float32), g


def forward(x0: torch.Tensor, eps: torch.Tensor, t: float, scale: NoiseScale) -> torch.Tensor:
    """``x_t = a x0 + b eps`` under ``scale`` at level ``t`` (what the network of that schedule sees)."""
    t = _check_level(t)
    a, b = scale.coefficients(t)
    return a * x0 + b * eps


# ---------------------------------------------------------------------------------------------
# One-step denoising


@dataclass
class OneStep:
    level: float
    sigma: float
    x_t: torch.Tensor  # (1, 1, 28, 28) the model's x_t at the level
    prediction: torch.Tensor  # D(x, sigma, label): the predicted clean image
    mse: float  # mean squared error against the clean digit, images in [-1, 1]
    in_training_range: bool


def label_tensor(model, digit: int | None) -> torch.Tensor | None:
    """A class-conditional model's label for ``digit`` (None: the unconditional branch)."""
    if not model.num_classes:
        return None
    return None if digit is None else torch.tensor([int(digit)], dtype=torch.long)


@torch.no_grad()
def one_step(denoiser: Denoiser, scale: NoiseScale, x0: torch.Tensor, eps: torch.Tensor, level: float,
             label: torch.Tensor | None = None) -> OneStep:
    """The model's prediction of the clean image from ``x_t`` at ``level``, in one network call."""
    level = _check_level(level)
    sigma = scale.query_sigma(level)
    x = x0 + sigma * eps
    pred = denoiser(x, sigma, label)
    a, _ = scale.coefficients(min(level, FLOW_T_QUERY_MAX) if scale.kind == "flow" else level)
    return OneStep(level, sigma, a * x, pred, float((pred - x0).square().mean()),
                   scale.sigma_min * (1 - 1e-9) <= sigma <= scale.sigma_max * (1 + 1e-9) or sigma == 0)


@torch.no_grad()
def error_curve(denoiser: Denoiser, x0: torch.Tensor, eps: torch.Tensor, label: torch.Tensor | None = None,
                sigmas=ERROR_SIGMAS) -> np.ndarray:
    """Mean squared error of the one-step prediction at each of ``sigmas`` (one batched call)."""
    s = torch.as_tensor(np.asarray(sigmas), dtype=torch.float32)
    x = x0 + s[:, None, None, None] * eps
    lab = None if label is None else label.expand(len(s))
    pred = denoiser(x, s, lab)
    return (pred - x0).square().flatten(1).mean(dim=1).double().numpy()


def denoise_digit(base: Settings, model, gate, digit: np.ndarray, level) -> tuple[OneStep, NoiseScale]:
    """One-step denoising of ``digit`` (uint8, 28x28) at ``level`` with the model of validated
    ``base``, from the noise of ``base.seed`` (guided towards ``base.digit`` for a
    class-conditional model; unconditional when no digit is chosen)."""
    den = build_denoiser(base, model, gate)
    scale = model_scale(model)
    eps, g = noise(base.seed)
    den.reset(1, g)
    with torch.inference_mode():
        return one_step(den, scale, to_model_space(digit), eps, level, label_tensor(model, base.digit)), scale


def digit_error_curve(base: Settings, model, gate, digit: np.ndarray, sigmas=ERROR_SIGMAS) -> np.ndarray:
    """``error_curve`` of ``digit`` under the denoiser of ``base``, from the noise of ``base.seed``
    (the router, if any, seeded with it as well)."""
    den = build_denoiser(base, model, gate)
    eps, _ = noise(base.seed)
    den.reset(len(sigmas), torch.Generator(device="cpu").manual_seed(int(base.seed)))
    with torch.inference_mode():
        return error_curve(den, to_model_space(digit), eps, label_tensor(model, base.digit), sigmas)


# ---------------------------------------------------------------------------------------------
# SDEdit and inpainting


def region_mask(region: str) -> torch.Tensor:
    """(1, 1, 28, 28): 1 where the digit is kept, 0 in the region the model repaints."""
    m = torch.ones(1, 1, 28, 28)
    if region == "none":
        return m
    if region == "top":
        m[..., :14, :] = 0
    elif region == "bottom":
        m[..., 14:, :] = 0
    elif region == "left":
        m[..., :, :14] = 0
    elif region == "right":
        m[..., :, 14:] = 0
    elif region == "centre":
        m[..., 7:21, 7:21] = 0
    else:
        raise ValueError(f"unknown region {region!r}; expected one of {', '.join(REGIONS)}")
    return m


class InpaintDenoiser(Denoiser):
    """``D'(x, sigma) = m x0 + (1 - m) D(x, sigma)``: the known digit where the mask is 1, the
    model's prediction in the region to repaint. Every sampler then keeps the known pixels on
    their noised path and fills the region consistently with them."""

    def __init__(self, inner: Denoiser, x0: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.x0, self.mask = x0, mask
        self.sigma_min, self.sigma_max = inner.sigma_min, inner.sigma_max
        self.discrete_sigmas = getattr(inner, "discrete_sigmas", None)

    def reset(self, batch_size, generator=None):
        self.inner.reset(batch_size, generator)

    def forward(self, x, sigma, label=None):
        d = self.inner(x, sigma, label)
        return self.mask * self.x0 + (1 - self.mask) * d

    def __getattr__(self, name):  # expose the inner wrapper's per-step records (MCL's expert)
        if name in ("last_expert", "last_gate_probs"):
            return getattr(self.inner, name, None)
        return super().__getattr__(name)


BASE_FIELDS = ("model", "sampler", "steps", "seed", "digit", "guidance", "routing", "eta")  # what SDEdit takes of Settings


@dataclass
class EditSettings:
    """Every choice of an SDEdit (or inpainting) result: the sampling ``settings`` (one image, the
    model alone: no autoguidance) and the input digit, ``index`` or ``drawing``, the ``level`` to
    noise it to and the ``region`` to repaint. Its JSON is flat: ``kind``, the settings' fields of
    ``BASE_FIELDS``, and the edit's own."""

    settings: Settings = field(default_factory=Settings)
    index: int | None = 0  # an MNIST test digit
    drawing: str | None = None  # or a drawn digit, ``encode_digit``'s text
    level: float = 0.5  # how far to noise, 0..1 in the model's own convention
    region: str = "none"  # inpainting: the region the model repaints ("none": SDEdit of the whole digit)

    KIND = "sdedit"

    def __getattr__(self, name):  # es.model, es.seed, ...: the settings' fields
        if name in BASE_FIELDS:
            return getattr(self.settings, name)
        raise AttributeError(name)

    def base(self) -> Settings:
        """The sampling settings (one image, no autoguidance)."""
        return Settings(**{k: getattr(self.settings, k) for k in BASE_FIELDS}, n=1)

    def validate(self, num_experts: int | None = None) -> EditSettings:
        self.settings = self.base().validate(max_n=1, num_experts=num_experts)
        if (self.index is None) == (self.drawing is None):
            raise ValueError("give either an MNIST test digit index or a drawing")
        if self.drawing is not None:
            decode_digit(self.drawing)
        else:
            test_digit(self.index)
            self.index = int(float(self.index))
        self.level = _check_level(self.level, what="noise level")
        if self.level <= 0:
            raise ValueError("noise level must be above 0 for SDEdit (at 0 there is nothing to carry back)")
        self.region = str(self.region).strip().lower()
        region_mask(self.region)
        return self

    def clean_digit(self) -> np.ndarray:
        return decode_digit(self.drawing) if self.drawing is not None else test_digit(self.index)

    def to_dict(self) -> dict:
        return {"kind": self.KIND, **{k: getattr(self.settings, k) for k in BASE_FIELDS},
                "index": self.index, "drawing": self.drawing, "level": self.level, "region": self.region}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d) -> EditSettings:
        if not isinstance(d, dict):
            raise ValueError("settings must be a JSON object")
        d = dict(d)
        if d.pop("kind", cls.KIND) != cls.KIND:
            raise ValueError(f"these settings are not an SDEdit result (kind must be {cls.KIND!r})")
        own_fields = ("index", "drawing", "level", "region")
        unknown = sorted(set(d) - set(BASE_FIELDS) - set(own_fields))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; expected some of {sorted(BASE_FIELDS + own_fields)}")
        base = Settings(**{k: d[k] for k in BASE_FIELDS if k in d})
        own = {k: d[k] for k in own_fields if k in d}
        return cls(base, **own)

    @classmethod
    def from_json(cls, text: str) -> EditSettings:
        return cls.from_dict(parse_json(text))


@dataclass
class EditStart:
    sigmas: torch.Tensor  # the noise levels the sampler runs through (from the start level to 0)
    x: torch.Tensor  # the starting state x0 + sigma_start * eps
    x0: torch.Tensor
    scale: NoiseScale
    full_steps: int  # the grid's steps from pure noise; ``len(sigmas) - 1`` of them are run


def sdedit_start(es: EditSettings, model, denoiser) -> tuple[EditStart, torch.Generator]:
    """Where SDEdit starts: the sampler's grid cut at the level closest (in log sigma) to ``es.level``."""
    scale = model_scale(model)
    full = get_sigmas(es.sampler, denoiser, es.steps)
    target = scale.query_sigma(es.level)
    levels = full[:-1].double()
    i = int(torch.argmin((levels.log() - math.log(target)).abs()))
    sigmas = full[i:]
    x0 = to_model_space(es.clean_digit())
    eps, g = noise(es.seed)
    return EditStart(sigmas, x0 + float(sigmas[0]) * eps, x0, scale, es.steps), g


def sdedit(es: EditSettings, model, gate=None) -> tuple[EditStart, Iterator[Step]]:
    """(start, the sampler's steps) of validated ``es``; the last step's ``x`` is the result."""
    es.validate(num_experts=model.num_experts if model.kind == "mcl" else None)
    den = build_denoiser(es.base(), model, gate)
    start, g = sdedit_start(es, model, den)
    if es.region != "none":
        den = InpaintDenoiser(den, start.x0, region_mask(es.region))
    label = label_tensor(model, es.digit)
    den.reset(1, g)
    kwargs = {"eta": es.eta} if es.sampler == "ddim" else {}
    return start, get_sampler(es.sampler)(den, start.x, start.sigmas, label, g, **kwargs)


def sdedit_final(es: EditSettings, model, gate=None) -> torch.Tensor:
    """The SDEdit result (1, 1, 28, 28) in [-1, 1]."""
    start, steps = sdedit(es, model, gate)
    x = start.x
    with torch.no_grad():
        for step in steps:
            x = step.x
    return x


def velocity(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """The flow convention's velocity ``v = eps - x0`` implied by a denoiser's output ``D`` at the
    sigma-space state ``x``: ``eps = (x - D) / sigma``, so ``v = (x - D) / sigma - D`` (no network call)."""
    return (x - denoised) / float(sigma) - denoised


__all__ = [
    "DISPLAY_SCHEDULES", "ERROR_SIGMAS", "EditSettings", "EditStart", "InpaintDenoiser", "NoiseScale", "OneStep", "REGIONS",
    "decode_digit", "digit_from_drawing", "display_scale", "encode_digit", "error_curve", "forward", "label_tensor",
    "model_scale", "noise", "one_step", "region_mask", "sdedit", "sdedit_final", "sdedit_start", "test_digit", "test_digits",
    "to_model_space", "velocity", "write_test_digits",
]
