"""Window lengths in days or durations, windows ending at each entity's last event, and
events sources without an entity map (the device is the entity)."""

from __future__ import annotations

import datetime as dt
import itertools
import math
import statistics
import tomllib
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from storage.sources import read_source
from tasks.prepare.modalities.events import event_feature_names, events_features
from tasks.prepare.modalities.signals import signal_feature_names
from tasks.prepare.modalities.table import transaction_features
from tasks.prepare.preprocess import preprocess
from tasks.prepare.windows import DAY_US, parse_window, parse_windows
from tasks.spec.load import load_spec, parse_spec
from tasks.spec.models import SpecError
from tests.factories import SPEC_HEAD

# --- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "suffix", "spec_value", "micros"),
    [
        (1, "1d", 1, DAY_US),
        (30, "30d", 30, 30 * DAY_US),
        ("30d", "30d", 30, 30 * DAY_US),
        ("24h", "1d", 1, DAY_US),
        ("6h", "6h", "6h", 6 * 3_600_000_000),
        ("15min", "15min", "15min", 15 * 60_000_000),
        ("90min", "90min", "90min", 90 * 60_000_000),
        ("120min", "2h", "2h", 2 * 3_600_000_000),
        ("10s", "10s", "10s", 10_000_000),
        ("60s", "1min", "1min", 60_000_000),
        ("500ms", "500ms", "500ms", 500_000),
        ("1000ms", "1s", "1s", 1_000_000),
        (36_500, "36500d", 36_500, 36_500 * DAY_US),
    ],
)
def test_a_window_parses_to_a_canonical_length(
    value: int | str, suffix: str, spec_value: int | str, micros: int
) -> None:
    window = parse_window(value)
    assert (window.suffix, window.spec_value, window.micros) == (suffix, spec_value, micros)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "positive"),
        (-3, "positive"),
        ("0s", "longer than zero"),
        ("0d", "longer than zero"),
        ("-5s", "whole number followed by a unit"),
        ("10", "whole number followed by a unit"),
        ("1.5h", "whole number followed by a unit"),
        ("10 s", "whole number followed by a unit"),
        ("10m", "whole number followed by a unit"),
        ("10S", "whole number followed by a unit"),
        ("", "whole number followed by a unit"),
        ("..", "whole number followed by a unit"),
        ("\x00\xff", "whole number followed by a unit"),
        ("1" * 5000 + "s", "whole number followed by a unit"),
        (36_501, "at most 36500 days"),
        (10**30, "at most 36500 days"),
        ("36501d", "at most 36500 days"),
        ("999999999999h", "at most 36500 days"),
        (True, "not a bool"),
        (1.5, "not a float"),
        (None, "not a NoneType"),
    ],
)
def test_a_bad_window_is_refused(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_window(value)


def test_the_same_length_twice_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"windows\[0\] and windows\[2\] are the same window \(1d\)"
    ):
        parse_windows(["24h", 7, 1])
    assert [w.suffix for w in parse_windows(["5s", "1s", 2])] == ["1s", "5s", "2d"]


# --- a sensor consortium: one watch per person, no entity map ------------------------------

AS_OF_END = dt.datetime(2026, 4, 1, tzinfo=dt.UTC)  # SPEC_HEAD: as_of = 2026-03-31
STEP = dt.timedelta(milliseconds=20)  # 50 Hz

SENSOR_PARTY = """
[[parties]]
id = "a"
store = "stores/a"
imports = ["raw/a"]

[[parties.sources]]
id = "people"
kind = "table"
grain = "entity"
path = "raw/a/people.csv"
[parties.sources.columns]
customer_id = { from = "person", dtype = "str" }
churned = { from = "churn", dtype = "bool", values = { yes = "true", no = "false" } }

[[parties.sources]]
id = "watch"
kind = "events"
path = "raw/a/watch.csv"
[parties.sources.columns]
customer_id = { from = "watch", dtype = "str", required = true }
timestamp = { from = "time", dtype = "datetime", required = true }
accel = { from = "accel", dtype = "float" }
[parties.sources.features]
windows = ["1s", "5s"]
window_end = "last_event"
"""


def _recordings() -> dict[str, list[tuple[dt.datetime, float | None]]]:
    """Per watch (= person): 50 Hz readings over a few seconds, on days in 2015."""
    p1 = dt.datetime(2015, 6, 1, 10, 0, tzinfo=dt.UTC)
    p2 = dt.datetime(2015, 6, 2, 23, 59, 58, tzinfo=dt.UTC)  # crosses midnight
    p3 = dt.datetime(2015, 7, 1, 8, 0, tzinfo=dt.UTC)
    return {
        "P1": [(p1 + i * STEP, 0.5 * i) for i in range(200)],  # 4 s, a straight line
        "P2": [(p2 + i * STEP, float(i % 10)) for i in range(300)],  # 6 s
        # 1.2 s; the last reading is missing (its time still counts)
        "P3": [(p3 + i * STEP, None if i == 59 else math.sin(i)) for i in range(60)],
    }


def _write_sensor_consortium(root: Path) -> Path:
    (root / "raw" / "a").mkdir(parents=True)
    (root / "raw" / "a" / "people.csv").write_text("person,churn\nP1,yes\nP2,no\nP3,no\nP4,yes\n")
    rows = [
        (person, when, value)
        for person, readings in _recordings().items()
        for when, value in readings
    ]
    rows = rows[1::2] + rows[::2]  # not in time order
    lines = ["watch,time,accel"] + [
        f"{person},{when.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]},{'' if v is None else repr(v)}"
        for person, when, v in rows
    ]
    lines += [  # bad rows: no key, no time, a reading that is no number
        ",2015-06-01 10:00:01.000,1.0",
        "P1,..,2.0",
        "P1,2015-06-01 10:00:01.000,..",
    ]
    (root / "raw" / "a" / "watch.csv").write_text("\n".join(lines) + "\n")
    spec = root / "spec.toml"
    spec.write_text(SPEC_HEAD.format() + SENSOR_PARTY)
    return spec


def _days(delta: dt.timedelta) -> float:
    return delta / dt.timedelta(days=1)


def _expected(readings: list[tuple[dt.datetime, float | None]]) -> dict[str, Any]:
    """The features of one watch, computed by hand from its readings."""
    last = max(t for t, _ in readings)
    out: dict[str, Any] = {
        "accel_last": [v for _, v in readings if v is not None][-1],
        "days_since_last_event": _days(AS_OF_END - last),
        "n_devices": 1,
    }
    for suffix, length in [("1s", 1.0), ("5s", 5.0), ("all", None)]:
        inside = [
            (t, v) for t, v in readings if length is None or t > last - dt.timedelta(seconds=length)
        ]
        times = [t for t, _ in inside]
        present = [(t, v) for t, v in inside if v is not None]
        values = [v for _, v in present]
        xs = [_days(t - last) for t, _ in present]
        x_mean, y_mean = statistics.fmean(xs), statistics.fmean(values)
        slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, values, strict=True)) / sum(
            (x - x_mean) ** 2 for x in xs
        )
        out |= {
            f"n_events_{suffix}": len(inside),
            f"active_days_{suffix}": len({t.date() for t in times}),
            # the window ends at the last event: no trailing gap
            f"longest_gap_days_{suffix}": max(_days(b - a) for a, b in itertools.pairwise(times)),
            f"accel_mean_{suffix}": y_mean,
            f"accel_std_{suffix}": statistics.stdev(values),
            f"accel_min_{suffix}": min(values),
            f"accel_max_{suffix}": max(values),
            f"accel_missing_rate_{suffix}": (len(inside) - len(present)) / len(inside),
            f"accel_slope_{suffix}": slope,
        }
    return out


def test_sensor_windows_end_at_each_watchs_last_event(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    from flows.prepare import party_pipeline

    spec_path = _write_sensor_consortium(tmp_path)
    fused = party_pipeline(str(spec_path), "a")
    quality = {q.source: q for q in fused.quality}
    assert (quality["watch"].rows_in, quality["watch"].rows_out) == (563, 560)
    assert quality["watch"].rejected_by_reason == {
        "column 'watch' (customer_id): required value missing": 1,
        "column 'time' (timestamp): cannot parse": 1,
        "column 'accel' (accel): cannot parse": 1,
    }
    table = pl.read_parquet(fused.feature_tables["watch"].uri).sort("customer_id")
    assert table["customer_id"].to_list() == ["p1", "p2", "p3"]  # strip_lower keys
    names = event_feature_names(["accel"], ["1s", "5s"], error=False)
    # sub-day windows: the recording's signal features follow the windowed ones
    assert table.columns == ["customer_id", *names, *signal_feature_names(["accel"], axes=None)]
    assert "n_events_1s" in names and "accel_slope_5s" in names
    for person, readings in _recordings().items():
        row = table.row(by_predicate=pl.col("customer_id") == person.lower(), named=True)
        for name, value in _expected(readings).items():
            assert row[name] == pytest.approx(value, rel=1e-9, abs=1e-12), (person, name)
    p1, p2, p3 = (table.row(i, named=True) for i in range(3))
    # 50 Hz: the 1 s window holds 50 readings, the 5 s one 250 (P1 recorded only 4 s)
    assert [p["n_events_1s"] for p in (p1, p2, p3)] == [50, 50, 50]
    assert [p["n_events_5s"] for p in (p1, p2, p3)] == [200, 250, 60]
    assert p2["active_days_5s"] == 2 and p2["active_days_1s"] == 1
    # 0.5 per reading at 50 Hz is 25 per second, in readings per day
    assert p1["accel_slope_1s"] == pytest.approx(25 * 86_400, rel=1e-9)
    assert p3["accel_missing_rate_1s"] == pytest.approx(1 / 50)
    # the fused table carries them under the source's prefix; P4 has no readings
    fused_table = pl.read_parquet(fused.table.uri)
    assert fused_table.height == 4
    assert {"events__n_events_1s", "events__accel_mean_5s"} <= set(fused_table.columns)
    assert fused_table["events__n_events_1s"].null_count() == 1


def test_windows_at_the_as_of_end_keep_their_old_meaning_in_last_event_mode() -> None:
    """Recency stays measured to the as_of end; events after it are ignored in both modes."""
    t0 = dt.datetime(2015, 6, 1, tzinfo=dt.UTC)
    clean = pl.DataFrame(
        {
            "customer_id": ["a", "a", "a"],
            "timestamp": [t0, t0 + dt.timedelta(seconds=3), dt.datetime(2026, 5, 1, tzinfo=dt.UTC)],
            "temp": [1.0, 2.0, 99.0],
        },
        schema_overrides={"timestamp": pl.Datetime("us", "UTC")},
    )
    kw: dict[str, Any] = {
        "entity": "customer_id",
        "measures": ["temp"],
        "as_of": dt.date(2026, 3, 31),
    }
    last = events_features(clean, windows=["2s"], end_at="last_event", **kw)
    as_of = events_features(clean, windows=["2s"], **kw)
    assert last["n_events_2s"].item() == 1 and as_of["n_events_2s"].item() == 0
    assert last["longest_gap_days_2s"].item() == 0.0  # one event: no gap
    assert last["longest_gap_days_all"].item() == pytest.approx(3 / 86_400)
    assert last["temp_last"].item() == 2.0
    since = _days(AS_OF_END - (t0 + dt.timedelta(seconds=3)))
    assert last["days_since_last_event"].item() == pytest.approx(since, rel=1e-15)
    assert as_of["days_since_last_event"].item() == pytest.approx(since, rel=1e-15)
    assert as_of["longest_gap_days_all"].item() == as_of["days_since_last_event"].item()


def test_day_durations_equal_int_windows() -> None:
    """``"7d"`` and ``"72h"`` are the int windows 7 and 3: same names, same values."""
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    clean = pl.DataFrame(
        {
            "customer_id": ["a", "a", "b", "a", "b"],
            "device_id": ["d1", "d2", "d3", "d1", "d3"],
            "timestamp": [t0 + dt.timedelta(hours=h) for h in (10, 70, 100, 200, 239)],
            "temp": [1.0, None, 3.0, 5.0, 8.0],
        },
        schema_overrides={"timestamp": pl.Datetime("us", "UTC")},
    )
    kw: dict[str, Any] = {
        "entity": "customer_id",
        "measures": ["temp"],
        "as_of": dt.date(2024, 1, 10),
    }
    assert_frame_equal(
        events_features(clean, windows=["7d", "72h"], **kw),
        events_features(clean, windows=[7, 3], **kw),
    )


def _transactions(times: list[dt.datetime], amounts: list[float]) -> pl.DataFrame:
    return pl.DataFrame(
        {"c": ["x"] * len(times), "timestamp": times, "amount": amounts},
        schema_overrides={"timestamp": pl.Datetime("us", "UTC")},
    )


def test_sub_day_transaction_windows_and_their_per_day_trend() -> None:
    end = dt.datetime(2026, 4, 1, tzinfo=dt.UTC)
    hours_before = [1, 5, 7, 20, 30]  # 2 in the last 6 h, 4 in the last day
    clean = _transactions(
        [end - dt.timedelta(hours=h) for h in hours_before], [1.0, 2.0, 4.0, 8.0, 16.0]
    )
    out = transaction_features(clean, entity="c", as_of=dt.date(2026, 3, 31), windows=["6h", "1d"])
    row = out.row(0, named=True)
    assert (row["count_6h"], row["count_1d"], row["amount_6h"], row["amount_1d"]) == (
        2,
        4,
        3.0,
        15.0,
    )
    # rates per day: 2 in a quarter day against 2 in the other three quarters
    assert row["count_trend"] == pytest.approx(2 / 0.25 - 2 / 0.75)
    assert row["amount_trend"] == pytest.approx(3.0 / 0.25 - 12.0 / 0.75)
    assert row["recency_days"] == pytest.approx(1 / 24)


def test_transaction_windows_ending_at_the_last_purchase() -> None:
    last = dt.datetime(2016, 2, 3, 12, tzinfo=dt.UTC)
    times = [last - dt.timedelta(minutes=m) for m in (0, 10, 15, 16, 90)]
    clean = _transactions(times, [1.0, 2.0, 4.0, 8.0, 16.0])
    kw: dict[str, Any] = {"entity": "c", "as_of": dt.date(2026, 3, 31), "windows": ["15min", "1h"]}
    row = transaction_features(clean, end_at="last_event", **kw).row(0, named=True)
    # (last - 15 min, last]: the purchase exactly 15 minutes before is outside
    assert (row["count_15min"], row["count_1h"]) == (2, 4)
    assert (row["amount_15min"], row["amount_1h"]) == (3.0, 15.0)
    assert row["recency_days"] == pytest.approx(_days(AS_OF_END - last))
    assert row["tenure_days"] == pytest.approx(_days(AS_OF_END - times[-1]))
    as_of = transaction_features(clean, **kw).row(0, named=True)
    assert (as_of["count_15min"], as_of["count_1h"]) == (0, 0)


# --- the spec ---------------------------------------------------------------------------


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="spec.toml", base="/base")
    return [str(p) for p in info.value.problems]


def _sensor_data(tmp_path: Path) -> dict[str, Any]:
    return tomllib.loads(_write_sensor_consortium(tmp_path).read_text())


def test_the_spec_takes_durations_and_window_end(tmp_path: Path) -> None:
    data = _sensor_data(tmp_path)
    data["parties"][0]["sources"][1]["features"]["windows"] = ["5s", "24h", "500ms", "30d"]
    spec = parse_spec(data, source="spec.toml", base=str(tmp_path))
    options = spec.parties[0].sources[1].features
    assert options.model_dump() == {
        "prefix": None,
        "windows": ["500ms", "5s", 1, 30],
        "window_end": "last_event",
        "signal": None,
        "sampling_hz": None,
        "axes": None,
        "sub_window": "1s",
    }
    assert load_spec(str(tmp_path / "spec.toml")).parties[0].sources[1].features.model_dump()[
        "windows"
    ] == ["1s", "5s"]


@pytest.mark.parametrize(
    ("windows", "message"),
    [
        (["1s", 0], "features.windows[1]: Value error, a window must be a positive number of days"),
        (["1s", "-1s"], "features.windows[1]: Value error, a duration must be a whole number"),
        (["10"], "features.windows[0]: Value error, a duration must be a whole number"),
        (["200y"], "features.windows[0]: Value error, a duration must be a whole number"),
        (["101000d"], "features.windows[0]: Value error, a window may be at most 36500 days"),
        (
            [1, "24h"],
            "features.windows: Value error, windows[0] and windows[1] are the same window (1d)",
        ),
        ([], "features.windows: Value error, windows must be a non-empty list"),
        ("5s", "features.windows: Input should be a valid list"),
    ],
)
def test_a_bad_window_in_the_spec_is_named_at_its_key_path(
    tmp_path: Path, windows: object, message: str
) -> None:
    data = _sensor_data(tmp_path)
    data["parties"][0]["sources"][1]["features"]["windows"] = windows
    problems = _problems(data)
    assert len(problems) == 1
    assert problems[0].startswith(f"parties[0].sources[1].{message}"), problems


def test_a_bad_window_end_is_named(tmp_path: Path) -> None:
    data = _sensor_data(tmp_path)
    data["parties"][0]["sources"][1]["features"]["window_end"] = "first_event"
    assert _problems(data)[0].startswith(
        "parties[0].sources[1].features.window_end: Input should be"
    )


def test_an_events_source_must_reach_the_entity_key(tmp_path: Path) -> None:
    data = _sensor_data(tmp_path)
    source = data["parties"][0]["sources"][1]
    source["columns"]["device_id"] = source["columns"].pop("customer_id")
    assert _problems(data) == [
        "parties[0].sources[1].columns: needs a mapping for the entity key 'customer_id' (when "
        "the device is the entity or the file holds the key) or an entity_map (device -> entity)"
    ]
    source["entity_map"] = {
        "path": "raw/a/devices.csv",
        "columns": {"device_id": {"from": "d", "dtype": "str"}},
    }
    assert _problems(data) == [
        "parties[0].sources[1].entity_map.columns: needs a 'customer_id' column mapping"
    ]
    source["entity_map"]["columns"]["customer_id"] = {"from": "p", "dtype": "str"}
    source["columns"]["customer_id"] = {"from": "watch", "dtype": "str"}
    assert _problems(data) == [
        "parties[0].sources[1].columns.customer_id: the entity_map gives the entity key: "
        "remove this mapping or the entity_map"
    ]


def test_without_an_entity_map_the_file_holds_the_entity_key(tmp_path: Path) -> None:
    """Two watches per person in one file keyed by the person: no map, devices counted."""
    data = _sensor_data(tmp_path)
    source = data["parties"][0]["sources"][1]
    source["columns"]["customer_id"] = {"from": "person", "dtype": "str", "required": True}
    source["columns"]["device_id"] = {"from": "watch", "dtype": "str"}
    spec = parse_spec(data, source="spec.toml", base=str(tmp_path))
    path = tmp_path / "raw" / "a" / "watch.csv"
    path.write_text(
        "person,watch,time,accel\n"
        "P1,W1,2015-06-01 10:00:00.000,1\n"
        "P1, w1 ,2015-06-01 10:00:00.020,2\n"
        "P1,W2,2015-06-01 10:00:00.040,3\n"
        "P2,W3,2015-06-01 10:00:00.000,4\n"
        "P2,W3,2015-06-01 10:00:00.000,4\n"
    )
    watch = spec.parties[0].sources[1]
    result = preprocess(
        read_source(str(path), "csv").frame,
        watch,
        party="a",
        entity="customer_id",
        normalisation="strip_lower",
        vocabularies={},
    )
    assert result.quality.rows_out == 4  # the exact duplicate is quarantined
    out = events_features(
        result.clean,
        entity="customer_id",
        measures=["accel"],
        as_of=spec.consortium.as_of,
        windows=["20ms"],
        end_at="last_event",
    )
    assert out["customer_id"].to_list() == ["p1", "p2"]
    assert out["n_devices"].to_list() == [2, 1]  # " w1 " is W1
    assert out["n_events_20ms"].to_list() == [1, 1]
    assert out["n_events_all"].to_list() == [3, 1]
