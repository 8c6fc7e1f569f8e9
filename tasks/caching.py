"""Cache keys built from content hashes.

Task inputs are small typed references (uri + sha256) and spec sections, so hashing them is
cheap and a key changes exactly when an input's content, the parameters or fedfuse's own code
change. A retried or new run on unchanged inputs therefore skips finished steps.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

_PACKAGES = ("tasks", "storage")


@functools.cache
def code_version() -> str:
    """Hash of fedfuse's task and storage code: a code change invalidates cached results."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def parameters_key(task_name: str, parameters: dict[str, Any]) -> str:
    payload = json.dumps(_jsonable(parameters), sort_keys=True, default=str)
    blob = f"{task_name}\n{code_version()}\n{payload}".encode()
    return f"{task_name}-{hashlib.sha256(blob).hexdigest()[:32]}"


def content_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn``: task name + code version + hashed parameters."""
    return parameters_key(context.task.name, parameters)
