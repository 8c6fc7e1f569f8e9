"""The spec reference (docs/spec.md) is generated from the models and kept in step with
them and with README's tables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tasks.prepare.modalities import MODALITIES, modality
from tasks.spec.models import FusionSpec, RunSpec, TrainingSpec
from tasks.spec.reference import COMMAND, reference, sections

ROOT = Path(__file__).resolve().parents[1]


def test_docs_spec_is_the_generated_reference() -> None:
    written = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
    assert written == reference(), f"docs/spec.md is out of date; regenerate it: {COMMAND}"


def test_every_spec_field_has_a_description() -> None:
    missing = [
        f"{section.header or '(top level)'}.{name}"
        for section in sections()
        for name, field in section.model.model_fields.items()
        if not field.description
    ]
    assert missing == [], f"give these fields a description=: {missing}"


def test_every_registered_modality_has_its_options_documented() -> None:
    text = reference()
    for kind in sorted(k for k in MODALITIES if k in ("table", "text", "events")):
        assert f'"{kind}"' in text
        for name in modality(kind).options.model_fields:
            assert f"| `{name}` |" in text


def _readme_keys(table: str) -> set[str]:
    """The keys in the first column of README's table introduced by a line starting with
    ``[table]`` in "The consortium spec"."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The consortium spec", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"`[{table}]`")), None)
    assert start is not None, f"README 'The consortium spec' has no `[{table}]` table"
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return {key for row in rows[2:] for key in re.findall(r"`([a-z_]+)`", row.split("|")[1])}


@pytest.mark.parametrize(
    ("table", "model"), [("training", TrainingSpec), ("fusion", FusionSpec), ("run", RunSpec)]
)
def test_readme_tables_name_every_key(table: str, model: type[BaseModel]) -> None:
    missing = sorted(set(model.model_fields) - _readme_keys(table))
    assert missing == [], f"README.md 'The consortium spec': the [{table}] table lacks {missing}"


class RowKey(BaseModel):
    """A key from the row number."""

    row_number: bool = Field(description="The data row number is the entity id")


class ColumnsKey(BaseModel):
    columns: list[str] = Field(min_length=1, description="Raw columns of a composite key")


class Vocabulary(BaseModel):
    values: list[str] = Field(default_factory=list, description="Known values")
    max_size: int | None = Field(default=None, ge=1, le=4096, description="Cap")


class Source(BaseModel):
    key: RowKey | ColumnsKey | None = Field(default=None, description="How rows are keyed")
    windows: list[int | str] = Field(default_factory=lambda: [30, "6h"], description="Windows")
    end: Literal["as_of", "last_event"] = Field(default="as_of", description="Window end")


class Root(BaseModel):
    sources: list[Source] = Field(description="Sources")
    vocabularies: dict[str, list[str] | Vocabulary] = Field(
        default_factory=dict, description="Vocabularies"
    )


def test_new_fields_of_any_shape_are_picked_up() -> None:
    """Unions of models, models in lists and tables, Literal choices, bounds and defaults."""
    text = reference(Root)
    headers = [s.header for s in sections(Root)]
    assert headers == ["", "sources[]", "sources[].key", "sources[].key", "vocabularies.<name>"]
    assert "## `[[sources]]`" in text
    assert "## `[sources.key]`" in text
    assert "| `row_number` | boolean | required |  | The data row number is the entity id |" in text
    assert "| `columns` | list of string | required | at least 1 item(s) |" in text
    assert "| `key` | table, keys as `[sources.key]` or table, keys as `[sources.key]` |" in text
    assert '| `windows` | list of integer or string | `[30, "6h"]` |  | Windows |' in text
    assert '| `end` | string | `"as_of"` | `"as_of"`, `"last_event"` | Window end |' in text
    assert "## `[vocabularies.<name>]`" in text
    assert "| `max_size` | integer | `none` | ≥ 1; ≤ 4096 | Cap |" in text
    assert "table of list of string or table, keys as `[vocabularies.<name>]`" in text


def test_modality_registered_elsewhere_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    before = reference()
    table = type(modality("table"))
    elsewhere = type("Elsewhere", (table,), {"kind": "elsewhere", "__module__": __name__})
    monkeypatch.setitem(MODALITIES, "elsewhere", elsewhere())
    assert reference() == before
