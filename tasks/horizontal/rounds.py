"""The rules of a horizontal round, written once: which updates are accepted, the quorum,
the tree budget and the decision to stop, with its reason.

Both the Prefect flow (:mod:`flows.horizontal`) and the in-memory loop
(:func:`tasks.horizontal.loop.train_federated`) call these; nothing here reads files or the clock
(the caller passes elapsed seconds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from pydantic import BaseModel, Field

from tasks.horizontal.leaf_refit import LeafSums, refit_leaves, refit_values, sums_problem
from tasks.horizontal.model_text import check_update, leaf_bound
from tasks.horizontal.strategies import Strategy, make_strategy
from tasks.spec.models import TrainingSpec
from tasks.types import Objective

#: Why training stopped.
StopReason = Literal["rounds", "early_stopping", "max_trees", "max_seconds"]

#: An update larger than this is refused unread (a LightGBM tree of 131072 leaves is ~10 MB).
MAX_UPDATE_BYTES = 64 * 1024 * 1024


class RoundError(RuntimeError):
    """A round cannot be completed (fewer accepted updates than ``min_parties``)."""


class QuorumError(RoundError):
    """Fewer valid party updates than the spec's ``min_parties``."""


class Candidate(BaseModel):
    """One party's update as the coordinator received it: its text, or why it has none."""

    party: str
    round: int
    n_train: int = Field(ge=0)
    text: str | None = None
    problem: str | None = Field(default=None, description="Why the update could not be read")


@dataclass(frozen=True)
class ModelRules:
    """What every accepted update must look like."""

    feature_names: Sequence[str]
    categorical: Sequence[str]
    objective: Objective
    num_class: int
    trees_per_round: int
    max_abs_leaf: float | None = None

    @classmethod
    def for_training(
        cls,
        *,
        feature_names: Sequence[str],
        categorical: Sequence[str],
        objective: Objective,
        num_class: int,
        trees_per_round: int,
        learning_rate: float,
        label_span: float = 0.0,
    ) -> ModelRules:
        return cls(
            feature_names=list(feature_names),
            categorical=list(categorical),
            objective=objective,
            num_class=num_class,
            trees_per_round=trees_per_round,
            max_abs_leaf=leaf_bound(objective, learning_rate, num_class, label_span),
        )

    @classmethod
    def for_spec(
        cls,
        training: TrainingSpec,
        *,
        feature_names: Sequence[str],
        categorical: Sequence[str],
        objective: Objective,
        num_class: int,
        label_span: float = 0.0,
    ) -> ModelRules:
        """The rules of a training run under ``training``: its tree limit and, for the leaf
        bound, its learning rate and (regression only) the pooled ``label_span``."""
        return cls.for_training(
            feature_names=feature_names,
            categorical=categorical,
            objective=objective,
            num_class=num_class,
            trees_per_round=training.trees_per_round,
            learning_rate=training.learning_rate,
            label_span=label_span if objective == "regression" else 0.0,
        )


@dataclass
class Review:
    """The outcome of a round's updates: accepted ones (in arrival order) and the reasons
    of the parties left out."""

    accepted: list[Candidate] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)


def review_updates(
    candidates: Sequence[Candidate],
    *,
    round_: int,
    rules: ModelRules,
    planned: Sequence[str] | None = None,
    failed: Mapping[str, str] | None = None,
) -> Review:
    """Accept or reject each update: readable, for this round, one per party, from a party
    the strategy asked, and a LightGBM model :func:`~tasks.horizontal.model_text.check_update` passes."""
    review = Review(rejected=dict(failed or {}))
    for update in candidates:
        problems: list[str] = []
        if update.problem is not None:
            problems.append(update.problem)
        if update.round != round_:
            problems.append(f"update is for round {update.round}, not {round_}")
        if any(u.party == update.party for u in review.accepted):
            problems.append("second update from the same party")
        if planned is not None and update.party not in planned:
            problems.append("the strategy did not ask this party to train this round")
        if not problems and update.text is not None:
            problems = check_update(
                update.text,
                feature_names=rules.feature_names,
                objective=rules.objective,
                num_class=rules.num_class,
                trees_per_round=rules.trees_per_round,
                categorical=rules.categorical,
                max_abs_leaf=rules.max_abs_leaf,
            )
        elif not problems:
            problems.append("no update text")
        if problems:
            review.rejected[update.party] = "; ".join(problems)
        else:
            review.accepted.append(update)
    return review


def structure_rules(rules: ModelRules) -> ModelRules:
    """The checks of an update whose leaf values the consortium sets (``leaf_values =
    "consortium"``): its own values are not bounded, since they are replaced, and the new
    ones are clipped to the bound. A nearly one-class party's trees have huge values of
    their own and still a useful structure."""
    return replace(rules, max_abs_leaf=None)


def refit_review(
    review: Review,
    sums: Mapping[str, Mapping[str, LeafSums]],
    *,
    rules: ModelRules,
    learning_rates: Mapping[str, float],
    min_rows: int,
    lambda_l2: float = 0.0,
) -> tuple[Review, dict[str, str]]:
    """The accepted updates with the consortium's leaf values (``leaf_values =
    "consortium"``, :mod:`tasks.horizontal.leaf_refit`): ``sums`` maps each reporting party
    to its sums per accepted update. A report that does not fit an update's trees is left
    out (returned: reporter -> reason), an empty one (no training rows) adds nothing; an
    update nobody reported on keeps its values."""
    bad: dict[str, str] = {}
    for reporter, by_update in sums.items():
        if not by_update:  # a party without training rows has nothing to add
            continue
        for update in review.accepted:
            got = by_update.get(update.party)
            why = (
                "no sums"
                if got is None
                else sums_problem(update.text or "", got, min_rows=min_rows)
            )
            if why is not None:
                bad[reporter] = f"leaf sums of the update of {update.party}: {why}"
                break
    accepted: list[Candidate] = []
    for update in review.accepted:
        reports = [s[update.party] for r, s in sums.items() if r not in bad and s]
        if not reports:
            accepted.append(update)
            continue
        values = refit_values(
            reports,
            learning_rate=learning_rates[update.party],
            lambda_l2=lambda_l2,
            max_abs_leaf=rules.max_abs_leaf,
        )
        accepted.append(update.model_copy(update={"text": refit_leaves(update.text or "", values)}))
    return Review(accepted=accepted, rejected=dict(review.rejected)), bad


def require_quorum(review: Review, *, round_: int, min_parties: int) -> None:
    if len(review.accepted) < min_parties:
        left_out = "; ".join(f"{p}: {r}" for p, r in sorted(review.rejected.items()))
        raise QuorumError(
            f"round {round_}: {len(review.accepted)} valid update(s), min_parties is {min_parties}; "
            f"left out: {left_out or 'none'}"
        )


def weigh(review: Review, strategy: Strategy) -> dict[str, float]:
    """The accepted updates' weights under the strategy (party -> w_k)."""
    weights = strategy.weights({u.party: u.n_train for u in review.accepted})
    if not all(math.isfinite(w) for w in weights.values()):
        raise RoundError(f"non-finite weights {weights}")
    return weights


class LabelCounts(Protocol):
    @property
    def n_train(self) -> int: ...
    @property
    def label_sum(self) -> float: ...
    @property
    def label_sq_sum(self) -> float: ...
    @property
    def class_counts(self) -> Sequence[int]: ...


def label_span(stats: Sequence[LabelCounts]) -> float:
    """A spread of the pooled training labels from the parties' aggregates (the regression
    leaf bound): 12 pooled standard deviations plus the mean's size, far beyond any label a
    Gaussian-like target reaches; 0 without rows."""
    n = sum(s.n_train for s in stats)
    if n <= 0:
        return 0.0
    mean = sum(s.label_sum for s in stats) / n
    var = max(sum(s.label_sq_sum for s in stats) / n - mean * mean, 0.0)
    return float(12.0 * math.sqrt(var) + abs(mean))


def cannot_train(stats: LabelCounts, objective: Objective) -> str | None:
    """Why a party cannot take part in training (None: it can). A party without training
    rows, or (classification) whose training rows all carry one class, is left out: its
    update would only push the ensemble towards that class."""
    if stats.n_train <= 0:
        return "no usable training rows (empty, or every row quarantined at prepare)"
    if objective == "binary" and stats.label_sum in (0.0, float(stats.n_train)):
        return "one class only in its training rows"
    if objective == "multiclass" and sum(1 for c in stats.class_counts if c > 0) < 2:
        return "one class only in its training rows"
    return None


def require_trainers(
    trainers: Mapping[str, int], left_out: Mapping[str, str], *, min_parties: int
) -> int:
    """How many parties can train (``trainers``: party -> usable training rows, 0 for those
    left out); :class:`QuorumError` naming every left-out party when fewer than
    ``min_parties``."""
    able = sum(1 for n in trainers.values() if n > 0)
    if able < min_parties:
        why = "; ".join(f"{p}: {r}" for p, r in sorted(left_out.items())) or "none"
        raise QuorumError(
            f"{able} part(ies) can train, min_parties is {min_parties}; left out: {why}"
        )
    return able


def strategy_for(training: TrainingSpec) -> Strategy:
    """The spec's aggregation strategy with its learning rate, seed and turn order."""
    return make_strategy(
        training.aggregation,
        learning_rate=training.learning_rate,
        seed=training.seed,
        order=training.order,
    )


def round_trees(
    strategy: Strategy, n_train: Mapping[str, int], trees_per_round: int, k: int
) -> int:
    """At most this many LightGBM trees (all classes) one round adds."""
    return strategy.max_trainers(n_train) * trees_per_round * k


def stop_before(
    round_: int,
    *,
    rounds: int,
    trees: int,
    next_trees: int,
    max_trees: int | None,
    elapsed: float = 0.0,
    max_seconds: float | None = None,
) -> StopReason | None:
    """Why round ``round_`` may not run (None: it may). ``trees`` is the ensemble's size so
    far, ``next_trees`` the most the round can add, ``elapsed`` the run's seconds so far."""
    if round_ > rounds:
        return "rounds"
    if max_trees is not None and trees + next_trees > max_trees:
        return "max_trees"
    if max_seconds is not None and elapsed >= max_seconds:
        return "max_seconds"
    return None


def rounds_in_budget(rounds: int, per_round: int, max_trees: int | None) -> tuple[int, StopReason]:
    """How many rounds of ``per_round`` trees :func:`stop_before` lets run from scratch, and
    why the last one is last (a synchronous mode that plans all its rounds up front)."""
    done = 0
    while (
        why := stop_before(
            done + 1,
            rounds=rounds,
            trees=done * per_round,
            next_trees=per_round,
            max_trees=max_trees,
        )
    ) is None:
        done += 1
    return done, why


STOP_TEXT: dict[str, str] = {
    "rounds": "round limit reached",
    "early_stopping": "early stopping: no better validation loss within patience",
    "max_trees": "tree budget: the next round would exceed max_trees",
    "max_seconds": "wall-time budget (max_seconds) used up",
}
