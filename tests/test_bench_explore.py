"""The Explore benchmark script runs and reports its cases (no timing assertions: the numbers go in
docs/benchmarks.md from the script's own runs)."""
from __future__ import annotations

import json

import pytest

from benchmarks import bench_explore
from diffusion_core.registry import ModelRegistry

pytestmark = [pytest.mark.slow]  # tiers: python -m pytest -m "not slow and not browser" leaves these out


def test_bench_explore_reports_every_case(tiny_checkpoints, tmp_path, capsys):
    r = bench_explore.bench(ModelRegistry(tiny_checkpoints), repeats=1)
    assert r["settings"]["level"] == 0.5 and r["settings"]["steps"] == 16 and 0 < r["sdedit_steps_run"] < 16
    for case in ("one_step", "one_step_app", "sdedit_half_16", "error_curve_49_levels"):
        assert 0 < r[case]["min_s"] <= r[case]["median_s"]
    assert bench_explore.main(["--checkpoint-dir", str(tiny_checkpoints), "--repeats", "1", "--json", str(tmp_path / "b.json")]) == 0
    assert "SDEdit from t=0.5, 16 steps" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "b.json").read_text())["targets_s"]) == {"one_step_s", "sdedit_half_16_s"}
