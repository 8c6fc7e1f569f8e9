"""The optional MLflow model registry (extra ``fedfuse[mlflow]``): all MLflow IO in one place.

:func:`register_lightgbm` logs an exported LightGBM model (MLflow's LightGBM flavour) with
metrics, tags and text artifacts in one MLflow run and registers it as a new version of a
registered model. It receives model text, numbers, names and card texts only: no row and
no entity id ever reaches MLflow (no input example; the signature names the hashed-key
feature columns).

The default registry of a local coordinator store lives inside it:
``sqlite:///<store>/mlflow/mlflow.db``, artifacts under ``<store>/mlflow/artifacts``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from storage.files import is_uri

#: The folder of the default registry inside a local coordinator store.
REGISTRY_FOLDER = "mlflow"
INSTALL_HINT = "pip install 'fedfuse[mlflow]'"


class RegistryError(ValueError):
    """The model registry cannot be used as asked (extra missing, no local default)."""


class RegisteredVersion(BaseModel):
    """A registered model version."""

    name: str
    version: str
    run_id: str
    registry: str


class RegistryLocation(BaseModel):
    """Where models are registered: the tracking/registry URI and the artifact root
    (``None``: the registry server's own)."""

    uri: str
    artifacts: str | None = None


def registry_location(coordinator_root: str, registry: str | None) -> RegistryLocation:
    """The registry to use: ``registry`` when given, else the default inside a local
    coordinator store; an object-store coordinator requires ``registry``."""
    local = not is_uri(coordinator_root) or coordinator_root.startswith("file://")
    folder = (
        Path(coordinator_root.removeprefix("file://")).resolve() / REGISTRY_FOLDER
        if local
        else None
    )
    artifacts = (folder / "artifacts").as_uri() if folder is not None else None
    if registry is not None:
        # a database or folder registry here keeps its artifacts in the store too; a
        # registry server keeps its own
        here = registry.startswith(("sqlite:", "file:")) or "://" not in registry
        return RegistryLocation(uri=registry, artifacts=artifacts if here else None)
    if folder is None:
        raise RegistryError(
            f"{coordinator_root}: the coordinator store is not local; give the model "
            "registry with --registry URI"
        )
    folder.mkdir(parents=True, exist_ok=True)
    return RegistryLocation(uri=f"sqlite:///{folder / 'mlflow.db'}", artifacts=artifacts)


def _mlflow() -> ModuleType:
    try:
        import mlflow
        import mlflow.lightgbm
    except ImportError:
        raise RegistryError(f"the model registry needs MLflow: {INSTALL_HINT}") from None
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow


def require_mlflow() -> None:
    """Raise :class:`RegistryError` with the install line when the extra is missing."""
    _mlflow()


def _experiment(client: Any, name: str, artifacts: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    return str(client.create_experiment(name, artifact_location=artifacts))


def register_lightgbm(
    location: RegistryLocation,
    *,
    model_text: str,
    name: str,
    experiment: str,
    metrics: Mapping[str, float],
    steps: Mapping[str, Mapping[int, float]],
    tags: Mapping[str, str],
    texts: Mapping[str, str],
) -> RegisteredVersion:
    """Log ``model_text`` (a validated LightGBM text model) as MLflow's LightGBM flavour in
    a new run of ``experiment`` with ``metrics``, per-round ``steps`` (metric -> round ->
    value), ``tags`` (on the run and the model version) and ``texts`` (artifact path ->
    text), and register it as the next version of ``name``."""
    mlflow = _mlflow()
    from mlflow.exceptions import MlflowException

    try:
        with warnings.catch_warnings():
            # MLflow's notes about its own internals: its sqlite store declares a loader
            # option SQLAlchemy 2.1 deprecates; its type-hint inference of its own wrappers
            warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy")
            warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow(\.|$)")
            return _register(
                mlflow, location, model_text, name, experiment, metrics, steps, tags, texts
            )
    except MlflowException as exc:
        first = (str(exc.message).strip().splitlines() or [type(exc).__name__])[0]
        raise RegistryError(f"{location.uri}: {first}") from None


def _register(
    mlflow: Any,
    location: RegistryLocation,
    model_text: str,
    name: str,
    experiment: str,
    metrics: Mapping[str, float],
    steps: Mapping[str, Mapping[int, float]],
    tags: Mapping[str, str],
    texts: Mapping[str, str],
) -> RegisteredVersion:
    import lightgbm as lgb
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    booster = lgb.Booster(model_str=model_text)
    signature = ModelSignature(
        inputs=Schema([ColSpec("double", feature) for feature in booster.feature_name()])
    )
    mlflow.set_tracking_uri(location.uri)
    mlflow.set_registry_uri(location.uri)
    client = mlflow.MlflowClient(tracking_uri=location.uri, registry_uri=location.uri)
    experiment_id = _experiment(client, experiment, location.artifacts)
    with mlflow.start_run(experiment_id=experiment_id, tags=dict(tags)) as run:
        mlflow.log_metrics(dict(metrics))
        for metric, values in steps.items():
            for step, value in sorted(values.items()):
                mlflow.log_metric(metric, value, step=step)
        for path, text in texts.items():
            mlflow.log_text(text, path)
        info = mlflow.lightgbm.log_model(
            booster,
            name="model",
            signature=signature,
            registered_model_name=name,
            # lightgbm and what the flavour itself needs: nothing to infer from the
            # environment (inference loads the model in a child process)
            pip_requirements=mlflow.lightgbm.get_default_pip_requirements(),
        )
    version = str(info.registered_model_version)
    for key, tag in tags.items():
        client.set_model_version_tag(name, version, key, tag)
    return RegisteredVersion(
        name=name, version=version, run_id=run.info.run_id, registry=location.uri
    )
