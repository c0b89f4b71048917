"""The logic behind the Gradio app (``app.py`` only lays out components and wires events).

Everything here is plain Python over numpy/PIL/matplotlib and is unit-tested without a browser:

* validation: ``parse_settings`` turns raw control or API values into ``pipeline.Settings`` with
  the app's limits, or raises ``ValueError`` with a message a person can act on; ``user_errors``
  turns those into ``gr.Error`` for Gradio handlers (functions and generators);
* share links: ``share_query`` / ``settings_from_query`` encode every setting in a URL query and
  back; the decoded settings reproduce the identical image;
* rendering: nearest-neighbour upscaling, image grids (``render_grid`` / ``split_grid``), live
  frames, the filmstrip, the animated GIF and the expert-usage chart of MCL;
* ``stream``: runs a trajectory and yields throttled frame updates, then the final results;
* ``compare``: one seed, several samplers / routings / guidance scales, as a grid of trajectories;
* ``model_cards``: one card per checkpoint from its metadata.
"""
from __future__ import annotations

import functools
import hashlib
import html
import inspect
import io
import json
import logging
import math
import os
import secrets
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qsl, urlencode

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .checkpoints import CheckpointError, read_config
from .palette import expert_color
from .pipeline import Settings, to_uint8, trajectory
from .samplers import SAMPLERS

log = logging.getLogger(__name__)

MAX_IMAGES = 16  # images per request in the app
MAX_COMPARE_ROWS = 12
SCALE = 8  # final images: each 28x28 sample becomes 224x224
GAP = 4  # pixels between tiles of a grid (after upscaling)
BACKGROUND = 255  # grid gaps
SHARE_VERSION = "1"
SHARE_FIELDS = ("model", "digit", "guidance", "sampler", "steps", "eta", "routing", "seed", "n")
MAX_VALUE_CHARS = 64  # longer strings in a field are refused before parsing

MODEL_LABELS = {
    "ddpm": "DDPM (unconditional)",
    "cfg": "CFG (choose a digit)",
    "mcl": "MCL (ensemble of experts)",
}
CARD_TITLES = dict(MODEL_LABELS, gating="Gating network", classifier="Classifier")
MODEL_BLURBS = {
    "ddpm": "A denoising diffusion model trained on all digits; it draws a random digit.",
    "cfg": "Class-conditional with classifier-free guidance: pick a digit and how strongly to steer towards it.",
    "mcl": "Multiple Choice Learning: several expert denoisers, each specialised by winner-takes-all training; a router picks an expert at every step.",
    "gating": "The gating network that routes MCL samples to experts (gated and soft routing).",
    "classifier": "The MNIST classifier behind the quality metrics (accuracy, FID-style features).",
}
SAMPLER_LABELS = {
    "dpmpp_2m": "DPM-Solver++ (2M)",
    "ddim": "DDIM",
    "ddpm": "DDPM (ancestral)",
    "euler": "Euler",
    "heun": "Heun (2nd order)",
}
ROUTING_LABELS = {
    "gated": "gated: the gating network picks",
    "soft": "soft: mixture weighted by the gate",
    "heuristic": "heuristic: by noise level",
    "pooled": "pooled: one random expert per image",
}
COMPARE_AXES = ("sampler", "routing", "guidance")
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

    @property
    def is_mcl(self) -> bool:
        return self.kind == "mcl"


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
        conditional=bool(net.get("num_classes")) and kind != "classifier",
        num_experts=int(config.get("num_experts", 1)) if kind == "mcl" else 1,
        path=str(path),
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


def model_choices(models: Mapping[str, ModelInfo]) -> list[tuple[str, str]]:
    return [(MODEL_LABELS.get(n, n), n) for n in models]


def sampler_choices() -> list[tuple[str, str]]:
    order = ["dpmpp_2m", "ddim", "ddpm", "euler", "heun"]
    return [(SAMPLER_LABELS.get(s, s), s) for s in order if s in SAMPLERS]


def routing_choices(num_experts: int) -> list[tuple[str, str]]:
    named = [(ROUTING_LABELS[r], r) for r in ("gated", "soft", "heuristic", "pooled")]
    return named + [(f"expert {k} only", f"expert:{k}") for k in range(num_experts)]


def digit_choices() -> list[tuple[str, str]]:
    return [("any", "any")] + [(str(d), str(d)) for d in range(10)]


@dataclass(frozen=True)
class Visibility:
    """Which controls apply to a model and sampler."""

    digit: bool
    guidance: bool
    routing: bool
    eta: bool
    num_experts: int


def visibility(info: ModelInfo | None, sampler: str | None) -> Visibility:
    cond = bool(info and info.conditional)
    mcl = bool(info and info.is_mcl)
    return Visibility(digit=cond, guidance=cond, routing=mcl, eta=sampler == "ddim", num_experts=info.num_experts if mcl else 0)


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


def parse_settings(models: Mapping[str, ModelInfo], *, model=None, sampler=None, steps=None, seed=None, n=None,
                   digit=None, guidance=None, routing=None, eta=None) -> Settings:
    """Raw values from the controls, the API or a share link -> validated, canonical ``Settings``.

    ``None`` means the default. Raises ``ValueError`` with a clear message. Settings that do not
    apply to the model (digit and guidance without classes, routing outside MCL, eta outside
    DDIM) are reset to their defaults, so equal images have equal settings.
    """
    d = Settings()
    raw = dict(model=model, sampler=sampler, steps=steps, seed=seed, n=n, digit=digit, guidance=guidance, routing=routing, eta=eta)
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
    s.guidance, s.eta = float(s.guidance), float(s.eta)
    return s


def settings_from_json(models: Mapping[str, ModelInfo], text: str) -> Settings:
    """Settings JSON (as the app shows it or ``diffusion_core.sample`` writes it) -> validated Settings."""
    if not isinstance(text, str) or len(text) > 10_000:
        raise ValueError("settings must be a JSON text of at most 10000 characters")
    s = Settings.from_json(text)
    return parse_settings(models, **s.to_dict())


def user_errors(fn):
    """Decorate a Gradio handler (function or generator): ``ValueError`` (bad input, bad or
    missing checkpoint) becomes ``gr.Error`` with its message; anything else is logged and
    reported as an internal error, so the request fails cleanly and the queue moves on."""
    import gradio as gr

    def convert(e: Exception) -> Exception:
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, (ValueError, TypeError, OverflowError)):
            return gr.Error(str(e), print_exception=False)
        log.exception("internal error in %s", fn.__name__)
        return gr.Error(f"internal error ({type(e).__name__}: {e})", print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise convert(e) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise convert(e) from None
    return wrapper


# ---------------------------------------------------------------------------------------------
# Share links


def _fmt_float(x: float) -> str:
    return repr(float(x))  # round-trips exactly


def share_query(s: Settings, info: ModelInfo) -> str:
    """``?v=1&model=...``: every setting that applies to the model, exactly."""
    params = [("v", SHARE_VERSION), ("model", s.model)]
    if info.conditional:
        params += [("digit", "any" if s.digit is None else str(s.digit)), ("guidance", _fmt_float(s.guidance))]
    params += [("sampler", s.sampler), ("steps", str(s.steps))]
    if s.sampler == "ddim":
        params.append(("eta", _fmt_float(s.eta)))
    if info.is_mcl:
        params.append(("routing", s.routing))
    params += [("seed", str(s.seed)), ("n", str(s.n))]
    return "?" + urlencode(params, safe=":")


def _query_items(query) -> list[tuple[str, str]]:
    if query is None:
        return []
    if isinstance(query, str):
        q = query.split("?", 1)[1] if "?" in query else query
        q = q.split("#", 1)[0]
        return parse_qsl(q, keep_blank_values=True)
    if hasattr(query, "multi_items"):  # starlette QueryParams
        return list(query.multi_items())
    if isinstance(query, Mapping):
        return [(str(k), str(v)) for k, v in query.items()]
    return [(str(k), str(v)) for k, v in query]


def settings_from_query(models: Mapping[str, ModelInfo], query) -> tuple[Settings | None, list[str]]:
    """A share link's query (string, mapping, or starlette ``QueryParams``) -> (Settings, notes).

    Returns ``(None, [])`` when the query holds no settings (a plain visit). Raises ``ValueError``
    ("this share link is malformed: ...") for bad values, repeated fields or an unknown version.
    Parameters the app does not know (a host may add its own) are ignored and listed in the notes.
    """
    items = _query_items(query)
    if len(items) > 50:
        raise ValueError("this share link is malformed: too many parameters")
    ours: dict[str, str] = {}
    notes = []
    for k, v in items:
        if k in SHARE_FIELDS or k == "v":
            if k in ours:
                raise ValueError(f"this share link is malformed: {k!r} is given more than once")
            ours[k] = v
        elif not k.startswith("_") and k not in ("view", "logs"):
            notes.append(f"ignored unknown share-link parameter {k[:40]!r}")
    if not any(k in SHARE_FIELDS for k in ours):
        return None, []
    version = ours.pop("v", SHARE_VERSION)
    if version != SHARE_VERSION:
        raise ValueError(f"this share link is malformed: version {version[:20]!r} is not supported (this app writes v={SHARE_VERSION})")
    try:
        return parse_settings(models, **ours), notes
    except ValueError as e:
        raise ValueError(f"this share link is malformed: {e}") from None


# ---------------------------------------------------------------------------------------------
# Rendering


def hex_rgb(color: str) -> tuple[int, int, int]:
    c = color.lstrip("#")
    return tuple(int(c[i : i + 2], 16) for i in (0, 2, 4))


def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling by an integer factor ((H,W) or (H,W,C)); exact, no smoothing."""
    if factor == 1:
        return np.ascontiguousarray(img)
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the grid of ``n`` images: as square as possible."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def render_grid(images: np.ndarray, scale: int = SCALE, gap: int = GAP, border: list[str | None] | None = None,
                border_width: int = 0) -> np.ndarray:
    """(N, 28, 28) uint8 -> one image: tiles upscaled by ``scale`` and separated by ``gap`` pixels.

    Grayscale (H, W) unless ``border`` gives a colour per tile (then RGB with a coloured frame of
    ``border_width`` pixels drawn inside each tile's gap area)."""
    images = np.asarray(images)
    n, h, w = images.shape
    rows, cols = grid_shape(n)
    th, tw = h * scale, w * scale
    H, W = rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap
    if border is not None:
        H, W = H + 2 * border_width, W + 2 * border_width
        out = np.full((H, W, 3), BACKGROUND, dtype=np.uint8)
    else:
        out = np.full((H, W), BACKGROUND, dtype=np.uint8)
    off = border_width if border is not None else 0
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = off + r * (th + gap), off + c * (tw + gap)
        tile = upscale(images[i], scale)
        if border is not None:
            if border[i] is not None and border_width:
                bw = border_width
                out[y - bw : y + th + bw, x - bw : x + tw + bw] = hex_rgb(border[i])
            out[y : y + th, x : x + tw] = tile[..., None]
        else:
            out[y : y + th, x : x + tw] = tile
    return out


def split_grid(grid: np.ndarray, n: int, scale: int = SCALE, gap: int = GAP, size: int = 28) -> np.ndarray:
    """Inverse of ``render_grid`` (no border): the (N, 28, 28) samples of a grid image."""
    grid = np.asarray(grid)
    if grid.ndim == 3:
        grid = grid[..., 0]
    rows, cols = grid_shape(n)
    t = size * scale
    out = np.empty((n, size, size), dtype=grid.dtype)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * (t + gap), c * (t + gap)
        out[i] = grid[y : y + t : scale, x : x + t : scale]
    return out


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data_or_path) -> np.ndarray:
    if isinstance(data_or_path, (bytes, bytearray)):
        data_or_path = io.BytesIO(data_or_path)
    with Image.open(data_or_path) as im:
        return np.array(im)


def frame_scale(n: int, target: int = 224) -> int:
    """Upscaling of live frames: about ``target`` pixels wide whatever the number of images."""
    _, cols = grid_shape(n)
    return max(1, target // (28 * cols))


@functools.lru_cache(maxsize=8)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def vp_frame(x: torch.Tensor, sigma: float) -> np.ndarray:
    """A state ``x = x0 + sigma * noise`` as displayable uint8 (N, 28, 28): divided by
    sqrt(1 + sigma^2) (the variance-preserving view), so noise looks like noise, not saturation."""
    return to_uint8(x / math.sqrt(1.0 + float(sigma) ** 2)).numpy()


def initial_noise(settings: Settings) -> np.ndarray:
    """The first noise the trajectory for these settings starts from, as uint8 (N, 28, 28); the
    same draw as ``pipeline.trajectory`` (one CPU generator seeded with ``seed``)."""
    g = torch.Generator(device="cpu").manual_seed(settings.seed)
    noise = torch.randn((settings.n, 1, 28, 28), generator=g, dtype=torch.float32)
    return to_uint8(noise).numpy()


def labelled_strip(tiles: list[list[np.ndarray]], col_labels: list[str], row_labels: list[str] | None = None,
                   borders: list[list[str | None]] | None = None, scale: int = 3, gap: int = 3) -> np.ndarray:
    """Rows of 28x28 tiles with a header of column labels and optional row labels -> RGB image."""
    rows, cols = len(tiles), len(tiles[0]) if tiles else 0
    t = 28 * scale
    bw = 2 if borders is not None else 0
    cell = t + 2 * bw
    font = _font(12)
    head = 18
    left = 0
    if row_labels:
        left = max(int(font.getlength(lbl)) for lbl in row_labels) + 8
    W = left + cols * cell + (cols - 1) * gap + 2
    H = head + rows * cell + (rows - 1) * gap + 2
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, lbl in enumerate(col_labels):
        x = left + c * (cell + gap) + cell // 2
        draw.text((x, 2), lbl, fill=(60, 60, 60), font=font, anchor="ma")
    arr = np.array(canvas)
    for r in range(rows):
        for c in range(cols):
            y, x = head + r * (cell + gap), left + c * (cell + gap)
            color = borders[r][c] if borders is not None else None
            if color is not None:
                arr[y : y + cell, x : x + cell] = hex_rgb(color)
            arr[y + bw : y + bw + t, x + bw : x + bw + t] = upscale(tiles[r][c], scale)[..., None]
    if row_labels:
        canvas = Image.fromarray(arr)
        draw = ImageDraw.Draw(canvas)
        for r, lbl in enumerate(row_labels):
            y = head + r * (cell + gap) + cell // 2
            draw.text((left - 6, y), lbl, fill=(30, 30, 30), font=font, anchor="rm")
        arr = np.array(canvas)
    return arr


def snapshot_indices(steps: int, count: int) -> list[int]:
    """``count`` step indices spread evenly over ``0..steps-1``, always ending with the last."""
    if steps <= count:
        return list(range(steps))
    idx = np.linspace(0, steps - 1, count).round().astype(int)
    return sorted(set(idx.tolist()))


@dataclass
class Recording:
    """What a trajectory left behind, as uint8 images (for filmstrip, GIF and chart)."""

    noise: np.ndarray  # (N, 28, 28) the starting noise
    x: list[np.ndarray]  # per step (N, 28, 28), VP view of the state after the step
    denoised: list[np.ndarray]  # per step (N, 28, 28) predicted clean image
    sigmas: list[float]  # per step, noise level after the step
    experts: np.ndarray | None  # (S, N) expert per step and image, MCL
    gate_probs: np.ndarray | None  # (S, N, K) gating probabilities, gated/soft routing
    num_experts: int = 0


def expert_borders(rec: Recording, step: int | None, count: int) -> list[str | None] | None:
    if rec.experts is None or step is None:
        return None
    return [expert_color(int(k)) for k in rec.experts[step][:count]]


def filmstrip(rec: Recording, columns: int = 8, max_rows: int = 4) -> np.ndarray:
    """Snapshots of the trajectory from noise to the final image (RGB). One image: rows for the
    state x_t and the predicted clean image; several: one row per image (up to ``max_rows``).
    Under MCL each tile is framed in the colour of the expert that served it."""
    S = len(rec.x)
    idx = snapshot_indices(S, columns - 1)
    n = rec.noise.shape[0]
    labels = ["noise"] + [f"step {i + 1}" for i in idx]
    grey = None  # the noise column has no expert
    if n == 1:
        tiles = [[rec.noise[0]] + [rec.x[i][0] for i in idx], [np.zeros_like(rec.noise[0])] + [rec.denoised[i][0] for i in idx]]
        row_labels = ["x_t", "predicted x_0"]
        tiles[1][0] = np.full_like(rec.noise[0], BACKGROUND)
        borders = None
        if rec.experts is not None:
            row = [grey] + [expert_color(int(rec.experts[i][0])) for i in idx]
            borders = [row, row]
    else:
        rows = min(n, max_rows)
        tiles = [[rec.noise[j]] + [rec.x[i][j] for i in idx] for j in range(rows)]
        row_labels = [f"image {j + 1}" for j in range(rows)]
        borders = None
        if rec.experts is not None:
            borders = [[grey] + [expert_color(int(rec.experts[i][j])) for i in idx] for j in range(rows)]
    return labelled_strip(tiles, labels, row_labels, borders)


def _gif_palette() -> list[int]:
    pal = []
    for i in range(240):
        v = round(i * 255 / 239)
        pal += [v, v, v]
    from .palette import EXPERT_COLORS

    for c in list(EXPERT_COLORS)[:16]:
        pal += list(hex_rgb(c))
    pal += [0, 0, 0] * (256 - len(pal) // 3)
    return pal


def write_gif(frames: list[np.ndarray], path=None, duration_ms: int = 90, hold_last_ms: int = 1500) -> bytes:
    """Frames (H,W) or (H,W,3) uint8 -> an animated GIF (looping; the last frame held)."""
    pal_img = Image.new("P", (1, 1))
    pal_img.putpalette(_gif_palette())
    ims = []
    for f in frames:
        im = Image.fromarray(f if f.ndim == 3 else np.repeat(f[..., None], 3, axis=2)).convert("RGB")
        ims.append(im.quantize(palette=pal_img, dither=Image.Dither.NONE))
    durations = [duration_ms] * (len(ims) - 1) + [hold_last_ms]
    buf = io.BytesIO()
    ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=durations, loop=0, disposal=1)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def gif_frames(rec: Recording, max_frames: int = 48) -> list[np.ndarray]:
    """Frames for the GIF: the state (and, for one image, the predicted clean image beside it)."""
    n = rec.noise.shape[0]
    S = len(rec.x)
    idx = snapshot_indices(S, max_frames)
    scale = 4 if n == 1 else max(1, frame_scale(n, 256))
    bw = 3 if rec.experts is not None else 0

    def frame(x, den, step):
        borders = expert_borders(rec, step, n) if step is not None else ([None] * n if bw else None)
        left = render_grid(x, scale, GAP, border=borders, border_width=bw) if borders is not None else render_grid(x, scale)
        if left.ndim == 2:
            left = np.repeat(left[..., None], 3, axis=2)
        if n != 1:
            return left
        right = render_grid(den, scale) if den is not None else np.zeros((28 * scale, 28 * scale), dtype=np.uint8)
        right = np.repeat(right[..., None], 3, axis=2)
        if right.shape[0] != left.shape[0]:
            pad = (left.shape[0] - right.shape[0]) // 2
            right = np.pad(right, ((pad, left.shape[0] - right.shape[0] - pad), (pad, pad), (0, 0)), constant_values=BACKGROUND)
        sep = np.full((left.shape[0], 8, 3), BACKGROUND, dtype=np.uint8)
        return np.concatenate([left, sep, right], axis=1)

    frames = [frame(rec.noise, None, None)]
    frames += [frame(rec.x[i], rec.denoised[i], i) for i in idx]
    return frames


def expert_usage(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """(S, N) expert indices -> (S, K) share of the images served by each expert at each step."""
    experts = np.asarray(experts)
    S, N = experts.shape
    out = np.zeros((S, num_experts))
    for k in range(num_experts):
        out[:, k] = (experts == k).sum(axis=1) / N
    return out


def mean_gate_probs(probs: np.ndarray) -> np.ndarray:
    """(S, N, K) gating probabilities -> (S, K) mean over images."""
    return np.asarray(probs, dtype=np.float64).mean(axis=1)


def expert_chart(rec: Recording, routing: str):
    """A matplotlib figure: the expert chosen at each step (one image) or each expert's share of
    the images per step (several), and the gating probabilities for gated and soft routing.
    Colours are the palette's, one per expert."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    experts = rec.experts
    S, N = experts.shape
    K = rec.num_experts
    steps = np.arange(1, S + 1)
    panels = 2 if rec.gate_probs is not None else 1
    fig = Figure(figsize=(7, 2.3 * panels + 0.3), dpi=90, layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    colors = [expert_color(k) for k in range(K)]
    ax = axes[0]
    if N == 1:
        e = experts[:, 0]
        ax.step(steps, e, where="mid", color="#999999", lw=1, zorder=1)
        ax.scatter(steps, e, c=[colors[int(k)] for k in e], s=40, zorder=2, edgecolors="white", linewidths=0.5)
        ax.set_yticks(range(K), [f"expert {k}" for k in range(K)])
        ax.set_ylim(-0.5, K - 0.5)
        ax.set_title(f"expert chosen at each step ({routing} routing)", fontsize=10, loc="left")
    else:
        shares = expert_usage(experts, K)
        bottom = np.zeros(S)
        for k in range(K):
            ax.bar(steps, shares[:, k], bottom=bottom, color=colors[k], width=0.9, label=f"expert {k}")
            bottom += shares[:, k]
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of images")
        ax.set_title(f"experts used at each step by {N} images ({routing} routing)", fontsize=10, loc="left")
    if rec.gate_probs is not None:
        ax2 = axes[1]
        probs = mean_gate_probs(rec.gate_probs)
        ax2.stackplot(steps, probs.T, colors=colors, labels=[f"expert {k}" for k in range(K)], step="mid" if S < 3 else None)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("probability")
        ax2.set_title("gating probabilities" + (" (mean over images)" if N > 1 else ""), fontsize=10, loc="left")
    handles = [Patch(color=colors[k], label=f"expert {k}") for k in range(K)]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("step")
    axes[-1].set_xlim(0.5, S + 0.5)
    for a in axes:
        a.spines[["top", "right"]].set_visible(False)
        a.tick_params(labelsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# Files handed to the browser


class OutputFiles:
    """Content-addressed files for downloads (GIF, PNG, JSON) in one temporary folder; files older
    than ``max_age_s`` are removed as new ones are written."""

    def __init__(self, root=None, max_age_s: float = 3600):
        self.root = Path(root or Path(tempfile.gettempdir()) / "diffusion_app_files")
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._last_sweep = 0.0

    def write(self, name: str, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()[:20]
        folder = self.root / digest
        path = folder / name
        with self._lock:
            folder.mkdir(parents=True, exist_ok=True)
            if not path.is_file():
                tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}"
                tmp.write_bytes(data)
                os.replace(tmp, path)
            else:
                os.utime(path)
            self._sweep()
        return str(path)

    def _sweep(self):
        now = time.time()
        if now - self._last_sweep < 60:
            return
        self._last_sweep = now
        for folder in self.root.iterdir():
            try:
                if now - folder.stat().st_mtime > self.max_age_s:
                    for f in folder.iterdir():
                        f.unlink()
                    folder.rmdir()
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# Generation


class Throttle:
    """Lets a frame through when ``min_interval`` seconds have passed since the last one (the
    first and any forced frame always pass), so a fast sampler does not flood the browser."""

    def __init__(self, min_interval: float = 0.1, clock=time.perf_counter):
        self.min_interval = min_interval
        self.clock = clock
        self.last: float | None = None

    def ready(self, force: bool = False) -> bool:
        now = self.clock()
        if force or self.last is None or now - self.last >= self.min_interval:
            self.last = now
            return True
        return False


def _status(step: int, total: int, sigma: float | None, elapsed: float, done: bool = False) -> str:
    if done:
        return f"**Done:** {total} steps in {elapsed:.2f} s"
    if step == 0:
        return f"**Pure noise** · step 0 / {total}"
    return f"**Step {step} / {total}** · σ = {sigma:.3g} · {elapsed:.2f} s"


def stream(registry, settings: Settings, info: ModelInfo, files: OutputFiles | None = None,
           min_interval: float = 0.1, extras: bool = True) -> Iterator[dict[str, Any]]:
    """Run the trajectory for validated ``settings`` and yield updates for the app as dicts:

    * first the starting noise, then throttled live frames: ``noisy`` (the state, RGB, framed by
      expert colour under MCL), ``denoised`` (the predicted clean image) and ``status``;
    * then ``final`` (the grid of final samples, grayscale, exactly ``pipeline.generate``'s
      images upscaled by ``SCALE``), ``settings_json``, ``share_query``;
    * then (``extras``) ``filmstrip``, ``gif`` (a file path), ``downloads`` and ``chart`` (a
      matplotlib figure, or None outside MCL).
    """
    t0 = time.perf_counter()
    model, gate = registry.for_settings(settings)
    n = settings.n
    fs = frame_scale(n)
    throttle = Throttle(min_interval)
    noise = initial_noise(settings)
    throttle.ready(force=True)
    yield {"noisy": render_grid(noise, fs), "denoised": None, "status": _status(0, settings.steps, None, 0.0)}
    xs, dens, sigmas, experts, probs = [], [], [], [], []
    last = None
    for step in trajectory(settings, model, gate):
        last = step
        x8 = vp_frame(step.x, step.sigma_next)
        d8 = to_uint8(step.denoised).numpy()
        xs.append(x8)
        dens.append(d8)
        sigmas.append(step.sigma_next)
        if step.expert is not None:
            experts.append(step.expert.numpy())
        if step.gate_probs is not None:
            probs.append(step.gate_probs.float().numpy())
        final_step = step.index == settings.steps - 1
        if not final_step and throttle.ready():
            borders = [expert_color(int(k)) for k in step.expert] if step.expert is not None else None
            noisy = render_grid(x8, fs, border=borders, border_width=3) if borders else render_grid(x8, fs)
            yield {"noisy": noisy, "denoised": render_grid(d8, fs),
                   "status": _status(step.index + 1, settings.steps, step.sigma_next, time.perf_counter() - t0)}
    images = to_uint8(last.x).numpy()
    rec = Recording(noise, xs, dens, sigmas, np.stack(experts) if experts else None,
                    np.stack(probs) if len(probs) == len(xs) and probs else None,
                    model.num_experts if info.is_mcl else 0)
    borders = expert_borders(rec, len(xs) - 1, n)
    noisy = render_grid(images, fs, border=borders, border_width=3) if borders else render_grid(images, fs)
    yield {
        "noisy": noisy,
        "denoised": render_grid(dens[-1], fs),
        "status": _status(settings.steps, settings.steps, 0.0, time.perf_counter() - t0, done=True),
        "final": render_grid(images),
        "settings_json": settings.to_json(),
        "share_query": share_query(settings, info),
    }
    if not extras:
        return
    files = files or OutputFiles()
    gif = files.write("trajectory.gif", write_gif(gif_frames(rec)))
    js = files.write("settings.json", (settings.to_json() + "\n").encode())
    png = files.write("samples.png", png_bytes(render_grid(images)))
    yield {
        "filmstrip": filmstrip(rec),
        "gif": gif,
        "downloads": [png, gif, js],
        "chart": expert_chart(rec, settings.routing) if rec.experts is not None else None,
    }


def generate_image(registry, settings: Settings, info: ModelInfo) -> np.ndarray:
    """The final grid for validated settings, without the live frames (the API's ``generate``)."""
    for update in stream(registry, settings, info, min_interval=math.inf, extras=False):
        if "final" in update:
            return update["final"]
    raise RuntimeError("the trajectory ended without a final image")


# ---------------------------------------------------------------------------------------------
# Compare


def default_compare_values(axis: str, info: ModelInfo | None) -> str:
    if axis == "sampler":
        return ", ".join(s for _, s in sampler_choices())
    if axis == "routing":
        k = info.num_experts if info and info.is_mcl else 0
        return ", ".join([f"expert:{i}" for i in range(k)] + ["heuristic", "gated", "soft", "pooled"])
    return DEFAULT_GUIDANCES


def parse_compare(models: Mapping[str, ModelInfo], base: Settings, axis, values) -> list[Settings]:
    """The rows of a comparison: ``base`` with ``axis`` (sampler, routing or guidance) set to each
    of ``values`` (a list, or a comma-separated text). One image per row. Raises ``ValueError``."""
    axis = _name(axis, "compare axis") if axis is not None else "sampler"
    if axis not in COMPARE_AXES:
        raise ValueError(f"unknown compare axis {axis!r}; expected one of {', '.join(COMPARE_AXES)}")
    info = models[base.model]
    if axis == "routing" and not info.is_mcl:
        raise ValueError(f"comparing routing strategies needs the MCL model, not {base.model!r}")
    if axis == "guidance" and not info.conditional:
        raise ValueError(f"comparing guidance scales needs a class-conditional model (cfg), not {base.model!r}")
    if values is None or (isinstance(values, str) and not values.strip()):
        values = default_compare_values(axis, info)
    if isinstance(values, str):
        if len(values) > 1000:
            raise ValueError("the list of values to compare is too long")
        values = [v.strip() for v in values.replace(";", ",").split(",") if v.strip()]
    values = list(values)
    if not values:
        raise ValueError("give at least one value to compare")
    if len(values) > MAX_COMPARE_ROWS:
        raise ValueError(f"at most {MAX_COMPARE_ROWS} values can be compared at once, got {len(values)}")
    rows, seen = [], set()
    fields = base.to_dict()
    fields["n"] = 1
    for v in values:
        try:
            s = parse_settings(models, **dict(fields, **{axis: v}))
        except ValueError as e:
            raise ValueError(f"compare value {str(v)[:40]!r}: {e}") from None
        key = getattr(s, axis)
        if key not in seen:
            seen.add(key)
            rows.append(s)
    return rows


def _row_label(s: Settings, axis: str) -> str:
    if axis == "sampler":
        return SAMPLER_LABELS.get(s.sampler, s.sampler)
    if axis == "routing":
        return s.routing
    return f"guidance {s.guidance:g}"


def compare(registry, rows: list[Settings], axis: str, columns: int = 8) -> tuple[np.ndarray, dict]:
    """A grid of trajectories (RGB): one row per settings, columns from the shared starting noise
    through evenly spaced steps to the final image. Returns (image, {"axis", "rows": [settings]})."""
    axis = _name(axis, "compare axis")
    tiles, borders, any_border = [], [], False
    steps = rows[0].steps
    idx = snapshot_indices(steps, columns - 1)
    for s in rows:
        model, gate = registry.for_settings(s)
        noise = initial_noise(s)[0]
        row, brow = [noise], [None]
        states = {}
        for step in trajectory(s, model, gate):
            if step.index in idx:
                states[step.index] = (vp_frame(step.x, step.sigma_next)[0], None if step.expert is None else int(step.expert[0]))
        for i in idx:
            img, k = states[i]
            row.append(img)
            brow.append(None if k is None else expert_color(k))
            any_border |= k is not None
        tiles.append(row)
        borders.append(brow)
    labels = ["noise"] + [f"step {i + 1}" for i in idx]
    img = labelled_strip(tiles, labels, [_row_label(s, axis) for s in rows], borders if any_border else None, scale=3)
    return img, {"axis": axis, "rows": [s.to_dict() for s in rows]}


# ---------------------------------------------------------------------------------------------
# Model cards


def _param_count(path) -> int:
    """Number of parameters stored in a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def _fmt_value(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_value(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k} {_fmt_value(x)}" for k, x in v.items())
    return str(v)


def _fmt_duration(s) -> str:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return str(s)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def model_card(name: str, path) -> dict:
    """A model card as ordered sections of (label, value) rows, from the checkpoint metadata."""
    path = Path(path)
    config = read_config(path)
    kind = config.get("model", name)
    net = config.get("network", {})
    ncfg = net.get("config", {})
    overview = [("kind", kind), ("parameters", f"{_param_count(path):,}")]
    if kind == "mcl":
        overview.append(("experts", str(config.get("num_experts", "?"))))
    if net.get("kind") == "unet":
        overview.append(("network", f"UNet, {ncfg.get('base_channels')} base channels × {_fmt_value(ncfg.get('channel_mults', []))}"
                         + (", attention" if ncfg.get("attention") else "")))
    elif net.get("kind"):
        overview.append(("network", net["kind"]))
    obj = config.get("objective")
    if obj:
        sched = obj.get("schedule") or {}
        text = obj.get("name", "?")
        if sched:
            text += f" ({sched.get('kind', '')} schedule, {sched.get('num_timesteps', '?')} steps)"
        overview.append(("objective", text))
    overview.append(("file", f"{path.name}, {path.stat().st_size / 1e6:.1f} MB"))
    tr = config.get("training") or {}
    training = []
    for key, label in [("wall_time_s", "training time"), ("device", "device"), ("init", "started from"), ("epochs", "epochs"),
                       ("steps", "optimizer steps"), ("images_seen", "images seen"), ("batch_size", "batch size"), ("lr", "learning rate"),
                       ("p_uncond", "label dropout"), ("wta", "winner-takes-all"), ("ema_decay", "EMA decay")]:
        if tr.get(key) is not None:
            value = tr[key]
            if key == "wall_time_s":
                value = _fmt_duration(value)
            elif key == "init":
                value = Path(str(value)).name
            elif isinstance(value, int):
                value = f"{value:,}"
            else:
                value = _fmt_value(value)
            training.append((label, value))
    final = tr.get("final") or {}
    for key in ("loss", "accuracy"):
        if isinstance(final.get(key), (int, float)):
            training.append((f"final {key}", _fmt_value(final[key])))
    if tr.get("note"):
        training.append(("note", str(tr["note"])))
    quality = [(str(k), _fmt_value(v)) for k, v in (config.get("quality") or {}).items()]
    for key in ("test_accuracy",):
        if key in tr:
            quality.append((key.replace("_", " "), _fmt_value(tr[key])))
    return {"name": name, "title": CARD_TITLES.get(name, name), "blurb": MODEL_BLURBS.get(kind, ""),
            "sections": [("Model", overview), ("Training", training), ("Measured quality", quality)]}


def card_html(card: dict) -> str:
    e = html.escape
    parts = [f'<div class="model-card"><h3>{e(card["title"])}</h3>']
    if card["blurb"]:
        parts.append(f'<p class="blurb">{e(card["blurb"])}</p>')
    for title, rows in card["sections"]:
        if not rows:
            if title == "Measured quality":
                parts.append(f'<h4>{e(title)}</h4><p class="none">not measured yet</p>')
            continue
        parts.append(f"<h4>{e(title)}</h4><table>")
        for k, v in rows:
            parts.append(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>")
        parts.append("</table>")
    parts.append("</div>")
    return "".join(parts)


def model_cards(registry) -> str:
    """HTML: a card per checkpoint present (diffusion models first, then gating and classifier)."""
    cards = []
    for name, path in registry.available().items():
        try:
            cards.append(card_html(model_card(name, path)))
        except (OSError, ValueError, KeyError, TypeError) as ex:
            cards.append(f'<div class="model-card"><h3>{html.escape(name)}</h3><p>unreadable checkpoint: {html.escape(str(ex))}</p></div>')
    if not cards:
        return f"<p>No checkpoints found in <code>{html.escape(str(registry.directory))}</code>.</p>"
    return '<div class="model-cards">' + "".join(cards) + "</div>"


def cli_command() -> str:
    """How to replay the settings JSON (saved as settings.json) from the command line."""
    return "python -m diffusion_core.sample --settings settings.json --out samples.npz --grid samples.png"
