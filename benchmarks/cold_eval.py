"""Evaluate the cold-diffusion model (docs/cold.md): restoration and generation.

    python -m benchmarks.cold_eval                       # writes assets/eval_cold/results.{json,md}
    python -m benchmarks.cold_eval --images 200 --levels 5 20 --samples 200   # a quick look
    python -m benchmarks.cold_eval --real-starts --images 100 --levels 20 --out assets/eval_cold/real_starts

* **Restoration**: the first ``--images`` MNIST test digits blurred to each of ``--levels`` and
  restored by the naive sampler (Algorithm 1) and the improved one (Algorithm 2) of Bansal et al.;
  the mean squared error against the clean digit (pixels in [-1, 1]).
* **Generation** from the fully blurred start (``cold.StartDistribution``) with each sampler,
  ``--samples`` images (seed 0): class entropy and confidence read by both of the evaluation's
  classifiers, and the Frechet distance in the main classifier's features against the MNIST test
  set, beside real data's floor at the same count (``evaluate.real_floor``).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from diffusion_core import metrics
from diffusion_core.cold import COLD_SAMPLERS, StartDistribution, restore
from diffusion_core.data import load_mnist
from diffusion_core.evaluate.reference import real_floor, reference_features
from diffusion_core.models import load_model

OUT = Path(__file__).resolve().parent.parent / "assets" / "eval_cold"


def restoration(restorer, clean: torch.Tensor, levels, batch: int = 500) -> list[dict]:
    rows = []
    for level in levels:
        row = {"level": level, "sigma_px": round(float(restorer.degradation.sigmas[level]), 3)}
        blurred = restorer.degradation(clean, level)
        row["mse_blurred"] = float(((blurred - clean) ** 2).mean())
        for name in COLD_SAMPLERS:
            out = torch.cat([restore(restorer, blurred[i:i + batch], level, name) for i in range(0, len(clean), batch)])
            row[f"mse_{name}"] = float(((out.clamp(-1, 1) - clean) ** 2).mean())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def real_starts(restorer, n: int, data_dir=None, seed: int = 0) -> torch.Tensor:
    """``n`` random MNIST training digits blurred to the last level, no noise: what the restorer
    makes of a start that certainly belongs to a digit (``--real-starts``)."""
    images = load_mnist(data_dir, train=True)[0]
    idx = torch.randint(0, len(images), (n,), generator=torch.Generator().manual_seed(seed))
    return restorer.degradation(images[idx], restorer.degradation.levels)


def generation(model, restorer, n: int, classifiers, reference, floor, seed: int = 0, batch: int = 500, start_x=None) -> list[dict]:
    start = StartDistribution.from_dict(model.config["generation"])
    x = start.sample(n, torch.Generator().manual_seed(seed)) if start_x is None else start_x
    rows = []
    for name in COLD_SAMPLERS:
        out = torch.cat([restore(restorer, x[i:i + batch], restorer.degradation.levels, name) for i in range(0, n, batch)]).clamp(-1, 1)
        row = {"sampler": name, "samples": n, "seed": seed}
        for key, clf in classifiers.items():
            c = metrics.classify(clf.net, out)
            row[key] = {"entropy": metrics.histogram_entropy(metrics.class_histogram(c["preds"])),
                        "confident": metrics.confident_fraction(c["probs"]),
                        "histogram": metrics.class_histogram(c["preds"]).tolist()}
            if key == "classifier":
                mu, cov = metrics.feature_stats(c["features"])
                fd = metrics.frechet_from_stats(mu, cov, reference.test_mu, reference.test_cov)
                row["frechet"], row["frechet_floor"], row["frechet_ratio"] = fd, floor["frechet"], fd / floor["frechet"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def to_markdown(result: dict) -> str:
    lines = ["| level | blur σ (px) | MSE of the blurred digit | naive (Alg. 1) | improved (Alg. 2) |", "|---:|---:|---:|---:|---:|"]
    for r in result["restoration"]:
        lines.append(f"| {r['level']} | {r['sigma_px']:.2f} | {r['mse_blurred']:.4f} | {r['mse_naive']:.4f} | {r['mse_improved']:.4f} |")
    lines += ["", "| generation | samples | entropy (classifier / classifier2) | confident ≥ 0.9 | FD | FD / real floor |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in result["generation"]:
        a, b = r["classifier"], r["classifier2"]
        lines.append(f"| {r['sampler']} | {r['samples']} | {a['entropy']:.3f} / {b['entropy']:.3f} | {a['confident']:.3f} / {b['confident']:.3f} "
                     f"| {r['frechet']:.2f} | {r['frechet_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def hardware() -> str:
    """The processor (from /proc/cpuinfo where there is one), threads and torch version."""
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cold_blur_v2")
    p.add_argument("--images", type=int, default=1000, help="test digits to restore (the first N)")
    p.add_argument("--levels", type=int, nargs="+", default=[5, 10, 15, 20])
    p.add_argument("--samples", type=int, default=1000, help="generated images per sampler")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--real-starts", action="store_true", help="generate from blurred training digits instead of the start distribution")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    model = load_model(args.model)
    restorer = model.restorer()
    for level in args.levels:
        restorer.degradation.check_level(level)
    clean = load_mnist(args.data_dir, train=False)[0][: args.images]
    result = {"model": args.model, "degradation": model.config["degradation"], "images": args.images,
              "restoration": restoration(restorer, clean, args.levels)}
    classifiers = {"classifier": load_model("classifier"), "classifier2": load_model("classifier2")}
    reference = reference_features(classifiers["classifier"], args.data_dir)
    floor = real_floor(reference, args.samples)
    start_x = real_starts(restorer, args.samples, args.data_dir) if args.real_starts else None
    result["starts"] = "blurred training digits" if args.real_starts else "the checkpoint's start distribution"
    result["generation"] = generation(model, restorer, args.samples, classifiers, reference, floor, start_x=start_x)
    result["hardware"] = hardware()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
