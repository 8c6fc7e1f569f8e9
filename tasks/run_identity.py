"""Identity of a training or scoring run, for both layouts: same inputs, same key (a rerun
resumes the same run, its checkpoints and cached steps)."""

from __future__ import annotations

import hashlib
import json
import re

from storage.store import TableRef
from tasks.prepare.design import FeatureSchema
from tasks.spec.models import FedSpec, FusionSpec, TextSpec


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def spec_identity(spec: FedSpec) -> str:
    """Which spec trained a run: the consortium's name plus a fingerprint of its consortium
    section (``as_of`` aside: scoring at a later date is the same spec) and parties (runs of
    several specs can share one coordinator store)."""
    blob = json.dumps(
        {
            "consortium": spec.consortium.model_dump(mode="json", exclude={"as_of"}),
            "parties": sorted(p.id for p in spec.parties),
        },
        sort_keys=True,
    )
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.consortium.name)[:40]
    return f"{name}-{_digest(blob)}"


def run_key(spec: FedSpec, schema: FeatureSchema, fused: dict[str, TableRef]) -> str:
    """Identity of a training run: same spec training section, schema and data -> same run."""
    blob = json.dumps(
        {
            "training": spec.training.model_dump(mode="json"),
            "task": spec.consortium.task,
            "schema": schema.model_dump(mode="json"),
            "fused": {p: r.sha256 for p, r in sorted(fused.items())},
        },
        sort_keys=True,
    )
    return _digest(blob)


def vertical_run_key(base_key: str, fusion: FusionSpec, text: TextSpec | None = None) -> str:
    """A vertical training run: the training identity plus the fusion section, and the
    ``[text]`` section when the text parties fit a text block."""
    fusion_blob = json.dumps(fusion.model_dump(mode="json"), sort_keys=True)
    if text is not None:
        fusion_blob += "\n" + json.dumps(text.model_dump(mode="json"), sort_keys=True)
    return _digest(f"{base_key}\n{fusion_blob}")


def scoring_run_key(training_key: str, fused: dict[str, TableRef]) -> str:
    """A vertical scoring run: the trained run plus the scored data (``s`` + 12 hex)."""
    return "s" + _digest(
        json.dumps([training_key, sorted((p, r.sha256) for p, r in fused.items())])
    )


def num_classes(spec: FedSpec) -> int:
    """Raw-score columns the spec's task asks for: K for multiclass, else 1."""
    if spec.consortium.task == "multiclass":
        return int(spec.consortium.label.num_classes or 0)
    return 1
