"""``[defaults]``: parties that export alike written once, ``{party}`` replaced by the id."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.app import app
from tasks.spec.defaults import apply_defaults, expand, placeholder_problems, relocate
from tasks.spec.load import load_spec, parse_spec
from tasks.spec.models import DefaultsSpec, SpecError
from tests.factories import CUSTOMERS_A, SPEC_HEAD, TRANSACTIONS_A

SITES = ["north", "south", "east", "west", "Hub-2"]

DEFAULTS = """
[defaults]
store = "stores/{party}"
imports = ["exports/{party}"]
work_pool = "pool-{party}"

[[defaults.sources]]
id = "customers"
kind = "table"
grain = "entity"
path = "exports/{party}/customers.csv"
[defaults.sources.columns]
customer_id = { from = "CustID", dtype = "str" }
churned = { from = "Churn", dtype = "bool", values = { yes = "true", no = "false" } }
plan = { from = "Plan", dtype = "category", values = { B = "basic", P = "plus" } }
signup = { from = "Joined", dtype = "date" }

[[defaults.sources]]
id = "transactions"
kind = "table"
path = "exports/{party}/transactions.csv"
[defaults.sources.columns]
customer_id = { from = "cust", dtype = "str", required = true }
timestamp = { from = "when", dtype = "datetime", tz = "America/New_York", format = "%m/%d/%Y %H:%M", required = true }
amount = { from = "amt_cents", dtype = "float", unit = "cents", required = true }
category = { from = "cat", dtype = "category", values = { groc = "grocery", elec = "electronics" } }
"""

#: The last party keeps its own work pool and store; the others give their id only.
PARTIES = "".join(f'\n[[parties]]\nid = "{site}"\n' for site in SITES[:-1]) + (
    f'\n[[parties]]\nid = "{SITES[-1]}"\nstore = "hub/store"\nwork_pool = "hub-pool"\n'
)


def write_consortium(root: Path, *, defaults: str = DEFAULTS, parties: str = PARTIES) -> Path:
    """Five parties exporting alike (the same CSV files under exports/<party>/), the spec
    written with ``[defaults]``; returns the spec path."""
    for site in SITES:
        folder = root / "exports" / site
        folder.mkdir(parents=True)
        (folder / "customers.csv").write_text(CUSTOMERS_A)
        (folder / "transactions.csv").write_text(TRANSACTIONS_A)
    spec = root / "spec.toml"
    spec.write_text(SPEC_HEAD.format() + defaults + parties)
    return spec


def _problems(spec: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(str(spec))
    return [str(p) for p in info.value.problems]


def test_five_parties_written_once_are_expanded(tmp_path: Path) -> None:
    spec = load_spec(str(write_consortium(tmp_path)))
    assert [p.id for p in spec.parties] == SITES
    for party in spec.parties[:-1]:
        assert party.store == str(tmp_path / "stores" / party.id)
        assert party.imports == [str(tmp_path / "exports" / party.id)]
        assert party.work_pool == f"pool-{party.id}"
        assert [s.id for s in party.sources] == ["customers", "transactions"]
        assert party.sources[0].path == str(tmp_path / "exports" / party.id / "customers.csv")
        assert party.sources[1].columns["amount"].unit == "cents"
    hub = spec.parties[-1]
    assert hub.store == str(tmp_path / "hub" / "store")  # its own, kept
    assert hub.work_pool == "hub-pool"
    assert hub.imports == [str(tmp_path / "exports" / "Hub-2")]  # taken, with its id
    assert spec.label_party_ids() == SITES


def test_expanded_spec_equals_the_one_written_out(tmp_path: Path) -> None:
    """Same parties, same fingerprint as the spec that lists every party in full."""
    written = load_spec(str(write_consortium(tmp_path)))
    data = tomllib.loads((tmp_path / "spec.toml").read_text())
    full = {key: value for key, value in data.items() if key != "defaults"}
    full["parties"] = apply_defaults(data, DefaultsSpec.model_fields)["parties"]  # type: ignore[index]
    assert all("{party}" not in str(p) for p in full["parties"])
    spelled = parse_spec(full, source="full.toml", base=str(tmp_path))
    assert spelled.parties == written.parties
    assert spelled.fingerprint() == written.fingerprint()


def test_party_giving_sources_keeps_its_own_whole(tmp_path: Path) -> None:
    own = """
[[parties.sources]]
id = "customers"
kind = "table"
grain = "entity"
path = "exports/west/customers.csv"
[parties.sources.columns]
customer_id = { from = "CustID", dtype = "str" }
churned = { from = "Churn", dtype = "bool", values = { yes = "true", no = "false" } }
"""
    parties = PARTIES.replace('id = "west"\n', 'id = "west"\n' + own)
    spec = load_spec(str(write_consortium(tmp_path, parties=parties)))
    west = spec.party("west")
    assert [s.id for s in west.sources] == ["customers"]  # no merge with the defaults
    assert set(west.sources[0].columns) == {"customer_id", "churned"}
    assert [s.id for s in spec.party("east").sources] == ["customers", "transactions"]


def test_cli_validate_shows_the_expanded_parties(tmp_path: Path, secret: str) -> None:
    result = CliRunner().invoke(app, ["validate", str(write_consortium(tmp_path))])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "[defaults]: store, imports, work_pool, sources" in out
    for site in SITES[:-1]:
        assert f"party {site}: 2 source(s): customers (table/entity, csv), transactions" in out
        assert f"work pool pool-{site}" in out
    assert "work pool hub-pool" in out


def test_problem_in_a_defaulted_source_names_the_defaults_key(tmp_path: Path) -> None:
    """A problem of the template at every party: one line naming all of them."""
    defaults = DEFAULTS.replace(
        'amount = { from = "amt_cents", dtype = "float", unit = "cents"',
        'amount = { from = "amt_cents", dtype = "str", unit = "cents"',
    )
    problems = _problems(write_consortium(tmp_path, defaults=defaults))
    assert problems == [
        "defaults.sources[1].columns.amount.unit (for parties[0], parties[1], parties[2], "
        "parties[3], parties[4]): units apply to numeric columns"
    ]


def test_pydantic_error_in_defaults_reported_once_at_its_key(tmp_path: Path) -> None:
    defaults = DEFAULTS.replace('dtype = "date" }', 'dtype = "day" }')
    problems = _problems(write_consortium(tmp_path, defaults=defaults))
    assert len(problems) == 1
    assert problems[0].startswith("defaults.sources[0].columns.signup.dtype: Input should be")


def test_problem_for_one_party_names_it(tmp_path: Path) -> None:
    spec = write_consortium(tmp_path)
    (tmp_path / "exports" / "east" / "transactions.csv").unlink()
    (tmp_path / "exports" / "east" / "transactions.csv").mkdir()
    problems = _problems(spec)
    assert len(problems) == 1
    assert problems[0].startswith("defaults.sources[1].path (for parties[2]): ")
    assert "is a folder" in problems[0]


def test_source_outside_the_store_names_the_defaults_key(tmp_path: Path) -> None:
    defaults = DEFAULTS.replace(
        'path = "exports/{party}/customers.csv"', 'path = "exports/{party}/../north/customers.csv"'
    )
    problems = _problems(write_consortium(tmp_path, defaults=defaults))
    paths = [p.split(": ", 1)[0] for p in problems]
    assert paths == [
        f"defaults.sources[0].path (for parties[{i}])" for i in (1, 2, 3, 4)
    ]  # north reads its own file
    assert all(p.endswith("list its folder in defaults.imports") for p in problems)


def test_shared_store_refused(tmp_path: Path) -> None:
    defaults = DEFAULTS.replace('store = "stores/{party}"', 'store = "stores/all"')
    problems = _problems(write_consortium(tmp_path, defaults=defaults))
    assert problems == [
        "defaults.store: taken by 4 parties, so it must contain {party}: every party needs "
        "a store of its own"
    ]


@pytest.mark.parametrize(
    ("old", "new", "path", "message"),
    [
        (
            'id = "customers"',
            'id = "customers-{party}"',
            "defaults.sources[0].id",
            "{party} cannot be used in 'id': it must be the same at every party",
        ),
        (
            'kind = "table"\npath = "exports/{party}/t',
            'kind = "{party}"\npath = "exports/{party}/t',
            "defaults.sources[1].kind",
            "{party} cannot be used in 'kind'",
        ),
        (
            'unit = "cents"',
            'unit = "{party}"',
            "defaults.sources[1].columns.amount.unit",
            "{party} cannot be used in 'unit'",
        ),
        (
            'store = "stores/{party}"',
            'store = "stores/{foo}"',
            "defaults.store",
            "unknown placeholder; only {party} (the party id) is replaced",
        ),
        (
            'store = "stores/{party}"',
            'store = "stores/{party!r}"',
            "defaults.store",
            "unknown placeholder",
        ),
        (
            'store = "stores/{party}"',
            'store = "stores/{}"',
            "defaults.store",
            "unknown placeholder",
        ),
        (
            'work_pool = "pool-{party}"',
            'work_pool = "pool-{party"',
            "defaults.work_pool",
            "unbalanced brace; write {{ or }} for a literal brace",
        ),
        (
            'imports = ["exports/{party}"]',
            'imports = ["exports/{party}", "x}"]',
            "defaults.imports[1]",
            "unbalanced brace",
        ),
        (
            'values = { yes = "true"',
            'values = { "{party}" = "true"',
            "defaults.sources[0].columns.churned.values.{party}",
            "placeholders are replaced in values, not in table keys",
        ),
    ],
)
def test_placeholder_that_cannot_be_replaced_is_refused(
    tmp_path: Path, old: str, new: str, path: str, message: str
) -> None:
    assert old in DEFAULTS
    problems = _problems(write_consortium(tmp_path, defaults=DEFAULTS.replace(old, new, 1)))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: {message}")


def test_party_id_in_features_is_refused(tmp_path: Path) -> None:
    defaults = DEFAULTS + '[defaults.sources.features]\nprefix = "t{party}"\n'
    problems = _problems(write_consortium(tmp_path, defaults=defaults))
    assert problems == [
        "defaults.sources[1].features.prefix: {party} cannot be used in 'prefix': it must be "
        "the same at every party"
    ]


@pytest.mark.parametrize("key", ["id", "consortium", "label", "stores"])
def test_key_defaults_does_not_take_is_refused(tmp_path: Path, key: str) -> None:
    defaults = DEFAULTS.replace("[defaults]\n", f'[defaults]\n{key} = "x"\n')
    problems = _problems(write_consortium(tmp_path, defaults=defaults))
    assert problems == [
        f"defaults.{key}: not a key [defaults] takes; it takes store, imports, work_pool, "
        "storage_options, sources"
    ]


def test_missing_store_without_defaults_still_named_at_the_party(tmp_path: Path) -> None:
    defaults = DEFAULTS.replace('store = "stores/{party}"\n', "")
    problems = _problems(write_consortium(tmp_path, defaults=defaults))
    assert problems == [f"parties[{i}].store: Field required" for i in range(4)]


def test_literal_braces_and_odd_ids() -> None:
    assert expand("a{{b}}/{party}", "p-1") == "a{b}/p-1"
    assert expand("x/{foo}", "p") == "x/{foo}"  # left for the problem report
    assert expand("x/{party", "p") == "x/{party"
    taken = {2: ["sources"]}
    assert relocate("parties[2].sources[0].columns.x", taken) == (
        "defaults.sources[0].columns.x (for parties[2])"
    )
    assert relocate("parties[2].store", taken) == "parties[2].store"
    assert relocate("parties[1].sources", taken) == "parties[1].sources"


@pytest.mark.parametrize("party_id", ["..", "", "a/b", 7])
def test_bad_party_id_is_reported_at_the_id(tmp_path: Path, party_id: object) -> None:
    written = f"{party_id}" if isinstance(party_id, int) else f'"{party_id}"'
    parties = PARTIES.replace('id = "south"', f"id = {written}")
    problems = _problems(write_consortium(tmp_path, parties=parties))
    assert [p.split(": ", 1)[0] for p in problems] == ["parties[1].id"]


def test_storage_options_reference_per_party(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    defaults = DEFAULTS.replace(
        "[defaults]\n", '[defaults]\nstorage_options = { env = "FEDFUSE_S3_{party}" }\n'
    )
    spec = load_spec(str(write_consortium(tmp_path, defaults=defaults)))
    refs = [p.storage_options for p in spec.parties]
    assert [r.env if r else None for r in refs] == [f"FEDFUSE_S3_{s}" for s in SITES]
    monkeypatch.setenv("FEDFUSE_S3_east", "not json")
    problems = _problems(tmp_path / "spec.toml")
    assert [p.split(": ", 1)[0] for p in problems] == ["parties[2].storage_options"]


def test_readme_example_expands() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", readme, flags=re.DOTALL)
    example = tomllib.loads(next(b for b in blocks if "[defaults]" in b))
    assert placeholder_problems(example) == []
    DefaultsSpec.model_validate(example["defaults"])
    parties = apply_defaults(example, DefaultsSpec.model_fields)["parties"]  # type: ignore[index]
    assert parties[0]["store"] == "stores/site-a"
    assert parties[0]["sources"][0]["path"] == "exports/site-a/transactions.csv"
    assert parties[1]["work_pool"] == "site-b-pool"
    assert parties[1]["storage_options"] == {"env": "FEDFUSE_S3_site-b"}


def test_party_placeholder_in_a_party_of_its_own_is_refused(tmp_path: Path) -> None:
    parties = PARTIES.replace('store = "hub/store"', 'store = "hub/{party}"')
    problems = _problems(write_consortium(tmp_path, parties=parties))
    assert problems == [
        "parties[4].store: {party} is replaced in [defaults] only; write the party's id here"
    ]


def test_empty_default_sources_named_once_for_every_party(tmp_path: Path) -> None:
    defaults = DEFAULTS.split("[[defaults.sources]]", 1)[0] + "sources = []\n"
    problems = _problems(write_consortium(tmp_path, defaults=defaults))
    assert problems == [
        "defaults.sources (for parties[0], parties[1], parties[2], parties[3], parties[4]): "
        "List should have at least 1 item after validation, not 0"
    ]


def test_defaults_that_is_not_a_table(tmp_path: Path) -> None:
    spec = write_consortium(tmp_path, defaults="")
    spec.write_text('defaults = "stores/{party}"\n' + spec.read_text())
    problems = _problems(spec)
    assert problems[-1].startswith("defaults: Input should be a valid dictionary")
    assert {p.split(": ", 1)[0] for p in problems[:-1]} == {
        f"parties[{i}].{key}" for i in range(5) for key in ("store", "sources")
    } - {"parties[4].store"}


@pytest.mark.prefect
def test_prepare_runs_every_expanded_party(prefect_api: str, tmp_path: Path, secret: str) -> None:
    """The party pipelines of a spec written with [defaults] read each party's own exports
    and write to each party's own store."""
    import polars as pl

    from flows.prepare import prepare
    from tasks.types import LABEL

    defaults = DEFAULTS.replace('work_pool = "pool-{party}"\n', "")
    parties = PARTIES.replace('work_pool = "hub-pool"\n', "")
    spec = write_consortium(tmp_path, defaults=defaults, parties=parties)
    (tmp_path / "exports" / "west" / "customers.csv").write_text(
        CUSTOMERS_A.replace("C4,yes,P,2025-04-13\n", "")
    )
    outputs = prepare(str(spec))
    assert set(outputs) == set(SITES)
    for site in SITES:
        store = tmp_path / ("hub/store" if site == "Hub-2" else f"stores/{site}")
        assert Path(outputs[site].table.uri).is_relative_to(store / "fused")
        fused = pl.read_parquet(outputs[site].table.uri)
        assert fused.height == (3 if site == "west" else 4)
        assert fused[LABEL].to_list().count(1.0) == (1 if site == "west" else 2)
