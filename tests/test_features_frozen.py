"""The events and signal features of a small fixed multi-axis input, frozen: any change to
how they are computed must give the same values (to 1e-9 relative).

The input covers what the vectorised code has to get right together: several entities whose
readings interleave in time and arrive shuffled, unequal recording lengths (equal ones too,
which share an FFT length; one longer than ``MAX_FFT``), a missing reading on one axis, a
NaN reading, a constant signal, one of a single reading, one of two, timestamp ties, and
both a declared and a per-entity sampling rate.

Regenerate the expected files only for an intended change of the features:
``python -m tests.test_features_frozen`` rewrites ``tests/data/frozen_*.parquet``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tasks.prepare.modalities.events import events_features
from tasks.prepare.modalities.signals import MAX_FFT, signal_features
from tasks.prepare.modalities.table import window_end
from tasks.types import TIMESTAMP

DATA = Path(__file__).parent / "data"
ENTITY = "customer_id"
AXES = ["ax", "ay", "az"]
MEASURES = [*AXES, "temp"]
T0 = dt.datetime(2026, 3, 30, 23, 58, tzinfo=dt.UTC)
START_US = int((T0 - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) / dt.timedelta(microseconds=1))
AS_OF = dt.date(2026, 3, 31)

#: readings per entity
LENGTHS = {"a": 300, "b": 100, "c": 100, "d": 37, "e": 1, "f": 50, "g": 2, "h": MAX_FFT + 60}

#: (name, events options, signal options)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "declared": (
        {"windows": ["1s", "5s"], "end_at": "last_event"},
        {"axes": AXES, "sampling_hz": 20.0, "sub_window_s": 0.5},
    ),
    "own_rate": (
        {"windows": ["2s", 1], "end_at": "as_of"},
        {"axes": AXES, "sampling_hz": None, "sub_window_s": 1.0},
    ),
}


def frozen_input() -> pl.DataFrame:
    """The fixed readings (deterministic: seeded PCG64), rows shuffled."""
    rng = np.random.default_rng(20261203)
    frames = []
    for k, (entity, n) in enumerate(LENGTHS.items()):
        # each entity its own rate (jittered steps, some repeated: ties), from T0
        step = rng.integers(40_000, 60_000)
        steps = np.maximum(step + rng.integers(-3_000, 3_000, size=n), 0)
        steps[rng.random(n) < 0.03] = 0
        micros = np.cumsum(steps) - steps[0]
        t = np.arange(n) / 20.0
        columns = {
            "ax": np.sin(2 * np.pi * (1 + k) * t / 7) + 0.3 * rng.normal(size=n),
            "ay": np.cumsum(rng.normal(size=n)) * 0.1 + k,
            "az": 9.81 + 0.05 * rng.normal(size=n),
            "temp": 20 + k + 0.01 * np.cumsum(rng.normal(size=n)),
        }
        if entity == "f":  # a constant recording
            columns = {m: np.full(n, 1.5) for m in MEASURES}
        frame = pl.DataFrame(
            {
                ENTITY: [entity] * n,
                TIMESTAMP: pl.Series(micros + START_US, dtype=pl.Int64).cast(
                    pl.Datetime("us", "UTC")
                ),
                **columns,
            }
        )
        frames.append(frame)
    frame = pl.concat(frames).with_row_index("__i")
    frame = frame.with_columns(
        # a missing reading on one axis, a NaN on another, a missing temperature run
        pl.when((pl.col(ENTITY) == "a") & (pl.col("__i") == 17))
        .then(None)
        .otherwise("ay")
        .alias("ay"),
        pl.when((pl.col(ENTITY) == "b") & (pl.col("__i") == 320))
        .then(float("nan"))
        .otherwise("ax")
        .alias("ax"),
        pl.when((pl.col(ENTITY) == "d") & pl.col("__i").is_between(450, 460))
        .then(None)
        .otherwise("temp")
        .alias("temp"),
    )
    return frame.drop("__i").sample(fraction=1.0, shuffle=True, seed=5)


def compute(case: str, *, in_runs: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The features of the frozen input, shuffled or (``in_runs``) already in per-entity
    runs in time order (ties in the shuffled order: the same readings in the same order)."""
    events_options, signal_options = CASES[case]
    frame = frozen_input()
    if in_runs:
        frame = frame.sort(ENTITY, TIMESTAMP, maintain_order=True)
    events = events_features(frame, entity=ENTITY, measures=MEASURES, as_of=AS_OF, **events_options)
    signal = signal_features(
        frame, entity=ENTITY, measures=MEASURES, end=window_end(AS_OF), **signal_options
    )
    return events, signal


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("part", ["events", "signals"])
@pytest.mark.parametrize("in_runs", [False, True], ids=["shuffled", "in_runs"])
def test_features_equal_the_frozen_values(case: str, part: str, in_runs: bool) -> None:
    events, signal = compute(case, in_runs=in_runs)
    got = events if part == "events" else signal
    expected = pl.read_parquet(DATA / f"frozen_{part}_{case}.parquet")
    assert_frame_equal(got, expected, rel_tol=1e-9, abs_tol=1e-12)


def test_the_frozen_input_covers_the_edge_cases() -> None:
    frame = frozen_input()
    counts = dict(frame.group_by(ENTITY).len().iter_rows())
    assert counts == LENGTHS
    assert frame["ay"].null_count() == 1 and frame["ax"].is_nan().sum() == 1
    assert frame.filter(pl.col(ENTITY) == "f").select(MEASURES).n_unique() == 1
    assert frame.select(ENTITY, TIMESTAMP).is_duplicated().any()  # timestamp ties


if __name__ == "__main__":
    for name in CASES:
        for part, out in zip(("events", "signals"), compute(name), strict=True):
            out.write_parquet(DATA / f"frozen_{part}_{name}.parquet")
