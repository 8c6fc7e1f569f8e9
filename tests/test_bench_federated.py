"""Smoke run of the federated benchmark on a tiny consortium (no Prefect involved)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import bench_federated


def test_bench_federated_smoke(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_federated, "DATA", tmp_path)
    monkeypatch.setenv("FEDFUSE_SECRET", "overridden-by-the-benchmark")
    argv = ["--customers", "2500", "--parties", "3", "--partitions", "a1.0", "--set", "rounds=4"]
    rows = bench_federated.main(argv)
    assert len(rows) == 1
    row = rows[0]
    assert (row.parties, row.partition, row.rows) == (3, "a1.0", 2500)
    for auc in (row.auc_fed, row.auc_local, row.auc_cen, row.within_fed, row.within_cen):
        assert 0.5 < auc < 1.0
    assert row.trees_fed > 0 and row.trees_cen > 0
    assert row.wall_fed > 0 and row.wall_cen > 0 and math.isfinite(row.ratio)
    assert row.gap == pytest.approx(row.auc_cen - row.auc_fed)
    # lossless mode: one data-parallel model, close to centralised
    assert 0.5 < row.auc_loss < 1.0 and 0.5 < row.within_loss < 1.0
    assert row.trees_loss > 0 and 1 <= row.rounds_loss <= 4
    assert row.wall_loss > 0 and math.isfinite(row.ratio_loss)
    out = capsys.readouterr().out
    assert "| 3 | a1.0 |" in out and "AUC fed" in out and "AUC lossless" in out
    assert (tmp_path / "demo-c2500-p3-a1.0-s0" / "prepared" / "schema.json").exists()

    # a second use reads the cached fused tables instead of generating them again
    data = bench_federated.prepared(2500, 3, "a1.0", 0)
    assert sum(f.height for f in data.frames.values()) == 2500
    assert "generated" not in capsys.readouterr().out
