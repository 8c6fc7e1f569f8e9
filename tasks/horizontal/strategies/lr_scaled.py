"""``lr_scaled`` (NVFlare bagging): party k trains with η · n_k / Σ n and the accepted
updates are summed (w_k = 1). With one tree per round this equals ``samples`` (leaf values
are linear in the learning rate); with several, each party takes smaller local steps. A
rejected party's update is missing from the sum (no renormalisation)."""

from __future__ import annotations

from collections.abc import Mapping

from tasks.horizontal.strategies.base import Strategy, register


@register
class LrScaled(Strategy):
    name = "lr_scaled"
    description = "party k trains with η·n_k/Σn; accepted updates summed"

    def learning_rates(self, n_train: Mapping[str, int]) -> dict[str, float]:
        total = sum(n_train.values())
        if total <= 0:
            raise ValueError("lr_scaled needs at least one training row")
        # a party without training rows never trains; give it a positive rate all the same
        return {p: self.learning_rate * max(n, 1) / total for p, n in n_train.items()}

    def weigh_counts(self, accepted: Mapping[str, int]) -> dict[str, float]:
        if not accepted:
            raise ValueError("no updates to weight")
        return dict.fromkeys(accepted, 1.0)
