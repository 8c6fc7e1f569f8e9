"""Lossless mode: LightGBM data-parallel training over the parties, one process per party."""

from __future__ import annotations

import hashlib
import re
import socket
from pathlib import Path

import lightgbm as lgb
import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from storage.files import read_text
from storage.store import read_manifest
from tasks.horizontal.baselines import train_centralised
from tasks.horizontal.ensemble import export_model, predict_raw
from tasks.horizontal.loop import train_federated
from tasks.horizontal.lossless import round_budget, train_lossless
from tasks.horizontal.lossless_network import (
    NETWORK_PARAMS,
    free_ports,
    local_machines,
    network_params,
    without_network_params,
)
from tasks.horizontal.training import lgb_params, party_data
from tasks.manifest import EnsembleManifest
from tasks.prepare.design import FeatureSchema, design_matrix
from tasks.spec.models import TrainingSpec
from tasks.types import ENTITY_HASH, LABEL
from tests.factories import write_synthetic

NAMES = [f"x{i}" for i in range(6)] + ["kind"]


def _skewed_parties(n: int = 6000, seed: int = 3) -> dict[str, pl.DataFrame]:
    """Three parties with strong label skew: most positives at p0, most negatives at p2.

    Features are on a grid of 17 values that every party holds (each more than
    ``min_data_in_bin`` times): LightGBM's distributed binning (each party bins some features
    from its own rows) then finds the bin boundaries a pooled model finds.
    """
    rng = np.random.default_rng(seed)
    X = np.round(np.clip(rng.normal(size=(n, 6)), -2, 2) * 4) / 4
    kind = rng.integers(0, 5, size=n).astype(np.float64)
    logit = 1.5 * X[:, 0] - X[:, 1] + 0.8 * X[:, 2] * X[:, 3] + 0.6 * (kind == 2) - 1.0
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    share = np.where((y == 1)[:, None], [[0.8, 0.15, 0.05]], [[0.1, 0.3, 0.6]])
    party = (rng.random(n)[:, None] > share.cumsum(axis=1)).sum(axis=1)
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    frame = pl.DataFrame(
        {ENTITY_HASH: hashes, LABEL: y, **{f"x{i}": X[:, i] for i in range(6)}, "kind": kind}
    )
    return {f"p{k}": frame.filter(pl.Series(party == k)) for k in range(3)}


SPEC = TrainingSpec(rounds=12, trees_per_round=4, num_leaves=15, patience=3)


def test_lossless_matches_centralised_under_label_skew() -> None:
    frames = _skewed_parties(n=20000)
    rates = [float(f[LABEL].mean()) for f in frames.values()]  # type: ignore[arg-type]
    assert max(rates) > 0.6 and min(rates) < 0.1  # strong label skew
    kwargs = {
        "spec": SPEC,
        "objective": "binary",
        "num_class": 1,
        "categorical": ["kind"],
        "feature_names": NAMES,
    }
    splits = [
        party_data(f, party=p, feature_names=NAMES, validation_fraction=0.2, test_fraction=0.2)
        for p, f in frames.items()
    ]
    X_test = np.concatenate([d.X_test for d in splits])
    y_test = np.concatenate([d.y_test for d in splits])

    result = train_lossless(splits, **kwargs)  # type: ignore[arg-type]
    assert len(result.ports) == 3 and len(set(result.ports)) == 3
    # every party ends up holding the very same model
    assert set(result.model_sha256) == {"p0", "p1", "p2"}
    assert len(set(result.model_sha256.values())) == 1
    assert 1 <= result.best_round <= result.rounds_run <= SPEC.rounds
    assert len(result.valid) == len(result.test) == result.rounds_run
    assert sum(result.n_train.values()) == sum(len(d.y_train) for d in splits)
    ensemble = result.ensemble(
        objective="binary", num_class=1, feature_names=NAMES, categorical=["kind"]
    )
    lossless_auc = roc_auc_score(y_test, predict_raw(ensemble, X_test))

    cen, cen_hist = train_centralised(frames, **kwargs)  # type: ignore[arg-type]
    cen_auc = roc_auc_score(y_test, predict_raw(cen, X_test))
    assert abs(lossless_auc - cen_auc) <= 0.002
    # the same base score (pooled log-odds) and the same stopping rule on the pooled loss
    assert result.base_score == pytest.approx(cen.base_score)
    assert result.best_round == pytest.approx(cen_hist.best_round, abs=1)

    fed, _ = train_federated(frames, **kwargs)  # type: ignore[arg-type]
    fed_auc = roc_auc_score(y_test, predict_raw(fed, X_test))
    assert lossless_auc > fed_auc  # averaging loses accuracy under this skew

    # the exported native model reproduces the ensemble
    exported = lgb.Booster(model_str=export_model(ensemble))
    np.testing.assert_allclose(
        exported.predict(X_test, raw_score=True), predict_raw(ensemble, X_test), atol=1e-9
    )
    assert "127.0.0.1" not in result.model_text


def test_first_trees_equal_pooled_lightgbm() -> None:
    """Same bins, same init score, same params: the data-parallel trees are the pooled ones
    (LightGBM approximates the leaf *counts* in data-parallel mode, so those may differ)."""
    frames = _skewed_parties(n=3000)
    spec = SPEC.model_copy(update={"rounds": 1, "trees_per_round": 3})
    splits = [
        party_data(f, party=p, feature_names=NAMES, validation_fraction=0.2, test_fraction=0.2)
        for p, f in frames.items()
    ]
    result = train_lossless(
        splits, spec=spec, objective="binary", num_class=1, categorical=[], feature_names=NAMES
    )
    X = np.concatenate([d.X_train for d in splits])
    y = np.concatenate([d.y_train for d in splits])
    pooled = lgb.train(
        lgb_params(spec, "binary", 1, seed=spec.seed),
        lgb.Dataset(X, label=y, init_score=np.full(len(y), result.base_score[0])),
        num_boost_round=3,
    )

    def fields(text: str, key: str) -> list[str]:
        return re.findall(rf"^{key}=(.*)$", text, flags=re.M)

    ours, theirs = result.model_text, str(pooled.model_to_string())
    for key in ("split_feature", "threshold", "decision_type", "left_child", "right_child"):
        assert fields(ours, key) == fields(theirs, key)
    for a, b in zip(fields(ours, "leaf_value"), fields(theirs, "leaf_value"), strict=True):
        np.testing.assert_allclose(np.fromstring(a, sep=" "), np.fromstring(b, sep=" "), rtol=1e-9)


def test_network_params_and_model_text_cleanup() -> None:
    params = {"objective": "binary", "num_threads": 4}
    out = network_params(params, local_machines([4001, 4002, 4003]), 1, timeout_minutes=3)
    assert out["machines"] == "127.0.0.1:4001,127.0.0.1:4002,127.0.0.1:4003"
    assert out["local_listen_port"] == 4002 and out["num_machines"] == 3
    assert out["tree_learner"] == "data" and out["pre_partition"] is True
    assert out["num_threads"] == 1 and out["time_out"] == 3
    assert params == {"objective": "binary", "num_threads": 4}  # not modified
    text = (
        "tree\nTree=0\nend of trees\n\nparameters:\n[boosting: gbdt]\n"
        "[machines: 127.0.0.1:4001,127.0.0.1:4002]\n[local_listen_port: 4002]\n"
        "[num_machines: 2]\n[tree_learner: data]\nend of parameters\n"
    )
    cleaned = without_network_params(text)
    assert "[boosting: gbdt]" in cleaned and "[tree_learner: data]" in cleaned
    assert not any(f"[{k}:" in cleaned for k in NETWORK_PARAMS)


def test_round_budget_and_free_ports() -> None:
    assert round_budget(SPEC, 1) == (12, "rounds")
    capped = SPEC.model_copy(update={"max_trees": 30})
    assert round_budget(capped, 1) == (7, "max_trees")
    assert round_budget(capped, 3) == (2, "max_trees")
    ports = free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:  # released: LightGBM can bind them
        with socket.socket() as sock:
            sock.bind(("", port))


def test_failing_party_stops_every_process() -> None:
    frames = _skewed_parties(n=600)
    splits = [
        party_data(f, party=p, feature_names=NAMES, validation_fraction=0.2, test_fraction=0.2)
        for p, f in frames.items()
    ]
    bad = splits[1].__class__(**{**splits[1].__dict__, "y_train": splits[1].y_train + 5})
    with pytest.raises(Exception, match="party p1: ValueError: binary labels"):
        train_lossless(
            [splits[0], bad, splits[2]],
            spec=SPEC,
            objective="binary",
            num_class=1,
            categorical=["kind"],
            feature_names=NAMES,
        )


@pytest.mark.prefect
def test_lossless_flow_exports_and_scores(prefect_api: str, tmp_path: Path, secret: str) -> None:
    from flows.horizontal import federated_training
    from flows.prepare import prepare
    from flows.score import score

    spec = write_synthetic(tmp_path, customers=700)
    text = spec.read_text()
    assert "[training]" in text
    spec.write_text(re.sub(r"^rounds = .*$", 'rounds = 6\nmode = "lossless"', text, flags=re.M))
    result = federated_training(str(spec))
    assert 1 <= result.best_round <= result.rounds_run <= 6
    assert result.test[result.best_round - 1]["auc"] > 0.65
    body, texts = read_manifest(result.manifest)
    ensemble = EnsembleManifest.model_validate(body).ensemble(texts)
    assert [[m[0] for m in r] for r in ensemble.rounds] == [["lossless"]]
    assert read_text(result.model) == export_model(ensemble)  # what `fedfuse export` writes
    exported = lgb.Booster(model_str=read_text(result.model))
    schema = FeatureSchema(
        names=ensemble.feature_names, categorical=ensemble.categorical, modality={}, parties={}
    )
    outputs = prepare(str(spec))
    for out in outputs.values():
        x = design_matrix(pl.read_parquet(out.table.uri), schema)
        np.testing.assert_allclose(
            exported.predict(x, raw_score=True), predict_raw(ensemble, x), rtol=0, atol=1e-9
        )
    # scoring new data at a party uses the same model
    ref = score(str(spec), "p0", data=str(tmp_path / "raw" / "p0"))
    predictions = pl.read_parquet(ref.uri)
    fused = pl.read_parquet(outputs["p0"].table.uri)
    expected = exported.predict(design_matrix(fused, schema), raw_score=True)
    joined = fused.select(ENTITY_HASH).with_columns(pl.Series("expected", expected))
    joined = joined.join(predictions, on=ENTITY_HASH)
    assert joined.height == fused.height
    np.testing.assert_allclose(joined["raw_score"], joined["expected"], atol=1e-9)
    # no rows and no network addresses reach the coordinator
    coordinator = tmp_path / "stores" / "coordinator"
    assert not list(coordinator.rglob("*.parquet"))
    for path in coordinator.rglob("*.txt"):
        assert "127.0.0.1" not in path.read_text()


def test_party_that_never_joins_fails_the_run_and_stops_the_others(tmp_path: Path) -> None:
    """Parties on their own pools join through the coordinator store's mailbox: p0 and p1
    join (each its LightGBM process beside its step, here threads), p2 never does. The run
    fails naming p2 and the steps of p0 and p1 end, their processes too."""
    import multiprocessing as mp
    import threading

    from tasks.horizontal.lossless import party_job
    from tasks.horizontal.lossless_network import LosslessError
    from tasks.horizontal.lossless_remote import Mailbox, RemoteParties, serve_party

    frames = _skewed_parties(n=600)
    splits = [
        party_data(f, party=p, feature_names=NAMES, validation_fraction=0.2, test_fraction=0.2)
        for p, f in frames.items()
    ]
    options = {"objective": "binary", "num_class": 1, "categorical": [], "feature_names": NAMES}
    coordinator, session = str(tmp_path / "coordinator"), "s1"
    errors: dict[str, str] = {}

    def party(data: object) -> None:
        job = party_job(data, spec=SPEC, **options)  # type: ignore[arg-type]
        box = Mailbox(coordinator, session, job.source.party)
        try:
            serve_party(job, box, address="127.0.0.1:0", timeout=60)
        except LosslessError as exc:
            errors[box.party] = str(exc)

    threads = [threading.Thread(target=party, args=(d,)) for d in splits[:2]]
    for t in threads:
        t.start()
    joins = [
        tmp_path / "coordinator" / "exchange" / f"lossless-s1-{p}-from-00000.json"
        for p in ("p0", "p1")
    ]
    for _ in range(600):  # p0 and p1 join first (starting a process takes seconds)
        if all(j.exists() for j in joins):
            break
        threading.Event().wait(0.1)
    remote = RemoteParties(coordinator, session, ["p0", "p1", "p2"])
    with pytest.raises(LosslessError, match=r"^party p2 did not join within 1 s$"):
        train_lossless(splits, spec=SPEC, **options, connect=lambda _: remote, join_timeout=1)  # type: ignore[arg-type]
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    assert errors == {p: f"party {p}: the coordinator stopped the run" for p in ("p0", "p1")}
    assert not mp.active_children()  # no LightGBM process left behind
    # the mailbox holds the joins and the stop messages; no rows
    names = sorted(p.name for p in (tmp_path / "coordinator" / "exchange").iterdir())
    assert names == [
        f"lossless-s1-{p}-{d}-00000.json" for p in ("p0", "p1") for d in ("from", "to")
    ] + ["lossless-s1-p2-to-00000.json"]  # a late p2 is told to stop as well
