"""DDPM without its noise term on the shipped DDPM: a property instead of a picture. Its samples
hardly depend on the seed (the per-pixel spread across seeds is a small fraction of DDPM's; with
this model every seed ends as nearly the same thin 1), where DDPM's and DDIM's (eta 0) differ."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusion_core.models import load_model
from diffusion_core.pipeline import Settings, generate

pytestmark = [pytest.mark.slow]  # tiers: python -m pytest -m "not slow and not browser" leaves these out

CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "ddpm.safetensors"


@pytest.fixture(scope="module")
def ddpm():
    return load_model(CHECKPOINT)


def _images(model, sampler, seeds=range(12), steps=50):
    out = [generate(Settings(model="ddpm", sampler=sampler, steps=steps, seed=s, n=1).validate(), model).images[0] for s in seeds]
    return torch.stack(out).float() / 255.0  # (seeds, 28, 28) in [0, 1]


def test_ddpm_without_noise_varies_far_less_across_seeds_than_ddpm(ddpm):
    spread = {name: _images(ddpm, name).std(0).mean().item() for name in ("ddpm", "ddpm_nonoise", "ddim")}
    assert spread["ddpm_nonoise"] < 0.25 * spread["ddpm"], spread
    assert spread["ddim"] > 0.6 * spread["ddpm"], spread  # deterministic, but not degenerate

