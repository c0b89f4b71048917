"""Train the digit classifier that the metrics use (features for the Frechet distance).

    python train/classifier.py
    python train/classifier.py --quick
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_core.tasks import ClassifierTask  # noqa: E402
from diffusion_core.training import common_parser, train  # noqa: E402


def main(argv=None):
    args = common_parser(__doc__.splitlines()[0], epochs=8, lr=2e-3, weight_decay=1e-4).parse_args(argv)
    train(ClassifierTask(args), args)


if __name__ == "__main__":
    main()
