"""The user's walk on real public data, through the CLI: the parties' exports ->
``fedfuse init`` -> review (nothing, or the edit the draft's comment asks for) ->
``fedfuse validate`` -> ``fedfuse train`` -> ``fedfuse predict`` on a party's export."""

from __future__ import annotations

import os
import re
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from benchmarks.public_data import DATASETS, ID, write_public_consortium

pytestmark = pytest.mark.prefect

SECRET = "0123456789abcdef0123456789abcdef"
ROWS = 1500
runner = CliRunner()


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # the CLI quiets Prefect through os.environ; keep that inside each test
    for name in ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        monkeypatch.setenv(name, os.environ.get(name, "WARNING" if "LEVEL" in name else "false"))


def _cli(*args: str) -> str:
    from flows.cli.app import app

    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


def _exports(root: Path) -> list[tuple[str, Path]]:
    """(party, file) for every exported file, as the user lists them to init."""
    return [
        (folder.name, path)
        for folder in sorted((root / "exports").iterdir())
        for path in sorted(folder.iterdir())
    ]


def _test_auc(output: str) -> float:
    """The AUC of the federated (or vertical, fused) model in train's test metrics table."""
    table = output.split("test metrics at the best round", 1)[1]
    found = re.search(r"│ (?:federated|vertical \(fused\)) +│ +([0-9.]+) │", table)
    assert found, output
    return float(found.group(1))


@pytest.mark.parametrize(
    ("dataset", "floor"), [("mlc_churn", 0.8), ("caravan", 0.6), ("wa_churn", 0.75)]
)
def test_init_review_train_predict_on_public_data(
    prefect_api: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dataset: str,
    floor: float,
) -> None:
    monkeypatch.setenv("FEDFUSE_SECRET", SECRET)
    monkeypatch.setenv("COLUMNS", "200")  # tables printed whole
    data = DATASETS[dataset]
    root = tmp_path / dataset
    write_public_consortium(root, dataset, rows=ROWS, seed=0)
    (root / "spec.toml").unlink()  # the user has the exports only
    files = _exports(root)
    spec = root / "spec.toml"
    parties = [arg for party, path in files for arg in ("--party", f"{party}={path}")]
    output = _cli("init", str(spec), *parties, "--label", data.label)
    assert f"{data.layout} layout, binary task" in output
    text = spec.read_text()

    # the draft: one key, R's row names, at every party (the data sets have no other id),
    # never a feature too; the label's two values mapped
    assert 'entity = "rownames"' in text
    assert "row_number" not in text
    assert text.count(f'{ID} = {{ from = "{ID}", dtype = "str", required = true }}') == (
        1 if data.layout == "horizontal" else len(files)
    )
    assert f"values = {{ {data.positive} = 1," in text
    if dataset == "mlc_churn":
        assert 'state = { from = "state", dtype = "category" }' in text  # a code, not a key

    # the review: vertical training needs the user's choice of what to share, as the
    # draft's comment says
    if data.layout == "vertical":
        assert '# choose how to train: mode = "rounds" with share_gradients = true' in text
        text = text.replace("[fusion]\n", '[fusion]\nmode = "rounds"\nshare_gradients = true\n')
        spec.write_text(text)

    assert "valid" in _cli("validate", str(spec))
    trained = _cli("train", str(spec), "--no-baselines", "--rounds", "10")
    assert _test_auc(trained) > floor

    party, export = next((p, f) for p, f in files if data.label in f.read_text().split("\n")[0])
    out = tmp_path / "predictions.csv"
    _cli("predict", str(spec), "--party", party, "--out", str(out))
    predictions = pl.read_csv(out, infer_schema_length=0)
    exported = pl.read_csv(export, infer_schema_length=0)
    # every exported customer scored under its raw key as exported, with label values
    assert sorted(predictions[ID].to_list()) == sorted(exported[ID].to_list())
    values = set(exported[data.label].to_list())
    assert set(predictions["prediction"].to_list()) <= values
    assert predictions["probability"].cast(pl.Float64).is_between(0, 1).all()
