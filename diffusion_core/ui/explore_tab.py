"""The Explore tab: the forward process under three schedules, one-step denoising (and its error
over the whole noise range), and SDEdit / inpainting of a digit the visitor picks or draws.

The numbers come from ``diffusion_core.explore``; here they become images, figures, streamed
frames, settings JSON and share links. SDEdit results replay exactly: ``edit_from_json`` and
``edit_share_query`` / ``links.parse_link`` give back the same ``EditSettings``, and
``sdedit_image`` the same pixels (the CLI writes the same PNG).
"""
from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlencode

import gradio as gr
import numpy as np
import torch

from .. import explore as ex
from ..pipeline import Settings, parse_json, to_uint8
from .common import ModelInfo, _check_length, parse_settings
from .files import OutputFiles, png_files
from .generate_tab import Throttle
from .glue import final_image, streamed, user_errors
from .render import (
    labelled_strip,
    png_bytes,
    render_grid,
    render_rgb_grid,
    velocity_tiles,
    vp_frame,
)
from .share import share_query

STRIP_SCALE = 6  # 28x28 tiles become 168x168 in the Explore strips
SOURCES = ("mnist", "drawing")
SCHEDULE_LABELS = {"linear": "DDPM, linear", "cosine": "DDPM, cosine", "flow": "rectified flow"}
SCHEDULE_COLORS = {"linear": "#0072B2", "cosine": "#E69F00", "flow": "#009E73"}
REGION_LABELS = {"none": "nothing: SDEdit of the whole digit", "top": "top half", "bottom": "bottom half",
                 "left": "left half", "right": "right half", "centre": "centre square"}


def region_choices() -> list[tuple[str, str]]:
    return [(REGION_LABELS[r], r) for r in ex.REGIONS]


# ---------------------------------------------------------------------------------------------
# The input digit


def _source(value) -> str:
    if value is None:
        return "mnist"
    if not isinstance(value, str) or value.strip().lower() not in SOURCES:
        raise ValueError(f"digit source must be one of {', '.join(SOURCES)}, got {str(value)[:40]!r}")
    return value.strip().lower()


def drawing_code(drawing) -> str:
    """A drawing in any form the app meets (encoded text, a sketchpad value, an image array or a
    file path from the API) -> ``explore.encode_digit``'s text of the MNIST-style digit."""
    if drawing is None or (isinstance(drawing, str) and not drawing.strip()):
        raise ValueError("the drawing is empty: draw a digit first")
    if isinstance(drawing, str):
        text = drawing.strip()
        if text.lower().endswith((".png", ".webp", ".jpg", ".jpeg")) or "/" in text:
            from PIL import Image

            try:
                with Image.open(text) as im:
                    drawing = np.array(im.convert("RGBA"))
            except OSError as e:
                raise ValueError(f"cannot read the drawing ({type(e).__name__})") from None
        else:
            ex.decode_digit(text)
            return text
    return ex.encode_digit(ex.digit_from_drawing(drawing))


def input_digit(source, index, drawing) -> np.ndarray:
    """The (28, 28) uint8 digit the tab works on: an MNIST test digit or the drawing."""
    if _source(source) == "drawing":
        return ex.decode_digit(drawing_code(drawing))
    return ex.test_digit(index)


def _level(level) -> float:
    return ex._check_level(level)


# ---------------------------------------------------------------------------------------------
# Forward process


def schedule_length(T) -> int:
    """The linear schedule's length from a control or the API (``ValueError`` unless one of 200, 1000, 5000)."""
    if T is None or (isinstance(T, str) and not T.strip()):
        return 1000
    try:
        f = float(T)
    except (TypeError, ValueError):
        f = math.nan
    if isinstance(T, bool) or not math.isfinite(f) or not f.is_integer() or int(f) not in ex.SCHEDULE_LENGTHS:
        raise ValueError(f"schedule length T must be one of {', '.join(map(str, ex.SCHEDULE_LENGTHS))}, got {str(T)[:40]!r}")
    return int(f)


def forward_view(digit: np.ndarray, seed, level, T=1000) -> tuple[np.ndarray, dict]:
    """The clean digit and x_t under each schedule at ``level``, from one noise draw of ``seed``
    (the linear schedule with ``T`` steps): (labelled strip RGB, {schedule: {"signal", "log_snr", "sigma"}})."""
    t = _level(level)
    T = schedule_length(T)
    seed = Settings(seed=seed).validate().seed
    x0 = ex.to_model_space(digit)
    eps, _ = ex.noise(seed)
    tiles, info = [np.asarray(digit, dtype=np.uint8)], {}
    for kind in ex.DISPLAY_SCHEDULES:
        scale = ex.display_scale(kind, T)
        tiles.append(to_uint8(ex.forward(x0, eps, t, scale))[0].numpy())
        a, b = scale.coefficients(t)
        info[kind] = {"signal": a * a, "log_snr": (2 * math.log(a / b)) if a > 0 and b > 0 else (math.inf if b == 0 else -math.inf),
                      "sigma": scale.sigma(t)}
    labels = ["clean digit"] + [f"x_t: {SCHEDULE_LABELS[k]}" + (f", T = {T}" if k == "linear" else "") for k in ex.DISPLAY_SCHEDULES]
    info["linear"]["T"] = T
    info["linear"]["final_alphabar"] = float(ex.display_scale("linear", T).schedule.alphas_cumprod[-1])
    return labelled_strip([tiles], labels, None, scale=STRIP_SCALE), {"level": t, "schedules": info}


def schedule_figure(level, T=1000):
    """beta_t of the DDPM schedules, signal level (alpha-bar; (1 - t)^2 for flow) and log-SNR
    against t for each schedule (the linear one with ``T`` steps), with a marker at ``level``."""
    from matplotlib.figure import Figure

    t = _level(level)
    T = schedule_length(T)
    fig = Figure(figsize=(9.6, 2.6), dpi=90, layout="constrained")
    ax0, ax1, ax2 = fig.subplots(1, 3)
    for kind in ("linear", "cosine"):
        sched = ex.display_scale(kind, T).schedule
        n = sched.config.num_timesteps
        ax0.plot(np.arange(n) / (n - 1), sched.betas.numpy(), color=SCHEDULE_COLORS[kind], lw=1.8,
                 label=f"{SCHEDULE_LABELS[kind]}, T = {n}")
    ax0.set_yscale("log")
    ax0.set_title("beta_t (against t = step / (T - 1))", fontsize=9, loc="left")
    ax0.legend(fontsize=7, frameon=False)
    ax0.set_xlabel("noise level t")
    ax0.spines[["top", "right"]].set_visible(False)
    ax0.tick_params(labelsize=8)
    for kind in ex.DISPLAY_SCHEDULES:
        scale = ex.display_scale(kind, T)
        c = scale.curves()
        color = SCHEDULE_COLORS[kind]
        ax1.plot(c["t"], c["signal"], color=color, lw=1.8, label=SCHEDULE_LABELS[kind])
        ax2.plot(c["t"], c["log_snr"], color=color, lw=1.8, label=SCHEDULE_LABELS[kind])
        a, b = scale.coefficients(t)
        ax1.scatter([t], [a * a], color=color, s=28, zorder=3, edgecolors="white", linewidths=0.6)
        if a > 0 and b > 0:
            ax2.scatter([t], [2 * math.log(a / b)], color=color, s=28, zorder=3, edgecolors="white", linewidths=0.6)
    for ax in (ax1, ax2):
        ax.axvline(t, color="#444444", lw=1, ls="--")
        ax.set_xlabel("noise level t")
        ax.set_xlim(0, 1)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=8)
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_title("signal level: alpha-bar (flow: (1 - t)^2)", fontsize=9, loc="left")
    ax2.set_ylim(-14, 14)
    ax2.set_title("log-SNR = log(signal / noise variance)", fontsize=9, loc="left")
    ax1.legend(fontsize=7, frameon=False)
    return fig


# ---------------------------------------------------------------------------------------------
# One-step denoising


_curve_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
_curve_lock = threading.Lock()


def _cached_curve(key: tuple, compute) -> np.ndarray:
    with _curve_lock:
        if key in _curve_cache:
            _curve_cache.move_to_end(key)
            return _curve_cache[key]
    value = compute()
    with _curve_lock:
        _curve_cache[key] = value
        while len(_curve_cache) > 32:
            _curve_cache.popitem(last=False)
    return value


def denoise(registry, base: Settings, digit: np.ndarray, level, curve: bool = True) -> dict[str, Any]:
    """One-step denoising at ``level`` with the model of validated ``base`` (guidance towards
    ``base.digit`` for a class-conditional model; unconditional when no digit is chosen):
    {"image": strip x_t | prediction | error, "figure": error over the noise range (or None),
    "info": numbers, "text": a Markdown summary}."""
    t = _level(level)
    model, gate = registry.for_settings(base)
    r, scale = ex.denoise_digit(base, model, gate, digit, t)
    x0 = ex.to_model_space(digit)
    err = (r.prediction - x0).abs()[0, 0].clamp(0, 2).div(2).mul(255).round().to(torch.uint8).numpy()
    tiles = [to_uint8(r.x_t)[0].numpy(), to_uint8(r.prediction)[0].numpy(), err]
    image = labelled_strip([tiles], ["x_t (the model's schedule)", "predicted clean image", "|error|"], None, scale=STRIP_SCALE)
    info = {"model": base.model, "level": t, "sigma": r.sigma, "mse": r.mse, "in_training_range": r.in_training_range,
            "training_sigma_range": [scale.sigma_min, scale.sigma_max], "schedule": scale.kind}
    out = {"image": image, "info": info, "figure": None}
    if curve:
        key = (str(getattr(model, "path", base.model)), id(model), base.guidance, base.digit, base.routing, base.seed,
               hashlib.sha1(np.ascontiguousarray(digit).tobytes()).hexdigest())
        mse = _cached_curve(key, lambda: ex.digit_error_curve(base, model, gate, digit))
        out["figure"] = error_figure(mse, scale, r.sigma, r.mse, base.model)
    where = "inside" if r.in_training_range else "**outside**"
    out["text"] = (f"One network call at t = {t:.2f} (σ = {r.sigma:.3g}, {where} the training range "
                   f"σ ∈ [{scale.sigma_min:.3g}, {scale.sigma_max:.3g}] of `{base.model}`): mean squared error "
                   f"{r.mse:.4f} against the clean digit (pixels in [-1, 1]).")
    return out


def error_figure(mse: np.ndarray, scale: ex.NoiseScale, sigma: float, current: float, name: str):
    """The one-step error over the noise range (log sigma), the training range unshaded, the
    levels outside it shaded and labelled, a marker at the slider's level."""
    from matplotlib.figure import Figure

    s = ex.ERROR_SIGMAS
    fig = Figure(figsize=(7.2, 2.6), dpi=90, layout="constrained")
    ax = fig.subplots()
    ax.plot(s, mse, color="#333333", lw=1.6, marker="o", ms=2.5)
    lo, hi = s[0] / 1.5, s[-1] * 1.5
    for a, b in ((lo, scale.sigma_min), (scale.sigma_max, hi)):
        if b > a:
            ax.axvspan(a, b, color="#d55e00", alpha=0.12, lw=0)
    ax.text(lo * 1.1, 0.98, "outside training", transform=ax.get_xaxis_transform(), fontsize=7, color="#a04000", va="top")
    if scale.sigma_max < hi:
        ax.text(hi / 1.1, 0.98, "outside training", transform=ax.get_xaxis_transform(), fontsize=7, color="#a04000", va="top", ha="right")
    if sigma > 0:
        ax.axvline(sigma, color="#0072B2", lw=1, ls="--")
        ax.scatter([sigma], [max(current, 1e-8)], color="#0072B2", s=36, zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("noise level σ (x = x0 + σ·noise)")
    ax.set_ylabel("MSE of one step")
    ax.set_title(f"one-step error of {name} over the noise range", fontsize=9, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# SDEdit settings, JSON and links


def parse_edit(models: Mapping[str, ModelInfo], *, model=None, sampler=None, steps=None, seed=None, digit=None, guidance=None,
               routing=None, eta=None, source=None, index=None, drawing=None, level=None, region=None) -> ex.EditSettings:
    """Raw values from the controls, the API or a link -> validated, canonical ``EditSettings``
    (``ValueError`` with a clear message otherwise). ``source`` "drawing" takes the digit from
    ``drawing`` (encoded text, a sketchpad value or an image), "mnist" from ``index``."""
    base = parse_settings(models, model=model, sampler=sampler, steps=steps, seed=seed, n=1, digit=digit, guidance=guidance,
                          routing=routing, eta=eta)
    d = ex.EditSettings()
    _check_length("region", region)
    if _source(source) == "drawing":
        idx, code = None, drawing_code(drawing)
    else:
        _check_length("index", index)
        idx, code = (d.index if index is None else index), None
    es = ex.EditSettings(base, index=idx, drawing=code, level=d.level if level is None else level, region=d.region if region is None else region)
    info = models[base.model]
    return es.validate(num_experts=info.num_experts if info.is_mcl else None)


def edit_from_json(models: Mapping[str, ModelInfo], text: str) -> ex.EditSettings:
    """An SDEdit result's settings JSON -> validated ``EditSettings``."""
    if not isinstance(text, str) or len(text) > 10_000:
        raise ValueError("settings must be a JSON text of at most 10000 characters")
    raw = parse_json(text)
    if not isinstance(raw, dict) or raw.get("kind") != ex.EditSettings.KIND:
        raise ValueError(f"these settings are not an SDEdit result (expected a JSON object with kind {ex.EditSettings.KIND!r}, "
                         "as /sdedit and the Explore tab write it)")
    es = ex.EditSettings.from_dict(raw)
    d = es.to_dict()
    d.pop("kind")
    if (d.get("index") is None) == (d.get("drawing") is None):
        raise ValueError("give either an MNIST test digit index or a drawing")
    source = "drawing" if d.get("drawing") is not None else "mnist"
    return parse_edit(models, source=source, **d)


def edit_share_query(es: ex.EditSettings, info: ModelInfo) -> str:
    """``?v=1&tab=explore&...``: opens the Explore tab and reproduces this SDEdit result."""
    q = share_query(es.base(), info)
    extra = [("tab", "explore")]
    extra += [("drawing", es.drawing)] if es.drawing is not None else [("index", str(es.index))]
    extra += [("level", repr(float(es.level))), ("region", es.region)]
    return q + "&" + urlencode(extra, safe=":")


def edit_from_fields(models: Mapping[str, ModelInfo], base: Settings, fields: Mapping[str, str]) -> ex.EditSettings:
    """A link's Explore fields (``index`` or ``drawing``, ``level``, ``region``) on top of base settings."""
    b = base.to_dict()
    for name in ("n", "autoguidance", "guide"):  # Explore runs the model alone
        b.pop(name)
    source = "drawing" if "drawing" in fields else "mnist"
    return parse_edit(models, **b, source=source, index=fields.get("index"), drawing=fields.get("drawing"),
                      level=fields.get("level"), region=fields.get("region"))


# ---------------------------------------------------------------------------------------------
# SDEdit: streamed, and the final image


def velocity_image(v: torch.Tensor, scale: int) -> np.ndarray:
    """A velocity (N, 1, 28, 28) as an RGB grid: blue negative, white zero, red positive."""
    return render_rgb_grid(velocity_tiles(v), scale)


def _edit_status(step: int, total: int, sigma: float, elapsed: float, done: bool = False) -> str:
    if done:
        return f"**Done:** carried back in {total} steps, {elapsed:.2f} s"
    if step == 0:
        return f"**Noised** to σ = {sigma:.3g} · {total} steps to go"
    return f"**Step {step} / {total}** · σ = {sigma:.3g} · {elapsed:.2f} s"


def sdedit_stream(registry, es: ex.EditSettings, info: ModelInfo, files: OutputFiles | None = None, min_interval: float = 0.1,
                  extras: bool = True) -> Iterator[dict[str, Any]]:
    """Run SDEdit for validated ``es`` and yield app updates: the noised start, throttled frames
    (``noisy``, ``denoised`` and for a flow model ``velocity``), then ``final`` (exactly
    ``sdedit_image``), ``strip`` (digit, noised, result), ``settings_json``, ``share_query``, and
    (``extras``) ``downloads``."""
    t0 = time.perf_counter()
    model, gate = registry.for_settings(es.base())
    start, steps = ex.sdedit(es, model, gate)
    total = len(start.sigmas) - 1
    fs = 8
    throttle = Throttle(min_interval)
    throttle.ready(force=True)
    first = vp_frame(start.x, float(start.sigmas[0]))
    yield {"noisy": render_grid(first, fs), "denoised": None, "velocity": None,
           "status": _edit_status(0, total, float(start.sigmas[0]), 0.0)}
    prev, last = start.x, None
    with torch.inference_mode():
        for step in steps:
            last = step
            if step.index < total - 1 and throttle.ready():
                upd = {"noisy": render_grid(vp_frame(step.x, step.sigma_next), fs), "denoised": render_grid(to_uint8(step.denoised).numpy(), fs),
                       "status": _edit_status(step.index + 1, total, step.sigma_next, time.perf_counter() - t0)}
                if info.is_flow:
                    upd["velocity"] = velocity_image(ex.velocity(prev, step.denoised, step.sigma), fs)
                yield upd
            prev = step.x
    result = to_uint8(last.x).numpy()
    final = render_grid(result)
    strip = labelled_strip([[es.clean_digit(), first[0], result[0]]], ["your digit", f"noised to t = {es.level:g}", "carried back"],
                           None, scale=STRIP_SCALE)
    yield {"noisy": render_grid(result, fs), "denoised": render_grid(to_uint8(last.denoised).numpy(), fs),
           "status": _edit_status(total, total, 0.0, time.perf_counter() - t0, done=True), "final": final, "strip": strip,
           "settings_json": es.to_json(), "share_query": edit_share_query(es, info)}
    if extras:
        files = files or OutputFiles()
        png = files.write("sdedit.png", png_bytes(final))
        js = files.write("sdedit_settings.json", (es.to_json() + "\n").encode())
        yield {"downloads": [png, js]}


def sdedit_image(registry, es: ex.EditSettings, info: ModelInfo) -> np.ndarray:
    """The SDEdit result as the app shows it (224x224 grayscale), without the frames."""
    return final_image(sdedit_stream(registry, es, info, min_interval=math.inf, extras=False), "SDEdit")


def sdedit_cli_command() -> str:
    return "python -m diffusion_core.sample --settings sdedit.json --grid sdedit.png"


# ---------------------------------------------------------------------------------------------
# Layout and events

EXPLORE_INTRO = """
**Noise level t**: 0 is the clean digit, 1 pure noise, each schedule in its own convention (DDPM: the
fraction of the 1000 training steps; rectified flow: x_t = (1 - t) x0 + t noise). Every image here uses
the noise of the seed on the left, so the same t under the three schedules shows the same noise at
different strengths. *One-step denoising* and *SDEdit* use the model, digit, guidance and routing on
the left (the digit is the one guidance steers towards: pick 8 and turn a 3 into an 8); they run the
model without autoguidance.
"""


def build(shared, tab) -> dict:
    """The Explore tab's components (inside ``tab``) and events: the forward process and one-step
    denoising follow every control while the tab is open; SDEdit streams on its button and on an
    Explore link; the cold-diffusion panel sits below."""
    from . import cold_panel
    from .controls import CONCURRENCY, DEFAULTS, SAMPLING, SHARE_JS

    s = shared
    info0 = s.models().get(s.model.value)
    gr.Markdown(EXPLORE_INTRO)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            source = gr.Radio([("MNIST test digit", "mnist"), ("my drawing", "drawing")], value="mnist", label="Digit to explore", elem_id="ex_source")
            with gr.Row(equal_height=True):
                index = gr.Number(value=0, precision=0, minimum=0, maximum=999, label="Test digit index (0-999)", scale=3, elem_id="ex_index")
                random_digit = gr.Button("Random digit", scale=1, min_width=90, elem_id="ex_random")
            sketch = gr.Sketchpad(label="Draw a digit: pick the brush, then draw", type="numpy", image_mode="RGBA", canvas_size=(280, 280),
                                  fixed_canvas=True, layers=False, transforms=(), elem_id="ex_sketch", format="png",
                                  brush=gr.Brush(colors=["#000000"], default_color="#000000", default_size=22, color_mode="fixed"))
            drawing = gr.Textbox(visible=False, elem_id="ex_drawing")
        with gr.Column(scale=2):
            level = gr.Slider(0, 1, value=0.5, step=0.01, label="Noise level t (0 clean, 1 pure noise)", elem_id="ex_level")
            gr.Markdown("#### Forward process: the digit at noise level t under each schedule")
            T = gr.Radio(list(ex.SCHEDULE_LENGTHS), value=1000, label="Linear schedule length T (betas scaled so alpha-bar_T = 1e-5)", elem_id="ex_T")
            forward_img = gr.Image(show_label=False, format="png", interactive=False, elem_id="ex_forward", buttons=["download"])
            schedule_plot = gr.Plot(show_label=False, format="png", elem_id="ex_schedule")
    gr.Markdown("#### One-step denoising: the model's guess of the clean digit from x_t, in one network call")
    denoise_text = gr.Markdown("", elem_id="ex_denoise_text")
    with gr.Row(equal_height=False):
        denoise_img = gr.Image(show_label=False, format="png", interactive=False, elem_id="ex_denoise", buttons=["download"])
        error_plot = gr.Plot(show_label=False, format="png", elem_id="ex_error")
    gr.Markdown("#### Your own digit: noise it to level t and let the model carry it back (SDEdit)")
    with gr.Row(equal_height=True):
        region = gr.Dropdown(region_choices(), value="none", label="Repaint only (inpainting)", scale=2, elem_id="ex_region")
        run = gr.Button("Carry it back", variant="primary", scale=1, min_width=140, elem_id="ex_run")
    status = gr.Markdown("", elem_id="ex_status")
    with gr.Row():
        noisy = gr.Image(label="Current x_t", format="png", interactive=False, height=240, elem_id="ex_noisy", elem_classes="pixelated", buttons=[])
        velocity_img = gr.Image(label="Predicted velocity (blue < 0 < red)", format="png", interactive=False, height=240, elem_id="ex_velocity",
                                elem_classes="pixelated", buttons=[], visible=bool(info0 and info0.is_flow))
        denoised = gr.Image(label="Predicted clean image", format="png", interactive=False, height=240, elem_id="ex_denoised",
                            elem_classes="pixelated", buttons=[])
        final = gr.Image(label="Result", format="png", interactive=False, height=240, elem_id="ex_final", elem_classes="pixelated",
                         buttons=["download", "fullscreen"])
    strip = gr.Image(show_label=False, format="png", interactive=False, elem_id="ex_strip", buttons=["download"])
    with gr.Accordion("Share and reproduce", open=True):
        link = gr.Textbox(label="Share link (opens this exact result)", buttons=["copy"], max_lines=2, elem_id="ex_link", interactive=False)
        with gr.Row():
            settings_json = gr.Code(label="Settings JSON", language="json", interactive=False, max_lines=16, elem_id="ex_json")
            downloads = gr.File(label="Downloads: PNG, settings", file_count="multiple", interactive=False, elem_id="ex_files")
        gr.Markdown(f"Replay from the command line (the same PNG): `{sdedit_cli_command()}`")
    query = gr.Textbox(visible=False)
    cold = cold_panel.build(s, source, index, drawing)

    outputs = {"noisy": noisy, "denoised": denoised, "velocity": velocity_img, "status": status, "final": final,
               "strip": strip, "settings_json": settings_json, "share_query": query, "downloads": downloads}
    view_outputs = [forward_img, schedule_plot, denoise_img, error_plot, denoise_text]
    inputs = [source, index, drawing, level, region]

    @user_errors
    def view(active, src, idx, drawn, lvl, model, digit, guidance, routing, seed, length=1000):
        """The forward process and one-step denoising of the chosen digit at the slider's level."""
        if active != "explore":
            return [gr.skip()] * 5
        models = s.models()
        if src == "drawing" and not drawn:
            return None, None, None, None, "Draw a digit on the sketchpad (or pick an MNIST test digit)."
        x0 = input_digit(src, idx, drawn)
        base = s.settings(models, model, digit, guidance, DEFAULTS.sampler, DEFAULTS.steps, DEFAULTS.eta, routing, seed, 1)
        fwd, _ = forward_view(x0, base.seed, lvl, length)
        den = denoise(s.registry, base, x0, lvl)
        return png_files((fwd, schedule_figure(lvl, length), den["image"], den["figure"], den["text"]), s.files)

    def on_drawing(value):
        """A stroke on the sketchpad: the MNIST-style digit it makes (encoded), and the source set to the drawing."""
        try:
            return drawing_code(value), "drawing"
        except ValueError:  # an empty or cleared canvas
            return "", gr.skip()

    def updates(es, info):
        first = True
        for update in sdedit_stream(s.registry, es, info, s.files):
            out = {outputs[k]: v for k, v in update.items() if k in outputs}
            if first:  # clear the previous result while the new one streams in
                out.update({final: None, strip: None, downloads: None, query: ""})
                first = False
            yield out

    @user_errors
    def carry_back(model, digit, guidance, sampler, steps, eta, routing, seed, n, src, idx, drawn, lvl, reg):
        models = s.models()
        es = parse_edit(models, model=model, digit=digit, guidance=guidance, sampler=sampler, steps=steps, eta=eta, routing=routing,
                        seed=seed, source=src, index=idx, drawing=drawn, level=lvl, region=reg)
        yield from streamed(updates(es, models[es.model]), s.files)

    def load(model, digit, guidance, sampler, steps, eta, routing, seed, n, src, idx, drawn, lvl, reg, request: gr.Request):
        link_ = s.link(request)
        if link_ is None or link_.tab != "explore":
            yield {status: gr.skip()}
            return
        yield from carry_back(model, digit, guidance, sampler, steps, eta, routing, seed, n, src, idx, drawn, lvl, reg)

    view_inputs = [s.active_tab, source, index, drawing, level, s.model, s.digit, s.guidance, s.routing, s.seed, T]
    tab.select(lambda *v: ["explore"] + list(view("explore", *v)), view_inputs[1:], [s.active_tab] + view_outputs, api_visibility="private",
               concurrency_id="explore_view", concurrency_limit=CONCURRENCY)
    gr.on([level.change, T.change, index.change, source.change, drawing.change, s.model.change, s.digit.change, s.guidance.release,
           s.routing.change], view, view_inputs, view_outputs, trigger_mode="always_last", api_visibility="private",
          concurrency_id="explore_view", concurrency_limit=CONCURRENCY)
    sketch.change(on_drawing, sketch, [drawing, source], trigger_mode="always_last", api_visibility="private", queue=False)
    random_digit.click(lambda: (secrets.randbelow(1000), "mnist"), None, [index, source], api_visibility="private", queue=False)
    run.click(carry_back, s.edit_controls + inputs, list(outputs.values()), concurrency_id=SAMPLING, api_visibility="private",
              show_progress="minimal", show_progress_on=[status]).then(None, query, link, js=SHARE_JS, api_visibility="private")

    def on_page_load(loaded):
        cold["on_page_load"](loaded)
        loaded.success(load, s.edit_controls + inputs, list(outputs.values()), concurrency_id=SAMPLING, api_visibility="private",
                       show_progress="minimal", show_progress_on=[status]).then(None, query, link, js=SHARE_JS, api_visibility="private")

    return {"inputs": inputs, "velocity": velocity_img, "on_page_load": on_page_load}
