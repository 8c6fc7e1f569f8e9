"""``cyclic``: one party per round adds its trees to the global model (weight 1, rate η),
taking turns in the spec's ``training.order`` or, without one, in an order shuffled by the
spec's seed (Flower's and NVFlare's cyclic mode). A party without training rows is skipped."""

from __future__ import annotations

import random
from collections.abc import Mapping

from tasks.horizontal.strategies.base import RoundPlan, Strategy, register


@register
class Cyclic(Strategy):
    name = "cyclic"
    description = "one party per round adds its trees, in turn"

    def turns(self, n_train: Mapping[str, int]) -> list[str]:
        eligible = self.eligible(n_train)
        if self.order is not None:
            unknown = sorted(set(self.order) - set(n_train))
            if unknown:
                raise ValueError(f"training.order names unknown parties {unknown}")
            return [p for p in self.order if p in eligible]
        order = sorted(eligible)
        random.Random(self.seed).shuffle(order)
        return order

    def plan(self, round_: int, n_train: Mapping[str, int]) -> RoundPlan:
        turns = self.turns(n_train)
        if not turns:
            return RoundPlan(round_, (), {})
        party = turns[(round_ - 1) % len(turns)]
        return RoundPlan(round_, (party,), {party: self.learning_rate})

    def weigh_counts(self, accepted: Mapping[str, int]) -> dict[str, float]:
        if len(accepted) != 1:
            raise ValueError(f"cyclic takes one update per round, got {len(accepted)}")
        return dict.fromkeys(accepted, 1.0)

    def max_trainers(self, n_train: Mapping[str, int]) -> int:
        return min(1, len(self.eligible(n_train)))
