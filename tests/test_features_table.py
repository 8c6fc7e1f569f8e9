"""Table features are the same to the last bit on every run (cache keys hash their bytes)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl

from tasks.features_table import transaction_features
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
