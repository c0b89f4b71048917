"""The Compare tab: one seed, several samplers / routings / guidance scales / DDIM etas / autoguidance weights, as a grid
of trajectories from the same starting noise; its settings JSON (``kind: "compare"``) and share link
reproduce the grid pixel for pixel (in the app, through the API and with ``diffusion_core.sample``)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from urllib.parse import urlencode

import gradio as gr
import numpy as np

from ..palette import expert_color
from ..pipeline import Settings, parse_json, start, to_uint8
from .common import (
    COMPARE_AXES,
    DEFAULT_GUIDANCES,
    MAX_COMPARE_ROWS,
    MENU_ROUTINGS,
    SAMPLER_LABELS,
    SAMPLER_NOTES,
    ModelInfo,
    _name,
    parse_settings,
    sampler_choices,
)
from .files import OutputFiles
from .glue import user_errors
from .render import labelled_strip, png_bytes, snapshot_indices, vp_frame
from .share import share_query

COMPARE_KIND = "compare"
COMPARE_COLUMNS = 8
DEFAULT_ETAS = "0, 0.25, 0.5, 1, ddpm, ddpm_nonoise"
ETA_AXIS_SAMPLERS = ("ddpm", "ddpm_nonoise")  # the eta axis's rows by sampler name, beside DDIM's etas
DEFAULT_AUTOGUIDANCES = "1, 1.5, 2, 2.5, 3"
ETA_NOTE = ("**Deterministic against stochastic.** DDIM with eta = 0 follows the probability-flow ODE: the same noise "
            "always gives the same digit. Eta > 0 adds fresh noise at every step (and removes as much signal), so "
            "trajectories from one seed drift apart and details are re-drawn; eta = 1 is DDPM's ancestral sampler "
            "(the *DDPM* row), which gives the same image as DDIM at eta = 1. " + SAMPLER_NOTES["ddpm_nonoise"])

def default_compare_values(axis: str, info: ModelInfo | None) -> str:
    if axis == "sampler":
        return ", ".join(s for _, s in sampler_choices() if s != "ddpm_nonoise")  # the broken one is on the eta axis
    if axis == "routing":
        return ", ".join(MENU_ROUTINGS)
    if axis == "eta":
        return DEFAULT_ETAS
    if axis == "autoguidance":
        return DEFAULT_AUTOGUIDANCES
    return DEFAULT_GUIDANCES


def parse_compare(models: Mapping[str, ModelInfo], base: Settings, axis, values, autoguide=None) -> list[Settings]:
    """The rows of a comparison: ``base`` with ``axis`` (sampler, routing, guidance or eta) set to each
    of ``values`` (a list, or a comma-separated text). One image per row. Raises ``ValueError``.

    On the ``eta`` axis every row runs DDIM with that eta, except the values ``ddpm`` and
    ``ddpm_nonoise``: rows of DDPM's ancestral sampler, with and without its noise, beside them.

    ``autoguide`` (the autoguidance axis; None or empty: the base's): what the guided rows compare
    the guide with. A base at weight 1 is unguided and so holds only the default, ``output``; this
    is how the *Autoguidance acts on* control still reaches the rows."""
    axis = _name(axis, "compare axis") if axis is not None else "sampler"
    if axis not in COMPARE_AXES:
        raise ValueError(f"unknown compare axis {axis!r}; expected one of {', '.join(COMPARE_AXES)}")
    info = models[base.model]
    if axis == "routing" and not info.is_mcl:
        raise ValueError(f"comparing routing strategies needs the MCL model, not {base.model!r}")
    if axis == "guidance" and not info.conditional:
        raise ValueError(f"comparing guidance scales needs a class-conditional model (cfg), not {base.model!r}")
    if axis == "autoguidance" and info.conditional:
        raise ValueError(f"comparing autoguidance weights needs an unconditional model (ddpm, mcl), not {base.model!r}")
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
    if axis == "autoguidance" and autoguide not in (None, ""):
        fields["autoguide"] = autoguide
    for v in values:
        try:
            if axis == "eta":
                named = v.strip().lower() if isinstance(v, str) and v.strip().lower() in ETA_AXIS_SAMPLERS else None
                row = dict(fields, sampler=named) if named else dict(fields, sampler="ddim", eta=v)
            else:
                row = dict(fields, **{axis: v})
            s = parse_settings(models, **row)
        except ValueError as e:
            raise ValueError(f"compare value {str(v)[:40]!r}: {e}") from None
        key = row_value(s, axis)
        if key not in seen:
            seen.add(key)
            rows.append(s)
    return rows


def row_value(s: Settings, axis: str) -> str:
    """A row's value on its axis, as ``parse_compare`` reads it back (exactly)."""
    if axis == "sampler":
        return s.sampler
    if axis == "routing":
        return s.routing
    if axis == "eta":
        return s.sampler if s.sampler in ETA_AXIS_SAMPLERS else repr(float(s.eta))
    if axis == "autoguidance":
        return repr(float(s.autoguidance))
    return repr(float(s.guidance))


def _row_label(s: Settings, axis: str) -> str:
    if axis == "sampler":
        return SAMPLER_LABELS.get(s.sampler, s.sampler)
    if axis == "routing":
        return s.routing
    if axis == "eta":
        return SAMPLER_LABELS[s.sampler] if s.sampler in ETA_AXIS_SAMPLERS else f"DDIM eta {s.eta:g}"
    if axis == "autoguidance":
        return f"autoguidance {s.autoguidance:g}"
    return f"guidance {s.guidance:g}"


def compare(registry, rows: list[Settings], axis: str, columns: int = COMPARE_COLUMNS, base: Settings | None = None) -> tuple[np.ndarray, dict]:
    """A grid of trajectories (RGB): one row per settings, columns from the shared starting noise
    through evenly spaced steps to the final image. Returns (image, settings): ``compare_meta``,
    which ``compare_from_json`` reads back (``base`` defaults to the first row)."""
    axis = _name(axis, "compare axis")
    tiles, borders, any_border = [], [], False
    steps = rows[0].steps
    idx = snapshot_indices(steps, columns - 1)
    for s in rows:
        model, gate = registry.for_settings(s)
        guide = registry.guide_for(s, model)
        run = start(s, model, gate, guide=guide)
        row, brow = [to_uint8(run.noise).numpy()[0]], [None]
        states = {}
        for step in run.steps:
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
    return img, compare_meta(base or rows[0], axis, rows, columns)


def compare_meta(base: Settings, axis: str, rows: list[Settings], columns: int = COMPARE_COLUMNS) -> dict:
    """A comparison's settings: the base settings, the axis and its values (what replays it) and,
    for reading, each row's full settings."""
    b = Settings(**base.to_dict())
    b.n = 1
    meta = {"kind": COMPARE_KIND, "axis": axis, "values": [row_value(s, axis) for s in rows], "base": b.to_dict(),
            "columns": columns, "rows": [s.to_dict() for s in rows]}
    of = rows_autoguide(base, axis, rows)
    if of is not None:  # only where the base cannot say it: a comparison without the field replays as before
        meta["autoguide"] = of
    return meta


def rows_autoguide(base: Settings, axis: str, rows: list[Settings]) -> str | None:
    """What the guided rows of an autoguidance comparison compare the guide with, when the base
    settings cannot say it (a base at weight 1 keeps only ``output``); None otherwise."""
    if axis != "autoguidance":
        return None
    of = next((r.autoguide for r in rows if r.autoguidance != 1), base.autoguide)
    return of if of != base.autoguide else None


def compare_json(meta: dict) -> str:
    return json.dumps(meta, indent=2, sort_keys=True)


def compare_from_json(models: Mapping[str, ModelInfo], text: str) -> tuple[Settings, str, list[Settings], int]:
    """A comparison's settings JSON (as the app shows it) -> (base, axis, rows, columns), validated
    as the app does; ``ValueError`` with a clear message otherwise."""
    if not isinstance(text, str) or len(text) > 50_000:
        raise ValueError("comparison settings must be a JSON text of at most 50000 characters")
    return compare_from_dict(models, parse_json(text, "comparison settings"))


def compare_from_dict(models: Mapping[str, ModelInfo], d) -> tuple[Settings, str, list[Settings], int]:
    if not isinstance(d, dict) or d.get("kind") != COMPARE_KIND:
        raise ValueError(f"these settings are not a comparison (expected a JSON object with kind {COMPARE_KIND!r})")
    unknown = sorted(set(d) - {"kind", "axis", "values", "base", "columns", "rows", "autoguide"})
    if unknown:
        raise ValueError(f"unknown comparison settings {unknown}")
    if not isinstance(d.get("base"), dict) or not isinstance(d.get("values"), list):
        raise ValueError("a comparison needs 'base' (settings) and 'values' (a list)")
    columns = d.get("columns", COMPARE_COLUMNS)
    if isinstance(columns, bool) or not isinstance(columns, int) or not 2 <= columns <= 32:
        raise ValueError(f"columns must be a whole number between 2 and 32, got {columns!r}")
    base = Settings.from_dict(d["base"])
    base = parse_settings(models, **dict(base.to_dict(), n=1))
    values = [str(v) if not isinstance(v, str) else v for v in d["values"]]
    autoguide = d.get("autoguide")
    if autoguide is not None and not isinstance(autoguide, str):
        raise ValueError(f"autoguide must be a name (output or mixture), got {str(autoguide)[:40]!r}")
    rows = parse_compare(models, base, d.get("axis"), values, autoguide)
    return base, _name(d.get("axis"), "compare axis"), rows, columns


def compare_share_query(base: Settings, info: ModelInfo, axis: str, rows: list[Settings]) -> str:
    """``?v=1&tab=compare&axis=...&values=...`` and the base settings: opens the Compare tab and reproduces the grid."""
    b = Settings(**base.to_dict())
    b.n = 1
    q = share_query(b, info)
    extra = [("tab", "compare"), ("axis", axis), ("values", ",".join(row_value(s, axis) for s in rows))]
    of = rows_autoguide(base, axis, rows)
    if of is not None:  # share_query writes autoguide only beside a weight other than 1
        extra.append(("autoguide", of))
    return q + "&" + urlencode(extra, safe=":,")


def compare_files(registry, files: OutputFiles, models, base: Settings, axis: str, rows: list[Settings], columns: int = COMPARE_COLUMNS):
    """The comparison as the app hands it out: (PNG path, settings JSON, JSON path, share query);
    the PNG is the one the CLI writes, byte for byte."""
    img, meta = compare(registry, rows, axis, columns=columns, base=base)
    text = compare_json(meta)
    png = files.write("compare.png", png_bytes(img))
    js = files.write("compare.json", (text + "\n").encode())
    return png, text, js, compare_share_query(base, models[base.model], axis, rows)


AXIS_LABELS = {"sampler": "samplers", "eta": "DDIM eta (and DDPM)", "routing": "routing strategies", "guidance": "guidance scales",
               "autoguidance": "autoguidance weights"}


def axis_choices(info: ModelInfo | None) -> list[tuple[str, str]]:
    """The axes that apply to a model: samplers and etas always, routings for MCL, guidance for a
    class-conditional model, autoguidance for an unconditional one."""
    axes = ["sampler", "eta"]
    if info and info.is_mcl:
        axes.append("routing")
    if info and info.conditional:
        axes.append("guidance")
    if info and not info.conditional:
        axes.append("autoguidance")
    return [(AXIS_LABELS[a], a) for a in axes]


# ---------------------------------------------------------------------------------------------
# Layout and events


def build(shared, tab) -> dict:
    """The Compare tab's components (inside ``tab``) and events; a compare link fills it on page load."""
    from .controls import SAMPLING, SHARE_JS

    s = shared
    gr.Markdown("One seed, several strategies side by side. Rows: strategy; columns: denoising steps from the same "
                "initial noise. The other settings (model, seed, steps, digit...) come from the controls on the left.")
    with gr.Row(equal_height=False):
        axis = gr.Radio(axis_choices(None), value="sampler", label="Compare", scale=2, elem_id="axis")
        values = gr.Textbox(value=default_compare_values("sampler", None), label="Values (comma-separated)", scale=3, elem_id="values")
        button = gr.Button("Compare", variant="primary", scale=1, min_width=120, elem_id="compare_btn")
    image = gr.Image(label="Trajectories", show_label=False, format="png", interactive=False, elem_id="compare_img", buttons=["download", "fullscreen"])
    gr.Markdown(ETA_NOTE)
    with gr.Accordion("Share and reproduce", open=True):
        link = gr.Textbox(label="Share link (opens this exact comparison)", buttons=["copy"], max_lines=2, elem_id="compare_link", interactive=False)
        with gr.Row():
            settings_json = gr.Code(label="Settings JSON", language="json", interactive=False, max_lines=14, elem_id="compare_json")
            downloads = gr.File(label="Downloads: PNG, settings", file_count="multiple", interactive=False, elem_id="compare_files")
        gr.Markdown("Replay from the command line (the same PNG): `python -m diffusion_core.sample --settings compare.json --grid grid.png`")
    query = gr.Textbox(visible=False)
    outputs = [image, settings_json, downloads, query]

    @user_errors
    def run(axis_value, values_text, *controls):
        models = s.models()
        base = s.settings(models, *controls[:8], 1, *controls[9:])
        rows = parse_compare(models, base, axis_value, values_text, autoguide=controls[-1])  # Shared.controls ends with autoguide
        png, text, js, q = compare_files(s.registry, s.files, models, base, axis_value, rows)
        return png, text, [png, js], q

    @user_errors
    def load(request: gr.Request):
        """On page load with a compare link: the comparison it holds."""
        link_ = s.link(request)
        if link_ is None or link_.tab != "compare":
            return [gr.skip()] * 4
        png, text, js, q = compare_files(s.registry, s.files, s.models(), link_.settings, link_.axis, link_.rows)
        return png, text, [png, js], q

    def axis_updates(model_name, axis_value):
        info = s.models().get(model_name)
        choices = axis_choices(info)
        axis_value = axis_value if axis_value in [c[1] for c in choices] else "sampler"
        return gr.update(choices=choices, value=axis_value), default_compare_values(axis_value, info)

    s.model.change(axis_updates, [s.model, axis], [axis, values], api_visibility="private", queue=False)
    axis.input(lambda m, a: default_compare_values(a, s.models().get(m)), [s.model, axis], values, api_visibility="private", queue=False)
    button.click(run, [axis, values] + s.controls, outputs, api_visibility="private", concurrency_id=SAMPLING).then(
        None, query, link, js=SHARE_JS, api_visibility="private")
    tab.select(lambda: "compare", None, s.active_tab, api_visibility="private", queue=False)

    def on_page_load(loaded):
        loaded.success(load, None, outputs, concurrency_id=SAMPLING, api_visibility="private").then(
            None, query, link, js=SHARE_JS, api_visibility="private")

    return {"axis": axis, "values": values, "axis_updates": axis_updates, "on_page_load": on_page_load}
