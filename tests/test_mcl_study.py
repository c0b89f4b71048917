"""benchmarks/mcl_study.py's bookkeeping of rows over seeds (its numbers come from the evaluation,
tested in test_evaluate.py)."""
from __future__ import annotations

import pytest

from benchmarks import mcl_study


def _row(seed, fd, fd2=2.0, conf=0.95):
    return {"fd_ratio": fd, "fd_ratio_2": fd2, "entropy": 0.99, "confident": conf, "confident_2": conf, "seed": seed}


def test_row_key_names_sample_count_and_seed():
    s = {"routing": "sampled", "autoguidance": 3.0, "autoguide": "mixture"}
    assert mcl_study.row_key(s, 1000) == "sampled ag=3 of mixture"  # the names rows had before --seeds
    assert mcl_study.row_key(s, 300, 2) == "sampled ag=3 of mixture (n=300) seed 2"
    assert mcl_study.row_key({"routing": "soft", "autoguidance": 1.0}, 1000, 0) == "soft"


def test_seed_groups_and_their_means():
    rows = {"sampled ag=3 of mixture": _row(0, 1.5), "sampled ag=3 of mixture seed 2": _row(2, 1.1),
            "sampled ag=3 of mixture seed 1": _row(1, 1.3), "soft": _row(0, 2.0)}
    groups = mcl_study.seed_groups(rows)
    assert list(groups) == ["sampled ag=3 of mixture"]  # a row at one seed is no group
    assert [r["seed"] for r in groups["sampled ag=3 of mixture"]] == [0, 1, 2]
    lines = mcl_study.seeds_markdown([{"arm": "parts", "rows": rows}])
    line = next(x for x in lines if x.startswith("| parts"))
    assert "| 0,1,2 | 1.30 (1.10-1.50) |" in line


def test_bad_seeds_are_refused(capsys):
    for bad in ("a,b", "-1", ","):
        with pytest.raises(SystemExit) as e:
            mcl_study.main(["--arms", "", "--seeds", bad, "--out", "/nonexistent/never"])
        assert e.value.code == 2 and "--seeds" in capsys.readouterr().err
