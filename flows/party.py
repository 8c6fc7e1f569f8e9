"""Flows that run one party's step on the party's own work pool.

``party-step`` runs a horizontal training step (label statistics, start scores, a round's
update, an evaluation); ``party-call`` runs a named vertical step (PSI, a gradient round,
scores). The coordinator dispatches them (see :mod:`flows.transport`); they run the same
cached tasks the in-process flows run, so a step finished once is not computed again,
wherever it ran. :class:`PartyCalls` picks, per party, in-process task or dispatched run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from pydantic import BaseModel

from flows.common import run_name, task_options
from flows.transport import (
    DEFAULT_TIMEOUT,
    PartyJob,
    call_registry,
    decode_args,
    dispatch_call,
    dispatch_step,
    encode_args,
    encode_result,
    publish,
)
from tasks.horizontal.steps import PartyEval, evaluate_party, party_stats, start_scores, train_party


def _job_run_name() -> str:
    """``site-b: train round 3``: the party-step run's name in the UI."""
    from prefect.runtime import flow_run

    raw = flow_run.parameters.get("job")
    job = PartyJob.model_validate(raw) if raw is not None else None
    return step_name(job) if job is not None else "party-step"


def step_name(job: PartyJob) -> str:
    """A person's name for a party's training step: ``site-b: train round 3``."""
    what = {"stats": "label statistics", "start": "start scores"}.get(job.op)
    if what is None:
        r = job.aggregates[-1].round if job.op == "evaluate" and job.aggregates else job.round
        what = f"{job.op} round {r}"
    return f"{job.setup.party}: {what}"


@flow(name="party-step", flow_run_name=_job_run_name, persist_result=True)
def party_step(job: PartyJob) -> BaseModel:
    """One training step of one party (label statistics, start scores, a round's update or
    an evaluation), run where the party's data lives. An evaluation with
    ``next_learning_rate`` also trains the next round's update on the new scores, so a
    dispatched party costs one flow run per round, not two.

    Args:
        job: The step and its inputs (references to the party's own tables, the broadcast).
    """
    logger = get_run_logger()
    out: BaseModel = submit_job(job, {}).result()
    logger.info("party %s: %s step done", job.setup.party, job.op)
    if isinstance(out, PartyEval) and job.next_learning_rate is not None:
        train = job.model_copy(
            update={
                "op": "train",
                "round": job.round + 1,
                "scores": out.scores,
                "learning_rate": job.next_learning_rate,
                "aggregates": [],
                "next_learning_rate": None,
            }
        )
        # the next round's update is a head start only: if it fails, the evaluation still
        # goes back and the coordinator asks for the update again in the next round
        future = submit_job(train, {})
        future.wait()
        if future.state.is_completed():
            out = out.model_copy(update={"next": future.result()})
            logger.info("party %s: round %d update done", job.setup.party, train.round)
        else:
            logger.warning(
                "party %s: the round %d update failed (%s); the coordinator asks for it again",
                job.setup.party,
                train.round,
                future.state.message,
            )
    publish(job.setup.coordinator, out)
    return out


def submit_job(
    job: PartyJob, remote: Mapping[str, str], *, timeout: float = DEFAULT_TIMEOUT
) -> PrefectFuture[Any]:
    """Submit a party's step: to its own work pool when it has a deployment in ``remote``,
    else as a task of the calling flow."""
    opts = {**task_options(job.results, job.refresh), "task_run_name": run_name(step_name(job))}
    setup = job.setup
    if setup.party in remote:
        return dispatch_step.with_options(**opts).submit(remote[setup.party], job, timeout)
    if job.op == "stats":
        return party_stats.with_options(**opts).submit(setup)
    if job.op == "start":
        return start_scores.with_options(**opts).submit(setup, job.base)
    if job.scores is None:
        raise ValueError(f"{job.op} step for {setup.party}: no running scores given")
    if job.op == "train":
        if job.learning_rate is None:
            raise ValueError(f"train step for {setup.party}: no learning rate given")
        return train_party.with_options(**opts).submit(
            setup, job.round, job.scores, job.learning_rate
        )
    return evaluate_party.with_options(**opts).submit(setup, job.aggregates, job.scores)


@flow(name="party-call", persist_result=True)
def party_call(
    op: str, args: list[Any], coordinator: str, results: str, refresh: bool = False
) -> Any:
    """One step of a vertical consortium (PSI, a training round, scores), run where the
    party's data lives.

    Args:
        op: The step (a task name of tasks.vertical.steps, e.g. vertical-party-round).
        args: Its arguments as JSON (references to the party's own tables, messages).
        coordinator: The coordinator store the result goes to.
        results: Folder for persisted task results.
        refresh: Recompute, ignoring cached results.
    """
    registry = call_registry()
    if op not in registry:
        raise ValueError(f"party-call: unknown step {op!r}; known: {sorted(registry)}")
    typed = decode_args(op, args)
    out = registry[op].with_options(**task_options(results, refresh))(*typed)
    get_run_logger().info("step %s done", op)
    publish(coordinator, encode_result(op, out))
    return out


class PartyCalls:
    """Runs each vertical step at its party: a task of the calling flow, or a ``party-call``
    run on the party's own work pool when ``remote`` names a deployment for it."""

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

    def submit(self, party: str, step: Any, *args: Any) -> PrefectFuture[Any]:
        opts = {
            **task_options(self.results, self.refresh),
            "task_run_name": run_name(f"{party}: {step.name}"),
        }
        if party in self.remote:
            return dispatch_call.with_options(**opts).submit(
                self.remote[party],
                step.name,
                encode_args(args),
                self.coordinator,
                self.results,
                self.refresh,
                self.timeout,
            )
        return step.with_options(**opts).submit(*args)  # type: ignore[no-any-return]

    def __call__(self, party: str, step: Any, *args: Any) -> Any:
        return self.submit(party, step, *args).result()
