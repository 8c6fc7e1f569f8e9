"""Smoke run of the pipeline benchmark on a tiny consortium (its steps in subprocesses)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from benchmarks import bench_prepare


def test_bench_prepare_quick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_prepare, "DATA", tmp_path)
    results = bench_prepare.main(["--quick", "--parties", "1", "--no-flow"])  # flows: elsewhere
    rows = results[3000]
    steps = [(r.party, r.step) for r in rows]
    for party in ("site-a",):
        for stage in ("preprocess", "features", "align"):
            for source in ("customers", "transactions", "feedback", "iot"):
                assert (party, f"{stage}:{source}") in steps
        assert (party, "fuse") in steps
    assert steps[-1] == ("all", "all steps")
    for row in rows:
        assert row.fedfuse.wall > 0 and row.plain.wall > 0
        assert row.fedfuse.rss_mib > 0 and row.plain.rss_mib > 0
    total = rows[-1]
    assert total.fedfuse.wall == pytest.approx(sum(r.fedfuse.wall for r in rows[:-1]))
    out = capsys.readouterr().out
    assert "| 3,000 | all | all steps |" in out and "fedfuse peak RSS" in out
    # both sides wrote their fused tables: one row per customer of the party's customers file
    root = tmp_path / "prepare-c3000-p1-s1"
    for party in ("site-a",):
        plain = pl.read_parquet(root / "work" / "plain" / party / "fused.parquet")
        assert plain.height > 0 and plain["entity_hash"].n_unique() == plain.height
        fused = list((root / "consortium" / "stores" / party / "fused").glob("*.parquet"))
        assert fused
