"""Gradio demo: watch an MNIST digit emerge from noise, compare samplers/routings/guidance, share.

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

import gradio as gr
import torch

from diffusion_core import ui
from diffusion_core.pipeline import MAX_GUIDANCE, MAX_STEPS, Settings
from diffusion_core.registry import ModelRegistry

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
"""

INTRO = """
# Diffusion models on MNIST
Watch a handwritten digit emerge from pure noise. Pick a model and a sampler, press **Generate**,
and follow the current noisy image and the model's guess of the clean image at every step.
**CFG** draws the digit you ask for (guidance sets how strongly); **MCL** is an ensemble of
expert denoisers, and the chart shows which expert worked at each step.
Every image comes back from its settings: share the link to show someone exactly the same thing.
"""

API_DOC = """
### API
Named endpoints, callable with `gradio_client` (see *Use via API* at the bottom of the page):
`/generate` (settings → final image PNG + settings JSON), `/generate_from_settings` (settings JSON →
the same), `/compare` (one seed, several samplers / routings / guidance scales → grid PNG + JSON).

```python
from gradio_client import Client
client = Client("http://127.0.0.1:7860/")
png_path, settings_json = client.predict(model="cfg", digit=7, guidance=2.0, sampler="dpmpp_2m",
                                         steps=16, seed=0, n=4, api_name="/generate")
```
The settings JSON also replays on the command line:
`python -m diffusion_core.sample --settings settings.json --out samples.npz --grid samples.png`.
"""


def _models():
    return ui.available_models(registry)


def _default_model(models) -> str | None:
    return D.model if D.model in models else next(iter(models), None)


def _control_updates(model_name, sampler_name, routing_value=None):
    """Show only the controls that apply to the model and sampler."""
    models = _models()
    info = models.get(model_name)
    v = ui.visibility(info, sampler_name)
    choices = ui.routing_choices(v.num_experts)
    values = [c[1] for c in choices]
    routing_value = routing_value if routing_value in values else D.routing
    return (gr.update(visible=v.digit), gr.update(visible=v.guidance), gr.update(visible=v.routing, choices=choices, value=routing_value),
            gr.update(visible=v.eta))


def _compare_axis_updates(model_name, axis):
    info = _models().get(model_name)
    axes = [("samplers", "sampler")]
    if info and info.is_mcl:
        axes.append(("routing strategies", "routing"))
    if info and info.conditional:
        axes.append(("guidance scales", "guidance"))
    values = [a[1] for a in axes]
    axis = axis if axis in values else "sampler"
    return gr.update(choices=axes, value=axis), ui.default_compare_values(axis, info)


def _settings(models, model, digit, guidance, sampler, steps, eta, routing, seed, n):
    return ui.parse_settings(models, model=model, digit=digit, guidance=guidance, sampler=sampler, steps=steps, eta=eta,
                             routing=routing, seed=seed, n=n)


with gr.Blocks(title="Diffusion on MNIST", delete_cache=(3600, 3600)) as demo:
    gr.Markdown(INTRO)
    models0 = _models()
    m0 = _default_model(models0)
    v0 = ui.visibility(models0.get(m0), D.sampler)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            model = gr.Radio(ui.model_choices(models0), value=m0, label="Model", elem_id="model")
            digit = gr.Radio(ui.digit_choices(), value="any", label="Digit", info="'any' cycles 0-9 over the images", visible=v0.digit, elem_id="digit")
            guidance = gr.Slider(0, MAX_GUIDANCE, value=D.guidance, step=0.1, label="Guidance scale",
                                 info="0 unconditional, 1 conditional, >1 guided", visible=v0.guidance, elem_id="guidance")
            routing = gr.Dropdown(ui.routing_choices(v0.num_experts), value=D.routing, label="Routing (which expert denoises)", visible=v0.routing, elem_id="routing")
            sampler = gr.Dropdown(ui.sampler_choices(), value=D.sampler, label="Sampler", elem_id="sampler")
            steps = gr.Slider(1, MAX_STEPS, value=D.steps, step=1, label="Steps", elem_id="steps")
            eta = gr.Slider(0, 1, value=D.eta, step=0.05, label="DDIM eta", info="0 deterministic, 1 like DDPM", visible=v0.eta, elem_id="eta")
            with gr.Row(equal_height=True):
                seed = gr.Textbox(value=str(D.seed), label="Seed", scale=4, max_lines=1, elem_id="seed")
                dice = gr.Button("Random", scale=1, min_width=70, size="lg", elem_id="dice")
            n = gr.Slider(1, ui.MAX_IMAGES, value=D.n, step=1, label="Number of images", elem_id="n")
            run = gr.Button("Generate", variant="primary", size="lg", elem_id="run")
        with gr.Column(scale=3):
            with gr.Tabs():
                with gr.Tab("Generate", id="generate"):
                    status = gr.Markdown("", elem_id="status")
                    with gr.Row():
                        noisy = gr.Image(label="Current noisy image x_t", format="png", interactive=False, height=260,
                                         elem_id="noisy", elem_classes="pixelated", buttons=[])
                        denoised = gr.Image(label="Predicted clean image", format="png", interactive=False, height=260,
                                            elem_id="denoised", elem_classes="pixelated", buttons=[])
                        final = gr.Image(label="Final image", format="png", interactive=False, height=260,
                                         elem_id="final", elem_classes="pixelated", buttons=["download", "fullscreen"])
                    gr.Markdown("**Filmstrip:** from noise to digit" , elem_classes="caption")
                    filmstrip = gr.Image(label="Filmstrip", show_label=False, format="png", interactive=False,
                                         elem_id="filmstrip", buttons=["download"])
                    chart = gr.Plot(label="Experts at each step", show_label=False, format="png", visible=False, elem_id="chart")
                    with gr.Accordion("Share and reproduce", open=True):
                        share_link = gr.Textbox(label="Share link (opens this exact image)", buttons=["copy"], max_lines=2,
                                                elem_id="share_link", interactive=False)
                        with gr.Row():
                            settings_json = gr.Code(label="Settings JSON", language="json", interactive=False, elem_id="settings_json", max_lines=14)
                            downloads = gr.File(label="Downloads: PNG, GIF, settings", file_count="multiple", interactive=False)
                        gr.Markdown(f"Replay from the command line: `{ui.cli_command()}`")
                    share_query = gr.Textbox(visible=False)
                with gr.Tab("Compare", id="compare"):
                    gr.Markdown("One seed, several strategies side by side. Rows: strategy; columns: denoising steps from the same "
                                "initial noise. The other settings (model, seed, steps, digit...) come from the controls on the left.")
                    with gr.Row(equal_height=False):
                        axis = gr.Radio([("samplers", "sampler")], value="sampler", label="Compare", scale=2)
                        values = gr.Textbox(value=ui.default_compare_values("sampler", None), label="Values (comma-separated)", scale=3)
                        compare_btn = gr.Button("Compare", variant="primary", scale=1, min_width=120, elem_id="compare_btn")
                    compare_img = gr.Image(label="Trajectories", show_label=False, format="png", interactive=False, elem_id="compare_img", buttons=["download", "fullscreen"])
                    with gr.Row():
                        compare_json = gr.Code(label="Settings JSON", language="json", interactive=False, max_lines=14)
                        compare_files = gr.File(label="Downloads: PNG, settings", file_count="multiple", interactive=False)
                with gr.Tab("Models", id="models"):
                    cards = gr.HTML(ui.model_cards(registry))
                with gr.Tab("API", id="api"):
                    gr.Markdown(API_DOC)

    # API-only inputs and outputs: lenient components, so every check (and message) is ui.parse_settings'.
    with gr.Column(visible=False):
        a_model = gr.Textbox(value=D.model, label="model")
        a_digit = gr.Textbox(value="any", label="digit")
        a_guidance = gr.Number(value=D.guidance, label="guidance")
        a_sampler = gr.Textbox(value=D.sampler, label="sampler")
        a_steps = gr.Number(value=D.steps, label="steps")
        a_eta = gr.Number(value=D.eta, label="eta")
        a_routing = gr.Textbox(value=D.routing, label="routing")
        a_seed = gr.Number(value=D.seed, label="seed")
        a_n = gr.Number(value=D.n, label="n")
        a_axis = gr.Textbox(value="sampler", label="axis")
        a_values = gr.Textbox(value="", label="values")
        a_json = gr.Textbox(value=D.to_json(), label="settings_json")
        a_image = gr.Image(format="png", label="image")
        a_settings = gr.Textbox(label="settings")
        a_button = gr.Button()

    controls = [model, digit, guidance, sampler, steps, eta, routing, seed, n]
    api_controls = [a_model, a_digit, a_guidance, a_sampler, a_steps, a_eta, a_routing, a_seed, a_n]
    outputs = {"noisy": noisy, "denoised": denoised, "status": status, "final": final, "settings_json": settings_json,
               "share_query": share_query, "filmstrip": filmstrip, "downloads": downloads}

    @ui.user_errors
    def generate_stream(*values):
        models = _models()
        s = _settings(models, *values)
        first = True
        for update in ui.stream(registry, s, models[s.model], files):
            out = {outputs[k]: v for k, v in update.items() if k in outputs}
            if "chart" in update:
                out[chart] = gr.Plot(value=update["chart"], visible=update["chart"] is not None)
            if first:  # clear the previous results while the new ones stream in
                out.update({final: None, filmstrip: None, downloads: None, share_query: "", chart: gr.Plot(visible=False)})
                first = False
            yield out

    @ui.user_errors
    def generate(model, digit, guidance, sampler, steps, eta, routing, seed, n):
        """Generate images: the final image (a PNG grid, 224x224 pixels per image, 4 pixels apart) and the settings JSON."""
        models = _models()
        s = _settings(models, model, digit, guidance, sampler, steps, eta, routing, seed, n)
        return ui.generate_image(registry, s, models[s.model]), s.to_json()

    @ui.user_errors
    def generate_from_settings(settings_json):
        """Generate from a settings JSON (as returned by /generate or shown in the app): the same image and settings."""
        models = _models()
        s = ui.settings_from_json(models, settings_json)
        return ui.generate_image(registry, s, models[s.model]), s.to_json()

    @ui.user_errors
    def run_compare(axis, values, model, digit, guidance, sampler, steps, eta, routing, seed):
        """Compare strategies from one seed: rows are the values of `axis` (sampler, routing or guidance), columns are denoising steps."""
        models = _models()
        base = _settings(models, model, digit, guidance, sampler, steps, eta, routing, seed, 1)
        rows = ui.parse_compare(models, base, axis, values)
        img, meta = ui.compare(registry, rows, axis)
        return img, json.dumps(meta, indent=2, sort_keys=True)

    @ui.user_errors
    def compare_ui(axis, values, *controls_values):
        img, text = run_compare(axis, values, *controls_values[:-1])
        png = files.write("compare.png", ui.png_bytes(img))
        js = files.write("compare_settings.json", (text + "\n").encode())
        return img, text, [png, js]

    def on_load(request: gr.Request):
        """Fill the model list and, when the URL carries valid settings (a share link), the controls.
        Never fails (an error would mark every control as failed): check_link reports a bad link."""
        models = _models()
        m = _default_model(models)
        try:
            s, _ = ui.settings_from_query(models, request.query_params if request else None)
        except ValueError:
            s = None
        if s is None:
            s = Settings(model=m or D.model)
        upd = [gr.update(choices=ui.model_choices(models), value=s.model if s.model in models else m),
               "any" if s.digit is None else str(s.digit), s.guidance, s.sampler, s.steps, s.eta, s.routing, str(s.seed), s.n]
        return upd + list(_control_updates(s.model, s.sampler, s.routing)) + [ui.model_cards(registry)]

    @ui.user_errors
    def check_link(request: gr.Request):
        """A malformed share link: an error message (and no generation); unknown parameters: a warning."""
        _, notes = ui.settings_from_query(_models(), request.query_params if request else None)
        for note in notes:
            gr.Warning(note)

    share_js = """(q) => {
        if (!q) return '';
        try { window.history.replaceState(null, '', window.location.pathname + q); } catch (e) {}
        return window.location.origin + window.location.pathname + q;
    }"""

    gen = dict(fn=generate_stream, inputs=controls, outputs=list(outputs.values()) + [chart], concurrency_id=SAMPLING, show_progress="minimal", show_progress_on=[status])
    run.click(**gen, api_name="generate_stream", api_visibility="undocumented").then(None, share_query, share_link, js=share_js, api_visibility="private")
    demo.load(on_load, None, controls + [digit, guidance, routing, eta, cards], api_visibility="private").then(
        check_link, None, None, api_visibility="private").success(**gen, api_visibility="private").then(None, share_query, share_link, js=share_js, api_visibility="private")

    model.change(_control_updates, [model, sampler, routing], [digit, guidance, routing, eta], api_visibility="private", queue=False)
    sampler.change(_control_updates, [model, sampler, routing], [digit, guidance, routing, eta], api_visibility="private", queue=False)
    model.change(_compare_axis_updates, [model, axis], [axis, values], api_visibility="private", queue=False)
    axis.input(lambda m, a: ui.default_compare_values(a, _models().get(m)), [model, axis], values, api_visibility="private", queue=False)
    dice.click(ui.random_seed, None, seed, api_visibility="private", queue=False)
    compare_btn.click(compare_ui, [axis, values] + controls, [compare_img, compare_json, compare_files], api_visibility="private",
                      concurrency_id=SAMPLING)

    a_button.click(generate, api_controls, [a_image, a_settings], api_name="generate", concurrency_id=SAMPLING)
    a_button.click(generate_from_settings, a_json, [a_image, a_settings], api_name="generate_from_settings", concurrency_id=SAMPLING)
    a_button.click(run_compare, [a_axis, a_values] + api_controls[:-1], [a_image, a_settings], api_name="compare", concurrency_id=SAMPLING)

demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
# show_error: an unexpected error inside Gradio itself reaches the caller as its message, not as a bare failure.
LAUNCH_KWARGS = dict(css=CSS, theme=gr.themes.Soft(primary_hue="indigo"), footer_links=["api", "gradio"], show_error=True)

if __name__ == "__main__":
    demo.launch(**LAUNCH_KWARGS)
