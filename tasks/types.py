"""Option aliases shared by the spec, the tasks and the flows."""

from __future__ import annotations

from typing import Literal

Layout = Literal["horizontal", "vertical"]
Objective = Literal["binary", "multiclass", "regression"]
#: A source's kind (its modality): a registered modality of :mod:`tasks.prepare.modalities`
#: (table, text, events, ...), checked against that registry by the spec.
SourceKind = str
TableGrain = Literal["entity", "transaction"]
FileFormat = Literal["csv", "parquet", "jsonl", "arrow"]
ColumnType = Literal["str", "int", "float", "bool", "datetime", "date", "category"]
JoinKind = Literal["inner", "left"]
#: An aggregation strategy's name: a module of :mod:`tasks.horizontal.strategies` (samples, uniform,
#: lr_scaled, cyclic, ...), checked against that registry by the spec.
Aggregation = str
KeyNormalisation = Literal["none", "strip", "strip_lower"]
#: Where a source's feature windows end: the end of the ``as_of`` day, or per entity at its
#: last event (inclusive).
WindowEnd = Literal["as_of", "last_event"]

#: Canonical column names every source kind understands (besides the entity key).
TIMESTAMP = "timestamp"
AMOUNT = "amount"
CATEGORY = "category"
TEXT = "text"
RATING = "rating"
DEVICE = "device_id"
ERROR = "error"

#: Name of the hashed entity key column after alignment.
ENTITY_HASH = "entity_hash"
#: Name of the label column in fused tables.
LABEL = "label"
#: Column of the label source's clean, aligned and fused tables holding each entity's split
#: (``train``, ``valid``, ``test``) when a split column or a test file decides it.
SPLIT = "__split"
#: Column added to quarantined rows.
REASON = "reject_reason"
