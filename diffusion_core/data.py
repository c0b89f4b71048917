"""MNIST through torchvision, loaded whole as tensors (no per-sample transforms).

The data directory comes from the ``data_dir`` argument (the scripts' ``--data-dir`` flag), else
``$MNIST_DIR``, else ``./data``. It is torchvision's ``root``: the raw files live in
``<root>/MNIST/raw/``. Where they are absent, torchvision downloads them (when online).

Offline, put the four uncompressed (or .gz) MNIST files in ``<root>/MNIST/raw/``, or run
``python -m diffusion_core.data --from DIR_WITH_GZ_FILES --to <root>``.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
from pathlib import Path

import torch

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
ENV = "MNIST_DIR"


class MNISTNotFound(RuntimeError):
    pass


def data_root(data_dir=None) -> Path:
    return Path(data_dir or os.environ.get(ENV) or "data").expanduser()


def prepare_mnist(src, root) -> Path:
    """Copy (decompressing .gz) the four MNIST files from ``src`` to ``<root>/MNIST/raw``."""
    src, raw = Path(src), Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        dst = raw / name
        if dst.is_file():
            continue
        if (src / name).is_file():
            shutil.copyfile(src / name, dst)
        elif (src / f"{name}.gz").is_file():
            tmp = dst.with_suffix(".part")
            with gzip.open(src / f"{name}.gz", "rb") as fi, open(tmp, "wb") as fo:
                shutil.copyfileobj(fi, fo)
            os.replace(tmp, dst)
        else:
            raise MNISTNotFound(f"{src} has neither {name} nor {name}.gz")
    return raw


def load_mnist(data_dir=None, train: bool = True, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float32 in [-1, 1] and labels (N,) int64."""
    from torchvision.datasets import MNIST

    root = data_root(data_dir)
    try:
        ds = MNIST(str(root), train=train, download=download)
    except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError/URLError/OSError offline
        raise MNISTNotFound(
            f"MNIST not found under {root / 'MNIST' / 'raw'} and could not be downloaded ({type(e).__name__}: {e}). "
            f"Put the four MNIST files ({', '.join(FILES)}, optionally .gz) there, or run "
            f"`python -m diffusion_core.data --from DIR --to {root}`, or pass --data-dir / set {ENV}."
        ) from None
    images = ds.data.unsqueeze(1).float().div(127.5).sub(1)
    return images, ds.targets.long()


def main(argv=None):
    p = argparse.ArgumentParser(description="Prepare MNIST for torchvision from a folder holding the four files (.gz or not).")
    p.add_argument("--from", dest="src", required=True)
    p.add_argument("--to", dest="root", default=None, help=f"torchvision root (default ${ENV} or ./data)")
    a = p.parse_args(argv)
    try:
        raw = prepare_mnist(a.src, data_root(a.root))
    except MNISTNotFound as e:
        raise SystemExit(f"error: {e}") from None
    print(f"MNIST ready in {raw}")


if __name__ == "__main__":
    main()
