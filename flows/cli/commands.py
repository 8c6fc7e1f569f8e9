"""The main ``fedfuse`` commands: validate, demo-data, prepare, train, demo, predict,
export. :mod:`flows.cli.app` adds them with :func:`register`."""

from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.markup import escape
from rich.table import Table

from flows.cli.console import console, errors, quiet_prefect, reported

if TYPE_CHECKING:
    from flows.publish import TrainingResult
    from flows.vertical import VerticalResult
    from tasks.spec.models import FedSpec

DEMO_SECRET_ENV = "FEDFUSE_SECRET"


def validate(
    spec: Annotated[Path, typer.Argument(help="Consortium spec (TOML)")],
    secret: Annotated[
        bool,
        typer.Option(
            help="Also check that the consortium secret is reachable here (the environment "
            "variable is set, or the Prefect Secret block exists) and strong enough"
        ),
    ] = True,
) -> None:
    """Check a consortium spec; print a summary or every problem with its key path."""
    from storage.secrets import SecretError, resolve_secret
    from tasks.spec.load import load_spec, summary
    from tasks.spec.models import SpecError

    try:
        loaded = load_spec(str(spec))
    except SpecError as exc:
        errors.print(f"[bold red]{escape(str(spec))}: {len(exc.problems)} problem(s)[/]")
        for problem in exc.problems:
            errors.print(f"  {problem}", markup=False, highlight=False)
        raise typer.Exit(code=1) from None
    except FileNotFoundError as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(code=1) from None
    ref = loaded.consortium.secret
    if secret:
        try:
            resolve_secret(env=ref.env, block=ref.block)
        except SecretError as exc:
            errors.print(
                f"[bold red]{escape(str(spec))}: consortium.secret:[/] {escape(str(exc))}",
                highlight=False,
            )
            raise typer.Exit(code=1) from None
    console.print(f"[green]valid[/] {escape(str(spec))}", highlight=False)
    console.print(summary(loaded), markup=False, highlight=False)
    where = f"environment variable {ref.env}" if ref.env else f"Prefect Secret block {ref.block!r}"
    console.print(
        f"  secret: {where}" + (", reachable here" if secret else " (not checked)"),
        markup=False,
        highlight=False,
    )


def checked_spec(spec: Path) -> FedSpec:
    """The loaded spec, its consortium secret read where it says (every party runs in this
    process): a :class:`~tasks.spec.models.SpecError` or
    :class:`~storage.secrets.SecretError` comes before the flows are even imported."""
    from storage.secrets import resolve_secret
    from tasks.spec.load import load_spec

    loaded = load_spec(str(spec))
    resolve_secret(env=loaded.consortium.secret.env, block=loaded.consortium.secret.block)
    return loaded


def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to write the spec and raw sources to")],
    layout: Annotated[
        Literal["horizontal", "vertical"], typer.Option(help="Consortium layout")
    ] = "horizontal",
    parties: Annotated[int, typer.Option(min=1, help="Number of parties (horizontal)")] = 3,
    customers: Annotated[int, typer.Option(min=10, help="Customers in the consortium")] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes)")] = 0,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet label skew across sites")] = None,
    events_per_device: Annotated[
        float, typer.Option(min=0.0, help="Mean IoT events per device")
    ] = 20.0,
    party_pools: Annotated[
        bool, typer.Option(help="Give every party its own work pool fedfuse-<party>")
    ] = False,
) -> None:
    """Write a realistic heterogeneous demo consortium: spec plus raw party exports."""
    from tasks.demo_data import write_demo_consortium

    spec = write_demo_consortium(
        str(out),
        layout=layout,
        parties=parties,
        customers=customers,
        seed=seed,
        alpha=alpha,
        events_per_device=events_per_device,
        party_pools=party_pools,
    )
    console.print(f"wrote demo consortium: [bold]{escape(spec)}[/]", highlight=False)


def _progress_display() -> Iterator[None]:
    from rich.live import Live

    from flows import progress

    rows: dict[str, str] = {}

    def render() -> Table:
        table = Table(show_header=True, header_style="bold", box=None)
        table.add_column("party")
        table.add_column("step")
        for scope, text in sorted(rows.items()):
            table.add_row(escape(scope), escape(text))  # cells are markup: names are user text
        return table

    with Live(render(), console=console, refresh_per_second=8, transient=False) as live:

        def listener(scope: str, step: str, detail: str) -> None:
            rows[scope] = f"{step}: {detail}" if detail else step
            live.update(render())

        stop = progress.subscribe(listener)
        try:
            yield
        finally:
            stop()
    console.line()


progress_display = contextmanager(_progress_display)


def _print_prepared(outputs: dict[str, object]) -> None:
    from flows.prepare import quality_rows
    from tasks.prepare.steps import FusedOutput

    fused = [o for o in outputs.values() if isinstance(o, FusedOutput)]
    table = Table(title="data quality", header_style="bold")
    for column in ("party", "source", "rows_in", "rows_out", "rejected", "duplicates", "reasons"):
        table.add_column(column, overflow="fold")
    for row in quality_rows(fused):
        table.add_row(  # cells are markup: reasons name the party's columns
            *(
                escape(str(row[c]))
                for c in (
                    "party",
                    "source",
                    "rows_in",
                    "rows_out",
                    "rejected",
                    "duplicates",
                    "reasons",
                )
            )
        )
    console.print(table)
    for out in fused:
        console.print(
            f"[bold]{escape(out.party)}[/]: fused {out.table.rows} entities x "
            f"{len(out.features)} features -> {escape(out.table.uri)}",
            highlight=False,
        )


def prepare(
    spec: Annotated[Path, typer.Argument(help="Consortium spec (TOML)")],
    as_of: Annotated[
        dt.datetime | None,
        typer.Option(formats=["%Y-%m-%d"], help="Feature window end (default: the spec's)"),
    ] = None,
    refresh: Annotated[
        bool, typer.Option(help="Recompute every step, ignoring cached results")
    ] = False,
) -> None:
    """Run every party's pipeline (preprocess, features, align, fuse) as Prefect flows."""
    quiet_prefect()
    with reported():
        checked_spec(spec)  # key paths, an unreachable secret: before any flow or server
        from flows.prepare import prepare as prepare_flow

        with progress_display():
            outputs = prepare_flow(
                str(spec.resolve()), as_of=as_of.date() if as_of else None, refresh=refresh
            )
        _print_prepared(dict(outputs))


@contextmanager
def _flow_settings() -> Iterator[None]:
    """In-process runs need no heartbeat thread (it delays every flow by about a second)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _print_rounds(title: str, valid: list[dict[str, float]], best_round: int) -> None:
    """Validation metrics per round, the best round marked."""
    from tasks.report import format_metric, metric_title

    rounds = Table(title=title, header_style="bold")
    metrics = sorted(valid[0]) if valid else []
    for column in ("round", *map(metric_title, metrics)):
        rounds.add_column(column, justify="right")
    for i, values in enumerate(valid, start=1):
        mark = " *" if i == best_round else ""
        rounds.add_row(f"{i}{mark}", *(format_metric(m, values[m]) for m in metrics))
    console.print(rounds)


def _print_metrics(rows: list[dict[str, str]]) -> None:
    table = Table(title="test metrics at the best round", header_style="bold")
    for column in rows[0]:
        table.add_column(column, justify="right" if column != "model" else "left")
    for row in rows:
        table.add_row(*(escape(v) for v in row.values()))
    console.print(table)


def _print_training(result: TrainingResult) -> None:
    from tasks.horizontal.rounds import STOP_TEXT
    from tasks.report import AUC_NOTE, comparison_rows, has_pooled_auc

    _print_rounds(
        "federated rounds (aggregated validation metrics)", result.valid, result.best_round
    )
    _print_metrics(comparison_rows(result.comparison, "binary"))
    if has_pooled_auc([result.comparison.federated, *result.valid]):
        console.print(AUC_NOTE, highlight=False)
    console.print(
        f"global ensemble: {result.trees} trees ({result.model_bytes / 1024:.0f} KiB), "
        f"best round {result.best_round} of {result.rounds_run}"
        + (f"; stopped: {STOP_TEXT[result.stop_reason]}" if result.stop_reason else ""),
        highlight=False,
    )
    for party, why in sorted(result.left_out.items()):
        errors.print(f"party {escape(party)} left out of training: {escape(why)}", highlight=False)
    for round_, dropped in sorted(result.dropped.items()):
        for party, why in sorted(dropped.items()):
            errors.print(
                f"round {round_}: update of {escape(party)} left out: {escape(why)}",
                highlight=False,
            )
    for warning in result.warnings:
        errors.print(f"warning: {escape(warning)}", highlight=False)
    console.print(f"model (LightGBM text): {escape(result.model)}", highlight=False)
    console.print(f"manifest: {escape(result.manifest)}", highlight=False)
    console.print(f"report: {escape(result.report)}", highlight=False)


def _print_vertical(result: VerticalResult) -> None:
    console.print(
        f"private set intersection: {result.overlap} entities at every party "
        f"(set sizes {escape(str(result.set_sizes))})",
        highlight=False,
    )
    _print_rounds(
        "vertical rounds (label party's validation metrics)", result.valid, result.best_round
    )
    from tasks.report import VERTICAL_AUC_NOTE, metric_rows

    _print_metrics(metric_rows(list(result.comparison.items())))
    if any("auc" in m for m in result.comparison.values()):
        console.print(VERTICAL_AUC_NOTE, highlight=False)
    console.print(
        f"{result.trees} trees over {len(result.parties)} parties, best round "
        f"{result.best_round} of {result.rounds_run}; each party's trees stay in its store",
        highlight=False,
    )
    console.print(f"manifest: {escape(result.manifest)}", highlight=False)


def train(
    spec: Annotated[Path, typer.Argument(help="Consortium spec (TOML)")],
    baselines: Annotated[
        bool, typer.Option(help="Also train local-only and centralised baselines")
    ] = True,
    refresh: Annotated[
        bool, typer.Option(help="Recompute every step, start training afresh")
    ] = False,
    rounds: Annotated[
        int | None, typer.Option(min=1, help="Override the spec's round limit")
    ] = None,
) -> None:
    """Prepare every party, then train the global ensemble round after round."""
    quiet_prefect()
    with reported(), _flow_settings():
        loaded = checked_spec(spec)  # before any flow or server starts
        from flows.horizontal import federated_training

        if loaded.consortium.layout == "vertical":
            from flows.vertical import vertical_training

            with progress_display():
                vresult = vertical_training(
                    str(spec.resolve()), refresh=refresh, rounds=rounds, baselines=baselines
                )
            _print_vertical(vresult)
            return
        with progress_display():
            result = federated_training(
                str(spec.resolve()), refresh=refresh, rounds=rounds, baselines=baselines
            )
        _print_training(result)


#: Demo sizes: a vertical demo aligns only about a fifth of its customers (every party must
#: know them), so it needs more of them for a test split that separates the models.
DEMO_CUSTOMERS = 5000
VERTICAL_DEMO_CUSTOMERS = 20_000


def demo_customers(layout: str, customers: int | None) -> int:
    """The demo's consortium size: the one asked for, else the layout's default."""
    if customers is not None:
        return customers
    return VERTICAL_DEMO_CUSTOMERS if layout == "vertical" else DEMO_CUSTOMERS


def demo(
    out: Annotated[Path, typer.Option(help="Working folder for the demo consortium")] = Path(
        "demo-out"
    ),
    layout: Annotated[
        Literal["horizontal", "vertical"], typer.Option(help="Consortium layout")
    ] = "horizontal",
    parties: Annotated[int, typer.Option(min=1)] = 3,
    customers: Annotated[
        int | None,
        typer.Option(
            min=10,
            help="Customers in the consortium (default 5000; vertical 20000, so that the "
            "overlap's test split, about 840 customers, tells the models apart)",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Demo end to end on embedded defaults: consortium -> prepare -> federated training -> report."""
    quiet_prefect()
    if not os.environ.get(DEMO_SECRET_ENV):
        os.environ[DEMO_SECRET_ENV] = secrets.token_hex(32)
        errors.print(
            f"[yellow]{DEMO_SECRET_ENV} is not set: using a random secret for this demo run[/]"
        )
    from tasks.demo_data import write_demo_consortium

    spec = write_demo_consortium(
        str(out),
        layout=layout,
        parties=parties,
        customers=demo_customers(layout, customers),
        seed=seed,
    )
    console.print(f"demo consortium written: [bold]{escape(spec)}[/]", highlight=False)
    with reported(), _flow_settings():
        if layout == "vertical":
            from flows.vertical import vertical_training

            with progress_display():
                vresult = vertical_training(str(Path(spec).resolve()), baselines=True)
            _print_vertical(vresult)
            return
        from flows.horizontal import federated_training

        with progress_display():
            result = federated_training(str(Path(spec).resolve()), baselines=True)
        _print_training(result)


def predict(
    spec: Annotated[Path, typer.Argument(help="Consortium spec (TOML)")],
    party: Annotated[
        str, typer.Option(help="The party whose new data is scored (vertical: the label party)")
    ],
    data: Annotated[
        list[str] | None,
        typer.Option(
            help="New raw exports (same file names as the spec's sources): DIR for --party, "
            "or PARTY=DIR, repeatable (vertical: one per party); default: the spec's sources"
        ),
    ] = None,
    run: Annotated[
        str | None, typer.Option(help="Run key of the model (default: this spec's latest run)")
    ] = None,
    manifest: Annotated[
        str | None, typer.Option(help="Ensemble manifest (default: the run's)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Also write the predictions to this CSV file")
    ] = None,
) -> None:
    """Run a party's pipeline on new raw data and score it with the global ensemble."""
    quiet_prefect()
    with reported(), _flow_settings():
        loaded = checked_spec(spec)  # before any flow or server starts
        from flows.score import ScoringInputError, resolve_run, score
        from flows.vertical import vertical_score
        from storage.files import write_text_atomic
        from storage.store import read_table

        try:
            folders = _data_folders(data or [], party, {p.id for p in loaded.parties})
        except ValueError as exc:
            raise ScoringInputError(str(exc)) from None
        if manifest is None:
            chosen = resolve_run(loaded, run)
            manifest = chosen.manifest
            console.print(f"model: run {escape(chosen.describe())}", highlight=False)
        console.print(f"manifest: {escape(manifest)}", highlight=False)
        if loaded.consortium.layout == "vertical":
            stale = [p.id for p in loaded.parties if p.id not in folders]
            if folders and stale:
                errors.print(
                    f"[yellow]warning:[/] no new data for {escape(', '.join(stale))}: "
                    "they score on their training exports",
                    highlight=False,
                )
            ref = vertical_score(
                str(spec.resolve()), party, data=folders or None, manifest=manifest
            )
        else:
            if set(folders) - {party}:
                raise ScoringInputError(
                    f"{spec}: a horizontal prediction scores one party's data (--party "
                    f"{party}); --data names {', '.join(sorted(set(folders) - {party}))}"
                )
            ref = score(str(spec.resolve()), party, data=folders.get(party), manifest=manifest)
        frame = read_table(ref)
        console.print(f"{frame.height} entities scored -> {escape(ref.uri)}", highlight=False)
        console.print(frame.head(5))
        if out is not None:
            write_text_atomic(str(out.resolve()), frame.write_csv())
            console.print(f"predictions written to {escape(str(out))}", highlight=False)


def _data_folders(items: list[str], party: str, parties: set[str]) -> dict[str, str]:
    """``--data`` values: ``PARTY=DIR`` or a plain ``DIR`` (the ``--party`` party's)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or name not in parties:
            name, folder = party, item
        if name in out:
            raise ValueError(f"--data: two folders for party {name}")
        out[name] = str(Path(folder).resolve())
    return out


def export(
    spec: Annotated[Path, typer.Argument(help="Consortium spec (TOML)")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where to write: the native LightGBM model file (default model.txt); for a "
            "vertical run, the folder for the per-party model files and fusion.json "
            "(default model)"
        ),
    ] = None,
    manifest: Annotated[
        str | None, typer.Option(help="Model manifest (default: the latest training run)")
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option(min=0, help="Rounds to include (default: the best round; horizontal only)"),
    ] = None,
) -> None:
    """Write the global ensemble as one native LightGBM model file; a vertical run as one
    LightGBM model file per party and the fusion rule (fusion.json) in a folder."""
    with reported():
        from flows.score import latest_manifest, resolve_run
        from storage.files import write_text_atomic
        from storage.store import read_manifest
        from tasks.horizontal.ensemble import ensemble_size, export_model
        from tasks.scoring import load_ensemble
        from tasks.spec.load import load_spec

        loaded = load_spec(str(spec))
        if manifest is None:
            vertical = resolve_run(loaded).is_vertical
        else:
            vertical = read_manifest(manifest)[0].get("layout") == "vertical"
        if vertical:
            _export_vertical(spec, out or Path("model"), manifest, rounds)
            return
        ensemble = load_ensemble(manifest or latest_manifest(loaded))
        upto = ensemble.resolve_round(rounds)
        text = export_model(ensemble, upto_round=upto)
        target = out or Path("model.txt")
        write_text_atomic(str(target.resolve()), text)
        size = ensemble_size(ensemble, upto_round=upto)
        console.print(
            f"wrote {escape(str(target))}: {size.trees} trees, {size.bytes / 1024:.0f} KiB "
            f"(round {upto} of {len(ensemble.rounds)})",
            highlight=False,
        )


def _export_vertical(spec: Path, out: Path, manifest: str | None, rounds: int | None) -> None:
    """The vertical export: per-party model files and fusion.json in the folder ``out``."""
    from flows.vertical import export_vertical

    if rounds is not None:
        errors.print(
            "[bold red]error:[/] --rounds applies to horizontal ensembles; a vertical run is "
            "exported at the round its fusion rule was fitted for",
            highlight=False,
        )
        raise typer.Exit(code=1)
    if out.is_file():
        errors.print(
            f"[bold red]error:[/] {escape(str(out))} is a file; a vertical run is exported "
            "into a folder",
            highlight=False,
        )
        raise typer.Exit(code=1)
    written = export_vertical(str(spec.resolve()), str(out.resolve()), manifest)
    for location in written:
        console.print(f"wrote {escape(location)}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the main commands to the ``fedfuse`` CLI, in this order."""
    app.command()(validate)
    app.command("demo-data")(demo_data)
    for command in (prepare, train, demo, predict, export):
        app.command()(command)
