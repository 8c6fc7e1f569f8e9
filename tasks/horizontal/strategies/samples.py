"""``samples``: every party trains with η; w_k = n_k / Σ n (FedAvg weighting)."""

from __future__ import annotations

from collections.abc import Mapping

from tasks.horizontal.strategies.base import Strategy, register


@register
class Samples(Strategy):
    name = "samples"
    description = "every party trains with η; updates weighted by training rows"

    def weigh_counts(self, accepted: Mapping[str, int]) -> dict[str, float]:
        if not accepted:
            raise ValueError("no updates to weight")
        total = sum(accepted.values())
        if total <= 0 or any(n < 0 for n in accepted.values()):
            raise ValueError("sample-weighted aggregation needs at least one training row")
        return {p: n / total for p, n in accepted.items()}
