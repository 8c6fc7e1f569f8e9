"""The modality registry: kinds come from registered modalities, and a modality defined
outside fedfuse (here a module written into a temporary folder) works end to end."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from tasks.prepare.modalities import (
    MODALITIES,
    display_order,
    modality,
    modality_names,
    register,
)
from tasks.prepare.modalities.table import Table
from tasks.spec.load import parse_spec, summary
from tasks.spec.models import FedSpec, SpecError, SpecProblem

TOY_MODULE = '''
"""A toy modality: page clicks per customer, registered from outside fedfuse."""

from __future__ import annotations

import polars as pl
from pydantic import Field

from tasks.prepare.modalities import FeatureInputs, Modality, register
from tasks.spec.models import FeatureOptions, SourceSpec, SpecProblem


class ClickOptions(FeatureOptions):
    weight: float = Field(default=1.0, gt=0)


class Clicks(Modality):
    kind = "clicks"
    order = 5
    options = ClickOptions

    def required_columns(self, source: SourceSpec) -> tuple[str, ...]:
        return ("clicks",)

    def key_problems(self, source: SourceSpec, *, at: str, entity: str) -> list[SpecProblem]:
        problems = super().key_problems(source, at=at, entity=entity)
        if source.encoding != "utf8":
            problems.append(SpecProblem(path=f"{at}.encoding", message="clicks are utf8"))
        return problems

    def extract(
        self, clean: pl.LazyFrame, source: SourceSpec, inputs: FeatureInputs
    ) -> pl.DataFrame:
        assert isinstance(source.features, ClickOptions)
        weight = source.features.weight
        return (
            clean.group_by(inputs.entity)
            .agg(
                (pl.col("clicks").sum().cast(pl.Float64) * weight).alias("weighted"),
                pl.len().cast(pl.Float64).alias("sessions"),
            )
            .sort(inputs.entity)
            .collect()
        )


CLICKS = register(Clicks())
'''

SPEC = """
[consortium]
name = "toy"
entity = "customer_id"
secret = { env = "FEDFUSE_TEST_SECRET" }
as_of = 2026-03-31
label = { column = "churned" }

[coordinator]
store = "stores/coordinator"

[vocabularies]
plan = ["basic", "plus"]

[[parties]]
id = "a"
store = "stores/a"
imports = ["raw"]

[[parties.sources]]
id = "customers"
kind = "table"
grain = "entity"
path = "raw/customers.csv"
[parties.sources.columns]
customer_id = { from = "CustID", dtype = "str" }
churned = { from = "Churn", dtype = "bool" }
plan = { from = "Plan", dtype = "category" }

[[parties.sources]]
id = "web"
kind = "clicks"
path = "raw/clicks.csv"
[parties.sources.columns]
customer_id = { from = "cust", dtype = "str" }
clicks = { from = "n", dtype = "int" }
[parties.sources.features]
weight = 2.0
"""


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The toy modality imported from a module in a temporary folder; unregistered after."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy_clicks.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    importlib.import_module("toy_clicks")
    try:
        yield folder
    finally:
        MODALITIES.pop("clicks", None)
        sys.modules.pop("toy_clicks", None)


def _write_consortium(root: Path, spec: str = SPEC) -> Path:
    (root / "raw").mkdir(parents=True, exist_ok=True)
    (root / "raw" / "customers.csv").write_text(
        "CustID,Churn,Plan\nc1,true,basic\nc2,false,plus\nc3,false,basic\n"
    )
    (root / "raw" / "clicks.csv").write_text("cust,n\nc1,3\nc1,4\nc2,1\nc3,0\nc3,5\nc3,2\n")
    path = root / "spec.toml"
    path.write_text(spec)
    return path


def _load(spec: str, base: Path) -> FedSpec:
    import tomllib

    return parse_spec(tomllib.loads(spec), source="spec.toml", base=str(base))


def _problems(spec: str, base: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        _load(spec, base)
    return [str(p) for p in info.value.problems]


def test_the_builtin_kinds_are_registered() -> None:
    assert {"table", "text", "events"} <= set(modality_names())
    assert [display_order(k) for k in ("table", "text", "events")] == [0, 1, 2]
    assert display_order("no-such-kind") == 9


def test_an_unknown_kind_names_the_known_ones(tmp_path: Path) -> None:
    problems = _problems(SPEC, tmp_path)  # no toy registered here
    assert problems == [
        "parties[0].sources[1].kind: Value error, unknown kind 'clicks'; known: "
        + ", ".join(modality_names())
    ]


def test_a_kind_registered_twice_by_another_class_is_refused() -> None:
    class Other(Table):
        pass

    with pytest.raises(ValueError, match="modality kind 'table' is registered already"):
        register(Other())
    assert type(modality("table")) is Table


def test_registering_imports_no_language_model() -> None:
    code = (
        "import sys\n"
        "from tasks.prepare.modalities import modality_names\n"
        "import tasks.prepare.steps\n"
        "modality_names()\n"
        "heavy = {'jieba', 'sklearn', 'vaderSentiment', 'cnsenti'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_a_registered_kind_is_checked_by_its_modality(toy: Path, tmp_path: Path) -> None:
    spec = SPEC.replace('clicks = { from = "n", dtype = "int" }', "")
    spec = spec.replace('path = "raw/clicks.csv"', 'path = "raw/clicks.csv"\nencoding = "latin1"')
    spec = spec.replace("weight = 2.0", "weight = 0\nwindows = [7]\nsparkle = 1")
    assert _problems(spec, tmp_path) == [
        "parties[0].sources[1].features.weight: Input should be greater than 0",
        "parties[0].sources[1].features.sparkle: Extra inputs are not permitted",
    ]
    spec = spec.replace("weight = 0\n", "").replace("sparkle = 1", "")
    assert _problems(spec, tmp_path) == [
        "parties[0].sources[1].columns: a clicks source needs a 'clicks' column mapping",
        "parties[0].sources[1].encoding: clicks are utf8",
    ]


def test_a_registered_kind_is_summarised(toy: Path, tmp_path: Path) -> None:
    loaded = _load(SPEC, tmp_path)
    text = summary(loaded)
    assert "customers (table/entity, csv), web (clicks, csv)" in text


def test_the_label_needs_a_source_that_holds_it(toy: Path, tmp_path: Path) -> None:
    spec = SPEC.replace(
        'clicks = { from = "n", dtype = "int" }',
        'clicks = { from = "n", dtype = "int" }\nchurned = { from = "c", dtype = "bool" }',
    )
    assert SpecProblem(
        path="parties[0].sources[1].columns.churned",
        message="the label must come from a one-row-per-entity table source",
    ).__str__() in _problems(spec, tmp_path)


@pytest.mark.prefect
def test_a_new_modality_runs_through_the_party_pipeline(
    prefect_api: str, toy: Path, tmp_path: Path, secret: str
) -> None:
    from flows.prepare import party_pipeline

    spec_path = _write_consortium(tmp_path)
    fused = party_pipeline(str(spec_path), "a")
    table = pl.read_parquet(fused.table.uri).sort("clicks__sessions")
    assert {"profile__plan", "clicks__weighted", "clicks__sessions"} <= set(table.columns)
    assert table["clicks__weighted"].to_list() == [2.0, 14.0, 14.0]
    assert table["clicks__sessions"].to_list() == [1.0, 2.0, 3.0]
    assert {c.name: c.modality for c in fused.features}["clicks__weighted"] == "clicks"
