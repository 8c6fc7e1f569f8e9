"""Modalities, one module each, found by kind (a source's ``kind`` in the spec).

Adding a modality is one module in this package that :func:`register` s an instance of a
:class:`~tasks.prepare.modalities.base.Modality` subclass; the package's modules are imported
here on first use. A modality defined elsewhere is registered by calling :func:`register`
before the spec is loaded. A modality whose source is a folder of files subclasses
:class:`~tasks.prepare.modalities.base.FolderModality`. Registering imports no feature dependency: a modality module
imports its heavy libraries (language models, ...) inside its extraction.
"""

from __future__ import annotations

import importlib
import pkgutil

from tasks.prepare.modalities.base import (
    FOLDER_COLUMNS,
    MODALITIES,
    FeatureInputs,
    FileRejected,
    FolderModality,
    Modality,
    register,
)
from tasks.spec.models import SourceSpec

#: Display order of a feature whose modality is not registered here.
UNKNOWN_ORDER = 9


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


def modality_names() -> list[str]:
    """The registered kinds, sorted."""
    _discover()
    return sorted(MODALITIES)


def modality(kind: str) -> Modality:
    """The modality registered for ``kind``."""
    _discover()
    if kind not in MODALITIES:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(sorted(MODALITIES))}")
    return MODALITIES[kind]


def modality_of(source: SourceSpec) -> Modality:
    """The modality of a spec's source."""
    return modality(source.kind)


def display_order(kind: str) -> int:
    """Where features of ``kind`` come in the consortium schema."""
    _discover()
    found = MODALITIES.get(kind)
    return found.order if found is not None else UNKNOWN_ORDER


__all__ = [
    "FOLDER_COLUMNS",
    "MODALITIES",
    "FeatureInputs",
    "FileRejected",
    "FolderModality",
    "Modality",
    "display_order",
    "modality",
    "modality_names",
    "modality_of",
    "register",
]
