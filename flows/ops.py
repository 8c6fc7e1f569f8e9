"""Operations on a Prefect server: deploy or serve the fedfuse flows, start and follow runs,
list recent runs.

Every function talks to the API the Prefect settings point at (``PREFECT_API_URL``); nothing
here reads settings or opens a client at import time.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.common import artifact_key

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Schedule

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout the flows are deployed from (process work pools run them from here)."""

DEFAULT_POOL = "fedfuse"
PREPARE_CRON = "0 2 * * *"
TRAINING_CRON = "0 4 * * 1"
SCORE_INTERVAL = dt.timedelta(hours=6)
TAGS = ["fedfuse"]
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

FlowName = Literal[
    "prepare",
    "federated-training",
    "score",
    "party-pipeline",
    "party-step",
    "vertical-training",
    "vertical-score",
    "party-call",
]


@dataclass(frozen=True)
class FlowEntry:
    """One deployable flow: its file entrypoint (relative to the repo) and module path."""

    name: FlowName
    entrypoint: str
    module: str


FLOWS: tuple[FlowEntry, ...] = (
    FlowEntry("prepare", "flows/prepare.py:prepare", "flows.prepare"),
    FlowEntry("federated-training", "flows/horizontal.py:federated_training", "flows.horizontal"),
    FlowEntry("score", "flows/score.py:score", "flows.score"),
)
#: The deployments of a party with its own work pool.
#: A vertical consortium's deployments.
VERTICAL_FLOWS: tuple[FlowEntry, ...] = (
    FlowEntry("prepare", "flows/prepare.py:prepare", "flows.prepare"),
    FlowEntry("vertical-training", "flows/vertical.py:vertical_training", "flows.vertical"),
    FlowEntry("vertical-score", "flows/vertical.py:vertical_score", "flows.vertical"),
)
#: The deployments of a vertical consortium's party with its own work pool.
VERTICAL_PARTY_FLOWS: tuple[FlowEntry, ...] = (
    FlowEntry("party-pipeline", "flows/prepare.py:party_pipeline", "flows.prepare"),
    FlowEntry("party-call", "flows/party.py:party_call", "flows.party"),
)
PARTY_FLOWS: tuple[FlowEntry, ...] = (
    FlowEntry("party-pipeline", "flows/prepare.py:party_pipeline", "flows.prepare"),
    FlowEntry("party-step", "flows/party.py:party_step", "flows.party"),
    FlowEntry("score", "flows/score.py:score", "flows.score"),
)

#: A horizontal party's deployment for the named steps of ``prepare`` (learned vocabularies).
VOCABULARY_COUNT_FLOW = FlowEntry("party-call", "flows/party.py:party_call", "flows.party")


#: What a coordinator deployment does, whatever the layout: the keys of ``--schedule``,
#: ``--param``, ``--active`` and ``--inactive``.
Role = Literal["prepare", "training", "score"]
ROLES: tuple[Role, ...] = ("prepare", "training", "score")
ROLE_OF: dict[FlowName, Role] = {
    "prepare": "prepare",
    "federated-training": "training",
    "vertical-training": "training",
    "score": "score",
    "vertical-score": "score",
}


class ScheduleSetting(BaseModel):
    """One deployment's schedule: a cron expression or an interval, active or not."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cron: str | None = Field(default=None, description="Cron expression (5 fields)")
    interval: dt.timedelta | None = Field(default=None, description="Time between runs")
    active: bool = Field(default=True, description="Whether the schedule creates runs")
    timezone: str = Field(default="UTC", description="IANA time zone of the schedule")

    @model_validator(mode="after")
    def _one_kind(self) -> ScheduleSetting:
        from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

        if (self.cron is None) == (self.interval is None):
            raise ValueError("a schedule is a cron expression or an interval, exactly one")
        # Prefect's own schedule models check the expression, interval and time zone
        if self.cron is not None:
            CronSchedule(cron=self.cron, timezone=self.timezone)
        elif self.interval is not None:
            IntervalSchedule(interval=self.interval, timezone=self.timezone)
        return self

    def to_prefect(self, *, slug: str, parameters: dict[str, Any] | None = None) -> Schedule:
        from prefect.schedules import Cron, Interval

        if self.cron is not None:
            return Cron(
                self.cron,
                timezone=self.timezone,
                active=self.active,
                parameters=parameters,
                slug=slug,
            )
        assert self.interval is not None  # _one_kind
        return Interval(
            self.interval,
            timezone=self.timezone,
            active=self.active,
            parameters=parameters,
            slug=slug,
        )


def parse_schedule(text: str) -> ScheduleSetting | None:
    """``cron:0 2 * * *``, ``interval:3600`` (seconds) or ``interval:6h`` (a whole number
    and one of ms, s, min, h, d), or ``none``; :class:`ValueError` otherwise."""
    from pydantic import ValidationError

    from tasks.prepare.windows import parse_window

    kind, sep, value = text.strip().partition(":")
    kind, value = kind.strip().lower(), value.strip()
    if kind == "none" and not sep:
        return None
    try:
        if kind == "cron" and value:
            return ScheduleSetting(cron=value)
        if kind == "interval" and value:
            try:
                seconds = float(value)
            except ValueError:
                every = dt.timedelta(microseconds=parse_window(value).micros)
            else:
                try:
                    every = dt.timedelta(seconds=seconds)
                except (ValueError, OverflowError):  # NaN, inf, beyond timedelta's range
                    raise ValueError("interval: SECONDS must be a finite number") from None
            return ScheduleSetting(interval=every)
    except ValidationError as exc:
        message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise ValueError(f"{kind}: {message}") from None
    raise ValueError("a schedule is cron:EXPRESSION, interval:SECONDS (or 6h, 30min, ...) or none")


class Schedules(BaseModel):
    """The schedules of a spec's coordinator deployments, by role; ``None`` leaves that
    deployment unscheduled. A score schedule runs for one party (the first; each pooled
    party's own score deployment for itself) and starts inactive."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prepare: ScheduleSetting | None = ScheduleSetting(cron=PREPARE_CRON)
    training: ScheduleSetting | None = ScheduleSetting(cron=TRAINING_CRON)
    score: ScheduleSetting | None = ScheduleSetting(interval=SCORE_INTERVAL, active=False)

    @classmethod
    def from_options(
        cls,
        schedules: Iterable[str] = (),
        *,
        active: Iterable[str] = (),
        inactive: Iterable[str] = (),
        none: bool = False,
    ) -> Schedules:
        """The defaults, changed by ``ROLE=SCHEDULE`` items (:func:`parse_schedule`) and
        made active or inactive by role; ``none`` leaves every deployment unscheduled."""
        chosen: dict[str, ScheduleSetting | None] = dict.fromkeys(ROLES) if none else {}
        for item in schedules:
            role, sep, text = item.partition("=")
            role = _role(role, f"--schedule {item!r}", sep=bool(sep))
            try:
                chosen[role] = parse_schedule(text)
            except ValueError as exc:
                raise ValueError(f"--schedule {role}: {exc}") from None
        out = cls(**chosen)
        for flag, roles in (("--active", active), ("--inactive", inactive)):
            for name in roles:
                role = _role(name, f"{flag} {name!r}")
                setting = getattr(out, role)
                if setting is None:
                    raise ValueError(f"{flag} {role}: the {role} deployment has no schedule")
                setting = setting.model_copy(update={"active": flag == "--active"})
                out = out.model_copy(update={role: setting})
        return out

    def for_flow(self, flow: FlowName, *, party: str | None) -> list[Schedule]:
        role = ROLE_OF.get(flow)
        setting = getattr(self, role) if role else None
        if setting is None:
            return []
        if role == "score":
            if party is None:
                return []
            return [setting.to_prefect(slug=f"score-{party}", parameters={"party": party})]
        return [setting.to_prefect(slug=role)] if role else []


def _role(name: str, where: str, *, sep: bool = True) -> Role:
    role = name.strip()
    if not sep or role not in ROLES:
        raise ValueError(f"{where}: ROLE is one of {', '.join(ROLES)}")
    return role


def ensure_process_pool(name: str) -> bool:
    """Create a ``process`` work pool with the default job template if it is missing.

    Returns whether it was created. An existing pool of another type is an error."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
            return True
    if pool.type != "process":
        raise ValueError(f"work pool {name!r} has type {pool.type!r}, not 'process'")
    return False


@dataclass(frozen=True)
class PlannedDeployment:
    """One deployment to register: which flow, its name, pool, parameters and schedules."""

    entry: FlowEntry
    name: str
    work_pool: str | None
    parameters: dict[str, Any]
    schedules: list[Schedule]
    description: str


def plan_deployments(
    spec_path: str | Path,
    *,
    name: str | None = None,
    schedules: Schedules | None = None,
    work_pool: str | None = None,
    per_party: bool = True,
    parameters: dict[Role, dict[str, Any]] | None = None,
) -> list[PlannedDeployment]:
    """The deployments of one spec: ``prepare``, ``federated-training`` and ``score`` on the
    coordinator's pool and, for every party with a ``work_pool`` (``per_party``), that
    party's ``party-pipeline``, ``party-step`` and ``score`` deployments on its own pool.
    With party pools, the coordinator's deployments get ``dispatch=<name>`` so their runs
    send each party's steps to the party's pool. ``parameters`` adds default parameters to
    the coordinator's deployment of each role (checked against the flow's signature when
    the deployment is built, :func:`runner_deployments`)."""
    from tasks.spec.load import load_spec

    spec_file = Path(spec_path).resolve()
    spec = load_spec(str(spec_file))
    name = name or artifact_key(spec.consortium.name)
    schedules = schedules or Schedules()
    vertical = spec.consortium.layout == "vertical"
    pooled = [p for p in spec.parties if p.work_pool] if per_party else []
    base: dict[str, Any] = {"spec_path": str(spec_file)}
    coordinator_params = {**base, "dispatch": name} if pooled else base
    first_party = spec.parties[0].id
    consortium = f"consortium {spec.consortium.name}"
    planned: list[PlannedDeployment] = []
    for entry in VERTICAL_FLOWS if vertical else FLOWS:
        params = base if entry.name == "score" else coordinator_params
        params = {**params, **(parameters or {}).get(ROLE_OF[entry.name], {})}
        planned.append(
            PlannedDeployment(
                entry=entry,
                name=name,
                work_pool=work_pool,
                parameters=params,
                schedules=schedules.for_flow(entry.name, party=first_party),
                description=consortium,
            )
        )
    party_flows = VERTICAL_PARTY_FLOWS if vertical else PARTY_FLOWS
    if not vertical and spec.learned_vocabularies():  # prepare counts values at each party
        party_flows = (*PARTY_FLOWS, VOCABULARY_COUNT_FLOW)
    for party in pooled:
        for entry in party_flows:
            params = dict(base, party=party.id) if entry.name in ("party-pipeline", "score") else {}
            planned.append(
                PlannedDeployment(
                    entry=entry,
                    name=f"{name}-{party.id}",
                    work_pool=party.work_pool,
                    parameters=params,
                    schedules=(
                        schedules.for_flow(entry.name, party=party.id)
                        if entry.name == "score"
                        else []
                    ),
                    description=f"{consortium}, party {party.id} on its own work pool",
                )
            )
    return planned


def runner_deployments(
    planned: Sequence[PlannedDeployment],
    *,
    source: Literal["checkout", "module"] = "checkout",
) -> list[RunnerDeployment]:
    """Runner deployments of the planned ones.

    ``checkout``: loaded with ``flow.from_source`` from this repository, so a process worker
    runs them from the checkout (pull step ``set_working_directory``); ``module``: module
    entrypoints of the installed package (for ``serve``, which runs them in this process's
    environment). Each one's parameters, and each schedule's over them, are checked against
    its flow's signature first (:class:`ParameterError`)."""
    import importlib

    from prefect import Flow
    from prefect.types.entrypoint import EntrypointType

    out: list[RunnerDeployment] = []
    for plan in planned:
        entry = plan.entry
        if source == "checkout":
            flow = cast(
                "Flow[..., Any]",
                Flow.from_source(source=str(REPO_ROOT), entrypoint=entry.entrypoint),
            )
            kind = EntrypointType.FILE_PATH
        else:
            module = importlib.import_module(entry.module)
            flow = cast("Flow[..., Any]", getattr(module, entry.entrypoint.rsplit(":", 1)[1]))
            kind = EntrypointType.MODULE_PATH
        where = f"{entry.name}/{plan.name}"
        schema = flow.parameters.model_dump()
        check_parameters(where, schema, plan.parameters, required=False)
        for schedule in plan.schedules:
            check_parameters(where, schema, {**plan.parameters, **(schedule.parameters or {})})
        deployment = cast(
            "RunnerDeployment",
            flow.to_deployment(
                name=plan.name,
                parameters=plan.parameters,
                schedules=plan.schedules,
                description=f"{flow.description or entry.name} ({plan.description})",
                tags=[*TAGS, plan.name],
                work_pool_name=plan.work_pool,
                entrypoint_type=kind,
            ),
        )
        out.append(deployment)
    return out


def deploy(
    spec_path: str | Path,
    *,
    pool: str = DEFAULT_POOL,
    name: str | None = None,
    schedules: Schedules | None = None,
    parameters: dict[Role, dict[str, Any]] | None = None,
) -> list[str]:
    """Register (or update) a spec's deployments on process work pools (created if
    missing): the coordinator's three on ``pool``, each pooled party's own on its pool.
    Their schedules become exactly ``schedules``. Returns their full names
    (``flow/deployment``)."""
    from prefect.settings import PREFECT_DEPLOYMENTS_CLEAR_SCHEDULES_ON_EMPTY, temporary_settings

    planned = plan_deployments(
        spec_path, name=name, schedules=schedules, work_pool=pool, parameters=parameters
    )
    deployments = runner_deployments(planned)  # checks every parameter before any API call
    for plan_pool in dict.fromkeys(p.work_pool or pool for p in planned):
        ensure_process_pool(plan_pool)
    names: list[str] = []
    for plan, deployment in zip(planned, deployments, strict=True):
        target = plan.work_pool or pool
        if deployment.schedules:
            deployment.apply(work_pool_name=target)
        else:  # a redeploy without schedules removes the old ones
            with temporary_settings({PREFECT_DEPLOYMENTS_CLEAR_SCHEDULES_ON_EMPTY: True}):
                deployment.apply(schedules=[], work_pool_name=target)
        names.append(deployment.full_name)
    return names


def serve(
    spec_path: str | Path,
    *,
    name: str | None = None,
    schedules: Schedules | None = None,
    limit: int | None = None,
    parameters: dict[Role, dict[str, Any]] | None = None,
) -> None:
    """Serve the three deployments from this process until interrupted (Ctrl-C).

    No work pool or worker: this process polls for scheduled and manual runs and runs each
    in a subprocess. On shutdown Prefect pauses the served deployments' schedules."""
    from prefect import serve as prefect_serve

    planned = plan_deployments(
        spec_path, name=name, schedules=schedules, per_party=False, parameters=parameters
    )
    deployments = runner_deployments(planned, source="module")
    prefect_serve(*deployments, limit=limit, print_starting_message=True)


def parse_params(pairs: Iterable[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON when they parse as JSON, else plain strings."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"parameter {pair!r} is not of the form key=value")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def parse_role_params(pairs: Iterable[str]) -> dict[Role, dict[str, Any]]:
    """``ROLE.key=value`` pairs (``training.rounds=10``) by role, values as
    :func:`parse_params` reads them."""
    out: dict[Role, dict[str, Any]] = {}
    for key, value in parse_params(pairs).items():
        role, dot, name = key.partition(".")
        if not dot or not name:
            raise ValueError(
                f"parameter {key!r} is not of the form ROLE.key=value "
                f"(ROLE one of {', '.join(ROLES)})"
            )
        out.setdefault(_role(role, f"parameter {key!r}"), {})[name] = value
    return out


class ParameterError(ValueError):
    """Parameters a flow does not take, or values its parameter schema refuses."""


def check_parameters(
    where: str,
    schema: dict[str, Any],
    parameters: dict[str, Any],
    *,
    required: bool = True,
) -> None:
    """Check ``parameters`` against a flow's parameter schema (the deployment's
    ``parameter_openapi_schema``, or :func:`prefect.utilities.callables.parameter_schema`
    of the flow) with Prefect's own validator, the one the server runs, plus
    ``additionalProperties: false``: a name the flow does not take is refused (the server
    accepts it, and the run then crashes on the worker). One line naming ``where`` and the
    allowed parameters; ``required=False`` leaves missing required ones to later."""
    from prefect.utilities.schema_tools.validation import validate

    allowed = list(schema.get("properties", {}))
    strict = {**schema, "additionalProperties": False}
    problems: list[str] = []
    for error in validate(parameters, strict, ignore_required=not required):
        if error.validator == "additionalProperties":
            unknown = sorted(set(parameters) - set(allowed))
            problems.append(f"no parameter {', '.join(map(repr, unknown))}")
        elif error.validator == "required":
            problems.append(f"missing parameter {error.message.split(' ', 1)[0]}")
        else:
            name = ".".join(str(p) for p in error.absolute_path) or "parameters"
            problems.append(f"parameter {name!r}: {error.message}")
    if problems:
        raise ParameterError(
            f"{where}: {'; '.join(problems)} (its parameters: {', '.join(allowed) or 'none'})"
        )


def full_deployment_name(name: str) -> str:
    """``flow/deployment``; a bare name means the deployment named like its flow
    (as in ``deployments/prefect.yaml``)."""
    return name if "/" in name else f"{name}/{name}"


def start_run(deployment: str, parameters: dict[str, Any] | None = None) -> FlowRun:
    """Create a flow run of a deployment and return at once (a worker or ``serve`` runs it).

    The parameters, over the deployment's own, are checked against the flow's signature
    first (:func:`check_parameters`); a deployment that does not exist is ``ObjectNotFound``."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    name = full_deployment_name(deployment)
    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(name)
    if found.parameter_openapi_schema:  # a deployment without one: the server alone decides
        check_parameters(
            name,
            found.parameter_openapi_schema,
            {**(found.parameters or {}), **(parameters or {})},
        )
    run = run_deployment(
        name,
        parameters=parameters or {},
        flow_run_name=run_name_of(name, {**(found.parameters or {}), **(parameters or {})}),
        timeout=0,
        as_subflow=False,
    )
    return cast("FlowRun", run)


def run_name_of(deployment: str, parameters: dict[str, Any]) -> str | None:
    """The name the deployment's flow gives a run with these parameters (``demo: train``),
    for the run from its creation; ``None`` for a party's own flows (Prefect names those
    until they start)."""
    from flows.names import FLOW_RUN_NAMES

    found = FLOW_RUN_NAMES.get(deployment.split("/", 1)[0])
    return found.of(parameters) if found is not None else None


@dataclass
class _Seen:
    states: dict[UUID, str] = field(default_factory=dict)
    progress: dict[UUID, float] = field(default_factory=dict)
    flows: dict[UUID, str] = field(default_factory=dict)


def flow_names_of(
    client: SyncPrefectClient, runs: Sequence[FlowRun], cache: dict[UUID, str]
) -> None:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterId

    missing = list({r.flow_id for r in runs} - set(cache))
    if missing:
        for f in client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(any_=missing))):
            cache[f.id] = f.name


def descendants(client: SyncPrefectClient, run_id: UUID) -> list[FlowRun]:
    """All nested subflow runs of a run, oldest first."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    out: list[FlowRun] = []
    frontier = [run_id]
    while frontier:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)
            ),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
        )
        out += children
        frontier = [c.id for c in children]
    return out


def run_label(run: FlowRun, flow_name: str) -> str:
    """``party-pipeline[a]``, ``federated-round[3]``: the flow and the parameter telling
    its runs apart."""
    params = run.parameters or {}
    if isinstance(params.get("party"), str):
        return f"{flow_name}[{params['party']}]"
    job = params.get("job")
    if isinstance(job, dict) and isinstance(job.get("setup"), dict):
        step = job.get("op", "?")
        if job.get("round"):
            step = f"{step} round {job['round']}"
        return f"{flow_name}[{job['setup'].get('party', '?')} {step}]"
    state = params.get("state")
    if isinstance(state, dict) and "round" in state:
        return f"{flow_name}[round {state['round']}]"
    return flow_name


def _state_name(run: FlowRun) -> str:
    return (run.state.name if run.state else None) or "?"


def watch(
    flow_run_id: UUID,
    on_event: Callable[[str], None],
    *,
    poll: float = 1.0,
    timeout: float | None = None,
) -> FlowRun:
    """Follow a flow run until it is final, reporting each change through ``on_event``:
    the run's state, its subflow runs' states (parties, training rounds) and progress
    artifacts (the share of the training round limit done). Returns the final run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
    )

    seen = _Seen()
    deadline = None if timeout is None else time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            runs = [run, *descendants(client, flow_run_id)]
            flow_names_of(client, runs, seen.flows)
            changed = [r for r in runs if seen.states.get(r.id) != _state_name(r)]
            # in the order the states were entered (a subflow ends before its parent)
            changed.sort(key=lambda r: r.state.timestamp if r.state else EPOCH)
            for r in changed:
                state = seen.states[r.id] = _state_name(r)
                label = run_label(r, seen.flows.get(r.flow_id, "?"))
                message = f" ({r.state.message})" if r.state and r.state.message else ""
                if r.id == flow_run_id:
                    on_event(f"{r.name} {label}: {state}{message}")
                else:
                    on_event(f"  {label}: {state}{message}")
            for artifact in client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in runs]),
                    type=ArtifactFilterType(any_=["progress"]),
                )
            ):
                if isinstance(artifact.data, int | float) and seen.progress.get(
                    artifact.id
                ) != float(artifact.data):
                    seen.progress[artifact.id] = float(artifact.data)
                    on_event(
                        f"  progress {float(artifact.data):.0f}% ({artifact.key or 'progress'})"
                    )
            if run.state is not None and run.state.is_final():
                return run
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} not final after {timeout} s")
            time.sleep(poll)


def _metrics_text(metrics: Mapping[str, float]) -> str:
    from tasks.report import format_metric, metric_title

    shown = [k for k in sorted(metrics) if k != "mse" or "rmse" not in metrics]
    return ", ".join(f"{metric_title(k)} {format_metric(k, metrics[k])}" for k in shown) or "-"


def summary_lines(state: str, message: str | None, result: object) -> list[str]:
    """What ``fedfuse run --watch`` prints once a run is final: the state and, from the run's
    result, the final metrics, the best round, the stop reason and where the model, manifest,
    report and model card are (a prepare run: every party's fused table)."""
    from flows.publish import TrainingResult
    from flows.vertical import VerticalResult
    from tasks.horizontal.rounds import STOP_TEXT
    from tasks.prepare.steps import FusedOutput

    lines = [f"final state: {state}" + (f" ({message})" if message else "")]
    if isinstance(result, TrainingResult | VerticalResult):
        stop = STOP_TEXT.get(result.stop_reason or "", result.stop_reason or "not stopped early")
        best = result.best_round
        valid = result.valid[best - 1] if 0 < best <= len(result.valid) else {}
        test: Mapping[str, float] = result.test if isinstance(result, VerticalResult) else {}
        if isinstance(result, TrainingResult) and 0 < best <= len(result.test):
            test = result.test[best - 1]
        lines += [
            f"run key: {result.run_key}",
            f"best round: {best} of {result.rounds_run}; stopped: {stop}",
            f"final metrics (test, best round): {_metrics_text(test)}",
            f"validation at the best round: {_metrics_text(valid)}",
        ]
        if isinstance(result, TrainingResult):
            lines += [f"model: {result.model}", f"manifest: {result.manifest}"]
            lines += [f"report: {result.report}"]
            lines += [f"warning: {w}" for w in result.warnings]
        else:
            lines += [
                "model: every party's trees stay in its own store (the manifest lists them)",
                f"manifest: {result.manifest}",
                "report: the training-report artifact of the run (Prefect UI)",
            ]
        if result.model_card:
            lines.append(f"model card: {result.model_card}")
    elif isinstance(result, dict) and all(isinstance(v, FusedOutput) for v in result.values()):
        lines += [f"{party}: fused table {out.table.short}" for party, out in result.items()]
    return lines


def run_summary(run: FlowRun) -> list[str]:
    """:func:`summary_lines` of a final run, its result read from the run's result storage
    (the state alone when the result cannot be read here)."""
    state, message = _state_name(run), (run.state.message if run.state else None)
    if run.state is None or not run.state.is_completed():
        return summary_lines(state, message, None)
    try:
        result = run.state.result(raise_on_failure=False)
    except Exception as exc:  # e.g. result storage this machine cannot reach
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        return [*summary_lines(state, None, None), f"result not readable here: {first}"]
    return summary_lines(state, None, result)


@dataclass(frozen=True)
class RunRow:
    """One line of ``fedfuse status``."""

    id: UUID
    name: str
    flow: str
    deployment: str
    state: str
    start: dt.datetime | None
    duration: dt.timedelta | None
    party: str | None = None
    round: int | None = None


def recent_runs(limit: int = 20, *, subflows: bool = False) -> list[RunRow]:
    """The most recent flow runs (newest first; runs scheduled for later left out),
    top-level ones unless ``subflows``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterParentTaskRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    now = dt.datetime.now(dt.UTC)
    flow_filter = FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(before_=now))
    if not subflows:
        flow_filter.parent_task_run_id = FlowRunFilterParentTaskRunId(is_null_=True)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=flow_filter, sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit
        )
        flows: dict[UUID, str] = {}
        flow_names_of(client, runs, flows)
        ids = list({r.deployment_id for r in runs if r.deployment_id})
        deployments = (
            {
                d.id: d.name
                for d in client.read_deployments(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids))
                )
            }
            if ids
            else {}
        )
    from flows.names import party_and_round

    rows: list[RunRow] = []
    for r in runs:
        party, round_ = party_and_round(r.tags or [], r.parameters)
        duration: dt.timedelta | None = None
        if r.state is not None and r.state.is_running() and r.start_time is not None:
            duration = now - r.start_time
        elif r.start_time is not None:
            duration = r.total_run_time  # time spent running, over every attempt
        rows.append(
            RunRow(
                id=r.id,
                name=r.name,
                flow=flows.get(r.flow_id, "?"),
                deployment=deployments.get(r.deployment_id, "-") if r.deployment_id else "-",
                state=(r.state.name if r.state else None) or "?",
                start=r.start_time,
                duration=duration,
                party=party,
                round=round_,
            )
        )
    return rows


def find_run(id_or_name: str) -> FlowRun:
    """A flow run by id or by (unique) name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        try:
            return client.read_flow_run(UUID(id_or_name))
        except ValueError:
            pass
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[id_or_name])), limit=2
        )
    if len(runs) != 1:
        found = "no" if not runs else "more than one"
        raise ValueError(f"{found} flow run named {id_or_name!r}")
    return runs[0]


def retry_run(id_or_name: str | UUID) -> FlowRun:
    """Schedule a finished run of a deployment again (as ``prefect flow-run retry`` does);
    a worker picks it up, and steps whose results are cached are not run again."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import OrchestrationResult, SetStateStatus
    from prefect.states import Scheduled

    run = find_run(str(id_or_name))
    if run.deployment_id is None:
        raise ValueError(f"flow run {run.name} has no deployment to retry it on")
    if run.state is None or not run.state.is_final():
        raise ValueError(f"flow run {run.name} is not finished")
    with get_client(sync_client=True) as client:
        result: OrchestrationResult[Any] = client.set_flow_run_state(
            run.id, Scheduled(message="Retried by fedfuse"), force=True
        )
    if result.status == SetStateStatus.ABORT:
        raise RuntimeError(f"flow run {run.name} could not be retried: {result.details}")
    return run


@dataclass(frozen=True)
class ScheduleRow:
    """One schedule of a deployment, as ``fedfuse status`` lists it."""

    slug: str
    what: str
    active: bool


@dataclass(frozen=True)
class DeploymentRow:
    """One deployment and its schedules."""

    name: str
    work_pool: str
    paused: bool
    schedules: list[ScheduleRow]


def _describe(schedule: Any) -> str:
    cron = getattr(schedule, "cron", None)
    if cron is not None:
        return f"cron {cron} ({getattr(schedule, 'timezone', None) or 'UTC'})"
    interval = getattr(schedule, "interval", None)
    if interval is not None:
        return f"every {interval}"
    return type(schedule).__name__


def deployment_rows(limit: int = 200) -> list[DeploymentRow]:
    """The server's deployments (by full name) with their schedules and whether each is
    active, and whether the deployment is paused."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(limit=limit)
        flows: dict[UUID, str] = {}
        if deployments:
            from prefect.client.schemas.filters import FlowFilter, FlowFilterId

            ids = list({d.flow_id for d in deployments})
            flows = {
                f.id: f.name
                for f in client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(any_=ids)))
            }
    rows = [
        DeploymentRow(
            name=f"{flows.get(d.flow_id, '?')}/{d.name}",
            work_pool=d.work_pool_name or "-",
            paused=bool(d.paused),
            schedules=[
                ScheduleRow(slug=s.slug or str(s.id), what=_describe(s.schedule), active=s.active)
                for s in d.schedules
            ],
        )
        for d in deployments
    ]
    return sorted(rows, key=lambda r: r.name)


def set_schedules_active(
    deployment: str, active: bool, *, slug: str | None = None
) -> list[ScheduleRow]:
    """Make a deployment's schedules (or the one with ``slug``) active or inactive through
    Prefect's deployment schedule API. Resuming also resumes a paused deployment (as
    ``fedfuse serve`` leaves its deployments on shutdown), so its schedules create runs
    again. Returns the schedules changed; a deployment without (that) schedule is a
    :class:`ValueError`, a missing deployment ``ObjectNotFound``."""
    from prefect.client.orchestration import get_client

    name = full_deployment_name(deployment)
    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(name)
        chosen = [s for s in found.schedules if slug is None or s.slug == slug]
        if not chosen:
            slugs = ", ".join(s.slug or str(s.id) for s in found.schedules) or "none"
            what = f"no schedule {slug!r}" if slug else "no schedule"
            raise ValueError(f"deployment {name} has {what} (its schedules: {slugs})")
        for schedule in chosen:
            client.update_deployment_schedule(found.id, schedule.id, active=active)
        if active and found.paused:
            client.resume_deployment(found.id)
    return [
        ScheduleRow(slug=s.slug or str(s.id), what=_describe(s.schedule), active=active)
        for s in chosen
    ]
