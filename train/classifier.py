"""Train the digit classifier that the metrics use (features for the Frechet distance).

    python train/classifier.py                   # the shipped checkpoints/classifier.safetensors (CPU or GPU)
    python train/classifier.py --quick
    python train/classifier.py --arch gap --channels 24 --epochs 6 --seed 1 --run-dir runs/classifier2 --out checkpoints/classifier2.safetensors
                                                 # the second, independent classifier of evaluate

Cross-entropy with random shifts of up to 2 pixels; each epoch logs the EMA model's test
accuracy, and its grid shows, row by row, test images classified as 0..9.

Outputs: <run-dir>/metrics.jsonl, loss.png, samples_epochNNN.png and state.pt (resume with
--resume after any interruption, SIGKILL included), and the EMA weights in --out. With --quick
both default under runs/classifier-quick/, so a smoke run never overwrites the shipped checkpoint.
See diffusion_core/training.py for the loop and every shared flag (python train/classifier.py -h).
"""


from diffusion_core.nets import CLASSIFIER_ARCHS
from diffusion_core.tasks import ClassifierTask
from diffusion_core.training import common_parser, parse_args, train

# A small network: the same recipe on either device (a few minutes on a 2-core CPU).
RECIPES = {"cpu": {}, "gpu": {}}


def main(argv=None):
    p = common_parser(__doc__.splitlines()[0], epochs=8, lr=2e-3, weight_decay=1e-4, batch_size=128)
    p.add_argument("--arch", choices=CLASSIFIER_ARCHS, default="vgg",
                   help="vgg: the metrics' classifier; gap: 5x5 convolutions and global average pooling (the second, independent classifier)")
    args = parse_args(p, RECIPES, argv)
    train(ClassifierTask(args), args)


if __name__ == "__main__":
    main()
