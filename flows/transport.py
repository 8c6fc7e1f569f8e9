"""One way to run a step at a party: a task of the calling flow, or a deployment run on the
party's own work pool.

A party with a ``work_pool`` in the spec gets deployments of its own on that pool (``fedfuse
deploy`` registers them): ``party-pipeline/<prefix>-<party>`` (preprocess, features, align,
fuse), ``party-step/<prefix>-<party>`` (a horizontal training step: label statistics, feature
sketches, start scores, a round's update, an evaluation) and, for a vertical consortium or one with
learned vocabularies, ``party-call/<prefix>-<party>`` (a named step: a vertical one such as PSI, a gradient round
or scores, or the vocabulary count ``prepare`` runs for learned vocabularies). The
coordinator's flows, run with ``dispatch=<prefix>``, start those deployments with
``run_deployment`` (linked as subflows, so the UI shows them nested under the coordinator's
run) instead of running the steps in their own process; a party without a pool still runs in
process.

Every step a party runs is registered in one table (:func:`steps`): its op name, its task,
the party flow that serves it, its argument and result types. One codec
(:class:`StepCall`: op + arguments as JSON, typed by the op's parameters; the result typed by
its return type) carries a step to the party and its result back; :class:`PartyRunner`
submits a step at a party, :func:`dispatch_step` is the one dispatching task and
:func:`run_call` the party-side runner both party flows share.

What comes back travels through the coordinator store only: the party's flow writes its
result (table references, counts, aggregate metrics, model files; never rows or entity ids)
to ``exchange/<flow-run-id>.json`` and the coordinator reads it there. The dispatching task
persists that result under a content cache key, so a retried coordinator run does not start
a party's finished step again.
"""

from __future__ import annotations

import functools
import inspect
import logging
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TypeVar, cast

from prefect import Task, task
from prefect.futures import PrefectFuture
from prefect.transactions import CommitMode, transaction
from pydantic import BaseModel, Field, JsonValue, TypeAdapter

from flows.common import run_name, task_options, threads
from flows.names import planned_run_name, tagged
from storage.results import DEFAULT_RESULTS
from storage.runs import exchange_location, read_exchange, write_exchange
from storage.store import Store, TableRef
from tasks.caching import content_cache_key, parameters_key
from tasks.horizontal.lossless_remote import lossless_party
from tasks.horizontal.steps import (
    PartyUpdate,
    RoundAggregate,
    TrainSetup,
    evaluate_party,
    leaf_sums_party,
    party_stats,
    sketch_party,
    start_scores,
    train_party,
)
from tasks.prepare.steps import FusedOutput
from tasks.spec.models import FedSpec

logger = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

StepOp = Literal["stats", "sketch", "start", "train", "leaf_sums", "evaluate", "lossless"]
PartyFlow = Literal["party-step", "party-call"]

PIPELINE_FLOW = "party-pipeline"
STEP_FLOW: PartyFlow = "party-step"
CALL_FLOW: PartyFlow = "party-call"
DEFAULT_TIMEOUT = 3600.0


class DispatchError(RuntimeError):
    """A party's dispatched run did not complete (or never started)."""


class PartyJob(BaseModel):
    """One horizontal training step of one party, as the parameter of its ``party-step`` run."""

    op: StepOp = Field(
        description="stats | sketch | start | train | leaf_sums | evaluate | lossless"
    )
    setup: TrainSetup
    round: int = Field(default=0, ge=0)
    scores: TableRef | None = Field(default=None, description="The party's running scores")
    learning_rate: float | None = None
    base: list[float] = Field(default_factory=list, description="Base score (op=start)")
    aggregates: list[RoundAggregate] = Field(
        default_factory=list, description="Rounds to apply (op=evaluate)"
    )
    updates: list[PartyUpdate] = Field(
        default_factory=list, description="op=leaf_sums: the round's updates"
    )
    planned: list[str] = Field(
        default_factory=list, description="op=leaf_sums: the parties asked to train"
    )
    label_span: float = Field(default=0.0, description="op=leaf_sums: the round rules' span")
    next_learning_rate: float | None = Field(
        default=None,
        description="op=evaluate: then train round+1 on the new scores at this rate, in the "
        "same run (its update comes back as PartyEval.next)",
    )
    session: str | None = Field(
        default=None, description="op=lossless: the session whose mailbox the party joins"
    )
    address: str | None = Field(
        default=None, description="op=lossless: host:port the party's LightGBM listens on"
    )
    join_timeout: float | None = Field(
        default=None, gt=0, description="op=lossless: seconds the party has to join"
    )
    results: str = DEFAULT_RESULTS
    refresh: bool = False

    def task_args(self) -> tuple[object, ...]:
        """The arguments of the op's task."""
        if self.op in ("stats", "sketch"):
            return (self.setup,)
        if self.op == "lossless":
            if self.session is None or self.address is None or self.join_timeout is None:
                raise ValueError(
                    f"lossless step for {self.setup.party}: session, address and join timeout "
                    "are required"
                )
            return (self.setup, self.session, self.address, self.join_timeout)
        if self.op == "start":
            return (self.setup, self.base)
        if self.scores is None:
            raise ValueError(f"{self.op} step for {self.setup.party}: no running scores given")
        if self.op == "train":
            if self.learning_rate is None:
                raise ValueError(f"train step for {self.setup.party}: no learning rate given")
            return (self.setup, self.round, self.scores, self.learning_rate)
        if self.op == "leaf_sums":
            return (
                self.setup,
                self.round,
                self.scores,
                self.updates,
                self.planned,
                self.label_span,
            )
        return (self.setup, self.aggregates, self.scores)

    def step_round(self) -> int | None:
        """The round the step belongs to (an evaluation: the last round it applies)."""
        if self.op in ("stats", "start", "lossless"):
            return None
        if self.op == "evaluate" and self.aggregates:
            return self.aggregates[-1].round
        return self.round

    def title(self) -> str:
        """A person's name for the step: ``site-b: train round 3``."""
        what = {
            "stats": "label statistics",
            "sketch": "feature sketches",
            "start": "start scores",
            "lossless": "lossless training",
        }.get(self.op)
        if what is None:
            what = f"{self.op.replace('_', ' ')} round {self.step_round()}"
        return f"{self.setup.party}: {what}"


# -- the registry of party steps ---------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """A step a party runs: its op name, its task, the party flow that serves it when
    dispatched, and whether a dispatched run may come back from the cache."""

    op: str
    task: Task[..., Any]
    flow: PartyFlow
    cached: bool = True

    @functools.cached_property
    def _hints(self) -> dict[str, Any]:
        return typing.get_type_hints(self.task.fn)

    @property
    def wire_types(self) -> tuple[Any, ...]:
        """Types of the arguments as they cross: a ``PartyJob`` for a horizontal step, the
        task's own parameters for a vertical one."""
        if self.flow == STEP_FLOW:
            return (PartyJob,)
        names = list(inspect.signature(self.task.fn).parameters)
        return tuple(self._hints[n] for n in names)

    def task_args(self, args: Sequence[object]) -> tuple[object, ...]:
        """Wire arguments -> the task's arguments."""
        if self.flow == STEP_FLOW:
            (job,) = args
            assert isinstance(job, PartyJob)
            return job.task_args()
        return tuple(args)

    @property
    def result_type(self) -> Any:
        return self._hints["return"]

    def round_of(self, args: Sequence[object]) -> int | None:
        """The round a call belongs to: its ``round_`` argument, when the task has one."""
        names = list(inspect.signature(self.task.fn).parameters)
        if "round_" not in names or names.index("round_") >= len(args):
            return None
        value = args[names.index("round_")]
        return value if isinstance(value, int) and not isinstance(value, bool) else None


def step_title(party: str | None, op: str, round_: int | None) -> str:
    """``site-b: vertical-party-round 3``: a person's name for a named step at a party."""
    what = f"{op} {round_}" if round_ else op
    return f"{party}: {what}" if party else what


def vertical_step_tasks() -> list[Task[..., Any]]:
    """The vertical layout's party steps (:data:`tasks.vertical.steps.STEP_TASKS`)."""
    from tasks.vertical.steps import STEP_TASKS

    return list(STEP_TASKS)


def prepare_step_tasks() -> list[Task[..., Any]]:
    """The steps ``prepare`` runs at a party before its pipeline (vocabulary counts, the
    text vocabulary's term counts and the text model's rounds)."""
    from tasks.prepare.steps import count_text_terms, count_vocabulary_values, fit_text_model

    return [count_vocabulary_values, count_text_terms, fit_text_model]


#: Steps that read the party's current state or data, or take part in a session with the
#: other parties (lossless): never cached when dispatched.
UNCACHED = frozenset(
    {
        "lossless",
        "vertical-latest-state",
        "vertical-model-at",
        "count-vocabulary-values",
        "count-text-terms",
        "fit-text-model",
    }
)


@functools.cache
def steps() -> dict[str, Step]:
    """Every step a party runs, by op: the horizontal ops, then the prepare and vertical
    tasks by name."""
    horizontal: dict[StepOp, Task[..., Any]] = {
        "stats": party_stats,
        "sketch": sketch_party,
        "start": start_scores,
        "train": train_party,
        "leaf_sums": leaf_sums_party,
        "evaluate": evaluate_party,
        "lossless": lossless_party,
    }
    table: dict[str, Step] = {
        op: Step(op, t, STEP_FLOW, cached=op not in UNCACHED) for op, t in horizontal.items()
    }
    for t in [*prepare_step_tasks(), *vertical_step_tasks()]:
        table[t.name] = Step(t.name, t, CALL_FLOW, cached=t.name not in UNCACHED)
    return table


def step(op: str) -> Step:
    table = steps()
    if op not in table:
        raise ValueError(f"unknown party step {op!r}; known: {sorted(table)}")
    return table[op]


# -- the codec ---------------------------------------------------------------------------------


class StepCall(BaseModel):
    """A step at a party as it crosses: the op, its arguments as JSON (typed by the op's
    parameters), where the result goes and where task results persist."""

    op: str
    args: list[JsonValue]
    coordinator: str
    results: str = DEFAULT_RESULTS
    refresh: bool = False

    @classmethod
    def of(
        cls, op: str, args: Sequence[object], *, coordinator: str, results: str, refresh: bool
    ) -> StepCall:
        encoded = TypeAdapter(list[Any]).dump_python(list(args), mode="json")
        return cls(op=op, args=encoded, coordinator=coordinator, results=results, refresh=refresh)

    @classmethod
    def of_job(cls, job: PartyJob) -> StepCall:
        return cls.of(
            job.op,
            [job],
            coordinator=job.setup.coordinator,
            results=job.results,
            refresh=job.refresh,
        )

    def party(self) -> str | None:
        """The party the call runs at, as its first argument names it (a setup or context)."""
        first = self.args[0] if self.args else None
        if isinstance(first, dict):
            if isinstance(first.get("party"), str):
                return str(first["party"])
            setup = first.get("setup")
            if isinstance(setup, dict) and isinstance(setup.get("party"), str):
                return str(setup["party"])
        return None

    def round(self) -> int | None:
        """The round the call belongs to (none for a step outside the rounds)."""
        if step(self.op).flow == STEP_FLOW:
            return PartyJob.model_validate(self.args[0]).step_round()
        return step(self.op).round_of(self.args)

    def title(self) -> str:
        """A person's name for the call: ``site-b: train round 3``,
        ``site-b: vertical-party-round 3``."""
        if step(self.op).flow == STEP_FLOW:
            return PartyJob.model_validate(self.args[0]).title()
        return step_title(self.party(), self.op, self.round())

    def decoded_args(self) -> list[object]:
        """The arguments, validated as the op's parameter types."""
        types = step(self.op).wire_types
        if len(self.args) > len(types):
            raise ValueError(f"{self.op}: {len(self.args)} arguments for {len(types)} parameters")
        return [TypeAdapter(t).validate_python(a) for t, a in zip(types, self.args, strict=False)]

    def flow_parameters(self) -> dict[str, JsonValue]:
        """The parameters of the party flow that serves the op."""
        if step(self.op).flow == STEP_FLOW:
            return {"job": self.args[0]}
        return {
            "op": self.op,
            "args": self.args,
            "coordinator": self.coordinator,
            "results": self.results,
            "refresh": self.refresh,
        }


def encode_result(op: str, result: object) -> JsonValue:
    body: JsonValue = TypeAdapter(step(op).result_type).dump_python(result, mode="json")
    return body


def decode_result(op: str, body: JsonValue) -> object:
    return TypeAdapter(step(op).result_type).validate_python(body)


# -- deployments and the exchange --------------------------------------------------------------


def deployment_name(flow_name: str, prefix: str, party: str) -> str:
    """``party-step/demo-site-a``: the full name of a party's deployment."""
    return f"{flow_name}/{prefix}-{party}"


def pooled_parties(spec: FedSpec, prefix: str | None) -> dict[str, str]:
    """Party -> deployment prefix, for the parties with a work pool (none without a prefix:
    everything runs in process)."""
    if not prefix:
        return {}
    return {p.id: prefix for p in spec.parties if p.work_pool}


def party_deployments(spec: FedSpec, prefix: str | None, flow_name: str) -> dict[str, str]:
    """Party -> full deployment name of ``flow_name``, for the parties with a work pool."""
    return {
        p: deployment_name(flow_name, pre, p) for p, pre in pooled_parties(spec, prefix).items()
    }


def publish(coordinator: str, result: BaseModel | JsonValue) -> None:
    """Hand a dispatched party run's result to the coordinator (a no-op outside a deployment
    run: in process the caller gets the return value)."""
    from prefect.runtime import deployment, flow_run

    if deployment.id is None:
        return
    body = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
    write_exchange(Store(coordinator), str(flow_run.get_id()), body)


def run_remote(
    deployment: str,
    parameters: Mapping[str, JsonValue],
    *,
    coordinator: str,
    timeout: float = DEFAULT_TIMEOUT,
    poll: float = 1.0,
    name: str | None = None,
) -> JsonValue:
    """Run a party's deployment, wait for it and read its result (JSON) from the
    coordinator store. Raises :class:`DispatchError` naming the deployment and run unless
    it completed. ``name`` is the run's name from its creation (the one the party's flow
    gives it), so a step waiting for the party's worker is not listed under a random one."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.context import TagsContext
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        run = run_deployment(
            deployment,
            parameters=dict(parameters),
            flow_run_name=name,
            timeout=timeout,
            poll_interval=poll,
            as_subflow=True,
            tags=sorted(TagsContext.get().current_tags),  # the party and round of the caller
        )
    except ObjectNotFound:  # its message is "None"
        raise DispatchError(
            f"{deployment}: no such deployment on the Prefect server; `fedfuse deploy` of the "
            "spec registers the deployments of every party with a work_pool"
        ) from None
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
    body = read_exchange(store, str(run.id))
    if body is None:
        raise DispatchError(
            f"{deployment}: flow run {run.name} completed but left no result at "
            f"{exchange_location(store, str(run.id))}"
        )
    logger.info("%s: flow run %s completed", deployment, run.name)
    return body


# -- dispatching -------------------------------------------------------------------------------


def step_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """The content key of a dispatched step (none for a step that reads current state)."""
    call = parameters.get("call")
    op = call.op if isinstance(call, StepCall) else None
    if op is not None and not step(op).cached:
        return None
    return content_cache_key(context, parameters)


@task(name="dispatch-party-step", cache_key_fn=step_cache_key, persist_result=True)
def dispatch_step(deployment: str, call: StepCall, timeout: float = DEFAULT_TIMEOUT) -> object:
    """Run one step on the party's own work pool; the result typed as the op's."""
    body = run_remote(
        deployment,
        call.flow_parameters(),
        coordinator=call.coordinator,
        timeout=timeout,
        name=call.title(),
    )
    return decode_result(call.op, body)


def root_run_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Cache key valid within one top-level run (its retries included, whose subflows get
    new run ids): the root flow run id + the task's parameters."""
    from prefect.runtime import flow_run

    root = flow_run.get_root_flow_run_id()
    return parameters_key(context.task.name, {"root_flow_run": root, **parameters})


@task(name="dispatch-party-pipeline", cache_key_fn=root_run_cache_key, persist_result=True)
def dispatch_pipeline(
    deployment: str | None,
    parameters: dict[str, JsonValue],
    coordinator: str,
    timeout: float = DEFAULT_TIMEOUT,
    sources: int | None = None,
) -> FusedOutput:
    """Run a party's pipeline: on its own work pool (``deployment``), or in this process as
    a subflow (``deployment`` none) whose source steps run ``sources`` at a time. A
    different thing from a step: a flow of many tasks whose inputs (raw data) only the
    party sees, so it is cached within one top-level run only (a retry does not start a
    finished party again, wherever it ran and in whatever order the parties finished; a new
    run does, and its steps skip what their content-hashed cache keys say is done). A
    subflow called from a task gets a fresh identity in every attempt, never one that
    depends on the order of calls."""
    from flows.prepare import party_pipeline  # it imports this module

    if deployment is None:
        pipeline = party_pipeline
        if sources is not None:
            pipeline = party_pipeline.with_options(task_runner=threads(sources))
        # the pipeline's steps commit their cached results as each finishes: inside this
        # task's transaction they would wait for it, and a failed party would roll back the
        # sources it had finished, so a retry would redo them
        with transaction(commit_mode=CommitMode.EAGER):
            fused: FusedOutput = pipeline(**cast("dict[str, Any]", parameters))
        return fused
    name = planned_run_name(party_pipeline.flow_run_name, parameters)
    body = run_remote(deployment, parameters, coordinator=coordinator, timeout=timeout, name=name)
    return FusedOutput.model_validate(body)


def run_call(call: StepCall, *, title: str | None = None) -> PrefectFuture[Any]:
    """Submit a step as a task of the running flow (a party's own run, or the coordinator's
    for a party without a pool)."""
    s = step(call.op)
    opts = task_options(call.results, call.refresh)
    opts["task_run_name"] = run_name(title or call.title())
    with tagged(party=call.party(), round_=call.round()):
        return s.task.with_options(**opts).submit(*s.task_args(call.decoded_args()))


class PartyRunner:
    """Runs each step at its party: a task of the calling flow, or a run of the party flow
    that serves the step on the party's own work pool when ``remote`` names a deployment
    prefix for the party."""

    def __init__(
        self,
        remote: Mapping[str, str],
        *,
        coordinator: str,
        results: str,
        refresh: bool,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.remote = dict(remote)
        self.coordinator = coordinator
        self.results = results
        self.refresh = refresh
        self.timeout = timeout

    def _submit(self, party: str, call: StepCall, title: str) -> PrefectFuture[Any]:
        if party not in self.remote:
            return run_call(call, title=title)
        s = step(call.op)
        opts = {**task_options(call.results, call.refresh), "task_run_name": run_name(title)}
        dispatch = dispatch_step.with_options(name=f"dispatch-{s.flow}", **opts)
        deployment = deployment_name(s.flow, self.remote[party], party)
        with tagged(party=party, round_=call.round()):
            return dispatch.submit(deployment, call, self.timeout)

    def submit(
        self, party: str, task_: Task[P, R], *args: P.args, **kwargs: P.kwargs
    ) -> PrefectFuture[R]:
        """Submit a registered step task at ``party``, with its positional arguments (checked
        against the task's own signature; keyword arguments are refused, the wire carries
        positions)."""
        if kwargs:
            raise TypeError(f"{task_.name}: pass the step's arguments by position")
        call = StepCall.of(
            task_.name,
            args,
            coordinator=self.coordinator,
            results=self.results,
            refresh=self.refresh,
        )
        return self._submit(party, call, step_title(party, task_.name, call.round()))

    def __call__(self, party: str, task_: Task[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return self.submit(party, task_, *args, **kwargs).result()

    def submit_job(self, job: PartyJob) -> PrefectFuture[Any]:
        """Submit a horizontal training step at its party."""
        return self._submit(job.setup.party, StepCall.of_job(job), job.title())
