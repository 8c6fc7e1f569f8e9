"""``fedfuse init``: draft a consortium spec from sample export files.
:mod:`flows.cli.app` adds it with :func:`register`."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.markup import escape

from flows.cli.console import console, errors

_PARTY_ID = re.compile(r"^[A-Za-z0-9_\-]+$")


def _fail(message: str) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code=1)


def _party_files(given: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in given:
        party, sep, path = item.partition("=")
        if not sep or not path:
            raise _fail(f"--party {item!r}: give PARTY=FILE")
        if not _PARTY_ID.match(party):
            raise _fail(f"--party {item!r}: a party id holds letters, digits, '_' and '-' only")
        pairs.append((party, str(Path(path).absolute())))
    return pairs


def init(
    out: Annotated[Path, typer.Argument(help="Spec file to write (TOML)")],
    party: Annotated[
        list[str],
        typer.Option(help="PARTY=FILE: a sample export of a party (repeat per file)"),
    ],
    label: Annotated[str, typer.Option(help="Raw name of the label column")],
    label_party: Annotated[
        str | None, typer.Option(help="Party holding the label (vertical)")
    ] = None,
    layout: Annotated[
        Literal["horizontal", "vertical"] | None,
        typer.Option(help="Layout (default: from the columns the parties share)"),
    ] = None,
    entity: Annotated[str | None, typer.Option(help="Canonical name of the entity key")] = None,
    min_entities: Annotated[
        int, typer.Option(min=1, help="Entities a category value needs at a party to be listed")
    ] = 10,
    as_of: Annotated[
        dt.datetime | None,
        typer.Option(formats=["%Y-%m-%d"], help="End of the feature windows (default: today)"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Consortium name (default: OUT's stem)")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite OUT if it exists")] = False,
) -> None:
    """Draft a spec from sample export files; review it, then run fedfuse validate."""
    from storage.files import write_text_atomic
    from storage.sample import read_sample
    from storage.sources import SourceError
    from tasks.spec.draft import DraftError, DraftOptions, draft_spec, render_toml
    from tasks.spec.models import infer_format

    if out.is_dir():
        raise _fail(f"{out}: is a folder; give the spec file to write")
    if out.exists() and not force:
        raise _fail(f"{out}: exists; give --force to overwrite it")
    samples = []
    try:
        for party_id, path in _party_files(party):
            samples.append((party_id, read_sample(path, infer_format(path))))
        draft = draft_spec(
            samples,
            DraftOptions(
                label=label,
                label_party=label_party,
                layout=layout,
                entity=entity,
                min_entities=min_entities,
                as_of=as_of.date() if as_of else dt.datetime.now(dt.UTC).date(),
                name=name or out.stem,
                spec_folder=str(out.absolute().parent),
            ),
        )
    except (SourceError, DraftError, ValueError) as exc:
        raise _fail(str(exc)) from None
    write_text_atomic(str(out), render_toml(draft))
    console.print(
        f"wrote draft spec [bold]{escape(str(out))}[/]: {len(draft.parties)} "
        f"{'party' if len(draft.parties) == 1 else 'parties'}, "
        f"{draft.layout} layout, {draft.task} task; review it, then run fedfuse validate",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command(name="init")(init)
