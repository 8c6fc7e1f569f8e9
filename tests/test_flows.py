"""The prepare flow against a real Prefect server: fused tables, caching, privacy boundary."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tasks.types import ENTITY_HASH, LABEL
from tests.prefect_api import task_states

pytestmark = pytest.mark.prefect

RAW_IDS = {"C1", "C2", "C3", "C4", "c1", "c2", "c3", "c4", "b1", "b2", "b3", "d1", "d2", "d3"}


def test_prepare_fuses_every_party_and_reuses_cache(
    prefect_api: str, tiny_table_spec: Path, secret: str
) -> None:
    from flows.prepare import prepare

    state = prepare(str(tiny_table_spec), return_state=True)
    outputs = state.result()
    assert set(outputs) == {"a", "b"}
    fused_a = pl.read_parquet(outputs["a"].table.uri)
    assert fused_a.height == 4
    assert fused_a[LABEL].to_list().count(1.0) == 2
    assert {"txn__frequency", "profile__plan", "txn__share_grocery"} <= set(fused_a.columns)
    fused_b = pl.read_parquet(outputs["b"].table.uri)
    assert fused_b.height == 3 and fused_b[LABEL].sum() == 1.0

    again = prepare(str(tiny_table_spec), return_state=True)
    assert again.result()["a"].table == outputs["a"].table
    # every cached step of the second run was skipped
    states = task_states(again.state_details.flow_run_id)
    for name in ("preprocess-source", "extract-features", "align-source", "fuse-party"):
        assert states[name] and set(states[name]) == {"Cached"}, (name, states[name])


def test_raw_ids_never_leave_the_clean_layer(
    prefect_api: str, tiny_table_spec: Path, secret: str
) -> None:
    from flows.prepare import prepare

    outputs = prepare(str(tiny_table_spec))
    root = tiny_table_spec.parent
    for party in ("a", "b"):
        for layer in ("aligned", "fused"):
            for path in (root / "stores" / party / layer).glob("*.parquet"):
                frame = pl.read_parquet(path)
                for column, dtype in frame.schema.items():
                    if dtype == pl.String:
                        assert not RAW_IDS & set(frame[column].drop_nulls()), (path, column)
                assert frame[ENTITY_HASH].str.len_chars().unique().to_list() == [64]
    assert secret not in "".join(p.read_text(errors="ignore") for p in root.rglob("*.json"))
    assert outputs["a"].features
