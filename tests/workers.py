"""Prefect process workers for integration tests, each in its own process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PREFECT = [sys.executable, "-m", "prefect"]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Workers stop on the second SIGTERM (the first starts a graceful shutdown)."""
    for _ in range(2):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def start_worker(
    pool: str, home: Path, secret: str, prefect_api: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start a ``prefect worker`` polling ``pool`` in its own process group."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_API_URL": prefect_api,
            "PREFECT_HOME": str(home),
            "FEDFUSE_TEST_SECRET": secret,
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO",  # "submitting flow run ..."
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }
    )
    log_path = home / "worker.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--name", pool],
            env=env,
            cwd=home,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log_path


@contextmanager
def running_worker(pool: str, home: Path, secret: str, prefect_api: str) -> Iterator[Path]:
    """A ``prefect worker`` polling ``pool`` (its own process group); yields its log file."""
    if home.exists():
        raise FileExistsError(home)
    proc, log_path = start_worker(pool, home, secret, prefect_api)
    try:
        yield log_path
    finally:
        stop(proc)
    if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
        print(log_path.read_text()[-3000:])
