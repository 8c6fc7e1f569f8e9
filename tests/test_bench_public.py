"""Quick run of the public data benchmark through the flows (a real Prefect server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_public


@pytest.mark.prefect
def test_bench_public_quick(
    prefect_api: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(bench_public, "DATA", tmp_path)
    monkeypatch.setenv("FEDFUSE_SECRET", "overridden-by-the-benchmark")
    monkeypatch.setenv("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    results = bench_public.main(["--quick", "--rows", "900"])
    assert [r.name for r in results] == ["wa_churn", "mlc_churn", "caravan"]
    out = capsys.readouterr().out
    for r in results:
        assert r.rows == 900 and 1 <= r.best_round <= r.rounds_run <= bench_public.QUICK_ROUNDS
        assert all(0.0 <= f.auc <= 1.0 for f in r.figures)
        assert 0.5 < r.auc("plain LightGBM on the raw columns (pools data)") < 1.0
        assert f"{r.name}: 900 rows, {r.parties} parties, {r.layout}" in out
        assert (tmp_path / f"public-{r.name}-r900-s0" / "spec.toml").exists()
    vertical, skewed, wide = results
    assert {"vertical (fused)", "A alone", "B alone", "C alone"} <= {
        f.model for f in vertical.figures
    }
    assert vertical.auc("vertical (fused)") > 0.7
    assert "- 900 customers at every party (PSI)" in out
    for r in (skewed, wide):
        fed = next(f for f in r.figures if f.model == "federated")
        assert fed.bound is not None and fed.bound < 0.05  # the pooled AUC and its bound
        assert any(f.model.endswith(": local-only") for f in r.figures)
    assert skewed.auc("federated") > 0.7
    # learned at prepare from the sites' counts: at 900 rows 46 states reach MIN_ENTITIES
    assert "- values learned per vocabulary (+ other): state 46, area_code 3," in out
    assert "- no category vocabulary" in out  # Caravan's attributes are integer codes
    assert "| federated |" in out and "| plain LightGBM on the raw columns (pools data) |" in out
