from __future__ import annotations

import datetime as dt
import hashlib
import hmac

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tasks.prepare.align import AlignError, align_features, fuse_tables, hash_keys
from tasks.prepare.modalities.table import entity_attributes, transaction_features
from tasks.spec.models import ColumnSpec
from tasks.types import ENTITY_HASH, LABEL

SECRET = b"s3cret"


def _h(key: str) -> str:
    return hmac.new(SECRET, key.encode(), hashlib.sha256).hexdigest()


def test_hash_keys_is_hmac_sha256() -> None:
    out = hash_keys(pl.Series(["c1", None, "中文"]), SECRET)
    assert out.to_list() == [_h("c1"), None, _h("中文")]
    with pytest.raises(ValueError, match="secret is empty"):
        hash_keys(pl.Series(["x"]), b"")


def test_align_names_dtypes_vocabulary_and_label() -> None:
    features = pl.DataFrame(
        {
            "customer_id": ["c2", "c1"],
            "churned": [True, False],
            "plan": ["plus", "gold"],
            "age": [30, 41],
        }
    )
    aligned, schema = align_features(
        features,
        entity="customer_id",
        party="a",
        source="customers",
        modality="table",
        prefix="profile",
        secret=SECRET,
        vocabularies={"plan": ["basic", "plus"]},
        label_column="churned",
    )
    expected = pl.DataFrame(
        {
            ENTITY_HASH: [_h("c2"), _h("c1")],
            LABEL: [1.0, 0.0],
            "profile__plan": pl.Series([1, None], dtype=pl.Int32),
            "profile__age": [30.0, 41.0],
        }
    ).sort(ENTITY_HASH)
    assert_frame_equal(aligned, expected)
    assert [(c.name, c.dtype, c.vocabulary) for c in schema] == [
        ("profile__plan", "category", ["basic", "plus"]),
        ("profile__age", "float", None),
    ]


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_align_refuses_unusable_labels_naming_party_and_source(bad: float | None) -> None:
    features = pl.DataFrame({"customer_id": ["c1", "c2"], "churned": [1.0, bad], "age": [1, 2]})
    with pytest.raises(
        AlignError,
        match=r"^a/customers: label 'churned' is missing, NaN or infinite in 1 row\(s\)",
    ):
        align_features(
            features,
            entity="customer_id",
            party="a",
            source="customers",
            modality="table",
            prefix="profile",
            secret=SECRET,
            vocabularies={},
            label_column="churned",
        )


def _aligned(keys: list[str], **cols: list[float]) -> pl.DataFrame:
    return pl.DataFrame({ENTITY_HASH: keys, **cols})


def test_fuse_left_keeps_labelled_entities_and_validates() -> None:
    labels = _aligned(["k1", "k2", "k3"], label=[1.0, 0.0, 0.0], p__x=[1.0, 2.0, 3.0])
    txn = _aligned(["k1", "k3", "k9"], t__n=[5.0, 6.0, 7.0])
    fused = fuse_tables({"customers": labels, "txn": txn}, join="left")
    assert fused[ENTITY_HASH].to_list() == ["k1", "k2", "k3"]
    assert fused["t__n"].to_list() == [5.0, None, 6.0]
    inner = fuse_tables({"customers": labels, "txn": txn}, join="inner")
    assert inner[ENTITY_HASH].to_list() == ["k1", "k3"]
    with pytest.raises(AlignError, match="duplicate entity key"):
        fuse_tables(
            {"customers": labels, "txn": _aligned(["k1", "k1"], t__n=[1.0, 2.0])}, join="left"
        )
    with pytest.raises(AlignError, match="column 'p__x' is in both"):
        fuse_tables({"customers": labels, "other": _aligned(["k1"], p__x=[1.0])}, join="left")


def test_fuse_without_label_uses_union_of_keys() -> None:
    a = _aligned(["k2", "k1"], t__a=[1.0, 2.0])
    b = _aligned(["k3"], e__b=[3.0])
    fused = fuse_tables({"a": a, "b": b}, join="left")
    assert fused[ENTITY_HASH].to_list() == ["k1", "k2", "k3"]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_fuse_refuses_non_finite_features_naming_column_and_rows(bad: float) -> None:
    labels = _aligned(["k1", "k2", "k3"], label=[1.0, 0.0, 0.0], p__x=[1.0, 2.0, 3.0])
    iot = _aligned(["k1", "k2", "k3"], e__max=[bad, 2.0, bad], e__ok=[None, 1.0, 2.0])
    with pytest.raises(AlignError) as info:
        fuse_tables({"customers": labels, "iot": iot}, join="left")
    assert str(info.value) == (
        "aligned table 'iot': non-finite values (inf, -inf or NaN) in column(s) "
        "'e__max' (2 row(s)); features must be finite, null where missing"
    )
    # null is how features say "missing": accepted, and a join's missing rows are null too
    fused = fuse_tables({"customers": labels, "iot": _aligned(["k1"], e__max=[None])}, join="left")
    assert fused["e__max"].to_list() == [None, None, None]


def test_transaction_features_windows_and_shares() -> None:
    ts = [
        dt.datetime(2026, 3, 30, tzinfo=dt.UTC),
        dt.datetime(2026, 3, 2, tzinfo=dt.UTC),
        dt.datetime(2026, 1, 15, tzinfo=dt.UTC),
        dt.datetime(2026, 4, 2, tzinfo=dt.UTC),  # after as_of: ignored
    ]
    clean = pl.DataFrame(
        {
            "customer_id": ["c1"] * 4,
            "timestamp": ts,
            "amount": [10.0, 30.0, 60.0, 1000.0],
            "category": ["grocery", "travel", "grocery", "grocery"],
        }
    )
    out = transaction_features(
        clean,
        entity="customer_id",
        as_of=dt.date(2026, 3, 31),
        windows=[30, 90],
        categories=["grocery", "travel"],
    ).row(0, named=True)
    assert out["frequency"] == 3
    assert out["monetary"] == 100.0
    assert out["recency_days"] == 2.0
    assert out["count_30d"] == 2  # 2 Mar 00:00 is exactly 30 days before 1 Apr 00:00: included
    assert out["amount_90d"] == 100.0
    assert out["count_trend"] == pytest.approx(2 / 30 - 1 / 60)
    assert out["share_grocery"] == pytest.approx(0.7)
    assert out["share_travel"] == pytest.approx(0.3)


def test_entity_attributes_types() -> None:
    clean = pl.DataFrame(
        {
            "customer_id": ["c1"],
            "signup": [dt.date(2026, 3, 1)],
            "vip": [True],
            "plan": ["basic"],
            "note": ["x"],
        }
    )
    columns = {
        "customer_id": ColumnSpec(dtype="str"),
        "signup": ColumnSpec(dtype="date"),
        "vip": ColumnSpec(dtype="bool"),
        "plan": ColumnSpec(dtype="category"),
        "note": ColumnSpec(dtype="str"),
    }
    out = entity_attributes(
        clean, entity="customer_id", as_of=dt.date(2026, 3, 31), columns=columns
    )
    assert out.columns == ["customer_id", "signup_days", "vip", "plan"]
    assert out.row(0) == ("c1", 31.0, 1.0, "basic")
