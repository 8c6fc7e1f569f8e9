"""Names of run artefacts, in one place: checkpoints, manifests, exported models, reports,
the ``models/latest.json`` pointer to the latest training run and the
``exchange/<flow-run-id>.json`` results of dispatched party runs.

Everything else reads and writes these through the functions here, with typed models; a
caller passes the model class of what it reads (storage knows no task-level type).
"""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, Field, JsonValue

from storage.store import FileRef, Store

M = TypeVar("M", bound=BaseModel)

LATEST = "latest.json"

Layout = Literal["horizontal", "vertical"]


class LatestRun(BaseModel):
    """``models/latest.json``: the latest finished training run of a consortium."""

    run_key: str
    layout: Layout | None = Field(
        default=None, description="Written for vertical runs; absent means horizontal"
    )
    manifest: str = Field(description="URI of the run's manifest")
    model: str | None = Field(default=None, description="URI of the exported model (horizontal)")

    @property
    def is_vertical(self) -> bool:
        return self.layout == "vertical"


# -- the latest-run pointer --------------------------------------------------------------------


def write_latest(coordinator: Store, latest: LatestRun) -> FileRef:
    return coordinator.write_json(
        "models", LATEST, latest.model_dump(mode="json", exclude_none=True)
    )


def read_latest(coordinator: Store) -> LatestRun | None:
    """The latest run, ``None`` before the first training."""
    if not coordinator.exists("models", LATEST):
        return None
    return LatestRun.model_validate(coordinator.read_json("models", LATEST))


# -- checkpoints -------------------------------------------------------------------------------


def checkpoint_name(run_key: str) -> str:
    """A horizontal run's latest checkpoint (coordinator store)."""
    return f"{run_key}-latest.json"


def round_checkpoint_name(run_key: str, round_: int) -> str:
    """A horizontal run's checkpoint after round ``round_`` (kept beside the latest)."""
    return f"{run_key}-r{round_:04d}.json"


def vertical_checkpoint_name(run_key: str) -> str:
    """A vertical run's latest label-party state (the label party's store)."""
    return f"{run_key}-vertical-latest.json"


def vertical_round_name(run_key: str, round_: int) -> str:
    """A vertical run's label-party state after round ``round_`` (stem; ``.json`` added for
    the document, the score arrays are a table of that name)."""
    return f"{run_key}-vertical-r{round_:04d}"


def read_checkpoint(coordinator: Store, run_key: str, model: type[M]) -> M | None:
    """A horizontal run's latest checkpoint as ``model``, ``None`` when there is none."""
    name = checkpoint_name(run_key)
    if not coordinator.exists("checkpoints", name):
        return None
    return model.model_validate(coordinator.read_json("checkpoints", name))


def write_checkpoint(coordinator: Store, run_key: str, round_: int, checkpoint: BaseModel) -> None:
    """Round ``round_``'s checkpoint, then the latest pointer (same content)."""
    body = checkpoint.model_dump(mode="json")
    coordinator.write_json("checkpoints", round_checkpoint_name(run_key, round_), body)
    coordinator.write_json("checkpoints", checkpoint_name(run_key), body)


# -- manifests, models, reports ----------------------------------------------------------------


def manifest_name(run_key: str) -> str:
    """A horizontal run's ensemble manifest (``models/``)."""
    return f"{run_key}-manifest.json"


def vertical_manifest_name(run_key: str) -> str:
    return f"{run_key}-vertical-manifest.json"


def model_name(run_key: str) -> str:
    """A horizontal run's exported LightGBM model text (``models/``)."""
    return f"{run_key}-model.txt"


def report_name(run_key: str) -> str:
    return f"{run_key}-report.md"


def plot_name(run_key: str, plot: Literal["rounds", "importance"]) -> str:
    """A report's plot (``reports/``), e.g. ``<key>-rounds.png``."""
    return f"{run_key}-{plot}.png"


def write_vertical_manifest(coordinator: Store, run_key: str, manifest: BaseModel) -> FileRef:
    return coordinator.write_json(
        "models", vertical_manifest_name(run_key), manifest.model_dump(mode="json")
    )


# -- results of dispatched party runs ----------------------------------------------------------


def exchange_name(flow_run_id: str) -> str:
    return f"{flow_run_id}.json"


def write_exchange(coordinator: Store, flow_run_id: str, body: JsonValue) -> FileRef:
    """A dispatched party run's result, for the coordinator to read."""
    return coordinator.write_json("exchange", exchange_name(flow_run_id), body)


def exchange_location(coordinator: Store, flow_run_id: str) -> str:
    return coordinator.location("exchange", exchange_name(flow_run_id))


def read_exchange(coordinator: Store, flow_run_id: str) -> JsonValue | None:
    """A dispatched run's result, ``None`` when the run left none."""
    name = exchange_name(flow_run_id)
    if not coordinator.exists("exchange", name):
        return None
    body: JsonValue = coordinator.read_json("exchange", name)
    return body
