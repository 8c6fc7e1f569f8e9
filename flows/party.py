"""The flows a party's worker runs for the coordinator: thin entries into
:func:`flows.transport.run_call`.

``party-step`` runs a horizontal training step (label statistics, feature sketches, start scores, a round's
update, an evaluation); ``party-call`` runs a named step (a vertical one: PSI, a gradient
round, scores; or the vocabulary count of ``prepare``). Both run the same cached tasks the in-process flows run, so a step finished once is
not computed again, wherever it ran, and hand the result back through the coordinator store.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, JsonValue

from flows.names import RunName
from flows.transport import PartyJob, StepCall, encode_result, publish, run_call
from tasks.horizontal.steps import PartyEval


def _job_title(params: Mapping[str, Any]) -> str:
    """``site-b: train round 3``: the party-step run's name in the UI."""
    raw = params.get("job")
    try:
        return PartyJob.model_validate(raw).title() if raw is not None else "party-step"
    except ValueError:  # a malformed job fails in the flow itself
        return "party-step"


def _call_title(params: Mapping[str, Any]) -> str:
    """``site-b: vertical-party-round 3``: the party-call run's name in the UI."""
    try:
        call = StepCall(
            op=params["op"],
            args=params.get("args") or [],
            coordinator=params.get("coordinator", ""),
        )
        return call.title()
    except (KeyError, TypeError, ValueError):  # an unknown op fails in the flow itself
        return "party-call"


_job_run_name = RunName(_job_title, "job_run_name")
_call_run_name = RunName(_call_title, "call_run_name")


def _next_update(job: PartyJob, out: PartyEval) -> PartyEval:
    """An evaluation with ``next_learning_rate`` also trains the next round's update on the
    new scores. A head start only: if it fails, the evaluation still goes back and the
    coordinator asks for the update again in the next round."""
    logger = get_run_logger()
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
    future = run_call(StepCall.of_job(train), title=train.title())
    future.wait()
    if future.state.is_completed():
        logger.info("party %s: round %d update done", job.setup.party, train.round)
        return out.model_copy(update={"next": future.result()})
    logger.warning(
        "party %s: the round %d update failed (%s); the coordinator asks for it again",
        job.setup.party,
        train.round,
        future.state.message,
    )
    return out


@flow(name="party-step", flow_run_name=_job_run_name, persist_result=True)
def party_step(job: PartyJob) -> BaseModel:
    """One training step of one party (label statistics, start scores, a round's update or
    an evaluation), run where the party's data lives. An evaluation with
    ``next_learning_rate`` also trains the next round's update on the new scores, so a
    dispatched party costs one flow run per round, not two.

    Args:
        job: The step and its inputs (references to the party's own tables, the broadcast).
    """
    out: BaseModel = run_call(StepCall.of_job(job), title=job.title()).result()
    get_run_logger().info("party %s: %s step done", job.setup.party, job.op)
    if isinstance(out, PartyEval) and job.next_learning_rate is not None:
        out = _next_update(job, out)
    publish(job.setup.coordinator, encode_result(job.op, out))
    return out


@flow(name="party-call", flow_run_name=_call_run_name, persist_result=True)
def party_call(
    op: str, args: list[JsonValue], coordinator: str, results: str, refresh: bool = False
) -> object:
    """One named step (of a vertical consortium: PSI, a training round, scores; or the
    vocabulary count of prepare), run where the party's data lives.

    Args:
        op: The step (a task name, e.g. vertical-party-round or count-vocabulary-values).
        args: Its arguments as JSON (references to the party's own tables, messages).
        coordinator: The coordinator store the result goes to.
        results: Folder for persisted task results.
        refresh: Recompute, ignoring cached results.
    """
    call = StepCall(op=op, args=args, coordinator=coordinator, results=results, refresh=refresh)
    out = run_call(call).result()
    get_run_logger().info("step %s done", op)
    publish(coordinator, encode_result(op, out))
    return out
