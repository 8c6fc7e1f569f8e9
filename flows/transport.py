"""Per-party work pools: a party's steps run as deployment runs on the party's own pool.

A party with a ``work_pool`` in the spec gets two deployments of its own on that pool
(``fedfuse deploy`` registers them): ``party-pipeline/<prefix>-<party>`` (preprocess,
features, align, fuse) and ``party-step/<prefix>-<party>`` (one training step: label
statistics, start scores, a round's update, an evaluation). The coordinator's flows, run with
``dispatch=<prefix>``, start those deployments with ``run_deployment`` (linked as subflows, so
the UI shows them nested under the coordinator's run) instead of running the steps in their
own process; a party without a pool still runs in process.

What comes back travels through the coordinator store only: the party's flow writes its
result (table references, counts, aggregate metrics, model files; never rows or entity ids)
to ``exchange/<flow-run-id>.json`` and the coordinator reads it there. The dispatching task
persists that result under a content cache key, so a retried coordinator run does not start a
party's finished step again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

from prefect import task
from pydantic import BaseModel, Field

from storage.results import DEFAULT_RESULTS
from storage.store import Store, TableRef
from tasks.caching import content_cache_key, parameters_key
from tasks.horizontal.steps import PartyEval, PartyStats, PartyUpdate, RoundAggregate, TrainSetup
from tasks.prepare.steps import FusedOutput
from tasks.spec.models import FedSpec

logger = logging.getLogger(__name__)

PIPELINE_FLOW = "party-pipeline"
STEP_FLOW = "party-step"
DEFAULT_TIMEOUT = 3600.0

StepOp = Literal["stats", "start", "train", "evaluate"]
M = TypeVar("M", bound=BaseModel)


class DispatchError(RuntimeError):
    """A party's dispatched run did not complete (or never started)."""


class PartyJob(BaseModel):
    """One training step of one party, as the parameter of its ``party-step`` run."""

    op: StepOp = Field(description="stats | start | train | evaluate")
    setup: TrainSetup
    round: int = Field(default=0, ge=0)
    scores: TableRef | None = Field(default=None, description="The party's running scores")
    learning_rate: float | None = None
    base: list[float] = Field(default_factory=list, description="Base score (op=start)")
    aggregates: list[RoundAggregate] = Field(
        default_factory=list, description="Rounds to apply (op=evaluate)"
    )
    next_learning_rate: float | None = Field(
        default=None,
        description="op=evaluate: then train round+1 on the new scores at this rate, in the "
        "same run (its update comes back as PartyEval.next)",
    )
    results: str = DEFAULT_RESULTS
    refresh: bool = False


RESULT_TYPES: dict[StepOp, type[BaseModel]] = {
    "stats": PartyStats,
    "start": TableRef,
    "train": PartyUpdate,
    "evaluate": PartyEval,
}


def deployment_name(flow_name: str, prefix: str, party: str) -> str:
    """``party-step/demo-site-a``: the full name of a party's deployment."""
    return f"{flow_name}/{prefix}-{party}"


def party_deployments(spec: FedSpec, prefix: str | None, flow_name: str) -> dict[str, str]:
    """Party -> full deployment name, for the parties with a work pool (none without a
    prefix: everything runs in process)."""
    if not prefix:
        return {}
    return {p.id: deployment_name(flow_name, prefix, p.id) for p in spec.parties if p.work_pool}


def exchange_name(flow_run_id: str) -> str:
    return f"{flow_run_id}.json"


def publish(coordinator: str, result: Any) -> None:
    """Hand a dispatched party run's result (a model, or JSON-able data) to the coordinator
    (a no-op outside a deployment run: in process the caller gets the return value)."""
    from prefect.runtime import deployment, flow_run

    if deployment.id is None:
        return
    body = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
    Store(coordinator).write_json("exchange", exchange_name(str(flow_run.get_id())), body)


def run_remote_json(
    deployment: str,
    parameters: Mapping[str, Any],
    *,
    coordinator: str,
    timeout: float = DEFAULT_TIMEOUT,
    poll: float = 1.0,
) -> Any:
    """Run a party's deployment, wait for it and read its result (JSON) from the
    coordinator store. Raises :class:`DispatchError` naming the deployment and run unless
    it completed."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    run = run_deployment(
        deployment,
        parameters=dict(parameters),
        timeout=timeout,
        poll_interval=poll,
        as_subflow=True,
    )
    assert isinstance(run, FlowRun)
    state = run.state
    if state is None or not state.is_final():
        raise DispatchError(
            f"{deployment}: flow run {run.name} still {state.name if state else 'unknown'} "
            f"after {timeout:.0f} s; is a worker polling the party's work pool "
            f"({run.work_pool_name or '?'})?"
        )
    if not state.is_completed():
        raise DispatchError(f"{deployment}: flow run {run.name} {state.name}: {state.message}")
    store = Store(coordinator)
    name = exchange_name(str(run.id))
    if not store.exists("exchange", name):
        raise DispatchError(
            f"{deployment}: flow run {run.name} completed but left no result at "
            f"{store.location('exchange', name)}"
        )
    logger.info("%s: flow run %s completed", deployment, run.name)
    return store.read_json("exchange", name)


def run_remote(
    deployment: str,
    parameters: Mapping[str, Any],
    *,
    coordinator: str,
    result_type: type[M],
    timeout: float = DEFAULT_TIMEOUT,
    poll: float = 1.0,
) -> M:
    """:func:`run_remote_json`, validated as ``result_type``."""
    body = run_remote_json(
        deployment, parameters, coordinator=coordinator, timeout=timeout, poll=poll
    )
    return result_type.model_validate(body)


@task(name="dispatch-party-step", cache_key_fn=content_cache_key, persist_result=True)
def dispatch_step(deployment: str, job: PartyJob, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Run one training step on the party's own work pool."""
    return run_remote(
        deployment,
        {"job": job.model_dump(mode="json")},
        coordinator=job.setup.coordinator,
        result_type=RESULT_TYPES[job.op],
        timeout=timeout,
    )


def root_run_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Cache key valid within one top-level run (its retries included, whose subflows get
    new run ids): the root flow run id + the task's parameters."""
    from prefect.runtime import flow_run

    root = flow_run.get_root_flow_run_id()
    return parameters_key(context.task.name, {"root_flow_run": root, **parameters})


@task(name="dispatch-party-pipeline", cache_key_fn=root_run_cache_key, persist_result=True)
def dispatch_pipeline(
    deployment: str,
    parameters: dict[str, Any],
    coordinator: str,
    timeout: float = DEFAULT_TIMEOUT,
) -> FusedOutput:
    """Run a party's pipeline on its own work pool. Cached within one top-level run only
    (a retry does not start a finished party again; a new run does, since only the party
    sees whether its raw data changed, and its steps skip what their content-hashed cache
    keys say is done)."""
    return run_remote(
        deployment,
        parameters,
        coordinator=coordinator,
        result_type=FusedOutput,
        timeout=timeout,
    )


# -- generic party calls (vertical steps) ------------------------------------------------------

CALL_FLOW = "party-call"


def call_registry() -> dict[str, Any]:
    """The party steps a ``party-call`` run may execute, by name (the vertical layout's)."""
    from tasks.vertical.steps import STEP_TASKS

    return {t.name: t for t in STEP_TASKS}


def _hints(fn: Any) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(fn)


def encode_args(args: Sequence[Any]) -> list[Any]:
    """Step arguments as JSON (models become dicts; references only, never tables)."""
    from pydantic import TypeAdapter

    return list(TypeAdapter(list[Any]).dump_python(list(args), mode="json"))


def decode_args(op: str, args: Sequence[Any]) -> list[Any]:
    """JSON arguments back into the step's typed parameters."""
    import inspect

    from pydantic import TypeAdapter

    step = call_registry()[op]
    hints = _hints(step.fn)
    names = list(inspect.signature(step.fn).parameters)
    if len(args) > len(names):
        raise ValueError(f"{op}: {len(args)} arguments for {len(names)} parameters")
    return [TypeAdapter(hints[n]).validate_python(a) for n, a in zip(names, args, strict=False)]


def encode_result(op: str, result: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(_hints(call_registry()[op].fn)["return"]).dump_python(result, mode="json")


def decode_result(op: str, body: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(_hints(call_registry()[op].fn)["return"]).validate_python(body)


#: Steps that read the party's current state: never cached.
UNCACHED_CALLS = frozenset({"vertical-latest-state", "vertical-model-at"})


def call_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    if parameters.get("op") in UNCACHED_CALLS:
        return None
    return content_cache_key(context, parameters)


@task(name="dispatch-party-call", cache_key_fn=call_cache_key, persist_result=True)
def dispatch_call(
    deployment: str,
    op: str,
    args: list[Any],
    coordinator: str,
    results: str,
    refresh: bool,
    timeout: float = DEFAULT_TIMEOUT,
) -> Any:
    """Run one step on the party's own work pool (``party-call`` deployment)."""
    body = run_remote_json(
        deployment,
        {
            "op": op,
            "args": args,
            "coordinator": coordinator,
            "results": results,
            "refresh": refresh,
        },
        coordinator=coordinator,
        timeout=timeout,
    )
    return decode_result(op, body)
