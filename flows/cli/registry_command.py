"""``fedfuse register``: the exported model of a run as an MLflow registered model (the
optional extra ``fedfuse[mlflow]``). fedfuse's own export stays the primary artefact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from flows.cli.console import console, reported


def register_model(
    spec: Annotated[Path, typer.Argument(help="Consortium spec (TOML)")],
    run: Annotated[
        str | None, typer.Option(help="Run key of the model (default: this spec's latest run)")
    ] = None,
    registry: Annotated[
        str | None,
        typer.Option(
            help="MLflow tracking/registry URI (default: sqlite:///<coordinator store>/mlflow/"
            "mlflow.db; required for an object-store coordinator)"
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Registered model name (default: fedfuse-<consortium>)"),
    ] = None,
) -> None:
    """Register a run's exported LightGBM model in an MLflow model registry, with its final
    metrics and model card; print the name, version and the serve command."""
    with reported():
        from flows.score import resolve_run
        from storage.files import read_text
        from storage.registry import (
            RegistryError,
            register_lightgbm,
            registry_location,
            require_mlflow,
        )
        from storage.runs import model_card_name
        from storage.store import Store
        from tasks.horizontal.model_text import ModelTextError, parse_model_text
        from tasks.model_card import ModelCard
        from tasks.registry import (
            card_metrics,
            card_tags,
            default_model_name,
            experiment_name,
            round_metrics,
            serve_command,
        )
        from tasks.spec.load import load_spec

        require_mlflow()  # before reading anything: the one-line install hint
        loaded = load_spec(str(spec))
        chosen = resolve_run(loaded, run)
        if chosen.model is None:
            raise RegistryError(
                f"{spec}: run {chosen.run_key} is vertical (one model per party, see "
                "`fedfuse export`); only a horizontal run's single model is registered"
            )
        coordinator = Store(loaded.coordinator.store)
        card_file = model_card_name(chosen.run_key, "json")
        if not coordinator.exists("models", card_file):
            raise RegistryError(
                f"{coordinator.location('models', card_file)}: no model card for run "
                f"{chosen.run_key} (trained before model cards; train again to register it)"
            )
        card = ModelCard.model_validate(coordinator.read_json("models", card_file))
        text = read_text(chosen.model)
        try:
            parse_model_text(text)
        except ModelTextError as exc:
            raise RegistryError(f"{chosen.model}: {exc}") from None
        location = registry_location(loaded.coordinator.store, registry)
        markdown_file = model_card_name(chosen.run_key, "md")
        texts = {f"model-card/{card_file}": card.model_dump_json(indent=2)}
        if coordinator.exists("models", markdown_file):
            texts[f"model-card/{markdown_file}"] = read_text(
                coordinator.location("models", markdown_file)
            )
        version = register_lightgbm(
            location,
            model_text=text,
            name=name or default_model_name(card.consortium),
            experiment=experiment_name(card.consortium),
            metrics=card_metrics(card),
            steps=round_metrics(card),
            tags=card_tags(card),
            texts=texts,
        )
        console.print(
            f"registered {escape(version.name)} version {version.version} "
            f"(run {escape(chosen.run_key)}) in {escape(version.registry)}",
            highlight=False,
        )
        console.print(
            f"serve: {escape(serve_command(version.name, version.version, version.registry))}",
            highlight=False,
            soft_wrap=True,
        )


def register(app: typer.Typer) -> None:
    """Add ``register`` to the ``fedfuse`` CLI."""
    app.command("register")(register_model)
