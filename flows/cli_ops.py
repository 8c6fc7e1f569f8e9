"""Operations commands (deploy, serve, run, status) registered on the ``fedfuse`` CLI."""

from __future__ import annotations
