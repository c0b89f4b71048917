"""Train an MCL ensemble of K expert denoisers with a winner-takes-all loss.

    python train/mcl.py                          # the shipped checkpoints/mcl.safetensors (GPU), K=5
    python train/mcl.py --experts 3 --wta hard   # hard (stochastic) MCL
    python train/mcl.py --quick                  # a smoke run on 512 images
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_core.mcl import WTA_MODES  # noqa: E402
from diffusion_core.tasks import MCLTask, add_diffusion_args  # noqa: E402
from diffusion_core.training import common_parser, train  # noqa: E402


def main(argv=None):
    p = add_diffusion_args(common_parser(__doc__.splitlines()[0]))
    p.add_argument("--experts", type=int, default=5, help="K, the number of experts")
    p.add_argument("--wta", choices=WTA_MODES, default="annealed", help="winner-takes-all variant")
    p.add_argument("--relax-eps", type=float, default=0.05, help="relaxed WTA: share of the losers")
    p.add_argument("--t-start", type=float, default=0.05, help="annealed WTA: initial temperature")
    p.add_argument("--t-end", type=float, default=1e-5, help="annealed WTA: final temperature")
    args = p.parse_args(argv)
    if args.experts < 1:
        p.error("--experts must be at least 1")
    train(MCLTask(args), args)


if __name__ == "__main__":
    main()
