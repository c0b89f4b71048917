"""Explore's cold-diffusion panel: a digit blurred to a level and restored by Bansal et al.'s naive
and improved samplers side by side, and digits generated from a fully blurred start.

The numbers come from ``diffusion_core.cold`` through the checkpoint's restorer; here they become
strips, grids and JSON. ``ColdRestore`` holds a restoration's choices, validated, so the API and
the panel give the same pixels.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from urllib.parse import urlencode

import gradio as gr
import numpy as np

from .. import explore as ex
from ..cold import (
    COLD_SAMPLER_NAMES,
    DEGRADATIONS,
    BlurConfig,
    StartDistribution,
    degrade_and_restore,
)
from ..cold import generate as generate_cold
from ..pipeline import Settings, parse_json, to_uint8
from .common import SHARE_VERSION
from .render import labelled_strip, png_bytes, render_grid

COLD_MODELS = {"blur": ("cold_blur_v2", "cold_blur")}  # degradation -> the checkpoints that undo it, the current one first
FIRST_COLD_MODEL = {"blur": "cold_blur"}  # what settings and links without a model mean (they were written before there were two)
MAX_COLD_IMAGES = 16
STRIP_SCALE = 6


def _whole(value, what: str, low: int, high: int) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = math.nan
    if isinstance(value, bool) or not math.isfinite(f) or not f.is_integer():
        raise ValueError(f"{what} must be a whole number, got {str(value)[:40]!r}")
    if not low <= int(f) <= high:
        raise ValueError(f"{what} must be between {low} and {high}, got {int(f)}")
    return int(f)


def degradation_name(value) -> str:
    name = "blur" if value is None or (isinstance(value, str) and not value.strip()) else value
    if not isinstance(name, str) or name.strip().lower() not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {str(name)[:40]!r}; expected one of {', '.join(DEGRADATIONS)}")
    return name.strip().lower()


def cold_model_name(degradation, model=None) -> str:
    """The restorer's name: ``model`` checked against the degradation's restorers, or its current one
    when ``model`` is empty."""
    names = COLD_MODELS[degradation_name(degradation)]
    if model is None or (isinstance(model, str) and not model.strip()):
        return names[0]
    if not isinstance(model, str) or model.strip().lower() not in names:
        raise ValueError(f"unknown {degradation_name(degradation)} model {str(model)[:40]!r}; expected one of {', '.join(names)}")
    return model.strip().lower()


def cold_model(registry, degradation, model=None):
    """The loaded restoration model (``cold_model_name``; ``ValueError`` when its checkpoint is missing)."""
    name = cold_model_name(degradation, model)
    if name not in registry.available():
        raise ValueError(f"the {degradation_name(degradation)} model ({name}.safetensors) is not installed")
    return registry.get(name)


@dataclass(frozen=True)
class ColdRestore:
    """Restore a digit blurred to ``level`` (an MNIST test digit ``index`` or an encoded ``drawing``)."""

    degradation: str = "blur"
    level: int = 20
    index: int | None = 0
    drawing: str | None = None
    model: str | None = None  # the restorer (cold_model_name); empty: the degradation's current one

    def validate(self, levels: int) -> ColdRestore:
        if (self.index is None) == (self.drawing is None):
            raise ValueError("give either an MNIST test digit index or a drawing")
        self.digit() if self.index is None else ex.test_digit(self.index)  # a clear error for a bad index or drawing
        index = None if self.index is None else int(float(self.index))
        return ColdRestore(degradation_name(self.degradation), _whole(self.level, "blur level", 0, levels), index, self.drawing,
                           cold_model_name(self.degradation, self.model))

    def digit(self) -> np.ndarray:
        return ex.test_digit(self.index) if self.drawing is None else ex.decode_digit(self.drawing)

    def to_json(self) -> str:
        return json.dumps({"kind": "cold_restore", **{k: v for k, v in asdict(self).items() if v is not None}}, indent=2)


def restore_view(registry, degradation=None, level=None, index=None, drawing=None, model=None) -> dict:
    """The strip (clean, degraded, naive, improved) and the numbers of a validated restoration
    (``model``: the restorer, empty for the degradation's current one)."""
    loaded = cold_model(registry, degradation, model)
    restorer = loaded.restorer()
    cr = ColdRestore(degradation or "blur", restorer.degradation.levels if level is None else level,
                     None if drawing is not None else (0 if index is None else index), drawing, model).validate(restorer.degradation.levels)
    digit = cr.digit()
    x0 = ex.to_model_space(digit)
    x_s, out = degrade_and_restore(restorer, x0, cr.level)
    mse = {name: float(((x - x0) ** 2).mean()) for name, x in out.items()}
    tiles = [digit, to_uint8(x_s)[0].numpy(), to_uint8(out["naive"])[0].numpy(), to_uint8(out["improved"])[0].numpy()]
    sigma = float(restorer.degradation.sigmas[cr.level])
    strip = labelled_strip([tiles], ["clean digit", f"blurred, level {cr.level}", "naive (Alg. 1)", "improved (Alg. 2)"], None,
                           scale=STRIP_SCALE)
    info = {"degradation": cr.degradation, "model": cr.model, "level": cr.level, "levels": restorer.degradation.levels, "blur_sigma_px": sigma,
            "mse_blurred": float(((x_s - x0) ** 2).mean()), "mse_naive": mse["naive"], "mse_improved": mse["improved"]}
    text = (f"`{cr.model}`, blur level {cr.level} of {restorer.degradation.levels} (σ = {sigma:.2f} px). Mean squared error against the clean "
            f"digit: blurred {info['mse_blurred']:.4f}, naive {mse['naive']:.4f}, improved {mse['improved']:.4f}. The naive "
            "sampler re-blurs its guess at every step, so its errors stay; the improved one adds only the change between two "
            "levels of its guess, so the next step corrects them.")
    return {"image": strip, "info": info, "text": text, "settings_json": cr.to_json(), "share_query": cold_share_query(json.loads(cr.to_json()))}


def generate_view(registry, degradation=None, seed=0, n=8, sampler="improved", model=None) -> dict:
    """``n`` digits restored from fully degraded starts drawn with ``seed``: a grid and the settings
    (``model``: the restorer, empty for the degradation's current one)."""
    degradation = degradation_name(degradation)
    name = cold_model_name(degradation, model)
    model = cold_model(registry, degradation, name)
    seed = Settings(seed=seed).validate().seed
    n = _whole(n, "number of images", 1, MAX_COLD_IMAGES)
    if not isinstance(sampler, str) or sampler.strip().lower() not in COLD_SAMPLER_NAMES:
        raise ValueError(f"unknown cold-diffusion sampler {str(sampler)[:40]!r}; expected one of {', '.join(COLD_SAMPLER_NAMES)}")
    sampler = sampler.strip().lower()
    start, x = generate_cold(model.restorer(), StartDistribution.from_dict(model.config["generation"]), n, seed, sampler)
    settings = {"kind": "cold_generate", "degradation": degradation, "seed": seed, "n": n, "sampler": sampler, "model": name}
    return {"image": render_grid(to_uint8(x).numpy()), "start": render_grid(to_uint8(start).numpy()),
            "settings_json": json.dumps(settings, indent=2), "share_query": cold_share_query(settings)}


# ---------------------------------------------------------------------------------------------
# Settings JSON and share links: a result comes back from either


COLD_FIELDS = {"cold_restore": ("degradation", "level", "index", "drawing", "model"), "cold_generate": ("degradation", "seed", "n", "sampler", "model")}


def cold_view(registry, settings: dict) -> dict:
    """A cold-diffusion settings object (``kind`` ``cold_restore`` or ``cold_generate``, as the panel
    and the API write it) -> the same view: the same pixels. Without a ``model`` the settings were
    written when the degradation had one restorer, so they mean that one (``FIRST_COLD_MODEL``)."""
    if not isinstance(settings, dict) or settings.get("kind") not in COLD_FIELDS:
        raise ValueError(f"these settings are not a cold-diffusion result (expected a JSON object with kind {' or '.join(COLD_FIELDS)})")
    kind = settings["kind"]
    fields = {k: v for k, v in settings.items() if k != "kind"}
    unknown = sorted(set(fields) - set(COLD_FIELDS[kind]))
    if unknown:
        raise ValueError(f"unknown {kind} settings {unknown}; expected some of {list(COLD_FIELDS[kind])}")
    if fields.get("model") is None:
        fields["model"] = FIRST_COLD_MODEL[degradation_name(fields.get("degradation"))]
    if kind == "cold_restore":
        if fields.get("drawing") is not None and fields.get("index") is not None:
            raise ValueError("give either an MNIST test digit index or a drawing")
        return restore_view(registry, **fields)
    return generate_view(registry, **fields)


def cold_from_json(registry, text) -> dict:
    """``cold_view`` of a settings JSON text (``ValueError`` with a clear message otherwise)."""
    if not isinstance(text, str) or len(text) > 10_000:
        raise ValueError("settings must be a JSON text of at most 10000 characters")
    return cold_view(registry, parse_json(text, "cold-diffusion settings"))


def cold_share_query(settings: dict) -> str:
    """``?v=1&tab=cold&cold=restore|generate&...``: opens Explore's cold panel and reproduces the result."""
    kind = settings["kind"]
    fields = [(k, str(settings[k])) for k in COLD_FIELDS[kind] if settings.get(k) is not None]
    return "?" + urlencode([("v", SHARE_VERSION), ("tab", "cold"), ("cold", kind.removeprefix("cold_"))] + fields, safe=":")


def cold_settings_from_link(fields) -> dict:
    """A cold link's fields (strings) -> the settings object it stands for, checked as far as can be
    without the model (the view checks the rest); ``ValueError`` otherwise."""
    what = fields.get("cold")
    kind = f"cold_{what}" if isinstance(what, str) else None
    if kind not in COLD_FIELDS:
        raise ValueError(f"a cold link needs cold=restore or cold=generate, got {str(what)[:20]!r}")
    stray = sorted(k for k in fields if k not in COLD_FIELDS[kind] + ("cold",))
    if stray:
        raise ValueError(f"{', '.join(stray)} {'does' if len(stray) == 1 else 'do'} not belong to a cold {what} link")
    given = {k: fields[k] for k in COLD_FIELDS[kind] if k in fields}
    degradation = degradation_name(given.get("degradation"))
    model = cold_model_name(degradation, given.get("model") or FIRST_COLD_MODEL[degradation])  # a link without one is older than the second
    if kind == "cold_restore":
        if ("index" in given) == ("drawing" in given):
            raise ValueError("a cold restore link needs either index or drawing")
        cr = ColdRestore(degradation, given.get("level", BlurConfig.levels), given.get("index"), given.get("drawing"), model).validate(BlurConfig.levels)
        return json.loads(cr.to_json())
    sampler = str(given.get("sampler", "improved")).strip().lower()
    if sampler not in COLD_SAMPLER_NAMES:
        raise ValueError(f"unknown cold-diffusion sampler {sampler[:40]!r}; expected one of {', '.join(COLD_SAMPLER_NAMES)}")
    return {"kind": kind, "degradation": degradation, "seed": Settings(seed=given.get("seed", 0)).validate().seed,
            "n": _whole(given.get("n", 8), "number of images", 1, MAX_COLD_IMAGES), "sampler": sampler, "model": model}


def build(shared, source, index, drawing) -> dict:
    """The panel inside the Explore tab: its components and events (the digit comes from the tab's
    ``source``, ``index`` and ``drawing``), a share link for each result, the endpoints
    ``/cold_restore``, ``/cold_generate`` and ``/cold_from_settings``, and a cold link's result on
    page load (``on_page_load``)."""
    from .controls import SAMPLING, SHARE_JS
    from .explore_tab import drawing_code
    from .files import png_files
    from .glue import user_errors

    registry, files = shared.registry, shared.files
    gr.Markdown(f"#### Cold diffusion: blur the digit and let `{COLD_MODELS['blur'][0]}` undo it (Bansal et al. 2023)")
    with gr.Row(equal_height=True):
        c = BlurConfig()
        level = gr.Slider(0, c.levels, value=c.levels, step=1, label=f"Blur level (0 clean, {c.levels}: σ = {c.sigma_max:g} px)", scale=3,
                          elem_id="cold_level")
        run = gr.Button("Restore", variant="primary", scale=1, min_width=120, elem_id="cold_run")
    text = gr.Markdown("", elem_id="cold_text")
    strip = gr.Image(show_label=False, format="png", interactive=False, elem_id="cold_strip", buttons=["download"])
    with gr.Row(equal_height=True):
        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", scale=2, elem_id="cold_seed")
        count = gr.Slider(1, MAX_COLD_IMAGES, value=8, step=1, label="Images", scale=2, elem_id="cold_n")
        sampler = gr.Radio(list(COLD_SAMPLER_NAMES), value="improved", label="Sampler", scale=2, elem_id="cold_sampler")
        gen = gr.Button("Generate from a full blur", scale=1, min_width=140, elem_id="cold_gen")
    with gr.Row():
        start = gr.Image(label="Fully blurred starts", format="png", interactive=False, elem_id="cold_start", elem_classes="pixelated")
        grid = gr.Image(label="Restored", format="png", interactive=False, elem_id="cold_grid", elem_classes="pixelated")
    with gr.Row():
        settings = gr.Code(label="Settings JSON", language="json", interactive=False, max_lines=12, elem_id="cold_json")
        link = gr.Textbox(label="Share link (opens this exact result)", buttons=["copy"], max_lines=2, elem_id="cold_link", interactive=False)
    query = gr.Textbox(visible=False)
    with gr.Row(visible=False):
        a_index, a_image = gr.Number(value=0, precision=0), gr.Image(type="numpy", image_mode="RGBA")
        a_level, a_degradation = gr.Number(value=BlurConfig.levels, precision=0), gr.Textbox(value="blur")
        a_seed, a_n, a_sampler, a_deg2 = gr.Number(value=0, precision=0), gr.Number(value=8, precision=0), gr.Textbox(value="improved"), gr.Textbox(value="blur")
        a_png, a_json, a_settings = gr.Image(format="png"), gr.Textbox(), gr.Textbox(label="settings_json")
        a_model, a_model2 = gr.Textbox(value=""), gr.Textbox(value="")

    @user_errors
    def panel_restore(src, idx, drawn, lvl):
        if src == "drawing" and not drawn:
            raise ValueError("draw a digit on the sketchpad (or pick an MNIST test digit)")
        code = drawing_code(drawn) if src == "drawing" else None
        v = restore_view(registry, "blur", lvl, None if code else idx, code)
        return png_files((v["image"], v["text"], v["settings_json"], v["share_query"]), files)

    @user_errors
    def panel_generate(s, k, name):
        v = generate_view(registry, "blur", s, k, name)
        return png_files((v["start"], v["image"], v["settings_json"], v["share_query"]), files)

    @user_errors
    def cold_restore(index, image=None, level=20, degradation="blur", model=""):
        """Cold diffusion: blur the digit (test digit `index`, or `image`: a drawn digit) to `level` (0..20) with `degradation`
        ("blur") and restore it with the naive and the improved sampler of Bansal et al. (`model`: the restorer, cold_blur_v2 or
        cold_blur; empty for the current one). Returns the PNG strip (clean, blurred, naive, improved) and JSON (mean squared errors)."""
        code = drawing_code(image) if image is not None else None
        v = restore_view(registry, degradation, level, None if code else index, code, model)
        return files.write("cold.png", png_bytes(v["image"])), json.dumps(v["info"], indent=2)

    @user_errors
    def cold_generate(seed=0, n=8, sampler="improved", degradation="blur", model=""):
        """Cold diffusion: `n` (1..16) digits restored by `sampler` (naive or improved) from fully degraded starts drawn with `seed`
        (`model`: the restorer, empty for the current one). Returns the grid PNG and its settings JSON."""
        v = generate_view(registry, degradation, seed, n, sampler, model)
        return files.write("cold_generate.png", png_bytes(v["image"])), v["settings_json"]

    @user_errors
    def cold_from_settings(settings_json):
        """Replay a cold-diffusion result from its settings JSON (kind cold_restore or cold_generate, as the panel shows it): the
        same PNG (/cold_restore's strip or /cold_generate's grid) and the settings JSON."""
        v = cold_from_json(registry, settings_json)
        name = "cold.png" if json.loads(v["settings_json"])["kind"] == "cold_restore" else "cold_generate.png"
        return files.write(name, png_bytes(v["image"])), v["settings_json"]

    def load(request: gr.Request):
        """On page load with a cold link: its controls and its result."""
        link_ = shared.link(request)
        skip = [gr.skip()] * 12
        if link_ is None or link_.tab != "cold":
            return skip
        v = cold_view(registry, link_.cold)
        d = json.loads(v["settings_json"])
        if d["kind"] == "cold_restore":
            src = "drawing" if d.get("drawing") else "mnist"
            controls = [src, d.get("index", 0) if src == "mnist" else gr.skip(), d.get("drawing") or gr.skip(), d["level"],
                        gr.skip(), gr.skip(), gr.skip()]
            outputs = [v["image"], v["text"], gr.skip(), gr.skip()]
        else:
            controls = [gr.skip(), gr.skip(), gr.skip(), gr.skip(), d["seed"], d["n"], d["sampler"]]
            outputs = [gr.skip(), gr.skip(), v["start"], v["image"]]
        return png_files(controls + outputs + [v["settings_json"]], files)

    run.click(panel_restore, [source, index, drawing, level], [strip, text, settings, query], concurrency_id=SAMPLING,
              api_visibility="private").then(None, query, link, js=SHARE_JS, api_visibility="private")
    gen.click(panel_generate, [seed, count, sampler], [start, grid, settings, query], concurrency_id=SAMPLING,
              api_visibility="private").then(None, query, link, js=SHARE_JS, api_visibility="private")
    hidden = gr.Button(visible=False)
    hidden.click(cold_restore, [a_index, a_image, a_level, a_degradation, a_model], [a_png, a_json], api_name="cold_restore", concurrency_id=SAMPLING)
    hidden.click(cold_generate, [a_seed, a_n, a_sampler, a_deg2, a_model2], [a_png, a_json], api_name="cold_generate", concurrency_id=SAMPLING)
    hidden.click(cold_from_settings, a_settings, [a_png, a_json], api_name="cold_from_settings", concurrency_id=SAMPLING)

    def on_page_load(loaded):
        loaded.success(load, None, [source, index, drawing, level, seed, count, sampler, strip, text, start, grid, settings],
                       concurrency_id=SAMPLING, api_visibility="private").then(
            lambda s: cold_share_query(json.loads(s)) if s else "", settings, query, api_visibility="private", queue=False).then(
            None, query, link, js=SHARE_JS, api_visibility="private")

    return {"level": level, "run": run, "strip": strip, "text": text, "grid": grid, "start": start, "settings": settings,
            "on_page_load": on_page_load}
