"""Train the unconditional DDPM (epsilon-prediction, linear schedule, T=1000).

    python train/ddpm.py                         # the shipped checkpoints/ddpm.safetensors (CPU recipe on a CPU: two stages, below)
    python train/ddpm.py --recipe gpu            # the GPU recipe (the default where CUDA is available)
    python train/ddpm.py --quick                 # a smoke run on 512 images (CPU is fine)
    python train/ddpm.py --teacher flow          # regress on the class-conditional flow model's predictions (less target variance)
    python train/ddpm.py --resume                # carry on from runs/ddpm/state.pt (and runs/ddpm-stage1/ first, if it stopped there)
    torchrun --nproc_per_node 2 train/ddpm.py    # DDP; --batch-size is per process

The CPU recipe runs in two stages. Stage 1 (``STAGE1``: 13 epochs warm-started from the flow
model's network, plain noise target) writes runs/ddpm-stage1/ddpm.safetensors, unless that file
is already there; stage 2 (``RECIPES["cpu"]``) starts from it and trains 9 more epochs with the
flow model as teacher at full weight (see ``objectives.teacher_target``), at half the learning rate.

Outputs: <run-dir>/metrics.jsonl, loss.png, samples_epochNNN.png and state.pt (resume with
--resume after any interruption, SIGKILL included), and the EMA weights in --out. With --quick
both default under runs/ddpm-quick/, so a smoke run never overwrites the shipped checkpoint.
See diffusion_core/training.py for the loop and every shared flag (python train/ddpm.py -h).
"""
import sys
from pathlib import Path

from diffusion_core.objectives import TEACHER_WEIGHTS
from diffusion_core.tasks import DiffusionTask, add_diffusion_args
from diffusion_core.training import common_parser, parse_args, train

STAGE1_OUT = "runs/ddpm-stage1/ddpm.safetensors"
# The CPU recipe's first stage (the ddpm shipped before the teacher): the flow model's network
# (its unconditional branch, weights only) retrained as an epsilon DDPM with Min-SNR-5.
STAGE1 = {"epochs": 13, "batch_size": 128, "blocks": 1, "min_snr_gamma": 5.0, "init": "flow", "init_weights_only": True,
          "teacher": None, "lr": 2e-3}
# The defaults per device (--recipe): the CPU one made the shipped checkpoint on a 2-core CPU.
RECIPES = {
    "cpu": {"epochs": 9, "batch_size": 128, "blocks": 1, "min_snr_gamma": 5.0, "init": STAGE1_OUT, "init_weights_only": True,
            "teacher": "flow", "teacher_weight": "full", "lr": 1e-3, "ema_decay": 0.999},
    "gpu": {"epochs": 20, "batch_size": 256},
}


def build_parser():
    p = add_diffusion_args(common_parser(__doc__.splitlines()[0]))
    p.add_argument("--teacher", default=None, metavar="CHECKPOINT",
                   help="ddpm_eps, unconditional: a class-conditional model (cfg or flow) whose prediction given each "
                        "image's true label replaces the noise target (see objectives.teacher_target): the optimum is "
                        "the same unconditional model, the target varies less. 'none': no teacher")
    p.add_argument("--teacher-weight", choices=TEACHER_WEIGHTS, default="full",
                   help="full: the teacher's epsilon is the whole target at every noise level; blend: mixed with the "
                        "noise target by sigma^2 / (sigma^2 + 0.25) (see objectives.teacher_target)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(build_parser(), RECIPES, argv)
    if args.teacher and args.teacher.lower() == "none":
        args.teacher = None
    if args.init == STAGE1_OUT and not args.quick and not Path(STAGE1_OUT).is_file():
        print(f"stage 1: {STAGE1_OUT} is not there; training it first", flush=True)
        stage1 = parse_args(build_parser(), {args.recipe: STAGE1}, argv + ["--run-dir", str(Path(STAGE1_OUT).parent), "--out", STAGE1_OUT])
        train(DiffusionTask(stage1, name="ddpm", conditional=False), stage1)
    train(DiffusionTask(args, name="ddpm", conditional=False), args)


if __name__ == "__main__":
    main()
