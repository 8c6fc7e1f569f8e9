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
from tasks.prepare.steps import CleanOutput, PartyContext
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
        # an option of another kind is refused like an unknown key: it would do nothing
        "parties[0].sources[1].features.windows: Extra inputs are not permitted",
        "parties[0].sources[1].features.sparkle: Extra inputs are not permitted",
    ]
    spec = spec.replace("weight = 0\n", "").replace("windows = [7]\n", "")
    spec = spec.replace("sparkle = 1", "")
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


FOLDER_MODULE = '''
"""A toy folder modality: one small text file per customer, ``<customer>.txt``."""

from __future__ import annotations

import polars as pl

from tasks.prepare.modalities import FileRejected, FolderModality, register
from tasks.spec.models import SourceSpec
from storage.sources import FolderFile


class Notes(FolderModality):
    kind = "notes"
    order = 6
    pattern = "*.txt"
    max_file_bytes = 64
    file_columns = {"lines": pl.Int64()}

    def one_row_per_entity(self, source: SourceSpec) -> bool:
        return True

    def parse_file(self, file: FolderFile, data: bytes, source: SourceSpec) -> dict[str, object]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise FileRejected("not UTF-8 text") from None
        if "\\x00" in text:
            raise FileRejected("binary content")
        return {"lines": len(text.splitlines())}

    def extract(self, clean, source, inputs):
        return (
            clean.select(
                inputs.entity,
                pl.col("size").cast(pl.Float64).alias("bytes"),
                pl.col("lines").cast(pl.Float64),
            )
            .sort(inputs.entity)
            .collect()
        )


NOTES = register(Notes())
'''

NOTES_SOURCE = """
[[parties.sources]]
id = "notes"
kind = "notes"
path = "raw/notes"
[parties.sources.columns]
customer_id = { from = "stem", dtype = "str" }
size = { dtype = "int" }
lines = { dtype = "int" }
"""
#: The toy spec with the folder source in place of the clicks source.
FOLDER_SPEC = SPEC.split('[[parties.sources]]\nid = "web"', maxsplit=1)[0] + NOTES_SOURCE.lstrip(
    "\n"
)


@pytest.fixture
def notes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The toy folder modality imported from a temporary module; unregistered after."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy_notes.py").write_text(FOLDER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    importlib.import_module("toy_notes")
    try:
        yield folder
    finally:
        MODALITIES.pop("notes", None)
        sys.modules.pop("toy_notes", None)


def _write_notes(root: Path, spec: str = FOLDER_SPEC) -> Path:
    path = _write_consortium(root, spec)
    notes = root / "raw" / "notes"
    (notes / "old").mkdir(parents=True)
    (notes / "c1.txt").write_text("late delivery\nrefund asked\n")
    (notes / "c2.txt").write_text("happy\n")
    (notes / "old" / "c3.txt").write_text("one\ntwo\nthree\n")
    (notes / "README.md").write_text("not a note: the pattern leaves it out\n")
    return path


def _notes_run(spec_path: Path) -> tuple[CleanOutput, PartyContext]:
    from storage.store import fingerprint
    from tasks.prepare.steps import run_preprocess
    from tasks.spec.load import load_spec

    spec = load_spec(str(spec_path))
    ctx = PartyContext.from_spec(spec, "a")
    source = next(s for s in spec.party("a").sources if s.id == "notes")
    return run_preprocess(ctx, source, fingerprint(source.path, roots=ctx.roots), None), ctx


def test_a_folder_kind_is_summarised_and_checked(notes: Path, tmp_path: Path) -> None:
    _write_notes(tmp_path)
    assert "customers (table/entity, csv), notes (notes, folder)" in summary(
        _load(FOLDER_SPEC, tmp_path)
    )
    with_format = FOLDER_SPEC.replace('path = "raw/notes"', 'path = "raw/notes"\nformat = "csv"')
    assert _problems(with_format, tmp_path) == [
        "parties[0].sources[1].format: a notes source is a folder of files; leave 'format' out"
    ]


def test_a_folder_is_refused_for_a_file_kind_and_a_file_for_a_folder_kind(
    notes: Path, tmp_path: Path
) -> None:
    _write_notes(tmp_path)
    table_on_folder = FOLDER_SPEC.replace('path = "raw/customers.csv"', 'path = "raw/notes"')
    assert (
        "parties[0].sources[0].path: raw/notes is a folder; a table source reads one file "
        "(csv, parquet, jsonl, arrow); only kinds that read folders take one (notes)"
    ) in _problems(table_on_folder, tmp_path)
    folder_on_file = FOLDER_SPEC.replace('path = "raw/notes"', 'path = "raw/clicks.csv"')
    assert _problems(folder_on_file, tmp_path) == [
        "parties[0].sources[1].path: raw/clicks.csv is a file; a notes source is a folder of files"
    ]


def test_a_folder_source_is_confined_like_a_file(notes: Path, tmp_path: Path) -> None:
    _write_notes(tmp_path / "c")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "c" / "raw" / "away").symlink_to(elsewhere, target_is_directory=True)
    for written in ("raw/../../elsewhere", "raw/away"):
        spec = FOLDER_SPEC.replace('path = "raw/notes"', f'path = "{written}"')
        (problem,) = _problems(spec, tmp_path / "c")
        assert problem.startswith(f"parties[0].sources[1].path: {written} leads to {elsewhere},")
        assert "outside the store of party 'a' (stores/a) and its import areas (raw)" in problem


def test_a_symlink_inside_a_folder_source_is_refused(
    notes: Path, tmp_path: Path, secret: str
) -> None:
    from storage.sources import SourceError, read_folder
    from storage.store import FolderError, fingerprint
    from tasks.prepare.steps import PartyContext, run_preprocess

    spec_path = _write_notes(tmp_path)
    outside = tmp_path / "private.txt"
    outside.write_text("not the party's to share\n")
    link = tmp_path / "raw" / "notes" / "old" / "c4.txt"
    link.symlink_to(outside)
    assert _problems(FOLDER_SPEC, tmp_path) == [
        "parties[0].sources[1].path: raw/notes: holds a symbolic link or an entry leading "
        "outside the folder (list them with: find FOLDER -type l); a folder source holds "
        "plain files and folders only"
    ]
    link.unlink()
    spec = _load(spec_path.read_text(), tmp_path)  # checked before the link appears
    ctx = PartyContext.from_spec(spec, "a")
    source = next(s for s in spec.party("a").sources if s.id == "notes")
    link.symlink_to(outside)
    with pytest.raises(FolderError, match=r"holds a symbolic link or an entry leading outside"):
        run_preprocess(ctx, source, fingerprint(source.path, roots=ctx.roots), None)
    with pytest.raises(SourceError, match=r"holds a symbolic link or an entry leading outside"):
        read_folder(source.path, "*.txt")


def test_an_empty_folder_source_is_a_clear_error(notes: Path, tmp_path: Path, secret: str) -> None:
    from storage.sources import SourceError

    spec_path = _write_notes(tmp_path)
    for file in (tmp_path / "raw" / "notes").rglob("*.txt"):
        file.unlink()
    with pytest.raises(SourceError) as info:
        _notes_run(spec_path)
    assert str(info.value) == (
        f"{tmp_path / 'raw' / 'notes'}: folder holds no file matching '*.txt' (1 file(s) in all)"
    )


def test_oversized_and_binary_files_are_quarantined_without_their_names(
    notes: Path, tmp_path: Path, secret: str
) -> None:
    spec_path = _write_notes(tmp_path)
    folder = tmp_path / "raw" / "notes"
    (folder / "c7.txt").write_text("x" * 65)
    (folder / "c8.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (folder / "c9.txt").write_bytes(b"zero\x00bytes\n")
    cleaned, _ = _notes_run(spec_path)
    assert cleaned.quality.rows_in == 6
    assert cleaned.quality.rows_out == 3
    assert cleaned.quality.rejected_by_reason == {
        "binary content": 1,
        "file over 64 bytes": 1,
        "not UTF-8 text": 1,
    }
    assert cleaned.rejected is not None
    rejected = pl.read_parquet(cleaned.rejected.uri)  # in the party's store only
    assert rejected.select("__row", "reject_reason", "__raw_line").rows() == [
        (3, "file over 64 bytes", "c7.txt"),
        (4, "not UTF-8 text", "c8.txt"),
        (5, "binary content", "c9.txt"),
    ]
    assert "c7" not in cleaned.quality.model_dump_json()
    clean = pl.read_parquet(cleaned.clean.uri).sort("customer_id")
    assert clean.rows() == [("c1", 27, 2), ("c2", 6, 1), ("c3", 14, 3)]


@pytest.mark.prefect
def test_a_folder_modality_runs_through_the_party_pipeline(
    prefect_api: str, notes: Path, tmp_path: Path, secret: str
) -> None:
    from flows.prepare import party_pipeline

    spec_path = _write_notes(tmp_path)
    (tmp_path / "raw" / "notes" / "c9.txt").write_bytes(b"\xff\xfe binary")  # quarantined
    fused = party_pipeline(str(spec_path), "a")
    table = pl.read_parquet(fused.table.uri).sort("notes__lines")
    assert {"profile__plan", "notes__bytes", "notes__lines"} <= set(table.columns)
    assert table["notes__lines"].to_list() == [1.0, 2.0, 3.0]
    assert table["notes__bytes"].to_list() == [6.0, 27.0, 14.0]
    assert {c.name: c.modality for c in fused.features}["notes__lines"] == "notes"
    (quality,) = [q for q in fused.quality if q.source == "notes"]
    assert (quality.rows_in, quality.rows_out, quality.rejected_by_reason) == (
        4,
        3,
        {"not UTF-8 text": 1},
    )
