"""Reading run states back from the Prefect API in tests."""

from __future__ import annotations

import functools
import time


def task_states(flow_run_id: object, *, timeout: float = 20.0) -> dict[str, list[str]]:
    """Final task-run states by task name (task states reach the API asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        states = read_task_states(flow_run_id)
        # a run's states reach the API asynchronously: "?" is a run with no state yet
        pending = [
            s for names in states.values() for s in names if s in ("Pending", "Running", "?")
        ]
        if not pending or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def task_name(run: object) -> str:
    """The task's own name (``train-party``) of a task run, whatever the run is called
    (``site-b: train round 3``): task runs carry the task's key, built from its function."""
    key = str(getattr(run, "task_key", ""))
    return _task_names().get(key) or str(getattr(run, "name", "")).rsplit("-", 1)[0]


@functools.cache
def _task_names() -> dict[str, str]:
    import importlib

    from prefect import Task

    names: dict[str, str] = {}
    for module in (
        "tasks.prepare.steps",
        "tasks.horizontal.steps",
        "tasks.vertical.steps",
        "tasks.horizontal.baselines",
        "tasks.scoring",
        "flows.transport",
        "flows.horizontal",
        "flows.lossless",
        "tasks.horizontal.lossless_remote",
    ):
        for value in vars(importlib.import_module(module)).values():
            if isinstance(value, Task):
                names[value.task_key] = value.name
    return names


def read_task_states(flow_run_id: object) -> dict[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        ids, frontier = [flow_run_id], [flow_run_id]
        while frontier:  # the run and all its nested subflow runs
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)
                )
            )
            frontier = [c.id for c in children]
            ids += frontier
        states: dict[str, list[str]] = {}
        for run in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))
        ):
            states.setdefault(task_name(run), []).append(run.state.name if run.state else "?")
    return states
