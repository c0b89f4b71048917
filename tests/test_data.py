"""MNIST loading: shapes and range from the shared files; a clear message when they are absent
(torchvision's download is replaced by a failure: the network is never used)."""
from __future__ import annotations

import gzip

import pytest
import torch

from diffusion_core import data
from diffusion_core.data import FILES, MNISTNotFound, data_root, load_mnist, prepare_mnist


def test_load_mnist_train(mnist_root):
    images, labels = load_mnist(mnist_root, train=True, download=False)
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    assert torch.bincount(labels, minlength=10).min() > 5000  # every digit, roughly balanced
    # a pixel value v in 0..255 maps to v / 127.5 - 1: values sit on that grid
    q = (images[:100] + 1) * 127.5
    assert (q - q.round()).abs().max() < 1e-3 and len(q.round().unique()) > 100
    assert (images[:, :, 0, 0] == -1).all()  # MNIST corners are background


def test_load_mnist_test_split(mnist_root):
    images, labels = load_mnist(mnist_root, train=False, download=False)
    assert images.shape == (10000, 1, 28, 28) and labels.shape == (10000,)
    assert set(labels.unique().tolist()) == set(range(10))


@pytest.fixture
def no_download(monkeypatch):
    from torchvision.datasets import MNIST

    calls = []

    def offline(self):
        calls.append(self.root)
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(MNIST, "download", offline)
    return calls


def test_missing_mnist_says_where_to_put_the_files(tmp_path, no_download):
    root = tmp_path / "empty"
    with pytest.raises(MNISTNotFound) as e:
        load_mnist(root, download=True)
    msg = str(e.value)
    assert no_download, "the download was not attempted"
    assert f"MNIST not found under {root / 'MNIST' / 'raw'}" in msg
    assert "network unreachable" in msg
    for name in FILES:
        assert name in msg
    assert "python -m diffusion_core.data --from DIR" in msg and data.ENV in msg


def test_missing_mnist_without_download(tmp_path, no_download):
    with pytest.raises(MNISTNotFound, match="Put the four MNIST files"):
        load_mnist(tmp_path, download=False)
    assert not no_download  # download=False never tries


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(data.ENV, raising=False)
    assert str(data_root()) == "data"
    monkeypatch.setenv(data.ENV, str(tmp_path))
    assert data_root() == tmp_path
    assert data_root(tmp_path / "flag") == tmp_path / "flag"  # the flag wins over the env


def test_prepare_mnist_from_gz_and_missing_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in FILES:
        with gzip.open(src / f"{name}.gz", "wb") as f:
            f.write(name.encode())
    raw = prepare_mnist(src, tmp_path / "root")
    assert raw == tmp_path / "root" / "MNIST" / "raw"
    assert all((raw / name).read_bytes() == name.encode() for name in FILES)
    with pytest.raises(MNISTNotFound, match=f"has neither {FILES[0]} nor {FILES[0]}.gz"):
        prepare_mnist(tmp_path / "nothing_here", tmp_path / "root2")
