"""``fedfuse predict`` through the real CLI against a real Prefect server: the party's own
raw keys, label values, the run it names, specs sharing a coordinator store, ``--run``,
and vertical prediction on new data for every party."""

from __future__ import annotations

import os
import re
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from flows.cli.app import app
from tests.factories import write_synthetic

pytestmark = pytest.mark.prefect

runner = CliRunner()


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # the CLI quiets Prefect through os.environ; keep that inside each test
    for name in ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        monkeypatch.setenv(name, os.environ.get(name, "WARNING" if "LEVEL" in name else "false"))


def _cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _upper_keys(root: Path, party: str) -> None:
    for name in ("customers.parquet", "orders.parquet"):
        path = root / "raw" / party / name
        frame = pl.read_parquet(path)
        frame.with_columns(pl.col("id").str.to_uppercase()).write_parquet(path)


def _synthetic(root: Path, name: str, coordinator: Path, seed: int) -> Path:
    spec = write_synthetic(root, customers=500, seed=seed)
    text = spec.read_text().replace('name = "synthetic"', f'name = "{name}"')
    text = text.replace('store = "stores/coordinator"', f'store = "{coordinator}"')
    text = re.sub(r"^rounds = .*$", "rounds = 2", text, flags=re.M)
    spec.write_text(text)
    return spec


def _run_key(output: str) -> str:
    found = re.search(r"model: run (\w+)", output)
    assert found, output
    return found.group(1)


def test_two_specs_sharing_a_coordinator_predict_with_their_own_models_and_raw_keys(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    from storage.runs import read_runs
    from storage.store import Store

    coordinator = tmp_path / "coordinator"
    one = _synthetic(tmp_path / "one", "one", coordinator, seed=0)
    two = _synthetic(tmp_path / "two", "two", coordinator, seed=1)
    _upper_keys(tmp_path / "one", "p0")
    _cli("train", str(one), "--no-baselines")
    _cli("train", str(two), "--no-baselines")
    runs = read_runs(Store(str(coordinator)))
    assert len(runs) == 2 and runs[0].spec != runs[1].spec

    out = tmp_path / "one.csv"
    output = _cli("predict", str(one), "--party", "p0", "--out", str(out))
    assert _run_key(output) == runs[0].run_key
    assert runs[0].manifest in output.replace("\n", "")
    frame = pl.read_csv(out)
    keys = frame["customer_id"].to_list()
    assert keys and all(k.startswith("P0-") for k in keys)  # as exported, upper case kept
    assert set(frame["prediction"].cast(pl.String)) <= {"true", "false"}
    assert frame["probability"].is_between(0, 1).all()

    output = _cli("predict", str(two), "--party", "p1")
    assert _run_key(output) == runs[1].run_key
    output = _cli("predict", str(two), "--party", "p1", "--run", runs[0].run_key)
    assert _run_key(output) == runs[0].run_key

    three = _synthetic(tmp_path / "three", "three", coordinator, seed=2)
    result = runner.invoke(app, ["predict", str(three), "--party", "p0"])
    assert result.exit_code == 1
    assert "no run of this spec" in result.output and runs[0].run_key in result.output
    assert "Traceback" not in result.output


def test_multiclass_predictions_give_label_values(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    spec = write_synthetic(tmp_path, customers=600)
    text = spec.read_text().replace('task = "binary"', 'task = "multiclass"')
    text = text.replace(
        'label = { column = "churned" }', 'label = { column = "tier", num_classes = 3 }'
    )
    text = text.replace(
        'churned = { from = "churn", dtype = "bool" }',
        'tier = { from = "tier", dtype = "category", values = { B = "bronze", S = "silver" } }',
    )
    text = text.replace("[vocabularies]\n", '[vocabularies]\ntier = ["bronze", "silver", "gold"]\n')
    text = re.sub(r"^rounds = .*$", "rounds = 2", text, flags=re.M)
    spec.write_text(text)
    for party in ("p0", "p1"):
        path = tmp_path / "raw" / party / "customers.parquet"
        frame = pl.read_parquet(path)
        tiers = ["B", "S", "gold"]
        frame.with_columns(
            pl.Series("tier", [tiers[(i + int(a)) % 3] for i, a in enumerate(frame["age"])])
        ).write_parquet(path)
    assert 'tier = ["bronze"' in spec.read_text()
    _cli("train", str(spec), "--no-baselines")
    out = tmp_path / "p.csv"
    _cli("predict", str(spec), "--party", "p0", "--out", str(out))
    frame = pl.read_csv(out)
    assert set(frame["prediction"]) <= {"bronze", "silver", "gold"}
    assert {"probability_bronze", "probability_silver", "probability_gold"} <= set(frame.columns)


def test_vertical_predict_takes_new_data_for_every_party(
    prefect_api: str, tmp_path: Path, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDFUSE_SECRET", secret)
    train, new = tmp_path / "train", tmp_path / "new"
    _cli("demo-data", str(train), "--layout", "vertical", "--customers", "1500", "--seed", "3")
    _cli("demo-data", str(new), "--layout", "vertical", "--customers", "2500", "--seed", "3")
    spec = train / "spec.toml"
    spec.write_text(re.sub(r"^rounds = .*$", "rounds = 3", spec.read_text(), flags=re.M))
    _cli("train", str(spec), "--no-baselines")

    data = [f"--data={p}={new / 'stores' / p / 'raw'}" for p in ("A", "B", "C")]
    out = tmp_path / "v.csv"
    output = _cli("predict", str(spec), "--party", "A", *data, "--out", str(out))
    assert "no new data for" not in output
    frame = pl.read_csv(out)
    ids = frame["customer_id"].str.strip_chars().str.slice(1).cast(pl.Int64)
    fresh = frame.filter(ids >= 1500)  # customers the training never saw
    assert fresh.height > 100 and fresh["all_parties"].sum() > 50
    assert set(frame["prediction"].cast(pl.String)) <= {"true", "false", "yes", "no", "1", "0"}

    output = _cli("predict", str(spec), "--party", "A", data[0])
    assert "no new data for B, C" in output.replace("\n", " ")

    # customers only A knows: the overlap with B's and C's training exports is empty
    fresh_a = tmp_path / "fresh-a"
    fresh_a.mkdir()
    for name in ("customers.csv", "transactions.csv"):
        text = (new / "stores" / "A" / "raw" / name).read_text()
        (fresh_a / name).write_text(text.replace("\nc0", "\nN0"))
    result = runner.invoke(app, ["predict", str(spec), "--party", "A", f"--data=A={fresh_a}"])
    assert result.exit_code == 1, result.output
    message = result.output.replace("\n", " ")
    assert "no new data for B, C" in message
    assert "no entity of the data scored is known to every party" in message
    assert "A new data, B training exports, C training exports" in message
    assert "secret" not in message and "Traceback" not in message
