"""A horizontal training session's state and its transitions, as pure typed functions: the
round's input and output, the checkpoint a run resumes from, which parties catch up, which
prefetched updates a round takes, the evaluation quorum, the ensemble a checkpoint holds.

The ``federated-training`` and ``federated-round`` flows wire these to the party steps.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, Field

from storage.store import TableRef
from tasks.horizontal.ensemble import GlobalEnsemble
from tasks.horizontal.rounds import QuorumError, StopReason
from tasks.horizontal.steps import (
    PartyEval,
    PartyStats,
    PartyUpdate,
    RoundAggregate,
    TrainSetup,
    members,
)
from tasks.horizontal.training import EarlyStopping
from tasks.prepare.design import FeatureSchema
from tasks.spec.models import FedSpec, TrainingSpec
from tasks.types import Objective


def loss_name(objective: Objective) -> str:
    """The validation loss early stopping watches."""
    return {"binary": "logloss", "multiclass": "logloss", "regression": "rmse"}[objective]


class RoundInput(BaseModel):
    """Everything one round needs: party setups, running-score references, learning rates."""

    round: int = Field(ge=1)
    setups: list[TrainSetup]
    scores: dict[str, TableRef]
    scores_round: dict[str, int] = Field(description="Round each party's running scores are at")
    history: list[RoundAggregate] = Field(default_factory=list, description="Rounds so far")
    learning_rates: dict[str, float] = Field(
        description="The parties that train this round (the strategy's plan) and their rates"
    )
    label_span: float = Field(default=0.0, description="Pooled label spread (leaf bound)")
    results: str
    refresh: bool = False
    remote: dict[str, str] = Field(
        default_factory=dict,
        description="Party -> the prefix of its deployments (its steps run on its own pool)",
    )
    timeout: float = Field(default=3600.0, description="Seconds to wait for a dispatched step")
    prefetched: dict[str, PartyUpdate] = Field(
        default_factory=dict,
        description="Updates for this round that dispatched parties trained in the previous "
        "round's evaluation run",
    )
    next_learning_rates: dict[str, float] = Field(
        default_factory=dict, description="The next round's plan (with prefetch)"
    )
    prefetch: bool = Field(
        default=False,
        description="A next round follows: dispatched parties train it in this round's "
        "evaluation run (one flow run per party and round instead of two)",
    )

    def behind(self) -> dict[str, int]:
        """Parties whose running scores missed rounds, and the round they are at."""
        return {
            s.party: self.scores_round[s.party]
            for s in self.setups
            if self.scores_round[s.party] < self.round - 1
        }

    def ready(self, failed: Mapping[str, str]) -> dict[str, PartyUpdate]:
        """This round's updates that came with the last evaluation."""
        parties = {s.party for s in self.setups}
        return {
            party: update
            for party, update in self.prefetched.items()
            if party in parties and party not in failed and update.round == self.round
        }

    def next_rate(self, party: str) -> float | None:
        """The rate ``party`` trains the next round at in this round's evaluation run
        (None: no head start)."""
        if self.prefetch and party in self.remote:
            return self.next_learning_rates.get(party)
        return None


class RoundOutput(BaseModel):
    aggregate: RoundAggregate
    evals: dict[str, PartyEval]
    valid: dict[str, float]
    test: dict[str, float]
    scores: dict[str, TableRef]
    scores_round: dict[str, int]

    def next_updates(self) -> dict[str, PartyUpdate]:
        """Updates for the next round trained in this round's evaluation runs."""
        return {p: e.next for p, e in self.evals.items() if e.next is not None}


def require_evaluations(
    round_: int, min_parties: int, asked: list[str], evaluated: list[str]
) -> None:
    """The round's metrics (and so early stopping and the best round) come from its
    evaluations: below the quorum they would be another model's, so the round is redone."""
    wanted = min(min_parties, len(asked)) or 1
    if len(evaluated) < wanted:
        missing = sorted(set(asked) - set(evaluated))
        raise QuorumError(
            f"round {round_}: {len(evaluated)} evaluation(s), min_parties is "
            f"{min_parties}; not evaluated at {', '.join(missing)}"
        )


class Checkpoint(BaseModel):
    run_key: str
    round: int
    base_score: list[float]
    rounds: list[RoundAggregate]
    valid: list[dict[str, float]]
    test: list[dict[str, float]]
    scores: dict[str, TableRef]
    scores_round: dict[str, int] = Field(default_factory=dict)
    best_round: int
    best_loss: float | None
    stopped: bool = False
    stop_reason: StopReason | None = None
    left_out: dict[str, str] = Field(
        default_factory=dict, description="Parties that cannot take part, and why"
    )
    party_valid: list[dict[str, dict[str, float]]] = Field(
        default_factory=list,
        description="Each round's validation metrics at every party that evaluated it "
        "(on its own validation rows); empty in a checkpoint written before they were kept",
    )

    @classmethod
    def fresh(
        cls, run_key: str, base: list[float], scores: dict[str, TableRef], left_out: dict[str, str]
    ) -> Checkpoint:
        """A run before its first round: every party at its start scores."""
        return cls(
            run_key=run_key,
            round=0,
            base_score=base,
            rounds=[],
            valid=[],
            test=[],
            scores=scores,
            scores_round=dict.fromkeys(scores, 0),
            best_round=0,
            best_loss=None,
            left_out=left_out,
        )

    def trees(self) -> int:
        return sum(m.trees for r in self.rounds for m in r.members)

    def after(self, out: RoundOutput, stopper: EarlyStopping, stop: bool) -> Checkpoint:
        """The checkpoint after round ``out.aggregate.round``."""
        return self.model_copy(
            update={
                "round": out.aggregate.round,
                "rounds": [*self.rounds, out.aggregate],
                "valid": [*self.valid, out.valid],
                "test": [*self.test, out.test],
                "party_valid": [
                    *self.party_valid,
                    *[{}] * (len(self.valid) - len(self.party_valid)),  # resumed: none kept
                    {p: e.valid for p, e in sorted(out.evals.items())},
                ],
                "scores": out.scores,
                "scores_round": out.scores_round,
                "best_round": stopper.best_round,
                "best_loss": stopper.best_loss,
                "stopped": stop,
                "stop_reason": "early_stopping" if stop else None,
            }
        )

    def ensemble(
        self, schema: FeatureSchema, objective: Objective, num_class: int, training: TrainingSpec
    ) -> GlobalEnsemble:
        return GlobalEnsemble(
            objective=objective,
            num_class=num_class,
            base_score=self.base_score,
            feature_names=schema.names,
            categorical=schema.categorical,
            rounds=[members(r) for r in self.rounds],
            metrics=self.valid,
            best_round=self.best_round,
            aggregation=training.aggregation,
            trees_per_round=training.trees_per_round,
        )

    def best(self) -> int:
        """The round the exported model ends at (0: base score only)."""
        return self.best_round if self.rounds else 0

    def dropped(self) -> dict[int, dict[str, str]]:
        return {r.round: r.dropped for r in self.rounds if r.dropped}


def training_setups(
    spec: FedSpec,
    training: TrainingSpec,
    *,
    key: str,
    schema: FeatureSchema,
    fused: dict[str, TableRef],
    num_class: int,
) -> list[TrainSetup]:
    """Every labelled party's training setup."""
    return [
        TrainSetup(
            party=p,
            store=spec.party(p).store,
            coordinator=spec.coordinator.store,
            run_key=key,
            fused=ref,
            schema_=schema,
            objective=spec.consortium.task,
            num_class=num_class,
            training=training,
        )
        for p, ref in fused.items()
    ]


def check_training_request(
    spec: FedSpec,
    spec_path: str,
    training: TrainingSpec,
    remote: Mapping[str, str],
    baselines: bool,
) -> None:
    """What ``federated-training`` refuses before it starts."""
    if spec.consortium.layout != "horizontal":
        raise ValueError(
            f"{spec_path}: federated-training averages party models over shared features "
            "(horizontal layout); vertical consortia are prepared but not trained yet"
        )
    if baselines and remote:
        raise ValueError(
            "baselines pool the parties' fused tables in one process; they cannot run while "
            f"parties {sorted(remote)} work on their own pools"
        )
    if training.mode == "lossless" and remote:
        missing = [p.id for p in spec.parties if p.lossless_address is None]
        if missing:
            raise ValueError(
                f"{spec_path}: lossless mode with parties on their own pools needs every "
                "party's lossless_address (host:port its LightGBM listens on, reachable by the "
                f"other parties; port 0: a free port picked at start); parties {missing} have none"
            )


def usable(setups: list[TrainSetup], stats: Mapping[str, PartyStats]) -> list[TrainSetup]:
    """A party without rows has nothing to evaluate either; a one-class party still
    evaluates."""
    return [s for s in setups if s.party in stats and stats[s.party].n_train > 0]


def prefetch_wanted(
    remote: Mapping[str, str], round_: int, rounds: int, stop_after: int | None, done_here: int
) -> bool:
    """A head start on round t+1 only when it may follow (budgets aside: at worst an update
    trained for nothing)."""
    return bool(remote) and round_ < rounds and (stop_after is None or done_here + 1 < stop_after)
