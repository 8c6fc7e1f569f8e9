from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.spec import SpecError, load_spec, parse_spec


def _data(spec_path: Path) -> dict:
    return tomllib.loads(spec_path.read_text())


def _problems(data: dict, base: str = "/base") -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="spec.toml", base=base)
    return [str(p) for p in info.value.problems]


def test_valid_spec_resolves_relative_paths(tiny_table_spec: Path) -> None:
    spec = load_spec(str(tiny_table_spec))
    root = tiny_table_spec.parent
    assert spec.parties[0].store == str(root / "stores" / "a")
    assert spec.parties[0].sources[0].path == str(root / "raw" / "a" / "customers.csv")
    assert spec.coordinator.store == str(root / "stores" / "coordinator")
    assert spec.label_party_ids() == ["a", "b"]


def test_wrong_dtype_names_key_path(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][1]["sources"][1]["columns"]["amount"]["dtype"] = "money"
    problems = _problems(data)
    assert any(p.startswith("parties[1].sources[1].columns.amount.dtype:") for p in problems)


def test_every_problem_is_reported(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][0]["sources"][1]["columns"]["timestamp"]["tz"] = "Mars/Olympus"
    data["parties"][0]["sources"][1]["columns"]["amount"]["unit"] = "doubloons"
    data["consortium"]["secret"] = {"env": "X", "block": "y"}
    problems = _problems(data)
    assert any(p.startswith("parties[0].sources[1].columns.timestamp.tz:") for p in problems)
    assert any(p.startswith("parties[0].sources[1].columns.amount.unit:") for p in problems)
    assert any(p.startswith("consortium.secret:") for p in problems)


def test_semantic_problems_have_paths(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    del data["parties"][1]["sources"][0]["columns"]["churned"]  # b no longer holds the label
    data["parties"][0]["sources"][1]["columns"]["category"]["dtype"] = "category"
    del data["vocabularies"]["category"]
    problems = _problems(data)
    assert (
        "parties[1].sources: horizontal layout: party 'b' has no source mapping the label column 'churned'"
        in problems
    )
    assert any(
        p.startswith("parties[0].sources[1].columns.category:") and "vocabularies" in p
        for p in problems
    )


def test_secret_value_is_refused(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["consortium"]["secret"] = "hunter2"
    problems = _problems(data)
    assert any(p.startswith("consortium.secret") for p in problems)


def test_unknown_key_is_refused(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][0]["sources"][0]["colums"] = {}
    assert any(p.startswith("parties[0].sources[0].colums:") for p in _problems(data))


def test_cli_validate_summary_and_errors(tiny_table_spec: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(tiny_table_spec)])
    assert ok.exit_code == 0, ok.output
    assert "consortium 'tiny': horizontal layout" in ok.output
    assert "party b: 2 source(s)" in ok.output
    bad = tiny_table_spec.read_text().replace('dtype = "bool" }', 'dtype = "boolean" }', 1)
    tiny_table_spec.write_text(bad)
    result = runner.invoke(app, ["validate", str(tiny_table_spec)])
    assert result.exit_code == 1
    assert "parties[1].sources[0].columns.churned.dtype: Input should be" in result.output
