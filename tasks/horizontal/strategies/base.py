"""The strategy interface: who trains a round, at what learning rate, and how the
coordinator weights the accepted updates (in the style of Flower's ``Strategy``).

A strategy is one module of :mod:`tasks.horizontal.strategies` with one class decorated with
:func:`register`; the spec's ``training.aggregation`` names it. Everything here is pure.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar


@dataclass(frozen=True)
class RoundPlan:
    """What a strategy asks of one round: the parties that train and their learning rates."""

    round: int
    parties: tuple[str, ...]
    learning_rates: Mapping[str, float]


class Strategy(ABC):
    """One aggregation strategy. ``n_train`` maps every party to its training rows; a party
    without rows never trains."""

    name: ClassVar[str]
    #: One line for the docs and ``fedfuse validate``.
    description: ClassVar[str]

    def __init__(
        self, *, learning_rate: float, seed: int = 0, order: Sequence[str] | None = None
    ) -> None:
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}")
        self.learning_rate = learning_rate
        self.seed = seed
        self.order = list(order) if order else None

    def eligible(self, n_train: Mapping[str, int]) -> list[str]:
        return [p for p, n in n_train.items() if n > 0]

    def learning_rates(self, n_train: Mapping[str, int]) -> dict[str, float]:
        """Local learning rate per party (default: the spec's η everywhere)."""
        return dict.fromkeys(n_train, self.learning_rate)

    def plan(self, round_: int, n_train: Mapping[str, int]) -> RoundPlan:
        """Round ``round_``'s trainers (default: every party with training rows)."""
        parties = tuple(self.eligible(n_train))
        rates = self.learning_rates(n_train)
        return RoundPlan(round_, parties, {p: rates[p] for p in parties})

    def weights(self, accepted: Mapping[str, int]) -> dict[str, float]:
        """Weights w_k of a round's accepted updates (party -> training rows)."""
        if any(n < 0 for n in accepted.values()):
            raise ValueError(f"negative sample counts: {dict(accepted)}")
        return self.weigh_counts(accepted)

    @abstractmethod
    def weigh_counts(self, accepted: Mapping[str, int]) -> dict[str, float]:
        """The strategy's weights of accepted updates with non-negative training rows."""

    def max_trainers(self, n_train: Mapping[str, int]) -> int:
        """At most this many updates per round (the tree budget counts with it)."""
        return len(self.eligible(n_train))


S = TypeVar("S", bound=type[Strategy])
STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: S) -> S:
    """Class decorator: make a strategy available under its ``name``."""
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise ValueError(f"two strategies are named {cls.name!r}")
    STRATEGIES[cls.name] = cls
    return cls
