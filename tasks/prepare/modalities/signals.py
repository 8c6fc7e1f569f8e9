"""Signal features of high-frequency recordings (accelerometers, gyroscopes, ...).

An events source whose windows are shorter than a day, or which declares its
``sampling_hz``, is a *recording*: besides the windowed statistics of
:mod:`tasks.prepare.modalities.events` it gets, per entity, per measure ``m`` (and per
``magnitude`` when the source declares ``axes``, the Euclidean norm of those measures at each
reading), over the whole recording before the end of the ``as_of`` day (nulls skipped: a
measure's signal is its present readings in time order, ties in input order):

* distribution: ``{m}_median``, ``{m}_q25``, ``{m}_q75``, ``{m}_skew`` and ``{m}_kurtosis``
  (excess; both null for a constant signal); ``magnitude`` also gets ``magnitude_mean``,
  ``magnitude_std`` (ddof 1), ``magnitude_min`` and ``magnitude_max``;
* shape: ``{m}_energy`` (mean square), ``{m}_zero_cross_rate`` and ``{m}_mean_cross_rate``
  (share of consecutive readings on either side of 0, of the signal's mean), ``{m}_peak_rate``
  (share of readings above both neighbours), ``{m}_acf_lag{L}`` (autocorrelation at
  :data:`ACF_LAGS` readings; null for a constant signal or one of at most ``L`` readings);
* spectrum (numpy FFT of the mean-removed signal, zero-padded to a power of two; a signal
  longer than :data:`MAX_FFT` readings contributes its last :data:`MAX_FFT`):
  ``{m}_dom_freq_hz`` (frequency of the strongest non-constant bin) and
  ``{m}_spectral_entropy`` (Shannon entropy of the normalised power spectrum over its
  non-constant bins, divided by its maximum: 0 for a pure tone, 1 for white noise);
* rolling sub-windows of ``sub_window`` (one every reading, each the last
  ``round(sub_window * rate)`` readings, at least 2): ``{m}_roll_mean_std`` (std of their
  means), ``{m}_roll_std_mean`` and ``{m}_roll_std_max`` (mean and largest of their stds);
  null when the signal is shorter than one sub-window.

The rate is the declared ``sampling_hz``, else each entity's own: one over the median time
between its consecutive readings (frequencies are null when that median is 0). Signals of
fewer than two readings get null shape and spectrum features.

Everything is vectorised over the whole table: one sort by (entity, time, input position),
skipped when each entity's rows already come contiguous and in time order
(:func:`in_runs`), then numpy over blocks of whole runs of about :data:`_BLOCK` readings,
small enough for the processor's cache (``reduceat`` per entity for sums, shifted slices for
neighbours and lags, cumulative sums for the rolling windows, one batched FFT per padded
length, its rows gathered in one go). No Python loop runs over rows or entities.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, partial
from itertools import pairwise

import numpy as np
import numpy.typing as npt
import polars as pl

from tasks.types import TIMESTAMP

#: Lags of the autocorrelation features, in readings.
ACF_LAGS = (1, 2, 5, 10)

#: Longest FFT, in readings (a longer signal contributes its last ones).
MAX_FFT = 4096

#: Name of the norm-over-axes signal.
MAGNITUDE = "magnitude"

#: Features of every signal, in order (after the ``{signal}_`` prefix).
SIGNAL_STATS = (
    "median",
    "q25",
    "q75",
    "skew",
    "kurtosis",
    "energy",
    "zero_cross_rate",
    "mean_cross_rate",
    "peak_rate",
    *(f"acf_lag{lag}" for lag in ACF_LAGS),
    "dom_freq_hz",
    "spectral_entropy",
    "roll_mean_std",
    "roll_std_mean",
    "roll_std_max",
)

#: Extra features of the magnitude signal (a measure has these in its windowed statistics).
MAGNITUDE_STATS = ("mean", "std", "min", "max")

# cells of one FFT batch (rows x padded length): bounds the memory of a batch to ~64 MiB
_FFT_CELLS = 1 << 22

# readings of one block of runs (:func:`_in_blocks`): its arrays fit in a processor cache
_BLOCK = 1 << 17

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

_POS = "__signal_pos"
_RUN = "__signal_run"

# relative spread below which a signal counts as constant
_FLAT = 1e-9


def _threads() -> int:
    """Threads for the signals: numpy releases the GIL inside its loops."""
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def signal_feature_names(measures: Sequence[str], *, axes: Sequence[str] | None) -> list[str]:
    """Columns of :func:`signal_features` after the entity key, in order."""
    names = [f"{m}_{stat}" for m in measures for stat in SIGNAL_STATS]
    if axes:
        names += [f"{MAGNITUDE}_{stat}" for stat in (*MAGNITUDE_STATS, *SIGNAL_STATS)]
    return names


def _entity_order(entity: str) -> pl.Expr:
    """Sort key that makes each entity's readings contiguous (cheap to sort)."""
    return pl.col(entity).hash()


def in_runs(frame: pl.LazyFrame | pl.DataFrame, entity: str) -> bool:
    """Whether each entity's rows are already contiguous and in time order: then sorting
    by (entity, time, input position) would keep every entity's rows as they are (ties stay
    in input order), and per-entity results need no sort. Recordings usually come so."""
    key, ts = pl.col(entity), pl.col(TIMESTAMP)
    starts = key.ne_missing(key.shift(1)).fill_null(True)
    timed, contiguous = (
        frame.lazy()
        .select(
            (starts | (ts >= ts.shift(1))).all().alias("timed"),
            key.filter(starts).is_unique().all().alias("contiguous"),
        )
        .collect()
        .row(0)
    )
    return bool(timed) and bool(contiguous)


@dataclass(frozen=True)
class Recording:
    """A recording's rows before the end, read once for the windowed and the signal
    features: ``frame`` holds only rows before the end; ``ordered`` is :func:`in_runs` of
    it."""

    frame: pl.DataFrame
    ordered: bool


def recording(clean: pl.LazyFrame | pl.DataFrame, *, entity: str, end: dt.datetime) -> Recording:
    """``clean``'s rows before ``end``, collected once in one chunk (an expression over a
    column of many chunks, as a scan gives, costs several times more), not filtered when
    every row is (a filter copies every column), and whether they come in per-entity
    runs."""
    frame = clean.lazy().collect().rechunk()
    late = frame.select((pl.col(TIMESTAMP) >= pl.lit(end)).any()).item()
    if late:
        frame = frame.filter(pl.col(TIMESTAMP) < pl.lit(end))
    return Recording(frame, in_runs(frame, entity))


def signal_features(
    clean: pl.LazyFrame | pl.DataFrame,
    *,
    entity: str,
    measures: Sequence[str],
    end: dt.datetime,
    axes: Sequence[str] | None = None,
    sampling_hz: float | None = None,
    sub_window_s: float = 1.0,
    rows: Recording | None = None,
) -> pl.DataFrame:
    """Signal features per entity (module docstring), sorted by entity.

    ``clean`` holds ``entity``, ``timestamp`` (UTC) and the ``measures`` (float, null =
    missing); rows at or after ``end`` are ignored. ``axes`` (measures) add the magnitude
    signal; ``sampling_hz`` fixes the rate (else each entity's median step decides).
    ``rows``: what :func:`recording` found out about ``clean`` already (then ``clean`` is
    its frame).
    """
    measures = list(measures)
    lf = clean.lazy().select(entity, TIMESTAMP, *measures).with_row_index(_POS)
    if rows is None:
        lf = lf.filter(pl.col(TIMESTAMP) < pl.lit(end))
    lf = lf.with_columns(pl.col(measures).cast(pl.Float64))
    if axes:
        lf = lf.with_columns(
            pl.sum_horizontal([pl.col(a) ** 2 for a in axes]).sqrt().alias(MAGNITUDE)
        ).with_columns(  # a reading missing on one axis has no magnitude
            pl.when(pl.all_horizontal([pl.col(a).is_not_null() for a in axes]))
            .then(pl.col(MAGNITUDE))
            .alias(MAGNITUDE)
        )
    signals = [*measures, *([MAGNITUDE] if axes else [])]
    ordered = lf.collect()
    if not (in_runs(ordered, entity) if rows is None else rows.ordered):
        # sorted by a 64-bit hash of the entity (several times faster than the strings);
        # two entities whose hashes collide and whose readings interleave would share runs:
        # then (detected: a key in two runs) the strings decide
        ordered = ordered.sort(_entity_order(entity), TIMESTAMP, _POS)
        keys = ordered.get_column(entity)
        starts_run = keys.ne_missing(keys.shift(1)).fill_null(True)
        if keys.filter(starts_run).is_duplicated().any():
            ordered = ordered.sort(entity, TIMESTAMP, _POS)
    keys = ordered.get_column(entity)
    if ordered.height == 0:
        return pl.DataFrame(
            {entity: keys.head(0)}
            | {n: pl.Series(n, [], pl.Float64) for n in signal_feature_names(measures, axes=axes)}
        )
    run: Ints = keys.rle_id().to_numpy().astype(np.int64)
    new_run = np.empty(run.size, dtype=bool)
    new_run[0], new_run[1:] = True, run[1:] != run[:-1]
    n_runs = int(run[-1]) + 1
    times: Ints = ordered.get_column(TIMESTAMP).dt.epoch("us").to_numpy().astype(np.int64)
    every_reading = _blocks(run, n_runs)  # the blocks of a signal without missing readings

    def one(name: str) -> dict[str, Floats]:
        column = ordered.get_column(name)
        values: Floats = np.asarray(column.to_numpy(), dtype=np.float64)  # null -> NaN
        present = ~np.isnan(values)
        whole = bool(present.all())
        stats = _in_blocks(
            partial(
                signal_block,
                sampling_hz=sampling_hz,
                sub_window_s=sub_window_s,
                extra=name == MAGNITUDE,
            ),
            every_reading if whole else _blocks(run[present], n_runs),
            n_runs,
            times if whole else times[present],
            values if whole else values[present],
        )
        # the quantiles take a NaN reading (never one of a cleaned source) as the largest
        counted = present if column.null_count() == values.size - int(present.sum()) else None
        if counted is None:
            counted = column.is_not_null().to_numpy()
        stats |= _in_blocks(
            _quantiles,
            every_reading if whole else _blocks(run[counted], n_runs),
            n_runs,
            values if whole else values[counted],
        )
        return {f"{name}_{stat}": column for stat, column in stats.items()}

    columns: dict[str, Floats] = {}
    with ThreadPoolExecutor(max_workers=_threads()) as pool:
        for part in pool.map(one, signals):
            columns |= part
    names = signal_feature_names(measures, axes=axes)
    out = pl.DataFrame({n: columns[n] for n in names}, schema=dict.fromkeys(names, pl.Float64))
    return (
        out.fill_nan(None)
        .insert_column(0, keys.filter(pl.Series(new_run)).alias(entity))
        .sort(entity)
    )


@dataclass(frozen=True)
class Runs:
    """The runs of one signal's sorted readings: run ``k`` is ``values[starts[k] :
    starts[k] + n[k]]``. Per-run reductions are ``ufunc.reduceat`` over the contiguous
    slices (runs without a reading get the reduction's identity)."""

    run: Ints
    n: Floats
    starts: Ints
    _lagged: dict[int, npt.NDArray[np.bool_]] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, run: Ints, n_runs: int) -> Runs:
        counts = np.bincount(run, minlength=n_runs)
        return cls(run, counts.astype(np.float64), np.cumsum(counts) - counts)

    @property
    def size(self) -> int:
        return self.n.size

    @cached_property
    def position(self) -> Ints:
        """Each reading's place in its run (0 for the first)."""
        return np.arange(self.run.size, dtype=np.int64) - self.starts[self.run]

    def _reduce(self, ufunc: np.ufunc, values: Floats, identity: float) -> Floats:
        out = np.full(self.size, identity)
        some = self.n > 0
        if values.size:
            out[some] = ufunc.reduceat(values, self.starts[some])
        return out

    def sum(self, values: Floats) -> Floats:
        return self._reduce(np.add, values, 0.0)

    def count(self, mask: npt.NDArray[np.bool_]) -> Floats:
        """How many readings of each run ``mask`` holds."""
        out = np.zeros(self.size)
        some = self.n > 0
        if mask.size:
            out[some] = np.add.reduceat(mask, self.starts[some], dtype=np.int64)
        return out

    def min(self, values: Floats) -> Floats:
        return self._reduce(np.minimum, values, np.inf)

    def max(self, values: Floats) -> Floats:
        return self._reduce(np.maximum, values, -np.inf)

    def lagged(self, lag: int) -> npt.NDArray[np.bool_]:
        """Whether the reading ``lag`` places before each one is of the same run (kept:
        the signals of one block share it)."""
        known = self._lagged.get(lag)
        if known is None:
            known = np.zeros(self.run.size, dtype=bool)
            known[lag:] = self.run[lag:] == self.run[:-lag]
            self._lagged[lag] = known
        return known


def _divide(num: Floats, den: Floats) -> Floats:
    """``num / den`` with NaN where ``den`` is 0 (NaN becomes null at the end)."""
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


@dataclass(frozen=True)
class Block:
    """Readings ``lo:hi`` of a signal, the whole runs ``first:last`` (:func:`_blocks`)."""

    lo: int
    hi: int
    first: int
    last: int
    runs: Runs


def _blocks(run: Ints, n_runs: int) -> list[Block]:
    """Consecutive blocks of whole runs of about :data:`_BLOCK` readings each (a longer run
    is a block of its own): every temporary array of a block stays in the processor's
    cache, where the many passes over it are several times faster than over the whole
    signal in memory. ``run`` ascending. Signals without missing readings share them."""
    ends = np.searchsorted(run, np.arange(n_runs), side="right")  # reading after each run
    cuts = np.unique(np.searchsorted(ends, np.arange(_BLOCK, run.size, _BLOCK), side="left"))
    bounds = [0, *(int(c) + 1 for c in cuts if c + 1 < n_runs), n_runs]  # run boundaries
    out = []
    for first, last in pairwise(bounds):
        lo, hi = int(ends[first - 1]) if first else 0, int(ends[last - 1])
        out.append(Block(lo, hi, first, last, Runs.of(run[lo:hi] - first, last - first)))
    return out


def _in_blocks(
    block: Callable[..., dict[str, Floats]],
    blocks: list[Block],
    n_runs: int,
    *arrays: Floats | Ints,
) -> dict[str, Floats]:
    """``block(runs, *arrays)`` (:func:`signal_block`, :func:`_quantiles`) over the
    ``blocks`` (:func:`_blocks`); ``arrays`` one value per reading."""
    out: dict[str, Floats] = {}
    for b in blocks:
        stats = block(b.runs, *(a[b.lo : b.hi] for a in arrays))
        for stat, column in stats.items():
            out.setdefault(stat, np.empty(n_runs))[b.first : b.last] = column
    return out


def _as_rows(values: Floats, starts: Ints, counts: Ints, width: int, fill: float) -> Floats:
    """Readings ``starts[i] : starts[i] + counts[i]`` as row ``i`` (``counts`` at most
    ``width``): the readings themselves reshaped when the runs are of one length and follow
    each other (as in most recordings), else gathered in one go into ``width`` columns
    padded with ``fill``."""
    length = int(counts[0])
    if (counts == length).all() and (np.diff(starts) == length).all():
        begin = int(starts[0])
        return values[begin : begin + length * counts.size].reshape(counts.size, length)
    column = np.arange(width)
    inside = column < counts[:, None]
    return np.where(inside, values[np.where(inside, starts[:, None] + column, 0)], fill)


def _quantiles(runs: Runs, x: Floats) -> dict[str, Floats]:
    """Median and quartiles of each run (linear interpolation, numpy's default; a NaN
    sorts last): each run's readings one row of a matrix padded to a power of two, the rows
    sorted at once."""
    n_runs = runs.size
    count = runs.n.astype(np.int64)
    out = {stat: np.full(n_runs, np.nan) for stat in ("median", "q25", "q75")}
    size = np.where(count > 0, 1 << np.ceil(np.log2(np.maximum(count, 1))).astype(np.int64), 0)
    for length in np.unique(size[size > 0]):
        rows = np.flatnonzero(size == length)
        ordered = np.sort(  # padding last
            _as_rows(x, runs.starts[rows], count[rows], int(length), np.nan), axis=1
        )
        last = (count[rows] - 1).astype(np.float64)
        for stat, q in (("median", 0.5), ("q25", 0.25), ("q75", 0.75)):
            at = q * last
            below = np.floor(at).astype(np.int64)
            above = np.minimum(below + 1, count[rows] - 1)
            low = np.take_along_axis(ordered, below[:, None], axis=1)[:, 0]
            high = np.take_along_axis(ordered, above[:, None], axis=1)[:, 0]
            out[stat][rows] = low + (high - low) * (at - below)
    return out


def signal_block(
    runs: Runs,
    times: Ints,
    x: Floats,
    *,
    sampling_hz: float | None,
    sub_window_s: float,
    extra: bool = False,
) -> dict[str, Floats]:
    """The :data:`SIGNAL_STATS` but the quantiles (and, with ``extra``, the
    :data:`MAGNITUDE_STATS` first) of each of the ``runs`` of one signal: ``times``
    (microseconds) ascending within a run, ``x`` the finite readings. A run with no reading
    gets NaN everywhere."""
    run, n_runs, n = runs.run, runs.size, runs.n
    mean = _divide(runs.sum(x), n)
    xc = x - mean[run]  # centred per run: moments and products without cancellation
    m2 = _divide(runs.sum(xc * xc), n)
    energy = _divide(runs.sum(x * x), n)
    # constant (or empty) signals have no shape of their own: a variance at the rounding
    # level of the readings (a constant norm of rotating axes) counts as none
    flat = ~(m2 > _FLAT * _FLAT * energy)
    m2_safe = np.where(flat, np.nan, m2)
    out: dict[str, Floats] = {}
    if extra:
        has = n > 0
        out |= {
            "mean": mean,
            "std": np.sqrt(_divide(m2 * n, n - 1)),
            "min": np.where(has, runs.min(x), np.nan),
            "max": np.where(has, runs.max(x), np.nan),
        }
    cube = xc * xc * xc
    out["skew"] = _divide(runs.sum(cube), n) / m2_safe**1.5
    out["kurtosis"] = _divide(runs.sum(cube * xc), n) / m2_safe**2 - 3.0
    out["energy"] = energy
    same = runs.lagged(1)  # a reading and the one before it are of one run
    pairs = n - 1

    def crossing_rate(signal: Floats) -> Floats:
        above = signal >= 0
        crossed = np.zeros(signal.size, dtype=bool)
        crossed[1:] = same[1:] & (above[1:] != above[:-1])
        return _divide(runs.count(crossed), pairs)

    out["zero_cross_rate"] = crossing_rate(x)
    out["mean_cross_rate"] = crossing_rate(xc)
    peak = np.zeros(x.size, dtype=bool)
    peak[1:-1] = same[1:-1] & same[2:] & (x[1:-1] > x[:-2]) & (x[1:-1] > x[2:])
    out["peak_rate"] = np.where(n >= 2, _divide(runs.count(peak), n), np.nan)
    for lag in ACF_LAGS:
        products = np.zeros(xc.size)
        np.multiply(xc[lag:], xc[:-lag], out=products[lag:], where=runs.lagged(lag)[lag:])
        acf = _divide(runs.sum(products), n) / m2_safe
        out[f"acf_lag{lag}"] = np.where(n > lag, acf, np.nan)
    rate = _rates(run, times, same, n_runs, sampling_hz)
    out |= _spectrum(runs, xc, rate, flat)
    out |= _rolling(runs, xc, rate, sub_window_s)
    return out


def _rates(
    run: Ints, times: Ints, same: npt.NDArray[np.bool_], n_runs: int, sampling_hz: float | None
) -> Floats:
    """Readings per second of each run: the declared rate, else one over the median step."""
    if sampling_hz is not None:
        return np.full(n_runs, float(sampling_hz))
    steps = (times[1:] - times[:-1])[same[1:]]
    if steps.size == 0:
        return np.full(n_runs, np.nan)
    frame = (
        pl.DataFrame({"run": run[1:][same[1:]], "step": steps})
        .group_by("run")
        .agg(pl.col("step").median())
    )
    median = np.full(n_runs, np.nan)
    median[frame["run"].to_numpy()] = frame["step"].to_numpy().astype(np.float64)
    return _divide(np.full(n_runs, 1e6), median)


def _spectrum(
    runs: Runs, xc: Floats, rate: Floats, flat: npt.NDArray[np.bool_]
) -> dict[str, Floats]:
    """Dominant frequency (Hz) and normalised spectral entropy per run, one batched real
    FFT per padded length."""
    n_runs, n = runs.size, runs.n
    dominant = np.full(n_runs, np.nan)
    entropy = np.full(n_runs, np.nan)
    used = np.minimum(n, MAX_FFT).astype(np.int64)
    size = np.where(used >= 2, 1 << np.ceil(np.log2(np.maximum(used, 2))).astype(np.int64), 0)
    first = runs.starts + n.astype(np.int64) - used  # each run's first reading in its FFT
    for length in np.unique(size[(size > 0) & ~flat]):
        selected = np.flatnonzero((size == length) & ~flat)
        rows_per_batch = max(1, _FFT_CELLS // int(length))
        for begin in range(0, selected.size, rows_per_batch):
            batch = selected[begin : begin + rows_per_batch]
            # one row per run (zero-padded to the length by the FFT)
            matrix = _as_rows(xc, first[batch], used[batch], int(length), 0.0)
            power = np.abs(np.fft.rfft(matrix, n=int(length), axis=1)[:, 1:]) ** 2
            total = power.sum(axis=1)
            share = power / np.where(total > 0, total, 1.0)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                terms = np.where(share > 0, -share * np.log(share), 0.0)
            bins = power.shape[1]
            ent = terms.sum(axis=1) / np.log(bins) if bins > 1 else np.zeros(batch.size)
            entropy[batch] = np.where(total > 0, ent, np.nan)
            peak_bin = np.argmax(power, axis=1) + 1
            dominant[batch] = np.where(total > 0, peak_bin * rate[batch] / int(length), np.nan)
    return {"dom_freq_hz": dominant, "spectral_entropy": entropy}


def _rolling(runs: Runs, xc: Floats, rate: Floats, sub_window_s: float) -> dict[str, Floats]:
    """Statistics of the rolling sub-window means and stds, from cumulative sums: a
    window's sums are the difference of two of them (a slice apart for one width)."""
    run = runs.run
    with np.errstate(invalid="ignore"):
        width_f = np.maximum(np.round(sub_window_s * rate), 2.0)
    width = np.where(np.isfinite(width_f), width_f, 0).astype(np.int64)
    s1 = np.concatenate(([0.0], np.cumsum(xc)))
    s2 = np.concatenate(([0.0], np.cumsum(xc * xc)))
    sum1, sum2 = np.zeros(run.size), np.zeros(run.size)  # of the window ending at a reading
    wf: Floats | float
    if (width == width[0]).all():  # one width for all (a declared rate): shifted slices
        k = int(width[0])
        full = runs.lagged(k - 1) if 0 < k <= run.size else np.zeros(run.size, dtype=bool)
        if full.any():
            np.subtract(s1[k:], s1[:-k], out=sum1[k - 1 :])
            np.subtract(s2[k:], s2[:-k], out=sum2[k - 1 :])
        wf = float(max(k, 2))  # no window at all for width 0
    else:
        w = width[run]
        full = (w > 0) & (runs.position + 1 >= w)  # a whole sub-window ends at this reading
        lo = np.where(full, np.arange(run.size, dtype=np.int64) + 1 - w, 0)
        sum1, sum2 = s1[1:] - s1[lo], s2[1:] - s2[lo]
        wf = np.where(full, w, 2).astype(np.float64)
    # readings where no whole window ends get 0 (so that plain sums skip them)
    means = np.where(full, sum1 / wf, 0.0)
    var = np.maximum(sum2 / wf - means * means, 0.0) * wf / (wf - 1)
    stds = np.where(full, np.sqrt(var), 0.0)
    count = runs.count(full)
    mean_of_means = _divide(runs.sum(means), count)
    # the means are of centred readings (near 0): their variance without a second pass
    spread = np.maximum(_divide(runs.sum(means * means), count) - mean_of_means**2, 0.0)
    return {
        "roll_mean_std": np.sqrt(spread),
        "roll_std_mean": _divide(runs.sum(stds), count),
        # the stds are >= 0: the zeros of the readings without a window change no maximum
        "roll_std_max": np.where(count > 0, runs.max(stds), np.nan),
    }
