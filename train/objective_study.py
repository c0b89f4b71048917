"""Sample efficiency on this machine: quality against training, one curve per objective.

    python train/objective_study.py                      # 4 objectives x 1000 steps of CFG training (~10 min each)
    python train/objective_study.py --steps 400 --every 200 --n 200   # a shorter look

Each variant trains the CFG network with ``train/cfg.py --recipe cpu`` (the shipped recipe, so a
curve is the start of a real run: ``--resume`` without ``--stop-at`` carries it on to the end)
until step ``--steps``, exporting its EMA weights every ``--every`` steps (``--snapshot-every``).
Every variant costs the same per step (same network and batch; the objectives differ only in
elementwise scalings), so curves are compared per image seen, which does not depend on what else
the machine runs; the figure's top axis converts images to minutes at ``--images-per-s``, this
CPU's measured training throughput (train/benchmark_loop.py). Every snapshot is scored like a row
of ``python -m diffusion_core.evaluate``: ``--n`` samples, DPM-Solver++ 2M, 16 steps, guidance
``--guidance``, the Frechet distance in the classifier's feature space divided by the real-data
floor at the same n, and the classifier's accuracy on the digit asked for.

Outputs: runs/study/<variant>/ (the runs; rerunning skips finished work), runs/study/study.json
and the figure --figure (default assets/fig_objectives.png).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (label in the figure, extra flags for train/cfg.py)
VARIANTS = {
    "eps": ("DDPM epsilon, uniform t (Ho et al. 2020)", ["--objective", "ddpm_eps"]),
    "min_snr": ("epsilon, Min-SNR-5 weighting (Hang et al. 2023)", ["--objective", "ddpm_eps", "--min-snr-gamma", "5"]),
    "edm": ("EDM: preconditioning, log-normal sigma (Karras et al. 2022)", ["--objective", "edm"]),
    "flow": ("rectified flow, velocity (Liu et al. 2022)", ["--objective", "rectified_flow"]),
}


def train_variant(name: str, args) -> Path:
    run_dir = Path(args.out_dir) / name
    cmd = [sys.executable, str(ROOT / "train" / "cfg.py"), "--recipe", "cpu", "--resume", "--no-progress",
           "--stop-at", str(args.steps), "--snapshot-every", str(args.every),
           "--run-dir", str(run_dir), "--out", str(run_dir / "cfg.safetensors"), *VARIANTS[name][1]]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return run_dir


def score_snapshots(run_dir: Path, args, reference, floor, classifier) -> list[dict]:
    from diffusion_core import metrics
    from diffusion_core.evaluate.config import Row
    from diffusion_core.evaluate.sampling import sample_row
    from diffusion_core.evaluate.scores import row_metrics
    from diffusion_core.models import load_model
    from diffusion_core.pipeline import Settings

    cache_path = run_dir / "scores.json"  # snapshot scores, so a rerun only scores new snapshots
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    points = []
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for rec in sorted((r for r in records if r.get("type") == "snapshot" and r["step"] <= args.steps), key=lambda r: r["step"]):
        key = f"{rec['path']}|n={args.n}|g={args.guidance}|{Path(classifier.path).resolve()}"
        if key in cache:
            points.append(cache[key])
            continue
        model = load_model(rec["path"])
        row = Row(Path(rec["path"]).stem, "study", Settings(model=rec["path"], n=args.n, guidance=args.guidance, seed=0), batch_size=100)
        t0 = time.perf_counter()
        samples = sample_row(row, model)
        m = row_metrics(samples, metrics.classify(classifier.net, samples.images.float().div(127.5).sub(1).unsqueeze(1)), reference, floor)
        points.append({"step": rec["step"], "images_seen": rec["step"] * 128, "train_minutes": rec["train_minutes"], "frechet": m["frechet"], "frechet_ratio": m["frechet_ratio"],
                       "accuracy": m["accuracy"], "confident": m["confident"], "sample_seconds": round(time.perf_counter() - t0, 1)})
        cache[key] = points[-1]
        cache_path.write_text(json.dumps(cache, indent=1))
        print(f"{run_dir.name} step {rec['step']}: FD/floor {m['frechet_ratio']:.2f} accuracy {m['accuracy']:.3f}", flush=True)
    return points


def plot(curves: dict, figure: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in curves.items():
        ax.plot([p["images_seen"] / 1000 for p in pts], [p["frechet_ratio"] for p in pts], "o-", label=VARIANTS[name][0])
    ax.set_xlabel("training images seen (thousands; batch 128)")
    top = ax.secondary_xaxis("top", functions=(lambda k: k * 1000 / args.images_per_s / 60, lambda m: m * 60 * args.images_per_s / 1000))
    top.set_xlabel(f"minutes on the 2-core CPU at {args.images_per_s:g} images/s (bf16)", fontsize=8)
    ax.set_ylabel("FD / real-data floor (lower is better)")
    ax.set_yscale("log")
    fig.suptitle(f"CFG network, {args.n} samples a point, DPM-Solver++ 2M 16 steps, guidance {args.guidance:g}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per variant (batch 128)")
    p.add_argument("--every", type=int, default=200, help="steps between snapshots")
    p.add_argument("--images-per-s", type=float, default=364.0, help="training throughput for the minutes axis (train/benchmark_loop.py on this CPU)")
    p.add_argument("--n", type=int, default=500, help="samples per snapshot")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale of the scored samples")
    p.add_argument("--classifier", default="classifier", help="the metrics' classifier (name or path)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out-dir", default="runs/study")
    p.add_argument("--figure", default="assets/fig_objectives.png")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        p.error(f"unknown variant(s) {bad}; expected some of {', '.join(VARIANTS)}")
    if not (args.steps > 0 and 0 < args.every <= args.steps and args.n >= 4 and args.images_per_s > 0):
        p.error("--steps, --every and --images-per-s must be positive with --every <= --steps, and --n at least 4")

    import torch

    from diffusion_core.evaluate.reference import real_floor, reference_features
    from diffusion_core.models import load_model

    run_dirs = {name: train_variant(name, args) for name in names}
    torch.manual_seed(0)
    classifier = load_model(args.classifier)
    reference = reference_features(classifier, args.data_dir, max_train=args.n)
    floor = real_floor(reference, args.n)
    curves = {name: score_snapshots(d, args, reference, floor, classifier) for name, d in run_dirs.items()}
    out = {"steps": args.steps, "every": args.every, "images_per_s": args.images_per_s, "n": args.n, "guidance": args.guidance, "floor": floor["frechet"],
           "classifier": str(classifier.path), "curves": curves, "labels": {k: VARIANTS[k][0] for k in curves}}
    Path(args.out_dir, "study.json").write_text(json.dumps(out, indent=2))
    plot(curves, Path(args.figure), args)
    print(f"wrote {Path(args.out_dir, 'study.json')} and {args.figure}")


if __name__ == "__main__":
    main()
