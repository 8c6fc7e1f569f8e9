"""Tiny hand-made consortia for tests (a few rows per source, real files in real formats)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

SPEC_HEAD = """
[consortium]
name = "tiny"
layout = "horizontal"
entity = "customer_id"
secret = {{ env = "FEDFUSE_TEST_SECRET" }}
task = "binary"
as_of = 2026-03-31
label = {{ column = "churned" }}

[coordinator]
store = "stores/coordinator"

[vocabularies]
category = ["grocery", "electronics", "other"]
plan = ["basic", "plus"]
"""

PARTY_A = """
[[parties]]
id = "a"
store = "stores/a"
imports = ["raw/a"]

[[parties.sources]]
id = "customers"
kind = "table"
grain = "entity"
path = "raw/a/customers.csv"
[parties.sources.columns]
customer_id = {{ from = "CustID", dtype = "str" }}
churned = {{ from = "Churn", dtype = "bool", values = {{ yes = "true", no = "false" }} }}
plan = {{ from = "Plan", dtype = "category", values = {{ B = "basic", P = "plus" }} }}
signup = {{ from = "Joined", dtype = "date" }}

[[parties.sources]]
id = "transactions"
kind = "table"
grain = "transaction"
path = "raw/a/transactions.csv"
[parties.sources.columns]
customer_id = {{ from = "cust", dtype = "str", required = true }}
timestamp = {{ from = "when", dtype = "datetime", tz = "America/New_York", format = "%m/%d/%Y %H:%M", required = true }}
amount = {{ from = "amt_cents", dtype = "float", unit = "cents", required = true }}
category = {{ from = "cat", dtype = "category", values = {{ groc = "grocery", elec = "electronics" }} }}
{extra_a}
"""

PARTY_B = """
[[parties]]
id = "b"
store = "stores/b"
imports = ["raw/b"]

[[parties.sources]]
id = "accounts"
kind = "table"
grain = "entity"
path = "raw/b/accounts.parquet"
[parties.sources.columns]
customer_id = {{ from = "id", dtype = "str" }}
churned = {{ from = "left", dtype = "bool" }}
plan = {{ from = "tier", dtype = "category" }}

[[parties.sources]]
id = "orders"
kind = "table"
grain = "transaction"
path = "raw/b/orders.parquet"
[parties.sources.columns]
customer_id = {{ from = "id", dtype = "str", required = true }}
timestamp = {{ from = "ts", dtype = "datetime", required = true }}
amount = {{ from = "value", dtype = "float", unit = "currency", required = true }}
"""

TEXT_A = """
[[parties.sources]]
id = "feedback"
kind = "text"
path = "raw/a/feedback.jsonl"
[parties.sources.columns]
customer_id = { from = "user", dtype = "str", required = true }
text = { from = "comment", dtype = "str" }
rating = { from = "stars", dtype = "float" }
timestamp = { from = "at", dtype = "datetime" }

[[parties.sources]]
id = "iot"
kind = "events"
path = "raw/a/events.parquet"
[parties.sources.columns]
device_id = { from = "dev", dtype = "str", required = true }
timestamp = { from = "ts", dtype = "datetime", required = true }
usage_kwh = { from = "wh", dtype = "float", unit = "Wh" }
error = { from = "status", dtype = "bool", values = { ERR = "true", OK = "false" } }
[parties.sources.entity_map]
path = "raw/a/devices.csv"
[parties.sources.entity_map.columns]
device_id = { from = "device", dtype = "str" }
customer_id = { from = "owner", dtype = "str" }
"""

CUSTOMERS_A = "CustID,Churn,Plan,Joined\nC1,yes,B,2025-01-10\nC2,no,P,2025-02-11\nC3,no,B,2025-03-12\nC4,yes,P,2025-04-13\n"
TRANSACTIONS_A = (
    "cust,when,amt_cents,cat\n"
    "C1,01/05/2026 10:00,1250,groc\n"
    "C1,03/01/2026 09:30,800,elec\n"
    "C2,03/20/2026 18:00,4599,elec\n"
    "C2,03/20/2026 18:00,4599,elec\n"
    "C3,02/14/2026 12:00,300,groc\n"
    "C4,12/24/2025 08:00,10000,groc\n"
)


def feedback_lines() -> list[dict[str, Any]]:
    return [
        {
            "user": "C1",
            "comment": "Terrible service, I am cancelling",
            "stars": 1,
            "at": "2026-03-01T10:00:00+01:00",
        },
        {
            "user": "C2",
            "comment": "服务很好，非常满意",
            "stars": 5,
            "at": "2026-03-02T10:00:00+08:00",
        },
        {"user": "C3", "comment": "", "stars": 3, "at": "2026-03-03T10:00:00Z"},
        {"user": "C4", "comment": "😡😡", "stars": None, "at": "2026-03-04T10:00:00Z"},
    ]


def write_tiny(root: Path, *, with_text_events: bool = True) -> Path:
    """Write a 2-party consortium under ``root`` and return its spec path."""
    (root / "raw" / "a").mkdir(parents=True)
    (root / "raw" / "b").mkdir(parents=True)
    (root / "raw" / "a" / "customers.csv").write_text(CUSTOMERS_A)
    (root / "raw" / "a" / "transactions.csv").write_text(TRANSACTIONS_A)
    pl.DataFrame(
        {"id": ["b1", "b2", "b3"], "left": [True, False, False], "tier": ["basic", "plus", "plus"]}
    ).write_parquet(root / "raw" / "b" / "accounts.parquet")
    pl.DataFrame(
        {
            "id": ["b1", "b2", "b2", "b3"],
            "ts": pl.Series(
                ["2026-01-01 10:00", "2026-03-01 10:00", "2026-03-30 10:00", "2026-02-01 10:00"]
            ).str.to_datetime("%Y-%m-%d %H:%M", time_zone="UTC"),
            "value": [10.0, 25.5, 30.0, 7.25],
        }
    ).write_parquet(root / "raw" / "b" / "orders.parquet")
    extra = ""
    if with_text_events:
        extra = TEXT_A
        with (root / "raw" / "a" / "feedback.jsonl").open("w", encoding="utf-8") as handle:
            for line in feedback_lines():
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        pl.DataFrame(
            {
                "dev": ["d1", "d1", "d2", "d3", "d3"],
                "ts": pl.Series(
                    ["2026-03-01", "2026-03-05", "2026-03-02", "2026-03-10", "2026-03-20"]
                ).str.to_datetime("%Y-%m-%d", time_zone="UTC"),
                "wh": [1500.0, None, 800.0, 200.0, 250.0],
                "status": ["OK", "ERR", "OK", "OK", "OK"],
            }
        ).write_parquet(root / "raw" / "a" / "events.parquet")
        (root / "raw" / "a" / "devices.csv").write_text("device,owner\nd1,C1\nd2,C2\nd3,C3\n")
    spec = root / "spec.toml"
    spec.write_text(SPEC_HEAD.format() + PARTY_A.format(extra_a=extra) + PARTY_B.format())
    return spec


LABEL_MAPPING_A = (
    'churned = { from = "Churn", dtype = "bool", values = { yes = "true", no = "false" } }'
)


def set_label_cells(spec_path: Path, cells: dict[str, str], *, dtype: str = "float") -> Path:
    """Give party a's customers export (of :func:`write_tiny`) numeric labels in ``Churn``
    (1/0 for yes/no), the labels of ``cells`` (raw customer id -> cell text) as given, and map
    the label as ``dtype`` in the spec. Returns the customers file."""
    spec = spec_path.read_text()
    assert LABEL_MAPPING_A in spec
    spec_path.write_text(
        spec.replace(LABEL_MAPPING_A, f'churned = {{ from = "Churn", dtype = "{dtype}" }}')
    )
    head, *rows = CUSTOMERS_A.strip().split("\n")
    lines = [head]
    for row in rows:
        cust, churn, rest = row.split(",", maxsplit=2)
        lines.append(",".join([cust, cells.get(cust, "1" if churn == "yes" else "0"), rest]))
    path = spec_path.parent / "raw" / "a" / "customers.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_synthetic(
    root: Path,
    *,
    customers: int = 600,
    parties: int = 2,
    seed: int = 0,
    label_shift: Sequence[float] | None = None,
) -> Path:
    """A table-only horizontal consortium with signal in both sources (for training tests);
    ``label_shift`` adds a per-party offset to the churn log-odds (label skew)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    blocks = []
    for p in range(parties):
        pid = f"p{p}"
        (root / "raw" / pid).mkdir(parents=True)
        n = customers // parties + 37 * p
        z = rng.normal(size=n)
        shift = label_shift[p] if label_shift is not None else 0.0
        churn = rng.random(n) < 1 / (1 + np.exp(-(1.5 * z - 1.0 + shift)))
        ids = [f"{pid}-{i}" for i in range(n)]
        pl.DataFrame(
            {
                "id": ids,
                "churn": churn,
                "plan": rng.choice(["basic", "plus"], size=n).tolist(),
                "age": (40 + 8 * rng.normal(size=n) - 3 * z).round(0),
            }
        ).write_parquet(root / "raw" / pid / "customers.parquet")
        counts = rng.poisson(np.exp(1.6 - 0.6 * z))
        owner = np.repeat(np.arange(n), counts)
        days = rng.uniform(0, 120, size=len(owner)) * (1 + 0.5 * np.clip(z[owner], 0, None))
        pl.DataFrame(
            {
                "id": [ids[i] for i in owner],
                "ts": pl.Series(
                    np.datetime64("2026-03-31T23:00:00", "ms")
                    - (days * 86_400_000).astype("timedelta64[ms]")
                ).dt.replace_time_zone("UTC"),
                "value": np.round(rng.gamma(2.0, 20.0 * np.exp(-0.3 * z[owner])), 2),
            }
        ).write_parquet(root / "raw" / pid / "orders.parquet")
        blocks.append(
            f"""
[[parties]]
id = "{pid}"
store = "stores/{pid}"
imports = ["raw/{pid}"]

[[parties.sources]]
id = "customers"
kind = "table"
grain = "entity"
path = "raw/{pid}/customers.parquet"
[parties.sources.columns]
customer_id = {{ from = "id", dtype = "str" }}
churned = {{ from = "churn", dtype = "bool" }}
plan = {{ from = "plan", dtype = "category" }}
age = {{ from = "age", dtype = "float" }}

[[parties.sources]]
id = "orders"
kind = "table"
grain = "transaction"
path = "raw/{pid}/orders.parquet"
[parties.sources.columns]
customer_id = {{ from = "id", dtype = "str", required = true }}
timestamp = {{ from = "ts", dtype = "datetime", required = true }}
amount = {{ from = "value", dtype = "float", required = true }}
"""
        )
    head = SPEC_HEAD.format().replace('name = "tiny"', 'name = "synthetic"')
    training = """
[training]
rounds = 6
trees_per_round = 3
patience = 3
min_data_in_leaf = 10
num_leaves = 7
"""
    spec = root / "spec.toml"
    spec.write_text(head + "".join(blocks) + training)
    return spec
