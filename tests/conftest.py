from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import write_tiny


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    value = "test-secret-0123456789"
    monkeypatch.setenv("FEDFUSE_TEST_SECRET", value)
    return value


@pytest.fixture
def tiny_spec(tmp_path: Path) -> Path:
    return write_tiny(tmp_path)


@pytest.fixture
def tiny_table_spec(tmp_path: Path) -> Path:
    return write_tiny(tmp_path, with_text_events=False)
