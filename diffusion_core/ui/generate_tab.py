"""The Generate tab: run a trajectory and stream throttled frames, then the final results."""
from __future__ import annotations

import math
import time
from typing import Any, Iterator

import numpy as np
import torch

from ..explore import velocity
from ..palette import expert_color
from ..pipeline import Settings, to_uint8, trajectory
from .common import ModelInfo, final_image
from .render import (SCORE_HEAD_SENTENCE, OutputFiles, Recording, expert_borders, expert_chart, filmstrip, frame_scale, gif_frames, initial_noise,
                     png_bytes, render_grid, render_rgb_grid, velocity_tiles, vp_frame, write_gif)
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
    noise = initial_noise(settings)
    throttle.ready(force=True)
    yield {"noisy": render_grid(noise, fs), "denoised": None, "status": _status(0, settings.steps, None, 0.0)}
    xs, dens, sigmas, experts, probs = [], [], [], [], []
    last = None
    prev = None  # the state before the step (flow models: for the velocity)
    if info.is_flow:
        g = torch.Generator(device="cpu").manual_seed(settings.seed)
        prev = torch.randn((n, 1, 28, 28), generator=g, dtype=torch.float32)
    for step in trajectory(settings, model, gate, watch_gate=True, guide=guide):
        if prev is not None and step.index == 0:
            prev = prev * math.sqrt(step.sigma**2 + 1)
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
