"""Aggregation strategies, one module each, found by name (``training.aggregation``).

Adding a strategy is one module in this package with a :func:`~tasks.horizontal.strategies.base.register`
ed subclass of :class:`~tasks.horizontal.strategies.base.Strategy` (its ``weigh_counts`` and,
when they differ from the defaults, its learning rates and plan); it is imported here on
first use. The weights of a round's updates are computed here and nowhere else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence

from tasks.horizontal.strategies.base import STRATEGIES, RoundPlan, Strategy, register


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


def strategy_names() -> list[str]:
    _discover()
    return sorted(STRATEGIES)


def make_strategy(
    name: str, *, learning_rate: float, seed: int = 0, order: Sequence[str] | None = None
) -> Strategy:
    """The strategy named ``name`` with the spec's settings."""
    _discover()
    if name not in STRATEGIES:
        raise ValueError(f"unknown aggregation {name!r}; known: {sorted(STRATEGIES)}")
    return STRATEGIES[name](learning_rate=learning_rate, seed=seed, order=order)


__all__ = ["STRATEGIES", "RoundPlan", "Strategy", "make_strategy", "register", "strategy_names"]
