"""Which code is running: the installed package's version and, for a git checkout, its
commit (for the model card). Never fails: what cannot be told is ``None``."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

#: The checkout the package runs from, when it runs from one.
CHECKOUT = Path(__file__).resolve().parent.parent


def package_version(package: str = "fedfuse") -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit(root: Path = CHECKOUT) -> str | None:
    """The commit of the checkout at ``root`` (``None`` without git or outside a checkout);
    a checkout with uncommitted changes gets ``+dirty``."""
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if len(head) != 40:
        return None
    return f"{head}+dirty" if dirty else head
