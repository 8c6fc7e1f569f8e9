from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from storage.store import (
    FileRef,
    IntegrityError,
    Store,
    UnverifiedError,
    fingerprint,
    read_table,
    read_verified_text,
)

FRAME = pl.DataFrame({"k": ["a", "b", "c"], "x": [1.0, 2.5, None]})


def test_local_store_writes_content_addressed_parquet(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "party"))
    ref = store.write_table(FRAME, "clean", "tx")
    data = (tmp_path / "party" / "clean" / f"tx-{ref.sha256[:12]}.parquet").read_bytes()
    assert ref.uri == str(tmp_path / "party" / "clean" / f"tx-{ref.sha256[:12]}.parquet")
    assert hashlib.sha256(data).hexdigest() == ref.sha256
    assert ref.rows == 3
    assert ref.columns == {"k": "String", "x": "Float64"}
    assert sorted(p.name for p in (tmp_path / "party").rglob("*")) == ["clean", Path(ref.uri).name]
    assert_frame_equal(read_table(ref, verify=True), FRAME)
    # same content, same name: idempotent
    assert store.write_table(FRAME, "clean", "tx") == ref


def test_memory_store_exact_paths() -> None:
    root = "memory://fedfuse-test-store/party-a"
    store = Store(root)
    ref = store.write_table(FRAME, "fused", "fused")
    report = store.write_json("reports", "quality.json", {"rows": 3})
    fs = fsspec.filesystem("memory")
    written = sorted(fs.find("/fedfuse-test-store/party-a"))
    assert written == [
        f"/fedfuse-test-store/party-a/fused/fused-{ref.sha256[:12]}.parquet",
        "/fedfuse-test-store/party-a/reports/quality.json",
    ]
    assert ref.uri == f"{root}/fused/fused-{ref.sha256[:12]}.parquet"
    assert report.uri == f"{root}/reports/quality.json"
    assert_frame_equal(read_table(ref, verify=True), FRAME)
    assert store.read_json("reports", "quality.json") == {"rows": 3}
    fs.rm("/fedfuse-test-store", recursive=True)


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer killed half-way leaves neither a partial table nor a temporary file."""

    def half_write(table: object, handle: BinaryIO, **_: object) -> None:
        handle.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr("storage.store.pq.write_table", half_write)
    store = Store(str(tmp_path))
    with pytest.raises(OSError, match="disk full"):
        store.write_table(FRAME, "clean", "broken")
    assert list((tmp_path / "clean").iterdir()) == []


def test_tampered_file_is_detected(tmp_path: Path) -> None:
    ref = Store(str(tmp_path)).write_table(FRAME, "clean", "tx")
    Path(ref.uri).write_bytes(b"not parquet")
    with pytest.raises(IntegrityError, match="content hash"):
        read_table(ref, verify=True)


def test_fingerprint_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "raw.csv"
    path.write_text("a,b\n1,2\n")
    ref = fingerprint(str(path))
    assert ref.sha256 == hashlib.sha256(b"a,b\n1,2\n").hexdigest()
    assert ref.size == 8
    with pytest.raises(FileNotFoundError, match=r"missing\.csv: no such file"):
        fingerprint(str(tmp_path / "missing.csv"))


def test_pipeline_steps_on_a_remote_file_system(tmp_path: Path, secret: str) -> None:
    """Party stores behind an fsspec URI (memory:// here, s3:// alike) need no code change."""
    from tasks.prepare.steps import (
        PartyContext,
        run_align,
        run_features,
        run_fuse,
        run_preprocess,
        secret_tag,
    )
    from tasks.spec.load import load_spec
    from tests.factories import write_tiny

    spec_path = write_tiny(tmp_path)
    spec_path.write_text(
        spec_path.read_text().replace('store = "stores/a"', 'store = "memory://fedfuse-remote/a"')
    )
    spec = load_spec(str(spec_path))
    ctx = PartyContext.from_spec(spec, "a")
    assert ctx.store == "memory://fedfuse-remote/a"
    aligned = []
    for source in spec.party("a").sources:
        emap = fingerprint(source.entity_map.path) if source.entity_map else None
        cleaned = run_preprocess(ctx, source, fingerprint(source.path), emap)
        aligned.append(
            run_align(ctx, source, run_features(ctx, source, cleaned), secret_tag(ctx.secret))
        )
    fused = run_fuse(ctx, aligned, [])
    assert fused.table.uri.startswith("memory://fedfuse-remote/a/fused/fused-")
    assert read_table(fused.table, verify=True).height == 4
    fs = fsspec.filesystem("memory")
    layers = {p.split("/")[3] for p in fs.find("/fedfuse-remote/a")}
    assert layers == {"clean", "features", "aligned", "fused", "rejected", "reports"}
    assert not (tmp_path / "stores" / "a").exists()
    fs.rm("/fedfuse-remote", recursive=True)


# --------------------------------------------------------------------------------------
# read_verified_text
# --------------------------------------------------------------------------------------

SECRET_LINE = "tree\nversion=v4\nleaf_value=0.125 -0.5\n"


def test_verified_text_on_a_remote_store() -> None:
    store = Store("memory://fedfuse-test-verified/coordinator")
    ref = store.write_text("models", "u.txt", SECRET_LINE)
    assert ref.uri == "memory://fedfuse-test-verified/coordinator/models/u.txt"
    assert read_verified_text(ref, max_bytes=ref.size) == SECRET_LINE
    with pytest.raises(UnverifiedError, match=rf"^update is {ref.size} bytes, limit 3$"):
        read_verified_text(ref, max_bytes=3)
    gone = ref.model_copy(update={"uri": ref.uri + ".missing"})
    with pytest.raises(UnverifiedError, match=r"^update file not found$"):
        read_verified_text(gone, max_bytes=100)
    fsspec.filesystem("memory").rm("/fedfuse-test-verified", recursive=True)


def test_verified_text_reads_at_most_max_bytes_plus_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even when the file system reports no (or a stale) size, at most max_bytes + 1 bytes
    are read: a huge file is never read whole."""
    path = tmp_path / "big.txt"
    with path.open("wb") as handle:
        handle.truncate(1 << 30)  # 1 GiB, sparse: nothing is written
    ref = FileRef(uri=str(path), sha256="0" * 64, size=1 << 30)
    with pytest.raises(UnverifiedError, match=r"^update is 1073741824 bytes, limit 1000$"):
        read_verified_text(ref, max_bytes=1000)  # refused by its size, before reading

    local = type(fsspec.filesystem("file"))
    monkeypatch.setattr(local, "info", lambda self, path, **kw: {"type": "file", "size": None})
    real_open = local.open
    read: list[int] = []

    def counting_open(self: Any, path: str, mode: str = "rb", **kw: Any) -> Any:
        handle = real_open(self, path, mode, **kw)
        real_read = handle.read

        def counted(n: int = -1) -> bytes:
            data: bytes = real_read(n)
            read.append(len(data))
            return data

        handle.read = counted
        return handle

    monkeypatch.setattr(local, "open", counting_open)
    with pytest.raises(UnverifiedError, match=r"^update is more than 1000 bytes, limit 1000$"):
        read_verified_text(ref, max_bytes=1000)
    assert sum(read) == 1001


def test_verified_text_messages_hold_no_content(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    ref = store.write_text("models", "u.txt", SECRET_LINE)
    Path(ref.uri).write_text(SECRET_LINE.replace("0.125", "9.125"))
    binary = store.write_bytes("models", "b.bin", b"\xff\xfe" + SECRET_LINE.encode())
    for bad, message in [
        (ref, "content does not match its sha256"),
        (binary, "not UTF-8 text"),
    ]:
        with pytest.raises(UnverifiedError) as info:
            read_verified_text(bad, max_bytes=1 << 20)
        assert str(info.value) == message
        assert "leaf_value" not in str(info.value)
        assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="max_bytes"):
        read_verified_text(ref, max_bytes=-1)


def test_fingerprint_with_roots_refuses_a_symlink_out(tmp_path: Path) -> None:
    from storage.files import ConfinementError

    root = tmp_path.resolve()
    (root / "a").mkdir()
    (root / "b").mkdir()
    (root / "b" / "orders.csv").write_text("id\nb1\n")
    (root / "a" / "own.csv").write_text("id\na1\n")
    (root / "a" / "link.csv").symlink_to(root / "b" / "orders.csv")
    own = fingerprint(str(root / "a" / "own.csv"), roots=[str(root / "a")])
    assert own.uri == str(root / "a" / "own.csv")
    assert own == fingerprint(str(root / "a" / "own.csv"))
    with pytest.raises(ConfinementError) as info:
        fingerprint(str(root / "a" / "link.csv"), roots=[str(root / "a")])
    assert str(info.value) == (
        f"{root}/a/link.csv leads to {root}/b/orders.csv, outside the folders {root}/a"
    )


def test_a_killed_writes_temporary_file_is_removed_at_the_next_write(tmp_path: Path) -> None:
    import os
    import time

    from storage.store import STALE_TMP_SECONDS, Store

    store = Store(str(tmp_path / "s"))
    store.write_json("reports", ".feature-schema.json", {"a": 1})
    folder = tmp_path / "s" / "reports"
    stale = folder / "..feature-schema.json.0123abcd.tmp"
    fresh = folder / "..feature-schema.json.4567ef01.tmp"
    other = folder / ".other.json.89ab.tmp"
    for path in (stale, fresh, other):
        path.write_text("half")
    old = time.time() - STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    store.write_json("reports", ".feature-schema.json", {"a": 2})
    assert not stale.exists()  # a killed write's leftover
    assert fresh.exists()  # maybe a write in flight elsewhere
    assert other.exists()  # another name's
    assert store.read_json("reports", ".feature-schema.json") == {"a": 2}


def test_a_layer_folder_linked_out_of_the_store_is_refused(tmp_path: Path) -> None:
    """``rejected/`` as a symlink into the coordinator's store: quarantined rows would land
    there; the write is refused naming the folder and where it leads, nothing is written."""
    import pytest

    from storage.files import ConfinementError
    from storage.store import Store

    coordinator = tmp_path / "coordinator"
    (coordinator / "reports").mkdir(parents=True)
    party = tmp_path / "site-a"
    party.mkdir()
    (party / "rejected").symlink_to(coordinator / "reports", target_is_directory=True)
    with pytest.raises(ConfinementError, match=r"rejected leads to .*coordinator/reports"):
        Store(str(party)).write_text("rejected", "rows.csv", "raw row")
    assert list((coordinator / "reports").iterdir()) == []
