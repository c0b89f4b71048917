"""Train the unconditional DDPM (epsilon-prediction, linear schedule, T=1000).

    python train/ddpm.py                         # the shipped checkpoints/ddpm.safetensors (CPU recipe on a CPU)
    python train/ddpm.py --recipe gpu            # the GPU recipe (the default where CUDA is available)
    python train/ddpm.py --quick                 # a smoke run on 512 images (CPU is fine)
    python train/ddpm.py --teacher flow          # regress on the class-conditional flow model's predictions (less target variance)
    python train/ddpm.py --resume                # carry on from runs/ddpm/state.pt
    torchrun --nproc_per_node 2 train/ddpm.py    # DDP; --batch-size is per process

Outputs: <run-dir>/metrics.jsonl, loss.png, samples_epochNNN.png and state.pt (resume with
--resume after any interruption, SIGKILL included), and the EMA weights in --out. With --quick
both default under runs/ddpm-quick/, so a smoke run never overwrites the shipped checkpoint.
See diffusion_core/training.py for the loop and every shared flag (python train/ddpm.py -h).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_core.objectives import TEACHER_WEIGHTS  # noqa: E402
from diffusion_core.tasks import DiffusionTask, add_diffusion_args  # noqa: E402
from diffusion_core.training import common_parser, parse_args, train  # noqa: E402

# The defaults per device (--recipe): the CPU one made the shipped checkpoint on a 2-core CPU.
RECIPES = {
    # warm start: the flow model's network (its unconditional branch), retrained as an epsilon DDPM
    "cpu": {"epochs": 13, "batch_size": 128, "blocks": 1, "min_snr_gamma": 5.0,
            "init": "flow", "init_weights_only": True},
    "gpu": {"epochs": 20, "batch_size": 256},
}


def main(argv=None):
    p = add_diffusion_args(common_parser(__doc__.splitlines()[0]))
    p.add_argument("--teacher", default=None, metavar="CHECKPOINT",
                   help="ddpm_eps, unconditional: a class-conditional model (cfg or flow) whose prediction given each "
                        "image's true label replaces the noise target, blended in by sigma^2 / (sigma^2 + 0.25); "
                        "the optimum is the same unconditional model (see objectives.teacher_target), the target "
                        "varies less")
    p.add_argument("--teacher-weight", choices=TEACHER_WEIGHTS, default="full",
                   help="full: the teacher's epsilon is the whole target at every noise level; blend: mixed with the "
                        "noise target by sigma^2 / (sigma^2 + 0.25) (see objectives.teacher_target)")
    args = parse_args(p, RECIPES, argv)
    train(DiffusionTask(args, name="ddpm", conditional=False), args)


if __name__ == "__main__":
    main()
