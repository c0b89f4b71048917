"""Gradio demo: watch an MNIST digit emerge from noise, compare samplers/routings/guidance/autoguidance/eta,
explore the forward process, one-step denoising, SDEdit and cold diffusion, share any result.

Run locally with ``python app.py`` (http://127.0.0.1:7860); on Hugging Face Spaces this file is the
``app_file``. It only composes the page: each tab module of ``diffusion_core.ui`` builds its own
components and wires its own events.

Environment: ``DIFFUSION_CHECKPOINT_DIR`` (where checkpoints are looked up, default checkpoints/),
``APP_CONCURRENCY`` (sampling requests run at once, default 2), ``APP_QUEUE_SIZE`` (requests
waiting at most, default 64), ``APP_TORCH_THREADS`` (torch CPU threads, default 2: the thread count
share links are defined at, ``diffusion_core.reproducible``),
``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``.
"""
from __future__ import annotations

import os

from diffusion_core import reproducible

reproducible.pin_kernels()  # before anything computes: AVX2 kernels, so a share link gives the same bytes on any x86 machine

import gradio as gr  # noqa: E402

from diffusion_core.registry import ModelRegistry  # noqa: E402
from diffusion_core.ui import api, compare_tab, controls, explore_tab, generate_tab, models_tab, page  # noqa: E402
from diffusion_core.ui.files import OutputFiles  # noqa: E402

registry = ModelRegistry()
files = OutputFiles()
QUEUE_SIZE = int(os.environ.get("APP_QUEUE_SIZE", "64"))
# Two threads, the free Space's cores: share links are defined at this count (oneDNN's reduction order
# follows it), and each request may use both (docs/benchmarks.md: measured against one thread each).
reproducible.pin(int(os.environ.get("APP_TORCH_THREADS", reproducible.THREADS)))

with gr.Blocks(title=page.TITLE, delete_cache=(3600, 3600)) as demo:
    gr.Markdown(page.INTRO)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            shared = controls.build(registry, files)
        with gr.Column(scale=3):
            with gr.Tabs(selected="generate") as tabs:
                with gr.Tab("Generate", id="generate") as tab:
                    generate = generate_tab.build(shared, tab)
                with gr.Tab("Compare", id="compare") as tab:
                    compare = compare_tab.build(shared, tab)
                with gr.Tab("Explore", id="explore") as tab:
                    explore = explore_tab.build(shared, tab)
                with gr.Tab("Models", id="models") as tab:
                    cards = models_tab.build(shared, tab)
                with gr.Tab("API", id="api") as tab:
                    gr.Markdown(api.API_DOC)
                    tab.select(lambda: "api", None, shared.active_tab, api_visibility="private", queue=False)
    api.build(shared)
    controls.wire(shared, [generate["velocity"], explore["velocity"]])
    page.wire_load(demo, shared, tabs, generate, compare, explore, cards)

demo.queue(default_concurrency_limit=controls.CONCURRENCY, max_size=QUEUE_SIZE)
# show_error: an unexpected error inside Gradio itself reaches the caller as its message, not as a bare failure.
LAUNCH_KWARGS = dict(css=page.CSS, theme=gr.themes.Soft(primary_hue="indigo"), footer_links=["api", "gradio"], show_error=True)

if __name__ == "__main__":
    print(f"numerics: {reproducible.describe()}", flush=True)
    demo.launch(**LAUNCH_KWARGS)
