"""Baselines for the training report: local-only models and a centralised model.

:func:`train_local_only` trains every party alone, :func:`train_centralised` one model on the
pooled rows, both with the in-memory loop (:func:`tasks.horizontal.loop.train_federated`);
:func:`compare` scores them beside the federated model. The centralised model pools every
party's fused rows in one place, which a federation forbids: it is computed for comparison
only, by whoever runs the evaluation with access to all stores (the embedded demo), and is
labelled as such everywhere it appears.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl
from prefect import task

from storage.store import TableRef, read_table
from tasks.caching import content_cache_key
from tasks.horizontal.ensemble import GlobalEnsemble, predict_raw
from tasks.horizontal.loop import TrainingHistory, train_federated
from tasks.horizontal.score_histograms import ScoreHistogram, score_histogram
from tasks.horizontal.training import aggregate_metrics, evaluate, frame_splits, party_data
from tasks.prepare.design import FeatureSchema
from tasks.report import Comparison
from tasks.spec.models import TrainingSpec
from tasks.types import ENTITY_HASH, LABEL, SPLIT, Objective


def train_centralised(
    party_frames: Mapping[str, pl.DataFrame],
    *,
    spec: TrainingSpec,
    objective: Objective,
    num_class: int,
    categorical: Sequence[str],
    feature_names: Sequence[str],
) -> tuple[GlobalEnsemble, TrainingHistory]:
    """COMPARISON BASELINE ONLY: pools every party's raw rows, which federation forbids.

    The same loop with a single party "pooled": same base score, splits, params, early
    stopping and tree budget (rounds × trees_per_round). Boosting ``trees_per_round`` trees
    from the running scores, round after round, is exactly continued LightGBM training.
    Every row keeps the split its party gives it (:func:`frame_splits`), so the pooled test
    rows are the parties' test rows.
    """
    splits = {
        "validation_fraction": spec.validation_fraction,
        "test_fraction": spec.test_fraction,
    }
    pooled = pl.concat(
        [
            f.select(ENTITY_HASH, LABEL, *feature_names).with_columns(
                frame_splits(f, **splits).alias(SPLIT)
            )
            for f in party_frames.values()
        ],
        how="vertical",
    )
    single = spec.model_copy(update={"min_parties": 1, "aggregation": "samples"})
    return train_federated(
        {"pooled": pooled},
        spec=single,
        objective=objective,
        num_class=num_class,
        categorical=categorical,
        feature_names=feature_names,
    )


def train_local_only(
    party_frames: Mapping[str, pl.DataFrame],
    *,
    spec: TrainingSpec,
    objective: Objective,
    num_class: int,
    categorical: Sequence[str],
    feature_names: Sequence[str],
) -> dict[str, tuple[GlobalEnsemble, TrainingHistory]]:
    """Baseline: every party trains alone on its own rows (own base score and validation).
    A party that cannot train (one class only) keeps its prior: zero rounds."""
    single = spec.model_copy(update={"min_parties": 1, "aggregation": "samples", "order": None})
    out: dict[str, tuple[GlobalEnsemble, TrainingHistory]] = {}
    for party, frame in party_frames.items():
        out[party] = train_federated(
            {party: frame},
            spec=single,
            objective=objective,
            num_class=num_class,
            categorical=categorical,
            feature_names=feature_names,
            idle_ok=True,
        )
    return out


def _frames(fused: Mapping[str, TableRef], schema: FeatureSchema) -> dict[str, pl.DataFrame]:
    out: dict[str, pl.DataFrame] = {}
    for party, ref in fused.items():
        frame = read_table(ref)
        missing = [
            pl.lit(None, pl.Float64).alias(n) for n in schema.names if n not in frame.columns
        ]
        out[party] = frame.with_columns(missing) if missing else frame
    return out


def compare(
    fused: Mapping[str, TableRef],
    *,
    schema: FeatureSchema,
    training: TrainingSpec,
    objective: Objective,
    num_class: int,
    federated: dict[str, float],
    ensemble: GlobalEnsemble | None = None,
    upto_round: int | None = None,
) -> Comparison:
    """Local-only and centralised baselines, scored like the federation scores its own
    model (per party, size-weighted); with ``ensemble`` also the federated model on each
    party's own test rows, beside that party's local-only model."""
    frames = _frames(fused, schema)
    local = train_local_only(
        frames,
        spec=training,
        objective=objective,
        num_class=num_class,
        categorical=schema.categorical,
        feature_names=schema.names,
    )
    central, _ = train_centralised(
        frames,
        spec=training,
        objective=objective,
        num_class=num_class,
        categorical=schema.categorical,
        feature_names=schema.names,
    )
    tests = {
        p: party_data(
            f,
            party=p,
            feature_names=schema.names,
            validation_fraction=training.validation_fraction,
            test_fraction=training.test_fraction,
        )
        for p, f in frames.items()
    }
    sizes = {p: len(d.y_test) for p, d in tests.items()}
    local_raw = {p: predict_raw(local[p][0], d.X_test) for p, d in tests.items()}
    central_raw = {p: predict_raw(central, d.X_test) for p, d in tests.items()}
    local_test = {
        p: evaluate(d.y_test, local_raw[p], objective, num_class) for p, d in tests.items()
    }
    # every model is scored the way the federation scores its own: per party, size-weighted,
    # and over the pooled test rows through the same score histograms
    central_test = {
        p: (sizes[p], evaluate(d.y_test, central_raw[p], objective, num_class))
        for p, d in tests.items()
    }

    def histograms(raw: Mapping[str, np.ndarray]) -> dict[str, ScoreHistogram | None]:
        return {
            p: score_histogram(d.y_test, raw[p], objective, num_class) for p, d in tests.items()
        }

    by_party = (
        {
            p: evaluate(
                d.y_test,
                predict_raw(ensemble, d.X_test, upto_round=upto_round),
                objective,
                num_class,
            )
            for p, d in tests.items()
        }
        if ensemble is not None
        else {}
    )
    return Comparison(
        federated=federated,
        federated_by_party=by_party,
        local_only=local_test,
        local_only_mean=aggregate_metrics(
            {p: (sizes[p], m) for p, m in local_test.items()}, histograms(local_raw)
        ),
        centralised=aggregate_metrics(central_test, histograms(central_raw)),
    )


compare_baselines = task(
    name="compare-baselines", cache_key_fn=content_cache_key, persist_result=True
)(compare)
