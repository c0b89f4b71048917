"""Train the cold-diffusion model: a UNet that restores Gaussian blur (Bansal et al. 2023).

    python train/cold_blur.py                    # the shipped checkpoints/cold_blur_v2.safetensors (CPU recipe on a CPU)
    python train/cold_blur.py --sigma-max 10 --name cold_blur   # the first restorer, kept for its share links
    python train/cold_blur.py --quick            # a smoke run on 512 images
    python train/cold_blur.py --resume           # carry on from runs/cold_blur_v2/state.pt

The degradation (``diffusion_core/cold.py``) blurs with a Gaussian whose standard deviation grows
geometrically over ``--levels`` levels from 0.5 to ``--sigma-max`` pixels (7: a blob that keeps
the 22 coarsest cosine modes; 30 would leave only the mean, the paper's flat image). The network sees
the blurred image (plus noise of ``--train-noise``, so that the noisy start of generation is not
new to it) and the level, and predicts the clean image, with the
L1 loss of the paper. The CPU recipe starts from the flow model's network (weights only; its
features know digits) and needs no other checkpoint.

Outputs: <run-dir>/metrics.jsonl, loss.png, samples_epochNNN.png (generated from a fully blurred
start with the improved sampler) and state.pt, and the EMA weights in --out (kind "cold", with its
training history). See diffusion_core/training.py for the loop and every shared flag.
"""
import argparse
import re

from diffusion_core.cold import BlurConfig
from diffusion_core.tasks import ColdTask
from diffusion_core.training import common_parser, parse_args, train

# The defaults per device (--recipe).
RECIPES = {
    "cpu": {"epochs": 8, "batch_size": 128, "blocks": 1, "init": "flow", "lr": 2e-3},
    "gpu": {"epochs": 20, "batch_size": 256},
}


def build_parser():
    p = common_parser(__doc__.splitlines()[0])
    p.add_argument("--levels", type=int, default=BlurConfig.levels, help="blur levels (the sampler's steps from a full blur)")
    p.add_argument("--sigma-max", type=float, default=BlurConfig.sigma_max, help="the last level's blur, pixels")
    p.add_argument("--train-noise", type=float, default=BlurConfig.train_noise, help="noise added to the network's input in training")
    p.add_argument("--start-noise", type=float, default=0.02, help="noise on the fully blurred start of generation (recorded as the model's default)")
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True, help="self-attention at 7x7 (a fresh network)")
    p.add_argument("--name", default=None, help="the model's name: its run folder and checkpoint (default cold_blur_v2)")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from a trained ddpm/cfg/flow network (weights only; 'none' for a fresh one)")
    return p


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, RECIPES, argv)
    if args.name is not None and not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", args.name):
        parser.error(f"--name must be lower-case letters, digits and _ (it names a file), got {args.name!r}")
    if args.init and args.init.lower() == "none":
        args.init = None
    train(ColdTask(args), args)


if __name__ == "__main__":
    main()
