"""Train the weak DDPM that guides ddpm (and mcl) under autoguidance: the bad model of
Karras et al. 2024, "Guiding a diffusion model with a bad version of itself".

    python train/ddpm_weak.py                    # the shipped checkpoints/ddpm_weak.safetensors (CPU or GPU)
    python train/ddpm_weak.py --quick            # a smoke run on 512 images
    python train/ddpm_weak.py --resume           # carry on from runs/ddpm_weak/state.pt

The same objective as train/ddpm.py (epsilon prediction on the linear schedule, Min-SNR-5, the
class-conditional flow model as teacher), on a smaller network (16 base channels against 32,
about a quarter of the parameters) trained from scratch for a small fraction of the good model's
images, with an EMA sized to its short run. Its errors are those of the DDPM, larger: at
``D_bad + w (D - D_bad)`` with ``w > 1`` the sampler moves away from them.

Outputs as train/ddpm.py (see diffusion_core/training.py for every shared flag).
"""


from diffusion_core.objectives import TEACHER_WEIGHTS
from diffusion_core.tasks import DiffusionTask, add_diffusion_args
from diffusion_core.training import common_parser, parse_args, train

# One recipe on either device: minutes on a 2-core CPU (3 epochs = 1,404 steps of 128).
RECIPE = {"epochs": 3, "batch_size": 128, "channels": 16, "blocks": 1, "min_snr_gamma": 5.0, "lr": 2e-3,
          "ema_decay": 0.998, "teacher": "flow", "teacher_weight": "full"}
RECIPES = {"cpu": RECIPE, "gpu": RECIPE}


def main(argv=None):
    p = add_diffusion_args(common_parser(__doc__.splitlines()[0]))
    p.add_argument("--teacher", default=None, metavar="CHECKPOINT",
                   help="a class-conditional model (cfg or flow) whose prediction given the true label is the target (train/ddpm.py -h)")
    p.add_argument("--teacher-weight", choices=TEACHER_WEIGHTS, default="full", help="see train/ddpm.py -h")
    args = parse_args(p, RECIPES, argv)
    train(DiffusionTask(args, name="ddpm_weak", conditional=False), args)


if __name__ == "__main__":
    main()
