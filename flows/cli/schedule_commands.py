"""``fedfuse schedule pause|resume|ls``: the schedules of deployments on a Prefect server.
:mod:`flows.cli.app` adds the group with :func:`register`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from flows.cli.console import console, errors, quiet_prefect

if TYPE_CHECKING:
    from flows.ops import DeploymentRow

schedule_app = typer.Typer(
    name="schedule",
    help="Pause, resume and list the schedules of deployments (fedfuse deploy creates them).",
    no_args_is_help=True,
)

DeploymentArg = Annotated[
    str, typer.Argument(help="flow/deployment, e.g. score/retail (a bare name: name/name)")
]
SlugOpt = Annotated[
    str | None,
    typer.Option(help="Only the schedule with this slug (default: every schedule of it)"),
]


def print_deployments(rows: list[DeploymentRow]) -> None:
    """One line per schedule (a deployment without one: a line of its own); inactive
    schedules and paused deployments are marked."""
    table = Table(title=f"deployments ({len(rows)})", header_style="bold")
    for column in ("deployment", "work pool", "schedule", "slug", "active"):
        table.add_column(column, overflow="fold", no_wrap=column == "active")
    for row in rows:
        name = escape(row.name) + (" [magenta](paused)[/]" if row.paused else "")
        if not row.schedules:
            table.add_row(name, escape(row.work_pool), "-", "-", "-")
        for schedule in row.schedules:
            active = "[green]active[/]" if schedule.active else "[yellow]INACTIVE[/]"
            table.add_row(
                name, escape(row.work_pool), escape(schedule.what), escape(schedule.slug), active
            )
    console.print(table)


def _set(deployment: str, active: bool, slug: str | None) -> None:
    from prefect.exceptions import ObjectNotFound

    from flows.cli.ops_commands import api
    from flows.ops import full_deployment_name, set_schedules_active

    quiet_prefect()
    with api():
        try:
            changed = set_schedules_active(deployment, active, slug=slug)
        except ObjectNotFound:
            errors.print(
                f"[bold red]error:[/] no deployment {escape(repr(full_deployment_name(deployment)))}",
                highlight=False,
            )
            raise typer.Exit(code=1) from None
        except ValueError as exc:
            errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(code=1) from None
    state = "active" if active else "inactive"
    for schedule in changed:
        console.print(
            f"{escape(full_deployment_name(deployment))} {escape(schedule.slug)} "
            f"({escape(schedule.what)}): {state}",
            highlight=False,
        )


@schedule_app.command()
def pause(deployment: DeploymentArg, slug: SlugOpt = None) -> None:
    """Make a deployment's schedules inactive (no new scheduled runs; manual runs still work)."""
    _set(deployment, False, slug)


@schedule_app.command()
def resume(deployment: DeploymentArg, slug: SlugOpt = None) -> None:
    """Make a deployment's schedules active again (and resume the deployment if paused)."""
    _set(deployment, True, slug)


@schedule_app.command("ls")
def list_schedules() -> None:
    """Every deployment with its schedules, inactive ones marked."""
    from flows.cli.ops_commands import api
    from flows.ops import deployment_rows

    quiet_prefect()
    with api():
        rows = deployment_rows()
    print_deployments(rows)


def register(app: typer.Typer) -> None:
    """Add the ``schedule`` group to the ``fedfuse`` CLI."""
    app.add_typer(schedule_app)
