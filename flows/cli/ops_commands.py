"""Operations commands (deploy, serve, run, status, retry) of the ``fedfuse`` CLI:
``flows.cli.app`` adds them with :func:`register`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from flows.cli.console import console, errors, quiet_prefect, reported
from tasks.spec.load import load_spec

if TYPE_CHECKING:
    from flows.ops import Role, Schedules


@contextmanager
def _api() -> Iterator[None]:
    """These commands need a Prefect server that outlives them: fail clearly without one."""
    import httpx
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        errors.print(
            "[bold red]error:[/] PREFECT_API_URL is not set: start a server "
            "(prefect server start) and point the client at it "
            "(prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api)",
            highlight=False,
        )
        raise typer.Exit(code=1)
    try:
        yield
    except httpx.TransportError as exc:
        errors.print(
            f"[bold red]error:[/] cannot reach the Prefect API at {escape(url)}: "
            f"{escape(str(exc))}",
            highlight=False,
        )
        raise typer.Exit(code=1) from None


#: The same guard for the other command modules (``fedfuse schedule``).
api = _api


def _deploy_options(
    schedule: list[str] | None,
    active: list[str] | None,
    inactive: list[str] | None,
    no_schedules: bool,
    param: list[str] | None,
) -> tuple[Schedules, dict[Role, dict[str, Any]]]:
    """The schedules and default parameters given to deploy or serve; a bad one is a
    one-line error and exit code 2."""
    from flows.ops import Schedules, parse_role_params

    try:
        schedules = Schedules.from_options(
            schedule or [], active=active or [], inactive=inactive or [], none=no_schedules
        )
        parameters = parse_role_params(param or [])
    except ValueError as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(code=2) from None
    return schedules, parameters


SpecArg = Annotated[
    Path, typer.Argument(help="Consortium spec (TOML)", exists=True, dir_okay=False)
]
NameOpt = Annotated[
    str | None,
    typer.Option(help="Deployment name (default: the consortium name, e.g. prepare/<name>)"),
]
ScheduleOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--schedule",
        "-s",
        help="ROLE=cron:EXPR, ROLE=interval:SECONDS (or 30min, 6h, 1d) or ROLE=none; ROLE "
        "is prepare, training or score (defaults: prepare cron:0 2 * * *, training "
        "cron:0 4 * * 1, score interval:6h inactive)",
    ),
]
ActiveOpt = Annotated[
    list[str] | None, typer.Option("--active", help="ROLE whose schedule is made active")
]
InactiveOpt = Annotated[
    list[str] | None, typer.Option("--inactive", help="ROLE whose schedule is made inactive")
]
NoSchedOpt = Annotated[bool, typer.Option("--no-schedules", help="Create no schedules")]
DeployParamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        "-p",
        help="ROLE.key=value: a default parameter of that deployment (training.rounds=10), "
        "checked against its flow's signature",
    ),
]


def deploy(
    spec: SpecArg,
    pool: Annotated[str, typer.Option(help="Process work pool (created if missing)")] = "fedfuse",
    name: NameOpt = None,
    schedule: ScheduleOpt = None,
    active: ActiveOpt = None,
    inactive: InactiveOpt = None,
    no_schedules: NoSchedOpt = False,
    param: DeployParamOpt = None,
) -> None:
    """Register the prepare, federated-training and score deployments of a spec on a work pool,
    and each party's own deployments on the party's work_pool (when the spec gives one).

    Start a worker for each pool to run them: prefect worker start --pool POOL
    """
    from flows.ops import deploy as deploy_spec

    quiet_prefect()
    schedules, parameters = _deploy_options(schedule, active, inactive, no_schedules, param)
    with _api(), reported():
        try:
            names = deploy_spec(
                spec, pool=pool, name=name, schedules=schedules, parameters=parameters
            )
        except ValueError as exc:  # e.g. the pool exists with another type
            errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(code=1) from None
    for full in names:
        console.print(escape(full), highlight=False)
    pools = [pool, *sorted({p.work_pool for p in load_spec(str(spec)).parties if p.work_pool})]
    errors.print(
        f"deployed on work pool(s) [bold]{escape(', '.join(pools))}[/]; start a worker for each: "
        + "; ".join(f"prefect worker start --pool {escape(p)}" for p in pools),
        highlight=False,
    )


def serve(
    spec: SpecArg,
    name: NameOpt = None,
    schedule: ScheduleOpt = None,
    active: ActiveOpt = None,
    inactive: InactiveOpt = None,
    no_schedules: NoSchedOpt = False,
    param: DeployParamOpt = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Most runs at the same time")] = None,
) -> None:
    """Serve the three deployments of a spec from this process (no work pool, no worker).

    Runs until Ctrl-C; on shutdown Prefect pauses the served schedules.
    """
    from flows.ops import serve as serve_spec

    quiet_prefect()
    schedules, parameters = _deploy_options(schedule, active, inactive, no_schedules, param)
    with _api(), reported():
        try:
            serve_spec(spec, name=name, schedules=schedules, limit=limit, parameters=parameters)
        except ValueError as exc:  # a parameter the flow does not take
            errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(code=1) from None


def run(
    deployment: Annotated[
        str, typer.Argument(help="flow/deployment, e.g. prepare/retail (a bare name: name/name)")
    ],
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="key=value (value parsed as JSON when it is JSON)"),
    ] = None,
    watch: Annotated[
        bool, typer.Option(help="Follow the run until it is final; exit 1 unless it completed")
    ] = False,
    poll: Annotated[float, typer.Option(min=0.1, help="Seconds between polls (--watch)")] = 1.0,
) -> None:
    """Start a run of a deployment (a worker or `fedfuse serve` runs it)."""
    from flows.ops import parse_params

    quiet_prefect()
    try:
        params = parse_params(param or [])
    except ValueError as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(code=2) from None
    with _api():
        _start_and_watch(deployment, params, watch=watch, poll=poll)


def _start_and_watch(deployment: str, params: dict[str, Any], *, watch: bool, poll: float) -> None:
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    from flows.ops import full_deployment_name, run_summary, start_run
    from flows.ops import watch as watch_run

    try:
        flow_run = start_run(deployment, params)
    except ValueError as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(code=2) from None
    except ObjectNotFound:
        errors.print(
            f"[bold red]error:[/] no deployment {escape(repr(full_deployment_name(deployment)))}",
            highlight=False,
        )
        raise typer.Exit(code=1) from None
    except PrefectHTTPStatusError as exc:  # e.g. parameters that fail the deployment's schema
        try:
            detail = exc.response.json().get("detail", str(exc))
        except ValueError:
            detail = str(exc)
        errors.print(f"[bold red]error:[/] {escape(str(detail))}", highlight=False)
        raise typer.Exit(code=1) from None
    console.print(f"flow run {escape(flow_run.name)} {flow_run.id}", highlight=False)
    if not watch:
        return
    final = watch_run(
        flow_run.id, lambda line: console.print(line, highlight=False, markup=False), poll=poll
    )
    for line in run_summary(final):
        console.print(line, highlight=False, markup=False)
    if final.state is None or not final.state.is_completed():
        raise typer.Exit(code=1)


def _when(value: dt.datetime | None) -> str:
    return value.astimezone().strftime("%m-%d %H:%M:%S") if value else "-"


def _duration(value: dt.timedelta | None) -> str:
    if value is None:
        return "-"
    seconds = value.total_seconds()
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


STATE_STYLES = {
    "Completed": "green",
    "Cached": "green",
    "Failed": "red",
    "Crashed": "red",
    "Running": "cyan",
    "Scheduled": "yellow",
    "Pending": "yellow",
    "Cancelled": "magenta",
}


def status(
    limit: Annotated[int, typer.Option(min=1, help="How many runs")] = 20,
    subflows: Annotated[
        bool, typer.Option(help="Also list subflow runs (parties, training rounds)")
    ] = False,
    ids: Annotated[bool, typer.Option(help="Add a column with the flow run ids")] = False,
    deployments: Annotated[
        bool, typer.Option(help="Also list the deployments and their schedules")
    ] = True,
) -> None:
    """Recent flow runs: name, flow, deployment, party, round, state, start, duration; then
    the deployments with their schedules (inactive ones marked)."""
    from flows.cli.schedule_commands import print_deployments
    from flows.ops import deployment_rows, recent_runs

    quiet_prefect()
    with _api():
        rows = recent_runs(limit, subflows=subflows)
        listed = deployment_rows() if deployments else None
    table = Table(title=f"recent flow runs ({len(rows)})", header_style="bold")
    columns = ["name", "flow", "deployment", "party", "round", "state", "start", "duration"]
    for column in columns + (["id"] if ids else []):
        table.add_column(
            column,
            justify="right" if column in ("round", "duration") else "left",
            no_wrap=column in ("round", "state", "start", "duration"),
            overflow="fold",
            min_width=10 if column in ("name", "flow", "deployment") else None,
        )
    for row in rows:
        style = STATE_STYLES.get(row.state, "")
        cells = [  # cells are markup: run, flow and deployment names are user text
            escape(row.name),
            escape(row.flow),
            escape(row.deployment),
            escape(row.party or "-"),
            str(row.round) if row.round is not None else "-",
            f"[{style}]{row.state}[/]" if style else row.state,
            _when(row.start),
            _duration(row.duration),
        ]
        table.add_row(*cells, *([str(row.id)] if ids else []))
    console.print(table)
    if listed is not None:
        print_deployments(listed)


def retry(
    flow_run: Annotated[str, typer.Argument(help="Name or id of a finished run of a deployment")],
) -> None:
    """Schedule a finished (e.g. failed) run again; steps with cached results are skipped."""
    from flows.ops import retry_run

    quiet_prefect()
    with _api():
        try:
            run_ = retry_run(flow_run)
        except (ValueError, RuntimeError) as exc:
            errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(code=1) from None
    console.print(f"flow run {escape(run_.name)} {run_.id} scheduled again", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the operations commands to the ``fedfuse`` CLI, in this order."""
    for command in (deploy, serve, run, status, retry):
        app.command()(command)
