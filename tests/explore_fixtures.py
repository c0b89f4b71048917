"""A checkpoint folder for the Explore / flow tests: the tiny random checkpoints of conftest plus a tiny
class-conditional rectified-flow model saved as ``flow.safetensors`` (kind ``flow``, objective
``rectified_flow``: what ``train/flow.py`` writes; ``kind="cfg"`` gives what ``train/cfg.py --objective
rectified_flow`` writes)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from diffusion_core.models import save_model
from diffusion_core.nets import UNet, UNetConfig
from diffusion_core.objectives import FlowObjective

TINY_UNET = dict(base_channels=8, channel_mults=(1, 2, 2), blocks_per_level=1, attention=True)


def add_tiny_flow(directory: Path, name: str = "flow", seed: int = 1, kind: str = "flow") -> Path:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(num_classes=10, **TINY_UNET))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    config = {"network": {"kind": "unet", "config": net.config.to_dict()}, "objective": FlowObjective().to_dict(),
              "training": {"note": "tiny random flow test model"}}
    return save_model(directory / f"{name}.safetensors", kind, [net.eval()], config)


def checkpoints_with_flow(tiny_checkpoints: Path, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for f in Path(tiny_checkpoints).glob("*.safetensors"):
        shutil.copy2(f, directory / f.name)
    add_tiny_flow(directory)
    return directory
