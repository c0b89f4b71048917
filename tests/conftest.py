"""Shared fixtures: tiny random checkpoints of every kind, and MNIST from ../shared/mnist."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from diffusion_core import reproducible

reproducible.pin_kernels()  # the app's kernels (AVX2) before anything computes: the share-link tests compare exact bytes

import pytest  # noqa: E402
import torch  # noqa: E402

from diffusion_core.models import save_model  # noqa: E402
from diffusion_core.nets import Classifier, ClassifierConfig, GatingConfig, GatingNet, SharedMCLNet, UNet, UNetConfig  # noqa: E402
from diffusion_core.objectives import EpsilonObjective  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED_MNIST = ROOT.parent / "shared" / "mnist"

TINY_UNET = dict(base_channels=8, channel_mults=(1, 2, 2), blocks_per_level=1, attention=True)


def make_tiny_checkpoints(directory: Path, num_experts: int = 3, seed: int = 0) -> Path:
    """Write ddpm/ddpm_weak/cfg/mcl/mcl_shared/gating/classifier checkpoints with small random weights to ``directory``
    (``mcl``: separate experts routed by ``gating``; ``mcl_shared``: hypotheses on one network).

    The UNets' output convolutions are zero-initialised, so they are perturbed to give non-trivial
    predictions."""
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    objective = EpsilonObjective()

    def unet(num_classes=None):
        net = UNet(UNetConfig(num_classes=num_classes, **TINY_UNET))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.02 * torch.randn_like(p))
        return net.eval()

    def cfg_of(net, **extra):
        return {"network": {"kind": "unet", "config": net.config.to_dict()}, "objective": objective.to_dict(), "training": {"note": "tiny random test model"}, **extra}

    save_model(directory / "ddpm.safetensors", "ddpm", [n := unet()], cfg_of(n))
    save_model(directory / "ddpm_weak.safetensors", "ddpm", [n := unet()], cfg_of(n))  # autoguidance's default bad model
    save_model(directory / "cfg.safetensors", "cfg", [n := unet(10)], cfg_of(n))
    experts = [unet() for _ in range(num_experts)]
    save_model(directory / "mcl.safetensors", "mcl", experts, cfg_of(experts[0]))
    shared = SharedMCLNet.from_unet(unet(), num_experts, head_blocks=1, noise=0.5)  # hypotheses on one network, with a score head
    with torch.no_grad():
        for p in shared.score.parameters():
            p.add_(0.3 * torch.randn_like(p))  # a score head that is not uniform
    save_model(directory / "mcl_shared.safetensors", "mcl", [shared.eval()],
               {"network": {"kind": "mcl_shared", "config": shared.config.to_dict()}, "objective": objective.to_dict(),
                "training": {"note": "tiny random test model", "mcl_arch": "shared", "wta_scope": "example"}})
    gate = GatingNet(GatingConfig(num_experts=num_experts, channels=8))
    save_model(directory / "gating.safetensors", "gating", [gate], {"network": {"kind": "gating", "config": gate.config.to_dict()}, "training": {}})
    clf = Classifier(ClassifierConfig(channels=8, feature_dim=32)).eval()
    save_model(directory / "classifier.safetensors", "classifier", [clf], {"network": {"kind": "classifier", "config": clf.config.to_dict()}, "training": {}})
    return directory


def _torch_threads(n: int):
    """Run with ``n`` torch threads, then restore the count found."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoints_with_parts(tiny_checkpoints, tmp_path_factory) -> Path:
    """The tiny folder plus ``mcl_parts`` (the tiny ``mcl_shared`` under the name whose app defaults
    differ from its kind's: ``pipeline.APP_AUTOGUIDANCE_OF_MODEL``)."""
    directory = tmp_path_factory.mktemp("tiny_checkpoints_with_parts")
    for f in tiny_checkpoints.glob("*.safetensors"):
        shutil.copy(f, directory / f.name)
    shutil.copy(tiny_checkpoints / "mcl_shared.safetensors", directory / "mcl_parts.safetensors")
    return directory


@pytest.fixture(scope="module")
def app_threads():
    """The app's torch threads (``reproducible.THREADS``), at which share links' bytes are defined."""
    yield from _torch_threads(reproducible.THREADS)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tests on tiny tensors: there thread-pool overhead dominates,
    badly so on a loaded 2-core machine."""
    yield from _torch_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """A folder with tiny random ddpm/cfg/mcl/gating/classifier checkpoints (K=3 experts)."""
    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny_checkpoints"))


@pytest.fixture(scope="module")
def registry(tiny_checkpoints):
    """A model registry on the tiny checkpoints (modules with other checkpoints override it)."""
    from diffusion_core.registry import ModelRegistry

    return ModelRegistry(tiny_checkpoints)


@pytest.fixture(scope="module")
def models(registry):
    """The app's model menu (``available_models``) of ``registry``."""
    from diffusion_core.ui.common import available_models

    return available_models(registry)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A torchvision MNIST root: $MNIST_DIR if it holds the files, else prepared from ../shared/mnist."""
    from diffusion_core.data import prepare_mnist

    env = os.environ.get("MNIST_DIR")
    if env and (Path(env) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        return Path(env)
    if (ROOT / "data" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file():
        return ROOT / "data"
    if not SHARED_MNIST.is_dir():
        pytest.skip("MNIST not available (expected ../shared/mnist or $MNIST_DIR)")
    root = tmp_path_factory.mktemp("mnist")
    prepare_mnist(SHARED_MNIST, root)
    return root
