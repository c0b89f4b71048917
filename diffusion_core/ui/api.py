"""The app's named endpoints for ``gradio_client`` (cold diffusion's are in ``cold_panel``).

Their inputs are lenient hidden components, so every check and every message is the library's
(``common.parse_settings`` and the tabs' parsers). An empty ``guidance`` or ``autoguidance`` is the
app's value for the model; an empty ``values`` of ``/compare`` is the axis's default values.
"""
from __future__ import annotations

import json

import gradio as gr

from .common import default_autoguidance, default_autoguide, default_guidance, settings_from_json
from .compare_tab import (
    compare_files,
    compare_from_json,
    compare_json,
    compare_meta,
    parse_compare,
)
from .controls import DEFAULTS, SAMPLING, Shared
from .explore_tab import (
    denoise,
    edit_from_json,
    forward_view,
    input_digit,
    parse_edit,
    sdedit_image,
)
from .files import png_files
from .generate_tab import generate_image
from .glue import user_errors
from .links import parse_link
from .render import png_bytes

API_DOC = """
### API
Named endpoints, callable with `gradio_client` (see *Use via API* at the bottom of the page):
`/generate` (settings → final image PNG + settings JSON; `autoguidance`, `guide` and `autoguide`
for the unconditional models; an empty `guidance` or `autoguidance` is the app's for the model),
`/generate_from_settings` (settings JSON → the same), `/compare` (one seed, several samplers /
routings / guidance scales / autoguidance weights / DDIM etas → grid PNG + JSON; empty `values`: the
axis's defaults, as the Compare tab shows them), `/compare_from_settings` (that JSON → the same grid),
`/explore_forward` (a digit at a noise level under the linear, cosine and flow schedules),
`/explore_denoise` (one-step denoising and its error), `/sdedit` and `/sdedit_from_settings` (SDEdit /
inpainting of a test digit or an image of a digit), `/cold_restore`, `/cold_generate` and `/cold_from_settings` (cold
diffusion), `/open_link` (a share link → its tab and settings JSON, or why it is malformed).

```python
from gradio_client import Client
client = Client("http://127.0.0.1:7860/")
png_path, settings_json = client.predict(model="cfg", digit=7, guidance=2.0, sampler="dpmpp_2m",
                                         steps=16, seed=0, n=4, api_name="/generate")
```
Every settings JSON (Generate's, Compare's, SDEdit's) also replays on the command line:
`python -m diffusion_core.sample --settings settings.json --out samples.npz --grid samples.png`.
"""


def _empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _or_default(models, model, value, default):
    """An API value as given, or (None, empty) ``default(info)`` for the model."""
    if _empty(value):
        return default(models.get(model if isinstance(model, str) else DEFAULTS.model))
    return value


def _source(index, image):
    return ("drawing", image) if image is not None else ("mnist", index)


def build(shared: Shared) -> None:
    """The hidden API components and the endpoints (call inside the page's Blocks)."""
    s = shared
    with gr.Column(visible=False):
        a_model = gr.Textbox(value=DEFAULTS.model, label="model")
        a_digit = gr.Textbox(value="any", label="digit")
        a_guidance = gr.Textbox(value="", label="guidance (empty: the app's scale for the model)")
        a_sampler = gr.Textbox(value=DEFAULTS.sampler, label="sampler")
        a_steps = gr.Number(value=DEFAULTS.steps, label="steps")
        a_eta = gr.Number(value=DEFAULTS.eta, label="eta")
        a_routing = gr.Textbox(value=DEFAULTS.routing, label="routing")
        a_autoguidance = gr.Textbox(value="", label="autoguidance (empty: the app's weight for the model)")
        a_guide = gr.Textbox(value="", label="guide")
        a_autoguide = gr.Textbox(value="", label="autoguide (output or mixture; empty: with an empty autoguidance the app's for the model, else output)")
        a_seed = gr.Number(value=DEFAULTS.seed, label="seed")
        a_n = gr.Number(value=DEFAULTS.n, label="n")
        a_axis = gr.Textbox(value="sampler", label="axis")
        a_values = gr.Textbox(value="", label="values (empty: the axis's default values)")
        a_json = gr.Textbox(value=DEFAULTS.to_json(), label="settings_json")
        a_index = gr.Number(value=0, label="index")
        a_drawn = gr.Image(type="numpy", image_mode="RGBA", format="png", label="image (a drawn digit; empty: the test digit `index`)")
        a_level = gr.Number(value=0.5, label="level")
        a_region = gr.Textbox(value="none", label="region")
        a_link = gr.Textbox(value="", label="link")
        a_image = gr.Image(format="png", label="image")
        a_settings = gr.Textbox(label="settings")
        a_tab = gr.Textbox(label="tab")
        a_T = gr.Number(value=1000, label="T", precision=0)
        button = gr.Button()
    controls = [a_model, a_digit, a_guidance, a_sampler, a_steps, a_eta, a_routing, a_seed, a_n, a_autoguidance, a_guide, a_autoguide]
    compare_controls = controls[:8] + controls[9:]
    edit_controls = controls[:8]

    def settings(models, model, digit, guidance, sampler, steps, eta, routing, seed, n, autoguidance=None, guide="", autoguide=""):
        guidance = _or_default(models, model, guidance, default_guidance)
        if _empty(autoguidance):  # the app's guidance without labels: weight and what it acts on
            autoguide = _or_default(models, model, autoguide, default_autoguide)
        autoguidance = _or_default(models, model, autoguidance, default_autoguidance)
        return s.settings(models, model, digit, guidance, sampler, steps, eta, routing, seed, n, autoguidance, guide, autoguide)

    @user_errors
    def generate(model, digit, guidance, sampler, steps, eta, routing, seed, n, autoguidance=None, guide="", autoguide=""):
        """Generate images: the final image (a PNG grid, 224x224 pixels per image, 4 pixels apart) and the settings JSON.
        `autoguidance` (unconditional models: 1 is the model alone; empty: the app's weight), `guide` (its weak model;
        empty: the default) and `autoguide` (what the guide is compared with: `output`, or `mixture` for an MCL on one
        network; empty: the app's with an empty `autoguidance`, else `output`) steer without labels."""
        models = s.models()
        st = settings(models, model, digit, guidance, sampler, steps, eta, routing, seed, n, autoguidance, guide, autoguide)
        return png_files(generate_image(s.registry, st, models[st.model]), s.files), st.to_json()

    @user_errors
    def generate_from_settings(settings_json):
        """Generate from a settings JSON (as returned by /generate or shown in the app): the same image and settings."""
        models = s.models()
        st = settings_from_json(models, settings_json)
        return png_files(generate_image(s.registry, st, models[st.model]), s.files), st.to_json()

    @user_errors
    def run_compare(axis, values, model, digit, guidance, sampler, steps, eta, routing, seed, autoguidance=None, guide="", autoguide=""):
        """Compare strategies from one seed: rows are the values of `axis` (sampler, routing, guidance, autoguidance or eta: DDIM etas,
        and 'ddpm' for DDPM's sampler; empty `values`: the axis's defaults), columns are denoising steps. Returns the grid PNG and the
        comparison's settings JSON."""
        models = s.models()
        base = settings(models, model, digit, guidance, sampler, steps, eta, routing, seed, 1, autoguidance, guide, autoguide)
        rows = parse_compare(models, base, axis, values, autoguide)
        png, text, _, _ = compare_files(s.registry, s.files, models, base, axis, rows)
        return png, text

    @user_errors
    def compare_from_settings(settings_json):
        """Replay a comparison from its settings JSON (as /compare returns it or the Compare tab shows it): the same grid PNG and JSON."""
        models = s.models()
        base, axis, rows, columns = compare_from_json(models, settings_json)
        png, text, _, _ = compare_files(s.registry, s.files, models, base, axis, rows, columns)
        return png, text

    @user_errors
    def explore_forward(index, image=None, level=0.5, seed=0, T=1000):
        """The forward process: the digit (test digit `index`, or `image`: a drawn digit) at noise `level` (0..1) under the linear
        (`T` = 200, 1000 or 5000 steps, betas scaled so the final alpha-bar is 1e-5) and cosine DDPM schedules and rectified flow,
        from the noise of `seed`. Returns a PNG strip and JSON (signal level, log-SNR, sigma)."""
        source, drawing = _source(index, image)
        img, info = forward_view(input_digit(source, index, drawing), seed, level, T)
        return png_files(img, s.files), json.dumps(info, indent=2)

    @user_errors
    def explore_denoise(model, digit, guidance, routing, index, image=None, level=0.5, seed=0):
        """One-step denoising: the model's prediction of the clean digit from x_t at `level` in one network call (PNG strip: x_t,
        prediction, error) and JSON (sigma, mean squared error, whether sigma is inside the training range)."""
        models = s.models()
        source, drawing = _source(index, image)
        x0 = input_digit(source, index, drawing)
        base = settings(models, model, digit, guidance, DEFAULTS.sampler, DEFAULTS.steps, DEFAULTS.eta, routing, seed, 1)
        den = denoise(s.registry, base, x0, level, curve=False)
        return png_files(den["image"], s.files), json.dumps(den["info"], indent=2)

    @user_errors
    def sdedit(model, digit, guidance, sampler, steps, eta, routing, seed, index, image=None, level=0.5, region="none"):
        """SDEdit: noise the digit (test digit `index`, or `image`: a drawn digit) to `level` (0..1] and let the model and sampler carry
        it back, guided towards `digit` for a class-conditional model; `region` (top, bottom, left, right, centre) repaints only that
        part (inpainting). Returns the result PNG (224x224) and its settings JSON."""
        models = s.models()
        source, drawing = _source(index, image)
        es = parse_edit(models, model=model, digit=digit, guidance=_or_default(models, model, guidance, default_guidance), sampler=sampler,
                        steps=steps, eta=eta, routing=routing, seed=seed, source=source, index=index, drawing=drawing, level=level, region=region)
        return s.files.write("sdedit.png", png_bytes(sdedit_image(s.registry, es, models[es.model]))), es.to_json()

    @user_errors
    def sdedit_from_settings(settings_json):
        """Replay an SDEdit result from its settings JSON (as /sdedit returns it): the same PNG and settings."""
        models = s.models()
        es = edit_from_json(models, settings_json)
        return s.files.write("sdedit.png", png_bytes(sdedit_image(s.registry, es, models[es.model]))), es.to_json()

    @user_errors
    def open_link(link):
        """Read a share link (a URL or its query): the tab it opens and its settings JSON, or a clear message when it is malformed."""
        if not isinstance(link, str) or not link.strip():
            raise ValueError("give a share link (a URL with ?v=1&...)")
        if len(link) > 20_000:
            raise ValueError("this share link is malformed: it is too long")
        models = s.models()
        parsed = parse_link(models, link, s.default_model(models))
        if parsed.is_plain:
            raise ValueError("this link holds no settings (a plain visit)")
        if parsed.tab == "compare":
            return parsed.tab, compare_json(compare_meta(parsed.settings, parsed.axis, parsed.rows))
        if parsed.tab == "explore":
            return parsed.tab, parsed.edit.to_json()
        if parsed.tab == "cold":
            return parsed.tab, json.dumps(parsed.cold, indent=2)
        return parsed.tab, parsed.settings.to_json()

    out = [a_image, a_settings]
    button.click(generate, controls, out, api_name="generate", concurrency_id=SAMPLING)
    button.click(generate_from_settings, a_json, out, api_name="generate_from_settings", concurrency_id=SAMPLING)
    button.click(run_compare, [a_axis, a_values] + compare_controls, out, api_name="compare", concurrency_id=SAMPLING)
    button.click(compare_from_settings, a_json, out, api_name="compare_from_settings", concurrency_id=SAMPLING)
    button.click(explore_forward, [a_index, a_drawn, a_level, a_seed, a_T], out, api_name="explore_forward")
    button.click(explore_denoise, [a_model, a_digit, a_guidance, a_routing, a_index, a_drawn, a_level, a_seed], out,
                 api_name="explore_denoise", concurrency_id=SAMPLING)
    button.click(sdedit, edit_controls + [a_index, a_drawn, a_level, a_region], out, api_name="sdedit", concurrency_id=SAMPLING)
    button.click(sdedit_from_settings, a_json, out, api_name="sdedit_from_settings", concurrency_id=SAMPLING)
    button.click(open_link, a_link, [a_tab, a_settings], api_name="open_link", queue=False)
