"""Smoke run of the vertical benchmark on a tiny consortium (no Prefect involved)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import bench_vertical


def test_bench_vertical_smoke(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_vertical, "DATA", tmp_path)
    monkeypatch.setenv("FEDFUSE_SECRET", "overridden-by-the-benchmark")
    result = bench_vertical.main(["--customers", "3000", "--psi-workers", "1"])
    assert result.customers == 3000
    assert set(result.rows) == {"A", "B", "C"}
    assert 0 < result.overlap <= min(result.rows.values())
    assert sum(result.splits.values()) == result.overlap
    names = [m.name for m in result.models]
    for name in (
        "A alone",
        "B alone",
        "C alone",
        "vertical rounds",
        "one-shot fixed",
        "one-shot learned",
        "centralised",
        "centralised, no cross-block interactions",
    ):
        assert name in names
    for model in result.models:
        assert 0.5 < model.auc <= 1.0, model
        assert math.isfinite(model.logloss) and model.trees > 0 and model.seconds >= 0
    assert result.psi_seconds > 0 and result.keys_per_second > 0
    assert result.gap == pytest.approx(result.auc("centralised") - result.rounds)
    out = capsys.readouterr().out
    assert "| vertical rounds |" in out and "PSI:" in out and "POOLS DATA" in out
    assert (tmp_path / "vertical-c3000-s0" / "prepared" / "meta.json").exists()

    # the second run reads the cached fused tables, repeats the alignment and the figures
    again = bench_vertical.main(["--customers", "3000", "--psi-workers", "1"])
    assert [m.auc for m in again.models] == [m.auc for m in result.models]
    assert "generated" not in capsys.readouterr().out
