"""Smoke run of the peer benchmark: fedfuse's side only, tiny budget, nothing installed."""

from __future__ import annotations

from benchmarks import bench_peers


def test_bench_peers_quick(capsys) -> None:  # type: ignore[no-untyped-def]
    tables = bench_peers.main(["--quick", "--data", "synthetic", "--partitions", "a0.3"])
    table = tables["synthetic a0.3"]
    assert set(table) == {
        "centralised",
        "averaging",
        "averaging-leaves",
        "cyclic-leaves",
        "lossless",
    }
    for row in table.values():
        assert 0.5 < row["auc"] <= 1.0
        assert row["trees"] > 0 and row["wall"] > 0 and row["rss"] > 0
    assert "gap to centralised" in capsys.readouterr().out
