"""Consortium bins: party sketches merged into boundaries that every party's LightGBM uses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightgbm as lgb
import numpy as np
import polars as pl
import pytest

from storage.runs import bins_name, read_bins
from storage.store import FileRef, read_manifest
from tasks.horizontal.bins import (
    RESERVED_BINS,
    ZERO_THRESHOLD,
    BinsError,
    ConsortiumBins,
    consortium_bins,
    feature_block,
    forced_bins,
    merge_sketches,
    rank_error,
    sketch_features,
    unforced_features,
)
from tasks.horizontal.steps import consortium_bin_params
from tasks.horizontal.training import fit_round, lgb_params
from tasks.manifest import EnsembleManifest
from tasks.spec.models import TrainingSpec
from tests.factories import write_synthetic
from tests.prefect_api import task_states

NAMES = ["x", "y", "code"]
CATEGORICAL = ["code"]


def _party(rng: np.random.Generator, n: int, shift: float) -> np.ndarray:
    """Skewed parties: each holds another part of x's range; y is mixed-sign with gaps."""
    x = rng.lognormal(mean=shift, sigma=0.7, size=n)
    y = rng.normal(loc=-shift, size=n)
    y[rng.random(n) < 0.1] = np.nan
    return np.column_stack([x, y, rng.integers(0, 4, size=n)]).astype(np.float64)


def _thresholds(model_text: str) -> dict[int, set[float]]:
    """Every numerical split threshold of a model, by feature index."""
    out: dict[int, set[float]] = {}

    def walk(node: dict[str, object]) -> None:
        if "split_index" not in node:
            return
        if node["decision_type"] == "<=":
            out.setdefault(int(str(node["split_feature"])), set()).add(
                float(str(node["threshold"]))
            )
        walk(node["left_child"])  # type: ignore[arg-type]
        walk(node["right_child"])  # type: ignore[arg-type]

    for tree in lgb.Booster(model_str=model_text).dump_model()["tree_info"]:
        walk(tree["tree_structure"])
    return out


def _on_bounds(
    model_text: str, bins: ConsortiumBins, names: list[str], skip: frozenset[str] = frozenset()
) -> None:
    """Every numerical threshold is a consortium boundary (or LightGBM's zero bin)."""
    found = _thresholds(model_text)
    assert found
    for j, values in found.items():
        if names[j] in skip:
            continue
        allowed = set(bins.bounds[names[j]])
        off = [v for v in values if v not in allowed and abs(v) > 1e3 * ZERO_THRESHOLD]
        assert off == [], f"feature {names[j]}: thresholds off the consortium boundaries"


def test_merged_sketches_match_pooled_quantiles_within_the_stated_error() -> None:
    rng = np.random.default_rng(0)
    parts = [_party(rng, n, shift) for n, shift in [(4000, 0.0), (1500, 2.0), (300, 4.0)]]
    sketches = [
        sketch_features(f"p{i}", X, NAMES, CATEGORICAL, min_rows=200) for i, X in enumerate(parts)
    ]
    assert all(set(s.sketches) == {"x", "y"} for s in sketches)  # categories not sketched
    assert sketches[0].missing["y"] == int(np.isnan(parts[0][:, 1]).sum())
    pooled = np.vstack(parts)
    eps = rank_error()
    assert 0.013 < eps < 0.014  # k = 200, as the docs say
    merged = merge_sketches(sketches, NAMES, CATEGORICAL)
    ranks = np.linspace(0.01, 0.99, 99)
    for j, name in enumerate(["x", "y"]):
        column = pooled[:, j][np.isfinite(pooled[:, j])]
        q = np.asarray(merged[name].get_quantiles(ranks.tolist()))
        true_rank = np.searchsorted(np.sort(column), q, side="right") / len(column)
        assert np.max(np.abs(true_rank - ranks)) <= eps
    bins = consortium_bins(sketches, NAMES, CATEGORICAL, max_bin=64)
    assert set(bins.bounds) == {"x", "y"} and bins.parties == ["p0", "p1", "p2"]
    for j, name in enumerate(["x", "y"]):
        bounds = np.asarray(bins.bounds[name])
        assert len(bounds) <= 64 - RESERVED_BINS and np.all(np.diff(bounds) > 0)
        column = pooled[:, j][np.isfinite(pooled[:, j])]
        shares = np.bincount(np.searchsorted(bounds, column, side="left")) / len(column)
        # equal-frequency bins of the pooled rows, up to the sketch's error at both ends
        assert shares.max() <= 1 / len(bounds) + 2 * eps


def test_few_rows_are_refused_and_bad_sketches_named() -> None:
    rng = np.random.default_rng(1)
    big, small = _party(rng, 1000, 0.0), _party(rng, 12, 3.0)
    refused = sketch_features("tiny", small, NAMES, CATEGORICAL, min_rows=200)
    assert refused.sketches == {} and refused.refused is not None
    assert "12 training row(s)" in refused.refused
    ok = sketch_features("big", big, NAMES, CATEGORICAL, min_rows=200)
    bins = consortium_bins([ok, refused], NAMES, CATEGORICAL, max_bin=32)
    assert bins.parties == ["big"] and set(bins.refused) == {"tiny"}
    assert max(bins.bounds["x"]) < float(np.nanmax(small[:, 0]))  # its values are not in
    # garbage, binary, a sketch of another feature or of more values than rows: one line
    bad = [
        ok.model_copy(update={"party": "evil", "sketches": {**ok.sketches, "x": "%%%"}}),
        ok.model_copy(update={"party": "evil", "sketches": {**ok.sketches, "x": "AAAA"}}),
        ok.model_copy(update={"party": "evil", "sketches": {"x": ok.sketches["x"]}}),
        ok.model_copy(update={"party": "evil", "sketches": {**ok.sketches, "../z": "AAAA"}}),
        ok.model_copy(update={"party": "evil", "n_rows": 3}),
    ]
    for part in bad:
        with pytest.raises(BinsError, match=r"^party evil") as info:
            consortium_bins([ok, part], NAMES, CATEGORICAL, max_bin=32)
        assert "\n" not in str(info.value)
    # a constant or empty feature gets no boundary: LightGBM bins it as usual
    flat = np.column_stack([np.zeros(300), np.full(300, np.nan), np.zeros(300)])
    part = sketch_features("flat", flat, NAMES, CATEGORICAL, min_rows=200)
    assert consortium_bins([part], NAMES, CATEGORICAL, max_bin=32).bounds == {"x": [], "y": []}


def test_a_party_trains_on_the_forced_boundaries(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    parts = [_party(rng, 2000, 0.0), _party(rng, 800, 3.0)]
    sketches = [
        sketch_features(f"p{i}", X, NAMES, CATEGORICAL, min_rows=200) for i, X in enumerate(parts)
    ]
    bins = consortium_bins(sketches, NAMES, CATEGORICAL, max_bin=63)
    X = parts[1]  # a party far from the pooled distribution: its own bins would differ
    y = (np.nan_to_num(X[:, 0]) + rng.normal(size=len(X)) > 20).astype(float)
    extra = consortium_bin_params(bins, X, NAMES, store=str(tmp_path / "p1"), run_key="r1")
    forced = tmp_path / "p1" / "models" / "forcedbins-r1.json"
    assert extra["forcedbins_filename"] == str(forced)
    assert {e["feature"] for e in json.loads(forced.read_text())} == {0, 1}
    spec = TrainingSpec(params={"max_bin": 63}, num_leaves=15, min_data_in_leaf=5)
    params = {**lgb_params(spec, "binary", 1, seed=0), **extra}
    data = lgb.Dataset(X, label=y, feature_name=NAMES, categorical_feature=CATEGORICAL)
    booster = lgb.train(params, data, num_boost_round=20)
    _on_bounds(str(booster.model_to_string()), bins, NAMES)
    # the update a party sends: same boundaries, and no path of the party's machine in it
    text, _ = fit_round(
        X,
        y,
        np.zeros(len(y)),
        training=spec,
        objective="binary",
        num_class=1,
        party="p1",
        round_=1,
        learning_rate=0.1,
        categorical=CATEGORICAL,
        feature_names=NAMES,
        bin_params=extra,
    )
    _on_bounds(text, bins, NAMES)
    assert str(tmp_path) not in text and "forcedbins" not in text
    # without the forced file the same party finds boundaries of its own
    own = lgb.train(lgb_params(spec, "binary", 1, seed=0), lgb.Dataset(X, label=y), 20)
    assert any(
        v not in set(bins.bounds[NAMES[j]]) and abs(v) > 1e-30
        for j, values in _thresholds(str(own.model_to_string())).items()
        for v in values
    )


def test_lossless_blocks_follow_lightgbm() -> None:
    """The forced-bins file of a lossless party lays out its block as LightGBM reads it."""
    assert [list(feature_block(7, 3, r)) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(feature_block(2, 3, 2)) == []
    names = [f"f{i}" for i in range(7)]
    # rank 1 reads f3..f5 at indices 0..2: f4 lands on the categorical f1
    assert unforced_features(names, ["f1", "f5"], 3) == ["f4"]
    bounds = {n: [1.0, 2.0] for n in names if n not in ("f1", "f5")}
    bins = ConsortiumBins(max_bin=16, rank_error=0.01, bounds=bounds, parties=["a"])
    X = np.ones((5, 7))
    text, per = forced_bins(bins, X, names, categorical=["f1", "f5"], rank=1, machines=3)
    assert json.loads(text) == [{"feature": 0, "bin_upper_bound": [1.0, 2.0]}]  # f3 only
    assert per == [16, 16, 16, 4, 16, 16, 16]
    text, per = forced_bins(bins, X, names)
    assert [e["feature"] for e in json.loads(text)] == [0, 2, 3, 4, 6]


def _flow_spec(root: Path, mode: str) -> Path:
    spec = write_synthetic(root, customers=560)
    text = re.sub(r"^rounds = .*$", f'rounds = 2\nmode = "{mode}"', spec.read_text(), flags=re.M)
    spec.write_text(text + 'bins = "consortium"\nmin_sketch_rows = 100\n')
    return spec


def _stored_bins(root: Path) -> ConsortiumBins:
    (path,) = (root / "stores" / "coordinator" / "models").glob("bins-*.json")
    body = path.read_bytes()
    import hashlib

    ref = FileRef(uri=str(path), sha256=hashlib.sha256(body).hexdigest(), size=len(body))
    return read_bins(ref, ConsortiumBins)


@pytest.mark.prefect
@pytest.mark.parametrize("mode", ["lossless", "averaging"])
def test_training_flow_uses_the_consortium_bins(
    prefect_api: str, tmp_path: Path, secret: str, mode: str
) -> None:
    from flows.horizontal import federated_training

    spec = _flow_spec(tmp_path, mode)
    state = federated_training(str(spec), return_state=True)
    assert state.is_completed()
    result = state.result()
    bins = _stored_bins(tmp_path)
    assert bins.parties == ["p0", "p1"] and bins.bounds and bins.version == 1
    assert (tmp_path / "stores" / "coordinator" / "models" / bins_name(result.run_key)).exists()
    for party in ("p0", "p1"):
        assert (
            tmp_path / "stores" / party / "models" / f"forcedbins-{result.run_key}.json"
        ).exists()
    body, texts = read_manifest(result.manifest)
    ensemble = EnsembleManifest.model_validate(body).ensemble(texts)
    numerical = [n for n in ensemble.feature_names if n not in ensemble.categorical]
    assert set(bins.bounds) == set(numerical)
    skip = frozenset(
        unforced_features(ensemble.feature_names, ensemble.categorical, 2)
        if mode == "lossless"
        else []
    )
    assert len(skip) < len(numerical) / 2
    for round_ in ensemble.rounds:
        for _, _, text in round_:
            _on_bounds(text, bins, ensemble.feature_names, skip)
            assert "forcedbins" not in text and str(tmp_path) not in text
    if mode == "averaging":  # the same steps in both modes; lossless processes are slow
        # the sketches come back from the cache in a later run of the same spec (and so in
        # a retry): none is redone
        again = federated_training(str(spec), return_state=True)
        sketched = task_states(again.state_details.flow_run_id)["sketch-features"]
        assert sketched == ["Cached", "Cached"]
        assert _stored_bins(tmp_path) == bins
    # a coordinator file holds boundaries and party names, never a sketch or a row
    assert not list((tmp_path / "stores" / "coordinator").rglob("*.parquet"))
    assert not pl.read_parquet(
        next((tmp_path / "stores" / "p0" / "fused").glob("*.parquet"))
    ).is_empty()
