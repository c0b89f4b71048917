"""The CPU benchmark script runs and reports what it says it does (no timing assertions: speed is
recorded in docs/benchmarks.md from the script's own runs, not checked here)."""
from __future__ import annotations

import pytest

from benchmarks import bench_app
from diffusion_core.registry import ModelRegistry

pytestmark = [pytest.mark.slow]  # tiers: python -m pytest -m "not slow and not browser" leaves these out


def test_bench_reports_every_case(tiny_checkpoints):
    rows = bench_app.bench(ModelRegistry(tiny_checkpoints), repeats=1)
    assert set(rows) == {"one_digit", "ten_digits", "sixteen"}
    assert rows["one_digit"]["settings"]["n"] == 1 and rows["ten_digits"]["settings"]["n"] == 10 and rows["sixteen"]["settings"]["n"] == 16
    for row in rows.values():
        first, step, final = row["app_first_frame_s"], row["app_first_step_frame_s"], row["app_final_image_s"]
        assert 0 <= first <= step <= final and row["pipeline_generate_s"] > 0


def test_bench_cli_errors(tiny_checkpoints, capsys):
    with pytest.raises(SystemExit) as e:
        bench_app.main(["--checkpoint-dir", str(tiny_checkpoints), "--browser"])
    assert e.value.code == 2 and "--browser needs --url" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="model 'nope' not found"):
        bench_app.main(["--checkpoint-dir", str(tiny_checkpoints), "--model", "nope", "--repeats", "1"])
