"""The vertical steps as Prefect tasks: one typed wrapper around each step function of
:mod:`tasks.vertical.steps_label` and :mod:`tasks.vertical.steps_party`, under its task name.

:func:`step` keeps the step's full signature and return type (``Task[P, R]``), so every
call site is type checked. :data:`STEP_TASKS` lists the steps a party can be asked to run
on its own work pool (``party-call``); the pooled baselines are not among them, since they
need every party's data in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from tasks.caching import content_cache_key
from tasks.vertical import steps_label as label
from tasks.vertical import steps_party as party
from tasks.vertical.baselines import pooled_baselines

P = ParamSpec("P")
R = TypeVar("R")


def step(name: str) -> Callable[[Callable[P, R]], Task[P, R]]:
    """A step as the task ``name``: result persisted, cached by the content of its inputs
    and of its code (:func:`tasks.caching.content_cache_key`)."""
    return task(name=name, cache_key_fn=content_cache_key, persist_result=True)


def live_step(name: str) -> Callable[[Callable[P, R]], Task[P, R]]:
    """A step that reads the party's current state as the task ``name``: never cached."""
    return task(name=name, cache_policy=NO_CACHE)


# -- PSI -------------------------------------------------------------------------------------
psi_blind_task = step("psi-label-blind")(label.psi_label_blind)
psi_answer_task = step("psi-party-answer")(party.psi_party_answer)
psi_intersect_task = step("psi-label-intersect")(label.psi_label_intersect)
psi_receive_task = step("psi-party-receive")(party.psi_party_receive)

# -- the text block ------------------------------------------------------------------------
text_block_task = step("vertical-text-block")(party.party_text_block)
text_block_at_task = live_step("vertical-text-block-at")(party.text_block_at)

# -- gradient rounds -------------------------------------------------------------------------
latest_state_task = live_step("vertical-latest-state")(label.latest_state)
model_at_task = live_step("vertical-model-at")(party.model_at)
start_state_task = step("vertical-start")(label.start_state)
gradients_task = step("vertical-gradients")(label.send_gradients)
party_round_task = step("vertical-party-round")(party.party_round)
combine_task = step("vertical-combine")(label.combine)
finish_task = step("vertical-finish")(label.finish_state)
test_scores_task = step("vertical-test-scores")(party.party_test_scores)
test_metrics_task = step("vertical-test-metrics")(label.fused_test_metrics)

# -- one-shot mode ---------------------------------------------------------------------------
send_labels_task = step("vertical-send-labels")(label.send_labels)
one_shot_task = step("vertical-one-shot")(party.party_one_shot)
one_shot_fusion_task = step("vertical-one-shot-fusion")(label.one_shot_fusion)

# -- inference -------------------------------------------------------------------------------
party_scores_task = step("vertical-party-scores")(party.party_scores)
fuse_predictions_task = step("vertical-fuse-predictions")(label.fuse_predictions)

# -- comparison only (pools data; in process) ------------------------------------------------
baselines_task = step("vertical-pooled-baselines")(pooled_baselines)

#: The steps a ``party-call`` run may execute at a party, looked up by task name.
STEP_TASKS: tuple[Task[..., Any], ...] = (
    psi_blind_task,
    psi_answer_task,
    psi_intersect_task,
    psi_receive_task,
    start_state_task,
    gradients_task,
    text_block_task,
    text_block_at_task,
    party_round_task,
    combine_task,
    finish_task,
    test_scores_task,
    test_metrics_task,
    latest_state_task,
    model_at_task,
    send_labels_task,
    one_shot_task,
    one_shot_fusion_task,
    party_scores_task,
    fuse_predictions_task,
)
