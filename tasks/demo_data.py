"""A realistic heterogeneous demo consortium: spec plus raw party exports.

One latent churn propensity ``z`` per customer drives every modality, each observing it
through its own independent noise, so every modality carries signal alone and the fused
table predicts better than any single one:

* customers (one row per customer): churn label, plan, region, signup date, age;
* transactions: frequency, spend and recency fall with ``z``; churners' activity fades over
  the last 90 days;
* feedback (English and Chinese free text, ratings): sentiment falls with ``z``;
* IoT usage events: usage declines over the window and errors rise with ``z``.

Each party exports in its own way (column names, CSV in cents with a local time zone or
Parquet in currency units, its own category codes). Customers are generated and written in
chunks with a per-chunk seeded generator, so the same seed gives the same bytes and 1M
customers / 50M events fit in a few GiB.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from storage.raw_writer import ChunkedWriter, write_toml
from tasks.links import sigmoid

logger = logging.getLogger(__name__)

AS_OF = dt.date(2026, 6, 30)
CHUNK = 50_000
HISTORY_DAYS = 180
EVENT_DAYS = 90
PLANS = ["basic", "plus", "premium"]
REGIONS = ["north", "south", "east", "west"]
CATEGORIES = ["grocery", "electronics", "fashion", "travel", "other"]

POSITIVE_EN = [
    "Great service, the app works perfectly.",
    "Really happy with my plan, support was quick and friendly.",
    "Excellent value, I would recommend it to friends.",
    "Love the new features, everything is smooth.",
]
NEUTRAL_EN = [
    "The app is okay, nothing special.",
    "Delivery arrived on the expected day.",
    "I changed my address in the settings.",
]
NEGATIVE_EN = [
    "Terrible support, I waited for hours and nobody helped.",
    "The app keeps crashing, I'm thinking of cancelling.",
    "Too expensive for what you get, very disappointed.",
    "Awful experience, I want a refund.",
]
POSITIVE_ZH = [
    "服务很好，非常满意。",
    "质量不错，推荐购买。",
    "太棒了，客服很热情。",
    "速度很快，很喜欢。",
]
NEUTRAL_ZH = ["还可以吧，一般般。", "今天收到了包裹。", "我修改了账户信息。"]
NEGATIVE_ZH = [
    "太差了，很失望，要退款。",
    "客服态度恶劣，不推荐。",
    "质量很差，不满意。",
    "太慢了，准备换一家。",
]
EMOJI = ["😡😡", "👍", "🙂🙂🙂", "😞", "❤️"]


@dataclass(frozen=True)
class Style:
    """How one party exports its data."""

    customers: Literal["csv", "parquet"]
    transactions: Literal["csv", "parquet"]
    tz: str
    chinese_share: float
    events_unit: Literal["Wh", "kWh"]


STYLES = [
    Style("csv", "csv", "America/New_York", 0.15, "Wh"),
    Style("parquet", "parquet", "UTC", 0.5, "kWh"),
    Style("csv", "csv", "Asia/Shanghai", 0.8, "Wh"),
]


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, *parts])


# --------------------------------------------------------------------------------------
# Who is where: latent propensity, labels and party membership
# --------------------------------------------------------------------------------------


@dataclass
class Population:
    z: np.ndarray  # latent churn propensity
    churn: np.ndarray  # bool
    party: np.ndarray  # horizontal: party index per customer
    known: np.ndarray  # vertical: (n, 3) bool, which party knows the customer


def population(n: int, *, layout: str, parties: int, seed: int, alpha: float | None) -> Population:
    rng = _rng(seed, 0)
    z = rng.normal(size=n)
    if layout == "vertical":
        churn = rng.random(n) < sigmoid(-1.7 + 1.6 * z)
        known = np.column_stack([rng.random(n) < 0.92, rng.random(n) < 0.8, rng.random(n) < 0.72])
        return Population(z, churn, np.zeros(n, dtype=np.int64), known)
    if alpha is not None:
        churn = rng.random(n) < sigmoid(-1.7 + 1.6 * z)
        party = np.empty(n, dtype=np.int64)
        for label in (False, True):
            idx = np.flatnonzero(churn == label)
            share = rng.dirichlet(np.full(parties, alpha))
            party[idx] = rng.choice(parties, size=len(idx), p=share)
    else:
        share = np.geomspace(1.0, 0.5, parties)
        party = rng.choice(parties, size=n, p=share / share.sum())
        intercept = -1.7 + np.linspace(-0.35, 0.35, parties)[party]
        churn = rng.random(n) < sigmoid(intercept + 1.6 * z)
    return Population(z, churn, party, np.ones((n, 1), dtype=bool))


# --------------------------------------------------------------------------------------
# Modalities (one chunk of customers at a time)
# --------------------------------------------------------------------------------------


def _noisy(z: np.ndarray, rng: np.random.Generator, noise: float = 1.0) -> np.ndarray:
    return np.asarray(z + noise * rng.normal(size=len(z)))


def customers_frame(
    ids: list[str], z: np.ndarray, churn: np.ndarray, rng: np.random.Generator
) -> pl.DataFrame:
    zc = _noisy(z, rng, 1.6)
    plan_idx = np.clip(np.round(1.0 - 0.45 * zc + rng.normal(size=len(z)) * 0.6), 0, 2).astype(int)
    tenure = rng.gamma(2.0, 300.0 * np.exp(-0.25 * zc)) + 10
    signup = [AS_OF - dt.timedelta(days=int(d)) for d in tenure]
    return pl.DataFrame(
        {
            "id": ids,
            "churn": churn,
            "plan": [PLANS[i] for i in plan_idx],
            "region": [REGIONS[i] for i in rng.integers(0, 4, len(z))],
            "signup": signup,
            "age": np.clip(np.round(42 + 12 * rng.normal(size=len(z)) - 2.0 * zc), 18, 90).astype(
                np.int64
            ),
        }
    )


def transactions_frame(ids: list[str], z: np.ndarray, rng: np.random.Generator) -> pl.DataFrame:
    zt = _noisy(z, rng)
    counts = rng.poisson(np.exp(2.2 - 0.45 * zt))
    owner = np.repeat(np.arange(len(z)), counts)
    zo = zt[owner]
    # churners' activity fades: their purchases crowd towards the start of the history
    u = rng.random(len(owner)) ** np.exp(-0.45 * zo)
    days_ago = HISTORY_DAYS * (1.0 - u) + rng.random(len(owner))
    end = dt.datetime.combine(AS_OF, dt.time(23, 59), tzinfo=dt.UTC)
    stamps = np.datetime64(end.replace(tzinfo=None), "ms") - (days_ago * 86_400_000).astype(
        "timedelta64[ms]"
    )
    amount = np.round(rng.gamma(2.0, 22.0 * np.exp(-0.2 * zo)), 2) + 1.0
    cat_p = np.array([0.35, 0.25, 0.2, 0.1, 0.1])
    category = rng.choice(len(CATEGORIES), size=len(owner), p=cat_p)
    travel = (zo < -0.5) & (rng.random(len(owner)) < 0.2)
    category = np.where(travel, 3, category)
    return pl.DataFrame(
        {
            "id": [ids[i] for i in owner],
            "ts": pl.Series(stamps).dt.replace_time_zone("UTC"),
            "amount": amount,
            "category": [CATEGORIES[i] for i in category],
        }
    )


def feedback_frame(
    ids: list[str], z: np.ndarray, rng: np.random.Generator, chinese: float
) -> pl.DataFrame:
    zf = _noisy(z, rng)
    counts = rng.poisson(0.9, size=len(z))
    owner = np.repeat(np.arange(len(z)), counts)
    s = -zf[owner] + 0.6 * rng.normal(size=len(owner))
    zh = rng.random(len(owner)) < chinese
    texts: list[str | None] = []
    for i in range(len(owner)):
        bank = (
            (POSITIVE_ZH if zh[i] else POSITIVE_EN)
            if s[i] > 0.5
            else (NEGATIVE_ZH if zh[i] else NEGATIVE_EN)
            if s[i] < -0.5
            else (NEUTRAL_ZH if zh[i] else NEUTRAL_EN)
        )
        texts.append(bank[int(rng.integers(0, len(bank)))])
    kind = rng.random(len(owner))
    for e in np.flatnonzero(kind < 0.02).tolist():
        texts[e] = ""
    for e in np.flatnonzero((kind >= 0.02) & (kind < 0.03)).tolist():
        texts[e] = EMOJI[int(rng.integers(0, len(EMOJI)))]
    for e in np.flatnonzero((kind >= 0.03) & (kind < 0.035)).tolist():
        texts[e] = " ".join([texts[e] or "", *(["The order history page is slow to load."] * 120)])
    rating = np.clip(np.round(3.0 + 1.1 * s + 0.5 * rng.normal(size=len(owner))), 1, 5)
    rating_list: list[float | None] = [float(r) for r in rating]
    for e in np.flatnonzero(rng.random(len(owner)) < 0.05).tolist():
        rating_list[e] = None
    days_ago = rng.uniform(0, HISTORY_DAYS, size=len(owner))
    end = dt.datetime.combine(AS_OF, dt.time(23, 0), tzinfo=dt.UTC)
    stamps = [end - dt.timedelta(days=float(d)) for d in days_ago]
    return pl.DataFrame(
        {"id": [ids[i] for i in owner], "text": texts, "rating": rating_list, "ts": stamps},
        schema={
            "id": pl.String,
            "text": pl.String,
            "rating": pl.Float64,
            "ts": pl.Datetime("us", "UTC"),
        },
    )


def events_frames(
    ids: list[str], z: np.ndarray, rng: np.random.Generator, density: float, prefix: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(events keyed by device, device -> customer map)."""
    ze = _noisy(z, rng)
    devices = rng.poisson(1.1, size=len(z))
    owner = np.repeat(np.arange(len(z)), devices)
    device_ids = [f"{prefix}-{ids[o]}-{k}" for o, k in zip(owner, _ranks(owner), strict=True)]
    per_device = rng.poisson(density, size=len(owner))
    dev = np.repeat(np.arange(len(owner)), per_device)
    zd = ze[owner][dev]
    # gaps: each device is silent for a random stretch
    days_ago = rng.uniform(0, EVENT_DAYS, size=len(dev))
    gap_start = rng.uniform(0, EVENT_DAYS, size=len(owner))[dev]
    gap_len = rng.exponential(6.0 * np.exp(0.4 * zd))
    keep = ~((days_ago > gap_start) & (days_ago < gap_start + gap_len))
    dev, zd, days_ago = dev[keep], zd[keep], days_ago[keep]
    trend = 1.0 - 0.004 * zd * (EVENT_DAYS - days_ago)
    usage = np.maximum(rng.gamma(4.0, 0.6, size=len(dev)) * trend * np.exp(-0.15 * zd), 0.0)
    temp = 21.0 + 2.0 * rng.normal(size=len(dev)) + 0.8 * zd
    error = rng.random(len(dev)) < sigmoid(-3.2 + 0.9 * zd)
    usage_list: list[float | None] = usage.round(4).tolist()
    for e in np.flatnonzero(rng.random(len(dev)) < 0.03).tolist():
        usage_list[e] = None
    end = dt.datetime.combine(AS_OF, dt.time(23, 59), tzinfo=dt.UTC)
    stamps = np.datetime64(end.replace(tzinfo=None), "ms") - (days_ago * 86_400_000).astype(
        "timedelta64[ms]"
    )
    status = np.where(error, "ERR", np.where(rng.random(len(dev)) < 0.05, "WARN", "OK"))
    events = pl.DataFrame(
        {
            "device": [device_ids[i] for i in dev],
            "ts": pl.Series(stamps).dt.replace_time_zone("UTC"),
            "usage_kwh": pl.Series(usage_list, dtype=pl.Float64),
            "temperature_c": temp.round(2),
            "status": status,
        }
    ).sort("ts", "device")
    mapping = pl.DataFrame({"device": device_ids, "owner": [ids[o] for o in owner]})
    return events, mapping


def _ranks(owner: np.ndarray) -> list[int]:
    out: list[int] = []
    last, k = -1, 0
    for value in owner.tolist():
        k = k + 1 if value == last else 0
        last = value
        out.append(k)
    return out


# --------------------------------------------------------------------------------------
# Party exports: each party's own names, units, time zones and codes
# --------------------------------------------------------------------------------------

PLAN_CODES = {"basic": "Bronze", "plus": "Silver", "premium": "Gold"}
CAT_CODES = {
    "grocery": "GROC",
    "electronics": "ELEC",
    "fashion": "FASH",
    "travel": "TRVL",
    "other": "MISC",
}


def _local(ts: pl.Series, tz: str, fmt: str) -> pl.Series:
    return ts.dt.convert_time_zone(tz).dt.strftime(fmt)


def export_customers(frame: pl.DataFrame, style: Style) -> pl.DataFrame:
    if style.customers == "csv":
        return frame.select(
            pl.col("id").alias("CustomerID"),
            pl.when(pl.col("churn")).then(pl.lit("yes")).otherwise(pl.lit("no")).alias("Churn"),
            pl.col("plan").replace_strict(PLAN_CODES).alias("Plan"),
            pl.col("region").str.to_uppercase().alias("Region"),
            pl.col("signup").dt.strftime("%Y-%m-%d").alias("SignupDate"),
            pl.col("age").alias("Age"),
        )
    return frame.select(
        pl.col("id").alias("customer"),
        pl.col("churn").alias("churned"),
        pl.col("plan").alias("tier"),
        pl.col("region"),
        pl.col("signup").alias("signup_date"),
        pl.col("age").cast(pl.Int32),
    )


def export_transactions(frame: pl.DataFrame, style: Style) -> pl.DataFrame:
    if style.transactions == "csv":
        fmt = "%m/%d/%Y %H:%M" if style.tz == "America/New_York" else "%Y/%m/%d %H:%M:%S"
        return frame.select(
            pl.col("id").alias("cust_ref"),
            _local(frame["ts"], style.tz, fmt).alias("txn_time"),
            (pl.col("amount") * 100).round(0).cast(pl.Int64).alias("amt_cents"),
            pl.col("category").replace_strict(CAT_CODES).alias("cat"),
        )
    return frame.select(
        pl.col("id").alias("customer"),
        pl.col("ts").alias("booked_at"),
        pl.col("amount").alias("value"),
        pl.col("category"),
    )


def export_feedback(
    frame: pl.DataFrame, style: Style, *, vertical_ids: bool = False
) -> pl.DataFrame:
    ids = pl.col("id")
    if vertical_ids:  # party B's own key format: upper case, padded
        ids = pl.concat_str(pl.lit("  "), ids.str.to_uppercase(), pl.lit(" "))
    offset = {"America/New_York": "-04:00", "UTC": "+00:00", "Asia/Shanghai": "+08:00"}[style.tz]
    return frame.select(
        ids.alias("user"),
        pl.col("text").alias("comment"),
        pl.col("rating").alias("stars"),
        (_local(frame["ts"], style.tz, "%Y-%m-%dT%H:%M:%S") + pl.lit(offset)).alias("created_at")
        if style.tz != "America/New_York"
        else frame["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ").alias("created_at"),
    )


def export_events(frame: pl.DataFrame, style: Style) -> pl.DataFrame:
    usage = pl.col("usage_kwh") * 1000 if style.events_unit == "Wh" else pl.col("usage_kwh")
    return frame.select(
        pl.col("device").alias("dev"),
        pl.col("ts"),
        usage.alias("usage_wh" if style.events_unit == "Wh" else "usage_kwh"),
        (pl.col("temperature_c") * 9 / 5 + 32).round(2).alias("temp_f"),
        pl.col("status"),
    )


def corrupt_csv_lines(
    frame: pl.DataFrame, rng: np.random.Generator, share: float = 0.003
) -> list[bytes]:
    """A few malformed rows and exact duplicates, as real exports have."""
    if frame.height == 0:
        return []
    picks = rng.choice(frame.height, size=max(1, int(frame.height * share)), replace=False)
    lines: list[bytes] = []
    columns = frame.columns
    for n, i in enumerate(sorted(picks.tolist())):
        row = [str(v) if v is not None else "" for v in frame.row(i)]
        kind = n % 4
        if kind == 1 and "amt_cents" in columns:
            row[columns.index("amt_cents")] = "12,5x"
        elif kind == 2 and "txn_time" in columns:
            row[columns.index("txn_time")] = "not a date"
        elif kind == 3:
            row[0] = ""
        lines.append(",".join(row).encode())  # kind 0: exact duplicate
    return lines


# --------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------


def _col(source: str, dtype: str, **extra: Any) -> dict[str, Any]:
    return {"from": source, "dtype": dtype, **extra}


def customers_source(party: str, style: Style, *, label: bool = True) -> dict[str, Any]:
    if style.customers == "csv":
        columns = {
            "customer_id": _col("CustomerID", "str"),
            "plan": _col("Plan", "category", values={v: k for k, v in PLAN_CODES.items()}),
            "region": _col("Region", "category", values={r.upper(): r for r in REGIONS}),
            "signup": _col("SignupDate", "date"),
            "age": _col("Age", "int"),
        }
        if label:
            columns["churned"] = _col("Churn", "bool", values={"yes": "true", "no": "false"})
        path = f"stores/{party}/raw/customers.csv"
    else:
        columns = {
            "customer_id": _col("customer", "str"),
            "plan": _col("tier", "category"),
            "region": _col("region", "category"),
            "signup": _col("signup_date", "date"),
            "age": _col("age", "int"),
        }
        if label:
            columns["churned"] = _col("churned", "bool")
        path = f"stores/{party}/raw/customers.parquet"
    return {"id": "customers", "kind": "table", "grain": "entity", "path": path, "columns": columns}


def transactions_source(party: str, style: Style) -> dict[str, Any]:
    if style.transactions == "csv":
        fmt = "%m/%d/%Y %H:%M" if style.tz == "America/New_York" else "%Y/%m/%d %H:%M:%S"
        columns = {
            "customer_id": _col("cust_ref", "str", required=True),
            "timestamp": _col("txn_time", "datetime", tz=style.tz, format=fmt, required=True),
            "amount": _col("amt_cents", "float", unit="cents", required=True),
            "category": _col("cat", "category", values={v: k for k, v in CAT_CODES.items()}),
        }
        path = f"stores/{party}/raw/transactions.csv"
    else:
        columns = {
            "customer_id": _col("customer", "str", required=True),
            "timestamp": _col("booked_at", "datetime", required=True),
            "amount": _col("value", "float", unit="currency", required=True),
            "category": _col("category", "category"),
        }
        path = f"stores/{party}/raw/transactions.parquet"
    return {
        "id": "transactions",
        "kind": "table",
        "grain": "transaction",
        "path": path,
        "columns": columns,
        "features": {"windows": [30, 90]},
    }


def feedback_source(party: str) -> dict[str, Any]:
    return {
        "id": "feedback",
        "kind": "text",
        "path": f"stores/{party}/raw/feedback.jsonl",
        "columns": {
            "customer_id": _col("user", "str", required=True),
            "text": _col("comment", "str"),
            "rating": _col("stars", "float"),
            "timestamp": _col("created_at", "datetime"),
        },
        "features": {"text_width": 16},
    }


def events_source(party: str, style: Style) -> dict[str, Any]:
    usage = (
        _col("usage_wh", "float", unit="Wh")
        if style.events_unit == "Wh"
        else _col("usage_kwh", "float")
    )
    return {
        "id": "iot",
        "kind": "events",
        "path": f"stores/{party}/raw/events.parquet",
        "columns": {
            "device_id": _col("dev", "str", required=True),
            "timestamp": _col("ts", "datetime", required=True),
            "usage_kwh": usage,
            "temperature": _col("temp_f", "float", unit="F"),
            "error": _col("status", "bool", values={"ERR": "true", "OK": "false", "WARN": "false"}),
        },
        "entity_map": {
            "path": f"stores/{party}/raw/devices.csv",
            "columns": {"device_id": _col("device", "str"), "customer_id": _col("owner", "str")},
        },
        "features": {"windows": [7, 30]},
    }


def spec_document(
    layout: str,
    party_ids: list[str],
    sources: dict[str, list[dict[str, Any]]],
    *,
    party_pools: bool = False,
) -> dict[str, Any]:
    label: dict[str, Any] = {"column": "churned"}
    if layout == "vertical":
        label["party"] = party_ids[0]
    return {
        "consortium": {
            "name": f"demo-{layout}",
            "layout": layout,
            "entity": "customer_id",
            "key_normalisation": "strip_lower",
            "secret": {"env": "FEDFUSE_SECRET"},
            "task": "binary",
            "as_of": AS_OF,
            "label": label,
        },
        "coordinator": {"store": "stores/coordinator"},
        "vocabularies": {"plan": PLANS, "region": REGIONS, "category": CATEGORIES},
        "parties": [
            {
                "id": p,
                "store": f"stores/{p}",
                **({"work_pool": f"fedfuse-{p.lower()}"} if party_pools else {}),
                "sources": sources[p],
            }
            for p in party_ids
        ],
        # party B fits its text block on its feedback texts against round-1 gradients
        **(
            {
                "fusion": {"mode": "rounds", "share_gradients": True, "min_overlap": 10},
                "text": {"model": True},
            }
            if layout == "vertical"
            # the feedback texts feed the consortium TF-IDF vocabulary and text model
            else {"text": {"model": True, "min_parties": min(2, len(party_ids))}}
        ),
        "training": {
            "rounds": 12,
            "trees_per_round": 8,
            "learning_rate": 0.1,
            "num_leaves": 15,
            "patience": 3,
        },
    }


# --------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------


def _chunks(n: int) -> Iterator[tuple[int, int, int]]:
    for index, start in enumerate(range(0, n, CHUNK)):
        yield index, start, min(start + CHUNK, n)


def write_demo_consortium(
    out: str,
    *,
    layout: Literal["horizontal", "vertical"] = "horizontal",
    parties: int = 3,
    customers: int = 5000,
    seed: int = 0,
    alpha: float | None = None,
    events_per_device: float = 20.0,
    party_pools: bool = False,
) -> str:
    """Write ``OUT/spec.toml`` and every party's raw exports; return the spec path.

    ``party_pools`` gives every party its own work pool ``fedfuse-<party>`` in the spec."""
    root = Path(out)
    k = 3 if layout == "vertical" else parties
    party_ids = (
        ["A", "B", "C"] if layout == "vertical" else [f"site-{chr(ord('a') + i)}" for i in range(k)]
    )
    styles = {p: STYLES[i % len(STYLES)] for i, p in enumerate(party_ids)}
    pop = population(customers, layout=layout, parties=k, seed=seed, alpha=alpha)
    sources: dict[str, list[dict[str, Any]]] = {}
    writers: dict[tuple[str, str], ChunkedWriter] = {}

    def writer(party: str, name: str, fmt: str) -> ChunkedWriter:
        key = (party, name)
        if key not in writers:
            writers[key] = ChunkedWriter(root / "stores" / party / "raw" / f"{name}.{fmt}", fmt)
        return writers[key]

    if layout == "vertical":
        a, b, c = party_ids
        sources = {
            a: [customers_source(a, STYLES[0]), transactions_source(a, STYLES[0])],
            b: [feedback_source(b)],
            c: [events_source(c, STYLES[0])],
        }
    else:
        sources = {
            p: [
                customers_source(p, styles[p]),
                transactions_source(p, styles[p]),
                feedback_source(p),
                events_source(p, styles[p]),
            ]
            for p in party_ids
        }
    try:
        for index, start, stop in _chunks(customers):
            ids_all = np.arange(start, stop)
            for j, party in enumerate(party_ids):
                style = styles[party]
                if layout == "vertical":
                    mask = pop.known[start:stop, j]
                else:
                    mask = pop.party[start:stop] == j
                rows = ids_all[mask]
                if len(rows) == 0:
                    continue
                ids = [f"c{r:07d}" for r in rows]
                z, churn = pop.z[rows], pop.churn[rows]
                rng = _rng(seed, 1 + index, j)
                modalities = {s["id"] for s in sources[party]}
                if "customers" in modalities:
                    w = writer(party, "customers", style.customers)
                    w.write(export_customers(customers_frame(ids, z, churn, rng), style))
                if "transactions" in modalities:
                    frame = export_transactions(transactions_frame(ids, z, rng), style)
                    w = writer(party, "transactions", style.transactions)
                    w.write(frame)
                    if style.transactions == "csv":
                        w.write_lines(corrupt_csv_lines(frame, rng))
                if "feedback" in modalities:
                    chinese = 0.5 if layout == "vertical" else style.chinese_share
                    frame = feedback_frame(ids, z, rng, chinese)
                    writer(party, "feedback", "jsonl").write(
                        export_feedback(frame, style, vertical_ids=layout == "vertical")
                    )
                if "iot" in modalities:
                    events, mapping = events_frames(ids, z, rng, events_per_device, f"d{j}")
                    writer(party, "events", "parquet").write(export_events(events, style))
                    writer(party, "devices", "csv").write(mapping)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    spec = root / "spec.toml"
    write_toml(spec, spec_document(layout, party_ids, sources, party_pools=party_pools))
    logger.info("demo consortium with %d customers written to %s", customers, root)
    return str(spec)
