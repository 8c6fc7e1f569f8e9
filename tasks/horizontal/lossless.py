"""Lossless horizontal training: one LightGBM model over all parties' rows, no rows moved.

LightGBM's distributed *data-parallel* learner (``tree_learner="data"``) grows every tree
from histograms of gradients and hessians summed over all machines. With one machine per
party, each holding only its own rows (``pre_partition=True``), the parties exchange
per-feature, per-bin histogram sums, never rows, and the trees are those of a single model
trained on the pooled rows: unlike output averaging (:mod:`tasks.horizontal.loop`), label skew
costs no accuracy.

Protocol (:func:`train_lossless`), one OS process per party (LightGBM's network is global
to a process, so two machines never share one; ``spawn`` context, so no parent state is
inherited):

1. every party process loads its own rows (a :class:`FusedSource` is read inside the
   process: the orchestrating process only passes the table reference), splits them from
   the entity hash or the decided split (:func:`tasks.horizontal.training.frame_splits`)
   and reports its label aggregates (:class:`tasks.horizontal.training.LabelStats`), as in
   averaging mode;
2. the coordinator computes the base score F_0 from those aggregates
   (:func:`tasks.horizontal.training.base_score`: pooled log-odds, log priors or mean) and sends it
   back. LightGBM's own ``boost_from_average`` is left off: in distributed mode it takes
   the *unweighted* mean of the machines' local averages, which under label skew and
   unequal party sizes is not the pooled one. F_0 is every row's ``init_score`` instead,
   exactly as :func:`tasks.horizontal.baselines.train_centralised` starts;
3. the parties join one LightGBM network (``machines`` = every party's ``host:port``,
   ``local_listen_port`` = its own, ``num_machines`` = P, ``time_out`` in minutes) and train
   the full tree budget, ``rounds × trees_per_round`` iterations, with the same params as
   :func:`tasks.horizontal.training.lgb_params` (single-threaded, deterministic);
4. after every round of ``trees_per_round`` iterations, every party scores its own
   validation and test rows (running raw scores) and sends the validation metrics to the
   coordinator; the coordinator aggregates them (weighted by validation size,
   :func:`tasks.horizontal.training.aggregate_metrics`), updates federated early stopping
   (:class:`tasks.horizontal.training.EarlyStopping`, as :func:`tasks.horizontal.loop.train_federated`) and
   sends *every* party the same go / stop decision before the next iteration starts (a
   LightGBM callback waits for it). At the end the parties report their per-round test
   metrics and the model, which is cut at the best round.

Why not LightGBM's own early stopping: a distributed validation set is evaluated on each
machine's own rows and the metrics are not aggregated across machines, so LightGBM's
early stopping would stop each machine on its *local* loss, at different iterations, and a
machine still training then hangs or fails in the next collective. The coordinator's
per-round decision uses the size-weighted loss over all parties (for logloss and MSE that
is exactly the pooled validation loss) and stops all machines after the same iteration.

Bins: with consortium bins (``bins``, :mod:`tasks.horizontal.bins`) every party's machine
bins each numerical feature with the boundaries merged from all parties' quantile
sketches. Without them, in distributed mode LightGBM gives each machine a block of the features; that machine
finds those features' bin boundaries (numerical quantiles, categorical values) from its own
rows and all machines then share the bin mappers, so every party bins with the same
boundaries and the summed histograms line up. They are not the boundaries a pooled model
would find, so the model matches centralised training in accuracy, not bit for bit. The
bin mappers (a sample of one party's feature quantiles and category values per feature)
are part of what the parties share, and end up in the model's ``feature_infos``.

The model text is identical at every party (checked); only the network settings and the
party-local bin params (:data:`tasks.horizontal.bins.BIN_PARAMS`) are removed
from its parameters section. This module holds the protocol: what a party process computes,
the messages it exchanges with the coordinator and what the coordinator decides each round.
Starting the processes, the pipes, ports and LightGBM's network settings are
:mod:`tasks.horizontal.lossless_network`. Nothing here writes files but a party process's
forced-bins file (through :func:`storage.runs.write_forced_bins`); the party processes are
the only side effect.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Literal

import lightgbm as lgb
import numpy as np
from pydantic import BaseModel, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from storage.store import TableRef, read_table
from tasks.horizontal.bins import BIN_PARAMS, ConsortiumBins, unforced_features
from tasks.horizontal.ensemble import GlobalEnsemble, MemberTuple, text_sha256
from tasks.horizontal.lossless_network import (
    PORT_ATTEMPTS,
    Failure,
    LightGBMLog,
    LosslessError,
    Parties,
    PartyProcesses,
    PortInUse,
    free_ports,
    local_machines,
    network_params,
    port_of,
    without_network_params,
)
from tasks.horizontal.model_text import check_task, without_params
from tasks.horizontal.rounds import StopReason, rounds_in_budget
from tasks.horizontal.score_histograms import ScoreHistogram, score_histogram
from tasks.horizontal.steps import consortium_bin_params
from tasks.horizontal.training import (
    LOSS_METRIC,
    EarlyStopping,
    LabelStats,
    LgbParams,
    PartyData,
    aggregate_metrics,
    base_score,
    evaluate,
    frame_splits,
    label_stats,
    lgb_params,
    split_party_data,
)
from tasks.prepare.design import FeatureSchema, design_matrix, labels
from tasks.spec.models import TrainingSpec
from tasks.types import Objective

logger = logging.getLogger(__name__)

#: Party name of the single member of a lossless model's one-round ensemble.
LOSSLESS_MEMBER = "lossless"
#: LightGBM's socket time-out (minutes); it also bounds the wait for any one party message.
SOCKET_TIMEOUT_MINUTES = 10


@dataclass(frozen=True)
class FusedSource:
    """A party's fused table by reference: read inside that party's own process."""

    party: str
    fused: TableRef
    schema: FeatureSchema
    validation_fraction: float
    test_fraction: float
    store: str | None = None

    def load(self) -> PartyData:
        frame = read_table(self.fused)
        split = frame_splits(
            frame,
            validation_fraction=self.validation_fraction,
            test_fraction=self.test_fraction,
        ).to_numpy()
        return split_party_data(self.party, design_matrix(frame, self.schema), labels(frame), split)


#: One party's rows in memory, or a reference its process reads.
PartySource = PartyData | FusedSource


@dataclass(frozen=True)
class PartyJob:
    """What one party process needs (pickled to it)."""

    source: PartySource
    params: LgbParams
    objective: Objective
    num_class: int
    trees_per_round: int
    feature_names: list[str]
    categorical: list[str]
    bins: ConsortiumBins | None = None
    run_key: str = LOSSLESS_MEMBER


def party_job(
    source: PartySource,
    *,
    spec: TrainingSpec,
    objective: Objective,
    num_class: int,
    categorical: Sequence[str],
    feature_names: Sequence[str],
    bins: ConsortiumBins | None = None,
    run_key: str = LOSSLESS_MEMBER,
) -> PartyJob:
    """What the process of the party ``source`` belongs to needs (params of
    :func:`tasks.horizontal.training.lgb_params`; the network settings come later)."""
    return PartyJob(
        source=source,
        params=lgb_params(spec, objective, num_class, seed=spec.seed),
        objective=objective,
        num_class=num_class,
        trees_per_round=spec.trees_per_round,
        feature_names=list(feature_names),
        categorical=list(categorical),
        bins=bins,
        run_key=run_key,
    )


# --------------------------------------------------------------------------------------
# Messages between the coordinator and the party processes
# --------------------------------------------------------------------------------------


@pydantic_dataclass(frozen=True)
class _Stats:
    """Party -> coordinator, first: the label aggregates and the validation size."""

    party: str
    stats: LabelStats
    n_valid: int
    address: str | None = None  # host:port its LightGBM listens on (a party on its own pool)


@pydantic_dataclass(frozen=True)
class _Train:
    """Coordinator -> party: the base score, the rounds to train and the party's params."""

    base: list[float]
    rounds: int
    params: LgbParams
    rank: int = 0
    machines: int = 1


@pydantic_dataclass(frozen=True)
class _RoundReport:
    """Party -> coordinator, after every round: the validation metrics of its own rows."""

    party: str
    valid: dict[str, float]
    valid_histogram: ScoreHistogram | None = None


#: Coordinator -> party, after every round: train on, or stop after this iteration.
_Decision = Literal["go", "stop"]


class PartyResult(BaseModel):
    """What a party process reports: the model and metrics of its own rows per round."""

    party: str
    model_text: str
    n_train: int
    n_valid: int
    n_test: int
    valid: list[dict[str, float]] = Field(description="Metrics after each round, round 1 first")
    test: list[dict[str, float]]
    test_histograms: list[ScoreHistogram | None] = Field(
        default_factory=list, description="Per-label score counts of the test rows per round"
    )


class LosslessResult(BaseModel):
    """The trained model (cut at the best round) and the per-round aggregated metrics."""

    model_text: str = Field(
        description="LightGBM text of the trees after F_0 up to best_round ('' if it is 0)"
    )
    base_score: list[float]
    rounds_run: int = Field(description="Rounds up to the early-stopping decision")
    best_round: int
    best_loss: float | None
    stop_reason: StopReason
    trees_per_round: int
    valid: list[dict[str, float]] = Field(description="Aggregated validation metrics per round")
    test: list[dict[str, float]] = Field(description="Aggregated test metrics per round")
    party_valid: dict[str, list[dict[str, float]]]
    n_train: dict[str, int]
    split_sizes: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="Rows per split (train, valid, test) of every party"
    )
    model_sha256: dict[str, str] = Field(
        description="Hash of each party's full trained model text (all equal, checked)"
    )
    ports: list[int]

    @property
    def best_test(self) -> dict[str, float]:
        return self.test[self.best_round - 1] if self.best_round else {}

    def ensemble(
        self,
        *,
        objective: Objective,
        num_class: int,
        feature_names: Sequence[str],
        categorical: Sequence[str],
    ) -> GlobalEnsemble:
        """The model as a one-round ensemble (F_0 plus one member of weight 1), which the
        manifest, ``export_model``, scoring and ``fedfuse export`` / ``predict`` take as is."""
        if not self.best_round:  # no round improved on the base score
            rounds: list[list[MemberTuple]] = []
            metrics: list[dict[str, float]] = []
        else:
            rounds = [[(LOSSLESS_MEMBER, 1.0, self.model_text)]]
            metrics = [self.valid[self.best_round - 1]]
        return GlobalEnsemble(
            objective=objective,
            num_class=num_class,
            base_score=self.base_score,
            feature_names=list(feature_names),
            categorical=list(categorical),
            rounds=rounds,
            metrics=metrics,
            best_round=len(rounds),
            trees_per_round=max(self.best_round * self.trees_per_round, 1),
        )


# --------------------------------------------------------------------------------------


def round_budget(spec: TrainingSpec, num_class: int) -> tuple[int, StopReason]:
    """Rounds to train: ``spec.rounds``, fewer if ``spec.max_trees`` caps the trees."""
    return rounds_in_budget(spec.rounds, spec.trees_per_round * num_class, spec.max_trees)


# --------------------------------------------------------------------------------------
# The party process
# --------------------------------------------------------------------------------------


class _RoundSync:
    """LightGBM callback: after every round, score the party's own validation and test rows,
    report the validation metrics to the coordinator and wait for its go / stop decision.

    Every party receives the same decision after the same iteration, so all machines leave
    the network together (a machine stopping alone would hang the others' next collective).
    """

    def __init__(self, job: PartyJob, data: PartyData, base: Sequence[float], conn: Connection):
        self.job, self.data, self.conn = job, data, conn
        self.raw_valid = self._start(base, len(data.y_valid))
        self.raw_test = self._start(base, len(data.y_test))
        self.valid: list[dict[str, float]] = []
        self.test: list[dict[str, float]] = []
        self.test_histograms: list[ScoreHistogram | None] = []

    def _start(self, base: Sequence[float], n: int) -> np.ndarray:
        raw = np.tile(np.asarray(base, dtype=np.float64), (n, 1))
        return raw.reshape(n) if self.job.num_class == 1 else raw

    def _add(self, booster: lgb.Booster, X: np.ndarray, raw: np.ndarray, start: int) -> np.ndarray:
        if not len(raw):
            return raw
        step = booster.predict(
            X,
            raw_score=True,
            start_iteration=start,
            num_iteration=self.job.trees_per_round,
            num_threads=1,  # OpenMP threads spinning beside the other parties cost seconds
        )
        return raw + np.asarray(step, dtype=np.float64).reshape(raw.shape)

    def __call__(self, env: lgb.callback.CallbackEnv) -> None:
        done = env.iteration + 1
        tpr = self.job.trees_per_round
        if done % tpr:
            return
        d, k, model = self.data, self.job.num_class, env.model
        if not isinstance(model, lgb.Booster):
            raise TypeError("lossless training runs lgb.train, not lgb.cv")
        self.raw_valid = self._add(model, d.X_valid, self.raw_valid, done - tpr)
        self.raw_test = self._add(model, d.X_test, self.raw_test, done - tpr)
        objective = self.job.objective
        self.valid.append(evaluate(d.y_valid, self.raw_valid, objective, k))
        self.test.append(evaluate(d.y_test, self.raw_test, objective, k))
        self.test_histograms.append(score_histogram(d.y_test, self.raw_test, objective, k))
        valid_histogram = score_histogram(d.y_valid, self.raw_valid, objective, k)
        self.conn.send(_RoundReport(d.party, self.valid[-1], valid_histogram))
        if self.conn.recv() == "stop":
            raise lgb.callback.EarlyStopException(env.iteration, [])


def _train_party(job: PartyJob, data: PartyData, message: _Train, conn: Connection) -> PartyResult:
    base, rounds = message.base, message.rounds
    params = dict(job.params)
    if job.bins is not None:
        store = job.source.store if isinstance(job.source, FusedSource) else None
        params |= consortium_bin_params(
            job.bins,
            data.X_train,
            job.feature_names,
            store=store,
            run_key=job.run_key,
            categorical=job.categorical,
            rank=message.rank,
            machines=message.machines,
        )
    init = np.tile(np.asarray(base, dtype=np.float64), (len(data.y_train), 1))
    dataset = lgb.Dataset(
        data.X_train,
        label=data.y_train,
        init_score=init.reshape(-1) if job.num_class == 1 else init,
        feature_name=job.feature_names,
        categorical_feature=job.categorical,
        free_raw_data=True,
    )
    sync = _RoundSync(job, data, base, conn)
    booster = lgb.train(
        params, dataset, num_boost_round=rounds * job.trees_per_round, callbacks=[sync]
    )
    text = without_params(
        without_network_params(str(booster.model_to_string(num_iteration=-1))), BIN_PARAMS
    )
    return PartyResult(
        party=data.party,
        model_text=text,
        n_train=len(data.y_train),
        n_valid=len(data.y_valid),
        n_test=len(data.y_test),
        valid=sync.valid,
        test=sync.test,
        test_histograms=sync.test_histograms,
    )


def _party_process(job: PartyJob, conn: Connection) -> None:
    """Entry point of a party process: stats out, (base, rounds) in, result out."""
    lgb.register_logger(LightGBMLog())
    try:
        data = job.source.load() if isinstance(job.source, FusedSource) else job.source
        stats = label_stats(data.y_train, job.objective, job.num_class)
        conn.send(_Stats(data.party, stats, len(data.y_valid)))
        message = conn.recv()
        if not isinstance(message, _Train):
            return
        job = replace(job, params=message.params)
        conn.send(_train_party(job, data, message, conn))
    except Exception as exc:  # reported to the coordinator, which raises
        conn.send(Failure(f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


@dataclass
class _Run:
    """What one attempt yields: base score, ports, per-round aggregates, party results."""

    base: list[float]
    ports: list[int]
    valid: list[dict[str, float]]
    stopper: EarlyStopping
    stopped: bool
    results: list[PartyResult]


def _run_parties(
    parties: Parties,
    jobs: Sequence[PartyJob],
    *,
    objective: Objective,
    num_class: int,
    budget: int,
    patience: int,
    timeout_minutes: int,
    join_timeout: float | None = None,
) -> _Run:
    """Exchange stats and base score with the started ``parties``, hand every party the
    machine list, run the rounds with federated early stopping; one attempt. Parties that
    report their own ``host:port`` (each on its own pool) listen there; otherwise every
    party listens on a free port of this machine. A party not heard from within
    ``join_timeout`` seconds (default: the socket time-out) fails the run with its name."""
    timeout = 60.0 * timeout_minutes
    failed = True
    try:
        stats = parties.gather("label stats", join_timeout or timeout, _Stats)
        empty = [s.party for s in stats if s.stats.n_train == 0]
        if empty:
            raise ValueError(f"parties {empty} hold no training rows; lossless mode needs rows")
        n_valid = {s.party: s.n_valid for s in stats}
        base = base_score([s.stats for s in stats], objective, num_class)
        reported = [s.address for s in stats if s.address]
        machines: list[str] = []
        if len(reported) == len(jobs):
            machines = reported
        elif len(jobs) > 1:
            machines = local_machines(free_ports(len(jobs)))
        parties.send(
            [
                _Train(
                    base,
                    budget,
                    network_params(job.params, machines, i, timeout_minutes=timeout_minutes)
                    if len(machines) > 1
                    else job.params,
                    rank=i,
                    machines=len(jobs),
                )
                for i, job in enumerate(jobs)
            ]
        )
        ports = [port_of(m) for m in machines] if len(machines) > 1 else []
        stopper = EarlyStopping(patience=patience)
        valid: list[dict[str, float]] = []
        stopped = False
        loss_name = LOSS_METRIC[objective]
        for r in range(1, budget + 1):
            reports = parties.gather(f"round {r}", timeout, _RoundReport)
            valid.append(
                aggregate_metrics(
                    {m.party: (n_valid[m.party], m.valid) for m in reports},
                    {m.party: m.valid_histogram for m in reports},
                )
            )
            stopped = stopper.update(r, valid[-1].get(loss_name, math.nan))
            decision: _Decision = "stop" if stopped else "go"
            parties.send([decision] * len(jobs))
            if stopped:
                break
        results = parties.gather("model", timeout, PartyResult)
        failed = False
    finally:
        parties.close(failed=failed)
    if stopper.best_round == 0 and not any(n_valid.values()):
        stopper.best_round = len(valid)  # nothing to validate on: keep every round
    return _Run(base, ports, valid, stopper, stopped, results)


def train_lossless(
    sources: Sequence[PartySource],
    *,
    spec: TrainingSpec,
    objective: Objective,
    num_class: int,
    categorical: Sequence[str],
    feature_names: Sequence[str],
    timeout_minutes: int = SOCKET_TIMEOUT_MINUTES,
    bins: ConsortiumBins | None = None,
    run_key: str = LOSSLESS_MEMBER,
    connect: Callable[[Sequence[PartyJob]], Parties] | None = None,
    join_timeout: float | None = None,
) -> LosslessResult:
    """One LightGBM model over every party's rows, trained data-parallel (see the module doc).

    ``sources`` holds one entry per party: its rows (:class:`tasks.horizontal.training.PartyData`) or
    a :class:`FusedSource` its process reads. Same splits, params, base score, tree budget
    and early stopping as :func:`tasks.horizontal.baselines.train_centralised`; the spec's ``seed``
    seeds LightGBM. ``timeout_minutes`` is LightGBM's socket time-out and bounds the wait
    for any one party message. With ``bins`` every party bins with the consortium's
    boundaries (its forced-bins file named after ``run_key``, in its store when the source
    names one).

    ``connect`` reaches parties that run elsewhere (each on its own pool,
    :mod:`tasks.horizontal.lossless_remote`); by default every party runs in a process beside
    this one. ``join_timeout`` bounds the wait for every party's first message (its join).
    """
    check_task(objective, num_class)
    if not sources:
        raise ValueError("no parties")
    names = [s.party for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"party names repeat: {names}")
    budget, reason = round_budget(spec, num_class)
    if budget < 1:
        raise ValueError(f"max_trees={spec.max_trees} leaves no room for one round")
    jobs = [
        party_job(
            s,
            spec=spec,
            objective=objective,
            num_class=num_class,
            categorical=categorical,
            feature_names=feature_names,
            bins=bins,
            run_key=run_key,
        )
        for s in sources
    ]
    if bins is not None and len(sources) > 1:
        unforced = unforced_features(feature_names, categorical, len(sources))
        if unforced:
            logger.warning(
                "lossless: %d numerical feature(s) keep the bins of the party that bins them "
                "(LightGBM's data-parallel loader reads their forced bounds at a categorical "
                "feature's place): %s",
                len(unforced),
                unforced,
            )
    attempts = PORT_ATTEMPTS if connect is None else 1  # remote parties choose their ports
    for attempt in range(1, attempts + 1):
        parties = (
            PartyProcesses(_party_process, jobs, [f"party {n}" for n in names])
            if connect is None
            else connect(jobs)
        )
        try:
            run = _run_parties(
                parties,
                jobs,
                objective=objective,
                num_class=num_class,
                budget=budget,
                patience=spec.patience,
                timeout_minutes=timeout_minutes,
                join_timeout=join_timeout,
            )
            break
        except PortInUse as exc:
            if attempt == attempts:
                raise
            logger.warning("attempt %d: %s; retrying with fresh ports", attempt, exc)
    texts = {r.model_text for r in run.results}
    if len(texts) != 1:
        raise LosslessError(f"the parties hold {len(texts)} different models")
    rounds_run = len(run.valid)
    if any(len(r.test) != rounds_run for r in run.results):
        raise LosslessError("the parties ran different numbers of rounds")
    test = [
        aggregate_metrics(
            {r.party: (r.n_test, r.test[t]) for r in run.results},
            {r.party: r.test_histograms[t] for r in run.results},
        )
        for t in range(rounds_run)
    ]
    best = run.stopper.best_round
    model_text = ""
    if best:
        booster = lgb.Booster(model_str=run.results[0].model_text)
        model_text = without_network_params(
            str(booster.model_to_string(num_iteration=best * spec.trees_per_round))
        )
    logger.info(
        "lossless: %d parties, %d of %d rounds run, best round %d",
        len(sources),
        rounds_run,
        budget,
        best,
    )
    return LosslessResult(
        model_text=model_text,
        base_score=run.base,
        rounds_run=rounds_run,
        best_round=best,
        best_loss=run.stopper.best_loss,
        stop_reason="early_stopping" if run.stopped else reason,
        trees_per_round=spec.trees_per_round,
        valid=run.valid,
        test=test,
        party_valid={r.party: r.valid for r in run.results},
        n_train={r.party: r.n_train for r in run.results},
        split_sizes={
            r.party: {"train": r.n_train, "valid": r.n_valid, "test": r.n_test} for r in run.results
        },
        model_sha256={r.party: text_sha256(r.model_text) for r in run.results},
        ports=run.ports,
    )
