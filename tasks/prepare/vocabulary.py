"""Consortium category vocabularies from the parties' thresholded value counts.

A party counts, per value of a category column, the *distinct entities* holding it, and only
values held by at least ``min_entities`` entities leave the party (a rarer value could
single out a customer). The coordinator adds the parties' counts and keeps the most frequent
values. Both ``fedfuse init`` (drafting a spec) and ``learn`` vocabularies use these two
functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import polars as pl


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
