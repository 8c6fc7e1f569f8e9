"""Cache keys cover a task's own code and what it imports, not the whole tree."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tasks import caching
from tasks.caching import (
    UntraceableError,
    code_version,
    content_cache_key,
    fingerprint,
    function_fingerprint,
    package_version,
    parameters_key,
    reachable_modules,
)
from tasks.horizontal import steps as train_steps
from tasks.vertical import psi_memory

ROOT = Path(caching.__file__).resolve().parent.parent
PACKAGES = ("tasks", "storage")


def _files(module: str) -> set[str]:
    found = reachable_modules(module, root=ROOT, packages=PACKAGES)
    return {path.relative_to(ROOT).as_posix() for path in found.values()}


def test_training_step_covers_what_it_imports() -> None:
    files = _files(train_steps.train_round.__module__)
    assert {
        "tasks/horizontal/steps.py",
        "tasks/horizontal/training.py",
        "tasks/horizontal/rounds.py",
        "storage/store.py",
        "tasks/__init__.py",
        "storage/__init__.py",
        "tasks/caching.py",
        "tasks/horizontal/strategies/__init__.py",
    } <= files
    # tasks.horizontal.strategies finds its strategies with importlib: all of them count.
    assert "tasks/horizontal/strategies/cyclic.py" in files
    assert "tasks/report.py" not in files
    assert "tasks/vertical/psi_curve.py" not in files


def test_psi_step_does_not_cover_report() -> None:
    files = _files(psi_memory.run_psi.__module__)
    assert "tasks/vertical/psi_memory.py" in files
    assert "tasks/vertical/psi_curve.py" in files
    assert "tasks/prepare/align.py" in files
    assert "tasks/report.py" not in files
    assert "tasks/horizontal/steps.py" not in files


def test_real_fingerprints() -> None:
    key = function_fingerprint(train_steps.train_round)
    assert key.startswith("m-")
    assert key == function_fingerprint(train_steps.compute_stats)  # same module
    assert key != function_fingerprint(psi_memory.run_psi)


def test_untraceable_function_falls_back_to_package_version() -> None:
    fallback = f"v-{package_version()}-{code_version()}"
    assert function_fingerprint(test_untraceable_function_falls_back_to_package_version) == (
        fallback
    )
    assert function_fingerprint(len) == fallback  # module "builtins"
    with pytest.raises(UntraceableError):
        reachable_modules("tasks.no_such_module", root=ROOT, packages=PACKAGES)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def fake_tree(tmp_path: Path) -> Path:
    _write(tmp_path / "pkg" / "__init__.py", "")
    _write(
        tmp_path / "pkg" / "a.py", "from pkg.b import helper\n\ndef run():\n    return helper()\n"
    )
    _write(tmp_path / "pkg" / "b.py", "def helper():\n    return 1\n")
    _write(tmp_path / "pkg" / "c.py", "def other():\n    return 2\n")
    return tmp_path


def test_fingerprint_follows_imports_only(fake_tree: Path) -> None:
    packages = ("pkg",)
    assert set(reachable_modules("pkg.a", root=fake_tree, packages=packages)) == {
        "pkg",
        "pkg.a",
        "pkg.b",
    }
    before = fingerprint("pkg.a", root=fake_tree, packages=packages)

    _write(fake_tree / "pkg" / "c.py", 'def other():\n    """Changed."""\n    return 3\n')
    assert fingerprint("pkg.a", root=fake_tree, packages=packages) == before

    _write(fake_tree / "pkg" / "b.py", "def helper():\n    return 42\n")
    assert fingerprint("pkg.a", root=fake_tree, packages=packages) != before


def test_import_forms(tmp_path: Path) -> None:
    _write(tmp_path / "pkg" / "__init__.py", "")
    _write(tmp_path / "pkg" / "sub" / "__init__.py", "")
    _write(tmp_path / "pkg" / "sub" / "deep.py", "")
    _write(tmp_path / "pkg" / "mod.py", "")
    _write(tmp_path / "pkg" / "lazy.py", "")
    _write(tmp_path / "pkg" / "rel.py", "")
    _write(tmp_path / "pkg" / "unused.py", "")
    _write(
        tmp_path / "pkg" / "main.py",
        "import os\n"
        "from pkg import mod, sub\n"
        "from .rel import thing\n"
        "\n"
        "def f():\n"
        "    from pkg.lazy import x\n"
        "    import pkg.sub.deep\n",
    )
    found = reachable_modules("pkg.main", root=tmp_path, packages=("pkg",))
    assert set(found) == {
        "pkg",
        "pkg.main",
        "pkg.mod",
        "pkg.sub",
        "pkg.sub.deep",
        "pkg.lazy",
        "pkg.rel",
    }
    assert found["pkg.sub"] == tmp_path / "pkg" / "sub" / "__init__.py"


def test_unparseable_module_is_untraceable(tmp_path: Path) -> None:
    _write(tmp_path / "pkg" / "__init__.py", "")
    _write(tmp_path / "pkg" / "a.py", "import pkg.broken\n")
    _write(tmp_path / "pkg" / "broken.py", "def (:\n")
    with pytest.raises(UntraceableError):
        fingerprint("pkg.a", root=tmp_path, packages=("pkg",))


def _context(name: str, fn: Any) -> Any:
    return SimpleNamespace(task=SimpleNamespace(name=name, fn=fn))


def test_content_cache_key_is_stable() -> None:
    fn = train_steps.train_round
    first = content_cache_key(_context("train-party", fn), {"round": 1, "rate": [0.1, 0.2]})
    again = content_cache_key(_context("train-party", fn), {"rate": [0.1, 0.2], "round": 1})
    assert isinstance(first, str)
    assert first == again
    assert first.startswith("train-party-")
    assert first != content_cache_key(_context("train-party", fn), {"round": 2})
    assert first == parameters_key("train-party", {"round": 1, "rate": (0.1, 0.2)}, fn=fn)
    # Without a function (flows/transport.py's callers): the whole-tree version, as before.
    assert parameters_key("train-party", {"round": 1}) != parameters_key(
        "train-party", {"round": 1}, fn=fn
    )


def test_content_cache_key_on_a_real_task() -> None:
    task = train_steps.train_party
    context = SimpleNamespace(task=task)
    assert content_cache_key(context, {"x": 1}) == parameters_key(
        task.name, {"x": 1}, fn=train_steps.train_round
    )


def test_module_fingerprints_from_many_threads_agree() -> None:
    """Prefect computes cache keys in its task runner's threads; fingerprints are computed
    one at a time (``ast.parse`` is not thread-safe on CPython 3.11) and agree."""
    from concurrent.futures import ThreadPoolExecutor

    modules = ["tasks.horizontal.steps", "tasks.vertical.steps", "tasks.prepare.steps"]
    caching.module_fingerprint.cache_clear()
    with ThreadPoolExecutor(6) as pool:
        found = list(pool.map(caching.module_fingerprint, modules * 4))
    assert all(f.startswith("m-") for f in found)
    caching.module_fingerprint.cache_clear()
    assert found[: len(modules)] == [caching.module_fingerprint(m) for m in modules]
