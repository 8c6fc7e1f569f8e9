"""What a registered model carries, from its model card (pure functions): MLflow metric
names and values, tags, the registered model's default name and the serve command.

Only the card's counts, hashes, spec ids and metrics go in: no row, no entity id.
"""

from __future__ import annotations

import math
import re

from tasks.model_card import ModelCard

_METRIC_CHARS = re.compile(r"[^0-9A-Za-z_\-./]+")
_NAME_CHARS = re.compile(r"[^0-9A-Za-z_\-.]+")


def metric_key(split: str, name: str) -> str:
    """An MLflow metric name for a card metric: ``<split>_<name>``, characters MLflow
    refuses (``±``, brackets, ...) as ``_``."""
    cleaned = _METRIC_CHARS.sub("_", name).strip("_") or "metric"
    return f"{split}_{cleaned}"


def card_metrics(card: ModelCard) -> dict[str, float]:
    """The final metrics (``valid`` at the best round, ``test``), finite values only."""
    return {
        metric_key(split, name): float(value)
        for split, values in card.final_metrics.items()
        for name, value in values.items()
        if math.isfinite(value)
    }


def round_metrics(card: ModelCard) -> dict[str, dict[int, float]]:
    """Each round's validation metrics, as MLflow steps (``round_valid_<name>`` -> round ->
    value), finite values only."""
    out: dict[str, dict[int, float]] = {}
    for r in card.rounds:
        for name, value in r.valid.items():
            if math.isfinite(value):
                out.setdefault(metric_key("round_valid", name), {})[r.round] = float(value)
    return out


def card_tags(card: ModelCard) -> dict[str, str]:
    """The card's key fields as tags (``fedfuse.`` prefix)."""
    tags = {
        "fedfuse.run_key": card.run_key,
        "fedfuse.spec_hash": card.spec_hash,
        "fedfuse.spec_identity": card.spec_identity,
        "fedfuse.code_version": card.code.text(),
        "fedfuse.consortium": card.consortium,
        "fedfuse.layout": card.layout,
        "fedfuse.best_round": str(card.best_round),
        "fedfuse.rounds_run": str(card.rounds_run),
        "fedfuse.parties": ",".join(p.party for p in card.parties),
    }
    if card.code.commit:
        tags["fedfuse.code_commit"] = card.code.commit
    if card.stop_reason:
        tags["fedfuse.stop_reason"] = card.stop_reason
    return tags


def default_model_name(consortium: str) -> str:
    """The registered model's name when ``--name`` is not given: ``fedfuse-<consortium>``."""
    return "fedfuse-" + (_NAME_CHARS.sub("-", consortium).strip("-") or "model")


def experiment_name(consortium: str) -> str:
    """The MLflow experiment the registration runs are logged in."""
    return default_model_name(consortium)


def serve_command(name: str, version: str, registry: str) -> str:
    """The command that serves a registered version from this registry."""
    return (
        f"MLFLOW_TRACKING_URI={registry} mlflow models serve -m models:/{name}/{version} "
        "--env-manager local"
    )
