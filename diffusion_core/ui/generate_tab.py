"""The Generate tab: render a trajectory of the pipeline as throttled live frames, then the final
results (``stream``), and the tab's layout and events (``build``)."""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr
import numpy as np

from ..explore import velocity
from ..palette import expert_color
from ..pipeline import Settings, start, to_uint8
from .common import ModelInfo
from .files import OutputFiles
from .glue import final_image, streamed, user_errors
from .render import (
    SCORE_HEAD_SENTENCE,
    Recording,
    expert_borders,
    expert_chart,
    filmstrip,
    frame_scale,
    gif_frames,
    png_bytes,
    render_grid,
    render_rgb_grid,
    velocity_tiles,
    vp_frame,
    write_gif,
)
from .share import share_query


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
      expert colour under MCL), ``denoised`` (the predicted clean image), ``status`` and, for a
      rectified-flow model, ``velocity``: the velocity ``v = eps - x0`` the step's denoiser output
      implies (``explore.velocity``, no extra network call), blue negative, red positive;
    * then ``final`` (the grid of final samples, grayscale, exactly ``pipeline.generate``'s
      images upscaled by ``SCALE``), ``settings_json``, ``share_query``;
    * then (``extras``) ``filmstrip``, ``gif`` (a file path), ``downloads`` and ``chart`` (a
      matplotlib figure, or None outside MCL).
    """
    t0 = time.perf_counter()
    model, gate = registry.for_settings(settings, watch_gate=True)  # the chart shows the gate under every routing
    guide = registry.guide_for(settings, model)
    n = settings.n
    fs = frame_scale(n)
    throttle = Throttle(min_interval)
    run = start(settings, model, gate, watch_gate=True, guide=guide)
    noise = to_uint8(run.noise).numpy()
    throttle.ready(force=True)
    yield {"noisy": render_grid(noise, fs), "denoised": None, "status": _status(0, settings.steps, None, 0.0)}
    xs, dens, sigmas, experts, probs = [], [], [], [], []
    last = None
    prev = run.x if info.is_flow else None  # the state before the step (flow models: for the velocity)
    for step in run.steps:
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
            upd = {"noisy": noisy, "denoised": render_grid(d8, fs),
                   "status": _status(step.index + 1, settings.steps, step.sigma_next, time.perf_counter() - t0)}
            if prev is not None:
                upd["velocity"] = render_rgb_grid(velocity_tiles(velocity(prev, step.denoised, step.sigma)), fs)
            yield upd
        if prev is not None:
            prev = step.x
    images = to_uint8(last.x).numpy()
    rec = Recording(noise, xs, dens, sigmas, np.stack(experts) if experts else None,
                    np.stack(probs) if len(probs) == len(xs) and probs else None,
                    model.num_experts if info.is_mcl else 0, score_head=info.shared)
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
        "chart_caption": chart_caption(rec, settings.routing),
    }


def chart_caption(rec: Recording, routing: str) -> str:
    """The sentence under the MCL chart: what its lower panel's probabilities are."""
    if rec.experts is None or rec.gate_probs is None:
        return ""
    if rec.score_head:
        return (f"**Score head** (lower panel): {SCORE_HEAD_SENTENCE}. It was trained to name the expert that owns each "
                "training image, so it starts near each expert's share of the data and sharpens as the digit appears.")
    return "**Gating network** (lower panel): its guess, from the noisy image, of the expert that would denoise it best."


def generate_image(registry, settings: Settings, info: ModelInfo) -> np.ndarray:
    """The final grid for validated settings, without the live frames (the API's ``generate``)."""
    return final_image(stream(registry, settings, info, min_interval=math.inf, extras=False), "the trajectory")


def cli_command() -> str:
    """How to replay the settings JSON (saved as settings.json) from the command line."""
    return "python -m diffusion_core.sample --settings settings.json --out samples.npz --grid samples.png"


# ---------------------------------------------------------------------------------------------
# Layout and events


def build(shared, tab) -> dict:
    """The Generate tab's components (inside ``tab``) and its events: the Generate button streams
    the trajectory; a share link of this tab generates on page load (``on_page_load``)."""
    from .controls import SAMPLING, SHARE_JS

    s = shared
    status = gr.Markdown("", elem_id="status")
    info0 = s.models().get(s.model.value)
    with gr.Row():
        noisy = gr.Image(label="Current noisy image x_t", format="png", interactive=False, height=260,
                         elem_id="noisy", elem_classes="pixelated", buttons=[])
        velocity_img = gr.Image(label="Predicted velocity v = noise - x0 (blue < 0 < red)", format="png", interactive=False,
                                height=260, elem_id="velocity", elem_classes="pixelated", buttons=[], visible=bool(info0 and info0.is_flow))
        denoised = gr.Image(label="Predicted clean image", format="png", interactive=False, height=260,
                            elem_id="denoised", elem_classes="pixelated", buttons=[])
        final = gr.Image(label="Final image", format="png", interactive=False, height=260,
                         elem_id="final", elem_classes="pixelated", buttons=["download", "fullscreen"])
    gr.Markdown("**Filmstrip:** from noise to digit", elem_classes="caption")
    strip = gr.Image(label="Filmstrip", show_label=False, format="png", interactive=False, elem_id="filmstrip", buttons=["download"])
    chart = gr.Plot(label="Experts at each step", show_label=False, format="png", visible=False, elem_id="chart")
    chart_text = gr.Markdown("", elem_id="chart_caption", elem_classes="caption")
    with gr.Accordion("Share and reproduce", open=True):
        link = gr.Textbox(label="Share link (opens this exact image)", buttons=["copy"], max_lines=2, elem_id="share_link", interactive=False)
        with gr.Row():
            settings_json = gr.Code(label="Settings JSON", language="json", interactive=False, elem_id="settings_json", max_lines=14)
            downloads = gr.File(label="Downloads: PNG, GIF, settings", file_count="multiple", interactive=False)
        gr.Markdown(f"Replay from the command line: `{cli_command()}`")
    query = gr.Textbox(visible=False)
    outputs = {"noisy": noisy, "denoised": denoised, "status": status, "final": final, "settings_json": settings_json,
               "share_query": query, "filmstrip": strip, "downloads": downloads, "velocity": velocity_img, "chart_caption": chart_text}

    def updates(settings, info):
        first = True
        for update in stream(s.registry, settings, info, s.files):
            out = {outputs[k]: v for k, v in update.items() if k in outputs}
            if "chart" in update:
                out[chart] = gr.Plot(value=update["chart"], visible=update["chart"] is not None)
            if first:  # clear the previous results while the new ones stream in
                out.update({final: None, strip: None, downloads: None, query: "", chart: gr.Plot(visible=False), velocity_img: None,
                            chart_text: ""})
                first = False
            yield out

    @user_errors
    def generate_stream(*values):
        models = s.models()
        settings = s.settings(models, *values)
        yield from streamed(updates(settings, models[settings.model]), s.files)

    def load_generate(model, digit, guidance, sampler, steps, eta, routing, seed, n, autoguidance, guide, autoguide, request: gr.Request):
        """On page load: generate, unless the link opens another tab."""
        link_ = s.link(request)
        if link_ is None or link_.tab != "generate":
            yield {status: gr.skip()}
            return
        yield from generate_stream(model, digit, guidance, sampler, steps, eta, routing, seed, n, autoguidance, guide, autoguide)

    all_outputs = list(outputs.values()) + [chart]
    s.run.click(generate_stream, s.controls, all_outputs, concurrency_id=SAMPLING, show_progress="minimal", show_progress_on=[status],
                api_name="generate_stream", api_visibility="undocumented").then(None, query, link, js=SHARE_JS, api_visibility="private")
    tab.select(lambda: "generate", None, s.active_tab, api_visibility="private", queue=False)

    def on_page_load(loaded):
        loaded.success(load_generate, s.controls, all_outputs, concurrency_id=SAMPLING, api_visibility="private",
                       show_progress="minimal", show_progress_on=[status]).then(None, query, link, js=SHARE_JS, api_visibility="private")

    return {"velocity": velocity_img, "on_page_load": on_page_load}
