"""A coordinator that survives any update: one party (p1) sends a corrupt update through the
real path (its training task writes it to the coordinator store and reports its reference),
the coordinator leaves that party out of the round with the reason, the run completes on the
other party, and the reason is in the result and the report. A file swapped after it was
accepted is refused on resume, never loaded."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from storage.store import FileRef, Store
from tasks.horizontal.steps import PartyUpdate, train_party
from tests.factories import write_synthetic

pytestmark = pytest.mark.prefect


def _spec(root: Path) -> Path:
    spec = write_synthetic(root, customers=500)
    text = spec.read_text()
    text = re.sub(r"^rounds = .*$", "rounds = 2", text, flags=re.M)
    spec.write_text(text)
    return spec


def wrong_tree_sizes(text: str) -> bytes:
    return re.sub(
        r"^tree_sizes=(\d+)", lambda m: f"tree_sizes={int(m[1]) + 7}", text, count=1, flags=re.M
    ).encode()


def cycle(text: str) -> bytes:
    """The root's left child points back at the root (tree_sizes dropped: it is optional)."""
    text = re.sub(r"^tree_sizes=.*\n", "", text, count=1, flags=re.M)
    return re.sub(r"^left_child=(\S+)", "left_child=0", text, count=1, flags=re.M).encode()


def nan_leaf(text: str) -> bytes:
    return re.sub(r"^(leaf_value=)(\S+)", r"\1nan", text, count=1, flags=re.M).encode()


def huge_leaf(text: str) -> bytes:
    return re.sub(r"^(leaf_value=)(\S+)", r"\g<1>1e300", text, count=1, flags=re.M).encode()


def binary(text: str) -> bytes:
    return b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(range(256)) * 4


def empty(text: str) -> bytes:
    return b""


CORRUPT: dict[str, tuple[Callable[[str], bytes], str]] = {
    "wrong tree_sizes": (wrong_tree_sizes, "tree_sizes"),
    "cycle in left_child": (cycle, "structure"),
    "NaN leaf": (nan_leaf, "finite"),
    "leaf 1e300": (huge_leaf, "beyond the bound"),
    "binary payload": (binary, "not UTF-8"),
    "empty file": (empty, "not a LightGBM text model"),
}


def sending(monkeypatch: pytest.MonkeyPatch, make: Callable[[PartyUpdate, Store], FileRef]) -> None:
    """Party p1's training task sends what ``make`` writes instead of its real update."""
    real = train_party.fn

    def train(*args: Any, **kwargs: Any) -> PartyUpdate:
        update: PartyUpdate = real(*args, **kwargs)
        setup = args[0]
        if setup.party != "p1":
            return update
        return update.model_copy(update={"model": make(update, Store(setup.coordinator))})

    monkeypatch.setattr(train_party, "fn", train)


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_update_leaves_the_party_out_and_the_run_completes(
    prefect_api: str, tmp_path: Path, secret: str, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    from flows.horizontal import federated_training

    mutate, reason = CORRUPT[kind]

    def make(update: PartyUpdate, store: Store) -> FileRef:
        text = Path(update.model.uri).read_text()
        return store.write_bytes("models", f"bad-r{update.round}-p1.txt", mutate(text))

    sending(monkeypatch, make)
    result = federated_training(str(_spec(tmp_path)))
    assert result.rounds_run == 2
    assert set(result.dropped) == {1, 2}
    for r in (1, 2):
        assert reason in result.dropped[r]["p1"], result.dropped[r]
    report = Path(result.report).read_text()
    assert "## Updates left out" in report and "round 1, p1:" in report
    assert result.parties == ["p0", "p1"]  # left out of the rounds, not of the consortium


def test_missing_and_oversized_updates_leave_the_party_out(
    prefect_api: str, tmp_path: Path, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.horizontal import federated_training

    def make(update: PartyUpdate, store: Store) -> FileRef:
        if update.round == 1:
            return FileRef(uri=store.location("models", "gone.txt"), sha256="0" * 64, size=10)
        if update.round == 2:
            return store.write_bytes("models", "big-p1.txt", b"tree\n" + b"x" * 60_000)
        return update.model

    monkeypatch.setattr("tasks.horizontal.steps.MAX_UPDATE_BYTES", 50_000)
    sending(monkeypatch, make)
    result = federated_training(str(_spec(tmp_path)))
    assert result.rounds_run == 2
    assert result.dropped[1]["p1"] == "update file not found"
    assert result.dropped[2]["p1"].startswith("update is 60005 bytes, limit 50000")


def test_an_update_outside_the_coordinator_store_is_not_read(
    prefect_api: str, tmp_path: Path, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.horizontal import federated_training

    elsewhere = tmp_path / "elsewhere.txt"

    def make(update: PartyUpdate, store: Store) -> FileRef:
        elsewhere.write_text(Path(update.model.uri).read_text())
        return update.model.model_copy(update={"uri": str(elsewhere)})

    sending(monkeypatch, make)
    result = federated_training(str(_spec(tmp_path)))
    assert result.dropped[1]["p1"] == "update is not in the coordinator store's models folder"


def test_an_update_reached_through_dotdot_is_not_read(
    prefect_api: str, tmp_path: Path, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``models/../reports/x`` starts with the models folder's path but leads elsewhere."""
    from flows.horizontal import federated_training

    def make(update: PartyUpdate, store: Store) -> FileRef:
        outside = store.write_text("reports", "p1.txt", Path(update.model.uri).read_text())
        uri = store.location("models", "../reports/p1.txt")
        return outside.model_copy(update={"uri": uri})

    sending(monkeypatch, make)
    result = federated_training(str(_spec(tmp_path)))
    assert result.dropped[1]["p1"] == "update is not in the coordinator store's models folder"


def test_an_accepted_update_swapped_before_a_resume_is_refused(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    from flows.horizontal import federated_training

    spec = _spec(tmp_path)
    first = federated_training(str(spec), stop_after=1)
    assert first.rounds_run == 1
    [accepted] = (spec.parent / "stores" / "coordinator" / "models").glob("*-r0001-p1.txt")
    accepted.write_bytes(nan_leaf(accepted.read_text()))
    state = federated_training(str(spec), return_state=True)
    assert state.is_failed()
    message = str(state.message)
    assert "accepted update of party p1: content does not match its sha256" in message
    assert "\n" not in message.strip()


def test_a_party_without_usable_rows_is_left_out_and_an_empty_label_is_quarantined(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    import polars as pl

    from flows.horizontal import federated_training

    spec = write_synthetic(tmp_path, customers=900, parties=3)
    raw = spec.parent / "raw"
    p2 = raw / "p2" / "customers.parquet"
    pl.read_parquet(p2).with_columns(pl.lit(None, pl.Boolean).alias("churn")).write_parquet(p2)
    p1 = raw / "p1" / "customers.parquet"
    frame = pl.read_parquet(p1)
    frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("churn")).alias("churn")
    ).write_parquet(p1)
    result = federated_training(str(spec))
    assert result.left_out == {
        "p2": "no usable training rows (empty, or every row quarantined at prepare)"
    }
    assert result.parties == ["p0", "p1"]
    assert "## Parties left out of training" in Path(result.report).read_text()
    [rejected] = (spec.parent / "stores" / "p1" / "rejected").glob("customers-*.parquet")
    bad = pl.read_parquet(rejected)
    assert bad["__row"].to_list() == [4]  # the fourth data row
    assert bad["reject_reason"].to_list() == ["column 'churn' (label): missing label"]
