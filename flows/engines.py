"""Where a party's shard steps run (``[run] engine``): the pipeline flow's own task runner
(``local``), or the party's Dask cluster through ``prefect-dask``'s ``DaskTaskRunner``
(``dask``: the scheduler at ``dask_address``, or at the address the environment variable
``dask_address_env`` holds where the pipeline runs). Either way a shard is a Prefect task
run of the pipeline's flow run, cached by its content key."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from prefect import Task
from prefect.futures import PrefectFuture

from tasks.spec.models import RunSpec

R = TypeVar("R")
#: Submits a task with its parameters and returns its future.
Submit = Callable[[Task[..., R], dict[str, Any]], PrefectFuture[R]]


class EngineError(RuntimeError):
    """The spec's engine cannot be used here (one line naming the key)."""


def dask_address(run: RunSpec) -> str:
    """The scheduler address of ``engine = 'dask'``, from the spec or from its environment
    variable (read here, where the party's pipeline runs)."""
    if run.dask_address is not None:
        return run.dask_address
    name = run.dask_address_env or ""
    address = os.environ.get(name, "").strip()
    if not address:
        raise EngineError(
            f"run.dask_address_env: the environment variable {name} is not set (or empty) "
            "where the party's pipeline runs; set it to the scheduler address, e.g. "
            "tcp://10.0.0.5:8786"
        )
    return address


def submit_here(task: Task[..., R], parameters: dict[str, Any]) -> PrefectFuture[R]:
    future: PrefectFuture[R] = task.submit(**parameters)
    return future


@contextmanager
def shard_engine(run: RunSpec | None) -> Iterator[Submit[Any]]:
    """A submit function for shard steps, open while the block runs (the Dask client is
    closed at its end: wait for the shards' futures inside it)."""
    if run is None or run.engine == "local":
        yield submit_here
        return
    address = dask_address(run)
    try:
        from prefect_dask.task_runners import DaskTaskRunner
    except ImportError:
        raise EngineError(
            "run.engine = 'dask' needs prefect-dask where the party's pipeline runs: "
            "pip install 'fedfuse[dask]'"
        ) from None
    runner = DaskTaskRunner(address=address)
    try:
        runner.__enter__()  # type: ignore[no-untyped-call]
    except (OSError, TimeoutError) as exc:
        raise EngineError(
            f"run.engine = 'dask': cannot reach the Dask scheduler at {address} "
            f"({type(exc).__name__})"
        ) from None
    try:
        yield runner.submit
    finally:
        runner.__exit__(None, None, None)
