"""Gradio demo: watch an MNIST digit emerge from noise, compare samplers/routings/guidance/autoguidance/eta,
explore the forward process, one-step denoising and SDEdit, share any result.

Run locally with ``python app.py`` (http://127.0.0.1:7860); on Hugging Face Spaces this file is the
``app_file``. Layout and event wiring only: the logic lives in ``diffusion_core.ui``.

Environment: ``DIFFUSION_CHECKPOINT_DIR`` (where checkpoints are looked up, default checkpoints/),
``APP_CONCURRENCY`` (sampling requests run at once, default 2), ``APP_QUEUE_SIZE`` (requests
waiting at most, default 64), ``APP_TORCH_THREADS`` (CPU threads per request, default all cores),
``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``.
"""
from __future__ import annotations

import json
import os
import secrets

import gradio as gr
import torch

from diffusion_core import ui
from diffusion_core.pipeline import DEFAULT_GUIDES, MAX_AUTOGUIDANCE, MAX_GUIDANCE, MAX_STEPS, Settings
from diffusion_core.registry import ModelRegistry
from diffusion_core.ui import cold_panel
from diffusion_core.ui.common import sampler_help

registry = ModelRegistry()
files = ui.OutputFiles()
D = Settings()
CONCURRENCY = int(os.environ.get("APP_CONCURRENCY", "2"))
QUEUE_SIZE = int(os.environ.get("APP_QUEUE_SIZE", "64"))
# Each request may use every core: a lone visitor (the usual case) gets the fastest images, and two
# requests at once still share the cores well (README, Benchmarks: measured against one thread each).
torch.set_num_threads(int(os.environ.get("APP_TORCH_THREADS", os.cpu_count() or 1)))
SAMPLING = "sampling"  # one concurrency group for every event that runs a model

CSS = """
.pixelated img { image-rendering: pixelated; object-fit: contain; max-width: 100%; max-height: 100%; }
#status { min-height: 1.8em; }
.model-cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 14px; }
.model-card { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 12px 16px;
              background: var(--block-background-fill); }
.model-card h3 { margin: 0 0 4px 0; }
.model-card h4 { margin: 10px 0 2px 0; font-size: 0.9em; color: var(--body-text-color-subdued); }
.model-card .blurb { margin: 0 0 6px 0; font-size: 0.9em; }
.model-card table { width: 100%; font-size: 0.88em; border-collapse: collapse; margin: 0; }
.model-card table, .model-card tr, .model-card th, .model-card td { border: none !important; background: none !important; }
.model-card th { text-align: left; font-weight: normal; color: var(--body-text-color-subdued); width: 40%; padding: 1px 6px 1px 0 !important; }
.model-card td { padding: 1px 0 !important; }
.model-card .none { font-size: 0.88em; color: var(--body-text-color-subdued); margin: 0; }
#ex_sketch { max-width: 320px; }
.model-card .history { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-end; }
.model-card .history-grid { margin: 0; text-align: center; font-size: 0.8em; color: var(--body-text-color-subdued); }
.model-card .history-grid img { width: 140px; image-rendering: pixelated; }
"""

INTRO = """
# Diffusion models on MNIST
Watch a handwritten digit emerge from pure noise. Pick a model and a sampler, press **Generate**,
and follow the current noisy image and the model's guess of the clean image at every step.
**CFG** draws the digit you ask for (guidance sets how strongly); **Flow** does the same with
rectified flow; **MCL** is an ensemble of expert denoisers, and the chart shows which expert worked
at each step. The unconditional **DDPM** and **MCL** have no digit to steer by: *guidance without
labels* steers them away from a weaker version of themselves (autoguidance). **Explore** shows how a digit dissolves into noise, what the
model makes of it in one step, and carries your own digit back from noise (SDEdit).
Every image comes back from its settings: share the link to show someone exactly the same thing.
"""

API_DOC = """
### API
Named endpoints, callable with `gradio_client` (see *Use via API* at the bottom of the page):
`/generate` (settings → final image PNG + settings JSON; `autoguidance` and `guide` for the
unconditional models; an empty `guidance` or `autoguidance` is the app's for the model),
`/generate_from_settings` (settings JSON → the same), `/compare` (one seed, several samplers /
routings / guidance scales / autoguidance weights / DDIM etas → grid PNG + JSON), `/compare_from_settings` (that JSON → the same grid), `/explore_forward` (a digit at a noise
level under the linear, cosine and flow schedules), `/explore_denoise` (one-step denoising and its
error), `/sdedit` and `/sdedit_from_settings` (SDEdit / inpainting of a test digit or an image of a
digit), `/open_link` (a share link → its tab and settings JSON, or why it is malformed).

```python
from gradio_client import Client
client = Client("http://127.0.0.1:7860/")
png_path, settings_json = client.predict(model="cfg", digit=7, guidance=2.0, sampler="dpmpp_2m",
                                         steps=16, seed=0, n=4, api_name="/generate")
```
Every settings JSON (Generate's, Compare's, SDEdit's) also replays on the command line:
`python -m diffusion_core.sample --settings settings.json --out samples.npz --grid samples.png`.
"""

EXPLORE_INTRO = """
**Noise level t**: 0 is the clean digit, 1 pure noise, each schedule in its own convention (DDPM: the
fraction of the 1000 training steps; rectified flow: x_t = (1 - t) x0 + t noise). Every image here uses
the noise of the seed on the left, so the same t under the three schedules shows the same noise at
different strengths. *One-step denoising* and *SDEdit* use the model, digit, guidance and routing on
the left (the digit is the one guidance steers towards: pick 8 and turn a 3 into an 8); they run the
model without autoguidance.
"""


def _models():
    return ui.available_models(registry)


def _shared(info) -> bool:
    return bool(info and info.shared)


def _default_model(models) -> str | None:
    return D.model if D.model in models else next(iter(models), None)


def _control_updates(model_name, sampler_name, routing_value=None):
    """Show only the controls that apply to the model and sampler."""
    models = _models()
    info = models.get(model_name)
    v = ui.visibility(info, sampler_name)
    choices = ui.routing_choices(v.num_experts, keep=routing_value)
    values = [c[1] for c in choices]
    routing_value = routing_value if routing_value in values else D.routing
    return (gr.update(visible=v.digit), gr.update(visible=v.guidance),
            gr.update(visible=v.routing, choices=choices, value=routing_value, info=ui.routing_help(routing_value, _shared(info))),
            gr.update(visible=v.eta), gr.update(visible=bool(info and info.is_flow)),
            gr.update(visible=v.autoguidance), gr.update(visible=v.autoguidance, choices=ui.guide_names(models)))


def _compare_axis_updates(model_name, axis):
    info = _models().get(model_name)
    axes = [("samplers", "sampler"), ("DDIM eta (and DDPM)", "eta")]
    if info and info.is_mcl:
        axes.append(("routing strategies", "routing"))
    if info and info.conditional:
        axes.append(("guidance scales", "guidance"))
    if info and not info.conditional:
        axes.append(("autoguidance weights", "autoguidance"))
    values = [a[1] for a in axes]
    axis = axis if axis in values else "sampler"
    return gr.update(choices=axes, value=axis), ui.default_compare_values(axis, info)


def _api_default(models, model, value, default):
    """An API value as given, or (None, empty) ``default(info)`` for the model: the app's guidance or autoguidance for it."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default(models.get(model if isinstance(model, str) else D.model))
    return value


def _api_guidance(models, model, value):
    return _api_default(models, model, value, ui.default_guidance)


def _api_autoguidance(models, model, value):
    return _api_default(models, model, value, ui.default_autoguidance)


def _settings(models, model, digit, guidance, sampler, steps, eta, routing, seed, n, autoguidance=None, guide=None):
    return ui.parse_settings(models, model=model, digit=digit, guidance=guidance, sampler=sampler, steps=steps, eta=eta,
                             routing=routing, seed=seed, n=n, autoguidance=autoguidance, guide=guide)


with gr.Blocks(title="Diffusion on MNIST", delete_cache=(3600, 3600)) as demo:
    gr.Markdown(INTRO)
    models0 = _models()
    m0 = _default_model(models0)
    v0 = ui.visibility(models0.get(m0), D.sampler)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            model = gr.Radio(ui.model_choices(models0), value=m0, label="Model", elem_id="model")
            digit = gr.Radio(ui.digit_choices(), value="any", label="Digit", info="'any' cycles 0-9 over the images", visible=v0.digit, elem_id="digit")
            guidance = gr.Slider(0, MAX_GUIDANCE, value=ui.default_guidance(models0.get(m0)), step=0.1, label="Guidance scale",
                                 info="0 unconditional, 1 conditional, >1 guided", visible=v0.guidance, elem_id="guidance")
            autoguidance = gr.Slider(0, MAX_AUTOGUIDANCE, value=ui.default_autoguidance(models0.get(m0)), step=0.1, label="Guidance without labels (autoguidance)",
                                     info=ui.AUTOGUIDANCE_HELP, visible=v0.autoguidance, elem_id="autoguidance")
            guide = gr.Dropdown(ui.guide_names(models0), value=DEFAULT_GUIDES["ddpm"], label="Weak model (the guide)",
                                visible=v0.autoguidance, elem_id="guide", allow_custom_value=True)  # parse_settings validates it
            routing = gr.Dropdown(ui.routing_choices(v0.num_experts), value=D.routing, label="Routing (which expert denoises)",
                                  info=ui.routing_help(D.routing, _shared(models0.get(m0))), visible=v0.routing, elem_id="routing",
                                  allow_custom_value=True)  # any routing by name (API, links); parse_settings validates it
            sampler = gr.Dropdown(ui.sampler_choices(), value=D.sampler, label="Sampler", elem_id="sampler")
            steps = gr.Slider(1, MAX_STEPS, value=D.steps, step=1, label="Steps", elem_id="steps")
            eta = gr.Slider(0, 1, value=D.eta, step=0.05, label="DDIM eta", info="0 deterministic, 1 like DDPM", visible=v0.eta, elem_id="eta")
            with gr.Row(equal_height=True):
                seed = gr.Textbox(value=str(D.seed), label="Seed", scale=4, max_lines=1, elem_id="seed")
                dice = gr.Button("Random", scale=1, min_width=70, size="lg", elem_id="dice")
            n = gr.Slider(1, ui.MAX_IMAGES, value=D.n, step=1, label="Number of images", elem_id="n")
            run = gr.Button("Generate", variant="primary", size="lg", elem_id="run")
        with gr.Column(scale=3):
            with gr.Tabs(selected="generate") as tabs:
                with gr.Tab("Generate", id="generate") as generate_tab:
                    status = gr.Markdown("", elem_id="status")
                    with gr.Row():
                        noisy = gr.Image(label="Current noisy image x_t", format="png", interactive=False, height=260,
                                         elem_id="noisy", elem_classes="pixelated", buttons=[])
                        velocity = gr.Image(label="Predicted velocity v = noise - x0 (blue < 0 < red)", format="png", interactive=False,
                                            height=260, elem_id="velocity", elem_classes="pixelated", buttons=[],
                                            visible=bool(models0.get(m0) and models0[m0].is_flow))
                        denoised = gr.Image(label="Predicted clean image", format="png", interactive=False, height=260,
                                            elem_id="denoised", elem_classes="pixelated", buttons=[])
                        final = gr.Image(label="Final image", format="png", interactive=False, height=260,
                                         elem_id="final", elem_classes="pixelated", buttons=["download", "fullscreen"])
                    gr.Markdown("**Filmstrip:** from noise to digit" , elem_classes="caption")
                    filmstrip = gr.Image(label="Filmstrip", show_label=False, format="png", interactive=False,
                                         elem_id="filmstrip", buttons=["download"])
                    chart = gr.Plot(label="Experts at each step", show_label=False, format="png", visible=False, elem_id="chart")
                    chart_caption = gr.Markdown("", elem_id="chart_caption", elem_classes="caption")
                    with gr.Accordion("Share and reproduce", open=True):
                        share_link = gr.Textbox(label="Share link (opens this exact image)", buttons=["copy"], max_lines=2,
                                                elem_id="share_link", interactive=False)
                        with gr.Row():
                            settings_json = gr.Code(label="Settings JSON", language="json", interactive=False, elem_id="settings_json", max_lines=14)
                            downloads = gr.File(label="Downloads: PNG, GIF, settings", file_count="multiple", interactive=False)
                        gr.Markdown(f"Replay from the command line: `{ui.cli_command()}`")
                    share_query = gr.Textbox(visible=False)
                with gr.Tab("Compare", id="compare") as compare_tab:
                    gr.Markdown("One seed, several strategies side by side. Rows: strategy; columns: denoising steps from the same "
                                "initial noise. The other settings (model, seed, steps, digit...) come from the controls on the left.")
                    with gr.Row(equal_height=False):
                        axis = gr.Radio([("samplers", "sampler"), ("DDIM eta (and DDPM)", "eta")], value="sampler", label="Compare", scale=2, elem_id="axis")
                        values = gr.Textbox(value=ui.default_compare_values("sampler", None), label="Values (comma-separated)", scale=3, elem_id="values")
                        compare_btn = gr.Button("Compare", variant="primary", scale=1, min_width=120, elem_id="compare_btn")
                    compare_img = gr.Image(label="Trajectories", show_label=False, format="png", interactive=False, elem_id="compare_img", buttons=["download", "fullscreen"])
                    gr.Markdown(ui.ETA_NOTE)
                    with gr.Accordion("Share and reproduce", open=True):
                        compare_link = gr.Textbox(label="Share link (opens this exact comparison)", buttons=["copy"], max_lines=2,
                                                  elem_id="compare_link", interactive=False)
                        with gr.Row():
                            compare_json = gr.Code(label="Settings JSON", language="json", interactive=False, max_lines=14, elem_id="compare_json")
                            compare_files = gr.File(label="Downloads: PNG, settings", file_count="multiple", interactive=False, elem_id="compare_files")
                        gr.Markdown("Replay from the command line (the same PNG): `python -m diffusion_core.sample --settings compare.json --grid grid.png`")
                    compare_query = gr.Textbox(visible=False)
                with gr.Tab("Explore", id="explore") as explore_tab:
                    gr.Markdown(EXPLORE_INTRO)
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=1, min_width=300):
                            ex_source = gr.Radio([("MNIST test digit", "mnist"), ("my drawing", "drawing")], value="mnist", label="Digit to explore",
                                                 elem_id="ex_source")
                            with gr.Row(equal_height=True):
                                ex_index = gr.Number(value=0, precision=0, minimum=0, maximum=999, label="Test digit index (0-999)", scale=3, elem_id="ex_index")
                                ex_random = gr.Button("Random digit", scale=1, min_width=90, elem_id="ex_random")
                            ex_sketch = gr.Sketchpad(label="Draw a digit: pick the brush, then draw", type="numpy", image_mode="RGBA", canvas_size=(280, 280),
                                                     fixed_canvas=True, layers=False, transforms=(), elem_id="ex_sketch", format="png",
                                                     brush=gr.Brush(colors=["#000000"], default_color="#000000", default_size=22, color_mode="fixed"))
                            ex_drawing = gr.Textbox(visible=False, elem_id="ex_drawing")
                        with gr.Column(scale=2):
                            ex_level = gr.Slider(0, 1, value=0.5, step=0.01, label="Noise level t (0 clean, 1 pure noise)", elem_id="ex_level")
                            gr.Markdown("#### Forward process: the digit at noise level t under each schedule")
                            ex_T = gr.Radio([200, 1000, 5000], value=1000, label="Linear schedule length T (betas scaled so alpha-bar_T = 1e-5)",
                                            elem_id="ex_T")
                            ex_forward = gr.Image(show_label=False, format="png", interactive=False, elem_id="ex_forward", buttons=["download"])
                            ex_schedule = gr.Plot(show_label=False, format="png", elem_id="ex_schedule")
                    gr.Markdown("#### One-step denoising: the model's guess of the clean digit from x_t, in one network call")
                    ex_denoise_text = gr.Markdown("", elem_id="ex_denoise_text")
                    with gr.Row(equal_height=False):
                        ex_denoise = gr.Image(show_label=False, format="png", interactive=False, elem_id="ex_denoise", buttons=["download"])
                        ex_error = gr.Plot(show_label=False, format="png", elem_id="ex_error")
                    gr.Markdown("#### Your own digit: noise it to level t and let the model carry it back (SDEdit)")
                    with gr.Row(equal_height=True):
                        ex_region = gr.Dropdown(ui.region_choices(), value="none", label="Repaint only (inpainting)", scale=2, elem_id="ex_region")
                        ex_run = gr.Button("Carry it back", variant="primary", scale=1, min_width=140, elem_id="ex_run")
                    ex_status = gr.Markdown("", elem_id="ex_status")
                    with gr.Row():
                        ex_noisy = gr.Image(label="Current x_t", format="png", interactive=False, height=240, elem_id="ex_noisy",
                                            elem_classes="pixelated", buttons=[])
                        ex_velocity = gr.Image(label="Predicted velocity (blue < 0 < red)", format="png", interactive=False, height=240,
                                               elem_id="ex_velocity", elem_classes="pixelated", buttons=[],
                                               visible=bool(models0.get(m0) and models0[m0].is_flow))
                        ex_denoised = gr.Image(label="Predicted clean image", format="png", interactive=False, height=240,
                                               elem_id="ex_denoised", elem_classes="pixelated", buttons=[])
                        ex_final = gr.Image(label="Result", format="png", interactive=False, height=240, elem_id="ex_final",
                                            elem_classes="pixelated", buttons=["download", "fullscreen"])
                    ex_strip = gr.Image(show_label=False, format="png", interactive=False, elem_id="ex_strip", buttons=["download"])
                    with gr.Accordion("Share and reproduce", open=True):
                        ex_link = gr.Textbox(label="Share link (opens this exact result)", buttons=["copy"], max_lines=2, elem_id="ex_link",
                                             interactive=False)
                        with gr.Row():
                            ex_json = gr.Code(label="Settings JSON", language="json", interactive=False, max_lines=16, elem_id="ex_json")
                            ex_files = gr.File(label="Downloads: PNG, settings", file_count="multiple", interactive=False, elem_id="ex_files")
                        gr.Markdown(f"Replay from the command line (the same PNG): `{ui.sdedit_cli_command()}`")
                    ex_query = gr.Textbox(visible=False)
                    cold_panel.build(registry, files, ex_source, ex_index, ex_drawing, SAMPLING)
                with gr.Tab("Models", id="models") as models_tab:
                    cards = gr.HTML(ui.model_cards(registry))
                with gr.Tab("API", id="api") as api_tab:
                    gr.Markdown(API_DOC)

    # API-only inputs and outputs: lenient components, so every check (and message) is ui.parse_settings'.
    with gr.Column(visible=False):
        a_model = gr.Textbox(value=D.model, label="model")
        a_digit = gr.Textbox(value="any", label="digit")
        a_guidance = gr.Textbox(value="", label="guidance (empty: the app's scale for the model)")
        a_sampler = gr.Textbox(value=D.sampler, label="sampler")
        a_steps = gr.Number(value=D.steps, label="steps")
        a_eta = gr.Number(value=D.eta, label="eta")
        a_routing = gr.Textbox(value=D.routing, label="routing")
        a_autoguidance = gr.Textbox(value="", label="autoguidance (empty: the app's weight for the model)")
        a_guide = gr.Textbox(value="", label="guide")
        a_seed = gr.Number(value=D.seed, label="seed")
        a_n = gr.Number(value=D.n, label="n")
        a_axis = gr.Textbox(value="sampler", label="axis")
        a_values = gr.Textbox(value="", label="values")
        a_json = gr.Textbox(value=D.to_json(), label="settings_json")
        a_index = gr.Number(value=0, label="index")
        a_drawn = gr.Image(type="numpy", image_mode="RGBA", format="png", label="image (a drawn digit; empty: the test digit `index`)")
        a_level = gr.Number(value=0.5, label="level")
        a_region = gr.Textbox(value="none", label="region")
        a_link = gr.Textbox(value="", label="link")
        a_image = gr.Image(format="png", label="image")
        a_settings = gr.Textbox(label="settings")
        a_tab = gr.Textbox(label="tab")
        a_T = gr.Number(value=1000, label="T", precision=0)
        a_button = gr.Button()

    active_tab = gr.State("generate")  # the Explore view is computed only while its tab is open
    controls = [model, digit, guidance, sampler, steps, eta, routing, seed, n, autoguidance, guide]
    edit_controls = controls[:9]  # Explore runs the model alone (no autoguidance)
    api_controls = [a_model, a_digit, a_guidance, a_sampler, a_steps, a_eta, a_routing, a_seed, a_n, a_autoguidance, a_guide]
    api_compare_controls = [a_model, a_digit, a_guidance, a_sampler, a_steps, a_eta, a_routing, a_seed, a_autoguidance, a_guide]
    api_edit_controls = api_controls[:8]
    outputs = {"noisy": noisy, "denoised": denoised, "status": status, "final": final, "settings_json": settings_json,
               "share_query": share_query, "filmstrip": filmstrip, "downloads": downloads, "velocity": velocity,
               "chart_caption": chart_caption}
    ex_outputs = {"noisy": ex_noisy, "denoised": ex_denoised, "velocity": ex_velocity, "status": ex_status, "final": ex_final,
                  "strip": ex_strip, "settings_json": ex_json, "share_query": ex_query, "downloads": ex_files}
    view_outputs = [ex_forward, ex_schedule, ex_denoise, ex_error, ex_denoise_text]

    def _link(request):
        """The page's share link, parsed (None when it is malformed: check_link reports that)."""
        models = _models()
        try:
            return ui.parse_link(models, request.query_params if request else None, _default_model(models))
        except ValueError:
            return None

    def _streamed(updates):
        """A streaming handler's updates as Gradio should get them: every chunk repeats the outputs set so far (``ui.carry_forward``),
        images go out as PNG files (``ui.png_files``)."""
        return ui.carry_forward(ui.png_files(u, files) for u in updates)

    # ----- Generate

    @ui.user_errors
    def generate_stream(*values):
        models = _models()
        s = _settings(models, *values)
        yield from _streamed(_generate_updates(s, models[s.model]))

    def _generate_updates(s, info):
        first = True
        for update in ui.stream(registry, s, info, files):
            out = {outputs[k]: v for k, v in update.items() if k in outputs}
            if "chart" in update:
                out[chart] = gr.Plot(value=update["chart"], visible=update["chart"] is not None)
            if first:  # clear the previous results while the new ones stream in
                out.update({final: None, filmstrip: None, downloads: None, share_query: "", chart: gr.Plot(visible=False), velocity: None,
                            chart_caption: ""})
                first = False
            yield out

    def load_generate(model, digit, guidance, sampler, steps, eta, routing, seed, n, autoguidance, guide, request: gr.Request):
        """On page load: generate, unless the link opens another tab."""
        link = _link(request)
        if link is None or link.tab != "generate":
            yield {status: gr.skip()}
            return
        yield from generate_stream(model, digit, guidance, sampler, steps, eta, routing, seed, n, autoguidance, guide)

    @ui.user_errors
    def generate(model, digit, guidance, sampler, steps, eta, routing, seed, n, autoguidance=None, guide=""):
        """Generate images: the final image (a PNG grid, 224x224 pixels per image, 4 pixels apart) and the settings JSON.
        `autoguidance` (unconditional models: 1 is the model alone; empty: the app's weight) and `guide` (its weak model;
        empty: the default) steer without labels."""
        models = _models()
        guidance, autoguidance = _api_guidance(models, model, guidance), _api_autoguidance(models, model, autoguidance)
        s = _settings(models, model, digit, guidance, sampler, steps, eta, routing, seed, n, autoguidance, guide)
        return ui.png_files(ui.generate_image(registry, s, models[s.model]), files), s.to_json()

    @ui.user_errors
    def generate_from_settings(settings_json):
        """Generate from a settings JSON (as returned by /generate or shown in the app): the same image and settings."""
        models = _models()
        s = ui.settings_from_json(models, settings_json)
        return ui.png_files(ui.generate_image(registry, s, models[s.model]), files), s.to_json()

    # ----- Compare

    def _compare_files(base, axis, rows, columns=8):
        models = _models()
        img, meta = ui.compare(registry, rows, axis, columns=columns, base=base)
        text = ui.compare_json(meta)
        png = files.write("compare.png", ui.png_bytes(img))  # the PNG the CLI writes, byte for byte
        js = files.write("compare.json", (text + "\n").encode())
        return png, text, js, ui.compare_share_query(base, models[base.model], axis, rows)

    @ui.user_errors
    def run_compare(axis, values, model, digit, guidance, sampler, steps, eta, routing, seed, autoguidance=None, guide=""):
        """Compare strategies from one seed: rows are the values of `axis` (sampler, routing, guidance, autoguidance or eta: DDIM etas,
        and 'ddpm' for DDPM's sampler), columns are denoising steps. Returns the grid PNG and the comparison's settings JSON."""
        models = _models()
        guidance, autoguidance = _api_guidance(models, model, guidance), _api_autoguidance(models, model, autoguidance)
        base = _settings(models, model, digit, guidance, sampler, steps, eta, routing, seed, 1, autoguidance, guide)
        rows = ui.parse_compare(models, base, axis, values)
        png, text, _, _ = _compare_files(base, axis, rows)
        return png, text

    @ui.user_errors
    def compare_from_settings(settings_json):
        """Replay a comparison from its settings JSON (as /compare returns it or the Compare tab shows it): the same grid PNG and JSON."""
        base, axis, rows, columns = ui.compare_from_json(_models(), settings_json)
        png, text, _, _ = _compare_files(base, axis, rows, columns)
        return png, text

    @ui.user_errors
    def compare_ui(axis, values, *controls_values):
        models = _models()
        base = _settings(models, *controls_values[:8], 1, *controls_values[9:])
        rows = ui.parse_compare(models, base, axis, values)
        png, text, js, query = _compare_files(base, axis, rows)
        return png, text, [png, js], query

    @ui.user_errors
    def load_compare(request: gr.Request):
        """On page load with a compare link: the comparison it holds."""
        link = _link(request)
        if link is None or link.tab != "compare":
            return [gr.skip()] * 4
        png, text, js, query = _compare_files(link.settings, link.axis, link.rows)
        return png, text, [png, js], query

    # ----- Explore

    @ui.user_errors
    def explore_view(active, source, index, drawing, level, model, digit, guidance, routing, seed, T=1000):
        """The forward process and one-step denoising of the chosen digit at the slider's level."""
        if active != "explore":
            return [gr.skip()] * 5
        models = _models()
        if source == "drawing" and not drawing:
            note = "Draw a digit on the sketchpad (or pick an MNIST test digit)."
            return None, None, None, None, note
        x0 = ui.input_digit(source, index, drawing)
        base = _settings(models, model, digit, guidance, D.sampler, D.steps, D.eta, routing, seed, 1)
        fwd, _ = ui.forward_view(x0, base.seed, level, T)
        den = ui.denoise(registry, base, x0, level)
        return ui.png_files((fwd, ui.schedule_figure(level, T), den["image"], den["figure"], den["text"]), files)

    def open_explore(*values):
        """The Explore tab opened: remember it, and show its view."""
        return ["explore"] + list(explore_view("explore", *values))

    def on_drawing(sketch):
        """A stroke on the sketchpad: the MNIST-style digit it makes (encoded), and the source set to the drawing."""
        try:
            return ui.drawing_code(sketch), "drawing"
        except ValueError:  # an empty or cleared canvas
            return "", gr.skip()

    def _edit(model, digit, guidance, sampler, steps, eta, routing, seed, source, index, drawing, level, region):
        models = _models()
        es = ui.parse_edit(models, model=model, digit=digit, guidance=guidance, sampler=sampler, steps=steps, eta=eta, routing=routing,
                           seed=seed, source=source, index=index, drawing=drawing, level=level, region=region)
        return es, models[es.model]

    @ui.user_errors
    def sdedit_stream(model, digit, guidance, sampler, steps, eta, routing, seed, n, source, index, drawing, level, region):
        es, info = _edit(model, digit, guidance, sampler, steps, eta, routing, seed, source, index, drawing, level, region)
        yield from _streamed(_sdedit_updates(es, info))

    def _sdedit_updates(es, info):
        first = True
        for update in ui.sdedit_stream(registry, es, info, files):
            out = {ex_outputs[k]: v for k, v in update.items() if k in ex_outputs}
            if first:  # clear the previous result while the new one streams in
                out.update({ex_final: None, ex_strip: None, ex_files: None, ex_query: ""})
                first = False
            yield out

    def load_explore(model, digit, guidance, sampler, steps, eta, routing, seed, n, source, index, drawing, level, region, request: gr.Request):
        link = _link(request)
        if link is None or link.tab != "explore":
            yield {ex_status: gr.skip()}
            return
        yield from sdedit_stream(model, digit, guidance, sampler, steps, eta, routing, seed, n, source, index, drawing, level, region)

    def _api_source(index, image):
        return ("drawing", image) if image is not None else ("mnist", index)

    @ui.user_errors
    def explore_forward(index, image=None, level=0.5, seed=0, T=1000):
        """The forward process: the digit (test digit `index`, or `image`: a drawn digit) at noise `level` (0..1) under the linear
        (`T` = 200, 1000 or 5000 steps, betas scaled so the final alpha-bar is 1e-5) and cosine DDPM schedules and rectified flow,
        from the noise of `seed`. Returns a PNG strip and JSON (signal level, log-SNR, sigma)."""
        source, drawing = _api_source(index, image)
        x0 = ui.input_digit(source, index, drawing)
        img, info = ui.forward_view(x0, seed, level, T)
        return ui.png_files(img, files), json.dumps(info, indent=2)

    @ui.user_errors
    def explore_denoise(model, digit, guidance, routing, index, image=None, level=0.5, seed=0):
        """One-step denoising: the model's prediction of the clean digit from x_t at `level` in one network call (PNG strip: x_t,
        prediction, error) and JSON (sigma, mean squared error, whether sigma is inside the training range)."""
        models = _models()
        source, drawing = _api_source(index, image)
        x0 = ui.input_digit(source, index, drawing)
        base = _settings(models, model, digit, _api_guidance(models, model, guidance), D.sampler, D.steps, D.eta, routing, seed, 1)
        den = ui.denoise(registry, base, x0, level, curve=False)
        return ui.png_files(den["image"], files), json.dumps(den["info"], indent=2)

    @ui.user_errors
    def sdedit(model, digit, guidance, sampler, steps, eta, routing, seed, index, image=None, level=0.5, region="none"):
        """SDEdit: noise the digit (test digit `index`, or `image`: a drawn digit) to `level` (0..1] and let the model and sampler carry
        it back, guided towards `digit` for a class-conditional model; `region` (top, bottom, left, right, centre) repaints only that
        part (inpainting). Returns the result PNG (224x224) and its settings JSON."""
        source, drawing = _api_source(index, image)
        guidance = _api_guidance(_models(), model, guidance)
        es, info = _edit(model, digit, guidance, sampler, steps, eta, routing, seed, source, index, drawing, level, region)
        img = ui.sdedit_image(registry, es, info)
        return files.write("sdedit.png", ui.png_bytes(img)), es.to_json()

    @ui.user_errors
    def sdedit_from_settings(settings_json):
        """Replay an SDEdit result from its settings JSON: the same PNG and settings."""
        models = _models()
        es = ui.edit_from_json(models, settings_json)
        img = ui.sdedit_image(registry, es, models[es.model])
        return files.write("sdedit.png", ui.png_bytes(img)), es.to_json()

    @ui.user_errors
    def open_link(link):
        """Read a share link (a URL or its query): the tab it opens and its settings JSON, or a clear message when it is malformed."""
        if not isinstance(link, str) or not link.strip():
            raise ValueError("give a share link (a URL with ?v=1&...)")
        if len(link) > 20_000:
            raise ValueError("this share link is malformed: it is too long")
        models = _models()
        parsed = ui.parse_link(models, link, _default_model(models))
        if parsed.is_plain:
            raise ValueError("this link holds no settings (a plain visit)")
        if parsed.tab == "compare":
            text = ui.compare_json(ui.compare_meta(parsed.settings, parsed.axis, parsed.rows))
        elif parsed.tab == "explore":
            text = parsed.edit.to_json()
        else:
            text = parsed.settings.to_json()
        return parsed.tab, text

    # ----- Page load and share links

    def on_load(request: gr.Request):
        """Fill the model list and, when the URL carries valid settings (a share link), the controls, the tab and its fields.
        Never fails (an error would mark every control as failed): check_link reports a bad link."""
        models = _models()
        m = _default_model(models)
        link = _link(request) or ui.Link()
        s = link.settings or Settings(model=m or D.model)
        # the app's autoguidance default on a plain visit; a link's own value (a link without one: the model alone)
        plain = link.settings is None
        ag = ui.default_autoguidance(models.get(s.model)) if plain else s.autoguidance
        g = ui.default_guidance(models.get(s.model)) if plain else s.guidance
        upd = [gr.update(choices=ui.model_choices(models), value=s.model if s.model in models else m),
               "any" if s.digit is None else str(s.digit), g, s.sampler, s.steps, s.eta, s.routing, str(s.seed), s.n,
               ag, s.guide or DEFAULT_GUIDES["ddpm"]]
        upd += list(_control_updates(s.model, s.sampler, s.routing)) + [ui.model_cards(registry)]
        ax, vals = _compare_axis_updates(s.model, link.axis or "sampler")
        if link.tab == "compare":
            vals = ", ".join(link.values)
        upd += [ax, vals]
        es = link.edit
        if es is not None:
            upd += ["drawing" if es.drawing is not None else "mnist", es.index if es.index is not None else 0, es.drawing or "", es.level, es.region]
        else:
            upd += [gr.skip()] * 5
        upd += [gr.Tabs(selected=link.tab), link.tab]
        return upd

    @ui.user_errors
    def check_link(request: gr.Request):
        """A malformed share link: an error message (and no generation); unknown parameters: a warning."""
        models = _models()
        link = ui.parse_link(models, request.query_params if request else None, _default_model(models))
        for note in link.notes:
            gr.Warning(note)

    share_js = """(q) => {
        if (!q) return '';
        try { window.history.replaceState(null, '', window.location.pathname + q); } catch (e) {}
        return window.location.origin + window.location.pathname + q;
    }"""

    vis_outputs = [digit, guidance, routing, eta, velocity, autoguidance, guide]
    gen = dict(fn=generate_stream, inputs=controls, outputs=list(outputs.values()) + [chart], concurrency_id=SAMPLING, show_progress="minimal", show_progress_on=[status])
    run.click(**gen, api_name="generate_stream", api_visibility="undocumented").then(None, share_query, share_link, js=share_js, api_visibility="private")
    ex_inputs = [ex_source, ex_index, ex_drawing, ex_level, ex_region]
    ex_all = list(ex_outputs.values())
    loaded = demo.load(on_load, None, controls + vis_outputs + [cards, axis, values] + ex_inputs + [tabs, active_tab], api_visibility="private").then(
        check_link, None, None, api_visibility="private")
    loaded.success(load_generate, controls, list(outputs.values()) + [chart], concurrency_id=SAMPLING, api_visibility="private",
                   show_progress="minimal", show_progress_on=[status]).then(None, share_query, share_link, js=share_js, api_visibility="private")
    loaded.success(load_compare, None, [compare_img, compare_json, compare_files, compare_query], concurrency_id=SAMPLING,
                   api_visibility="private").then(None, compare_query, compare_link, js=share_js, api_visibility="private")
    loaded.success(load_explore, edit_controls + ex_inputs, ex_all, concurrency_id=SAMPLING, api_visibility="private",
                   show_progress="minimal", show_progress_on=[ex_status]).then(None, ex_query, ex_link, js=share_js, api_visibility="private")

    def _all_control_updates(model_name, sampler_name, routing_value=None):
        """``_control_updates`` and the Explore tab's velocity image (shown for a flow model)."""
        upd = _control_updates(model_name, sampler_name, routing_value)
        return (*upd, upd[4])

    model.change(_all_control_updates, [model, sampler, routing], vis_outputs + [ex_velocity], api_visibility="private", queue=False)
    sampler.change(_all_control_updates, [model, sampler, routing], vis_outputs + [ex_velocity], api_visibility="private", queue=False)
    model.change(_compare_axis_updates, [model, axis], [axis, values], api_visibility="private", queue=False)
    model.input(lambda m: (ui.default_guidance(_models().get(m)), ui.default_autoguidance(_models().get(m))), model, [guidance, autoguidance],
                api_visibility="private", queue=False)  # a model picked by hand starts from its own defaults
    axis.input(lambda m, a: ui.default_compare_values(a, _models().get(m)), [model, axis], values, api_visibility="private", queue=False)
    dice.click(ui.random_seed, None, seed, api_visibility="private", queue=False)
    routing.change(lambda r, m: gr.update(info=ui.routing_help(r, _shared(_models().get(m)))), [routing, model], routing,
                   api_visibility="private", queue=False)
    sampler.change(lambda s: gr.update(info=sampler_help(s) or ""), sampler, sampler, api_visibility="private", queue=False)
    compare_btn.click(compare_ui, [axis, values] + controls, [compare_img, compare_json, compare_files, compare_query], api_visibility="private",
                      concurrency_id=SAMPLING).then(None, compare_query, compare_link, js=share_js, api_visibility="private")

    for tab, name in ((generate_tab, "generate"), (compare_tab, "compare"), (models_tab, "models"), (api_tab, "api")):
        tab.select(lambda name=name: name, None, active_tab, api_visibility="private", queue=False)
    view_inputs = [active_tab, ex_source, ex_index, ex_drawing, ex_level, model, digit, guidance, routing, seed, ex_T]
    explore_tab.select(open_explore, view_inputs[1:], [active_tab] + view_outputs, api_visibility="private", concurrency_id="explore_view",
                       concurrency_limit=CONCURRENCY)
    gr.on([ex_level.change, ex_T.change, ex_index.change, ex_source.change, ex_drawing.change, model.change, digit.change,
           guidance.release, routing.change], explore_view, view_inputs, view_outputs, trigger_mode="always_last", api_visibility="private",
          concurrency_id="explore_view", concurrency_limit=CONCURRENCY)
    ex_sketch.change(on_drawing, ex_sketch, [ex_drawing, ex_source], trigger_mode="always_last", api_visibility="private", queue=False)
    ex_random.click(lambda: (secrets.randbelow(1000), "mnist"), None, [ex_index, ex_source], api_visibility="private", queue=False)
    ex_run.click(sdedit_stream, edit_controls + ex_inputs, ex_all, concurrency_id=SAMPLING, api_visibility="private", show_progress="minimal",
                 show_progress_on=[ex_status]).then(None, ex_query, ex_link, js=share_js, api_visibility="private")

    a_button.click(generate, api_controls, [a_image, a_settings], api_name="generate", concurrency_id=SAMPLING)
    a_button.click(generate_from_settings, a_json, [a_image, a_settings], api_name="generate_from_settings", concurrency_id=SAMPLING)
    a_button.click(run_compare, [a_axis, a_values] + api_compare_controls, [a_image, a_settings], api_name="compare", concurrency_id=SAMPLING)
    a_button.click(compare_from_settings, a_json, [a_image, a_settings], api_name="compare_from_settings", concurrency_id=SAMPLING)
    a_button.click(explore_forward, [a_index, a_drawn, a_level, a_seed, a_T], [a_image, a_settings], api_name="explore_forward")
    a_button.click(explore_denoise, [a_model, a_digit, a_guidance, a_routing, a_index, a_drawn, a_level, a_seed], [a_image, a_settings],
                   api_name="explore_denoise", concurrency_id=SAMPLING)
    a_button.click(sdedit, api_edit_controls + [a_index, a_drawn, a_level, a_region], [a_image, a_settings], api_name="sdedit",
                   concurrency_id=SAMPLING)
    a_button.click(sdedit_from_settings, a_json, [a_image, a_settings], api_name="sdedit_from_settings", concurrency_id=SAMPLING)
    a_button.click(open_link, a_link, [a_tab, a_settings], api_name="open_link", queue=False)

demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
# show_error: an unexpected error inside Gradio itself reaches the caller as its message, not as a bare failure.
LAUNCH_KWARGS = dict(css=CSS, theme=gr.themes.Soft(primary_hue="indigo"), footer_links=["api", "gradio"], show_error=True)

if __name__ == "__main__":
    demo.launch(**LAUNCH_KWARGS)
