"""A source that is a folder of files: its content hash and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.files import ConfinementError
from storage.store import FolderError, fingerprint


def _folder(root: Path) -> Path:
    (root / "imgs" / "b").mkdir(parents=True)
    (root / "imgs" / "a.png").write_bytes(b"\x89PNG one")
    (root / "imgs" / "b" / "c.png").write_bytes(b"\x89PNG two")
    return root / "imgs"


def test_folder_hash_covers_names_and_bytes(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "x")
    ref = fingerprint(str(folder))
    assert ref.size == len(b"\x89PNG one") + len(b"\x89PNG two")
    assert fingerprint(str(folder)) == ref  # deterministic
    copy = _folder(tmp_path / "y")  # same files elsewhere: same hash
    assert fingerprint(str(copy)).sha256 == ref.sha256
    (copy / "b" / "c.png").rename(copy / "b" / "d.png")  # a renamed file changes it
    assert fingerprint(str(copy)).sha256 != ref.sha256
    (folder / "a.png").write_bytes(b"\x89PNG 0ne")  # so does one changed byte
    assert fingerprint(str(folder)).sha256 != ref.sha256


def test_empty_subfolders_do_not_count_but_files_do(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    before = fingerprint(str(folder)).sha256
    (folder / "empty").mkdir()
    assert fingerprint(str(folder)).sha256 == before
    (folder / "empty" / "new.png").write_bytes(b"")
    assert fingerprint(str(folder)).sha256 != before


def test_symlinks_in_a_folder_are_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "in")
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    (folder / "b" / "link.png").symlink_to(outside)
    with pytest.raises(FolderError, match=r"'b/link.png' is a symbolic link"):
        fingerprint(str(folder))


def test_a_link_to_a_folder_inside_is_refused_too(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "again").symlink_to(folder / "b")
    with pytest.raises(FolderError, match=r"'again' is a symbolic link"):
        fingerprint(str(folder))


def test_a_dangling_link_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "gone.png").symlink_to(tmp_path / "gone")
    with pytest.raises(FolderError, match=r"'gone.png' is a symbolic link"):
        fingerprint(str(folder))


def test_a_folder_outside_the_roots_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "elsewhere")
    (tmp_path / "store").mkdir()
    with pytest.raises(ConfinementError):
        fingerprint(str(folder), roots=[str(tmp_path / "store")])
    assert fingerprint(str(folder), roots=[str(tmp_path / "elsewhere")]).size > 0
