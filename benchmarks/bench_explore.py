"""CPU benchmark of the Explore tab: one-step denoising and SDEdit, as the app runs them.

    python -m benchmarks.bench_explore                        # checkpoints/ (or $DIFFUSION_CHECKPOINT_DIR)
    python -m benchmarks.bench_explore --repeats 20 --threads 2 --json assets/bench_explore.json

Cases (CFG at guidance 2, so one network call is a batch of 2; model loaded and warmed up first;
medians of ``--repeats``, with the minimum beside them):

* one-step denoising at t = 0.5: ``explore.one_step`` alone (the network call and its error), and
  the app's whole ``denoise`` without the error curve (the strip of x_t, prediction and error);
* SDEdit from half the noise range (t = 0.5) at 16 steps: ``sdedit_image`` (DPM-Solver++ 2M,
  the grid's levels from the one closest to t = 0.5 down to 0);
* the error curve over 49 noise levels (one batched call), computed once per digit and model.

Targets (issue 10): one-step denoising <= 0.1 s, SDEdit from half the range at 16 steps <= 0.5 s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from diffusion_core import explore as ex
from diffusion_core.pipeline import build_denoiser
from diffusion_core.registry import ModelRegistry
from diffusion_core.ui.common import available_models, parse_settings
from diffusion_core.ui.explore_tab import denoise, parse_edit, sdedit_image

from .report import machine_info, write_json

TARGETS = {"one_step_s": 0.1, "sdedit_half_16_s": 0.5}


def _time(fn, repeats: int) -> dict:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times)}


def bench(registry, repeats: int = 10, model: str = "cfg", index: int = 3, digit: int = 8) -> dict:
    models = available_models(registry)
    if model not in models:
        raise SystemExit(f"model {model!r} not found in {registry.directory} (found: {', '.join(models) or 'none'})")
    info = models[model]
    base = parse_settings(models, model=model, digit=digit if info.conditional else None)
    m, gate = registry.for_settings(base)
    den = build_denoiser(base, m, gate)
    scale = ex.model_scale(m)
    x0 = ex.to_model_space(ex.test_digit(index))
    eps, g = ex.noise(base.seed)
    label = ex.label_tensor(m, base.digit)
    es = parse_edit(models, model=model, digit=base.digit, index=index, level=0.5, steps=16)
    start, _ = ex.sdedit_start(es, m, build_denoiser(es.base(), m, gate))

    def one_step():
        den.reset(1, g)
        with torch.inference_mode():
            ex.one_step(den, scale, x0, eps, 0.5, label)

    def curve():
        den.reset(len(ex.ERROR_SIGMAS), g)
        with torch.inference_mode():
            ex.error_curve(den, x0, eps, label)

    return {
        "settings": es.to_dict(),
        "sdedit_steps_run": len(start.sigmas) - 1,
        "one_step": _time(one_step, repeats),
        "one_step_app": _time(lambda: denoise(registry, base, ex.test_digit(index), 0.5, curve=False), repeats),
        "sdedit_half_16": _time(lambda: sdedit_image(registry, es, info), repeats),
        "error_curve_49_levels": _time(curve, max(1, repeats // 4)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_explore", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint-dir", help="default $DIFFUSION_CHECKPOINT_DIR or checkpoints/")
    p.add_argument("--model", default="cfg")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = ModelRegistry(args.checkpoint_dir)
    r = bench(registry, args.repeats, args.model)
    checks = [("one-step denoising (explore.one_step)", r["one_step"], TARGETS["one_step_s"]),
              ("one-step denoising (app strip, denoise)", r["one_step_app"], TARGETS["one_step_s"]),
              (f"SDEdit from t=0.5, 16 steps ({r['sdedit_steps_run']} run)", r["sdedit_half_16"], TARGETS["sdedit_half_16_s"]),
              ("error curve, 49 levels (once per digit)", r["error_curve_49_levels"], None)]
    print(f"model {args.model} ({registry.directory}); torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; median (min) of {args.repeats}")
    print(f"{'case':<50}{'median s':>10}{'min s':>9}{'target':>8}  ok")
    for name, t, target in checks:
        ok = "" if target is None else ("yes" if t["median_s"] <= target else "NO")
        print(f"{name:<50}{t['median_s']:>10.4f}{t['min_s']:>9.4f}{'' if target is None else f'{target:.2f}':>8}  {ok}")
    result = {"cases": r, "targets_s": TARGETS,
              "passed": all(t["median_s"] <= target for _, t, target in checks if target is not None),
              "machine": machine_info(),
              "checkpoint_dir": str(registry.directory)}
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
