"""Preprocessing: coerce a raw source through its column mapping into the canonical clean table.

Pure polars. Rows that fail validation are never dropped silently: they come back in the
``rejected`` frame with their data row number and a reason; exact duplicates are removed and
also listed there. The label column (in the source that maps it) is checked per row against
the consortium's task: a missing, NaN or infinite label, or one outside the task's classes, is
quarantined the same way, with a reason naming the column but never the cell's value. Problems
that make the whole source unusable (a mapped column missing, an ambiguous device map) raise
:class:`PreprocessError` naming file and column. What differs by kind (the key column, how
rows reach the entity key, value bounds, one row per entity) comes from the source's
modality (:mod:`tasks.prepare.modalities`).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import polars as pl
from pydantic import BaseModel, Field

from storage.sources import INVALID_UTF8, ROW
from tasks.prepare.modalities import modality_of
from tasks.prepare.units import to_canonical
from tasks.spec.models import OTHER, ColumnSpec, KeySpec, SourceSpec
from tasks.types import REASON, SPLIT, KeyNormalisation, Objective

#: Control (Cc: C0, DEL, C1, NUL) and format (Cf: zero-width space/joiners, U+FEFF, bidi
#: controls, soft hyphen) characters: refused inside an entity key (invisible look-alikes).
KEY_CONTROL = r"[\p{Cc}\p{Cf}]"
TRUE_TEXT = ("true", "1", "yes", "y", "t")
FALSE_TEXT = ("false", "0", "no", "n", "f")
_TRUE, _FALSE = TRUE_TEXT, FALSE_TEXT
#: Joins the parts of a composite key (``key = { columns = [...] }``); a part holding it is
#: refused, so two different part lists never give the same key.
KEY_SEPARATOR = "|"
_ISO_FORMATS_TZ = ("%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z")
_ISO_FORMATS_NAIVE = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d")


class PreprocessError(ValueError):
    """The source cannot be preprocessed at all; the message names file and column."""


class QualityReport(BaseModel):
    party: str
    source: str
    file: str
    rows_in: int
    rows_out: int
    rows_rejected: int
    rejected_by_reason: dict[str, int] = Field(default_factory=dict)
    duplicates_removed: int = 0
    null_rates: dict[str, float] = Field(default_factory=dict)
    unknown_categories: dict[str, int] = Field(default_factory=dict)


@dataclass(frozen=True)
class LabelRule:
    """What every label cell must hold for the consortium's task (checked per row)."""

    column: str  # canonical name
    task: Objective
    num_classes: int | None = None  # multiclass
    #: Binary: the raw value (stripped) that is class 1; every other present value is 0.
    positive: str | None = None
    #: Raw value (stripped) -> label value; a value outside it is quarantined.
    values: Mapping[str, float] | None = None

    @property
    def maps_raw(self) -> bool:
        """Whether the label comes from the raw text through ``positive`` or ``values``."""
        return self.positive is not None or self.values is not None


def mapped_label(expr: pl.Expr, dtype: pl.DataType, rule: LabelRule) -> pl.Expr:
    """The label value of a raw cell under ``rule.positive`` or ``rule.values`` (null for a
    missing cell, or one outside ``values``)."""
    text = _string(expr, dtype)
    if rule.positive is not None:
        return (
            pl.when(text.is_null()).then(None).otherwise((text == rule.positive).cast(pl.Float64))
        )
    values = dict(rule.values or {})
    return text.replace_strict(
        list(values), list(values.values()), default=None, return_dtype=pl.Float64
    )


@dataclass(frozen=True)
class SplitRule:
    """How the label source's rows get their split (the clean table's ``__split`` column):
    from the value of its split ``column`` through ``values`` (raw value -> ``train`` /
    ``valid`` / ``test``; a row outside is quarantined), or ``fixed`` for every row of the
    file (an external test file: ``test``; the main file beside it: ``train``)."""

    column: str | None = None  # canonical name
    values: Mapping[str, str] | None = None
    fixed: str | None = None


@dataclass
class Preprocessed:
    clean: pl.DataFrame
    rejected: pl.DataFrame
    quality: QualityReport
    #: Data row number of each clean row (merging a test file with its main file).
    rows: pl.Series | None = None


def raw_name(canonical: str, column: ColumnSpec) -> str:
    """The party's own name of a canonical column."""
    return column.source or canonical


def _check_columns(frame: pl.DataFrame, columns: Mapping[str, ColumnSpec], file: str) -> None:
    available = [c for c in frame.columns if c not in (ROW, INVALID_UTF8)]
    for canonical, column in columns.items():
        raw = raw_name(canonical, column)
        if raw not in frame.columns:
            found = [raw_name(c, s) for c, s in columns.items() if raw_name(c, s) in available]
            raise PreprocessError(  # the file's own header is not shown: it may be data
                f"{file}: column {raw!r} (mapped to {canonical!r}) is missing; "
                f"the file has {len(available)} column(s), of which {len(found)} in the "
                f"mapping: {found}"
            )


def normalise_key(expr: pl.Expr, mode: KeyNormalisation, *, ascii: bool = False) -> pl.Expr:
    """``strip``: surrounding whitespace removed; ``strip_lower``: NFKC-normalised first (a
    full-width ``ｃ0001`` is ``c0001``), then stripped and lower-cased (idempotent). NFKC does
    not fold scripts: Cyrillic ``с`` and Latin ``c`` stay two keys. ``ascii``: the values are
    known to be ASCII text (:func:`is_ascii`), which NFKC leaves as it is, so it is skipped."""
    out = expr.cast(pl.String)
    if mode == "strip_lower" and not ascii:
        out = out.str.normalize("NFKC")
    if mode in ("strip", "strip_lower"):
        out = out.str.strip_chars()
    if mode == "strip_lower":
        out = out.str.to_lowercase()
    return pl.when(out == "").then(None).otherwise(out)


def is_ascii(frame: pl.DataFrame, name: str) -> bool:
    """Whether column ``name`` holds ASCII text only (or is not text: numbers as text are
    ASCII); a text whose byte and character lengths agree is ASCII."""
    column = frame.get_column(name)
    if column.dtype != pl.String:
        return column.dtype.is_numeric() or column.dtype == pl.Boolean
    return bool(
        frame.select((pl.col(name).str.len_bytes() == pl.col(name).str.len_chars()).all()).item()
    )


def _string(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    out = expr if dtype == pl.String else expr.cast(pl.String)
    stripped = out.str.strip_chars()
    return pl.when(stripped == "").then(None).otherwise(stripped)


def _to_datetime(expr: pl.Expr, dtype: pl.DataType, column: ColumnSpec) -> pl.Expr:
    zone = column.tz or "UTC"
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            return (
                expr.cast(pl.Datetime("us"))
                .dt.replace_time_zone(zone, ambiguous="earliest", non_existent="null")
                .dt.convert_time_zone("UTC")
            )
        return expr.cast(pl.Datetime("us", dtype.time_zone)).dt.convert_time_zone("UTC")
    if isinstance(dtype, pl.Date):
        return _to_datetime(expr.cast(pl.Datetime("us")), pl.Datetime("us"), column)
    text = _string(expr, dtype)
    if column.format is not None:
        aware = "%z" in column.format or "%Z" in column.format
        parsed = text.str.to_datetime(column.format, strict=False, time_unit="us", exact=True)
        if aware:
            return parsed.dt.convert_time_zone("UTC")
        return parsed.dt.replace_time_zone(
            zone, ambiguous="earliest", non_existent="null"
        ).dt.convert_time_zone("UTC")
    attempts = [
        text.str.to_datetime(f, strict=False, time_unit="us", time_zone="UTC")
        for f in _ISO_FORMATS_TZ
    ] + [
        text.str.to_datetime(f, strict=False, time_unit="us")
        .dt.replace_time_zone(zone, ambiguous="earliest", non_existent="null")
        .dt.convert_time_zone("UTC")
        for f in _ISO_FORMATS_NAIVE
    ]
    return pl.coalesce(attempts)


def _to_date(expr: pl.Expr, dtype: pl.DataType, column: ColumnSpec) -> pl.Expr:
    if isinstance(dtype, pl.Date):
        return expr
    if isinstance(dtype, pl.Datetime):
        return expr.dt.date()
    return _string(expr, dtype).str.to_date(column.format or "%Y-%m-%d", strict=False)


def _to_bool(expr: pl.Expr, dtype: pl.DataType, column: ColumnSpec) -> pl.Expr:
    if dtype == pl.Boolean and not column.values:
        return expr
    text = _string(expr, dtype)
    if column.values:
        text = text.replace(column.values)
    lowered = text.str.to_lowercase()
    return (
        pl.when(lowered.is_in(_TRUE))
        .then(True)
        .when(lowered.is_in(_FALSE))
        .then(False)
        .otherwise(None)
    )


def coerce(expr: pl.Expr, dtype: pl.DataType, column: ColumnSpec) -> pl.Expr:
    """The expression turning one raw column into its canonical dtype (null where it fails)."""
    match column.dtype:
        case "str":
            out = _string(expr, dtype)
            return out.replace(column.values) if column.values else out
        case "category":
            out = _string(expr, dtype)
            return out.replace(column.values) if column.values else out
        case "int":
            if dtype.is_integer():
                return to_canonical(expr, column.unit) if column.unit else expr.cast(pl.Int64)
            num = (
                _string(expr, dtype).cast(pl.Float64, strict=False)
                if dtype == pl.String
                else expr.cast(pl.Float64, strict=False)
            )
            whole = pl.when(num.is_finite() & (num == num.round(0))).then(num).otherwise(None)
            return (
                to_canonical(whole, column.unit)
                if column.unit
                else whole.cast(pl.Int64, strict=False)
            )
        case "float":
            num = (
                _string(expr, dtype).cast(pl.Float64, strict=False)
                if dtype == pl.String
                else expr.cast(pl.Float64, strict=False)
            )
            num = pl.when(num.is_finite()).then(num).otherwise(None)
            return to_canonical(num, column.unit)
        case "bool":
            return _to_bool(expr, dtype, column)
        case "datetime":
            return _to_datetime(expr, dtype, column)
        case "date":
            return _to_date(expr, dtype, column)
    raise AssertionError(column.dtype)  # pragma: no cover


def _present(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Whether the raw cell holds a value (empty strings count as missing)."""
    if dtype == pl.String:
        return expr.is_not_null() & (expr.str.strip_chars() != "")
    return expr.is_not_null()


def _number(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """The raw cell read as a number (null where it is not one): tells NaN and inf apart."""
    if dtype == pl.String:
        return _string(expr, dtype).cast(pl.Float64, strict=False)
    if dtype.is_numeric() or dtype == pl.Boolean:
        return expr.cast(pl.Float64, strict=False)
    return pl.lit(None, pl.Float64)


def _label_fits(value: pl.Expr, rule: LabelRule) -> tuple[pl.Expr, str]:
    """Whether a numeric label is a target of the task, and the reason text when it is not."""
    match rule.task:
        case "binary":
            return value.is_in([0.0, 1.0]), "not 0 or 1 for a binary task"
        case "multiclass":
            fits = (value == value.round(0)) & (value >= 0)
            if rule.num_classes is None:
                return fits, "not a non-negative integer for a multiclass task"
            return (
                fits & (value < rule.num_classes),
                f"not an integer 0..{rule.num_classes - 1} for a multiclass task",
            )
        case "regression":
            return value.is_finite(), "not a finite number for a regression task"
    raise AssertionError(rule.task)  # pragma: no cover


def _label_reason(
    src: pl.Expr,
    dtype: pl.DataType,
    out: pl.Expr,
    *,
    name: str,
    column: ColumnSpec,
    rule: LabelRule,
    vocabulary: list[str] | None,
) -> pl.Expr:
    """Why a label cell cannot be a target of the task (null when it can).

    The reason names the column, never the cell's value (a label is a cell value).
    """

    def because(text: str) -> pl.Expr:
        return pl.lit(f"column '{name}' (label): {text}")

    number = _number(src, dtype)
    checked = (  # the checks every label has, in this order
        pl.when(~_present(src, dtype))
        .then(because("missing label"))
        .when(number.is_nan())
        .then(because("label is not a number"))
        .when(number.is_infinite())
        .then(because("label is not finite"))
    )
    if rule.maps_raw:
        outside = f"not one of the {len(rule.values or {})} values of consortium.label.values"
        return checked.when(out.is_null()).then(because(outside))
    if rule.task == "multiclass" and column.dtype in ("category", "str") and vocabulary:
        classes = vocabulary[: rule.num_classes] if rule.num_classes else vocabulary
        unparsed = out.is_null()
        unfit = ~out.is_in(classes)
        unfit_reason = f"not one of the {len(classes)} classes for a multiclass task"
    else:
        value = pl.coalesce(out.cast(pl.Float64, strict=False), number)
        fits, unfit_reason = _label_fits(value, rule)
        unparsed = out.is_null() & value.is_null()
        unfit = value.is_null() | ~fits
    return (
        checked.when(unparsed)
        .then(because(f"cannot parse as {column.dtype}"))
        .when(unfit)
        .then(because(unfit_reason))
        .when(out.is_null())
        .then(because(f"cannot parse as {column.dtype}"))
    )


def key_description(source: SourceSpec, entity: str) -> str:
    """How reasons name where a source's entity key comes from (column names, no value)."""
    if source.key is None:
        return f"column '{raw_name(entity, source.columns[entity])}'"
    if source.key.row_number:
        return "the row number"
    return "columns " + ", ".join(f"'{c}'" for c in source.key.columns)


def key_parts(key: KeySpec, normalisation: KeyNormalisation) -> list[pl.Expr]:
    """The normalised parts of a composite key, one per raw column (null: missing)."""
    return [normalise_key(pl.col(c), normalisation) for c in key.columns]


def composite_key(parts: list[pl.Expr]) -> pl.Expr:
    """The parts joined by :data:`KEY_SEPARATOR` (null when one is missing)."""
    return pl.concat_str(parts, separator=KEY_SEPARATOR)


def spec_key(
    raw: pl.DataFrame,
    key: KeySpec,
    *,
    entity: str,
    normalisation: KeyNormalisation,
    file: str,
) -> tuple[pl.Expr, list[pl.Expr]]:
    """The entity key of a source with a ``key`` and the reasons refusing rows: the data
    row number as text, or the composite of normalised raw columns; a composite refuses a
    row whose part is missing, holds :data:`KEY_SEPARATOR` or a control character, or held
    invalid UTF-8. A part column missing from the file raises :class:`PreprocessError`."""
    if key.row_number:
        return pl.col(ROW).cast(pl.String), []
    available = [c for c in raw.columns if c not in (ROW, INVALID_UTF8)]
    for name in key.columns:
        if name not in raw.columns:
            found = [c for c in key.columns if c in available]
            raise PreprocessError(  # the file's own header is not shown: it may be data
                f"{file}: key column {name!r} (part of {entity!r}) is missing; the file has "
                f"{len(available)} column(s), of which {len(found)} of the key's: {found}"
            )
    flagged = INVALID_UTF8 in raw.columns
    reasons: list[pl.Expr] = []
    parts = key_parts(key, normalisation)
    for name, part in zip(key.columns, parts, strict=True):
        where = f"column '{name}' (part of {entity})"
        reasons += [
            pl.when(part.is_null()).then(pl.lit(f"{where}: required value missing")),
            pl.when(part.str.contains(KEY_CONTROL)).then(
                pl.lit(f"{where}: key contains control characters")
            ),
            pl.when(part.str.contains(KEY_SEPARATOR, literal=True)).then(
                pl.lit(f"{where}: key part contains the separator '{KEY_SEPARATOR}'")
            ),
        ]
        if flagged:
            reasons.append(
                pl.when(pl.col(INVALID_UTF8).list.contains(pl.lit(name))).then(
                    pl.lit(f"column '{name}': invalid UTF-8")
                )
            )
    return composite_key(parts), reasons


def _reason(parts: list[pl.Expr]) -> pl.Expr:
    """The row's reasons joined by ``; `` (an empty text where it has none: see
    :func:`_no_empty_reason`)."""
    return pl.concat_str(parts, separator="; ", ignore_nulls=True)


def _no_empty_reason() -> pl.Expr:
    """The :data:`REASON` column with the empty text of a row without reasons as null."""
    return pl.when(pl.col(REASON) == "").then(None).otherwise(pl.col(REASON)).alias(REASON)


def _staging_prefix(columns: Collection[str]) -> str:
    """A prefix of internal column names that no column of the raw frame starts with."""
    prefix = "__coerced"
    while any(c.startswith(prefix) for c in columns):
        prefix += "_"
    return prefix


def coerce_frame(
    raw: pl.DataFrame,
    columns: Mapping[str, ColumnSpec],
    *,
    file: str,
    key: str | None,
    normalisation: KeyNormalisation,
    vocabularies: Mapping[str, list[str]],
    label: LabelRule | None = None,
    bounds: Mapping[str, tuple[float, str]] | None = None,
    other: Collection[str] | None = None,
    key_spec: KeySpec | None = None,
    split: SplitRule | None = None,
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Coerce every mapped column; add a ``reject_reason`` column (null for good rows).

    With ``label``, that column's cells are checked against the task instead of the generic
    parse/required checks (whose reasons would show the value). ``bounds``: canonical column
    -> (largest magnitude after unit conversion, how the reason states it); a value beyond
    it is out of range. The ``key`` column is refused when it holds control or format
    characters. With ``key_spec`` the ``key`` column comes from it (:func:`spec_key`)
    instead of a mapped column. With ``split``, a ``__split`` column is added (a split
    column's cell outside its values, or missing, is a reason naming the column only). A
    category value outside its vocabulary becomes ``other`` in the columns of ``other`` (the
    other bucket; default: the columns whose vocabulary holds ``other``), else missing;
    either way it is counted per column (never shown). A category column without a
    vocabulary (one being learned) keeps its mapped values. Returns the frame (``__row``,
    canonical columns, reason) and unknown-category counts.
    """
    _check_columns(raw, columns, file)
    schema = raw.schema
    flagged = INVALID_UTF8 in schema  # the reader found invalid UTF-8 in some cells
    values: list[pl.Expr] = [pl.col(ROW)]
    reasons: list[pl.Expr] = []
    # each coerced column and presence flag is computed once, as a column of its own, and
    # the checks read it (one expression tree each would repeat the coercion in every check)
    prefix = _staging_prefix(schema.names())
    staged: list[pl.Expr] = []
    for index, (canonical, column) in enumerate(columns.items()):
        name = raw_name(canonical, column)
        src, dtype = pl.col(name), schema[name]
        if canonical == key:
            coerced = normalise_key(src, normalisation, ascii=is_ascii(raw, name))
        elif label is not None and canonical == label.column and label.maps_raw:
            coerced = mapped_label(src, dtype, label)
        else:
            coerced = coerce(src, dtype, column)
        staged += [
            coerced.alias(f"{prefix}{index}"),
            _present(src, dtype).alias(f"{prefix}{index}_present"),
        ]
        out, present = pl.col(f"{prefix}{index}"), pl.col(f"{prefix}{index}_present")
        values.append(out.alias(canonical))
        if label is not None and canonical == label.column:
            reasons.append(
                _label_reason(
                    src,
                    dtype,
                    out,
                    name=name,
                    column=column,
                    rule=label,
                    vocabulary=vocabularies.get(canonical),
                )
            )
        else:
            reasons.append(  # the reason names the column, never the cell's value
                pl.when(present & out.is_null()).then(
                    pl.lit(f"column '{name}' ({canonical}): cannot parse as {column.dtype}")
                )
            )
        if split is not None and canonical == split.column and split.values is not None:
            known = list(split.values)
            values.append(
                out.replace_strict(
                    known, [split.values[k] for k in known], default=None, return_dtype=pl.String
                ).alias(SPLIT)
            )
            reasons.append(  # the reason names the column, never the cell's value
                pl.when(out.is_null())
                .then(pl.lit(f"column '{name}' (split): missing split value"))
                .when(~out.is_in(known))
                .then(pl.lit(f"column '{name}' (split): not one of training.split_values"))
            )
        if (column.required or canonical == key) and not (label and canonical == label.column):
            reasons.append(
                pl.when(~present).then(
                    pl.lit(f"column '{name}' ({canonical}): required value missing")
                )
            )
        if canonical == key:
            reasons.append(
                pl.when(out.str.contains(KEY_CONTROL)).then(
                    pl.lit(f"column '{name}' ({canonical}): key contains control characters")
                )
            )
        if bounds and canonical in bounds:
            limit, stated = bounds[canonical]
            reasons.append(
                pl.when(out.cast(pl.Float64).abs() > limit).then(
                    pl.lit(f"column '{name}' ({canonical}): out of range ({stated})")
                )
            )
        if flagged:
            reasons.append(
                pl.when(pl.col(INVALID_UTF8).list.contains(pl.lit(name))).then(
                    pl.lit(f"column '{name}': invalid UTF-8")
                )
            )
    if key_spec is not None and key is not None:
        expr, why = spec_key(raw, key_spec, entity=key, normalisation=normalisation, file=file)
        values.insert(1, expr.alias(key))
        reasons = why + reasons
    if split is not None and split.fixed is not None:
        values.append(pl.lit(split.fixed, pl.String).alias(SPLIT))
    frame = (
        raw.lazy()
        .with_columns(staged)
        .select(*values, _reason(reasons).alias(REASON))
        .with_columns(_no_empty_reason())
        .collect()
    )
    if other is None:
        other = [name for name, vocab in vocabularies.items() if OTHER in vocab]
    unknown: dict[str, int] = {}
    updates: list[pl.Expr] = []
    for canonical, column in columns.items():
        if column.dtype != "category" or (label is not None and canonical == label.column):
            continue  # a label outside its classes is quarantined, not counted or mapped
        vocab = vocabularies.get(canonical)
        if vocab is None:
            continue  # being learned: the counting step sees the mapped values
        outside = frame.filter(pl.col(canonical).is_not_null() & ~pl.col(canonical).is_in(vocab))
        if outside.height:
            unknown[canonical] = outside.height
        fallback = pl.lit(OTHER) if canonical in other else pl.lit(None, pl.String)
        updates.append(
            pl.when(pl.col(canonical).is_null() | pl.col(canonical).is_in(vocab))
            .then(pl.col(canonical))  # a missing value stays missing, not "other"
            .otherwise(fallback)
            .alias(canonical)
        )
    if updates:
        frame = frame.with_columns(updates)
    return frame, unknown


def _rejected_rows(raw: pl.DataFrame, reasons: pl.DataFrame) -> pl.DataFrame:
    """Raw cells (as text) of rejected rows, with row number and reason."""
    cells = [c for c in raw.columns if c not in (ROW, INVALID_UTF8)]
    picked = raw.join(reasons.select(ROW).unique(), on=ROW, how="semi")  # only those rows
    as_text = picked.select(pl.col(ROW), *[pl.col(c).cast(pl.String) for c in cells])
    return reasons.join(as_text, on=ROW, how="left").select(ROW, REASON, *as_text.columns[1:])


def preprocess(
    raw: pl.DataFrame,
    source: SourceSpec,
    *,
    party: str,
    entity: str,
    normalisation: KeyNormalisation,
    vocabularies: Mapping[str, list[str]],
    entity_map: pl.DataFrame | None = None,
    bad_lines: list[tuple[int, str, str]] | None = None,
    label: LabelRule | None = None,
    other: Collection[str] | None = None,
    split: SplitRule | None = None,
    test: TestFile | None = None,
) -> Preprocessed:
    """Coerce, normalise, deduplicate and validate one raw source.

    ``label``: the source maps the consortium's label; its rows are checked against the task.
    ``other``: the columns with an other bucket (:func:`coerce_frame`).
    ``split``: how its rows get their ``__split``. ``test``: the rows of the source's
    external test file (``test_path``), preprocessed the same way as the test split and
    merged with the main file's (:func:`merge_test_file`).
    """
    if test is not None:
        one_file = functools.partial(
            preprocess,
            party=party,
            entity=entity,
            normalisation=normalisation,
            vocabularies=vocabularies,
            entity_map=entity_map,
            label=label,
        )
        main = one_file(raw, source, bad_lines=bad_lines, split=split or SplitRule(fixed="train"))
        test_source = source.model_copy(update={"path": source.test_path or source.path})
        held_out = one_file(
            test.raw, test_source, bad_lines=test.bad_lines, split=SplitRule(fixed="test")
        )
        key = modality_of(source).key_column(source, entity=entity)
        name = raw_name(key, source.columns[key]) if key in source.columns else key

        def keys(frame: pl.DataFrame) -> pl.Series:
            """Every normalised key of the file, rows quarantined for other reasons too."""
            if name not in frame.columns:
                return pl.Series(entity, [], dtype=pl.String)
            return frame.select(normalise_key(pl.col(name), normalisation).alias(entity))[entity]

        return merge_test_file(
            main, held_out, raw, test.raw, entity=entity, keys=(keys(raw), keys(test.raw))
        )
    modality = modality_of(source)
    key = modality.key_column(source, entity=entity)
    if label is not None and label.column not in source.columns:
        label = None
    frame, unknown = coerce_frame(
        raw,
        source.columns,
        file=source.path,
        key=key,
        normalisation=normalisation,
        vocabularies=vocabularies,
        label=label,
        bounds=modality.bounds(source),
        other=other,
        key_spec=source.key,
        split=split,
    )
    frame, canonical = modality.attach_entity(
        frame, source, entity_map, entity=entity, normalisation=normalisation
    )
    if source.key is not None and entity not in canonical:
        canonical = [entity, *canonical]
    if SPLIT in frame.columns:
        canonical = [*canonical, SPLIT]
    bad = frame.filter(pl.col(REASON).is_not_null()).select(ROW, REASON)
    good = frame.filter(pl.col(REASON).is_null())
    # exact duplicates (on canonical values): keep the first occurrence; the first row of
    # each group is looked up among the rows with a duplicate only (one hash pass for all)
    repeated = good.select(pl.struct(canonical).is_duplicated()).to_series()
    firsts = good[ROW].alias("__first")
    if repeated.any():
        among = good.filter(repeated).select(pl.col(ROW).first().over(canonical))
        firsts = firsts.scatter(repeated.arg_true(), among.to_series())
    good = good.with_columns(firsts)
    dupes = good.filter(pl.col(ROW) != pl.col("__first")).select(
        ROW, pl.format("exact duplicate of row {}", pl.col("__first")).alias(REASON)
    )
    good = good.filter(pl.col(ROW) == pl.col("__first")).drop("__first")
    conflicts = pl.DataFrame(schema={ROW: pl.Int64, REASON: pl.String})
    if modality.one_row_per_entity(source):
        counts = good.group_by(entity).agg(
            pl.col(ROW).sort().alias("__rows"), pl.len().alias("__n")
        )
        clash = counts.filter(pl.col("__n") > 1)
        if clash.height:
            conflicts = good.join(clash, on=entity).select(
                ROW,
                pl.format(
                    "duplicate key in {} (rows {}): one row per entity required",
                    pl.lit(key_description(source, entity)),
                    pl.col("__rows").cast(pl.List(pl.String)).list.join(", "),
                ).alias(REASON),
            )
            good = good.join(clash.select(entity), on=entity, how="anti")
    reasons = pl.concat([bad, dupes, conflicts]).sort(ROW)
    rejected = _rejected_rows(raw, reasons)
    if bad_lines:
        lines = pl.DataFrame(
            {
                ROW: [n for n, _, _ in bad_lines],
                REASON: [r for _, _, r in bad_lines],
                "__raw_line": [t[:2000] for _, t, _ in bad_lines],
            },
            schema={ROW: pl.Int64, REASON: pl.String, "__raw_line": pl.String},
        )
        rejected = pl.concat([rejected, lines], how="diagonal").sort(ROW)
    clean = good.drop(ROW, REASON).select(canonical)
    quality = QualityReport(
        party=party,
        source=source.id,
        file=source.path,
        rows_in=raw.height + len(bad_lines or []),
        rows_out=clean.height,
        rows_rejected=rejected.height,
        rejected_by_reason=_reason_counts(reasons, bad_lines or []),
        duplicates_removed=dupes.height,
        null_rates={
            c: round(float(clean[c].null_count()) / clean.height, 6) if clean.height else 0.0
            for c in clean.columns
        },
        unknown_categories=unknown,
    )
    return Preprocessed(clean=clean, rejected=rejected, quality=quality, rows=good[ROW])


@dataclass(frozen=True)
class TestFile:
    """The raw rows of a label source's external test file (``test_path``)."""

    raw: pl.DataFrame
    bad_lines: list[tuple[int, str, str]] | None = None


#: Prefix of the reasons of rows quarantined from a source's external test file.
TEST_FILE_REASON = "test_path: "
#: Reason of the rows of an entity present in both the main file and the test file.
IN_BOTH_FILES = "entity is in both path and test_path (refused in both)"


def merge_test_file(
    main: Preprocessed,
    test: Preprocessed,
    raw: pl.DataFrame,
    test_raw: pl.DataFrame,
    *,
    entity: str,
    keys: tuple[pl.Series, pl.Series] | None = None,
) -> Preprocessed:
    """One clean table of a source's main file (train/validation) and its test file (test):
    an entity in both files is quarantined in both (its split would be ambiguous); the test
    file's rejected rows carry its row numbers and reasons prefixed ``test_path: ``.

    ``keys``: the normalised keys of every row of each file (default: of its clean rows), so
    that an entity also refused in the other file for another reason is refused here too."""
    main_keys, test_keys = keys or (main.clean[entity], test.clean[entity])

    def cut(
        part: Preprocessed, frame: pl.DataFrame, other: pl.Series
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        if part.rows is None:
            raise AssertionError("preprocess keeps the row numbers of clean rows")
        hit = part.clean[entity].is_in(other.drop_nulls().implode())
        reasons = pl.DataFrame(
            {ROW: part.rows.filter(hit), REASON: IN_BOTH_FILES},
            schema={ROW: pl.Int64, REASON: pl.String},
        )
        rejected = pl.concat(
            [part.rejected, _rejected_rows(frame, reasons)], how="diagonal_relaxed"
        ).sort(ROW)
        return part.clean.filter(~hit), rejected

    main_clean, main_rejected = cut(main, raw, test_keys)
    test_clean, test_rejected = cut(test, test_raw, main_keys)
    test_rejected = test_rejected.with_columns(
        pl.concat_str(pl.lit(TEST_FILE_REASON), pl.col(REASON)).alias(REASON)
    )
    clean = pl.concat([main_clean, test_clean], how="vertical_relaxed")
    rejected = pl.concat([main_rejected, test_rejected], how="diagonal_relaxed")
    by_reason = dict(main.quality.rejected_by_reason)
    for kind, n in test.quality.rejected_by_reason.items():
        by_reason[TEST_FILE_REASON + kind] = n
    in_main = main.clean.height - main_clean.height
    in_test = test.clean.height - test_clean.height
    if in_main:
        by_reason[IN_BOTH_FILES] = by_reason.get(IN_BOTH_FILES, 0) + in_main
    if in_test:
        by_reason[TEST_FILE_REASON + IN_BOTH_FILES] = in_test
    unknown = dict(main.quality.unknown_categories)
    for column, n in test.quality.unknown_categories.items():
        unknown[column] = unknown.get(column, 0) + n
    quality = main.quality.model_copy(
        update={
            "rows_in": main.quality.rows_in + test.quality.rows_in,
            "rows_out": clean.height,
            "rows_rejected": rejected.height,
            "rejected_by_reason": dict(sorted(by_reason.items())),
            "duplicates_removed": main.quality.duplicates_removed + test.quality.duplicates_removed,
            "null_rates": {
                c: round(float(clean[c].null_count()) / clean.height, 6) if clean.height else 0.0
                for c in clean.columns
            },
            "unknown_categories": unknown,
        }
    )
    return Preprocessed(clean=clean, rejected=rejected, quality=quality)


def _reason_kind(reason: str) -> str:
    """Group reasons by kind: drop the row-specific value part."""
    if " (label): " in reason or " (split): " in reason:
        return reason  # label and split reasons hold no value
    for marker in (
        ": cannot parse",
        ": required value missing",
        ": invalid UTF-8",
        ": out of range",
        ": key contains control characters",
        ": key part contains the separator",
    ):
        if marker in reason:
            return reason.split(marker, maxsplit=1)[0] + marker
    if reason.startswith("exact duplicate"):
        return "exact duplicate"
    if reason.startswith("duplicate key"):
        return "duplicate key (one row per entity required)"
    if reason.startswith("device"):
        return "device not in entity map"
    return reason.split(" (", maxsplit=1)[0]


def _reason_counts(reasons: pl.DataFrame, bad_lines: list[tuple[int, str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for text in [*reasons[REASON].to_list(), *(r for _, _, r in bad_lines)]:
        for part in text.split("; "):
            kind = _reason_kind(part)
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))
