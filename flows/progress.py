"""In-process progress events, so the CLI can show a live display while flows run."""

from __future__ import annotations

import threading
from collections.abc import Callable

Listener = Callable[[str, str, str], None]
_listeners: list[Listener] = []
_lock = threading.Lock()


def subscribe(listener: Listener) -> Callable[[], None]:
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def emit(scope: str, step: str, detail: str = "") -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(scope, step, detail)
