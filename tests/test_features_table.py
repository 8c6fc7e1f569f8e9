"""Table features are the same to the last bit on every run (cache keys hash their bytes)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl

from tasks.prepare.modalities.table import transaction_features
from tasks.types import AMOUNT, CATEGORY, TIMESTAMP


def test_transaction_features_are_bitwise_reproducible() -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    clean = pl.DataFrame(
        {
            "customer_id": rng.integers(0, 3_000, n).astype(str),
            TIMESTAMP: pl.Series(
                np.datetime64("2026-03-31T00:00:00", "ms")
                - rng.integers(0, 200 * 86_400_000, n).astype("timedelta64[ms]")
            ).dt.replace_time_zone("UTC"),
            AMOUNT: np.round(rng.gamma(2.0, 30.0, n), 2),
            CATEGORY: rng.choice(["grocery", "travel", "other"], n),
        }
    ).sample(fraction=1.0, shuffle=True, seed=1)
    runs = [
        transaction_features(
            clean,
            entity="customer_id",
            as_of=dt.date(2026, 3, 31),
            windows=[30, 90],
            categories=["grocery", "travel", "other"],
        )
        for _ in range(8)
    ]
    assert runs[0].height == 3_000
    for other in runs[1:]:
        assert other.equals(runs[0])
    total = runs[0].select(pl.sum_horizontal(pl.col("^share_.*$"))).to_series()
    assert (total - 1.0).abs().max() < 1e-12


_THREADS_SCRIPT = """
import datetime as dt, sys
import numpy as np, polars as pl
from tasks.prepare.modalities.table import transaction_features
from tasks.types import AMOUNT, TIMESTAMP
rng = np.random.default_rng(0)
n = 400_000
clean = pl.DataFrame({
    "customer_id": rng.integers(0, 3_000, n).astype(str),
    TIMESTAMP: pl.Series(
        np.datetime64("2026-03-31T00:00:00", "ms")
        - rng.integers(0, 200 * 86_400_000, n).astype("timedelta64[ms]")
    ).dt.replace_time_zone("UTC"),
    AMOUNT: np.round(rng.gamma(2.0, 30.0, n), 2),
}).sample(fraction=1.0, shuffle=True, seed=1)
transaction_features(
    clean, entity="customer_id", as_of=dt.date(2026, 3, 31), windows=[30, 90]
).write_parquet(sys.argv[1])
"""


def test_transaction_features_do_not_depend_on_the_thread_count(tmp_path: Path) -> None:
    """Polars splits groups across threads differently with more threads; float sums and
    standard deviations then differed in the last bit (8 threads vs 1)."""
    frames = {}
    for threads in (1, 8):
        out = tmp_path / f"threads-{threads}.parquet"
        env = dict(os.environ, POLARS_MAX_THREADS=str(threads))
        subprocess.run(
            [sys.executable, "-c", _THREADS_SCRIPT, str(out)], env=env, check=True, timeout=120
        )
        frames[threads] = pl.read_parquet(out)
    one, eight = frames[1], frames[8]
    assert one.height == 3_000
    assert [c for c in one.columns if not one[c].equals(eight[c])] == []


def test_amount_moments_match_their_definitions() -> None:
    ts = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    clean = pl.DataFrame(
        {
            "c": ["one", "two", "two", "none", "none", "big", "big", "big"],
            TIMESTAMP: [ts] * 8,
            AMOUNT: [5.0, 1.0, 3.0, None, None, 1e9, 1e9 + 0.5, 1e9 + 1.0],
        }
    )
    out = transaction_features(clean, entity="c", as_of=dt.date(2026, 3, 31), windows=[30, 90])
    rows = {r["c"]: r for r in out.iter_rows(named=True)}
    assert rows["one"]["monetary"] == 5.0 and rows["one"]["amount_std"] is None
    assert rows["two"]["amount_mean"] == 2.0
    assert abs(rows["two"]["amount_std"] - 2**0.5) < 1e-12
    assert rows["none"]["monetary"] == 0.0
    assert rows["none"]["amount_mean"] is None and rows["none"]["amount_std"] is None
    # large amounts, small spread: exact integer moments keep the spread (0.5)
    assert abs(rows["big"]["amount_std"] - 0.5) < 1e-9
    assert rows["big"]["amount_90d"] == 3e9 + 1.5


def test_amounts_at_the_bound_sum_exactly_and_shares_of_zero_spend_are_null() -> None:
    from tasks.prepare.modalities.table import MAX_ABS_AMOUNT

    ts = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    n = 20  # 20 x 1e18 millionths would wrap an Int64 sum (9.2e18) silently
    clean = pl.DataFrame(
        {
            "c": ["big"] * n + ["net0", "net0", "zero"],
            TIMESTAMP: [ts] * (n + 3),
            AMOUNT: [MAX_ABS_AMOUNT] * n + [5.0, -5.0, 0.0],
            CATEGORY: ["grocery"] * n + ["grocery", "travel", "grocery"],
        }
    )
    out = transaction_features(
        clean,
        entity="c",
        as_of=dt.date(2026, 3, 31),
        windows=[30, 90],
        categories=["grocery", "travel"],
    )
    rows = {r["c"]: r for r in out.iter_rows(named=True)}
    assert rows["big"]["monetary"] == n * MAX_ABS_AMOUNT
    assert rows["big"]["amount_90d"] == n * MAX_ABS_AMOUNT
    assert rows["big"]["share_grocery"] == 1.0
    for entity in ("net0", "zero"):  # spend sums to 0: null (missing), never NaN or inf
        assert rows[entity]["share_grocery"] is None
        assert rows[entity]["share_travel"] is None
    floats = out.select(pl.selectors.float())
    assert not any(floats.select(pl.all().is_nan().any() | pl.all().is_infinite().any()).row(0))
