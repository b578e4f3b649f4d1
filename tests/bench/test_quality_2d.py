"""benchmarks/quality_2d.py: one row per method and seed, a mean row over several seeds, CSV + markdown."""
from __future__ import annotations

import csv

from .helpers import benchmark_script


def _script():
    return benchmark_script("quality_2d")


def test_seeds_give_a_mean_row(tmp_path):
    rc = _script().main(["--methods", "meanflow", "--seeds", "0,1", "--steps", "3", "--batch", "16",
                         "--width", "16", "--eval-samples", "500", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "quality_checkerboard.csv")))
    assert [r["seed"] for r in rows] == ["0", "1", "mean"]
    for k in ("nfe1", "nfe2", "nfe4"):
        assert abs(float(rows[2][k]) - (float(rows[0][k]) + float(rows[1][k])) / 2) < 1e-4
    assert rows[0]["nfe1"] != rows[1]["nfe1"]  # the seed reaches the training run
    assert (tmp_path / "meanflow_checkerboard_s1" / "metrics.json").exists()
    assert "| meanflow | mean |" in (tmp_path / "quality_checkerboard.md").read_text()


def test_a_failed_training_fails_the_run(tmp_path, monkeypatch):
    """A training run that fails (the loop returns non-zero): the row says so and the exit status is 1, not 0.
    (Flags the loop refuses, such as --steps 0, are usage errors before any training: test_scripts.py.)"""
    mod = _script()
    monkeypatch.setattr(mod.train, "main", lambda argv: 2)
    rc = mod.main(["--methods", "fm", "--steps", "3", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 1
    rows = list(csv.DictReader(open(tmp_path / "quality_checkerboard.csv")))
    assert rows == [{"method": "fm", "error": "training failed"}]
