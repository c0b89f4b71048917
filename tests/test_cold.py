"""Cold diffusion (diffusion_core/cold.py): the blur against scipy, the two samplers of Bansal et
al. on cases with a known answer, the start distribution, the checkpoint and a quick training run."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from test_training import ROOT, _cmd, _env

from diffusion_core.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from diffusion_core.cold import BlurConfig, BlurDegradation, Restorer, StartDistribution, restore, restore_improved, restore_naive
from diffusion_core.models import load_model, model_from_tensors

DEG = BlurDegradation()


def _digits(n=8, seed=0):
    x = torch.rand((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.from_numpy(gaussian_filter(x.numpy(), (0, 0, 1, 1))).float()  # smooth-ish test images


@pytest.mark.parametrize("level", [6, 10, 15, 20])
def test_blur_is_scipys_gaussian_filter_with_reflecting_borders(level):
    # The heat equation with reflecting (Neumann) borders is a Gaussian filter of the image mirrored
    # at its borders: scipy's mode "reflect", with a kernel wide enough not to be truncated.
    x = _digits(3)
    sigma = float(DEG.sigmas[level])
    ref = gaussian_filter(x.double().numpy(), (0, 0, sigma, sigma), mode="reflect", truncate=8.0 * max(1.0, 28 / sigma))
    assert np.abs(DEG(x, level).double().numpy() - ref).max() < 1e-4


def test_level_zero_is_the_identity_and_the_mean_is_kept():
    x = _digits(4)
    torch.testing.assert_close(DEG(x, 0), x, atol=1e-5, rtol=0)
    for level in (1, 10, DEG.levels):
        torch.testing.assert_close(DEG(x, level).mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-5, rtol=0)
    assert DEG.sigmas[1] == pytest.approx(0.5) and DEG.sigmas[-1] == pytest.approx(BlurConfig.sigma_max) == pytest.approx(7.0)
    # the strongest level keeps the coarse shape only: far smoother than the image, not flat
    strongest = DEG(x, DEG.levels)
    assert strongest.std((1, 2, 3)).max() < 0.3 * x.std((1, 2, 3)).min()
    assert (strongest.std((1, 2, 3)) > 1e-4).all()
    flat = BlurDegradation(BlurConfig(sigma_max=30.0))(x, 20)  # the paper's end point: only the mean survives
    assert flat.std((1, 2, 3)).max() < 2e-3


def test_levels_are_checked():
    for bad in (-1, 21, 2.5, True, "3"):
        with pytest.raises(ValueError, match="blur level must be an integer from 0 to 20"):
            DEG(_digits(1), bad)
    with pytest.raises(ValueError, match="levels >= 1"):
        BlurDegradation(BlurConfig(levels=0))
    with pytest.raises(ValueError, match="unknown cold-diffusion sampler"):
        restore(Restorer(_Echo(), DEG), _digits(1), 3, "fancy")


class _Oracle(torch.nn.Module):
    """A restorer that knows the clean images (returns them whatever it is shown)."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t):
        return self.x0


def test_both_samplers_are_exact_with_a_perfect_restorer():
    x0 = _digits(4)
    r = Restorer(_Oracle(x0), DEG)
    for sampler in ("naive", "improved"):
        torch.testing.assert_close(restore(r, DEG(x0, 20), 20, sampler), x0, atol=1e-4, rtol=0)


class _Echo(torch.nn.Module):
    def forward(self, x, t):
        return x


class _Additive:
    """The toy degradation of the paper's Section 3.3: D(x0, s) = x0 + s e for a fixed e."""

    levels = 10

    def __init__(self, e):
        self.e = e

    def check_level(self, s):
        return s

    def __call__(self, x0, s):
        return x0 + s * self.e


def test_improved_sampler_is_exact_for_additive_degradations_with_any_restorer_naive_is_not():
    # x_{s-1} = x_s - D(x0_hat, s) + D(x0_hat, s-1) = x_s - e whatever x0_hat is: Algorithm 2
    # recovers x0 from x_s with a restorer that is plain wrong, Algorithm 1 returns its guess.
    x0, e = _digits(2, seed=1), _digits(2, seed=2)
    deg = _Additive(e)
    wrong = Restorer(_Echo(), deg)  # "restores" by returning its input
    x_s = deg(x0, 10)
    steps = list(restore_improved(wrong, x_s, 10))
    assert [s.level for s in steps] == list(range(10, 0, -1))
    torch.testing.assert_close(steps[-1].x, x0, atol=1e-5, rtol=0)
    naive = list(restore_naive(wrong, x_s, 10))[-1].x
    assert (naive - x0).abs().mean() > 0.5


def test_start_distribution_matches_the_fully_blurred_images():
    x = _digits(400, seed=3)
    start = StartDistribution.fit(x, DEG, noise=0.0)
    assert len(start.modes) > 1 and [0, 0] in start.modes.tolist()
    samples = start.sample(4000, torch.Generator().manual_seed(0))
    blurred = DEG(x, DEG.levels)
    # the same pixel means and nearly the same spread as the blurred images (those modes are all that is left)
    torch.testing.assert_close(samples.mean(0), blurred.mean(0), atol=0.02, rtol=0)
    assert abs(samples.std(0).mean().item() / blurred.std(0).mean().item() - 1) < 0.1
    again = StartDistribution.from_dict(json.loads(json.dumps(start.to_dict())))
    torch.testing.assert_close(again.sample(3, torch.Generator().manual_seed(5)), start.sample(3, torch.Generator().manual_seed(5)),
                               atol=1e-5, rtol=0)
    flat = StartDistribution.fit(x, BlurDegradation(BlurConfig(sigma_max=30.0)), noise=0.0, threshold=1e-2)
    assert flat.modes.tolist() == [[0, 0]]  # the paper's flat start: the mean, drawn from the data's
    with pytest.raises(ValueError, match="needs means"):
        StartDistribution([[0, 0]], [1.0, 2.0], [[1.0, 0], [0, 1.0]], 0.0)


def test_a_start_fitted_per_class_keeps_the_clusters_that_one_gaussian_merges():
    """Two classes of blurred images far apart in brightness (30% and 70% of them): one Gaussian
    puts its mass between them, the per-class mixture puts each start near a class, in proportion."""
    x = _digits(400, seed=4)
    labels = (torch.arange(400) >= 120).long()
    x = x.clamp(-1, 1) * 0.2 + torch.where(labels == 1, 0.5, -0.5)[:, None, None, None]
    brightness = lambda imgs: imgs.mean((1, 2, 3))  # noqa: E731  (the DC mode)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    single = brightness(StartDistribution.fit(x, DEG, noise=0.0).sample(2000, g()))
    mixed = brightness(StartDistribution.fit(x, DEG, noise=0.0, labels=labels).sample(2000, g()))
    between = lambda b: float((b.abs() < 0.25).double().mean())  # noqa: E731
    assert between(single) > 0.3 and between(mixed) < 0.01
    assert abs(float((mixed > 0).double().mean()) - 0.7) < 0.03
    start = StartDistribution.fit(x, DEG, noise=0.0, labels=labels)
    again = StartDistribution.from_dict(json.loads(json.dumps(start.to_dict())))
    torch.testing.assert_close(again.weights, torch.tensor([0.3, 0.7], dtype=torch.float64))
    torch.testing.assert_close(again.sample(5, g()), start.sample(5, g()), atol=1e-5, rtol=0)


def test_a_single_gaussian_start_in_the_first_format_still_loads():
    one = StartDistribution.from_dict({"modes": [[0, 0], [0, 1]], "mean": [-20.0, 0.5], "scale_tril": [[2.0, 0.0], [0.1, 1.0]], "noise": 0.02})
    assert one.means.shape == (1, 2) and one.weights.tolist() == [1.0]
    assert one.sample(4, torch.Generator().manual_seed(0)).shape == (4, 1, 28, 28)


@pytest.mark.parametrize("name, sigma_max", [("cold_blur_v2", 7.0), ("cold_blur", 10.0)])
def test_shipped_cold_blur_loads_and_a_corrupted_degradation_is_a_checkpoint_error(tmp_path, name, sigma_max):
    model = load_model(ROOT / "checkpoints" / f"{name}.safetensors")
    assert model.kind == "cold" and model.restorer().degradation.levels == 20
    assert float(model.restorer().degradation.sigmas[-1]) == pytest.approx(sigma_max)
    assert model.history is not None and {g["epoch"] for g in model.history["grids"]} == {1, 5, 8}
    tensors, config = load_checkpoint(ROOT / "checkpoints" / f"{name}.safetensors")
    for bad in ({k: v for k, v in config.items() if k != "degradation"}, dict(config, degradation={"levels": 0})):
        path = tmp_path / "bad.safetensors"
        save_checkpoint(path, tensors, bad)
        with pytest.raises(CheckpointError):
            load_model(path)
    with pytest.raises(CheckpointError, match="config lacks"):
        model_from_tensors(tensors, {k: v for k, v in config.items() if k != "degradation"})


@pytest.mark.slow
def test_quick_cold_blur_training_records_its_history(tmp_path, mnist_root):
    run_dir, out = tmp_path / "run", tmp_path / "cold.safetensors"
    cmd = [sys.executable, *_cmd("cold_blur", run_dir, out, mnist_root, "--quick", "--init", "none", "--epochs", 2)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    model = load_model(out)
    assert model.kind == "cold" and model.config["generation"]["modes"][0] == [0, 0]
    history = model.history
    assert len(json.dumps(history)) < 200_000
    assert [g["epoch"] for g in history["grids"]] == [1, 2] and history["grids"][0]["png"].startswith("iVBOR")  # PNG, base64
    assert len(history["loss"]) == len([line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"step"' in line and '"type": "step"' in line])
    with torch.no_grad():
        assert model.restorer()(torch.zeros(2, 1, 28, 28), 5).shape == (2, 1, 28, 28)
