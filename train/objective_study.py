"""Sample efficiency on this machine: quality against training minutes, one curve per objective.

    python train/objective_study.py                      # 4 objectives x 10 min of CFG training, ~50 min in all
    python train/objective_study.py --minutes 4 --every 2 --n 200   # a shorter look

Each variant trains the CFG network with ``train/cfg.py --recipe cpu`` (the shipped recipe, so a
curve is the start of a real run) for ``--minutes`` of training time, exporting its EMA weights
every ``--every`` minutes (``--snapshot-every``); the clock counts time in the training loop only.
Then every snapshot is scored like a row of ``python -m diffusion_core.evaluate``: ``--n`` samples,
DPM-Solver++ 2M, 16 steps, guidance ``--guidance``, Frechet distance in the classifier's feature
space divided by the real-data floor at the same n, and the classifier's accuracy on the digit asked for.

Outputs: runs/study/<variant>/ (the runs, resumable: rerunning skips finished work),
runs/study/study.json and the figure --figure (default assets/fig_objectives.png).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> (label in the figure, extra flags for train/cfg.py)
VARIANTS = {
    "eps": ("DDPM epsilon, uniform t (Ho et al. 2020)", ["--objective", "ddpm_eps"]),
    "min_snr": ("epsilon, Min-SNR-5 weighting (Hang et al. 2023)", ["--objective", "ddpm_eps", "--min-snr-gamma", "5"]),
    "edm": ("EDM: preconditioning, log-normal sigma (Karras et al. 2022)", ["--objective", "edm"]),
    "flow": ("rectified flow, velocity (Liu et al. 2022)", ["--objective", "rectified_flow"]),
}


def train_variant(name: str, args) -> Path:
    run_dir = Path(args.out_dir) / name
    final = run_dir / "cfg.safetensors"
    if final.exists():
        print(f"{name}: already trained ({final})", flush=True)
        return run_dir
    cmd = [sys.executable, str(ROOT / "train" / "cfg.py"), "--recipe", "cpu", "--resume", "--no-progress",
           "--max-minutes", str(args.minutes), "--snapshot-every", str(args.every),
           "--run-dir", str(run_dir), "--out", str(final), *VARIANTS[name][1]]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return run_dir


def score_snapshots(run_dir: Path, args, reference, floor, classifier) -> list[dict]:
    from diffusion_core import metrics
    from diffusion_core.evaluate import Row, row_metrics, sample_row
    from diffusion_core.models import load_model
    from diffusion_core.pipeline import Settings

    points = []
    for rec in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()):
        if rec.get("type") != "snapshot":
            continue
        model = load_model(rec["path"])
        row = Row(Path(rec["path"]).stem, "study", Settings(model=rec["path"], n=args.n, guidance=args.guidance, seed=0), batch_size=100)
        t0 = time.perf_counter()
        samples = sample_row(row, model)
        m = row_metrics(samples, metrics.classify(classifier.net, samples.images.float().div(127.5).sub(1).unsqueeze(1)), reference, floor)
        points.append({"minutes": rec["train_minutes"], "step": rec["step"], "frechet": m["frechet"], "frechet_ratio": m["frechet_ratio"],
                       "accuracy": m["accuracy"], "confident": m["confident"], "sample_seconds": round(time.perf_counter() - t0, 1)})
        print(f"{run_dir.name} {rec['train_minutes']:.1f} min: FD/floor {m['frechet_ratio']:.2f} accuracy {m['accuracy']:.3f}", flush=True)
    return points


def plot(curves: dict, figure: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, pts in curves.items():
        ax.plot([p["minutes"] for p in pts], [p["frechet_ratio"] for p in pts], "o-", label=VARIANTS[name][0])
    ax.set_xlabel("training minutes on this CPU (2 cores, bf16 autocast)")
    ax.set_ylabel("FD / real-data floor (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"CFG network, {args.n} samples, DPM-Solver++ 2M 16 steps, guidance {args.guidance:g}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}")
    p.add_argument("--minutes", type=float, default=10.0, help="training minutes per variant")
    p.add_argument("--every", type=float, default=2.5, help="minutes between snapshots")
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
    if not (args.minutes > 0 and 0 < args.every <= args.minutes and args.n >= 4):
        p.error("--minutes and --every must be positive with --every <= --minutes, and --n at least 4")

    import torch

    from diffusion_core.evaluate import real_floor, reference_features
    from diffusion_core.models import load_model

    run_dirs = {name: train_variant(name, args) for name in names}
    torch.manual_seed(0)
    classifier = load_model(args.classifier)
    reference = reference_features(classifier, args.data_dir, max_train=args.n)
    floor = real_floor(reference, args.n)
    curves = {name: score_snapshots(d, args, reference, floor, classifier) for name, d in run_dirs.items()}
    out = {"minutes": args.minutes, "every": args.every, "n": args.n, "guidance": args.guidance, "floor": floor["frechet"],
           "classifier": str(classifier.path), "curves": curves, "labels": {k: VARIANTS[k][0] for k in curves}}
    Path(args.out_dir, "study.json").write_text(json.dumps(out, indent=2))
    plot(curves, Path(args.figure), args)
    print(f"wrote {Path(args.out_dir, 'study.json')} and {args.figure}")


if __name__ == "__main__":
    main()
