"""Scoring new data with a trained global ensemble (pure functions and a thin task)."""

from __future__ import annotations

import polars as pl
from prefect import task

from storage.secrets import resolve_secret
from storage.store import Store, TableRef, read_manifest, read_table
from tasks.horizontal.ensemble import GlobalEnsemble, predict_raw
from tasks.links import probabilities
from tasks.manifest import EnsembleManifest
from tasks.prepare.align import hash_keys
from tasks.prepare.design import FeatureSchema, design_matrix
from tasks.spec.models import SecretRef
from tasks.types import ENTITY_HASH


def load_ensemble(manifest_uri: str) -> GlobalEnsemble:
    body, texts = read_manifest(manifest_uri)
    return EnsembleManifest.model_validate(body).ensemble(texts)


def schema_of(ensemble: GlobalEnsemble) -> FeatureSchema:
    return FeatureSchema(
        names=ensemble.feature_names, categorical=ensemble.categorical, modality={}, parties={}
    )


def predictions(
    fused: pl.DataFrame, ensemble: GlobalEnsemble, keys: pl.DataFrame, *, entity: str
) -> pl.DataFrame:
    """One row per scored entity: the party's own key, the hashed key and the scores."""
    raw = predict_raw(ensemble, design_matrix(fused, schema_of(ensemble)))
    out = fused.select(ENTITY_HASH)
    if ensemble.objective == "multiclass":
        probs = probabilities(raw, ensemble.objective, ensemble.num_class)
        out = out.with_columns(
            [pl.Series(f"probability_{k}", probs[:, k]) for k in range(probs.shape[1])]
            + [pl.Series("prediction", probs.argmax(axis=1))]
        )
    else:
        out = out.with_columns(
            pl.Series("raw_score", raw.reshape(-1)),
            pl.Series("prediction", probabilities(raw, ensemble.objective, ensemble.num_class)),
        )
    return out.join(keys, on=ENTITY_HASH, how="left", validate="1:1").select(
        entity, pl.exclude(entity)
    )


def entity_keys(features: list[pl.DataFrame], *, entity: str, secret: bytes) -> pl.DataFrame:
    """The party's own keys beside their hashes (never leaves the party's store)."""
    keys = pl.concat([f.select(entity) for f in features]).unique().sort(entity)
    return keys.with_columns(hash_keys(keys[entity], secret))


def run_scoring(
    store: str,
    fused: TableRef,
    features: list[TableRef],
    manifest: str,
    entity: str,
    secret: SecretRef,
) -> TableRef:
    ensemble = load_ensemble(manifest)
    keys = entity_keys(
        [read_table(f, columns=[entity]) for f in features],
        entity=entity,
        secret=resolve_secret(env=secret.env, block=secret.block),
    )
    frame = predictions(read_table(fused), ensemble, keys, entity=entity)
    return Store(store).write_table(frame, "reports", "predictions")


score_party = task(name="score-party")(run_scoring)
