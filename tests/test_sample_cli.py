"""The sampling CLI end to end on the tiny checkpoints: npz contents, PNG grid, settings replay,
determinism across processes and clear errors for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_core import sample
from diffusion_core.pipeline import Settings, generate
from diffusion_core.registry import ModelRegistry

ROOT = Path(__file__).resolve().parent.parent


def run_cli(capsys, *argv):
    """main() in this process: (exit code, stdout, stderr)."""
    try:
        code = sample.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def load(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_cfg_npz_contents(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "cfg.npz"
    code, stdout, err = run_cli(capsys, "--model", "cfg", "--sampler", "euler", "--steps", 3, "--seed", 11, "--n", 12, "--guidance", 3, "--out", out, "--checkpoint-dir", tiny_checkpoints)
    assert code == 0, err
    assert "wrote 12 image(s)" in stdout and str(out) in stdout
    z = load(out)
    assert set(z) == {"images", "labels", "settings"}
    assert z["images"].dtype == np.uint8 and z["images"].shape == (12, 28, 28)
    assert z["labels"].shape == (12,) and z["labels"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    settings = Settings.from_json(str(z["settings"]))
    assert settings == Settings(model="cfg", sampler="euler", steps=3, seed=11, n=12, guidance=3.0)  # the rest: defaults
    # the same images as the library gives for those settings
    model, gate = ModelRegistry(tiny_checkpoints).for_settings(settings)
    assert np.array_equal(z["images"], generate(settings, model, gate).images.numpy())


def test_defaults_are_the_apps(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFUSION_CHECKPOINT_DIR", str(tiny_checkpoints))  # the env route, no flag
    code, _, err = run_cli(capsys, "--out", tmp_path / "d.npz")
    assert code == 0, err
    z = load(tmp_path / "d.npz")
    assert Settings.from_json(str(z["settings"])) == Settings()
    assert z["images"].shape == (Settings().n, 28, 28)


def test_mcl_npz_has_experts_and_digit_on_cfg(tiny_checkpoints, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--model", "mcl", "--routing", "gated", "--sampler", "heun", "--steps", 4, "--n", 5, "--out", tmp_path / "m.npz", "--checkpoint-dir", tiny_checkpoints)
    assert code == 0, err
    z = load(tmp_path / "m.npz")
    assert set(z) == {"images", "experts", "settings"}
    assert z["experts"].shape == (4, 5) and z["experts"].min() >= 0 and z["experts"].max() < 3
    code, _, err = run_cli(capsys, "--model", "cfg", "--digit", 7, "--n", 3, "--steps", 2, "--out", tmp_path / "c.npz", "--checkpoint-dir", tiny_checkpoints)
    assert code == 0, err
    assert load(tmp_path / "c.npz")["labels"].tolist() == [7, 7, 7]


def test_model_given_as_a_path_and_inapplicable_flags(tiny_checkpoints, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--model", tiny_checkpoints / "ddpm.safetensors", "--digit", 3, "--steps", 2, "--out", tmp_path / "p.npz")
    assert code == 0, err
    assert "note: --digit has no effect" in err
    assert set(load(tmp_path / "p.npz")) == {"images", "settings"}  # unconditional, not MCL


def test_grid_png(tiny_checkpoints, tmp_path, capsys):
    from PIL import Image

    code, _, err = run_cli(capsys, "--model", "ddpm", "--steps", 2, "--n", 13, "--out", tmp_path / "g.npz", "--grid", tmp_path / "sub" / "g.png", "--checkpoint-dir", tiny_checkpoints)
    assert code == 0, err
    images = load(tmp_path / "g.npz")["images"]
    with Image.open(tmp_path / "sub" / "g.png") as im:
        assert im.format == "PNG" and im.mode == "L"
        grid = np.array(im)
    assert grid.shape == (2 * 30 + 2, 10 * 30 + 2)  # 10 columns, 2 rows, 2-pixel padding
    assert np.array_equal(grid[2:30, 2:30], images[0])
    assert np.array_equal(grid[32:60, 62:90], images[12])  # row 1, column 2
    assert not grid[32:60, 92:].any()  # the empty cells stay black


def test_settings_replay_and_override(tiny_checkpoints, tmp_path, capsys):
    first = tmp_path / "first.npz"
    args = ["--model", "mcl", "--routing", "pooled", "--sampler", "ddim", "--eta", 0.7, "--steps", 3, "--seed", 99, "--n", 4]
    assert run_cli(capsys, *args, "--out", first, "--checkpoint-dir", tiny_checkpoints)[0] == 0
    a = load(first)
    saved = tmp_path / "shared.json"
    saved.write_text(str(a["settings"]))  # as the app's share feature writes it

    code, _, err = run_cli(capsys, "--settings", saved, "--out", tmp_path / "replay.npz", "--checkpoint-dir", tiny_checkpoints)
    assert code == 0, err
    b = load(tmp_path / "replay.npz")
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["experts"], b["experts"])
    assert str(a["settings"]) == str(b["settings"])

    code, _, err = run_cli(capsys, "--settings", first, "--out", tmp_path / "from_npz.npz", "--checkpoint-dir", tiny_checkpoints)
    assert code == 0, err
    assert np.array_equal(load(tmp_path / "from_npz.npz")["images"], a["images"])

    code, _, err = run_cli(capsys, "--settings", saved, "--seed", 100, "--out", tmp_path / "other.npz", "--checkpoint-dir", tiny_checkpoints)
    assert code == 0, err
    c = load(tmp_path / "other.npz")
    s = json.loads(str(c["settings"]))
    assert s == {**json.loads(str(a["settings"])), "seed": 100}
    assert not np.array_equal(a["images"], c["images"])


def _run_process(args, env):
    return subprocess.Popen([sys.executable, "-m", "diffusion_core.sample", *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_write_byte_identical_images(tiny_checkpoints, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFUSION_CHECKPOINT_DIR": str(tiny_checkpoints)}
    env.pop("DIFFUSION_HF_REPO", None)
    flags = ["--model", "mcl", "--routing", "pooled", "--sampler", "ddpm", "--steps", 4, "--seed", 2024, "--n", 6]
    procs = [_run_process([*flags, "--out", tmp_path / f"p{i}.npz"], env) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    a, b = load(tmp_path / "p0.npz"), load(tmp_path / "p1.npz")
    assert a["images"].tobytes() == b["images"].tobytes()
    assert np.array_equal(a["experts"], b["experts"])
    assert len(np.unique(a["images"])) > 10, "images should not be trivial"
    # and the same as in this process
    settings = Settings.from_json(str(a["settings"]))
    registry = ModelRegistry(tiny_checkpoints)
    model, gate = registry.for_settings(settings)
    assert generate(settings, model, gate, guide=registry.guide_for(settings, model)).images.numpy().tobytes() == a["images"].tobytes()


@pytest.mark.slow
def test_bad_input_in_a_real_process_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFUSION_CHECKPOINT_DIR": str(tmp_path)}
    env.pop("DIFFUSION_HF_REPO", None)
    p = _run_process(["--model", "cfg", "--out", tmp_path / "x.npz"], env)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert err.startswith("python -m diffusion_core.sample: error: checkpoint cfg: not found") and str(tmp_path / "cfg.safetensors") in err
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--steps", "0"], "steps must be between 1 and 1000, got 0"),
        (["--steps", "1000000"], "steps must be between 1 and 1000"),
        (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
        (["--digit", "11"], "digit must be between 0 and 9, got 11"),
        (["--guidance", "nan"], "guidance must be a finite number"),
        (["--guidance", "-2"], "guidance must be between 0 and 20"),
        (["--seed", str(2**63)], "seed must be between 0 and 2^63-1"),
        (["--n", "100000"], "number of images must be between 1 and 10000"),
        (["--sampler", "plms"], "argument --sampler: invalid choice: 'plms'"),
        (["--routing", "random", "--model", "mcl"], "unknown routing 'random'"),
        (["--routing", "expert:7", "--model", "mcl"], "bad routing 'expert:7': expert index must be in 0..2"),
        (["--model", "nothing"], "checkpoint nothing: not found; looked in"),
        (["--model", "classifier"], "is a classifier checkpoint, not a diffusion model"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_exit_2_with_one_clear_line(tiny_checkpoints, tmp_path, capsys, argv, message):
    code, out, err = run_cli(capsys, *argv, "--out", tmp_path / "x.npz", "--checkpoint-dir", tiny_checkpoints)
    assert code == 2
    assert err.startswith("python -m diffusion_core.sample: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "x.npz").exists()


def test_missing_out_and_bad_settings_files(tiny_checkpoints, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--model", "cfg")
    assert code == 2 and "give --out FILE.npz, --grid FILE.png or both" in err
    cases = {
        "missing.json": (None, "file not found"),
        "broken.json": ('{"steps": 3', "settings are not valid JSON"),
        "extra.json": ('{"steps": 3, "colour": "red"}', "unknown settings ['colour']"),
        "badvalue.json": ('{"steps": -3}', "steps must be between 1 and 1000, got -3"),
    }
    for name, (text, message) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        code, _, err = run_cli(capsys, "--settings", tmp_path / name, "--out", tmp_path / "x.npz", "--checkpoint-dir", tiny_checkpoints)
        assert code == 2 and err.count("\n") == 1 and message in err, (name, err)
        if text is not None:
            assert str(tmp_path / name) in err or "steps must be" in err


def test_gated_mcl_without_gating_checkpoint(tiny_checkpoints, tmp_path, capsys):
    only = tmp_path / "only_mcl"
    only.mkdir()
    (only / "mcl.safetensors").write_bytes((tiny_checkpoints / "mcl.safetensors").read_bytes())
    code, _, err = run_cli(capsys, "--model", "mcl", "--routing", "soft", "--out", tmp_path / "x.npz", "--checkpoint-dir", only)
    assert code == 2 and "checkpoint gating: not found" in err and "routing 'soft' needs the gating network" in err
    code, _, err = run_cli(capsys, "--model", "mcl", "--routing", "heuristic", "--steps", 2, "--out", tmp_path / "x.npz", "--checkpoint-dir", only)
    assert code == 0, err


def test_corrupted_checkpoint_is_a_clear_error(tiny_checkpoints, tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    data = bytearray((tiny_checkpoints / "ddpm.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (d / "ddpm.safetensors").write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "--model", "ddpm", "--out", tmp_path / "x.npz", "--checkpoint-dir", d)
    assert code == 2 and f"checkpoint {d / 'ddpm.safetensors'}: corrupted" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_unavailable(tiny_checkpoints, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--device", "cuda", "--out", tmp_path / "x.npz", "--checkpoint-dir", tiny_checkpoints)
    assert code == 2 and "CUDA is not available" in err


def test_out_is_a_directory(tiny_checkpoints, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--out", tmp_path, "--checkpoint-dir", tiny_checkpoints)
    assert code == 2 and "is a directory" in err
