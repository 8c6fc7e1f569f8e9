"""What the deployment tests share: reading runs and deployments back from the server."""

from __future__ import annotations

import re
from typing import Any
from uuid import UUID

RUN_LINE = re.compile(r"flow run (.+?) ([0-9a-f-]{36})")


def run_id(output: str) -> UUID:
    match = RUN_LINE.search(output)
    assert match, output
    return UUID(match.group(2))


def read_deployment(name: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


PARTY_TASKS = {
    "fingerprint-source",
    "preprocess-source",
    "extract-features",
    "align-source",
    "fuse-party",
    "compute-party-stats",
    "start-scores",
    "train-party",
    "evaluate-party",
}


def run_tree(flow_run_id: UUID) -> tuple[list[Any], dict[UUID, str], list[Any]]:
    """A run, its nested runs (subflows and dispatched party runs), their flow names and
    all their task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.ops import descendants, flow_names_of

    with get_client(sync_client=True) as client:
        runs = [client.read_flow_run(flow_run_id), *descendants(client, flow_run_id)]
        names: dict[UUID, str] = {}
        flow_names_of(client, runs, names)
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs]))
        )
    return runs, {r.id: names[r.flow_id] for r in runs}, tasks


def party_of(run: Any) -> str | None:
    params = run.parameters or {}
    if "job" in params:
        return str(params["job"]["setup"]["party"])
    return params.get("party")
