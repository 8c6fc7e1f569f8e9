"""A source that is a folder of files: its content hash, its listing and what they refuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.files import ConfinementError
from storage.sources import SourceError, read_folder, read_source
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
    with pytest.raises(FolderError, match=r"holds a symbolic link or an entry leading outside"):
        fingerprint(str(folder))


def test_a_link_to_a_folder_inside_is_refused_too(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "again").symlink_to(folder / "b")
    with pytest.raises(FolderError, match=r"holds a symbolic link or an entry leading outside"):
        fingerprint(str(folder))


def test_a_dangling_link_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "gone.png").symlink_to(tmp_path / "gone")
    with pytest.raises(FolderError, match=r"holds a symbolic link or an entry leading outside"):
        fingerprint(str(folder))


def test_a_folder_outside_the_roots_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "elsewhere")
    (tmp_path / "store").mkdir()
    with pytest.raises(ConfinementError):
        fingerprint(str(folder), roots=[str(tmp_path / "store")])
    assert fingerprint(str(folder), roots=[str(tmp_path / "elsewhere")]).size > 0


def test_read_folder_lists_matching_files_sorted_and_reads_them_on_demand(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "notes.txt").write_text("left out by the pattern")
    listing = read_folder(str(folder), "*.png")
    assert [(f.path, f.size) for f in listing.files] == [("a.png", 8), ("b/c.png", 8)]
    (folder / "a.png").write_bytes(b"\x89PNG 1")  # read when asked, not when listed
    assert [f.read() for f in listing.files] == [b"\x89PNG 1", b"\x89PNG two"]
    assert [f.path for f in read_folder(str(folder)).files] == ["a.png", "b/c.png", "notes.txt"]
    assert [f.path for f in read_folder(str(folder), "b/*").files] == ["b/c.png"]


def test_read_folder_refuses_a_missing_folder_a_file_and_no_match(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    with pytest.raises(SourceError, match=r"nowhere: source folder not found$"):
        read_folder(str(tmp_path / "nowhere"))
    with pytest.raises(SourceError, match=r"a.png: is a file, expected a folder of files$"):
        read_folder(str(folder / "a.png"))
    with pytest.raises(SourceError, match=r"folder holds no file matching '\*.txt' \(2 file"):
        read_folder(str(folder), "*.txt")
    with pytest.raises(SourceError, match=r"imgs: is a folder, expected a file$"):
        read_source(str(folder), "csv")  # a file kind's reader refuses a folder


def test_read_folder_limits_the_file_count_and_each_file_size(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    with pytest.raises(SourceError, match=r"holds 2 files matching '\*', more than the limit of 1"):
        read_folder(str(folder), max_files=1)
    small, big = read_folder(str(folder), max_bytes=8).files
    (folder / "b" / "c.png").write_bytes(b"\x89PNG two, now longer")  # grew since listed
    assert not big.oversized
    with pytest.raises(
        SourceError, match=r"file 2 \(in path order\) grew over the limit of 8 bytes"
    ):
        big.read()
    (big,) = read_folder(str(folder), "b/*", max_bytes=8).files
    assert big.oversized
    with pytest.raises(
        SourceError, match=r"file 1 \(in path order\) holds 20 bytes, over the limit of 8"
    ):
        big.read()
    assert small.read() == b"\x89PNG one"


def test_read_folder_refuses_links_and_escapes_naming_the_entry(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "in")
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    for pattern in ("../*", "b/../../*", "/etc/*"):
        with pytest.raises(SourceError, match=r"file pattern .* leads outside the folder"):
            read_folder(str(folder), pattern)
    (folder / "b" / "link.png").symlink_to(outside)
    with pytest.raises(SourceError, match=r"holds a symbolic link or an entry leading outside"):
        read_folder(str(folder))
    (folder / "b" / "link.png").unlink()
    (file,) = read_folder(str(folder), "b/*").files
    (folder / "b" / "c.png").unlink()  # swapped for a link after the listing
    (folder / "b" / "c.png").symlink_to(outside)
    with pytest.raises(
        SourceError, match=r"file 1 \(in path order\) (is a symbolic link|leads outside)"
    ):
        file.read()
