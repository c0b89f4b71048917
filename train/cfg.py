"""Train the class-conditional DDPM used with classifier-free guidance (label dropout).

    python train/cfg.py                 # the shipped checkpoints/cfg.safetensors (GPU)
    python train/cfg.py --quick         # a smoke run on 512 images
    torchrun --nproc_per_node 2 train/cfg.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_core.tasks import DiffusionTask, add_diffusion_args  # noqa: E402
from diffusion_core.training import common_parser, train  # noqa: E402


def main(argv=None):
    p = add_diffusion_args(common_parser(__doc__.splitlines()[0]))
    p.add_argument("--p-uncond", type=float, default=0.1, help="label dropout probability")
    args = p.parse_args(argv)
    train(DiffusionTask(args, name="cfg", conditional=True), args)


if __name__ == "__main__":
    main()
