"""Features for structured tables.

* transaction grain (one row per purchase): recency, frequency, monetary value, per-window
  counts and sums, a trend comparing the shortest window's daily rate with the rest of the
  longest window (rates per day, also for sub-day windows), tenure, and category shares of
  spend over the consortium vocabulary;
* entity grain (one row per entity): attributes passed through with canonical types (dates
  become "days before as_of", booleans 0/1, categories stay strings for alignment to encode).

All windows end at the end of the ``as_of`` day; later rows are ignored. With
``window_end = "last_event"`` each entity's windows end at its own last transaction
(inclusive) instead; ``recency_days`` and ``tenure_days`` stay days before the end of the
``as_of`` day either way. Window lengths are whole days or durations
(:mod:`tasks.prepare.windows`). The ``table`` modality (registered here) picks one of the two
by the source's ``grain``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Annotated

import polars as pl
from pydantic import Field, PlainValidator, field_validator

from tasks.prepare.modalities.base import FeatureInputs, Modality, register
from tasks.prepare.windows import (
    DAY_US,
    Window,
    WindowValue,
    parse_window,
    parse_windows,
)
from tasks.spec.models import ColumnSpec, FeatureOptions, SourceSpec
from tasks.types import AMOUNT, CATEGORY, SPLIT, TIMESTAMP, WindowEnd


def window_end(as_of: dt.date) -> dt.datetime:
    """Exclusive end of every feature window: midnight UTC after ``as_of``."""
    return dt.datetime.combine(as_of + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


def _days_before(end: dt.datetime, expr: pl.Expr) -> pl.Expr:
    # times the reciprocal, as polars divides a column by a constant, also for a column
    # of one value (divided exactly otherwise): the same bits however the rows are split
    return (pl.lit(end) - expr).dt.total_microseconds().cast(pl.Float64) * (1.0 / DAY_US)


#: Largest magnitude of an amount (currency units, after unit conversion). Amounts are summed
#: as exact integer millionths: 1e12 units are 1e18 millionths, inside Int64 (9.2e18) per
#: row; sums are taken in Int128, which no realistic row count can overflow. Preprocessing
#: quarantines an amount beyond it (``column 'amt_cents' (amount): out of range (...)``).
MAX_ABS_AMOUNT = 1e12


def _micro(where: pl.Expr | None = None) -> pl.Expr:
    """Amounts in millionths as integers: shares from exact integer sums are the same to
    the last bit however the rows were split across threads. Amounts must be within
    :data:`MAX_ABS_AMOUNT` (the cast fails beyond 9.2e12)."""
    micro = (pl.col(AMOUNT) * 1e6).round(0).cast(pl.Int64)
    return micro if where is None else micro.filter(where)


def _micro_sum(where: pl.Expr | None = None) -> pl.Expr:
    """Exact sum of the millionths in 128 bits (an Int64 sum would wrap silently)."""
    return _micro(where).cast(pl.Int128).sum()


#: Above this ``rows x largest |amount|`` (in millionths) a group's exact integer moments
#: could leave 128 bits; such a group's standard deviation falls back to floating point.
_EXACT_MOMENTS_LIMIT = 1e19


_AMOUNTS = "__amounts"  # non-null amounts per entity, for the mean


def _amount_sum(where: pl.Expr | None = None) -> pl.Expr:
    """Sum of amounts from exact integer millionths: the same bits whatever the threads."""
    return _micro_sum(where).cast(pl.Float64) * (1.0 / 1e6)  # see _days_before


def _amount_std() -> pl.Expr:
    """Sample standard deviation (ddof 1) from exact 128-bit integer moments of the
    amounts in millionths, ``n * sum(x^2) - sum(x)^2``: reproducible to the last bit, and
    free of the cancellation of the float shortcut. Null below two amounts."""
    micro = _micro()
    wide = micro.cast(pl.Int128)
    n = micro.count()
    numerator = n.cast(pl.Int128) * (wide * wide).sum() - wide.sum() * wide.sum()
    exact = (numerator.cast(pl.Float64) / (n * (n - 1)).cast(pl.Float64)).sqrt() * (1.0 / 1e6)
    fits = n.cast(pl.Float64) * micro.abs().max().cast(pl.Float64) < _EXACT_MOMENTS_LIMIT
    return (
        pl.when(n < 2)
        .then(pl.lit(None, dtype=pl.Float64))
        .when(fits)
        .then(exact)
        .otherwise(pl.col(AMOUNT).std())
    )


def transaction_features(
    clean: pl.DataFrame | pl.LazyFrame,
    *,
    entity: str,
    as_of: dt.date,
    windows: Sequence[WindowValue],
    categories: Sequence[str] = (),
    end_at: WindowEnd = "as_of",
) -> pl.DataFrame:
    """Recency / frequency / monetary and windowed aggregates per entity.

    ``windows``: day counts or duration strings; ``end_at``: where the windows end (the end
    of the ``as_of`` day, or each entity's last transaction, inclusive).
    """
    end = window_end(as_of)
    spans = parse_windows(windows)
    # rows sorted by entity (flagged sorted): every group is one contiguous slice, so its
    # float sums are taken in one fixed order and the same input gives the same bytes
    lf = (
        clean.lazy()
        .filter(pl.col(TIMESTAMP) < end)
        .sort([entity, TIMESTAMP, AMOUNT])
        .with_columns(pl.col(entity).set_sorted())
    )
    aggs: list[pl.Expr] = [
        _days_before(end, pl.col(TIMESTAMP).max()).alias("recency_days"),
        _days_before(end, pl.col(TIMESTAMP).min()).alias("tenure_days"),
        pl.len().cast(pl.Int64).alias("frequency"),
        _amount_sum().alias("monetary"),
        pl.col(AMOUNT).count().alias(_AMOUNTS),
        pl.col(AMOUNT).max().alias("amount_max"),
        _amount_std().alias("amount_std"),
    ]
    for w in spans:
        length = dt.timedelta(microseconds=w.micros)
        inside = (
            pl.col(TIMESTAMP) > pl.col(TIMESTAMP).max() - pl.lit(length)
            if end_at == "last_event"
            else pl.col(TIMESTAMP) >= pl.lit(end) - pl.lit(length)
        )
        aggs += [
            inside.sum().cast(pl.Int64).alias(f"count_{w.suffix}"),
            _amount_sum(inside).alias(f"amount_{w.suffix}"),
        ]
    # the mean from the exact sum, in the place of the count it divides by
    columns = [entity, *(e.meta.output_name() for e in aggs)]
    out = (
        lf.group_by(entity)
        .agg(aggs)
        .with_columns(
            pl.when(pl.col(_AMOUNTS) > 0)
            .then(pl.col("monetary") / pl.col(_AMOUNTS))
            .alias(_AMOUNTS)
        )
        .select(columns)
        .rename({_AMOUNTS: "amount_mean"})
    )
    if len(spans) >= 2:
        short, long = spans[0], spans[-1]
        rest = long.days - short.days  # per-day rates, whatever the windows' unit

        def rate_change(column: str) -> pl.Expr:
            recent = pl.col(f"{column}_{short.suffix}") * (1.0 / short.days)
            earlier = (pl.col(f"{column}_{long.suffix}") - pl.col(f"{column}_{short.suffix}")) * (
                1.0 / rest
            )
            return (recent - earlier).alias(f"{column}_trend")

        out = out.with_columns(rate_change("count"), rate_change("amount"))
    if categories and CATEGORY in clean.collect_schema().names():
        total = _micro_sum()
        shares = lf.group_by(entity).agg(
            [
                # null, not NaN or inf, when the entity's amounts sum to zero
                pl.when(total != 0)
                .then(_micro_sum(pl.col(CATEGORY) == c).cast(pl.Float64) / total.cast(pl.Float64))
                .alias(f"share_{c}")
                for c in categories
            ]
        )
        out = out.join(shares, on=entity, how="left", validate="1:1")
    return out.sort(entity).collect()


def entity_attributes(
    clean: pl.DataFrame,
    *,
    entity: str,
    as_of: dt.date,
    columns: Mapping[str, ColumnSpec],
    exclude: Sequence[str] = (),
    label: str | None = None,
) -> pl.DataFrame:
    """One row per entity with attributes in model-ready types; the ``label`` column, when
    given, passes through unchanged whatever its dtype (alignment encodes it)."""
    end = window_end(as_of)
    exprs: list[pl.Expr] = [pl.col(entity)]
    for name, column in columns.items():
        if name == entity or name in exclude:
            continue
        if name == label:
            exprs.append(pl.col(name))
            continue
        match column.dtype:
            case "int" | "float":
                exprs.append(pl.col(name).cast(pl.Float64))
            case "bool":
                exprs.append(pl.col(name).cast(pl.Float64))
            case "date":
                exprs.append(
                    _days_before(end, pl.col(name).cast(pl.Datetime("us", "UTC"))).alias(
                        f"{name}_days"
                    )
                )
            case "datetime":
                exprs.append(_days_before(end, pl.col(name)).alias(f"{name}_days"))
            case "category":
                exprs.append(pl.col(name))
            case "str":
                continue  # free identifiers are not features
    if SPLIT in clean.columns:  # the label source's split passes through (never a feature)
        exprs.append(pl.col(SPLIT))
    return clean.select(exprs).sort(entity)


def _window_value(value: object) -> WindowValue:
    return parse_window(value).spec_value


def _default_windows() -> list[WindowValue]:
    return [30, 90]


class WindowOptions(FeatureOptions):
    """Feature options of windowed sources (table and events): the window lengths and where
    the windows end."""

    windows: list[
        Annotated[WindowValue, PlainValidator(_window_value, json_schema_input_type=WindowValue)]
    ] = Field(
        default_factory=_default_windows,
        description='Window lengths: whole days (30) or durations "500ms", "10s", "15min", '
        '"6h", "30d" (at most 100 years; each length once)',
    )
    window_end: WindowEnd = Field(
        default="as_of",
        description="Where each entity's windows end: the end of the as_of day (as_of) or "
        "the entity's own last event before it, inclusive (last_event)",
    )

    @field_validator("windows")
    @classmethod
    def _distinct(cls, value: list[WindowValue]) -> list[WindowValue]:
        if not value:
            raise ValueError("windows must be a non-empty list")
        return [w.spec_value for w in parse_windows(value)]

    @property
    def spans(self) -> list[Window]:
        """The windows, shortest first."""
        return parse_windows(self.windows)


def window_options(source: SourceSpec) -> WindowOptions:
    """The source's options as validated for its windowed kind."""
    options = source.features
    if not isinstance(options, WindowOptions):
        raise TypeError(f"source {source.id!r}: {source.kind} options have no windows")
    return options


class Table(Modality):
    """Structured tables: transactions (``grain = "transaction"``) or one row per entity."""

    kind = "table"
    order = 0
    options = WindowOptions

    def required_columns(self, source: SourceSpec) -> tuple[str, ...]:
        return (TIMESTAMP, AMOUNT) if source.grain == "transaction" else ()

    def default_prefix(self, source: SourceSpec) -> str:
        return "txn" if source.grain == "transaction" else "profile"

    def describe(self, source: SourceSpec) -> str:
        return f"table/{source.grain}"

    def holds_label(self, source: SourceSpec) -> bool:
        return source.grain == "entity"

    def one_row_per_entity(self, source: SourceSpec) -> bool:
        return source.grain == "entity"

    def bounds(self, source: SourceSpec) -> dict[str, tuple[float, str]]:
        """Amounts are summed as exact integer millionths (:data:`MAX_ABS_AMOUNT`)."""
        if AMOUNT not in source.columns:
            return {}
        return {AMOUNT: (MAX_ABS_AMOUNT, f"|amount| > {MAX_ABS_AMOUNT:.0e} currency units")}

    def extract(
        self, clean: pl.LazyFrame, source: SourceSpec, inputs: FeatureInputs
    ) -> pl.DataFrame:
        if source.grain == "transaction":
            has_category = CATEGORY in source.columns
            return transaction_features(
                clean,
                entity=inputs.entity,
                as_of=inputs.as_of,
                windows=window_options(source).windows,
                end_at=window_options(source).window_end,
                categories=inputs.vocabularies.get(CATEGORY, []) if has_category else [],
            )
        return entity_attributes(
            clean.collect(),
            entity=inputs.entity,
            as_of=inputs.as_of,
            columns=source.columns,
            label=inputs.label,
        )


TABLE = register(Table())
