"""Signal features of high-frequency recordings: known signals with known answers, a
per-entity numpy reference on random recordings, the spec options, the units, and one
recording through the ``party-pipeline`` flow."""

from __future__ import annotations

import datetime as dt
import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from tasks.prepare.modalities import signals
from tasks.prepare.modalities.events import event_feature_names, source_feature_names
from tasks.prepare.modalities.signals import (
    ACF_LAGS,
    MAX_FFT,
    signal_feature_names,
    signal_features,
)
from tasks.prepare.units import STANDARD_GRAVITY, UNITS, to_canonical
from tasks.spec.load import parse_spec
from tasks.spec.models import SpecError
from tests.factories import SPEC_HEAD

T0 = dt.datetime(2015, 6, 1, 10, tzinfo=dt.UTC)
END = dt.datetime(2026, 4, 1, tzinfo=dt.UTC)


def recording(
    values: dict[str, list[float | None] | np.ndarray[Any, Any]], *, hz: float = 50.0
) -> pl.DataFrame:
    """One frame of recordings: entity -> readings at ``hz`` from T0 (one measure ``x``)."""
    rows = [
        (entity, T0 + dt.timedelta(microseconds=round(i * 1e6 / hz)), v)
        for entity, series in values.items()
        for i, v in enumerate(series)
    ]
    return pl.DataFrame(
        rows,
        schema={"customer_id": pl.String, "timestamp": pl.Datetime("us", "UTC"), "x": pl.Float64},
        orient="row",
    )


def features(frame: pl.DataFrame, **options: Any) -> dict[str, dict[str, Any]]:
    out = signal_features(frame, entity="customer_id", measures=["x"], end=END, **options)
    return {row["customer_id"]: row for row in out.iter_rows(named=True)}


def sine(freq: float, n: int, hz: float = 50.0, phase: float = 0.3) -> np.ndarray[Any, Any]:
    return np.sin(2 * np.pi * freq * np.arange(n) / hz + phase)


# --- known signals ------------------------------------------------------------------------


@pytest.mark.parametrize(("freq", "n"), [(2.0, 500), (7.5, 300), (12.0, 64)])
def test_a_sine_has_its_frequency_as_the_dominant_one(freq: float, n: int) -> None:
    row = features(recording({"a": sine(freq, n)}))["a"]
    nfft = 1 << math.ceil(math.log2(n))
    assert row["x_dom_freq_hz"] == pytest.approx(freq, abs=50.0 / nfft)
    assert row["x_spectral_entropy"] < 0.5  # one tone: power in a few bins
    # a sine crosses zero twice a period: 2 f / rate of the consecutive pairs
    assert row["x_zero_cross_rate"] == pytest.approx(2 * freq / 50.0, abs=2 / (n - 1))
    assert row["x_energy"] == pytest.approx(0.5, abs=0.05)
    assert row["x_acf_lag1"] == pytest.approx(math.cos(2 * np.pi * freq / 50.0), abs=0.05)


def test_the_rate_comes_from_the_data_or_the_declared_sampling() -> None:
    frame = recording({"a": sine(5.0, 500, hz=100.0)}, hz=100.0)
    assert features(frame)["a"]["x_dom_freq_hz"] == pytest.approx(5.0, abs=100 / 512)
    # a declared rate wins (here wrongly half the real one: frequencies halve)
    assert features(frame, sampling_hz=50.0)["a"]["x_dom_freq_hz"] == pytest.approx(
        2.5, abs=50 / 512
    )


def test_white_noise_has_a_flat_spectrum_and_no_memory() -> None:
    noise = np.random.default_rng(0).normal(size=2048)
    row = features(recording({"a": noise}))["a"]
    assert row["x_spectral_entropy"] > 0.9
    for lag in ACF_LAGS:
        assert abs(row[f"x_acf_lag{lag}"]) < 0.1


def test_crossings_and_peaks_by_hand() -> None:
    row = features(recording({"a": [1.0, -1.0, 2.0, 0.0, 3.0, 4.0]}))["a"]
    # pairs (1,-1) (-1,2) (2,0) (0,3) (3,4): zero counts as non-negative, 2 of 5 cross
    assert row["x_zero_cross_rate"] == pytest.approx(2 / 5)
    # mean 1.5: signs - - + - + +, 4 of 5 pairs cross it
    assert row["x_mean_cross_rate"] == pytest.approx(3 / 5)
    # 2.0 is above both neighbours (-1 and 0); the ends are never peaks
    assert row["x_peak_rate"] == pytest.approx(1 / 6)
    assert row["x_median"] == pytest.approx(1.5)
    assert row["x_q25"] == pytest.approx(float(np.quantile([1, -1, 2, 0, 3, 4], 0.25)))


def test_magnitude_over_declared_axes() -> None:
    # (3, 4) rotating in the plane: a constant norm of 5
    n = 200
    angle = 2 * np.pi * np.arange(n) / 25
    frame = pl.DataFrame(
        {
            "customer_id": ["a"] * n,
            "timestamp": [T0 + dt.timedelta(milliseconds=20 * i) for i in range(n)],
            "ax": 5 * np.cos(angle),
            "ay": 5 * np.sin(angle),
        },
        schema_overrides={"timestamp": pl.Datetime("us", "UTC")},
    )
    out = signal_features(
        frame, entity="customer_id", measures=["ax", "ay"], end=END, axes=["ax", "ay"]
    )
    assert out.columns == ["customer_id", *signal_feature_names(["ax", "ay"], axes=["ax", "ay"])]
    row = out.row(0, named=True)
    assert row["magnitude_mean"] == pytest.approx(5.0)
    assert row["magnitude_max"] == pytest.approx(5.0)
    assert row["magnitude_energy"] == pytest.approx(25.0)
    assert row["magnitude_std"] == pytest.approx(0.0, abs=1e-12)
    # a constant signal has no shape: no skew, autocorrelation or spectrum
    for name in ("skew", "kurtosis", "acf_lag1", "dom_freq_hz", "spectral_entropy"):
        assert row[f"magnitude_{name}"] is None, name
    assert row["ax_dom_freq_hz"] == pytest.approx(2.0, abs=50 / 256)


def test_rolling_sub_windows_of_a_step() -> None:
    # 1 s at 0 then 1 s at 1, at 10 Hz; sub-windows of 0.5 s = 5 readings
    row = features(recording({"a": [0.0] * 10 + [1.0] * 10}, hz=10.0), sub_window_s=0.5)["a"]
    means = [np.mean(([0.0] * 10 + [1.0] * 10)[i - 4 : i + 1]) for i in range(4, 20)]
    stds = [np.std(([0.0] * 10 + [1.0] * 10)[i - 4 : i + 1], ddof=1) for i in range(4, 20)]
    assert row["x_roll_mean_std"] == pytest.approx(float(np.std(means)))
    assert row["x_roll_std_mean"] == pytest.approx(float(np.mean(stds)))
    assert row["x_roll_std_max"] == pytest.approx(float(np.max(stds)))
    # a recording shorter than one sub-window has none
    short = features(recording({"a": [0.0, 1.0, 2.0]}, hz=10.0), sub_window_s=0.5)["a"]
    assert short["x_roll_std_max"] is None


def test_missing_readings_short_and_late_recordings() -> None:
    frame = recording({"a": [1.0, None, 3.0, None, 2.0], "b": [4.0], "c": [None, None]})
    late = pl.DataFrame(
        {"customer_id": ["d"], "timestamp": [END], "x": [1.0]},
        schema_overrides={"timestamp": pl.Datetime("us", "UTC")},
    )
    rows = features(pl.concat([frame, late]))
    assert sorted(rows) == ["a", "b", "c"]  # d's only event is at the end: not counted
    assert rows["a"]["x_median"] == 2.0  # nulls skipped: 1, 3, 2
    assert rows["a"]["x_peak_rate"] == pytest.approx(1 / 3)
    assert rows["b"]["x_median"] == 4.0 and rows["b"]["x_dom_freq_hz"] is None
    assert all(v is None for k, v in rows["c"].items() if k != "customer_id")
    empty = signal_features(frame.head(0), entity="customer_id", measures=["x"], end=END)
    assert empty.columns == ["customer_id", *signal_feature_names(["x"], axes=None)]
    assert empty.height == 0


def test_readings_sharing_one_timestamp_have_no_rate() -> None:
    frame = pl.DataFrame(
        {"customer_id": ["a"] * 4, "timestamp": [T0] * 4, "x": [1.0, -1.0, 2.0, -2.0]},
        schema_overrides={"timestamp": pl.Datetime("us", "UTC")},
    )
    row = features(frame)["a"]
    assert row["x_dom_freq_hz"] is None and row["x_roll_std_max"] is None
    assert row["x_zero_cross_rate"] == 1.0  # ties keep the input order
    assert row["x_spectral_entropy"] is not None  # the shape needs no rate


def _reference(x: np.ndarray[Any, Any], hz: float, width: int) -> dict[str, float]:
    """Straightforward per-entity numpy: what the vectorised blocks must equal."""
    n, xc = x.size, x - x.mean()
    var = float(np.mean(xc**2))
    used = xc[-MAX_FFT:]
    nfft = 1 << math.ceil(math.log2(used.size))
    power = np.abs(np.fft.rfft(used, nfft)[1:]) ** 2
    share = power / power.sum()
    roll = np.lib.stride_tricks.sliding_window_view(xc, min(width, n))
    out = {
        "median": float(np.median(x)),
        "q75": float(np.quantile(x, 0.75)),
        "skew": float(np.mean(xc**3) / var**1.5),
        "kurtosis": float(np.mean(xc**4) / var**2 - 3),
        "peak_rate": float(np.sum((x[1:-1] > x[:-2]) & (x[1:-1] > x[2:])) / n),
        "dom_freq_hz": float((np.argmax(power) + 1) * hz / nfft),
        "spectral_entropy": float(-np.sum(share[share > 0] * np.log(share[share > 0])))
        / math.log(power.size),
        "roll_mean_std": float(np.std(roll.mean(axis=1))),
        "roll_std_max": float(np.max(roll.std(axis=1, ddof=1))),
    }
    for lag in ACF_LAGS:
        out[f"acf_lag{lag}"] = float(np.sum(xc[lag:] * xc[:-lag]) / n / var)
    return out


def test_vectorised_blocks_equal_a_per_entity_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    lengths = {"a": 30, "b": 257, "c": 4, "d": MAX_FFT + 100, "e": 128, "f": 129}
    data = {e: np.cumsum(rng.normal(size=n)) + rng.normal(10, 3) for e, n in lengths.items()}
    frame = recording(data).sample(fraction=1.0, shuffle=True, seed=1)  # any row order
    monkeypatch.setattr(signals, "_FFT_CELLS", 600)  # several FFT batches per length
    rows = features(frame)
    for entity, x in data.items():
        expected = _reference(x, 50.0, 50)
        for name, value in expected.items():
            got = rows[entity][f"x_{name}"]
            too_short = (name.startswith("roll") and x.size < 50) or (
                name.startswith("acf") and x.size <= int(name.removeprefix("acf_lag"))
            )
            if too_short:
                assert got is None
            else:
                assert got == pytest.approx(value, rel=1e-6, abs=1e-9), (entity, name)


def test_a_hash_collision_falls_back_to_the_exact_order(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = recording({"a": sine(3.0, 200), "b": sine(9.0, 200)})  # interleaved in time
    expected = features(frame)
    monkeypatch.setattr(signals, "_entity_order", lambda entity: pl.lit(0))
    got = features(frame)
    assert sorted(got) == ["a", "b"]
    for entity, row in expected.items():  # runs in another order: sums round differently
        for name, value in row.items():
            if name != "customer_id":
                assert got[entity][name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


# --- the spec and the units ----------------------------------------------------------------

SENSOR = """
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
ax = { from = "acc_x", dtype = "float", unit = "g" }
ay = { from = "acc_y", dtype = "float", unit = "g" }
az = { from = "acc_z", dtype = "float", unit = "g" }
gx = { from = "gyro_x", dtype = "float", unit = "deg/s" }
[parties.sources.features]
windows = [1]
sampling_hz = 50
axes = ["ax", "ay", "az"]
sub_window = "500ms"
"""

PEOPLE = {"P1": ("yes", 2.0), "P2": ("no", 5.0), "P3": ("no", 11.0)}  # label, Hz of motion


def _write(root: Path) -> Path:
    (root / "raw" / "a").mkdir(parents=True)
    people = "person,churn\n" + "".join(f"{p},{c}\n" for p, (c, _) in PEOPLE.items())
    (root / "raw" / "a" / "people.csv").write_text(people)
    lines = ["watch,time,acc_x,acc_y,acc_z,gyro_x"]
    for person, (_, freq) in PEOPLE.items():
        for i in range(100):  # 2 s at 50 Hz, in g, the z axis carrying gravity
            when = T0 + dt.timedelta(milliseconds=20 * i)
            x = 0.5 * math.sin(2 * math.pi * freq * i / 50)
            lines.append(f"{person},{when.isoformat()},{x!r},0.0,1.0,{90.0 * x!r}")
    lines.append("P1,2015-06-01T10:00:05+00:00,1e300,0,1,0")  # beyond the readings' bound
    (root / "raw" / "a" / "watch.csv").write_text("\n".join(lines) + "\n")
    spec = root / "spec.toml"
    spec.write_text(SPEC_HEAD.format() + SENSOR)
    return spec


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="spec.toml", base="/base")
    return [str(p) for p in info.value.problems]


def test_new_units_convert_to_si() -> None:
    frame = pl.DataFrame({"a": [1.0, -2.0], "w": [180.0, 90.0]})
    out = frame.select(to_canonical(pl.col("a"), "g"), to_canonical(pl.col("w"), "deg/s"))
    assert out["a"].to_list() == pytest.approx([STANDARD_GRAVITY, -2 * STANDARD_GRAVITY])
    assert out["w"].to_list() == pytest.approx([math.pi, math.pi / 2])
    assert UNITS["m/s2"].dimension == UNITS["g"].dimension == "acceleration"
    assert UNITS["rad/s"].dimension == UNITS["deg/s"].dimension == "angular_velocity"


def test_which_sources_get_signal_features(tmp_path: Path) -> None:
    data = tomllib.loads(_write(tmp_path).read_text())
    options = data["parties"][0]["sources"][1]["features"]
    source = parse_spec(data, source="spec.toml", base=str(tmp_path)).parties[0].sources[1]
    windowed = event_feature_names(["ax", "ay", "az", "gx"], [1], error=False)
    signal = signal_feature_names(["ax", "ay", "az", "gx"], axes=["ax", "ay", "az"])
    assert source_feature_names(source) == windowed + signal  # declared sampling
    del options["sampling_hz"]
    source = parse_spec(data, source="spec.toml", base=str(tmp_path)).parties[0].sources[1]
    assert source_feature_names(source) == windowed  # day windows only: as before
    options["windows"] = ["10s", 1]
    source = parse_spec(data, source="spec.toml", base=str(tmp_path)).parties[0].sources[1]
    assert source_feature_names(source)[-len(signal) :] == signal  # a sub-day window
    options["signal"] = False
    source = parse_spec(data, source="spec.toml", base=str(tmp_path)).parties[0].sources[1]
    assert source_feature_names(source) == event_feature_names(
        ["ax", "ay", "az", "gx"], ["10s", 1], error=False
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sampling_hz": 0}, "features.sampling_hz: Input should be greater than 0"),
        ({"sampling_hz": float("nan")}, "features.sampling_hz: Input should be a finite number"),
        ({"sampling_hz": 1e9}, "features.sampling_hz: Input should be less than or equal to"),
        ({"axes": ["ax"]}, "features.axes: List should have at least 2 items"),
        ({"axes": ["ax", "ax"]}, "features.axes: Value error, axes must name each measure once"),
        ({"axes": ["ax", "timestamp"]}, "features.axes[1]: 'timestamp' is not a numeric measure"),
        ({"axes": ["ax", "gx"]}, "features.axes: the axes have units of different dimensions"),
        ({"sub_window": "0s"}, "features.sub_window: Value error, a window must be longer"),
        ({"sub_window": ".."}, "features.sub_window: Value error, a duration must be a whole"),
    ],
)
def test_bad_signal_options_are_named_at_their_key(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    data = tomllib.loads(_write(tmp_path).read_text())
    data["parties"][0]["sources"][1]["features"] |= change
    problems = _problems(data)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"parties[0].sources[1].{message}"), problems


def test_a_measure_named_magnitude_clashes_with_the_norm(tmp_path: Path) -> None:
    data = tomllib.loads(_write(tmp_path).read_text())
    data["parties"][0]["sources"][1]["columns"]["magnitude"] = {"from": "m", "dtype": "float"}
    assert _problems(data) == [
        "parties[0].sources[1].columns.magnitude: 'magnitude' names the norm over the axes: "
        "rename this measure"
    ]


# --- through the party pipeline -------------------------------------------------------------


def test_a_recording_through_the_party_pipeline(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    from flows.prepare import party_pipeline

    fused = party_pipeline(str(_write(tmp_path)), "a")
    quality = {q.source: q for q in fused.quality}["watch"]
    assert (quality.rows_in, quality.rows_out) == (301, 300)
    assert quality.rejected_by_reason == {"column 'acc_x' (ax): out of range": 1}
    table = pl.read_parquet(fused.feature_tables["watch"].uri).sort("customer_id")
    assert table.columns[1:] == event_feature_names(
        ["ax", "ay", "az", "gx"], [1], error=False
    ) + signal_feature_names(["ax", "ay", "az", "gx"], axes=["ax", "ay", "az"])
    for person, (_, freq) in PEOPLE.items():
        row = table.row(by_predicate=pl.col("customer_id") == person.lower(), named=True)
        assert row["ax_dom_freq_hz"] == pytest.approx(freq, abs=50 / 128), person
        assert row["gx_dom_freq_hz"] == pytest.approx(freq, abs=50 / 128), person
        # in SI units: az is gravity, the magnitude at least that
        assert row["az_median"] == pytest.approx(STANDARD_GRAVITY)
        assert row["magnitude_min"] == pytest.approx(STANDARD_GRAVITY)
        assert row["gx_energy"] == pytest.approx(
            row["ax_energy"] * (90 * math.pi / 180 / STANDARD_GRAVITY) ** 2, rel=1e-9
        )
    fused_table = pl.read_parquet(fused.table.uri)
    assert {"events__magnitude_spectral_entropy", "events__ax_roll_std_max"} <= set(
        fused_table.columns
    )
