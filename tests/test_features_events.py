"""Events features on tiny hand-made logs with hand-computed expectations.

as_of = 2024-01-10, so every window ends at 2024-01-11 00:00 UTC (exclusive); the 7-day
window starts 2024-01-04 00:00 and the 3-day window 2024-01-08 00:00. "x" below is the
time of an event in days before that end.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Sequence

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tasks.prepare.modalities import events as features_events
from tasks.prepare.modalities.events import event_feature_names, events_features

AS_OF = dt.date(2024, 1, 10)
WINDOWS = [7, 3]  # unsorted on purpose: output order follows ascending windows


def at(day: int, hour: int = 0, month: int = 1, year: int = 2024) -> dt.datetime:
    return dt.datetime(year, month, day, hour, tzinfo=dt.UTC)


def events(rows: Sequence[tuple[str, str, dt.datetime, float | None, bool]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={
            "customer_id": pl.String,
            "device_id": pl.String,
            "timestamp": pl.Datetime("us", "UTC"),
            "temp": pl.Float64,
            "error": pl.Boolean,
        },
        orient="row",
    )


@pytest.fixture
def log() -> pl.DataFrame:
    return events(
        [
            # entity a                                               x
            ("a", "d1", at(25, 12, month=12, year=2023), 1.0, False),  # -16.5 (history only)
            ("a", "d1", at(4), 2.0, True),  # -7: exactly the 7-day start, inside
            ("a", "d1", at(8), None, False),  # -3: exactly the 3-day start, inside
            ("b", "d3", at(5), 10.0, False),  # -6
            ("a", "d2", at(9, 6), 4.0, False),  # -1.75
            ("b", "d3", at(6), 10.0, False),  # -5
            ("a", "d2", at(9, 18), 5.0, True),  # -1.25
            ("a", "d9", at(11), 100.0, True),  # as_of + 1 day 00:00: excluded
            ("c", "d4", at(12), 7.0, False),  # only after as_of: c is not in the result
        ]
    )


def window(
    n: int,
    days: int,
    error: float | None,
    gap: float | None,
    mean: float | None,
    std: float | None,
    lo: float | None,
    hi: float | None,
    missing: float | None,
    slope: float | None,
) -> list[float | int | None]:
    return [n, days, error, gap, mean, std, lo, hi, missing, slope]


def expected_frame() -> pl.DataFrame:
    a = [
        # 3d: events at -3 (null), -1.75 (4), -1.25 (5); errors F F T; gaps 1.25, 0.5 and
        # 1.25 to the end; readings (-1.75, 4), (-1.25, 5): slope 1 / 0.5
        *window(3, 2, 1 / 3, 1.25, 4.5, math.sqrt(0.5), 4.0, 5.0, 1 / 3, 2.0),
        # 7d: adds -7 (2, error); the 9.5-day gap into it starts outside the window; 3 dates;
        # slope: n=3, Sx=-10, Sy=11, Sxy=-27.25, Sxx=53.625
        *window(
            4,
            3,
            0.5,
            4.0,
            11 / 3,
            math.sqrt((25 / 9 + 1 / 9 + 16 / 9) / 2),
            2.0,
            5.0,
            0.25,
            (3 * -27.25 - (-10 * 11)) / (3 * 53.625 - 100),
        ),
        # all: adds -16.5 (1) and its 9.5-day gap to -7;
        # slope: n=4, Sx=-26.5, Sy=12, Sxy=-43.75, Sxx=325.875
        *window(
            5,
            4,
            0.4,
            9.5,
            3.0,
            math.sqrt(10 / 3),
            1.0,
            5.0,
            0.2,
            (4 * -43.75 - (-26.5 * 12)) / (4 * 325.875 - 26.5**2),
        ),
        5.0,  # temp_last: the 100.0 at as_of + 1 day is ignored
        1.25,  # days_since_last_event
        2,  # n_devices: d9 only reports after as_of
    ]
    b = [
        *window(0, 0, None, None, None, None, None, None, None, None),  # nothing in 3d
        *window(2, 2, 0.0, 5.0, 10.0, 0.0, 10.0, 10.0, 0.0, 0.0),  # trailing gap -5 -> 0
        *window(2, 2, 0.0, 5.0, 10.0, 0.0, 10.0, 10.0, 0.0, 0.0),
        10.0,
        5.0,
        1,
    ]
    names = event_feature_names(["temp"], WINDOWS, error=True)
    schema: dict[str, pl.DataType] = {"customer_id": pl.String()}
    for name in names:
        integer = name.startswith(("n_events", "active_days")) or name == "n_devices"
        schema[name] = pl.Int64() if integer else pl.Float64()
    return pl.DataFrame([["a", *a], ["b", *b]], schema=schema, orient="row")


def features(frame: pl.DataFrame | pl.LazyFrame, **options: object) -> pl.DataFrame:
    return events_features(
        frame,
        entity="customer_id",
        measures=["temp"],
        as_of=AS_OF,
        windows=WINDOWS,
        **options,  # type: ignore[arg-type]
    )


def test_output_columns_in_order(log: pl.DataFrame) -> None:
    out = features(log)
    assert out.columns == [
        "customer_id",
        *(
            f"{stat}_{s}"
            for s in ("3d", "7d", "all")
            for stat in (
                "n_events",
                "active_days",
                "error_rate",
                "longest_gap_days",
                "temp_mean",
                "temp_std",
                "temp_min",
                "temp_max",
                "temp_missing_rate",
                "temp_slope",
            )
        ),
        "temp_last",
        "days_since_last_event",
        "n_devices",
    ]


@pytest.mark.parametrize("engine", ["in-memory", "streaming"])
def test_hand_computed_values(log: pl.DataFrame, engine: str) -> None:
    assert_frame_equal(features(log, engine=engine), expected_frame(), abs_tol=1e-12)


def test_lazy_and_eager_inputs_agree(log: pl.DataFrame) -> None:
    assert_frame_equal(features(log.lazy()), features(log))


def test_deterministic_and_independent_of_row_order(log: pl.DataFrame) -> None:
    first = features(log)
    assert_frame_equal(features(log), first)
    assert_frame_equal(features(log.reverse()), first, abs_tol=1e-12)
    assert_frame_equal(
        features(log.sample(fraction=1.0, shuffle=True, seed=3)), first, abs_tol=1e-12
    )


def test_timestamp_ties_keep_input_order_for_last() -> None:
    t = at(9)
    rows = [("a", "d1", t, 1.0, False), ("a", "d1", t, 2.0, False)]
    assert features(events(rows))["temp_last"].to_list() == [2.0]
    assert features(events(rows[::-1]))["temp_last"].to_list() == [1.0]


def test_slope_is_exact_on_a_linear_series() -> None:
    # temp = 20 + 0.25 * x (x = days before the end), readings every 13 hours, one missing
    times = [at(1) + dt.timedelta(hours=13 * i) for i in range(17)]
    end = at(11)
    rows: list[tuple[str, str, dt.datetime, float | None, bool]] = [
        ("a", "d1", t, 20 + 0.25 * (t - end).total_seconds() / 86400, False) for t in times
    ]
    rows[5] = ("a", "d1", times[5], None, False)
    out = features(events(rows))
    for s in ("3d", "7d", "all"):
        assert out[f"temp_slope_{s}"].item() == pytest.approx(0.25, rel=1e-12)


def test_slope_and_std_need_two_readings_at_distinct_times() -> None:
    rows = [
        ("a", "d1", at(9), 1.0, False),
        ("a", "d1", at(9), 3.0, False),  # same instant: no time variance
        ("b", "d1", at(9), 1.0, False),  # a single reading
        ("b", "d1", at(9, 1), None, False),
    ]
    out = features(events(rows))
    assert out["temp_slope_all"].to_list() == [None, None]
    assert out["temp_std_all"].to_list() == [pytest.approx(math.sqrt(2.0)), None]
    assert out["temp_missing_rate_all"].to_list() == [0.0, 0.5]


def test_without_error_flag_or_measures() -> None:
    rows = events([("a", "d1", at(9), 1.0, False), ("a", "d2", at(10), None, True)])
    out = events_features(
        rows.drop("error", "temp"), entity="customer_id", measures=[], as_of=AS_OF, windows=[3]
    )
    assert out.columns == ["customer_id", *event_feature_names([], [3], error=False)]
    assert out.row(0) == ("a", 2, 2, 1.0, 2, 2, 1.0, 1.0, 2)


def test_no_events_before_the_end_gives_an_empty_table(log: pl.DataFrame) -> None:
    out = features(log.filter(pl.col("customer_id") == "c"))
    assert out.height == 0
    assert out.columns == expected_frame().columns


def test_rejects_non_positive_windows(log: pl.DataFrame) -> None:
    with pytest.raises(ValueError, match="positive"):
        events_features(log, entity="customer_id", measures=["temp"], as_of=AS_OF, windows=[0])


def test_hash_collision_falls_back_to_exact_order(
    log: pl.DataFrame, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # every entity gets the same sort key, so a's and b's events interleave in time
    monkeypatch.setattr(features_events, "_entity_order", lambda entity: pl.lit(0, pl.UInt64))
    with caplog.at_level(logging.WARNING, logger="tasks.prepare.modalities.events"):
        out = features(log)
    assert "collision" in caplog.text
    assert_frame_equal(out, expected_frame(), abs_tol=1e-12)
