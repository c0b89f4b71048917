"""``python -m diffusion_core.evaluate``: the command line of the evaluation."""
from __future__ import annotations

import argparse
import shlex
import sys

import torch

from ..data import MNISTNotFound
from ..guidance import AUTOGUIDE_OF
from .config import ROUTING_CHOICES, EvalConfig
from .report import results_markdown
from .run import evaluate

# CLI


QUICK = {"n": 500, "sweep_n": 200, "diversity_n": 200, "usage_n": 64, "diagnosis_n": 200}
CPU_BATCH = 100  # on a CPU, large batches are slower per image (page faults), so the CPU default is small


def _csv(cast):
    def parse(text):
        items = [t.strip() for t in str(text).split(",") if t.strip()]
        try:
            return tuple(cast(t) for t in items)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffusion_core.evaluate",
        description="Metrics table, results.json and MCL analysis figures for the ddpm/cfg/flow/mcl checkpoints.",
    )
    d = EvalConfig()
    p.add_argument("--models", type=_csv(str), default=d.models, help="subset of ddpm,cfg,flow,mcl (default: all)")
    p.add_argument("--samplers", type=_csv(str), default=d.samplers, help=f"samplers; the first one runs the main rows, all run in the sweep (default: {','.join(d.samplers)})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"steps of the main rows (default {d.steps})")
    p.add_argument("--sweep-steps", type=_csv(int), default=d.sweep_steps, help="step counts of the sampler sweep (default 4,8,16,32)")
    p.add_argument("--sweep-model", default=None, help="model of the sampler sweep (default: the first of --models)")
    p.add_argument("--guidance-scales", type=_csv(float), default=d.guidance_scales, help="guidance scales of the cfg and flow rows (default 0,1,2,3,5)")
    p.add_argument("--routings", type=_csv(str), default=d.routings, help=f"MCL rows: {ROUTING_CHOICES} (default: all)")
    p.add_argument("--autoguidance", type=_csv(float), default=d.autoguidance, metavar="W,...",
                   help="autoguidance weights: a ddpm row (and an mcl row with the default routing) for each weight and guide (default: none)")
    p.add_argument("--autoguide", choices=AUTOGUIDE_OF, default=d.autoguide,
                   help="the mcl autoguidance rows compare the guide with the output, or with the experts' mixture (MCL on one trunk; "
                        "guidance.AutoguidanceDenoiser) (default output)")
    p.add_argument("--guides", type=_csv(str), default=d.guides, metavar="NAME,...",
                   help=f"the bad models of the autoguidance rows: checkpoint names or .safetensors paths (default {','.join(d.guides)})")
    p.add_argument("--classifier2", default=d.classifier2, help="the second classifier's checkpoint (its columns; 'none': without it; "
                   f"default {d.classifier2}, when present)")
    p.add_argument("--n", type=int, default=None, help=f"samples per main row (default {d.n}; {QUICK['n']} with --quick)")
    p.add_argument("--sweep-n", type=int, default=None, help=f"samples per sweep row, 0 for no sweep (default {d.sweep_n}; {QUICK['sweep_n']} with --quick)")
    p.add_argument("--diversity-n", type=int, default=None, help=f"images per expert in the digit-histogram figure (default {d.diversity_n}; {QUICK['diversity_n']} with --quick)")
    p.add_argument("--usage-n", type=int, default=None, help=f"samples in the expert-usage figure (default {d.usage_n}; {QUICK['usage_n']} with --quick)")
    p.add_argument("--diagnosis-n", type=int, default=None, help=f"MNIST test images in the MCL diagnosis, 0 for none (default {d.diagnosis_n}; {QUICK['diagnosis_n']} with --quick)")
    p.add_argument("--diagnosis-levels", type=int, default=d.diagnosis_levels, help=f"noise levels of the MCL diagnosis (default {d.diagnosis_levels})")
    p.add_argument("--batch-size", type=int, default=None, help=f"images per sampling batch; batch i uses seed + i (default {d.batch_size} "
                   f"on CUDA, {CPU_BATCH} on the CPU, where larger batches are slower per image)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--checkpoint-dir", default=None, help="folder with ddpm/cfg/flow/mcl/gating/classifier.safetensors (default: checkpoints/ or $DIFFUSION_CHECKPOINT_DIR)")
    p.add_argument("--data-dir", default=None, help="torchvision MNIST root (default $MNIST_DIR or ./data)")
    p.add_argument("--out-dir", default=d.out_dir, help="where results.json, results.md and the figures go (default assets/)")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True, help="write the figures (default yes)")
    p.add_argument("--quick", action="store_true", help="small sample counts for a fast check")
    p.add_argument("--fid-inception", action="store_true", help="also InceptionV3 FID, if torchvision's weights are in the local torch hub cache (never downloads)")
    p.add_argument("--record-quality", action="store_true", help="write each model's headline row (ddpm; cfg at the app's default "
                   "guidance; mcl with its default routing) into the checkpoint's metadata, for the app's model cards")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    d = EvalConfig()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = {}
    for name in QUICK:
        v = getattr(args, name)
        sizes[name] = v if v is not None else (QUICK[name] if args.quick else getattr(d, name))
    as_given = ("steps", "sweep_steps", "sweep_model", "guidance_scales", "autoguidance", "autoguide", "guides", "routings", "seed", "checkpoint_dir",
                "data_dir", "out_dir", "figures", "fid_inception", "record_quality", "diagnosis_levels")
    return EvalConfig(
        models=tuple(m.lower() for m in args.models),
        samplers=tuple(s.lower() for s in args.samplers),
        classifier2=None if str(args.classifier2).lower() in ("none", "") else args.classifier2,
        batch_size=args.batch_size or (d.batch_size if device.startswith("cuda") else CPU_BATCH),
        device=device,
        **{name: getattr(args, name) for name in as_given},
        **sizes,
    )


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    command = " ".join(["python -m diffusion_core.evaluate", *map(shlex.quote, argv)])
    try:
        results = evaluate(config_from_args(args), command=command)
    except (ValueError, MNISTNotFound) as e:  # configuration, checkpoint (CheckpointError) and data problems
        raise SystemExit(f"error: {e}") from None
    print(results_markdown(results))
    print(f"\nresults.json, results.md and {len(results['figures'])} figures in {args.out_dir} ({results['seconds']:.1f} s)", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
