"""Consortium category vocabularies from the parties' thresholded value counts.

A party counts, per value of a category column, the *distinct entities* holding it, and only
values held by at least ``min_entities`` entities leave the party (a rarer value could
single out a customer). The coordinator adds the parties' counts and keeps the most frequent
values. Both ``fedfuse init`` (drafting a spec) and ``learn`` vocabularies use these two
functions. :func:`resolve_vocabularies` gives the one form every consumer reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl
from pydantic import BaseModel, Field

from tasks.spec.models import OTHER, VocabularySpec


def entity_value_counts(
    frame: pl.DataFrame, *, key: str, column: str, min_entities: int
) -> dict[str, int]:
    """Distinct entities per non-null, non-empty value of ``column``; values held by fewer
    than ``min_entities`` entities are left out. Values are compared as text."""
    if min_entities < 1:
        raise ValueError(f"min_entities must be at least 1, not {min_entities}")
    values = pl.col(column).cast(pl.String).str.strip_chars()
    counts = (
        frame.select(pl.col(key), values.alias(column))
        .filter(pl.col(key).is_not_null() & pl.col(column).is_not_null() & (pl.col(column) != ""))
        .unique()
        .group_by(column)
        .len(name="entities")
        .filter(pl.col("entities") >= min_entities)
    )
    return dict(zip(counts[column].to_list(), counts["entities"].to_list(), strict=True))


def merge_counts(counts: Sequence[Mapping[str, int]], *, max_size: int | None = None) -> list[str]:
    """The consortium vocabulary: values by total entity count (most first, ties by value),
    at most ``max_size`` of them."""
    total: dict[str, int] = {}
    for party in counts:
        for value, n in party.items():
            total[value] = total.get(value, 0) + n
    ranked = sorted(total, key=lambda value: (-total[value], value))
    return ranked if max_size is None else ranked[:max_size]


class VocabularyError(ValueError):
    """A vocabulary cannot be resolved or learned; the message names the column."""


class LearnedVocabularies(BaseModel):
    """The vocabularies learned at ``prepare``, as the coordinator stores them: values only
    (most frequent first), no counts and no party's contribution."""

    spec: str = Field(description="Vocabulary fingerprint of the spec they were learned for")
    columns: dict[str, list[str]] = Field(description="Learned values by canonical column")


def learned_from_counts(
    vocabularies: Mapping[str, VocabularySpec],
    counts: Sequence[Mapping[str, Mapping[str, int]]],
    *,
    spec: str,
) -> LearnedVocabularies:
    """Merge the parties' thresholded counts (column -> value -> entities) of every learned
    vocabulary; one that comes out empty is an error naming the column and its threshold."""
    columns: dict[str, list[str]] = {}
    for name, vocabulary in vocabularies.items():
        if not vocabulary.learn:
            continue
        values = merge_counts([c.get(name, {}) for c in counts], max_size=vocabulary.max_size)
        if not values:
            raise VocabularyError(
                f"vocabularies.{name}: learned an empty vocabulary: no value of '{name}' is "
                f"held by at least {vocabulary.min_entities} entities (min_entities) at any "
                "party; lower min_entities or list the values"
            )
        columns[name] = values
    return LearnedVocabularies(spec=spec, columns=columns)


def resolve_vocabularies(
    vocabularies: Mapping[str, VocabularySpec], learned: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """The one form every consumer reads: column -> values, listed or learned, with
    :data:`~tasks.spec.models.OTHER` last when ``other = true`` (the bucket is then a value
    like any other for features and codes); :func:`other_columns` tells which columns map
    values outside to it."""
    out: dict[str, list[str]] = {}
    for name, vocabulary in vocabularies.items():
        if vocabulary.values is not None:
            values = list(vocabulary.values)
        elif name in learned:
            values = list(learned[name])
        else:
            raise VocabularyError(
                f"vocabularies.{name}: learn = true, but no vocabulary was learned for this "
                "spec yet; run `fedfuse prepare` (or train) first"
            )
        if vocabulary.other and OTHER not in values:
            values.append(OTHER)
        out[name] = values
    return out


def other_columns(vocabularies: Mapping[str, VocabularySpec]) -> list[str]:
    """The columns whose values outside the vocabulary map to the other bucket: ``other =
    true``, or a value list holding ``other`` (a learned ``other`` is an ordinary value)."""
    return sorted(name for name, vocabulary in vocabularies.items() if vocabulary.has_other)
