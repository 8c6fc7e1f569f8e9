"""deployments/README.md's walkthrough on a port other than 4200, in the order it is written:
the port and API address set in a fresh profile, ``prefect server start`` with its UI, the
UI's settings pointing at that port, then ``fedfuse deploy`` and ``status`` reading the
address from the profile (``run`` and the rest: tests/test_run_checks.py, on the session's
server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.factories import write_tiny
from tests.prefect_server import free_port, server_env

pytestmark = pytest.mark.prefect

BIN = Path(sys.executable).parent


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bytes(response.read())


@contextmanager
def _walkthrough_server(env: dict[str, str], log: Path) -> Iterator[None]:
    """``prefect server start`` exactly as written (no flags: the port comes from the
    profile), stopped at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def _wait_healthy(url: str, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if _get(f"{url}/health"):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not healthy: {log.read_text()[-2000:]}")
        time.sleep(0.3)


def test_walkthrough_on_a_non_default_port(tmp_path: Path, secret: str) -> None:
    port = free_port()
    assert port != 4200
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = server_env(home)  # a fresh PREFECT_HOME (its own profile), no PREFECT_API_URL
    env.pop("PREFECT_SERVER_UI_ENABLED")  # the walkthrough's server serves its UI
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL")
    env.pop("PREFECT_SERVER_API_PORT", None)
    env["COLUMNS"] = "200"  # the tables' width in a pipe
    api = f"http://127.0.0.1:{port}/api"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )

    # 1. the port and API address in the profile, then the server
    setting = run(
        str(BIN / "prefect"),
        "config",
        "set",
        f"PREFECT_SERVER_API_PORT={port}",
        f"PREFECT_API_URL={api}",
    )
    assert setting.returncode == 0, setting.stderr
    log = tmp_path / "server.log"
    with _walkthrough_server(env, log):
        _wait_healthy(api, log)
        ui = json.loads(_get(f"http://127.0.0.1:{port}/ui-settings"))
        assert ui["api_url"] == api  # the UI calls this server, not port 4200
        assert b"<html" in _get(f"http://127.0.0.1:{port}/").lower()

        # 2.-6. (the secret is in the environment, as step 2 exports it)
        spec = write_tiny(tmp_path / "consortium", with_text_events=False)
        fedfuse = str(BIN / "fedfuse")
        deployed = run(fedfuse, "deploy", str(spec), "--name", "walk")
        assert deployed.returncode == 0, deployed.stderr
        assert "federated-training/walk" in deployed.stdout
        status = run(fedfuse, "status")
        assert status.returncode == 0, status.stderr
        assert "federated-training" in status.stdout
        lines = [line for line in status.stdout.splitlines() if "score/walk" in line]
        assert lines and "INACTIVE" in lines[0], status.stdout  # created inactive
        assert [line for line in status.stdout.splitlines() if "prepare/walk" in line]
