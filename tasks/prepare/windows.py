"""Feature window lengths: whole days (``30``) or durations (``"10s"``, ``"15min"``, ``"6h"``).

A window is a whole number of one unit: ``ms``, ``s``, ``min``, ``h`` or ``d``, at least one
millisecond and at most :data:`MAX_WINDOW_DAYS` days. Its feature-name suffix is its length
in the largest unit that divides it exactly (``"24h"`` is ``1d``, ``"90min"`` stays ``90min``),
so every spelling of one length gives the same, stable name, and two spellings of one length
in a source are a duplicate. A whole-day window is written back to the spec as the int day
count (``"30d"`` is ``30``): int windows keep their names, values and cache keys.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

#: Microseconds in a day (timestamps are microsecond UTC datetimes).
DAY_US = 86_400_000_000

#: Units of a duration string, largest first, in microseconds.
UNIT_US: dict[str, int] = {
    "d": DAY_US,
    "h": 3_600_000_000,
    "min": 60_000_000,
    "s": 1_000_000,
    "ms": 1_000,
}

#: Longest window: 100 years of 365 days.
MAX_WINDOW_DAYS = 36_500

_DURATION = re.compile(r"([0-9]{1,12})(ms|s|min|h|d)")

#: A window as a spec writes it: a day count or a duration string.
WindowValue = int | str


@dataclass(frozen=True, order=True)
class Window:
    """One window length (ordered by length)."""

    micros: int

    @property
    def days(self) -> float:
        """The length in (fractional) days, the unit of rates and gaps."""
        return self.micros / DAY_US

    @property
    def suffix(self) -> str:
        """Feature-name suffix: the length in the largest unit dividing it (``30d``, ``10s``)."""
        for unit, size in UNIT_US.items():
            if self.micros % size == 0:
                return f"{self.micros // size}{unit}"
        raise AssertionError("a window is a whole number of milliseconds")  # pragma: no cover

    @property
    def spec_value(self) -> WindowValue:
        """How the validated spec holds it: the day count when whole days, else the suffix."""
        return self.micros // DAY_US if self.micros % DAY_US == 0 else self.suffix


def parse_window(value: object) -> Window:
    """A window from a spec value; ``ValueError`` (with a message naming the rule) otherwise.

    Never echoes a string it refuses beyond its length class (the spec is the user's own
    file, but a message stays short and bounded).
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(
            f'a window is a whole number of days or a duration string such as "10s", '
            f'"15min", "6h", "30d", not a {type(value).__name__}'
        )
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a window must be a positive number of days")
        micros = value * DAY_US if value <= MAX_WINDOW_DAYS else None
    else:
        found = _DURATION.fullmatch(value)
        if found is None:
            raise ValueError(
                "a duration must be a whole number followed by a unit ms, s, min, h or d "
                '(e.g. "500ms", "10s", "15min", "6h", "30d")'
            )
        count, unit = int(found.group(1)), found.group(2)
        if count == 0:
            raise ValueError("a window must be longer than zero")
        micros = count * UNIT_US[unit]
    if micros is None or micros > MAX_WINDOW_DAYS * DAY_US:
        raise ValueError(f"a window may be at most {MAX_WINDOW_DAYS} days (100 years)")
    return Window(micros)


def parse_windows(values: Sequence[object]) -> list[Window]:
    """Windows of a source, shortest first; the same length given twice is refused."""
    windows = [parse_window(v) for v in values]
    seen: dict[Window, int] = {}
    for i, window in enumerate(windows):
        if window in seen:
            raise ValueError(
                f"windows[{seen[window]}] and windows[{i}] are the same window "
                f"({window.suffix}); give each length once"
            )
        seen[window] = i
    return sorted(windows)
