"""Small helpers shared by the flows."""

from __future__ import annotations

from typing import Any, cast

from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from storage.files import is_uri, registered_options
from storage.results import DEFAULT_RESULTS, result_storage


def threads(workers: int) -> TaskRunner[PrefectFuture[Any]]:
    return cast("TaskRunner[PrefectFuture[Any]]", ThreadPoolTaskRunner(max_workers=workers))


def task_options(results: str | None, refresh: bool) -> dict[str, Any]:
    """Persist task results in the shared results folder (a local path or a URI, with the
    storage options registered for it); ``refresh`` ignores cached ones."""
    location = results or DEFAULT_RESULTS
    storage = result_storage(location, registered_options(location) if is_uri(location) else None)
    return {"result_storage": storage, "refresh_cache": refresh}


def run_name(text: str) -> str:
    """A fixed task or flow run name (Prefect formats names over the parameters: escape braces)."""
    return text.replace("{", "{{").replace("}", "}}")


def artifact_key(name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "fedfuse"
