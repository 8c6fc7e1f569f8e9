"""The ``fedfuse`` command line: the typer app, with the main commands
(:mod:`flows.cli.commands`) and then the operations commands (:mod:`flows.cli.ops_commands`)."""

from __future__ import annotations

import sys

import typer

from flows.cli import commands, init_command, ops_commands, registry_command, schedule_commands

app = typer.Typer(
    name="fedfuse",
    help="Federated training over heterogeneous party data, run as Prefect flows.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

commands.register(app)  # validate, demo-data, prepare, train, demo, predict, export
ops_commands.register(app)  # deploy, serve, run, status, retry
init_command.register(app)  # init: draft a spec from sample exports
schedule_commands.register(app)  # schedule pause|resume|ls
registry_command.register(app)  # register: the exported model in an MLflow registry


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
