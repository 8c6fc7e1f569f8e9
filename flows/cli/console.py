"""Console output and error reporting shared by the ``fedfuse`` commands
(:mod:`flows.cli.commands` and :mod:`flows.cli.ops_commands`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


def quiet_prefect() -> None:
    """Quiet console (full logs still reach the Prefect UI), no analytics, no telemetry."""
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _user_errors() -> tuple[type[BaseException], ...]:
    """The input errors, from the modules a spec's loading imports anyway; the flows' own
    (:func:`_flow_errors`) are matched only when none of these is (importing the flows
    takes seconds, which a spec or secret refused before any flow started need not wait)."""
    from storage.files import ConfinementError
    from storage.registry import RegistryError
    from storage.runs import RunChoiceError
    from storage.secrets import SecretError
    from storage.sources import SourceError
    from storage.store import FolderError, IntegrityError
    from tasks.prepare.align import AlignError
    from tasks.prepare.preprocess import PreprocessError
    from tasks.prepare.text_model import TextModelError
    from tasks.prepare.vocabulary import VocabularyError
    from tasks.spec.models import SpecError

    return (
        SpecError,
        SourceError,
        FolderError,
        PreprocessError,
        AlignError,
        SecretError,
        FileNotFoundError,
        ConfinementError,
        IntegrityError,
        RunChoiceError,
        VocabularyError,
        TextModelError,
        RegistryError,
    )


def _flow_errors() -> tuple[type[BaseException], ...]:
    from flows.prepare import PrepareError
    from flows.score import ScoringInputError

    return (PrepareError, ScoringInputError)


def _short_console_errors() -> None:
    """Prefect's console shows each failed task or flow as one line, without the traceback
    (the Prefect UI keeps the full logs); the steps skipped because an upstream one failed
    are not listed again."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()  # the handlers to shorten exist from here on (`import prefect` is lazy)

    for handler in logging.getLogger().handlers:
        if not isinstance(handler, PrefectConsoleHandler) or getattr(handler, "_short", False):
            continue
        base = handler.format

        def one_line(record: logging.LogRecord, base: Any = base) -> str:
            if record.levelno >= logging.ERROR and record.exc_info:
                record = logging.makeLogRecord({**record.__dict__, "exc_info": None})
                record.exc_text = None
            return str(base(record)).splitlines()[0]

        handler.format = one_line  # type: ignore[method-assign]
        handler.addFilter(lambda r: "Finished in state NotReady" not in r.getMessage())
        handler._short = True  # type: ignore[attr-defined]


@contextmanager
def reported() -> Iterator[None]:
    """Turn known input problems into a clear message and exit code 1 (no traceback)."""
    _short_console_errors()
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, _user_errors()) and not isinstance(exc, _flow_errors()):
            raise
        errors.print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True
        )
        raise typer.Exit(code=1) from None
