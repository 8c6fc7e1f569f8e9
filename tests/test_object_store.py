"""Stores and Prefect results on an S3-compatible object store.

The server is moto's S3 server (the ``moto[server]`` package) on 127.0.0.1, started by the
tests and always stopped. For the demo test it runs as its own process with IAM
authentication on: every store has its own bucket and its own credentials, and those
credentials open that bucket only."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage.files import (
    StorageOptionsError,
    clear_options,
    filesystem,
    register_options,
    registered_options,
    resolve_storage_options,
)
from storage.results import (
    DEFAULT_RESULTS,
    FedfuseResultStorage,
    block_name,
    result_storage,
)
from storage.store import Store, read_table
from tests.factories import write_synthetic

pytestmark = pytest.mark.prefect

BUCKETS = {"coordinator": "FEDFUSE_S3_COORDINATOR", "site-a": "FEDFUSE_S3_SITE_A"}
BUCKETS["site-b"] = "FEDFUSE_S3_SITE_B"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free local port, always stopped; the option registry and
    s3fs's instance cache are cleared afterwards."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        clear_options()
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


def _options(endpoint: str, bucket: str) -> dict[str, Any]:
    return {
        "key": f"key-{bucket}",
        "secret": f"secret-{bucket}",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


@pytest.fixture
def buckets(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """The three buckets, and each one's storage options as JSON in its own env variable."""
    import boto3

    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    options = {bucket: _options(s3_endpoint, bucket) for bucket in BUCKETS}
    for bucket, env in BUCKETS.items():
        opts = options[bucket]
        client = boto3.client(
            "s3",
            endpoint_url=s3_endpoint,
            aws_access_key_id=opts["key"],
            aws_secret_access_key=opts["secret"],
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=bucket)
        monkeypatch.setenv(env, json.dumps(opts))
    return options


def _s3_spec(root: Path) -> Path:
    """The synthetic consortium with raw exports local (import areas) and stores on S3."""
    spec = write_synthetic(root, customers=400)
    text = spec.read_text()
    stores = {
        'store = "stores/coordinator"': ("coordinator", "FEDFUSE_S3_COORDINATOR"),
        'store = "stores/p0"': ("site-a", "FEDFUSE_S3_SITE_A"),
        'store = "stores/p1"': ("site-b", "FEDFUSE_S3_SITE_B"),
    }
    for written, (bucket, env) in stores.items():
        assert text.count(written) == 1
        text = text.replace(
            written, f'store = "s3://{bucket}/store"\nstorage_options = {{ env = "{env}" }}'
        )
    text += '\n[run]\nresults = "s3://coordinator/results"\n'
    spec.write_text(text)
    return spec


def test_result_storage_is_a_path_locally_and_a_saved_block_without_options_for_uris(
    prefect_api: str,
) -> None:
    from prefect.filesystems import RemoteFileSystem

    assert result_storage(DEFAULT_RESULTS) == Path(DEFAULT_RESULTS)
    options = {"key": "key-hunter2", "secret": "secret-hunter2"}
    remote = result_storage("s3://coordinator/results", options)
    assert isinstance(remote, RemoteFileSystem)
    assert remote.basepath == "s3://coordinator/results"
    assert remote._block_document_id is not None  # Prefect takes saved blocks only
    assert remote.filesystem.storage_options["key"] == "key-hunter2"
    saved = FedfuseResultStorage.load(block_name("s3://coordinator/results"))
    assert isinstance(saved, FedfuseResultStorage)
    assert saved.settings == {}
    assert "hunter2" not in saved.model_dump_json()
    assert result_storage("s3://coordinator/results")._block_document_id == (  # type: ignore[union-attr]
        remote._block_document_id
    )


def test_registry_uses_the_longest_prefix_and_never_shows_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    try:
        register_options("s3://bucket", {"key": "outer"})
        register_options("s3://bucket/store/", {"key": "inner"})
        assert registered_options("s3://bucket/store/fused/x.parquet") == {"key": "inner"}
        assert registered_options("s3://bucket/storeroom/x") == {"key": "outer"}
        assert registered_options("s3://other/x") == {}
    finally:
        clear_options()
    monkeypatch.setenv("FEDFUSE_S3_BAD", "not-json-hunter2")
    with pytest.raises(StorageOptionsError) as info:
        resolve_storage_options(env="FEDFUSE_S3_BAD")
    assert "hunter2" not in str(info.value)
    monkeypatch.setenv("FEDFUSE_S3_BAD", '["hunter2"]')
    with pytest.raises(StorageOptionsError, match="not a JSON object"):
        resolve_storage_options(env="FEDFUSE_S3_BAD")
    monkeypatch.delenv("FEDFUSE_S3_BAD")
    assert resolve_storage_options(env="FEDFUSE_S3_BAD") == {}


def test_store_round_trips_on_s3_with_its_own_options(
    buckets: dict[str, dict[str, Any]],
) -> None:
    import polars as pl

    store = Store("s3://site-a/store", storage_options=buckets["site-a"])
    ref = store.write_table(pl.DataFrame({"x": [1, 2, 3]}), "fused", "t")
    assert ref.uri.startswith("s3://site-a/store/fused/t-")
    assert store.read_table(ref, verify=True)["x"].to_list() == [1, 2, 3]
    assert store.list("fused") == [ref.uri.rsplit("/", 1)[1]]
    # by uri alone: the registered options of the longest prefix
    register_options("s3://site-a/store", buckets["site-a"])
    assert read_table(ref)["x"].to_list() == [1, 2, 3]
    fs, _ = filesystem(ref.uri)
    assert fs.storage_options["key"] == "key-site-a"


def _files(bucket: str, options: dict[str, Any], prefix: str = "") -> list[str]:
    fs, _ = filesystem(f"s3://{bucket}", options)
    fs.invalidate_cache()
    return [str(p) for p in fs.find(f"{bucket}/{prefix}".rstrip("/"))]


def test_federated_training_on_s3_end_to_end(
    prefect_api: str, tmp_path: Path, secret: str, buckets: dict[str, dict[str, Any]]
) -> None:
    from flows.horizontal import federated_training

    spec = _s3_spec(tmp_path)
    result = federated_training(str(spec))
    assert result.rounds_run >= 1
    assert result.manifest.startswith("s3://coordinator/store/models/")
    assert result.model.startswith("s3://coordinator/store/models/")
    coordinator = _files("coordinator", buckets["coordinator"])
    assert result.manifest.removeprefix("s3://") in coordinator
    assert result.model.removeprefix("s3://") in coordinator
    # fused tables stay with their parties; no table of rows reaches the coordinator
    for bucket in ("site-a", "site-b"):
        fused = _files(bucket, buckets[bucket], "store/fused")
        assert [f for f in fused if f.endswith(".parquet")], bucket
    assert not [f for f in coordinator if f.endswith(".parquet")]
    # persisted Prefect task results are in the results location on S3
    assert _files("coordinator", buckets["coordinator"], "results")
    # stores and results nowhere locally
    assert not (tmp_path / "stores").exists()
    assert not list(tmp_path.rglob("results"))


# -- the whole demo on an authenticating server: a bucket and credentials per store ----------

DEMO_STORES = ("coordinator", "site-a", "site-b", "site-c")
#: Requests the server takes unauthenticated: exactly the setup below (per store: bucket,
#: user, policy, access key); every request after them is authenticated.
SETUP_REQUESTS = 4 * len(DEMO_STORES)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the S3 server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the S3 server did not start listening")


@pytest.fixture
def authenticating_s3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, dict[str, dict[str, Any]]]]:
    """An S3 server process enforcing IAM: one bucket per store, one user per bucket whose
    policy allows that bucket only; each store's options (its user's key) as JSON in its
    own env variable. Yields the endpoint and the options by store."""
    import boto3

    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)}
    log = (tmp_path / "s3-server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for_port(port, process)
        endpoint = f"http://127.0.0.1:{port}"
        admin = {
            "endpoint_url": endpoint,
            "region_name": "us-east-1",
            "aws_access_key_id": "setup",
            "aws_secret_access_key": "setup",
        }
        s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
        options: dict[str, dict[str, Any]] = {}
        for store in DEMO_STORES:
            s3.create_bucket(Bucket=store)
            iam.create_user(UserName=store)
            policy = {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Action": "s3:*",
                        "Resource": [f"arn:aws:s3:::{store}", f"arn:aws:s3:::{store}/*"],
                    }
                ],
            }
            iam.put_user_policy(UserName=store, PolicyName="own", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=store)["AccessKey"]
            options[store] = {
                "key": key["AccessKeyId"],
                "secret": key["SecretAccessKey"],
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            }
            monkeypatch.setenv(_env_of(store), json.dumps(options[store]))
        yield endpoint, options
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        clear_options()
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


def _env_of(store: str) -> str:
    return "FEDFUSE_S3_" + store.upper().replace("-", "_")


def _demo_on_s3(root: Path) -> Path:
    """The demo consortium with every store on its own bucket (options referenced by env
    variable, never inlined), the raw exports where they were written (each party's import
    area) and Prefect results on the coordinator's bucket."""
    from tasks.demo_data import write_demo_consortium

    spec = Path(write_demo_consortium(str(root), customers=1500))
    text = spec.read_text()
    for store in DEMO_STORES:
        written = f'store = "stores/{store}"\n'
        assert text.count(written) == 1, store
        area = "" if store == "coordinator" else f'imports = ["stores/{store}/raw"]\n'
        text = text.replace(
            written,
            f'store = "s3://{store}/store"\n'
            f'storage_options = {{ env = "{_env_of(store)}" }}\n{area}',
        )
    spec.write_text(text + '\n[run]\nresults = "s3://coordinator/results"\n')
    return spec


def test_the_demo_trains_and_predicts_on_an_object_store_with_a_bucket_and_key_per_store(
    prefect_api: str,
    tmp_path: Path,
    authenticating_s3: tuple[str, dict[str, dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``fedfuse train`` then ``fedfuse predict`` on the demo consortium, every store in its
    own bucket behind its own credentials: the run completes (so no step ever needed another
    store's credentials), models and results are on the coordinator's bucket, fused tables
    on the parties', no table of rows on the coordinator's, nothing written locally, and no
    credential in the spec or the Prefect database."""
    import boto3
    from botocore.exceptions import ClientError
    from typer.testing import CliRunner

    from flows.cli.app import app

    endpoint, options = authenticating_s3
    monkeypatch.setenv("FEDFUSE_SECRET", secrets.token_hex(32))
    spec = _demo_on_s3(tmp_path / "demo")
    runner = CliRunner()
    trained = runner.invoke(app, ["train", str(spec)])
    assert trained.exit_code == 0, trained.output
    out = tmp_path / "predictions.csv"
    predicted = runner.invoke(app, ["predict", str(spec), "--party", "site-a", "--out", str(out)])
    assert predicted.exit_code == 0, predicted.output
    assert out.stat().st_size > 0

    coordinator = _files("coordinator", options["coordinator"])
    assert any("/store/models/" in f and f.endswith(".json") for f in coordinator)
    assert _files("coordinator", options["coordinator"], "results")
    assert not [f for f in coordinator if f.endswith(".parquet") and "/fused/" in f]
    for party in ("site-a", "site-b", "site-c"):
        assert [f for f in _files(party, options[party], "store/fused") if f.endswith(".parquet")]
    assert not (tmp_path / "demo" / "stores" / "coordinator").exists()
    assert not list((tmp_path / "demo").rglob("fused"))

    # the credentials are separate: a party's key opens its own bucket and no other
    a = options["site-a"]
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=a["key"],
        aws_secret_access_key=a["secret"],
    )
    assert client.list_objects_v2(Bucket="site-a").get("KeyCount", 0) > 0
    for other in ("coordinator", "site-b"):
        with pytest.raises(ClientError, match="AccessDenied"):
            client.list_objects_v2(Bucket=other)
    # no secret key is written into the spec or reaches the Prefect database
    from prefect.settings import PREFECT_HOME

    home = Path(str(PREFECT_HOME.value()))
    database = b"".join(p.read_bytes() for p in sorted(home.glob("prefect.db*")) if p.is_file())
    assert database
    for store_options in options.values():
        assert store_options["secret"] not in spec.read_text()
        assert store_options["secret"].encode() not in database
