"""Train the class-conditional rectified-flow model (velocity prediction) with label dropout for CFG.

    python train/flow.py                         # the shipped checkpoints/flow.safetensors (CPU recipe on a CPU)
    python train/flow.py --recipe gpu            # the GPU recipe (the default where CUDA is available)
    python train/flow.py --quick                 # a smoke run on 512 images
    python train/flow.py --resume                # carry on from runs/flow/state.pt

The network sees ``x_t = (1 - t) x0 + t eps`` and predicts the velocity ``eps - x0`` (Liu et al.
2022), with t drawn logit-normal in training (--flow-t; Esser et al. 2024); labels are replaced by
the null class with probability --p-uncond, so one network gives the
conditional and the unconditional velocity and guidance works as for cfg. Wrapped as a denoiser,
it runs with every sampler (see diffusion_core/objectives.py).

Outputs: <run-dir>/metrics.jsonl, loss.png, samples_epochNNN.png and state.pt, and the EMA weights
in --out (kind "flow"). See diffusion_core/training.py for the loop and every shared flag.
"""


from diffusion_core.tasks import DiffusionTask, add_diffusion_args
from diffusion_core.training import common_parser, parse_args, train

# The defaults per device (--recipe): the CPU one fits an hour on a 2-core CPU.
RECIPES = {
    "cpu": {"epochs": 16, "batch_size": 128, "blocks": 1, "flow_t": "logit_normal"},
    "gpu": {"epochs": 20, "batch_size": 256, "flow_t": "logit_normal"},
}


def main(argv=None):
    p = add_diffusion_args(common_parser(__doc__.splitlines()[0]))
    p.set_defaults(objective="rectified_flow")
    p.add_argument("--p-uncond", type=float, default=0.1, help="label dropout probability")
    args = parse_args(p, RECIPES, argv)
    if args.objective != "rectified_flow":
        p.error("train/flow.py trains --objective rectified_flow; use train/cfg.py for the others")
    train(DiffusionTask(args, name="flow", conditional=True), args)


if __name__ == "__main__":
    main()
