"""Train an MCL ensemble of K expert denoisers with a winner-takes-all loss.

    python train/mcl.py                          # checkpoints/mcl_parts.safetensors (CPU recipe on a CPU): K=5 heads on one trunk,
                                                 # a score head, each training image won by one head
    python train/mcl.py --mcl-arch separate --wta-scope step --wta annealed --epochs 5
                                                 # checkpoints/mcl.safetensors: K=5 separate UNets (then train/gating.py)
    python train/mcl.py --epochs 2 --name mcl_shared   # checkpoints/mcl_shared.safetensors: the same recipe for 2 epochs
    python train/mcl.py --recipe gpu             # the GPU recipe (the default where CUDA is available)
    python train/mcl.py --experts 3 --wta hard   # hard (stochastic) MCL
    python train/mcl.py --quick                  # a smoke run on 512 images
    torchrun --nproc_per_node 2 train/mcl.py     # DDP; win counts summed, the per-image table kept equal, over processes

Every expert is scored on the same noisy batch; --wta picks how the per-example losses are
weighted (see diffusion_core/mcl.py), --wta-scope where the winner is decided (per noisy example or
per clean image, diffusion_core/mcl_training.py). Each epoch record holds the examples each expert won
(``wins``) and their shares (``win_rates``); an expert winning under 5% is reported with a
WARNING on stderr and a ``warnings`` entry in metrics.jsonl.

Outputs: <run-dir>/metrics.jsonl, loss.png, samples_epochNNN.png and state.pt (resume with
--resume after any interruption, SIGKILL included), and the EMA weights in --out. With --quick
both default under runs/mcl-quick/, so a smoke run never overwrites the shipped checkpoint.
See diffusion_core/training.py for the loop and every shared flag (python train/mcl.py -h).
"""

import re

from diffusion_core.mcl_training import MCL_ARCHS, WTA_SCOPES, MCLTask
from diffusion_core.tasks import add_diffusion_args
from diffusion_core.training import common_parser, parse_args, train
from diffusion_core.wta import WTA_MODES

# The defaults per device (--recipe): the CPU one made the shipped mcl_parts on a 2-core CPU,
# starting the trunk and every head from the shipped DDPM (so they inherit its objective: epsilon,
# Min-SNR-5). Six epochs of the shared network are 2,814 steps of 128 images (360,192 images). The
# shared network trains at about 75% of one model's images/s (train/benchmark_loop.py), so that is
# about 23 minutes on a machine that reads 350 for one model, and 46 minutes on the 2-core AMD EPYC
# that read 175 (131 for the shared network); docs/mcl.md.
RECIPES = {
    "cpu": {"init": "ddpm", "epochs": 6, "batch_size": 128, "lr": 5e-4, "warmup_steps": 50},
    "gpu": {"epochs": 20, "batch_size": 256},
}


def main(argv=None):
    p = add_diffusion_args(common_parser(__doc__.splitlines()[0]))
    p.add_argument("--experts", type=int, default=5, help="K, the number of experts")
    p.add_argument("--wta", choices=WTA_MODES, default="hard", help="winner-takes-all variant")
    p.add_argument("--relax-eps", type=float, default=0.05, help="relaxed WTA: share of the losers")
    p.add_argument("--t-start", type=float, default=0.05, help="annealed WTA: initial temperature")
    p.add_argument("--t-end", type=float, default=1e-5, help="annealed WTA: final temperature")
    p.add_argument("--mcl-update", choices=("routed", "full"), default="routed",
                   help="routed: score all experts without autograd, then train each example through one expert "
                        "(the winner, or a draw from the WTA weights); full: every expert forward and backward on every example")
    p.add_argument("--mcl-arch", choices=MCL_ARCHS, default="shared",
                   help="separate: K UNets (the gating network is trained afterwards, train/gating.py); shared: one UNet trunk, "
                        "K hypothesis heads and a score head trained together")
    p.add_argument("--head-blocks", type=int, default=1,
                   help="shared: decoder ResBlocks (the last ones, at full resolution) each hypothesis owns before its output convolution")
    p.add_argument("--wta-scope", choices=WTA_SCOPES, default="example",
                   help="step: the winner of each noisy example; example: each clean image's winner over its noise levels, "
                        "re-assigned at every visit (see diffusion_core/mcl_training.py)")
    p.add_argument("--assign-momentum", type=float, default=0.5,
                   help="--wta-scope example: weight of a visit's losses in the example's running row")
    p.add_argument("--assign-init", choices=("kmeans", "none"), default="kmeans",
                   help="--wta-scope example: start the per-example rows from k-means on the images (no labels), or empty")
    p.add_argument("--name", default=None,
                   help="the model's name, which names its run folder and checkpoint (default: mcl_parts for --mcl-arch shared, mcl for separate)")
    p.add_argument("--score-weight", type=float, default=0.1, help="shared: weight of the score head's cross-entropy in the loss")
    args = parse_args(p, RECIPES, argv)
    if args.experts < 1:
        p.error("--experts must be at least 1")
    if args.name is not None and not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", args.name):
        p.error(f"--name must be lower-case letters, digits and _ (it names a file), got {args.name!r}")
    train(MCLTask(args), args)


if __name__ == "__main__":
    main()
