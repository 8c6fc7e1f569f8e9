"""Features for IoT / usage event logs (one row per device reading or usage event).

Per entity, for every window of length ``w`` (whole days or a duration such as ``10s``,
:mod:`tasks.prepare.windows`; suffix ``30d``, ``6h``, ``10s``, ...) and for the whole history
(suffix ``all``). Windows end at the end of the ``as_of`` day (``window_end = "as_of"``) or,
with ``window_end = "last_event"``, at each entity's own last event before it (inclusive: the
``10s`` window holds the events of the last ten seconds of that entity's recording, up to
and including its last one):

* ``n_events``, ``active_days`` (distinct UTC dates with events), ``error_rate`` (when the
  source has an ``error`` flag: mean of the non-null flags) and ``longest_gap_days`` (longest
  time between consecutive events in the window, counting the time from the last event to
  the window end; the time from the window start to its first event does not count);
* per measure ``m``: ``{m}_mean``, ``{m}_std`` (sample, ddof 1), ``{m}_min``, ``{m}_max``,
  ``{m}_missing_rate`` (share of the window's events with a null reading) and ``{m}_slope``
  (least-squares slope of the reading per day against time; null with fewer than two
  readings or when they all share one timestamp);

and over the whole history ``{m}_last`` (latest non-null reading), ``days_since_last_event``
and ``n_devices``. Gaps and slopes are in days for every window length (a ``1s`` window's
gaps are fractions of a day). An entity with no event in a window gets 0 counts and null
statistics there (``longest_gap_days`` too). Events at or after the end of the ``as_of`` day
are ignored in both modes; the wall clock is never read. Timestamp ties keep the input order
(for ``{m}_last``).

Under ``last_event`` the windows move, the recency does not: ``days_since_last_event`` stays
the time from the entity's last event to the end of the ``as_of`` day (how long ago its
recording ended), and ``longest_gap_days`` has no trailing gap (the window ends at the last
event), so it is the longest gap between two of the window's events (0 for a single event).

How it stays fast -- one lazy query, collected once:

1. Sort by (64-bit hash of the entity, timestamp, input position). A hash sorts several
   times faster than strings; the position makes the order total, hence deterministic.
   Each entity is now one contiguous *run*. Rows already in such runs (each entity's rows
   contiguous, in time order, as recordings usually come:
   :func:`~tasks.prepare.modalities.signals.in_runs`) skip the sort, which would keep them.
2. Cut each run into *buckets* at the window starts (compared as integer microseconds
   before the window end: the end of the ``as_of`` day, or the run's last event, found with
   one windowed max over the sorted runs): windows are nested suffixes of the
   history, and bucket ``j`` holds the events inside exactly the ``j`` longest windows
   (:func:`_bucket`). Bucket keys ascend along the sorted rows, so the group_by over them
   takes polars' fast path over contiguous slices, and every row feeds one group only: no
   per-window masks over the big table.
3. Keep additive sufficient statistics per bucket (counts, sums, cross products, min, max,
   variance, the gap entering the bucket), put an entity's buckets side by side (one join
   per bucket) and fold them into windows with horizontal expressions. Variances merge
   exactly (Chan et al.), not through sums of squares, so they do not cancel.

If two entities' hashes collide *and* their events interleave in time, that entity shows up
twice in the result; this is detected and the query reruns ordered by the entity strings
(exact, slower). A collision without interleaving does no harm.

High-frequency recordings (a window shorter than a day, or a declared ``sampling_hz``;
``signal`` forces either way) also get the signal features of
:mod:`tasks.prepare.modalities.signals` after these columns (:func:`source_feature_names`);
day-scale sources get exactly the columns above.

The ``events`` modality is registered here: its raw rows are keyed by ``device_id``, which
the source's entity map (device -> entity) turns into the entity key during preprocessing.
A source without an entity map maps the entity key itself (the device is the entity, or the
file holds the entity key); its ``device_id`` is then optional (without one, ``n_devices``
is 1).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Annotated, Literal

import polars as pl
from pydantic import Field, PlainValidator, field_validator

from storage.sources import ROW
from tasks.prepare.modalities.base import FeatureInputs, Modality, register
from tasks.prepare.modalities.signals import (
    MAGNITUDE,
    Recording,
    in_runs,
    recording,
    signal_feature_names,
    signal_features,
)
from tasks.prepare.modalities.table import WindowOptions, window_end
from tasks.prepare.preprocess import (
    KEY_CONTROL,
    PreprocessError,
    coerce_frame,
    is_ascii,
    normalise_key,
    raw_name,
)
from tasks.prepare.units import UNITS
from tasks.prepare.windows import DAY_US, WindowValue, parse_window, parse_windows
from tasks.spec.models import EntityMapSpec, SourceSpec, SpecProblem
from tasks.types import DEVICE, ERROR, REASON, TIMESTAMP, KeyNormalisation, WindowEnd

logger = logging.getLogger(__name__)

Engine = Literal["in-memory", "streaming"]

#: Suffix of the whole-history features.
ALL = "all"

STATS = ("mean", "std", "min", "max", "missing_rate", "slope")

#: Largest magnitude of a reading (after unit conversion) the statistics take: sums, variances
#: and the slope's cross products of readings up to 1e15 stay far inside float64 (1e308) for
#: any realistic number of events, so every feature is finite. Preprocessing quarantines a
#: reading beyond it (``column 'wh' (usage_kwh): out of range (|value| > 1e+15)``).
MAX_ABS_READING = 1e15

# helper columns of the ordered event table
_HASH = "__hash"
_POS = "__pos"
_FIRST = "__first"
_RUN = "__run"
_PREV = "__prev"
_BUCKET = "__bucket"
_PREV_BUCKET = "__prev_bucket"
_GROUP = "__group"
_X = "__x"
_GAP = "__gap"
_NEW_DAY = "__new_day"
_OFFSET = "__offset"
_TRAIL = "__trail"


def event_feature_names(
    measures: Sequence[str], windows: Sequence[WindowValue], *, error: bool
) -> list[str]:
    """Columns of :func:`events_features` after the entity key, in order."""
    names: list[str] = []
    for suffix in [*(w.suffix for w in parse_windows(windows)), ALL]:
        names += [f"n_events_{suffix}", f"active_days_{suffix}"]
        if error:
            names.append(f"error_rate_{suffix}")
        names.append(f"longest_gap_days_{suffix}")
        names += [f"{m}_{stat}_{suffix}" for m in measures for stat in STATS]
    names += [f"{m}_last" for m in measures]
    names += ["days_since_last_event", "n_devices"]
    return names


def _days(delta: pl.Expr) -> pl.Expr:
    """A duration expression as float days."""
    # times the reciprocal, as polars divides a column by a constant, also for a column
    # of one value (divided exactly otherwise): the same bits however the rows are split
    return delta.dt.total_microseconds().cast(pl.Float64) * (1.0 / DAY_US)


def _day(ts: pl.Expr) -> pl.Expr:
    """The UTC date of a UTC timestamp, as days since 1970-01-01 (floor division)."""
    return ts.dt.epoch("us") // DAY_US


def _entity_order(entity: str) -> pl.Expr:
    """Sort key that makes each entity's rows contiguous (cheap to sort, unlike strings)."""
    return pl.col(entity).hash()


def _bucket(offset: pl.Expr, starts: Sequence[int]) -> pl.Expr:
    """How many window starts (ascending offsets in microseconds from the window end) lie
    at or before ``offset``.

    Bucket ``j`` lies inside exactly the ``j`` longest windows: bucket 0 is older than every
    window, so window ``k`` (1-based, longest first) holds buckets ``k..K`` and the whole
    history ``0..K``.
    """
    inside = [(offset >= start).cast(pl.UInt8) for start in starts]
    return pl.sum_horizontal(inside).cast(pl.UInt8) if inside else pl.lit(0, pl.UInt8)


def _ordered_events(
    lf: pl.LazyFrame,
    *,
    entity: str,
    end: dt.datetime,
    lengths: Sequence[int],
    end_at: WindowEnd,
    exact: bool,
    ordered: bool = False,
    before_end: bool = False,
) -> pl.LazyFrame:
    """Events before ``end`` in (entity, time) runs, with the per-row helper columns
    (``ordered``: the rows are in such runs already, :func:`~signals.in_runs`;
    ``before_end``: every row is before ``end`` already).

    ``lengths``: the windows in microseconds, longest first. Offsets are microseconds from
    the window end: ``end`` (exclusive) or the run's last event (inclusive).
    """
    ts = pl.col(TIMESTAMP)
    key = pl.col(entity)
    first = pl.col(_FIRST)
    prev = pl.col(_PREV)
    if end_at == "last_event":
        anchor = ts.max().over(_RUN)
        starts = [1 - n for n in lengths]  # (last - w, last]
    else:
        anchor = pl.lit(end)
        starts = [-n for n in lengths]  # [end - w, end)
    offset = pl.col(_OFFSET)
    bucket = _bucket(offset, starts)
    events = lf if before_end else lf.filter(ts < pl.lit(end))
    if not ordered:
        events = (
            events.with_row_index(_POS)
            .with_columns(_entity_order(entity).alias(_HASH))
            .sort([entity if exact else _HASH, TIMESTAMP, _POS])
        )
    return (
        events.with_columns((key != key.shift(1)).fill_null(True).alias(_FIRST))
        .with_columns(
            first.cum_sum().cast(pl.UInt64).alias(_RUN),
            pl.when(~first).then(ts.shift(1)).alias(_PREV),
        )
        .with_columns((ts - anchor).dt.total_microseconds().alias(_OFFSET))
        .with_columns(
            # ascends along the sorted rows: the group_by takes its sorted fast path
            (pl.col(_RUN) * (len(starts) + 1) + bucket).set_sorted().alias(_GROUP),
            bucket.alias(_BUCKET),
            pl.when(prev.is_not_null())
            .then(_bucket(offset - (ts - prev).dt.total_microseconds(), starts))
            .alias(_PREV_BUCKET),
            (offset.cast(pl.Float64) * (1.0 / DAY_US)).alias(_X),
            _days(ts - prev).alias(_GAP),
            # UTC dates as whole days since the epoch (cheaper than ``dt.date()``)
            (prev.is_null() | (_day(ts) != _day(prev))).alias(_NEW_DAY),
        )
    )


def _bucket_stats(measures: Sequence[str], *, error: bool) -> list[pl.Expr]:
    """Sufficient statistics of one entity's bucket: plain reductions over a slice."""
    x = pl.col(_X)
    aggs: list[pl.Expr] = [
        pl.col(_RUN).first(),
        pl.col(_BUCKET).first(),
        pl.len().cast(pl.Int64).alias("n"),
        pl.col(_NEW_DAY).sum().cast(pl.Int64).alias("days"),
        # whether the first event starts a date against the event before it (a window whose
        # first event shares its date with an older event outside it counts that date too)
        pl.col(_NEW_DAY).first().alias("day_in"),
        # gaps between two events of the bucket, and the gap into its first event, which
        # comes from an older bucket (or is null: the entity's first event)
        pl.when(pl.col(_PREV_BUCKET) == pl.col(_BUCKET)).then(pl.col(_GAP)).max().alias("gap"),
        pl.col(_GAP).first().alias("gap_in"),
        pl.col(_PREV_BUCKET).first().alias("gap_from"),
        x.last().alias("x_last"),
    ]
    if error:
        aggs += [
            pl.col(ERROR).cast(pl.Int64).sum().alias("err"),
            pl.col(ERROR).count().cast(pl.Int64).alias("err_n"),
        ]
    for m in measures:
        y = pl.col(m)
        xv = pl.when(y.is_not_null()).then(x)  # time of the present readings only
        aggs += [
            y.count().cast(pl.Int64).alias(f"{m}.n"),
            y.sum().alias(f"{m}.sy"),
            y.var().alias(f"{m}.var"),
            y.min().alias(f"{m}.min"),
            y.max().alias(f"{m}.max"),
            y.last(ignore_nulls=True).alias(f"{m}.last"),
            xv.sum().alias(f"{m}.sx"),
            (xv * xv).sum().alias(f"{m}.sxx"),
            (x * y).sum().alias(f"{m}.sxy"),
            xv.min().alias(f"{m}.xmin"),
            xv.max().alias(f"{m}.xmax"),
        ]
    return aggs


def _window_features(
    k: int, n_buckets: int, suffix: str, measures: Sequence[str], *, error: bool
) -> tuple[list[pl.Expr], list[pl.Expr]]:
    """Fold buckets ``k..n_buckets-1`` (side by side, ``{stat}@{j}``) into window ``suffix``.

    Returns the window's totals (added first) and the features computed from them.
    """
    js = range(k, n_buckets)

    def each(stat: str) -> list[pl.Expr]:
        return [pl.col(f"{stat}@{j}") for j in js]

    def total(stat: str) -> pl.Expr:
        return pl.sum_horizontal(each(stat))  # absent buckets are null: they add nothing

    n = f"n_events_{suffix}"
    gaps = [
        *each("gap"),
        *(pl.when(pl.col(f"gap_from@{j}") >= k).then(pl.col(f"gap_in@{j}")) for j in js),
    ]
    totals: list[pl.Expr] = [total("n").alias(n), pl.max_horizontal(gaps).alias(f"__gap_{suffix}")]
    has_events = pl.col(n) > 0
    # the window's first event opens a date when the event before it lies outside the window
    # (at whole-day windows ending at midnight it always does: its date differs anyway)
    opened = [
        pl.when((pl.col(f"gap_from@{j}") < k) & ~pl.col(f"day_in@{j}")).then(1).otherwise(0)
        for j in js
        if k > 0
    ]
    features: list[pl.Expr] = [
        pl.col(n),
        pl.sum_horizontal(total("days"), *opened).cast(pl.Int64).alias(f"active_days_{suffix}"),
        pl.when(has_events)
        .then(pl.max_horizontal(f"__gap_{suffix}", _TRAIL))
        .alias(f"longest_gap_days_{suffix}"),
    ]
    if error:
        err_n = total("err_n")
        features.append(pl.when(err_n > 0).then(total("err") / err_n).alias(f"error_rate_{suffix}"))
    for m in measures:
        p = f"__{m}_{suffix}"
        cnt, sy, mean = pl.col(f"{p}_n"), pl.col(f"{p}_sy"), pl.col(f"{p}_mean")
        totals += [
            *(
                total(f"{m}.{stat}").alias(f"{p}_{stat}")
                for stat in ("n", "sy", "sx", "sxx", "sxy")
            ),
            (total(f"{m}.sy") / total(f"{m}.n")).alias(f"{p}_mean"),
        ]
        # Chan et al.: squared deviations of the window = each bucket's own plus its count
        # times the squared distance between its mean and the window's
        m2 = pl.sum_horizontal(
            pl.when(pl.col(f"{m}.n@{j}") > 0).then(
                pl.col(f"{m}.var@{j}").fill_null(0.0) * (pl.col(f"{m}.n@{j}") - 1)
                + pl.col(f"{m}.n@{j}") * (pl.col(f"{m}.sy@{j}") / pl.col(f"{m}.n@{j}") - mean) ** 2
            )
            for j in js
        )
        sx = pl.col(f"{p}_sx")
        slope = (cnt * pl.col(f"{p}_sxy") - sx * sy) / (cnt * pl.col(f"{p}_sxx") - sx * sx)
        spread = pl.max_horizontal(each(f"{m}.xmax")) > pl.min_horizontal(each(f"{m}.xmin"))
        features += [
            pl.when(cnt > 0).then(mean).alias(f"{m}_mean_{suffix}"),
            pl.when(cnt > 1).then((m2 / (cnt - 1)).sqrt()).alias(f"{m}_std_{suffix}"),
            pl.min_horizontal(each(f"{m}.min")).alias(f"{m}_min_{suffix}"),
            pl.max_horizontal(each(f"{m}.max")).alias(f"{m}_max_{suffix}"),
            pl.when(has_events)
            .then((pl.col(n) - cnt) / pl.col(n))
            .alias(f"{m}_missing_rate_{suffix}"),
            pl.when((cnt > 1) & spread).then(slope).alias(f"{m}_slope_{suffix}"),
        ]
    return totals, features


def _features_query(
    lf: pl.LazyFrame,
    *,
    entity: str,
    measures: Sequence[str],
    end: dt.datetime,
    windows: Sequence[WindowValue],
    end_at: WindowEnd,
    error: bool,
    exact: bool,
    ordered: bool = False,
    before_end: bool = False,
) -> pl.LazyFrame:
    by_length = parse_windows(windows)[::-1]
    n_buckets = len(by_length) + 1
    # sorted once, read twice (the optimizer would otherwise sort once per projection)
    events = _ordered_events(
        lf,
        entity=entity,
        end=end,
        lengths=[w.micros for w in by_length],
        end_at=end_at,
        exact=exact,
        ordered=ordered,
        before_end=before_end,
    ).cache()
    buckets = events.group_by(_GROUP).agg(_bucket_stats(measures, error=error))
    per_entity = [
        pl.col(entity).first(),
        (
            pl.col(DEVICE).drop_nulls().n_unique()
            if DEVICE in lf.collect_schema().names()
            else pl.lit(1)
        )
        .cast(pl.Int64)
        .alias("n_devices"),
    ]
    if end_at == "last_event":  # recency against the as_of end, not the window end
        per_entity.append(
            _days(pl.lit(end) - pl.col(TIMESTAMP).max()).alias("days_since_last_event")
        )
    side_by_side = events.group_by(_RUN).agg(per_entity)
    for j in range(n_buckets):
        part = buckets.filter(pl.col(_BUCKET) == j).drop(_GROUP, _BUCKET)
        side_by_side = side_by_side.join(
            part.rename({c: f"{c}@{j}" for c in part.collect_schema().names() if c != _RUN}),
            on=_RUN,
            how="left",
            validate="1:1",
        )
    newest_first = range(n_buckets - 1, -1, -1)
    # from the last event to the window end: the as_of recency, or 0 under last_event
    trail = -pl.coalesce(pl.col(f"x_last@{j}") for j in newest_first)
    overall = [
        trail.alias(_TRAIL),
        *([] if end_at == "last_event" else [trail.alias("days_since_last_event")]),
        *(
            pl.coalesce(pl.col(f"{m}.last@{j}") for j in newest_first).alias(f"{m}_last")
            for m in measures
        ),
    ]
    totals: list[pl.Expr] = []
    features: list[pl.Expr] = []
    for k, suffix in [(0, ALL), *((i + 1, w.suffix) for i, w in enumerate(by_length))]:
        more_totals, more_features = _window_features(k, n_buckets, suffix, measures, error=error)
        totals += more_totals
        features += more_features
    names = event_feature_names(measures, windows, error=error)
    return (
        side_by_side.with_columns(*overall, *totals)
        .with_columns(features)
        .select(entity, *names)
        .sort(entity)
    )


def events_features(
    clean: pl.LazyFrame | pl.DataFrame,
    *,
    entity: str,
    measures: Sequence[str],
    as_of: dt.date,
    windows: Sequence[WindowValue],
    end_at: WindowEnd = "as_of",
    engine: Engine = "in-memory",
    rows: Recording | None = None,
) -> pl.DataFrame:
    """Windowed activity, reliability and measure statistics per entity, sorted by entity.

    ``clean`` holds ``entity``, ``timestamp`` (UTC), the ``measures`` (float, null = missing
    reading) and optionally ``device_id`` and ``error`` (bool). ``windows`` are day counts
    or duration strings (:func:`tasks.prepare.windows.parse_window`); ``end_at`` is where
    they end. ``engine`` is the polars engine that runs the query (figures in
    benchmarks/README.md). ``rows``: what :func:`~signals.recording` found out about
    ``clean`` already (then ``clean`` is its frame).
    """
    ws = [w.spec_value for w in parse_windows(windows)]
    measures = list(measures)
    lf = clean.lazy()
    names = lf.collect_schema().names()
    error = ERROR in names
    devices = [DEVICE] if DEVICE in names else []
    columns = [entity, *devices, TIMESTAMP, *measures] + ([ERROR] if error else [])
    lf = lf.select(columns).with_columns(pl.col(measures).cast(pl.Float64))
    end = window_end(as_of)

    # rows already in per-entity runs in time order (as recordings usually come) skip the
    # sort: it would keep them as they are
    if rows is None:
        ordered = in_runs(lf.filter(pl.col(TIMESTAMP) < pl.lit(end)), entity)
    else:
        ordered = rows.ordered

    def query(*, exact: bool) -> pl.LazyFrame:
        return _features_query(
            lf,
            entity=entity,
            measures=measures,
            end=end,
            windows=ws,
            end_at=end_at,
            error=error,
            exact=exact,
            ordered=ordered,
            before_end=rows is not None,
        )

    out = query(exact=False).collect(engine=engine)
    if out.get_column(entity).is_duplicated().any():
        logger.warning("entity hash collision with interleaved events: recomputing exactly")
        out = query(exact=True).collect(engine=engine)
    return out


# --- the modality -----------------------------------------------------------------------


def event_measures(source: SourceSpec) -> list[str]:
    """The numeric readings of an events source (every numeric column but the device id,
    timestamp and error flag)."""
    return [
        name
        for name, column in source.columns.items()
        if column.dtype in ("float", "int") and name not in (DEVICE, TIMESTAMP, ERROR)
    ]


def device_map(
    raw: pl.DataFrame, spec: EntityMapSpec, *, entity: str, normalisation: KeyNormalisation
) -> pl.DataFrame:
    """Coerce the device -> entity side table; a device mapped to two entities is an error."""
    frame, _ = coerce_frame(
        raw, spec.columns, file=spec.path, key=None, normalisation=normalisation, vocabularies={}
    )
    frame = frame.with_columns(
        normalise_key(pl.col(DEVICE), normalisation, ascii=is_ascii(frame, DEVICE)).alias(DEVICE),
        normalise_key(pl.col(entity), normalisation, ascii=is_ascii(frame, entity)).alias(entity),
    ).filter(
        # a map row whose keys are unusable (invalid UTF-8, control characters) maps nothing:
        # that device's events are quarantined as not in the entity map
        pl.col(DEVICE).is_not_null()
        & pl.col(entity).is_not_null()
        & pl.col(REASON).is_null()
        & ~pl.col(DEVICE).str.contains(KEY_CONTROL)
        & ~pl.col(entity).str.contains(KEY_CONTROL)
    )
    pairs = frame.select(DEVICE, entity).unique()
    clash = pairs.group_by(DEVICE).agg(pl.col(entity).sort()).filter(pl.col(entity).list.len() > 1)
    if clash.height:
        rows = frame.join(clash.select(DEVICE), on=DEVICE)[ROW].sort().to_list()
        shown = ", ".join(str(r) for r in rows[:20]) + (", ..." if len(rows) > 20 else "")
        raise PreprocessError(  # rows of the party's own file, never the ids
            f"{spec.path}: {clash.height} device(s) mapped to several entities "
            f"({len(rows)} rows: {shown}); one entity per device is required"
        )
    return pairs


#: Highest declared sampling rate (1 MHz).
MAX_SAMPLING_HZ = 1e6

#: Most axes a magnitude is taken over.
MAX_AXES = 16


def _sub_window(value: object) -> WindowValue:
    return parse_window(value).spec_value


class EventOptions(WindowOptions):
    """Feature options of events sources: the windows, and for high-frequency recordings the
    signal features (:mod:`tasks.prepare.modalities.signals`)."""

    signal: bool | None = Field(
        default=None,
        description="Signal features (distribution, crossings, peaks, autocorrelation, "
        "spectrum, rolling sub-windows) over each entity's recording: true, false, or "
        "unset for automatic (on when a window is shorter than a day or sampling_hz is given)",
    )
    sampling_hz: float | None = Field(
        default=None,
        gt=0,
        le=MAX_SAMPLING_HZ,
        allow_inf_nan=False,
        description="Declared readings per second of the recording (frequencies use it); "
        "unset: each entity's own, one over its median time between readings",
    )
    axes: list[str] | None = Field(
        default=None,
        min_length=2,
        max_length=MAX_AXES,
        description="Measures (canonical columns) that are the axes of one vector, e.g. "
        '["ax", "ay", "az"]: adds the signal features of their Euclidean norm, magnitude_*',
    )
    sub_window: Annotated[
        WindowValue, PlainValidator(_sub_window, json_schema_input_type=WindowValue)
    ] = Field(
        default="1s",
        description='Length of the rolling sub-windows of the signal features ("500ms", '
        '"1s", "2s", ...; taken as that many readings at the sampling rate)',
    )

    @field_validator("axes")
    @classmethod
    def _distinct_axes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("axes must name each measure once")
        return value

    def signal_on(self) -> bool:
        """Whether the source gets signal features (explicit, or sub-day windows or a
        declared sampling rate)."""
        if self.signal is not None:
            return self.signal
        return self.sampling_hz is not None or any(w.micros < DAY_US for w in self.spans)


def event_options(source: SourceSpec) -> EventOptions:
    """The events source's options as validated."""
    options = source.features
    if not isinstance(options, EventOptions):
        raise TypeError(f"source {source.id!r}: {source.kind} options are not events options")
    return options


def source_feature_names(source: SourceSpec) -> list[str]:
    """Feature columns of an events source after the entity key, in order: the windowed
    statistics, then the signal features when they apply."""
    options = event_options(source)
    measures = event_measures(source)
    names = event_feature_names(measures, options.windows, error=ERROR in source.columns)
    if options.signal_on():
        names += signal_feature_names(measures, axes=options.axes)
    return names


class Events(Modality):
    """Device readings and usage events, keyed by device and mapped to the entity through
    the source's entity map, or keyed by the entity itself when the source has none."""

    kind = "events"
    order = 2
    options = EventOptions

    def required_columns(self, source: SourceSpec) -> tuple[str, ...]:
        return (DEVICE, TIMESTAMP) if source.entity_map is not None else (TIMESTAMP,)

    def key_column(self, source: SourceSpec, *, entity: str) -> str:
        return DEVICE if source.entity_map is not None else entity

    def key_problems(self, source: SourceSpec, *, at: str, entity: str) -> list[SpecProblem]:
        return self._axes_problems(source, at=at) + self._key_problems(source, at=at, entity=entity)

    def _axes_problems(self, source: SourceSpec, *, at: str) -> list[SpecProblem]:
        """Declared axes are numeric measures of the source, in one unit dimension."""
        options = event_options(source)
        if not options.axes:
            return []
        measures = event_measures(source)
        problems = [
            SpecProblem(
                path=f"{at}.features.axes[{i}]",
                message=f"'{axis}' is not a numeric measure of this source; axes name "
                f"float or int columns of 'columns'",
            )
            for i, axis in enumerate(options.axes)
            if axis not in measures
        ]
        if MAGNITUDE in measures:
            problems.append(
                SpecProblem(
                    path=f"{at}.columns.{MAGNITUDE}",
                    message=f"'{MAGNITUDE}' names the norm over the axes: rename this measure",
                )
            )
        dimensions = {
            UNITS[unit].dimension if unit is not None else None
            for axis in options.axes
            if axis in measures
            for unit in [source.columns[axis].unit]
        }
        if len(dimensions) > 1:
            problems.append(
                SpecProblem(
                    path=f"{at}.features.axes",
                    message="the axes have units of different dimensions (or some none); "
                    "give them one unit dimension, e.g. all acceleration",
                )
            )
        return problems

    def _key_problems(self, source: SourceSpec, *, at: str, entity: str) -> list[SpecProblem]:
        if source.entity_map is None:
            if entity in source.columns:
                return []
            return [
                SpecProblem(
                    path=f"{at}.columns",
                    message=f"needs a mapping for the entity key '{entity}' (when the device "
                    "is the entity or the file holds the key) or an entity_map (device -> "
                    "entity)",
                )
            ]
        if entity in source.columns:
            return [
                SpecProblem(
                    path=f"{at}.columns.{entity}",
                    message="the entity_map gives the entity key: remove this mapping or the "
                    "entity_map",
                )
            ]
        return [
            SpecProblem(path=f"{at}.entity_map.columns", message=f"needs a '{name}' column mapping")
            for name in (DEVICE, entity)
            if name not in source.entity_map.columns
        ]

    def bounds(self, source: SourceSpec) -> dict[str, tuple[float, str]]:
        """Readings the statistics take (:data:`MAX_ABS_READING`)."""
        return dict.fromkeys(
            event_measures(source), (MAX_ABS_READING, f"|value| > {MAX_ABS_READING:.0e}")
        )

    def attach_entity(
        self,
        frame: pl.DataFrame,
        source: SourceSpec,
        entity_map: pl.DataFrame | None,
        *,
        entity: str,
        normalisation: KeyNormalisation,
    ) -> tuple[pl.DataFrame, list[str]]:
        """Join the device map; an event of an unmapped device is quarantined. Without a
        map the rows carry the entity key already (device ids, if any, are normalised like
        keys, so that ``n_devices`` counts each device once)."""
        if source.entity_map is None:
            if DEVICE in source.columns:
                frame = frame.with_columns(
                    normalise_key(pl.col(DEVICE), normalisation).alias(DEVICE)
                )
            return frame, list(source.columns)
        if entity_map is None:
            raise PreprocessError(f"{source.path}: events source needs its entity map")
        mapping = device_map(
            entity_map, source.entity_map, entity=entity, normalisation=normalisation
        )
        frame = frame.join(mapping, on=DEVICE, how="left")
        frame = frame.with_columns(
            pl.when(pl.col(REASON).is_null() & pl.col(entity).is_null())
            .then(
                pl.lit(
                    f"device not in entity map "
                    f"(column '{raw_name(DEVICE, source.columns[DEVICE])}')"
                )
            )
            .otherwise(pl.col(REASON))
            .alias(REASON)
        )
        return frame, [entity, *source.columns]

    def extract(
        self, clean: pl.LazyFrame, source: SourceSpec, inputs: FeatureInputs
    ) -> pl.DataFrame:
        options = event_options(source)
        measures = event_measures(source)
        end = window_end(inputs.as_of)
        # a recording is read once, for both kinds of features
        rows = recording(clean, entity=inputs.entity, end=end) if options.signal_on() else None
        windowed = events_features(
            clean if rows is None else rows.frame,
            entity=inputs.entity,
            measures=measures,
            as_of=inputs.as_of,
            windows=options.windows,
            end_at=options.window_end,
            rows=rows,
        )
        if rows is None:
            return windowed
        signals = signal_features(
            rows.frame,
            entity=inputs.entity,
            measures=measures,
            end=end,
            axes=options.axes,
            sampling_hz=options.sampling_hz,
            sub_window_s=parse_window(options.sub_window).micros / 1e6,
            rows=rows,
        )
        # the same entities (those with events before the end), one row each
        return windowed.join(signals, on=inputs.entity, how="left", validate="1:1")


EVENTS = register(Events())
