"""The in-memory reference loop of gradient rounds: every party's step and the label
party's in one process (tests, benchmarks), resumable from a label state and party models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tasks.horizontal.training import evaluate
from tasks.spec.models import FusionSpec, TrainingSpec
from tasks.types import Objective
from tasks.vertical.data import LabelData, PartyBlock, check_block, tile_base
from tasks.vertical.party_model import PartyModel, party_model_text, score_block, train_party_round
from tasks.vertical.rounds import (
    DEFAULT_COMBINE,
    Combine,
    LabelState,
    combine_round,
    finish,
    gradient_message,
    next_round_allowed,
    start_label_state,
)


@dataclass(frozen=True)
class VerticalRun:
    """Result of :func:`train_vertical_rounds`: the label state and every party's model."""

    state: LabelState
    models: dict[str, PartyModel]
    test: dict[str, float]


def predict_rounds(
    state: LabelState,
    models: Mapping[str, PartyModel],
    blocks: Mapping[str, np.ndarray],
    *,
    upto_round: int | None = None,
) -> np.ndarray:
    """F_0 + Σ_p c_p · model_p(block_p) at the best round (aligned blocks, all parties)."""
    p = state.progress
    r = p.best_round if upto_round is None else upto_round
    n = next(iter(blocks.values())).shape[0]
    out = tile_base(p.base_score, n, p.num_class)
    for party in p.parties:
        text = party_model_text(models[party], r)
        out = out + p.coefficients[party] * score_block(text, blocks[party], p.num_class)
    return out


def train_vertical_rounds(
    labels: LabelData,
    blocks: Mapping[str, PartyBlock],
    *,
    spec: TrainingSpec,
    objective: Objective,
    num_class: int,
    fusion: FusionSpec | None = None,
    combine: Combine = DEFAULT_COMBINE,
    state: LabelState | None = None,
    models: Mapping[str, PartyModel] | None = None,
    stop_after: int | None = None,
) -> VerticalRun:
    """The in-memory reference loop of gradient rounds; resumes from ``state``/``models``.

    ``stop_after`` ends the call after that round (as a killed run would) without marking the
    run stopped. Test metrics use the best round when ``labels.y_test`` and the blocks'
    ``X_test`` are given.
    """
    for block in blocks.values():
        check_block(block, labels)
    parties = list(blocks)
    if state is None:
        state = start_label_state(
            labels,
            parties=parties,
            objective=objective,
            num_class=num_class,
            patience=spec.patience,
            weights=None if fusion is None else fusion.weights,
            combine=combine,
        )
    current = {p: PartyModel(party=p, num_class=num_class) for p in parties}
    current.update(models or {})
    while next_round_allowed(state, spec) is None:
        if stop_after is not None and state.progress.round >= stop_after:
            return VerticalRun(state=state, models=current, test={})
        message = gradient_message(state, labels)
        deltas = []
        for party in parties:
            current[party], delta = train_party_round(
                current[party],
                blocks[party],
                message,
                spec=spec,
                objective=objective,
                num_class=num_class,
            )
            deltas.append(delta)
        state = combine_round(state, deltas, labels, min_parties=spec.min_parties)
    state = finish(state, spec)
    test: dict[str, float] = {}
    if labels.y_test is not None and all(b.X_test is not None for b in blocks.values()):
        raw = predict_rounds(
            state, current, {p: b.X_test for p, b in blocks.items() if b.X_test is not None}
        )
        test = evaluate(labels.y_test, raw, objective, num_class)
    return VerticalRun(state=state, models=current, test=test)
