from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.factories import write_tiny
from tests.prefect_server import running_server

# module-scoped fixtures of the retry tests: each test file using one gets its own
from tests.retrying import clean_lossless, clean_model, clean_vertical, retry_pool  # noqa: F401

#: The files that run for minutes, longest first (the durations every run prints). They are
#: started first: the worker processes (``--dist loadfile``) take files in collection order,
#: and a long file taken last leaves one core busy and the other idle for its minutes.
LONG_FIRST = (
    "test_retry_party_worker.py",
    "test_deployments_vertical.py",
    "test_training_flow.py",
    "test_retry_modes.py",
    "test_deployments_pools.py",
    "test_lossless_pools.py",
    "test_walk.py",
    "test_vertical_flow.py",
    "test_object_store.py",
    "test_bad_updates.py",
    "test_parallel_prepare.py",
    "test_shards.py",
    "test_bench_public.py",
    "test_bench_prepare.py",
    "test_predict.py",
    "test_retry.py",
    "test_deployments.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long files first, in the order of :data:`LONG_FIRST`; the rest as collected."""
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def _prefect_logging() -> None:
    """Prefect's logging set up once, before any test: its console handler writes to the
    session's stderr, not to the stream of the first ``CliRunner.invoke`` (closed after it)."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """The CLI in process; it quiets Prefect through ``os.environ``, kept inside the test."""
    for name in (
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL",
        "PREFECT_SERVER_ANALYTICS_ENABLED",
        "DO_NOT_TRACK",
    ):
        monkeypatch.setenv(name, os.environ.get(name, "WARNING" if "LEVEL" in name else "false"))
    return CliRunner()


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    value = "0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("FEDFUSE_TEST_SECRET", value)
    return value


@pytest.fixture
def tiny_spec(tmp_path: Path) -> Path:
    return write_tiny(tmp_path)


@pytest.fixture
def tiny_table_spec(tmp_path: Path) -> Path:
    return write_tiny(tmp_path, with_text_events=False)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Opt-in: a real Prefect server for the whole session, the client pointed at it; it
    serves the UI too (``tests/test_ui_browser.py`` opens it in a browser)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_HOME,
        temporary_settings,
    )

    home = tmp_path_factory.mktemp("prefect-home")
    with (
        running_server(home, ui=True) as url,
        temporary_settings(
            {PREFECT_API_URL: url, PREFECT_HOME: str(home), PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
        ),
    ):
        yield url
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # deliver pending run logs before the server stops
