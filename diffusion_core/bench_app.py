"""CPU benchmark of what a visitor of the app waits for, at the app's default settings.

    python -m diffusion_core.bench_app                        # checkpoints/ (or $DIFFUSION_CHECKPOINT_DIR)
    python -m diffusion_core.bench_app --checkpoint-dir DIR --repeats 10 --json runs/bench_app.json
    python -m diffusion_core.bench_app --url http://127.0.0.1:7860/   # also through a running app's /generate

Cases (models loaded and warmed up first; the median of ``--repeats`` runs):

* one CFG digit: time to the first streamed frame (the starting noise), to the first denoising
  step's frame, and to the final image, through ``ui.stream`` (the app's code path with its frame
  throttle, PNG encoding excluded: Gradio does that);
* ten digits, one per class (n=10, digit cycling 0-9): time to the final image;
* the same two through ``pipeline.generate`` alone (no frames rendered).

Targets (issue 4, the 2-core CPU of a free Space): final image <= 0.5 s, first frame <= 0.15 s,
ten digits <= 1.2 s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from . import ui
from .pipeline import Settings, generate
from .registry import ModelRegistry

TARGETS = {"first_frame_s": 0.15, "final_image_s": 0.5, "ten_digits_s": 1.2}


def _stream_times(registry, settings, info) -> dict:
    t0 = time.perf_counter()
    first = first_step = final = None
    for update in ui.stream(registry, settings, info, extras=False):  # frames throttled as in the app
        now = time.perf_counter() - t0
        if first is None:
            first = now
        elif first_step is None and update.get("denoised") is not None:
            first_step = now
        if "final" in update:
            final = now
    return {"first_frame_s": first, "first_step_frame_s": first_step if first_step is not None else final, "final_s": final}


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def bench(registry, repeats: int = 5, model: str = "cfg") -> dict:
    models = ui.available_models(registry)
    if model not in models:
        raise SystemExit(f"model {model!r} not found in {registry.directory} (found: {', '.join(models) or 'none'})")
    info = models[model]
    one = ui.parse_settings(models, model=model)  # the app's defaults: one image
    ten = ui.parse_settings(models, model=model, n=10)  # digits 0..9 when the model is conditional
    m, gate = registry.for_settings(one)
    for s in (one, ten):  # warm up (first calls allocate)
        _stream_times(registry, s, info)
        generate(Settings(**s.to_dict()), m, gate)
    rows = {}
    for name, s in (("one_digit", one), ("ten_digits", ten)):
        app_runs = [_stream_times(registry, s, info) for _ in range(repeats)]
        lib = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            generate(Settings(**s.to_dict()), m, gate)
            lib.append(time.perf_counter() - t0)
        rows[name] = {
            "settings": s.to_dict(),
            "app_first_frame_s": _median(app_runs, "first_frame_s"),
            "app_first_step_frame_s": _median(app_runs, "first_step_frame_s"),
            "app_final_image_s": _median(app_runs, "final_s"),
            "pipeline_generate_s": statistics.median(lib),
            "pipeline_generate_min_s": min(lib),
        }
    return rows


def bench_http(url: str, repeats: int = 5) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False)
    out = {}
    for name, n in (("one_digit", 1), ("ten_digits", 10)):
        client.predict(n=n, api_name="/generate")  # warm up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            client.predict(n=n, api_name="/generate")
            times.append(time.perf_counter() - t0)
        out[name] = {"http_generate_s": statistics.median(times)}
    # what the page sees: the streaming event, first update (the noise frame) and the final image
    d = Settings()
    args = (d.model, "any", d.guidance, d.sampler, d.steps, d.eta, d.routing, str(d.seed), d.n)
    firsts, finals = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        first = final = None
        for update in client.submit(*args, api_name="/generate_stream"):
            now = time.perf_counter() - t0
            first = now if first is None else first
            if final is None and update[3] is not None:  # outputs: noisy, denoised, status, final, ...
                final = now
        if i:  # the first round warms up
            firsts.append(first)
            finals.append(final)
    out["one_digit"].update(http_stream_first_frame_s=statistics.median(firsts), http_stream_final_image_s=statistics.median(finals))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusion_core.bench_app", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint-dir", help="default $DIFFUSION_CHECKPOINT_DIR or checkpoints/")
    p.add_argument("--model", default="cfg")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--url", help="also time /generate through a running app (gradio_client)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = ModelRegistry(args.checkpoint_dir)
    rows = bench(registry, args.repeats, args.model)
    if args.url:
        for k, v in bench_http(args.url, args.repeats).items():
            rows[k].update(v)
    one, ten = rows["one_digit"], rows["ten_digits"]
    checks = [
        ("one digit: first frame (noise)", one["app_first_frame_s"], TARGETS["first_frame_s"]),
        ("one digit: first denoising frame", one["app_first_step_frame_s"], TARGETS["first_frame_s"]),
        ("one digit: final image", one["app_final_image_s"], TARGETS["final_image_s"]),
        ("one digit: pipeline.generate", one["pipeline_generate_s"], TARGETS["final_image_s"]),
        ("ten digits: final image", ten["app_final_image_s"], TARGETS["ten_digits_s"]),
        ("ten digits: pipeline.generate", ten["pipeline_generate_s"], TARGETS["ten_digits_s"]),
    ]
    if "http_generate_s" in one:
        checks += [("one digit: HTTP stream, first frame", one["http_stream_first_frame_s"], TARGETS["first_frame_s"]),
                   ("one digit: HTTP stream, final image", one["http_stream_final_image_s"], TARGETS["final_image_s"]),
                   ("one digit: HTTP /generate", one["http_generate_s"], TARGETS["final_image_s"]),
                   ("ten digits: HTTP /generate", ten["http_generate_s"], TARGETS["ten_digits_s"])]
    s = one["settings"]
    print(f"model {args.model} ({registry.directory}), {s['sampler']}, {s['steps']} steps, guidance {s['guidance']:g}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; median of {args.repeats}")
    print(f"{'case':<36}{'seconds':>10}{'target':>9}  ok")
    for name, value, target in checks:
        print(f"{name:<36}{value:>10.3f}{target:>9.2f}  {'yes' if value <= target else 'NO'}")
    result = {
        "cases": rows,
        "targets_s": TARGETS,
        "passed": all(v <= t for _, v, t in checks),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "checkpoint_dir": str(registry.directory),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
