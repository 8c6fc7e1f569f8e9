"""Confined stores: stores apart, every source inside its party's store or import areas."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flows.cli.app import app
from storage.files import ConfinementError, confined, real_location
from tasks.spec.load import load_spec, parse_spec
from tasks.spec.models import SpecError

APART = (
    "every party's store and import areas and the coordinator's store must be separate "
    "folders, none inside another"
)
OUTSIDE_A = (
    "outside the store of party 'a' (stores/a) and its import areas (raw/a); "
    "to read it from elsewhere, list its folder in parties[0].imports"
)


def _data(spec_path: Path) -> dict[str, Any]:
    return tomllib.loads(spec_path.read_text())


def _problems(spec_path: Path, data: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="spec.toml", base=str(spec_path.parent))
    return [str(p) for p in info.value.problems]


def _root(spec_path: Path) -> str:
    return str(spec_path.parent.resolve())


def test_factory_spec_is_confined(tiny_spec: Path) -> None:
    spec = load_spec(str(tiny_spec))
    root = _root(tiny_spec)
    assert spec.parties[0].imports == [f"{root}/raw/a"]
    assert spec.parties[0].roots == [f"{root}/stores/a", f"{root}/raw/a"]


def test_party_store_is_the_coordinators(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][1]["store"] = "stores/coordinator"
    assert _problems(tiny_table_spec, data) == [
        "parties[1].store: stores/coordinator is also the coordinator's store "
        f"(stores/coordinator); {APART}"
    ]


def test_party_store_inside_the_coordinators(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][0]["store"] = "stores/coordinator/a"
    assert _problems(tiny_table_spec, data) == [
        "parties[0].store: stores/coordinator/a lies inside the coordinator's store "
        f"(stores/coordinator); {APART}"
    ]


def test_two_parties_share_a_store(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][1]["store"] = "stores/a"
    assert _problems(tiny_table_spec, data) == [
        f"parties[1].store: stores/a is also the store of party 'a' (stores/a); {APART}"
    ]


def test_dotdot_store_is_another_partys(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][1]["store"] = "stores/b/../a"
    root = _root(tiny_table_spec)
    assert _problems(tiny_table_spec, data) == [
        f"parties[1].store: stores/b/../a (leads to {root}/stores/a) is also the store of "
        f"party 'a' (stores/a); {APART}"
    ]


def test_symlinked_store_is_another_partys(tiny_table_spec: Path) -> None:
    stores = tiny_table_spec.parent / "stores"
    (stores / "a").mkdir(parents=True)
    (stores / "b").symlink_to(stores / "a", target_is_directory=True)
    root = _root(tiny_table_spec)
    assert _problems(tiny_table_spec, _data(tiny_table_spec)) == [
        f"parties[1].store: stores/b (leads to {root}/stores/a) is also the store of party "
        f"'a' (stores/a); {APART}"
    ]


def test_party_store_contains_another_partys(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][1]["store"] = "stores/a/b"
    assert _problems(tiny_table_spec, data) == [
        f"parties[1].store: stores/a/b lies inside the store of party 'a' (stores/a); {APART}"
    ]


def test_import_area_is_another_partys(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][0]["imports"] = ["raw/a", "raw/b"]
    assert _problems(tiny_table_spec, data) == [
        f"parties[1].imports[0]: raw/b is also an import area of party 'a' (raw/b); {APART}"
    ]


def test_import_area_contains_the_stores(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][0]["imports"] = ["raw/a", "stores"]
    assert _problems(tiny_table_spec, data) == [
        f"parties[0].imports[1]: stores contains the coordinator's store (stores/coordinator); "
        f"{APART}",
        f"parties[0].imports[1]: stores contains the store of party 'b' (stores/b); {APART}",
    ]


def test_etc_passwd_is_refused(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][0]["sources"][0]["path"] = "/etc/passwd"
    data["parties"][0]["sources"][0]["format"] = "csv"
    assert _problems(tiny_table_spec, data) == [
        f"parties[0].sources[0].path: /etc/passwd is {OUTSIDE_A}"
    ]


def test_file_uri_etc_passwd_is_refused(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][0]["sources"][0]["path"] = "file:///etc/passwd"
    data["parties"][0]["sources"][0]["format"] = "csv"
    problems = _problems(tiny_table_spec, data)
    assert problems == [f"parties[0].sources[0].path: file:///etc/passwd is {OUTSIDE_A}"]
    assert "root:" not in " ".join(problems)  # the file is never read


def test_etc_passwd_in_a_declared_import_area_is_accepted(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][0]["imports"] = ["raw/a", "/etc"]
    data["parties"][0]["sources"][0]["path"] = "file:///etc/passwd"
    data["parties"][0]["sources"][0]["format"] = "csv"
    spec = parse_spec(data, source="spec.toml", base=str(tiny_table_spec.parent))
    assert spec.parties[0].imports[1] == "/etc"


def test_source_outside_without_import_areas(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    del data["parties"][1]["imports"]
    assert _problems(tiny_table_spec, data) == [
        f"parties[1].sources[{j}].path: raw/b/{name} is outside the store of party 'b' "
        "(stores/b); to read it from elsewhere, list its folder in parties[1].imports"
        for j, name in enumerate(["accounts.parquet", "orders.parquet"])
    ]


def test_source_inside_its_store_needs_no_import_area(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    del data["parties"][0]["imports"]
    for source in data["parties"][0]["sources"]:
        source["path"] = "stores/a/raw/" + source["path"].rsplit("/", 1)[1]
    spec = parse_spec(data, source="spec.toml", base=str(tiny_table_spec.parent))
    assert spec.parties[0].imports == []


def test_dotdot_source_into_another_partys_folder(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][0]["sources"][1]["path"] = "raw/a/../b/orders.parquet"
    root = _root(tiny_table_spec)
    assert _problems(tiny_table_spec, data) == [
        "parties[0].sources[1].path: raw/a/../b/orders.parquet leads to "
        f"{root}/raw/b/orders.parquet, {OUTSIDE_A}"
    ]


def test_symlink_to_another_partys_file_is_refused(tiny_table_spec: Path) -> None:
    mine = tiny_table_spec.parent / "raw" / "a" / "transactions.csv"
    mine.unlink()
    mine.symlink_to(tiny_table_spec.parent / "raw" / "b" / "orders.parquet")
    root = _root(tiny_table_spec)
    with pytest.raises(SpecError) as info:
        load_spec(str(tiny_table_spec))
    assert [str(p) for p in info.value.problems] == [
        "parties[0].sources[1].path: raw/a/transactions.csv leads to "
        f"{root}/raw/b/orders.parquet, {OUTSIDE_A}"
    ]


def test_symlink_within_the_party_area_is_accepted(tiny_table_spec: Path) -> None:
    raw = tiny_table_spec.parent / "raw" / "a"
    (raw / "exports").mkdir()
    (raw / "transactions.csv").rename(raw / "exports" / "transactions.csv")
    (raw / "transactions.csv").symlink_to(raw / "exports" / "transactions.csv")
    spec = load_spec(str(tiny_table_spec))
    assert spec.parties[0].sources[1].path == str((raw / "exports" / "transactions.csv").resolve())


def test_entity_map_outside_is_refused(tiny_spec: Path) -> None:
    data = _data(tiny_spec)
    data["parties"][0]["sources"][3]["entity_map"]["path"] = "raw/b/devices.csv"
    assert _problems(tiny_spec, data) == [
        f"parties[0].sources[3].entity_map.path: raw/b/devices.csv is {OUTSIDE_A}"
    ]


def test_uri_sources_normalise_dotdot(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["parties"][1]["store"] = "s3://bucket/b"
    del data["parties"][1]["imports"]
    data["parties"][1]["sources"][0]["path"] = "s3://bucket/b/raw/accounts.parquet"
    data["parties"][1]["sources"][1]["path"] = "s3://bucket/b/raw/../../a/orders.parquet"
    assert _problems(tiny_table_spec, data) == [
        "parties[1].sources[1].path: s3://bucket/b/raw/../../a/orders.parquet leads to "
        "s3://bucket/a/orders.parquet, outside the store of party 'b' (s3://bucket/b); "
        "to read it from elsewhere, list its folder in parties[1].imports"
    ]


def test_cli_validate_names_the_key(tiny_table_spec: Path) -> None:
    text = tiny_table_spec.read_text()
    tiny_table_spec.write_text(text.replace('store = "stores/b"', 'store = "stores/coordinator"'))
    result = CliRunner().invoke(app, ["validate", str(tiny_table_spec)])
    assert result.exit_code == 1
    assert "1 problem(s)" in result.output
    assert "parties[1].store: stores/coordinator is also the coordinator's store" in result.output


def test_confined_resolves_and_refuses(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    (root / "area").mkdir()
    (root / "outside.csv").write_text("secret cell\n")
    (root / "area" / "link.csv").symlink_to(root / "outside.csv")
    assert confined(str(root / "area" / "x.csv"), [str(root / "area")]) == str(
        root / "area" / "x.csv"
    )
    with pytest.raises(ConfinementError) as info:
        confined(str(root / "area" / "link.csv"), [str(root / "area")])
    assert str(info.value) == (
        f"{root}/area/link.csv leads to {root}/outside.csv, outside the folders {root}/area"
    )
    assert "secret cell" not in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfinementError, match=r"^/etc/passwd is outside the folders /srv$"):
        confined("/etc/passwd", ["/srv"])
    assert real_location("s3://bucket/a/../b/x.csv") == "s3://bucket/b/x.csv"
    assert real_location("file:///etc/../etc/passwd") == "/etc/passwd"


def test_a_link_swapped_after_validation_is_refused_at_run_time(
    tmp_path: Path, secret: str
) -> None:
    """The pipeline checks the source again where it reads it: a symlink planted after
    ``validate`` (here: the source replaced by a link to another party's export) fails that
    party's step naming the path and where it leads, and nothing is read."""
    import pytest as _pytest

    from storage.files import ConfinementError
    from tasks.prepare.steps import PartyContext, run_party
    from tasks.spec.load import load_spec
    from tests.factories import write_tiny

    spec_path = write_tiny(tmp_path, with_text_events=False)
    spec = load_spec(str(spec_path))
    party = spec.parties[0]
    source = party.sources[0]
    other = spec.parties[1].sources[0]
    target = Path(source.path)
    target.unlink()
    target.symlink_to(Path(other.path))
    ctx = PartyContext.from_spec(spec, party.id)
    with _pytest.raises(ConfinementError, match=r"leads to .*outside"):
        run_party(ctx, party.sources)
