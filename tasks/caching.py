"""Cache keys built from content hashes.

Task inputs are small typed references (uri + sha256) and spec sections, so hashing them is
cheap and a key changes exactly when an input's content, the parameters or the task's own code
change. A retried or new run on unchanged inputs therefore skips finished steps.

Which code a key covers: the module that defines the task's function plus every project
module (under the top-level packages ``tasks`` and ``storage``) it imports, transitively.
Imports are read with :mod:`ast` (``import x`` and ``from x import y``, at module level and
inside functions, relative ones included); ``from tasks import foo`` counts ``tasks/foo.py``
(or ``tasks/foo/__init__.py``), and the ``__init__.py`` of every package on the way counts too.
A module that imports dynamically (``importlib.import_module``/``__import__`` with a computed
name) is taken to import every module of its package. The granularity is the module, not the
function: a change anywhere in a module the task's module reaches through its imports
invalidates the task's cached results (even a docstring), a change in any other module does
not (editing ``tasks/report.py`` keeps PSI and training caches). Code that cannot be traced
this way (a function outside those packages, a module that cannot be found, read or parsed)
falls back to the installed fedfuse version plus a hash of the whole ``tasks``/``storage``
tree (:func:`code_version`), so it is invalidated by any code change, as before. Third-party
libraries are not covered.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import json
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

_PACKAGES = ("tasks", "storage")
_ROOT = Path(__file__).resolve().parent.parent
_DYNAMIC_IMPORTS = frozenset({"import_module", "__import__"})
#: ``ast.parse`` is not safe to run in several threads at once on CPython 3.11 (it can raise
#: ``SystemError: AST constructor recursion depth mismatch``), and Prefect computes cache keys
#: in the task runner's threads: module fingerprints are computed one at a time.
_PARSE_LOCK = threading.Lock()


@functools.cache
def code_version() -> str:
    """Hash of fedfuse's task and storage code: a code change invalidates cached results."""
    digest = hashlib.sha256()
    for package in _PACKAGES:
        for path in sorted((_ROOT / package).rglob("*.py")):
            digest.update(path.relative_to(_ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def package_version() -> str:
    """The installed fedfuse version, ``"unknown"`` when it is not installed."""
    try:
        return importlib.metadata.version("fedfuse")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class UntraceableError(LookupError):
    """A module's imports cannot be followed (not found, not readable or not parseable)."""


def module_path(module: str, *, root: Path, packages: Sequence[str]) -> Path | None:
    """The file of project module ``module`` (``a.b`` → ``a/b.py`` or ``a/b/__init__.py``),
    ``None`` when it is not a module of ``packages`` under ``root``."""
    parts = module.split(".")
    if not parts or parts[0] not in packages or not all(p.isidentifier() for p in parts):
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(module: str, path: Path) -> str:
    """The package a module's relative imports start from."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve_relative(package: str, level: int, name: str | None) -> str | None:
    parts = package.split(".") if package else []
    if level - 1 > len(parts):
        return None
    base = parts[: len(parts) - (level - 1)]
    if name:
        base = [*base, *name.split(".")]
    return ".".join(base) or None


def _is_dynamic_import(node: ast.Call) -> bool:
    func = node.func
    name = (
        func.id
        if isinstance(func, ast.Name)
        else func.attr
        if isinstance(func, ast.Attribute)
        else None
    )
    return name in _DYNAMIC_IMPORTS


def _imported_names(module: str, path: Path, tree: ast.AST) -> tuple[set[str], bool]:
    """Candidate module names ``tree`` imports (not all need to exist), and whether it also
    imports by a computed name."""
    names: set[str] = set()
    dynamic = False
    package = _package_of(module, path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (
                _resolve_relative(package, node.level, node.module) if node.level else node.module
            )
            if base is None:
                continue
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            first = node.args[0] if node.args else None
            if (
                isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and not first.value.startswith(".")
            ):
                names.add(first.value)
            else:
                dynamic = True
    return names, dynamic


def _with_parents(name: str) -> Iterable[str]:
    parts = name.split(".")
    return (".".join(parts[: i + 1]) for i in range(len(parts)))


def _package_modules(package: str, directory: Path) -> Iterable[str]:
    """Every module under a package directory, as dotted names."""
    for path in sorted(directory.rglob("*.py")):
        rel = path.relative_to(directory).with_suffix("").parts
        if rel[-1] == "__init__":
            rel = rel[:-1]
        yield ".".join((package, *rel))


def reachable_modules(module: str, *, root: Path, packages: Sequence[str]) -> dict[str, Path]:
    """Project modules reachable from ``module`` through its imports, ``module`` and the
    ``__init__.py`` of the packages on the way included: dotted name → file.

    Raises :class:`UntraceableError` when ``module`` is not a project module or a reached
    module cannot be read or parsed."""
    if module_path(module, root=root, packages=packages) is None:
        raise UntraceableError(f"{module!r} is not a module of {list(packages)} under {root}")
    found: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        for candidate in _with_parents(name):
            if candidate in found:
                continue
            path = module_path(candidate, root=root, packages=packages)
            if path is None:
                continue
            found[candidate] = path
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (OSError, SyntaxError, ValueError) as exc:
                raise UntraceableError(f"cannot read the imports of {path}: {exc}") from exc
            imported, dynamic = _imported_names(candidate, path, tree)
            pending.extend(imported)
            if dynamic:
                package = _package_of(candidate, path)
                directory = module_path(package, root=root, packages=packages)
                if directory is not None:
                    pending.extend(_package_modules(package, directory.parent))
    return found


def fingerprint(module: str, *, root: Path, packages: Sequence[str]) -> str:
    """Hash of the files of :func:`reachable_modules` (relative paths and bytes)."""
    modules = reachable_modules(module, root=root, packages=packages)
    digest = hashlib.sha256()
    for path in sorted(modules.values()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError as exc:
            raise UntraceableError(f"cannot read {path}: {exc}") from exc
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def module_fingerprint(module: str) -> str:
    """Code version of one module of fedfuse: the hash of the project modules it reaches, or
    the package version + :func:`code_version` when its imports cannot be traced."""
    with _PARSE_LOCK:
        try:
            return f"m-{fingerprint(module, root=_ROOT, packages=_PACKAGES)}"
        except UntraceableError:
            return f"v-{package_version()}-{code_version()}"


def function_fingerprint(fn: Callable[..., Any]) -> str:
    """:func:`module_fingerprint` of the module defining ``fn``."""
    module = getattr(fn, "__module__", None)
    if not isinstance(module, str):
        return f"v-{package_version()}-{code_version()}"
    return module_fingerprint(module)


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def parameters_key(
    task_name: str, parameters: dict[str, Any], *, fn: Callable[..., Any] | None = None
) -> str:
    """Task name + code version + hashed parameters. The code version is ``fn``'s
    :func:`function_fingerprint` when given, else the whole tree's :func:`code_version`."""
    version = code_version() if fn is None else function_fingerprint(fn)
    payload = json.dumps(_jsonable(parameters), sort_keys=True, default=str)
    blob = f"{task_name}\n{version}\n{payload}".encode()
    return f"{task_name}-{hashlib.sha256(blob).hexdigest()[:32]}"


def content_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn``: task name + the task function's code + hashed parameters."""
    task = context.task
    fn = getattr(task, "fn", None)
    return parameters_key(task.name, parameters, fn=fn if callable(fn) else None)
