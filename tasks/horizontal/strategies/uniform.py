"""``uniform``: every party trains with η; w_k = 1 / K for the K accepted updates."""

from __future__ import annotations

from collections.abc import Mapping

from tasks.horizontal.strategies.base import Strategy, register


@register
class Uniform(Strategy):
    name = "uniform"
    description = "every party trains with η; accepted updates weighted equally"

    def weigh_counts(self, accepted: Mapping[str, int]) -> dict[str, float]:
        if not accepted:
            raise ValueError("no updates to weight")
        return {p: 1.0 / len(accepted) for p in accepted}
