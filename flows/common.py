"""Small helpers shared by the flows."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner


def threads(workers: int) -> TaskRunner[PrefectFuture[Any]]:
    return cast("TaskRunner[PrefectFuture[Any]]", ThreadPoolTaskRunner(max_workers=workers))


def task_options(results: str | None, refresh: bool) -> dict[str, Any]:
    """Persist task results in the shared results folder; ``refresh`` ignores cached ones."""
    return {"result_storage": Path(results or ".fedfuse/results"), "refresh_cache": refresh}


def artifact_key(name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "fedfuse"
