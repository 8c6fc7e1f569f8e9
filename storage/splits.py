"""A source file split once into entity-hash shards (``[run] shards``).

Without it every shard would read the whole file, and compute every row's shard, to keep
its own rows. The file is read once, batch by batch (:func:`storage.sources.read_batches`);
each batch's rows go to their shard's part table as they come, then each shard's parts are
joined into one table in the party's store (``split/<source>.shard-<i>-of-<n>-<hash>.parquet``,
written atomically) and the parts removed (those a killed split left are swept by the
next). A shard's table holds its rows with the file's row numbers, as the file gave them (a
CSV or JSONL cell as text); the lines no reader could parse are kept in a table of their
own, for the first shard. Only one batch is held at a time.
"""

from __future__ import annotations

import polars as pl
from pydantic import BaseModel, Field

from storage.sources import ROW, RawSource, SourceBatches
from storage.store import Store, TableRef, read_table

_SHARD = "__shard"
_BAD = {"row": pl.Int64(), "text": pl.String(), "reason": pl.String()}


class SplitSource(BaseModel):
    """A source file's rows split into entity-hash shards (tables in the party's store)."""

    shards: list[TableRef] = Field(description="Each shard's rows, in shard order")
    bad_lines: TableRef | None = Field(
        default=None, description="The lines no reader could parse (the first shard's)"
    )
    columns: list[str] = Field(description="The file's columns in a whole read's order")


def split_batches(
    batches: SourceBatches, route: pl.Expr, count: int, store: Store, name: str
) -> SplitSource:
    """Route every batch's rows by ``route`` (the shard index of each row, 0-based; an
    expression over the file's columns, those a batch lacks being missing there) and write
    each shard's rows as one table ``split/<name>.shard-<i>-of-<count>``."""
    parts: list[list[TableRef]] = [[] for _ in range(count)]
    store.sweep("split", f"{name}.part-")  # the parts of a split killed before it ended
    try:
        for number, frame in enumerate(batches.frames):
            missing = [c for c in route.meta.root_names() if c not in frame.columns]
            shard = frame.with_columns(pl.lit(None, pl.String).alias(c) for c in missing).select(
                route.cast(pl.Int64).alias(_SHARD)
            )[_SHARD]
            for (index,), rows in (
                frame.with_columns(shard).partition_by(_SHARD, as_dict=True).items()
            ):
                parts[int(index)].append(
                    store.write_table(rows.drop(_SHARD), "split", f"{name}.part-{number}-{index}")
                )
        schema = {ROW: pl.Int64(), **batches.columns}
        tables = [
            store.concat_tables(shard_parts, "split", f"{name}.shard-{i + 1}-of-{count}")
            if shard_parts
            else store.write_table(
                pl.DataFrame(schema=schema), "split", f"{name}.shard-{i + 1}-of-{count}"
            )
            for i, shard_parts in enumerate(parts)
        ]
    finally:
        for ref in (ref for shard_parts in parts for ref in shard_parts):
            store.remove(ref)
    bad = (
        store.write_table(
            pl.DataFrame(batches.bad_lines, schema=_BAD, orient="row"), "split", f"{name}.bad-lines"
        )
        if batches.bad_lines
        else None
    )
    return SplitSource(
        shards=tables,
        bad_lines=bad,
        columns=list(batches.columns),
    )


def read_split(split: SplitSource, index: int) -> RawSource:
    """Shard ``index``'s rows (verified against their content hash) as a whole read would
    give them, filtered: the file's columns in its order (a column none of the shard's
    rows has is missing there), and the unparsable lines in the first shard."""
    frame = read_table(split.shards[index], verify=True)
    order = [ROW, *split.columns]
    frame = frame.with_columns(
        pl.lit(None, pl.String).alias(c) for c in order if c not in frame.columns
    ).select(order)
    bad: list[tuple[int, str, str]] = []
    if index == 0 and split.bad_lines is not None:
        lines = read_table(split.bad_lines, verify=True)
        bad = [(int(n), str(t), str(r)) for n, t, r in lines.iter_rows()]
    return RawSource(frame, bad, selected=True)
