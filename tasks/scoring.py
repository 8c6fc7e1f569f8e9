"""Scoring new data with a trained global ensemble (pure functions and a thin task)."""

from __future__ import annotations

import numpy as np
import polars as pl
from prefect import task

from storage.secrets import resolve_secret
from storage.store import Store, TableRef, read_manifest, read_table
from tasks.horizontal.ensemble import GlobalEnsemble, predict_raw
from tasks.links import probabilities
from tasks.manifest import EnsembleManifest
from tasks.prepare.align import hash_keys
from tasks.prepare.design import FeatureSchema, design_matrix
from tasks.prepare.preprocess import FALSE_TEXT, TRUE_TEXT
from tasks.prepare.steps import RAW_KEY, RAW_KEY_PART
from tasks.spec.models import ColumnSpec, SecretRef
from tasks.types import ENTITY_HASH, Objective


def load_ensemble(manifest_uri: str) -> GlobalEnsemble:
    body, texts = read_manifest(manifest_uri)
    return EnsembleManifest.model_validate(body).ensemble(texts)


def schema_of(ensemble: GlobalEnsemble) -> FeatureSchema:
    return FeatureSchema(
        names=ensemble.feature_names, categorical=ensemble.categorical, modality={}, parties={}
    )


def label_values(
    column: ColumnSpec | None,
    *,
    task: Objective,
    classes: int,
    vocabulary: list[str] | None = None,
    positive: str | None = None,
    values: dict[str, float] | None = None,
) -> list[str]:
    """The label value of each class (index = class): with the consortium's ``positive``,
    that value and ``not <positive>`` (class 0 is every other raw value); with its
    ``values``, the raw values mapped to each class (several joined by ``|``); else a text
    label's consortium vocabulary value, else the raw value the label column's mapping (raw
    value -> canonical) sends to that class; a class no raw value maps to shows as its
    canonical value. Empty for regression."""
    if task == "regression":
        return []
    if positive is not None:
        return [f"not {positive}", positive]
    if values is not None:
        count = 2 if task == "binary" else classes
        raws: list[list[str]] = [[] for _ in range(count)]
        for raw, number in values.items():
            if number.is_integer() and 0 <= number < count:
                raws[int(number)].append(raw)
        return ["|".join(r) if r else str(k) for k, r in enumerate(raws)]
    if column is not None and column.dtype in ("str", "category") and vocabulary:
        return list(vocabulary)
    canonical = ["false", "true"] if column is not None and column.dtype == "bool" else None
    out = (canonical or ["0", "1"]) if task == "binary" else [str(k) for k in range(classes)]
    seen: set[int] = set()
    for raw, value in (column.values if column is not None else {}).items():
        k = _class_of(value)
        if k is not None and k < len(out) and k not in seen:
            out[k] = raw
            seen.add(k)
    return out


def _class_of(value: str) -> int | None:
    text = value.strip().lower()
    if text in TRUE_TEXT:
        return 1
    if text in FALSE_TEXT:
        return 0
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() and number >= 0 else None


def predictions(
    fused: pl.DataFrame,
    ensemble: GlobalEnsemble,
    keys: pl.DataFrame,
    *,
    entity: str,
    labels: list[str] | None = None,
) -> pl.DataFrame:
    """One row per scored entity: the party's own key, the hashed key and the scores."""
    raw = predict_raw(ensemble, design_matrix(fused, schema_of(ensemble)))
    probs = probabilities(raw, ensemble.objective, ensemble.num_class)
    out = fused.select(ENTITY_HASH).with_columns(
        score_columns(raw, probs, objective=ensemble.objective, labels=labels)
    )
    return with_raw_keys(out, keys, entity=entity)


def score_columns(
    raw: np.ndarray, probs: np.ndarray, *, objective: Objective, labels: list[str] | None
) -> list[pl.Series]:
    """The score columns of predictions (both layouts). Multiclass: one probability per
    class named by its label value, ``prediction`` the most likely class's label value;
    binary: ``raw_score``, ``probability`` of the positive class and ``prediction`` (the
    positive label value at probability >= 0.5); regression: ``raw_score``, ``prediction``."""
    if objective == "multiclass":
        k = probs.shape[1]
        names = labels if labels is not None and len(labels) == k else [str(i) for i in range(k)]
        best = probs.argmax(axis=1)
        return [pl.Series(f"probability_{names[i]}", probs[:, i]) for i in range(k)] + [
            pl.Series("prediction", np.asarray(names, dtype=object)[best].tolist(), pl.String)
        ]
    flat = np.asarray(raw).reshape(-1)
    if objective == "binary":
        names = labels if labels is not None and len(labels) == 2 else ["0", "1"]
        p = np.asarray(probs).reshape(-1)
        return [
            pl.Series("raw_score", flat),
            pl.Series("probability", p),
            pl.Series("prediction", [names[int(v >= 0.5)] for v in p], pl.String),
        ]
    return [pl.Series("raw_score", flat), pl.Series("prediction", np.asarray(probs).reshape(-1))]


def with_raw_keys(out: pl.DataFrame, keys: pl.DataFrame, *, entity: str) -> pl.DataFrame:
    """Predictions keyed by the party's own raw ids (``keys``: :func:`entity_keys`; its
    key columns come first; one named like a score column is shown as ``<name> (key)``)."""
    keys = keys.rename(
        {c: f"{c} (key)" for c in keys.columns if c in out.columns and c != ENTITY_HASH}
    )
    shown = [c for c in keys.columns if c != ENTITY_HASH]
    return out.join(keys, on=ENTITY_HASH, how="left", validate="1:1").select(
        *shown, pl.exclude(shown)
    )


def entity_keys(key_tables: list[pl.DataFrame], *, entity: str, secret: bytes) -> pl.DataFrame:
    """The party's own raw keys beside their hashes (never leaves the party's store);
    ``key_tables``: the pipeline's raw-key tables (normalised key, then the raw key, or a
    composite key's raw part columns). The raw key shows as the entity column, a
    composite's parts as the columns named as in the party's export."""
    raw = [c for t in key_tables for c in t.columns if c == RAW_KEY or c.startswith(RAW_KEY_PART)]
    raw = list(dict.fromkeys(sorted(raw, key=lambda c: c != RAW_KEY)))
    keys = (
        pl.concat(
            [t.select(entity, *[c for c in raw if c in t.columns]) for t in key_tables],
            how="diagonal",
        )
        .unique(entity, keep="first", maintain_order=True)
        .sort(entity)
    )
    names: list[str] = []
    for c in raw:  # a part named like the entity column of another source's key: marked
        name = entity if c == RAW_KEY else c.removeprefix(RAW_KEY_PART)
        names.append(f"{name} (key)" if name in names or name == ENTITY_HASH else name)
    shown = [pl.col(c).alias(name) for c, name in zip(raw, names, strict=True)]
    return keys.with_columns(hash_keys(keys[entity], secret)).select(*shown, ENTITY_HASH)


def run_scoring(
    store: str,
    fused: TableRef,
    key_tables: list[TableRef],
    manifest: str,
    entity: str,
    secret: SecretRef,
    labels: list[str] | None = None,
) -> TableRef:
    ensemble = load_ensemble(manifest)
    keys = entity_keys(
        [read_table(t) for t in key_tables],
        entity=entity,
        secret=resolve_secret(env=secret.env, block=secret.block),
    )
    frame = predictions(read_table(fused), ensemble, keys, entity=entity, labels=labels)
    return Store(store).write_table(frame, "reports", "predictions")


score_party = task(name="score-party")(run_scoring)
