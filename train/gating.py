"""Train the gating network on a frozen MCL checkpoint (target: each example's winning expert).

    python train/gating.py                       # uses checkpoints/mcl.safetensors
    python train/gating.py --mcl PATH --quick

The target for a training image is the expert with the lowest loss on it at a random noise
level (drawn as the MCL training drew them, or with --gate-sigma loguniform spread evenly in
log-sigma, so the clean end of the range is trained as often as the noisy end); the loss is
cross-entropy. The per-epoch grid shows gated samples from the ensemble.

Outputs: <run-dir>/metrics.jsonl, loss.png, samples_epochNNN.png and state.pt (resume with
--resume after any interruption, SIGKILL included), and the EMA weights in --out. With --quick
both default under runs/gating-quick/, so a smoke run never overwrites the shipped checkpoint.
See diffusion_core/training.py for the loop and every shared flag (python train/gating.py -h).
"""


from diffusion_core.mcl_training import GatingTask
from diffusion_core.training import common_parser, parse_args, train

# The defaults per device (--recipe): the CPU one made the shipped checkpoint on a 2-core CPU.
RECIPES = {
    "cpu": {"epochs": 2, "batch_size": 128},
    "gpu": {"epochs": 5},
}


def main(argv=None):
    p = common_parser(__doc__.splitlines()[0], epochs=5, lr=1e-3)
    p.add_argument("--mcl", default="mcl", help="MCL checkpoint (name or path)")
    p.add_argument("--gate-sigma", choices=("objective", "loguniform"), default="objective",
                   help="noise levels of the training examples: objective draws them as the MCL training did (the shipped "
                        "gate; with uniform DDPM timesteps only ~1%% fall below sigma 0.05); loguniform spreads them evenly "
                        "in log-sigma over the ensemble's range, as a sampler's steps are spread")
    args = parse_args(p, RECIPES, argv)
    train(GatingTask(args), args)


if __name__ == "__main__":
    main()
