"""Drafting a consortium spec from sample export files (``fedfuse init``).

:func:`draft_spec` looks at the parties' sample files (read by :mod:`storage.sample`) and
returns a :class:`SpecDraft`: per file its format, CSV dialect, kind and grain, every column
with its inferred dtype, timestamp format, time zone remark and unit; the entity key chosen
per party (other candidates listed); the layout; the label's task; category vocabularies
from thresholded per-party entity counts; sources that several parties export alike given
once under ``[defaults]``. :func:`render_toml` writes the draft as TOML with a comment on
every guess.

The draft never holds a key or cell value: only column names, counts, category values held
by at least ``min_entities`` entities at a party (:func:`entity_value_counts`) and the label
values.
"""

from __future__ import annotations

import datetime as dt
import math
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from storage.files import is_uri
from storage.sample import SampleFile
from tasks.prepare.preprocess import FALSE_TEXT, TRUE_TEXT
from tasks.prepare.units import UNITS
from tasks.prepare.vocabulary import entity_value_counts, merge_counts
from tasks.spec.models import infer_format
from tasks.types import (
    AMOUNT,
    CATEGORY,
    DEVICE,
    ERROR,
    RATING,
    TEXT,
    TIMESTAMP,
    ColumnType,
    Layout,
    Objective,
    TableGrain,
)

#: Timestamp formats tried on text columns, in order (polars/chrono syntax, as ``format``).
DATETIME_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
    "%m/%d/%Y %H:%M:%S",
    "%m/%d/%Y %H:%M",
    "%d/%m/%Y %H:%M:%S",
    "%d/%m/%Y %H:%M",
    "%d.%m.%Y %H:%M:%S",
    "%d.%m.%Y %H:%M",
)
#: Date formats tried on text columns, in order.
DATE_FORMATS = ("%Y-%m-%d", "%m/%d/%Y", "%d/%m/%Y", "%d.%m.%Y")
#: A text column is free text (a text source) when its values are this long on average...
TEXT_MEAN_CHARS = 40
#: ... or hold this many words on average.
TEXT_MEAN_WORDS = 5
#: At most this many distinct values make a category (and at most half the rows).
MAX_CATEGORY_VALUES = 100
#: At most this many distinct text values make a class label (multiclass).
MAX_LABEL_CLASSES = 20
#: Unit suffixes of column names (lowercase name token -> unit of :data:`UNITS`).
UNIT_SUFFIXES: dict[str, str] = {
    "cents": "cents",
    "cent": "cents",
    "wh": "Wh",
    "kwh": "kWh",
    "mwh": "MWh",
    "fahrenheit": "F",
    "degf": "F",
    "celsius": "C",
    "degc": "C",
    "kelvin": "K",
    "ms": "ms",
    "millis": "ms",
    "secs": "s",
    "seconds": "s",
    "mins": "min",
    "minutes": "min",
    "hours": "h",
    "hrs": "h",
}
#: How a canonical name ends after its unit is converted (by dimension).
CANONICAL_SUFFIX = {"money": "", "energy": "kwh", "temperature": "c", "duration": "s"}
_DEVICE_NAME = re.compile(r"(^|_)(device|dev|sensor|meter|machine|serial)(_?(id|no|ref))?$")
_KEY_HINT = re.compile(r"(^|_)(id|key|ref|no|number|code|account)$|^(id|cust|customer|user)")
_AMOUNT_NAME = re.compile(r"amount|amt|value|price|total|spend|sum|paid|cost")
_TEXT_NAME = re.compile(r"comment|text|review|feedback|message|body|note|description|remark")
_RATING_NAME = re.compile(r"rating|stars|score")
_ERROR_NAME = re.compile(r"error|fault|fail|alarm")
_INT_TEXT = r"^[+-]?\d+$"
_BOOL_TEXT = frozenset(TRUE_TEXT + FALSE_TEXT) - {"0", "1"}
#: Inferred types a column of ids may have (repeated ids look like a category).
_ID_TYPES = ("str", "int", "category")
_SOURCE_ID = re.compile(r"[^A-Za-z0-9_\-]+")

#: A column's inferred type: a spec dtype, or ``text`` (free text: a text source's column).
InferredType = ColumnType | Literal["text"]


class DraftError(ValueError):
    """The samples cannot be drafted into a spec (no label, no usable key...)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DraftOptions(_Model):
    """What ``fedfuse init`` is told beside the files."""

    label: str = Field(description="Raw name of the label column in the exports")
    label_party: str | None = Field(default=None, description="Party holding the label")
    layout: Layout | None = Field(default=None, description="Overrides the inferred layout")
    entity: str | None = Field(default=None, description="Canonical name of the entity key")
    min_entities: int = Field(
        default=10, ge=1, description="Entities a category value needs at a party to be shown"
    )
    as_of: dt.date = Field(description="End of every feature window")
    name: str = Field(min_length=1, description="Consortium name")
    spec_folder: str = Field(description="Folder the spec is written to; paths are relative")


class DraftColumn(_Model):
    """One canonical column and the raw column it comes from."""

    name: str = Field(description="Canonical name")
    raw: str = Field(description="Raw column name in the export")
    dtype: ColumnType = Field(description="Inferred dtype")
    unit: str | None = Field(default=None, description="Unit read from the column name")
    format: str | None = Field(default=None, description="Timestamp format that parses all")
    required: bool = Field(default=False, description="Whether rows need a value")
    note: str | None = Field(default=None, description="Why, in a TOML comment")


class DraftCsv(_Model):
    """The CSV options that differ from the defaults (``[parties.sources.csv]``)."""

    delimiter: str | None = Field(default=None, description="Field separator")
    header: bool | None = Field(default=None, description="False: the file has no header")
    names: list[str] | None = Field(default=None, description="Column names (no header)")
    skip_rows: int | None = Field(default=None, description="Lines before the header")
    comment_prefix: str | None = Field(default=None, description="Comment line prefix")
    null_values: list[str] | None = Field(default=None, description="Missing-value markers")


class DraftEntityMap(_Model):
    """The device -> entity table of an events source."""

    path: str = Field(description="Path relative to the spec")
    columns: list[DraftColumn] = Field(description="Device and entity columns")


class DraftSource(_Model):
    """One source of a party."""

    id: str = Field(description="Source id (from the file name)")
    kind: str = Field(description="table, text or events")
    grain: TableGrain | None = Field(default=None, description="Table grain")
    path: str = Field(description="Path relative to the spec")
    csv: DraftCsv | None = Field(default=None, description="CSV options, when not the defaults")
    row_number_key: bool = Field(default=False, description="The data row number is the key")
    columns: list[DraftColumn] = Field(description="Mapped columns")
    entity_map: DraftEntityMap | None = Field(default=None, description="Events: device map")
    notes: list[str] = Field(default_factory=list, description="Comments on the source")


class DraftParty(_Model):
    """One party; ``sources`` is None when it takes them from ``[defaults]``."""

    id: str = Field(description="Party id")
    store: str | None = Field(default=None, description="Store (None: from defaults)")
    imports: list[str] | None = Field(default=None, description="Export folders read")
    sources: list[DraftSource] | None = Field(default=None, description="Its sources")
    notes: list[str] = Field(default_factory=list, description="Comments (key choice)")


class DraftDefaults(_Model):
    """What parties exporting alike share (``{party}`` stands for the party id)."""

    store: str = Field(description="Store template")
    imports: list[str] | None = Field(default=None, description="Import folder templates")
    sources: list[DraftSource] | None = Field(default=None, description="Source templates")


class DraftVocabulary(_Model):
    """A category vocabulary, or the class names of a multiclass label (``classes``)."""

    name: str = Field(description="Canonical column name")
    values: list[str] = Field(description="Values kept (held by >= min_entities entities)")
    min_entities: int | None = Field(default=None, description="Threshold applied per party")
    held_back: int = Field(default=0, description="Distinct values left out (a count)")
    classes: bool = Field(default=False, description="Class names of the label (a plain list)")


class DraftLabel(_Model):
    """The label and what its values say."""

    column: str = Field(description="Canonical label column")
    party: str | None = Field(default=None, description="Label party (vertical)")
    positive: str | None = Field(default=None, description="Raw value that is class 1")
    negative: str | None = Field(
        default=None, description="Raw value that is class 0 (with positive: a values map)"
    )
    num_classes: int | None = Field(default=None, description="Multiclass class count")
    note: str | None = Field(default=None, description="Why this task")


class SpecDraft(_Model):
    """A drafted consortium spec, for :func:`render_toml`."""

    name: str = Field(description="Consortium name")
    layout: Layout = Field(description="Inferred or given layout")
    layout_note: str = Field(description="Why this layout")
    entity: str = Field(description="Canonical entity key")
    task: Objective = Field(description="Task from the label values")
    as_of: dt.date = Field(description="End of every feature window")
    label: DraftLabel = Field(description="The label")
    coordinator_store: str = Field(description="Coordinator store")
    vocabularies: list[DraftVocabulary] = Field(description="Vocabularies")
    defaults: DraftDefaults | None = Field(default=None, description="Shared party settings")
    parties: list[DraftParty] = Field(description="Parties")
    files: int = Field(description="Sample files read")


# -- columns -------------------------------------------------------------------------------


@dataclass
class Profile:
    """What one raw column looks like."""

    raw: str
    dtype: InferredType
    rows: int
    nulls: int
    distinct: int
    format: str | None = None
    aware: bool | None = None
    note: str | None = None

    @property
    def unique(self) -> bool:
        return self.rows > 0 and self.nulls == 0 and self.distinct == self.rows

    @property
    def repeats(self) -> int:
        """Values that repeat an earlier one."""
        return self.rows - self.nulls - self.distinct

    @property
    def near_unique(self) -> bool:
        """Unique and non-null but for at most 1% of the rows (quarantined by the pipeline)."""
        return self.rows > 0 and self.distinct > 0 and self.nulls + self.repeats <= self.rows // 100


def snake(name: str) -> str:
    """A canonical column name from a raw one: lowercase words joined by ``_``."""
    out = re.sub(r"[^a-z0-9]+", "_", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    out = out.strip("_")
    if not out:
        return "column"
    return f"c_{out}" if out[0].isdigit() else out


def unit_of(name: str) -> str | None:
    """The unit a raw column name states by its last word (``amt_cents`` -> cents)."""
    words = snake(name).split("_")
    unit = UNIT_SUFFIXES.get(words[-1])
    if unit is None and words[-1] in ("c", "f") and any("temp" in w for w in words):
        unit = words[-1].upper()
    return unit


def canonical_name(raw: str, unit: str | None) -> str:
    """The canonical name: the snake name, its unit word replaced by the canonical unit's."""
    name = snake(raw)
    if unit is None:
        return name
    words = name.split("_")[:-1]
    dimension = UNITS[unit].dimension
    suffix = CANONICAL_SUFFIX[dimension]
    if not words:  # the name is the unit alone ("minutes", "cents")
        words = ["amount" if dimension == "money" else dimension]
    return "_".join([*words, suffix] if suffix else words)


def _text(series: pl.Series) -> pl.Series:
    stripped = series.cast(pl.String).str.strip_chars()
    return stripped.filter(stripped.is_not_null() & (stripped != ""))


def _parsed(values: pl.Series, fmt: str, *, date: bool = False) -> int:
    """How many of ``values`` parse as dates or timestamps in ``fmt``."""
    try:
        parsed = (
            values.str.to_date(fmt, strict=False, exact=True)
            if date
            else values.str.to_datetime(fmt, strict=False, exact=True, time_unit="us")
        )
    except pl.exceptions.PolarsError:
        return 0
    return parsed.len() - parsed.null_count()


def _ambiguity(values: pl.Series, fmt: str, *, date: bool) -> str | None:
    """A remark when the values parse with day and month swapped too (all days <= 12)."""
    swapped = {"%m/%d": "%d/%m", "%d/%m": "%m/%d"}
    for a, b in swapped.items():
        other = b + fmt[len(a) :]
        if fmt.startswith(a) and _parsed(values, other, date=date) >= _parsed(
            values, fmt, date=date
        ):
            return f"day and month could be either way round in the samples; {a} assumed"
    return None


def _failing(bad: int, n: int, what: str) -> str | None:
    return f"{bad} of {n} values {what}: those rows are quarantined" if bad else None


def profile(series: pl.Series) -> Profile:
    """The inferred type of one raw column (:data:`InferredType`) with its counts."""
    rows = series.len()
    nulls = series.null_count()
    dtype = series.dtype
    if dtype == pl.Boolean:
        return Profile(series.name, "bool", rows, nulls, series.n_unique())
    if dtype.is_integer():
        return Profile(series.name, "int", rows, nulls, series.drop_nulls().n_unique())
    if dtype.is_float():
        return Profile(series.name, "float", rows, nulls, series.drop_nulls().n_unique())
    if dtype == pl.Date:
        return Profile(series.name, "date", rows, nulls, series.drop_nulls().n_unique())
    if isinstance(dtype, pl.Datetime):
        return Profile(
            series.name,
            "datetime",
            rows,
            nulls,
            series.drop_nulls().n_unique(),
            aware=dtype.time_zone is not None,
        )
    if dtype != pl.String:
        return Profile(
            series.name, "str", rows, nulls, 0, note=f"nested values ({dtype}); mapped as str"
        )
    values = _text(series)
    nulls = rows - values.len()
    n = values.len()
    distinct = values.n_unique()
    base = Profile(series.name, "str", rows, nulls, distinct)
    if n == 0:
        base.note = "all values missing"
        return base
    lowered = values.str.to_lowercase()
    if set(lowered.unique().to_list()) <= _BOOL_TEXT:
        base.dtype = "bool"
        return base
    # up to 1% of the values may fail their column's type (the pipeline quarantines them)
    tolerance = n // 100
    numbers = values.cast(pl.Float64, strict=False)
    numeric = n - numbers.null_count()
    if numeric and n - numeric <= tolerance:
        whole = values.filter(numbers.is_not_null()).str.contains(_INT_TEXT).all()
        base.dtype = "int" if whole else "float"
        base.note = _failing(n - numeric, n, "are not numbers")
        return base
    for date, formats in ((True, DATE_FORMATS), (False, DATETIME_FORMATS)):
        for fmt in formats:
            bad = n - _parsed(values, fmt, date=date)
            if bad > tolerance:
                continue
            base.dtype, base.format = ("date" if date else "datetime"), fmt
            base.aware = "%#z" in fmt
            notes = [_failing(bad, n, f"do not parse as {fmt}"), _ambiguity(values, fmt, date=date)]
            base.note = "; ".join(note for note in notes if note) or None
            return base
    if numeric:
        base.note = f"mixed: {numeric} of {n} values are numbers; mapped as str"
        return base
    stamps = max(_parsed(values, fmt) for fmt in DATETIME_FORMATS + DATE_FORMATS)
    if stamps * 2 >= n:
        base.note = f"mixed: {stamps} of {n} values are timestamps of one format; mapped as str"
        return base
    chars = values.str.len_chars().mean()
    words = values.str.count_matches(r"\s+").mean()
    mean_chars = float(chars) if isinstance(chars, int | float) else 0.0
    mean_words = float(words) + 1 if isinstance(words, int | float) else 1.0
    varied = distinct * 2 > n
    named = bool(_TEXT_NAME.search(snake(series.name)))
    wordy = mean_words >= TEXT_MEAN_WORDS
    if (
        mean_chars >= TEXT_MEAN_CHARS
        or (varied and (wordy or named))
        or (named and mean_words >= 3)
    ):
        base.dtype = "text"
    elif distinct <= MAX_CATEGORY_VALUES and distinct * 2 <= n:
        base.dtype = "category"
    return base


def _time_note(p: Profile) -> str | None:
    if p.dtype not in ("datetime", "date"):
        return None
    if p.aware:
        return "offsets in the data: converted to UTC"
    return "naive timestamps are read as UTC; set tz to the export's zone if local"


# -- files, keys and kinds -----------------------------------------------------------------


@dataclass
class _File:
    party: str
    sample: SampleFile
    profiles: dict[str, Profile]
    key: str | None = None
    key_share: float = 0.0
    role: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def frame(self) -> pl.DataFrame:
        return self.sample.frame

    def of(self, *types: str) -> list[Profile]:
        return [p for p in self.profiles.values() if p.dtype in types]


def _is_device(name: str) -> bool:
    return bool(_DEVICE_NAME.search(snake(name)))


def _key_like(p: Profile, *, repeated: bool = False) -> bool:
    """Whether the column may hold entity ids (``repeated``: in a file of several rows per
    entity, where ids may look like a category)."""
    types = _ID_TYPES if repeated else ("str", "int")
    return p.dtype in types and p.distinct > 0 and p.nulls * 100 <= p.rows and not _is_device(p.raw)


def _key_values(f: _File, raw: str) -> set[str]:
    return set(_text(f.frame[raw]).unique().to_list())


def _overlap(values: set[str], f: _File, raw: str) -> float:
    """Share of the distinct values of ``raw`` in ``f`` found in ``values`` (counts only)."""
    own = _key_values(f, raw)
    if not own:
        return 0.0
    return len(own & values) / len(own)


def _code_like(f: _File, raw: str) -> bool:
    """Whether the column holds short codes of one length in letters (``WV``, ``NY``): a
    category with a fixed alphabet, unique in a small file by chance only."""
    values = _text(f.frame[raw])
    if values.len() == 0:
        return False
    lengths = values.str.len_chars()
    return bool(
        lengths.n_unique() == 1
        and (lengths.max() or 0) <= 3  # type: ignore[operator]
        and values.str.contains(r"^[A-Za-z]+$").all()
    )


def _counter_like(f: _File, raw: str) -> bool:
    """Whether a unique integer column is a run of consecutive numbers (a row counter)."""
    numbers = _text(f.frame[raw]).cast(pl.Int64, strict=False).drop_nulls()
    if numbers.len() == 0:
        return False
    low, high = numbers.min(), numbers.max()
    return isinstance(low, int) and isinstance(high, int) and high - low + 1 == numbers.n_unique()


@dataclass(frozen=True)
class _Evidence:
    """Across the parties, how a raw column looks as a key."""

    #: Parties at which some file has it unique and non-null (near so).
    unique_at: int = 0
    #: Distinct values over those files (a column unique in a tiny sample is weak evidence).
    distinct: int = 0
    #: Parties holding the column at all.
    held_at: int = 0


def _evidence(files: dict[str, list[_File]]) -> dict[str, _Evidence]:
    unique: dict[str, set[str]] = {}
    distinct: Counter[str] = Counter()
    held: Counter[str] = Counter()
    for party, fs in files.items():
        for raw in {r for f in fs for r in f.profiles}:
            held[raw] += 1
        for f in fs:
            for p in f.profiles.values():
                if _key_like(p) and p.near_unique:
                    unique.setdefault(p.raw, set()).add(party)
                    distinct[p.raw] += p.distinct
    return {raw: _Evidence(len(unique.get(raw, ())), distinct[raw], n) for raw, n in held.items()}


def _candidate(f: _File, p: Profile, evidence: dict[str, _Evidence], parties: int) -> bool:
    """Whether the column may be the file's key: unique and non-null (near so), ids; an
    integer column only when named like a key, unique at every party (of several) or a
    run of consecutive numbers (unique amounts and counts are not keys)."""
    if not (_key_like(p) and p.near_unique):
        return False
    if p.dtype != "int" or _KEY_HINT.search(snake(p.raw)):
        return True
    seen = evidence.get(p.raw, _Evidence())
    return (parties > 1 and seen.unique_at == parties) or _counter_like(f, p.raw)


_Score = tuple[int, int, int, int, int, int, int, int]


def _score(
    f: _File,
    position: int,
    p: Profile,
    *,
    entity: str | None,
    in_files: int,
    evidence: dict[str, _Evidence],
) -> _Score:
    """Rank of a key candidate, best highest: named like ``entity``; not a short code; in
    most of the party's files; unique at most parties; held by most parties; named like a
    key; most distinct values; leftmost."""
    seen = evidence.get(p.raw, _Evidence())
    return (
        int(entity is not None and snake(p.raw) == snake(entity)),
        int(not _code_like(f, p.raw)),
        in_files,
        seen.unique_at,
        seen.held_at,
        int(bool(_KEY_HINT.search(snake(p.raw)))),
        seen.distinct,
        -position,
    )


def _assign_key(files: list[_File], raw: str, home: _File) -> None:
    """Set the key ``raw`` of ``home`` on the party's other files: the column of that name,
    or the column holding most of its values (half at least)."""
    values = _key_values(home, raw)
    home.key, home.key_share = raw, 1.0
    for f in files:
        if f is home:
            continue
        if raw in f.profiles and f.profiles[raw].distinct > 0:
            f.key, f.key_share = raw, _overlap(values, f, raw)
            continue
        # the key may have another name in this file: the column whose values it holds
        best = max(
            (
                (_overlap(values, f, p.raw), p.raw)
                for p in f.profiles.values()
                if _key_like(p, repeated=True)
            ),
            default=(0.0, ""),
        )
        if best[0] >= 0.5:
            f.key, f.key_share = best[1], best[0]


def _key_notes(files: list[_File], raw: str, home: _File, others: Iterable[str]) -> list[str]:
    p = home.profiles[raw]
    if p.unique:
        how = "unique and non-null"
    elif p.near_unique:
        how = "unique and non-null but for a few rows"
    else:
        how = f"not unique: {p.nulls} row(s) without it, {p.repeats} repeating one"
    where = home.sample.location.rsplit("/", 1)[-1]
    found = sum(f.key is not None for f in files)
    notes = [f"key: {raw!r} ({how} in {where}, found in {found} of {len(files)} file(s))"]
    rest = sorted(set(others) - {f.key for f in files})
    if rest:
        notes.append("other key candidates: " + ", ".join(repr(o) for o in rest))
    return notes


def _choose_key(
    files: list[_File], entity: str | None, evidence: dict[str, _Evidence], parties: int
) -> list[str]:
    """Set each file of one party to its key column (or none) and return the comments on
    the choice: the best candidate (:func:`_candidate`, :func:`_score`) of any file."""
    for f in files:
        f.key, f.key_share = None, 0.0
    candidates: list[tuple[_Score, str, _File]] = []
    for f in files:
        for position, p in enumerate(f.profiles.values()):
            if _candidate(f, p, evidence, parties):
                in_files = sum(p.raw in g.profiles for g in files)
                score = _score(f, position, p, entity=entity, in_files=in_files, evidence=evidence)
                candidates.append((score, p.raw, f))
    if not candidates:
        return ["key: no column is unique and non-null in any file of this party"]
    candidates.sort(key=lambda c: c[0], reverse=True)
    _, raw, home = candidates[0]
    _assign_key(files, raw, home)
    return _key_notes(files, raw, home, (name for _, name, _ in candidates[1:]))


def _choose_shared_key(
    files: dict[str, list[_File]], entity: str | None, evidence: dict[str, _Evidence]
) -> dict[str, list[str]]:
    """Horizontal layout: one key column for every party (the parties export the same
    entity), the best candidate over all parties' files; per party, the comments."""
    best: dict[str, _Score] = {}
    for fs in files.values():
        for f in fs:
            for position, p in enumerate(f.profiles.values()):
                if not _candidate(f, p, evidence, len(files)):
                    continue
                in_files = sum(p.raw in g.profiles for g in fs)
                score = _score(f, position, p, entity=entity, in_files=in_files, evidence=evidence)
                # a column's rank is its weakest file's: a code unique at one site stays a code
                best[p.raw] = min(best.get(p.raw, score), score)
    notes: dict[str, list[str]] = {}
    if not best:
        for party, fs in files.items():
            for f in fs:
                f.key, f.key_share = None, 0.0
            notes[party] = ["key: no column is unique and non-null at every party"]
        return notes
    ranked = sorted(best, key=lambda raw: (best[raw], raw), reverse=True)
    raw = ranked[0]
    for party, fs in files.items():
        for f in fs:
            f.key, f.key_share = None, 0.0
        holding = [f for f in fs if raw in f.profiles]
        if not holding:
            notes[party] = [f"key: {raw!r}, the key of the other parties, is in no file here"]
            continue
        home = max(holding, key=lambda f: (f.profiles[raw].near_unique, f.profiles[raw].distinct))
        _assign_key(fs, raw, home)
        notes[party] = _key_notes(fs, raw, home, ranked[1:])
    return notes


def _classify(f: _File, label: str, *, maps: bool = True) -> None:
    """Set the file's role: entity_map (unless ``maps`` is false), events, text (a file with
    free text, unless it holds the label), entity or transaction."""
    devices = [p for p in f.profiles.values() if _is_device(p.raw) and p.dtype in _ID_TYPES]
    times = f.of("datetime", "date")
    if maps and devices and f.key and len(f.profiles) == 2 and f.key != devices[0].raw:
        f.role = "entity_map"
    elif devices and times and f.of("int", "float", "bool"):
        f.role = "events"
    elif f.of("text") and label not in f.profiles:
        f.role = "text"
    elif f.key is None or f.profiles[f.key].near_unique:
        f.role = "entity"  # without a key column: one entity per data row
    else:
        f.role = "transaction"


def _pool_types(files: dict[str, list[_File]]) -> None:
    """Horizontal layout: type each column from all parties' values at once, so a small
    site's sample (where a category may look unique) gets the consortium's types."""
    held: dict[str, list[_File]] = {}
    for fs in files.values():
        for f in fs:
            for raw in f.profiles:
                held.setdefault(raw, []).append(f)
    for raw, holders in held.items():
        series = [f.frame[raw] for f in holders]
        if len(holders) < 2 or len({s.dtype for s in series}) > 1:
            continue
        pooled = profile(pl.concat(series))
        for f in holders:
            f.profiles[raw] = replace(
                f.profiles[raw],
                dtype=pooled.dtype,
                format=pooled.format,
                aware=pooled.aware,
                note=pooled.note,
            )


def _classify_all(files: dict[str, list[_File]], label: str) -> None:
    for fs in files.values():
        for f in fs:
            _classify(f, label)
        if not any(f.role == "events" for f in fs):  # a device map without events is a table
            for f in fs:
                if f.role == "entity_map":
                    _classify(f, label, maps=False)


def _spec_dtype(inferred: InferredType) -> ColumnType:
    """The spec dtype of an inferred type (free text is read as str)."""
    return "str" if inferred == "text" else inferred


def _column(
    name: str,
    p: Profile,
    *,
    dtype: ColumnType | None = None,
    required: bool = False,
    note: str | None = None,
) -> DraftColumn:
    chosen = dtype or _spec_dtype(p.dtype)
    unit = unit_of(p.raw) if chosen in ("int", "float") else None
    notes = [
        n for n in (p.note, _time_note(p) if chosen in ("datetime", "date") else None, note) if n
    ]
    if unit:
        notes.append(f"unit {unit} read from the column name")
    return DraftColumn(
        name=name,
        raw=p.raw,
        dtype="float" if unit and chosen == "int" else chosen,
        unit=unit,
        format=p.format if chosen in ("datetime", "date") else None,
        required=required,
        note="; ".join(notes) or None,
    )


def _pick(profiles: Iterable[Profile], pattern: re.Pattern[str]) -> Profile | None:
    listed = list(profiles)
    return next((p for p in listed if pattern.search(snake(p.raw))), listed[0] if listed else None)


def _unique_names(columns: list[DraftColumn]) -> list[DraftColumn]:
    seen: Counter[str] = Counter()
    out = []
    for c in columns:
        seen[c.name] += 1
        out.append(
            c if seen[c.name] == 1 else c.model_copy(update={"name": f"{c.name}_{seen[c.name]}"})
        )
    return out


# -- label ---------------------------------------------------------------------------------


@dataclass
class _LabelPlan:
    task: Objective
    dtype: ColumnType
    positive: str | None = None
    negative: str | None = None
    num_classes: int | None = None
    classes: list[str] | None = None
    note: str | None = None


def plan_label(raw: str, values: pl.Series) -> _LabelPlan:
    """The task and mapping a label's raw values (text, nulls dropped) call for."""
    values = _text(values)
    if values.len() == 0:
        raise DraftError(f"label column {raw!r} holds no value in the samples")
    counts = Counter(values.to_list())
    distinct = len(counts)
    if distinct == 1:
        raise DraftError(
            f"label column {raw!r} holds one value only in the samples; a label needs two "
            "values at least"
        )
    numbers = values.cast(pl.Float64, strict=False)
    if numbers.null_count() == 0:
        whole = values.str.contains(_INT_TEXT).all()
        seen = sorted({int(float(v)) for v in counts}) if whole else []
        if whole and set(seen) <= {0, 1}:
            return _LabelPlan("binary", "int", note="values 0 and 1")
        if set(numbers.unique().to_list()) <= {0.0, 1.0}:
            return _LabelPlan("binary", "float", note="values 0 and 1")
        if whole and 3 <= distinct <= MAX_LABEL_CLASSES and seen == list(range(distinct)):
            return _LabelPlan(
                "multiclass", "int", num_classes=distinct, note=f"classes 0..{distinct - 1}"
            )
        return _LabelPlan("regression", "float", note=f"{distinct} distinct numbers")
    lowered = {v.lower() for v in counts}
    if lowered <= {"true", "false"}:
        return _LabelPlan("binary", "bool", note="values true and false")
    if distinct == 2:
        # the rarer value; on a tie, one that reads as true (yes, 1, ...)
        (a, na), (b, nb) = sorted(
            counts.items(), key=lambda kv: (kv[1], kv[0].lower() not in TRUE_TEXT, kv[0])
        )
        return _LabelPlan(
            "binary",
            "str",
            positive=a,
            negative=b,
            note=f"the rarer value ({na} of {na + nb} rows) is class 1, the other class 0",
        )
    if distinct > MAX_LABEL_CLASSES:
        raise DraftError(
            f"label column {raw!r} holds {distinct} distinct text values (at most "
            f"{MAX_LABEL_CLASSES} classes are drafted); not a class label"
        )
    classes = [v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return _LabelPlan(
        "multiclass",
        "str",
        num_classes=distinct,
        classes=classes,
        note=f"{distinct} classes, listed under [vocabularies] by frequency",
    )


# -- sources -------------------------------------------------------------------------------


def _relative(location: str, folder: str) -> str:
    if is_uri(location):
        return location
    return posixpath.relpath(location.replace("\\", "/"), folder.replace("\\", "/"))


def _csv_options(sample: SampleFile) -> DraftCsv | None:
    d = sample.dialect
    if d is None:
        return None
    csv = DraftCsv(
        delimiter=d.delimiter if d.delimiter != "," else None,
        header=False if not d.header else None,
        names=list(sample.frame.columns) if not d.header else None,
        skip_rows=d.skip_rows or None,
        comment_prefix=d.comment_prefix,
        null_values=list(d.null_values) or None,
    )
    return csv if csv.model_dump(exclude_none=True) else None


def _source_notes(f: _File, mapped: set[str]) -> list[str]:
    notes = [*f.notes]
    s = f.sample
    if s.truncated:
        notes.append(f"drafted from the first {s.frame.height} rows of the file")
    if s.bad_lines:
        what = "row(s) with another field count" if s.dialect else "line(s) not a JSON object"
        notes.append(f"{s.bad_lines} {what} (quarantined)")
    if s.dialect is not None and not s.dialect.header:
        notes.append("no header: rename the columns in csv.names")
    left = [raw for raw in f.profiles if raw not in mapped]
    if left:
        notes.append("not mapped: " + ", ".join(repr(r) for r in left))
    return notes


def _build_source(
    f: _File,
    *,
    entity: str,
    label: str,
    label_raw: str | None,
    label_plan: _LabelPlan | None,
    label_name: str,
    folder: str,
    entity_map: _File | None,
    source_id: str,
    row_numbers: bool = True,
) -> DraftSource:
    """The draft of one source; without a key column its data row number is the entity id
    when ``row_numbers`` (else the user is told to choose a key)."""
    profiles = f.profiles
    cols: list[DraftColumn] = []
    key_col = (
        [_column(entity, profiles[f.key], dtype="str", required=True, note=None)] if f.key else []
    )
    grain: TableGrain | None = None
    emap: DraftEntityMap | None = None
    others = [p for p in profiles.values() if p.raw not in {f.key, label}]
    if f.role == "events":
        device = next(p for p in others if _is_device(p.raw) and p.dtype in _ID_TYPES)
        time = next(p for p in others if p.dtype in ("datetime", "date"))
        cols += [
            _column(DEVICE, device, dtype="str", required=True),
            _column(TIMESTAMP, time, dtype="datetime", required=True),
        ]
        for p in others:
            if p in (device, time):
                continue
            if p.dtype in ("int", "float"):
                cols.append(_column(canonical_name(p.raw, unit_of(p.raw)), p))
            elif p.dtype == "bool" and _ERROR_NAME.search(snake(p.raw)):
                cols.append(_column(ERROR, p))
        if entity_map is not None and entity_map.key:
            device_raw = next(r for r in entity_map.profiles if r != entity_map.key)
            emap = DraftEntityMap(
                path=_relative(entity_map.sample.location, folder),
                columns=[
                    _column(DEVICE, entity_map.profiles[device_raw], dtype="str"),
                    _column(entity, entity_map.profiles[entity_map.key], dtype="str"),
                ],
            )
        elif f.key:
            emap = DraftEntityMap(
                path=_relative(f.sample.location, folder),
                columns=[
                    _column(DEVICE, device, dtype="str"),
                    key_col[0].model_copy(update={"required": False}),
                ],
            )
        key_col = []
    elif f.role == "text":
        text = next(p for p in others if p.dtype == "text")
        cols.append(_column(TEXT, text, dtype="str", note="free text"))
        rating = _pick((p for p in others if p.dtype in ("int", "float")), _RATING_NAME)
        if rating is not None and _RATING_NAME.search(snake(rating.raw)):
            cols.append(_column(RATING, rating, dtype="float"))
        when = next((p for p in others if p.dtype in ("datetime", "date")), None)
        if when is not None:
            cols.append(_column(TIMESTAMP, when, dtype="datetime"))
    elif f.role == "entity":
        grain = "entity"
        for p in others:
            note = "free text: a text source of its own would use it" if p.dtype == "text" else None
            cols.append(_column(canonical_name(p.raw, unit_of(p.raw)), p, note=note))
    else:
        grain = "transaction"
        when = next((p for p in others if p.dtype in ("datetime", "date")), None)
        if when is None:
            f.notes.append("rows repeat the key but no timestamp column was found")
        else:
            cols.append(_column(TIMESTAMP, when, dtype="datetime", required=True))
        numeric = [p for p in others if p.dtype in ("int", "float")]
        amount = _pick(numeric, _AMOUNT_NAME)
        if amount is None:
            f.notes.append("no numeric column for the amount")
        else:
            guessed = None if _AMOUNT_NAME.search(snake(amount.raw)) else "amount guessed; check"
            cols.append(_column(AMOUNT, amount, dtype="float", required=True, note=guessed))
        category = _pick((p for p in others if p.dtype == "category"), re.compile(r"cat"))
        if category is not None:
            cols.append(_column(CATEGORY, category))
    if label_raw is not None and label_plan is not None:
        cols.append(DraftColumn(name=label_name, raw=label_raw, dtype=label_plan.dtype, note=None))
    columns = _unique_names(key_col + cols)
    mapped = {c.raw for c in columns} | (
        {c.raw for c in emap.columns}
        if emap and emap.path == _relative(f.sample.location, folder)
        else set()
    )
    notes = []
    numbered = f.key is None and f.role != "events" and row_numbers
    if f.key is None and f.role != "events" and not row_numbers:
        notes.append(
            "no key column: choose one (key = { columns = [...] }, or map it to the entity); "
            "row numbers would collide across the parties"
        )
    elif numbered:
        notes.append("no column is unique and non-null: the data row number is the entity id")
    elif f.role == "entity" and f.key is not None and not profiles[f.key].unique:
        key = profiles[f.key]
        notes.append(
            f"{key.nulls} row(s) without a key and {key.repeats} repeating one: quarantined"
        )
    elif f.key is not None and f.key_share < 1.0:
        notes.append(f"{f.key_share:.0%} of the key values are found in the party's key file")
    if f.role == "events" and emap is None:
        notes.append("the device is the entity: no device -> entity table was found")
    return DraftSource(
        id=source_id,
        kind="table" if f.role in ("entity", "transaction") else f.role,
        grain=grain,
        path=_relative(f.sample.location, folder),
        csv=_csv_options(f.sample),
        row_number_key=numbered,
        columns=columns,
        entity_map=emap,
        notes=notes + _source_notes(f, mapped),
    )


def _within(folder: str, store: str) -> bool:
    """Whether ``folder`` (relative to the spec, like ``store``) lies in the store."""
    if is_uri(folder):
        return False
    path = posixpath.normpath(folder)
    return path == store or path.startswith(store + "/")


def _source_id(location: str, taken: set[str]) -> str:
    stem = location.rsplit("/", 1)[-1].split(".", 1)[0]
    base = _SOURCE_ID.sub("_", stem).strip("_") or "source"
    out, n = base, 1
    while out in taken:
        n += 1
        out = f"{base}_{n}"
    taken.add(out)
    return out


# -- the draft -----------------------------------------------------------------------------


def _layout(files: dict[str, list[_File]], options: DraftOptions) -> tuple[Layout, str]:
    if options.layout is not None:
        return options.layout, "given"
    if options.label_party is not None:
        return "vertical", "a label party is given"
    if len(files) == 1:
        return "horizontal", "one party"
    names = {
        party: {snake(raw) for f in fs for raw in f.profiles if raw != f.key}
        for party, fs in files.items()
    }
    sets = list(names.values())
    # per pair, the share of the narrower party's columns (key aside) the other exports too
    shared = min(
        len(a & b) / max(min(len(a), len(b)), 1) for i, a in enumerate(sets) for b in sets[i + 1 :]
    )
    if shared >= 0.5:
        return "horizontal", f"the parties export the same columns ({shared:.0%} shared at least)"
    return "vertical", f"the parties share few columns besides the key ({shared:.0%})"


def _vocabulary(name: str, sites: list[tuple[pl.DataFrame, str, str]], k: int) -> DraftVocabulary:
    counts = []
    seen: set[str] = set()
    for frame, key, raw in sites:
        counts.append(entity_value_counts(frame, key=key, column=raw, min_entities=k))
        seen |= set(_text(frame[raw]).unique().to_list())
    values = merge_counts(counts)
    return DraftVocabulary(
        name=name, values=values, min_entities=k, held_back=len(seen) - len(values)
    )


def _template(source: DraftSource, party: str) -> DraftSource | None:
    """The source with the party id in its paths replaced by ``{party}`` (None: not there)."""

    def sub(path: str) -> str | None:
        parts = path.split("/")
        if party not in parts:
            return None
        return "/".join("{party}" if p == party else p for p in parts)

    path = sub(source.path)
    if path is None:
        return None
    emap = source.entity_map
    if emap is not None:
        emap_path = sub(emap.path)
        if emap_path is None:
            return None
        emap = emap.model_copy(update={"path": emap_path})
    return source.model_copy(update={"path": path, "entity_map": emap})


def _with_defaults(parties: list[DraftParty]) -> tuple[DraftDefaults | None, list[DraftParty]]:
    """Give the largest group (two or more) of parties whose sources and folders are alike
    once under ``[defaults]``."""
    store = "stores/{party}"
    groups: dict[str, list[int]] = {}
    templates: dict[str, list[tuple[list[DraftSource], list[str]]]] = {}
    for i, party in enumerate(parties):
        sources = [_template(s, party.id) for s in party.sources or []]
        imports = [
            "/".join("{party}" if p == party.id else p for p in folder.split("/"))
            for folder in party.imports or []
        ]
        if any(s is None for s in sources) or any("{party}" not in f for f in imports):
            continue
        listed = [s for s in sources if s is not None]
        # alike whatever the comments say (counts differ from party to party)
        signature = repr(([s.model_dump(exclude={"notes"}) for s in listed], imports))
        groups.setdefault(signature, []).append(i)
        templates.setdefault(signature, []).append((listed, imports))
    if not groups:
        return None, parties
    signature, members = max(groups.items(), key=lambda kv: len(kv[1]))
    if len(members) < 2:
        return None, parties
    alike = templates[signature]
    shared_imports = alike[0][1]
    shared_sources = [  # the comments every member's source has
        source.model_copy(
            update={"notes": [n for n in source.notes if all(n in s[j].notes for s, _ in alike)]}
        )
        for j, source in enumerate(alike[0][0])
    ]

    def own_notes(party: DraftParty) -> list[str]:
        """The party's source comments the defaults do not carry, named by source."""
        return [
            f"{source.id}: {note}"
            for source, shared in zip(party.sources or [], shared_sources, strict=True)
            for note in source.notes
            if note not in shared.notes
        ]

    out = [
        p.model_copy(
            update={
                "store": None,
                "imports": None,
                "sources": None,
                "notes": [*p.notes, *own_notes(p)],
            }
        )
        if i in members
        else p.model_copy(update={"store": None})
        for i, p in enumerate(parties)
    ]
    return DraftDefaults(store=store, imports=shared_imports, sources=shared_sources), out


def draft_spec(samples: Sequence[tuple[str, SampleFile]], options: DraftOptions) -> SpecDraft:
    """Draft a spec from the parties' sample files (``(party id, sample)`` pairs)."""
    if not samples:
        raise DraftError("no sample file given")
    given = Counter(sample.location for _, sample in samples)
    twice = sorted(location for location, n in given.items() if n > 1)
    if twice:
        raise DraftError(f"{twice[0]}: given {given[twice[0]]} times; give each file once")
    files: dict[str, list[_File]] = {}
    for party, sample in samples:
        profiles = {name: profile(sample.frame[name]) for name in sample.frame.columns}
        files.setdefault(party, []).append(_File(party, sample, profiles))
    if options.label_party is not None and options.label_party not in files:
        raise DraftError(f"--label-party {options.label_party!r} is not one of the parties")
    if options.label_party is not None and options.layout == "horizontal":
        raise DraftError(
            "--label-party applies to the vertical layout; in the horizontal one every party "
            "holds the label"
        )
    evidence = _evidence(files)
    key_notes = {
        party: _choose_key(fs, options.entity, evidence, len(files)) for party, fs in files.items()
    }
    _classify_all(files, options.label)
    layout, layout_note = _layout(files, options)
    shared_key = layout == "horizontal" and len(files) > 1
    if shared_key:  # the parties hold the same entity: one key column for all
        _pool_types(files)
        evidence = _evidence(files)
        key_notes = _choose_shared_key(files, options.entity, evidence)
        _classify_all(files, options.label)

    holders = []  # per party, its first file holding the label, one row per entity if any
    for party, fs in files.items():
        found = [f for f in fs if options.label in f.profiles]
        found.sort(key=lambda f: f.role != "entity")
        holders += [(party, found[0])] if found else []
    if not holders:
        raise DraftError(f"no sample file has the label column {options.label!r}")
    if layout == "vertical":
        label_party = options.label_party or holders[0][0]
        holders = [(party, f) for party, f in holders if party == label_party]
        if not holders:
            raise DraftError(
                f"party {label_party!r} has no file with the label column {options.label!r}"
            )
    else:
        label_party = None
        missing = sorted(set(files) - {party for party, _ in holders})
        if missing:
            raise DraftError(
                f"horizontal layout: part(ies) {missing} have no file with the label column "
                f"{options.label!r}; give --layout vertical if only one party holds it"
            )
    for _, f in holders:
        if f.role != "entity":
            raise DraftError(
                f"{f.sample.location}: the label column {options.label!r} must be in a file "
                "with one row per entity (its key unique and non-null)"
            )
    label_files = {id(f) for _, f in holders}
    plan = plan_label(options.label, pl.concat([_text(f.frame[options.label]) for _, f in holders]))
    label_name = snake(options.label)

    first_key = next(
        (
            f.key
            for fs in ([files[label_party]] if label_party else []) + list(files.values())
            for f in fs
            if f.key
        ),
        None,
    )
    entity = options.entity or (snake(first_key) if first_key else "entity_id")
    if entity == label_name:
        raise DraftError(f"the entity key and the label are one column ({options.label!r})")

    parties: list[DraftParty] = []
    category_sites: dict[str, list[tuple[pl.DataFrame, str, str]]] = {}
    for party, fs in files.items():
        maps = [f for f in fs if f.role == "entity_map"]
        taken: set[str] = set()
        sources = []
        for f in fs:
            if f.role == "entity_map":
                continue
            holds = id(f) in label_files
            source = _build_source(
                f,
                entity=entity,
                label=options.label,
                label_raw=options.label if holds else None,
                label_plan=plan if holds else None,
                label_name=label_name,
                folder=options.spec_folder,
                entity_map=maps[0] if maps and f.role == "events" else None,
                source_id=_source_id(f.sample.location, taken),
                row_numbers=not shared_key,
            )
            sources.append(source)
            frame = f.frame if f.key else f.frame.with_row_index("__row_key")
            key = f.key or "__row_key"
            for c in source.columns:
                if c.dtype == "category" and c.name != label_name:
                    category_sites.setdefault(c.name, []).append((frame, key, c.raw))
        folders = sorted(
            {
                posixpath.dirname(_relative(f.sample.location, options.spec_folder)) or "."
                for f in fs
            }
        )
        parties.append(
            DraftParty(
                id=party,
                store=f"stores/{party}",
                imports=[d for d in folders if not _within(d, f"stores/{party}")],
                sources=sources,
                notes=key_notes[party],
            )
        )
    vocabularies = [
        _vocabulary(name, sites, options.min_entities)
        for name, sites in sorted(category_sites.items())
    ]
    if plan.classes:
        vocabularies.append(DraftVocabulary(name=label_name, values=plan.classes, classes=True))
    defaults, parties = _with_defaults(parties)
    if defaults is None:
        parties = [p.model_copy(update={"store": f"stores/{p.id}"}) for p in parties]
    coordinator = "stores/coordinator" if "coordinator" not in files else "stores/_coordinator"
    return SpecDraft(
        name=options.name,
        layout=layout,
        layout_note=layout_note,
        entity=entity,
        task=plan.task,
        as_of=options.as_of,
        label=DraftLabel(
            column=label_name,
            party=label_party,
            positive=plan.positive,
            negative=plan.negative,
            num_classes=plan.num_classes,
            note=plan.note,
        ),
        coordinator_store=coordinator,
        vocabularies=vocabularies,
        defaults=defaults,
        parties=parties,
        files=len(samples),
    )


# -- TOML ----------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")


def toml_string(text: str) -> str:
    """A TOML basic string holding ``text`` exactly (quotes, backslashes and control
    characters escaped)."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else toml_string(key)


def toml_value(value: object) -> str:
    """A TOML inline value: a boolean, number, string, date, list or inline table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("a TOML value must be finite")
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _comment(text: str) -> str:
    """A one-line TOML comment (control characters dropped)."""
    return "# " + re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", " ", text)


def _line(key: str, value: object, note: str | None = None) -> str:
    line = f"{toml_key(key)} = {toml_value(value)}"
    return f"{line}  {_comment(note)}" if note else line


def _column_line(c: DraftColumn) -> str:
    table: dict[str, object] = {"from": c.raw, "dtype": c.dtype}
    if c.unit:
        table["unit"] = c.unit
    if c.format:
        table["format"] = c.format
    if c.required:
        table["required"] = True
    return _line(c.name, table, c.note)


def _source_lines(s: DraftSource, table: str) -> list[str]:
    lines = ["", f"[[{table}]]", *(_comment(n) for n in s.notes)]
    lines += [_line("id", s.id), _line("kind", s.kind)]
    if s.grain:
        lines.append(_line("grain", s.grain))
    lines.append(_line("path", s.path))
    try:
        infer_format(s.path)
    except ValueError:
        lines.append(_line("format", "csv"))
    if s.row_number_key:
        lines.append(_line("key", {"row_number": True}, "the 1-based data row number"))
    if s.csv is not None:
        lines.append(f"[{table}.csv]")
        lines += [_line(k, v) for k, v in s.csv.model_dump(exclude_none=True).items()]
    lines.append(f"[{table}.columns]")
    lines += [_column_line(c) for c in s.columns]
    if s.entity_map is not None:
        lines += [f"[{table}.entity_map]", _line("path", s.entity_map.path)]
        lines.append(f"[{table}.entity_map.columns]")
        lines += [_column_line(c) for c in s.entity_map.columns]
    return lines


def render_toml(draft: SpecDraft) -> str:
    """The draft as a spec file, with a comment on every guess."""
    parties = len(draft.parties)
    lines = [
        _comment(
            f"Drafted by fedfuse init from {draft.files} sample file(s) of {parties} "
            f"part{'y' if parties == 1 else 'ies'}; review every line, then run fedfuse validate."
        ),
        "",
        "[consortium]",
        _line("name", draft.name),
        _line("layout", draft.layout, draft.layout_note),
        _line("entity", draft.entity),
        _line("secret", {"env": "FEDFUSE_SECRET"}, "never the secret itself"),
        _line("task", draft.task, draft.label.note),
        f"as_of = {draft.as_of.isoformat()}  {_comment('end of every feature window')}",
        "",
        "[consortium.label]",
        _line("column", draft.label.column),
    ]
    if draft.label.party:
        lines.append(_line("party", draft.label.party))
    if draft.label.positive is not None and draft.label.negative is not None:
        # a map, not positive = ...: predictions show both values, and a third is quarantined
        values = {draft.label.positive: 1, draft.label.negative: 0}
        note = "a value outside is quarantined (or positive = ...: every other value is 0)"
        lines.append(_line("values", values, note))
    elif draft.label.positive is not None:
        lines.append(_line("positive", draft.label.positive, "every other value is class 0"))
    if draft.label.num_classes is not None:
        lines.append(_line("num_classes", draft.label.num_classes))
    lines += ["", "[coordinator]", _line("store", draft.coordinator_store)]
    if draft.layout == "vertical":
        lines += [
            "",
            "[fusion]",
            _comment(
                'choose how to train: mode = "rounds" with share_gradients = true, or '
                'mode = "one_shot" with share_labels = true (both share label information)'
            ),
        ]
    if draft.vocabularies:
        lines += ["", "[vocabularies]"]
        for v in draft.vocabularies:
            if v.classes:
                lines.append(_line(v.name, v.values, "the label's classes, in class order"))
                continue
            note = f"values held by at least {v.min_entities} entities at a party" + (
                f"; {v.held_back} value(s) held by fewer left out (mapped to other)"
                if v.held_back
                else ""
            )
            note += f" (or learn = true, min_entities = {v.min_entities}: learned at prepare)"
            table = {"values": v.values, "other": True}
            lines.append(_line(v.name, table, note))
    if draft.defaults is not None:
        d = draft.defaults
        lines += ["", _comment("what the parties exporting alike share ({party}: the party id)")]
        lines += ["[defaults]", _line("store", d.store)]
        if d.imports:
            lines.append(_line("imports", d.imports))
        for s in d.sources or []:
            lines += _source_lines(s, "defaults.sources")
    for p in draft.parties:
        lines += ["", "[[parties]]", *(_comment(n) for n in p.notes), _line("id", p.id)]
        if p.store is not None:
            lines.append(_line("store", p.store))
        if p.imports:
            lines.append(_line("imports", p.imports))
        for s in p.sources or []:
            lines += _source_lines(s, "parties.sources")
    return "\n".join(lines) + "\n"
