"""Benchmark: vertical federated training on the demo consortium's vertical layout.

    python -m benchmarks.bench_vertical [--customers 100000] [--seed 0] [--psi-workers 2]
        [--quick]

Generates the vertical demo consortium (``tasks.demo_data.write_demo_consortium``,
``layout="vertical"``: party A holds customers + transactions and the churn label, party B
customer feedback texts, party C IoT events) and prepares every party with the pure pipeline
steps of ``tasks.prepare.steps`` (preprocess -> features -> align -> fuse, no Prefect), giving each
party a fused table keyed by the hashed entity key (``entity_hash``). Consortium and fused
tables are cached under ``benchmarks/.data/`` keyed by the parameters.

Then, all in this process:

1. Private set intersection (``tasks.vertical.psi_protocol``: ``blind_own`` / ``reblind`` /
   ``intersect`` / ``receive_alignment``, the star protocol around the label party, X25519
   over a process pool of ``--psi-workers``) on the parties' hashed keys; timed, and checked
   against the plain join of the hashed keys (same overlap, same entity behind every
   alignment id).
2. Aligned blocks: every party's fused rows of the all-party overlap, ordered by alignment
   id, split train / valid / test from the alignment id (``split_assignments``, the demo
   spec's fractions).
3. Models, all with the demo spec's tree shape and learning rate, early-stopped on the
   validation logloss and scored on the same test entities (test AUC, logloss, trees, wall):

   * ``X alone``: one-shot LightGBM on party X's block with the overlap's labels; ``A alone,
     all its customers``: A's model on every customer it holds (the overlap's valid / test
     entities excluded from training), what A has without any federation;
   * ``vertical rounds``: ``train_vertical_rounds`` (gradient rounds, default combine);
   * ``one-shot fixed``: the three one-shot models, weighted mean of raw scores
     (A 0.4, B 0.3, C 0.3); ``one-shot learned``: logistic stacking fitted on validation;
   * ``centralised`` (POOLS DATA, a federation forbids it: comparison only): LightGBM on the
     joined blocks with the rounds' tree budget (parties x rounds x trees per round), and the
     same with ``interaction_constraints`` = the blocks, the best model of the additive form
     sum_p f_p(x_p) that every vertical mode fits.

Goals: vertical rounds within 0.01 test AUC of centralised, and at least 0.01 above the best
single party.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import polars as pl

DATA = Path(__file__).resolve().parent / ".data"
PARTIES = ("A", "B", "C")
LABEL_PARTY = "A"
#: The key-hashing secret of the benchmark data (set in the env var the spec names).
BENCH_SECRET = "fedfuse-benchmark-secret-not-for-real-data"
#: Fixed one-shot fusion weights.
FIXED_WEIGHTS = {"A": 0.4, "B": 0.3, "C": 0.3}
#: Training settings: the demo spec's (8 trees per round, learning rate 0.1, 15 leaves,
#: patience 3) with a budget of 40 rounds instead of 12, so early stopping ends the runs.
TRAINING: dict[str, Any] = {"rounds": 40}
#: Goals: vertical rounds vs centralised (largest AUC gap) and vs the best single party.
GAP_GOAL = 0.01
GAIN_GOAL = 0.01
KEY = "alignment_id"

T = TypeVar("T")


# -- data ------------------------------------------------------------------------------------
@dataclass
class PartyTable:
    frame: pl.DataFrame
    names: list[str]
    categorical: list[str]


def config_dir(customers: int, seed: int) -> Path:
    return DATA / f"vertical-c{customers}-s{seed}"


def prepare_party(spec: Any, party_id: str) -> Any:
    """One party's pipeline without Prefect (``tasks.prepare.steps.run_party``): its ``FusedOutput``."""
    from tasks.prepare.steps import PartyContext, run_party

    return run_party(PartyContext.from_spec(spec, party_id), spec.party(party_id).sources)


def prepared(customers: int, seed: int) -> tuple[dict[str, PartyTable], str]:
    """Every party's fused table (generated and prepared once, cached) and the spec path."""
    from storage.store import read_table
    from tasks.demo_data import write_demo_consortium
    from tasks.spec.load import load_spec

    folder = config_dir(customers, seed)
    done = folder / "prepared" / "meta.json"
    if not done.exists():
        if folder.exists():
            shutil.rmtree(folder)  # an interrupted earlier run
        started = time.perf_counter()
        spec_path = write_demo_consortium(
            str(folder / "consortium"), layout="vertical", customers=customers, seed=seed
        )
        generated = time.perf_counter() - started
        spec = load_spec(spec_path)
        # a fixed secret, so the hashed keys are the same in every run
        if spec.consortium.secret.env is None:
            raise SystemExit("the demo spec should read its secret from an env var")
        os.environ[spec.consortium.secret.env] = BENCH_SECRET
        (folder / "prepared").mkdir()
        meta: dict[str, Any] = {"spec": spec_path, "parties": {}}
        for party in PARTIES:
            out = prepare_party(spec, party)
            read_table(out.table).write_parquet(folder / "prepared" / f"{party}.parquet")
            meta["parties"][party] = {
                "names": [c.name for c in out.features],
                "categorical": [c.name for c in out.features if c.dtype == "category"],
            }
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        tmp.rename(done)
        print(
            f"  generated {customers:,} customers (vertical) in {generated:.0f}s, prepared "
            f"in {time.perf_counter() - started - generated:.0f}s",
            flush=True,
        )
    meta = json.loads(done.read_text())
    tables = {
        p: PartyTable(
            pl.read_parquet(folder / "prepared" / f"{p}.parquet"),
            list(m["names"]),
            list(m["categorical"]),
        )
        for p, m in meta["parties"].items()
    }
    return tables, str(meta["spec"])


# -- private set intersection ------------------------------------------------------------------
@dataclass
class PSIResult:
    alignments: dict[str, Any]
    seconds: float
    keys: dict[str, int]
    overlap: int
    scalar_mults: int


def party_secrets(seed: int) -> dict[str, Any]:
    """Fixed per-party PSI secrets, so alignment ids (and so the splits) repeat run to run."""
    from tasks.vertical.psi_protocol import PartySecret

    return {
        p: PartySecret(hashlib.sha256(f"fedfuse/bench-vertical/{seed}/{p}".encode()).digest())
        for p in PARTIES
    }


def run_intersection(
    keys: Mapping[str, pl.Series], *, seed: int, workers: int, min_overlap: int
) -> PSIResult:
    """The PSI star on hashed keys (timed, with the process pool's start-up)."""
    from tasks.vertical.psi_memory import run_psi_hashed

    started = time.perf_counter()
    run = run_psi_hashed(
        keys,
        label_party=LABEL_PARTY,
        min_overlap=min_overlap,
        secrets=party_secrets(seed),
        workers=workers,
    )
    seconds = time.perf_counter() - started
    n = {p: k.len() for p, k in keys.items()}
    overlap = len(run.alignments[LABEL_PARTY])
    return PSIResult(run.alignments, seconds, n, overlap, sum(run.scalar_mults.values()))


def check_intersection(keys: Mapping[str, pl.Series], psi: PSIResult) -> None:
    """The PSI must find exactly the plain join's overlap, and every alignment id must name
    the same entity at every party (a benchmark check: it needs everyone's keys)."""
    from tasks.vertical.psi_protocol import ALIGN_ID, ROW

    common = set(keys[PARTIES[0]].to_list())
    for p in PARTIES[1:]:
        common &= set(keys[p].to_list())
    if len(common) != psi.overlap:
        raise SystemExit(f"PSI found {psi.overlap} common entities, the plain join {len(common)}")
    behind = {}
    for p in PARTIES:
        table = psi.alignments[p].table
        behind[p] = table.select(ALIGN_ID).with_columns(keys[p].gather(table[ROW]).alias(p))
    joined = behind["A"]
    for p in PARTIES[1:]:
        joined = joined.join(behind[p], on=ALIGN_ID, how="inner", validate="1:1")
    same = joined.filter((pl.col("A") == pl.col("B")) & (pl.col("A") == pl.col("C"))).height
    if joined.height != psi.overlap or same != psi.overlap:
        raise SystemExit("PSI alignment ids do not name the same entities at every party")


# -- aligned blocks ---------------------------------------------------------------------------
@dataclass
class Aligned:
    labels: Any  # tasks.vertical.data.LabelData
    blocks: dict[str, Any]  # party -> tasks.vertical.data.PartyBlock
    ids: dict[str, pl.Series]  # split -> alignment ids in row order
    a_all: Any  # A's block over all its customers (train / valid), test = the overlap's
    a_all_labels: Any


def matrix(frame: pl.DataFrame, names: list[str]) -> np.ndarray:
    return (
        frame.select([pl.col(n).cast(pl.Float64) for n in names])
        .to_numpy(allow_copy=True)
        .astype(np.float64, copy=False)
    )


def align_blocks(
    tables: Mapping[str, PartyTable],
    psi: PSIResult,
    *,
    validation_fraction: float,
    test_fraction: float,
) -> Aligned:
    """Each party's overlap rows in alignment-id order; splits from the alignment id."""
    from tasks.horizontal.training import split_assignments
    from tasks.types import ENTITY_HASH, LABEL
    from tasks.vertical.data import LabelData, PartyBlock
    from tasks.vertical.psi_protocol import ALIGN_ID, ROW

    ordered: dict[str, pl.DataFrame] = {}
    for p, t in tables.items():
        rows = t.frame.with_row_index(ROW).with_columns(pl.col(ROW).cast(pl.UInt32))
        ordered[p] = psi.alignments[p].table.join(rows, on=ROW, how="left").sort(ALIGN_ID)
    ids = ordered[LABEL_PARTY][ALIGN_ID]
    for p, frame in ordered.items():
        if not frame[ALIGN_ID].equals(ids):
            raise SystemExit(f"party {p}: aligned rows differ from the label party's")
    split = split_assignments(
        ids, validation_fraction=validation_fraction, test_fraction=test_fraction
    )
    masks = {s: (split == s).to_numpy() for s in ("train", "valid", "test")}
    y = ordered[LABEL_PARTY][LABEL].cast(pl.Float64).to_numpy()
    if np.isnan(y).any():
        raise SystemExit("the label party lacks labels for some overlap entities")
    labels = LabelData(
        y_train=y[masks["train"]], y_valid=y[masks["valid"]], y_test=y[masks["test"]]
    )
    blocks: dict[str, Any] = {}
    for p, t in tables.items():
        X = matrix(ordered[p], t.names)
        blocks[p] = PartyBlock(
            party=p,
            feature_names=tuple(t.names),
            X_train=X[masks["train"]],
            X_valid=X[masks["valid"]],
            X_test=X[masks["test"]],
            categorical=tuple(t.categorical),
        )
    # A on all its customers: overlap entities keep their alignment split, the others are
    # split by their hashed key; only the overlap's test entities are scored
    a = tables[LABEL_PARTY]
    in_overlap = psi.alignments[LABEL_PARTY].table[ROW].to_numpy()
    a_split = split_assignments(
        a.frame[ENTITY_HASH], validation_fraction=validation_fraction, test_fraction=test_fraction
    ).to_numpy()
    outside = np.ones(a.frame.height, dtype=bool)
    outside[in_overlap] = False
    X_a = matrix(a.frame, a.names)
    y_a = a.frame[LABEL].cast(pl.Float64).to_numpy()
    keep = outside & ~np.isnan(y_a)
    X_out, y_out, s_out = X_a[keep], y_a[keep], a_split[keep]
    overlap_block = blocks[LABEL_PARTY]
    a_all = PartyBlock(
        party=LABEL_PARTY,
        feature_names=tuple(a.names),
        X_train=np.vstack([overlap_block.X_train, X_out[s_out == "train"]]),
        X_valid=np.vstack([overlap_block.X_valid, X_out[s_out == "valid"]]),
        X_test=overlap_block.X_test,
        categorical=tuple(a.categorical),
    )
    a_all_labels = LabelData(
        y_train=np.concatenate([labels.y_train, y_out[s_out == "train"]]),
        y_valid=np.concatenate([labels.y_valid, y_out[s_out == "valid"]]),
        y_test=labels.y_test,
    )
    return Aligned(
        labels=labels,
        blocks=blocks,
        ids={s: ids.filter(pl.Series(masks[s])).alias(KEY) for s in masks},
        a_all=a_all,
        a_all_labels=a_all_labels,
    )


# -- models -----------------------------------------------------------------------------------
@dataclass
class Model:
    name: str
    auc: float
    logloss: float
    trees: int
    seconds: float
    note: str = ""


@dataclass
class Result:
    customers: int
    rows: dict[str, int]
    overlap: int
    splits: dict[str, int]
    positive: float
    psi_seconds: float
    psi_workers: int
    psi_scalar_mults: int
    models: list[Model]

    def auc(self, name: str) -> float:
        return next(m.auc for m in self.models if m.name == name)

    @property
    def best_single(self) -> Model:
        return max((m for m in self.models if "alone" in m.name), key=lambda m: m.auc)

    @property
    def rounds(self) -> float:
        return self.auc("vertical rounds")

    @property
    def gap(self) -> float:
        """Centralised minus vertical rounds (test AUC)."""
        return self.auc("centralised") - self.rounds

    @property
    def gain(self) -> float:
        """Vertical rounds minus the best single party (test AUC)."""
        return self.rounds - self.best_single.auc

    @property
    def gap_ok(self) -> bool:
        return self.gap <= GAP_GOAL

    @property
    def gain_ok(self) -> bool:
        return self.gain >= GAIN_GOAL

    @property
    def keys_per_second(self) -> float:
        return sum(self.rows.values()) / self.psi_seconds


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def train_models(data: Aligned, spec: Any) -> list[Model]:
    from tasks.horizontal.model_text import count_trees
    from tasks.horizontal.training import evaluate
    from tasks.vertical.data import LabelData, PartyBlock
    from tasks.vertical.fusion import fixed_fusion, fuse_scores, learn_fusion, score_table
    from tasks.vertical.loop import VerticalRun, train_vertical_rounds
    from tasks.vertical.one_shot import train_one_shot
    from tasks.vertical.party_model import model_trees
    from tasks.vertical.rounds import DEFAULT_COMBINE, Combine

    labels: LabelData = data.labels
    assert labels.y_test is not None
    y_test = labels.y_test
    models: list[Model] = []

    def add(name: str, raw: np.ndarray, trees: int, seconds: float, note: str = "") -> None:
        metrics = evaluate(y_test, raw, "binary", 1)
        models.append(
            Model(name, metrics.get("auc", float("nan")), metrics["logloss"], trees, seconds, note)
        )

    def one_shot(block: PartyBlock, lab: LabelData, s: Any = spec) -> tuple[Any, float]:
        return timed(lambda: train_one_shot(block, lab, spec=s, objective="binary", num_class=1))

    budget = spec.rounds * spec.trees_per_round
    one = {}
    for p, block in data.blocks.items():
        res, secs = one_shot(block, labels)
        one[p] = (res, secs)
        add(
            f"{p} alone",
            res.test,
            count_trees(res.model_text),
            secs,
            f"{res.iterations} of {budget}",
        )
    res, secs = one_shot(data.a_all, data.a_all_labels)
    add(
        f"{LABEL_PARTY} alone, all its customers",
        res.test,
        count_trees(res.model_text),
        secs,
        f"{len(data.a_all_labels.y_train):,} train rows",
    )

    # the default combine, then the other one for comparison
    other: Combine = "mean" if DEFAULT_COMBINE == "sum" else "sum"
    for combine, name in (
        (DEFAULT_COMBINE, "vertical rounds"),
        (other, f"vertical rounds, combine={other}"),
    ):

        def rounds(c: Combine = combine) -> VerticalRun:
            return train_vertical_rounds(
                labels, data.blocks, spec=spec, objective="binary", num_class=1, combine=c
            )

        run, secs = timed(rounds)
        best = run.state.progress.best_round
        trees = sum(model_trees(m, best) for m in run.models.values())
        models.append(
            Model(
                name,
                run.test["auc"],
                run.test["logloss"],
                trees,
                secs,
                f"best round {best} of {run.state.progress.round}",
            )
        )

    prior = float(labels.y_train.mean())
    base = [float(np.log(prior / (1 - prior)))]
    test_tables = {p: score_table(data.ids["test"], r.test, key=KEY) for p, (r, _) in one.items()}
    shot_trees = sum(count_trees(r.model_text) for r, _ in one.values())
    shot_secs = sum(s for _, s in one.values())
    fixed = fixed_fusion(list(one), FIXED_WEIGHTS, objective="binary", num_class=1, base=base)
    fused = fuse_scores(test_tables, fixed, key=KEY, ids=data.ids["test"])["score"].to_numpy()
    weights = "/".join(f"{FIXED_WEIGHTS[p]:g}" for p in one)
    add("one-shot fixed", fused, shot_trees, shot_secs, f"weights {weights}")
    learned, secs = timed(
        lambda: learn_fusion(
            {p: score_table(data.ids["valid"], r.valid, key=KEY) for p, (r, _) in one.items()},
            pl.DataFrame({KEY: data.ids["valid"], "label": labels.y_valid}),
            key=KEY,
            objective="binary",
            num_class=1,
            base=base,
        )
    )
    fused = fuse_scores(test_tables, learned, key=KEY, ids=data.ids["test"])["score"].to_numpy()
    coef = "/".join(f"{c:.2f}" for c in learned.coef[0])
    add("one-shot learned", fused, shot_trees, shot_secs + secs, f"stacking coef {coef}")

    blocks = list(data.blocks.values())
    names = [n for b in blocks for n in b.feature_names]
    if len(set(names)) != len(names):
        raise SystemExit("feature names repeat across parties")
    everything = PartyBlock(
        party="all",
        feature_names=tuple(names),
        X_train=np.hstack([b.X_train for b in blocks]),
        X_valid=np.hstack([b.X_valid for b in blocks]),
        X_test=np.hstack([b.X_test for b in blocks]),
        categorical=tuple(c for b in blocks for c in b.categorical),
    )
    index = {n: j for j, n in enumerate(names)}
    constraints = [[index[n] for n in b.feature_names] for b in blocks]
    scaled = {"rounds": spec.rounds * len(blocks)}
    for name, update in (
        ("centralised", scaled),
        (
            "centralised, no cross-block interactions",
            scaled | {"params": {**spec.params, "interaction_constraints": constraints}},
        ),
    ):
        cen_spec = spec.model_copy(update=update)
        res, secs = one_shot(everything, labels, cen_spec)
        add(
            name,
            res.test,
            count_trees(res.model_text),
            secs,
            f"{res.iterations} of {cen_spec.rounds * spec.trees_per_round}",
        )
    return models


# -- report -----------------------------------------------------------------------------------
def table(result: Result) -> str:
    lines = [
        "| model | test AUC | logloss | trees | wall | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for m in result.models:
        name = f"{m.name} (POOLS DATA)" if m.name.startswith("centralised") else m.name
        lines.append(
            f"| {name} | {m.auc:.4f} | {m.logloss:.4f} | {m.trees} | {m.seconds:.1f} s | {m.note} |"
        )
    return "\n".join(lines)


def goals(result: Result) -> list[str]:
    best = result.best_single
    return [
        f"vertical rounds vs centralised: {result.rounds:.4f} vs {result.auc('centralised'):.4f}, "
        f"gap {result.gap:+.4f} -> {'pass' if result.gap_ok else 'FAIL'} (goal <= {GAP_GOAL})",
        f"vertical rounds vs best single party ({best.name}): {result.rounds:.4f} vs "
        f"{best.auc:.4f}, gain {result.gain:+.4f} -> {'pass' if result.gain_ok else 'FAIL'} "
        f"(goal >= +{GAIN_GOAL})",
    ]


def main(argv: list[str] | None = None) -> Result:
    from tasks.spec.load import load_spec

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--psi-workers", type=int, default=os.cpu_count() or 1, help="X25519 worker processes"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 3000 customers")
    args = parser.parse_args(argv)
    if args.quick:
        args.customers = 3000
    logging.basicConfig(level=logging.ERROR)

    tables, spec_path = prepared(args.customers, args.seed)
    spec = load_spec(spec_path)
    training = spec.training.model_copy(update=TRAINING)
    keys = {p: tables[p].frame["entity_hash"] for p in PARTIES}
    psi = run_intersection(
        keys, seed=args.seed, workers=args.psi_workers, min_overlap=spec.fusion.min_overlap
    )
    check_intersection(keys, psi)
    data = align_blocks(
        tables,
        psi,
        validation_fraction=training.validation_fraction,
        test_fraction=training.test_fraction,
    )
    labels = data.labels
    splits = {
        "train": len(labels.y_train),
        "valid": len(labels.y_valid),
        "test": len(labels.y_test),
    }
    result = Result(
        customers=args.customers,
        rows=psi.keys,
        overlap=psi.overlap,
        splits=splits,
        positive=float(np.mean(np.concatenate([labels.y_train, labels.y_valid, labels.y_test]))),
        psi_seconds=psi.seconds,
        psi_workers=args.psi_workers,
        psi_scalar_mults=psi.scalar_mults,
        models=train_models(data, training),
    )
    rows = ", ".join(f"{p} {n:,}" for p, n in psi.keys.items())
    print(
        f"{args.customers:,} customers; fused rows {rows}; all-party overlap {psi.overlap:,} "
        f"(train/valid/test {splits['train']:,}/{splits['valid']:,}/{splits['test']:,}, "
        f"{result.positive:.1%} positive)"
    )
    print(
        f"PSI: {psi.seconds:.1f} s for {sum(psi.keys.values()):,} keys "
        f"({result.keys_per_second:,.0f} keys/s; {psi.scalar_mults:,} X25519 operations, "
        f"{psi.scalar_mults / psi.seconds:,.0f}/s; {args.psi_workers} worker processes)"
    )
    print(
        f"training: trees/round {training.trees_per_round}, rounds {training.rounds}, "
        f"lr {training.learning_rate}, leaves {training.num_leaves}, patience {training.patience}"
    )
    print()
    print(table(result))
    print()
    for line in goals(result):
        print(line)
    return result


if __name__ == "__main__":
    main()
