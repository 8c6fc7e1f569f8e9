from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from tasks.demo_data import write_demo_consortium
from tasks.spec.load import load_spec


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    write_demo_consortium(str(tmp_path / "a"), customers=800, seed=3)
    write_demo_consortium(str(tmp_path / "b"), customers=800, seed=3)
    write_demo_consortium(str(tmp_path / "c"), customers=800, seed=4)
    a, b, c = (_digests(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k != "spec.toml")


@pytest.mark.parametrize("layout", ["horizontal", "vertical"])
def test_spec_is_valid_and_files_exist(tmp_path: Path, layout: str) -> None:
    spec = load_spec(write_demo_consortium(str(tmp_path), layout=layout, customers=600))  # type: ignore[arg-type]
    assert spec.consortium.layout == layout
    for party in spec.parties:
        for source in party.sources:
            assert Path(source.path).is_file(), source.path
            if source.entity_map:
                assert Path(source.entity_map.path).is_file()
    assert not list(tmp_path.rglob(".*.tmp"))


def test_horizontal_sites_hold_disjoint_customers_and_differ(tmp_path: Path) -> None:
    write_demo_consortium(str(tmp_path), customers=3000, parties=3, seed=1)
    raw = tmp_path / "stores"
    a = pl.read_csv(raw / "site-a" / "raw" / "customers.csv")
    b = pl.read_parquet(raw / "site-b" / "raw" / "customers.parquet")
    c = pl.read_csv(raw / "site-c" / "raw" / "customers.csv")
    ids = [set(a["CustomerID"]), set(b["customer"]), set(c["CustomerID"])]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert len(ids[0]) > len(ids[1]) > len(ids[2])
    assert 0.1 < (a["Churn"] == "yes").mean() < 0.35  # type: ignore[operator]


def test_dirichlet_label_skew(tmp_path: Path) -> None:
    write_demo_consortium(str(tmp_path), customers=4000, parties=3, seed=2, alpha=0.3)
    raw = tmp_path / "stores"
    rates = [
        (pl.read_csv(raw / "site-a" / "raw" / "customers.csv")["Churn"] == "yes").mean(),
        pl.read_parquet(raw / "site-b" / "raw" / "customers.parquet")["churned"].mean(),
        (pl.read_csv(raw / "site-c" / "raw" / "customers.csv")["Churn"] == "yes").mean(),
    ]
    assert max(rates) - min(rates) > 0.15  # type: ignore[operator]


def test_vertical_overlap_and_key_formats(tmp_path: Path) -> None:
    write_demo_consortium(str(tmp_path), layout="vertical", customers=3000, seed=5)
    raw = tmp_path / "stores"
    a = set(pl.read_csv(raw / "A" / "raw" / "customers.csv")["CustomerID"])
    b_raw = pl.read_ndjson(raw / "B" / "raw" / "feedback.jsonl")["user"]
    assert b_raw.str.starts_with(" ").all()  # B exports its own key format
    b = set(b_raw.str.strip_chars().str.to_lowercase())
    c = set(pl.read_csv(raw / "C" / "raw" / "devices.csv")["owner"])
    assert 0.4 < len(a & b) / len(a) < 0.9
    assert 0.3 < len(a & c) / len(a) < 0.9
    assert b - a and c - a  # customers A does not know


def test_every_modality_carries_signal(tmp_path: Path) -> None:
    write_demo_consortium(str(tmp_path), customers=6000, parties=1, seed=7)
    raw = tmp_path / "stores" / "site-a" / "raw"
    labels = pl.read_csv(raw / "customers.csv").select(
        pl.col("CustomerID").alias("id"), (pl.col("Churn") == "yes").alias("y")
    )
    txn = (
        pl.read_csv(raw / "transactions.csv", infer_schema=False, truncate_ragged_lines=True)
        .group_by(pl.col("cust_ref").alias("id"))
        .agg(pl.len().alias("x"))
    )
    text = (
        pl.read_ndjson(raw / "feedback.jsonl")
        .group_by(pl.col("user").alias("id"))
        .agg(pl.col("stars").mean().alias("x"))
    )
    devices = pl.read_csv(raw / "devices.csv")
    events = (
        pl.read_parquet(raw / "events.parquet")
        .join(devices, left_on="dev", right_on="device")
        .group_by(pl.col("owner").alias("id"))
        .agg((pl.col("status") == "ERR").mean().alias("x"))
    )
    for name, frame, sign in (
        ("transactions", txn, -1),
        ("feedback", text, -1),
        ("events", events, 1),
    ):
        joined = labels.join(frame, on="id").drop_nulls()
        auc = roc_auc_score(joined["y"].to_numpy(), sign * joined["x"].cast(pl.Float64).to_numpy())
        assert auc > 0.6, (name, auc)


def test_fused_table_beats_every_single_modality(tmp_path: Path, secret: str) -> None:
    """Through the real pipeline steps: each modality alone has signal, fused has more."""
    import lightgbm as lgb

    from flows.prepare import text_model_settings
    from storage.runs import text_model_ref, write_text_model
    from storage.store import Store
    from tasks.prepare.steps import PartyContext, run_party, run_text_model

    spec_path = tmp_path / "spec.toml"
    write_demo_consortium(str(tmp_path), customers=8000, parties=1, seed=11)
    spec_path.write_text(spec_path.read_text().replace("FEDFUSE_SECRET", "FEDFUSE_TEST_SECRET"))
    spec = load_spec(str(spec_path))
    # the text party's features hold the consortium text model's out-of-fold score
    sources = spec.party("site-a").sources
    model = run_text_model(
        {"site-a": (PartyContext.from_spec(spec, "site-a"), sources)},
        spec.text,
        text_model_settings(spec),
        spec=spec.text_fingerprint(),
    )
    coordinator = Store(spec.coordinator.store)
    write_text_model(coordinator, spec.text_fingerprint(), model)
    ref = text_model_ref(coordinator, spec.text_fingerprint())
    ctx = PartyContext.from_spec(spec, "site-a", text_model=ref)
    fused = pl.read_parquet(run_party(ctx, sources).table.uri)
    assert fused["text__model_score"].drop_nulls().len() > 0
    u = (fused["entity_hash"].str.slice(0, 8).str.to_integer(base=16) / 2**32).to_numpy()
    y = fused["label"].to_numpy()
    params = {
        "objective": "binary",
        "verbose": -1,
        "learning_rate": 0.05,
        "num_leaves": 15,
        "min_data_in_leaf": 30,
        "num_threads": 1,
        "deterministic": True,
    }

    def auc(prefixes: set[str]) -> float:
        cols = [c for c in fused.columns if c.split("__")[0] in prefixes]
        x = fused.select(cols).to_numpy().astype(float)
        model = lgb.train(params, lgb.Dataset(x[u >= 0.3], y[u >= 0.3]), 150)
        return float(roc_auc_score(y[u < 0.3], model.predict(x[u < 0.3])))

    single = {m: auc({m}) for m in ("profile", "txn", "text", "events")}
    combined = auc({"profile", "txn", "text", "events"})
    assert all(a > 0.55 for a in single.values()), single
    assert combined > max(single.values()) + 0.02, (combined, single)


def test_demo_default_size_follows_the_layout() -> None:
    """The vertical demo aligns about a fifth of its customers, so it starts from more;
    an explicit size wins for both layouts."""
    from flows.cli.commands import demo_customers

    assert demo_customers("horizontal", None) == 5000
    assert demo_customers("vertical", None) == 20_000
    assert demo_customers("vertical", 77) == demo_customers("horizontal", 77) == 77
