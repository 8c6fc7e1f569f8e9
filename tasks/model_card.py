"""The model card of a finished training run (both layouts): where the model comes from.

Built by pure functions from what the training already records (its run key, the parties'
fused table references, the round records of the checkpoint or the vertical rounds, the
metrics), so the card says nothing the run did not: run key, spec hash, code version, the
content hash and row count of every fused table, the rounds with the updates they accepted
and the ones they rejected (and why), the stop reason and the final metrics. Counts, hashes
and ids of the spec only: no row, no entity id.

:func:`card_markdown` renders the card for the UI; the JSON next to the exported model is
the card itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, Field

from storage.store import TableRef
from tasks.horizontal.rounds import STOP_TEXT
from tasks.horizontal.steps import RoundAggregate
from tasks.report import markdown_table, metric_rows
from tasks.spec.models import FedSpec


class CodeVersion(BaseModel):
    """The code that trained the model."""

    package: str = "fedfuse"
    version: str | None = Field(default=None, description="Installed package version")
    commit: str | None = Field(default=None, description="Git commit of the checkout, if any")

    def text(self) -> str:
        version = self.version or "unknown version"
        return f"{self.package} {version}" + (f" (commit {self.commit})" if self.commit else "")


class CardParty(BaseModel):
    """A party as the card lists it: its fused table by content hash and its row counts."""

    party: str
    fused_sha256: str | None = Field(default=None, description="Content hash of its fused table")
    fused_rows: int | None = Field(default=None, description="Rows of its fused table")
    split_rows: dict[str, int] = Field(
        default_factory=dict, description="Rows per split (train, valid, test), when recorded"
    )
    left_out: str | None = Field(default=None, description="Why it took no part in training")


class CardRound(BaseModel):
    """One round: the updates it accepted (with their weights, when averaged) and the
    parties it left out, with the reason."""

    round: int
    accepted: list[str]
    weights: dict[str, float] = Field(default_factory=dict)
    rejected: dict[str, str] = Field(default_factory=dict)
    valid: dict[str, float] = Field(default_factory=dict, description="Validation metrics")


class ModelCard(BaseModel):
    """The lineage of a trained model."""

    layout: Literal["horizontal", "lossless", "vertical"]
    consortium: str
    run_key: str
    spec_identity: str = Field(description="Consortium name plus fingerprint (models/runs.json)")
    spec_hash: str = Field(description="sha256 of the validated spec (canonical JSON)")
    code: CodeVersion
    parties: list[CardParty]
    label_party: str | None = None
    rounds: list[CardRound]
    rounds_run: int
    best_round: int
    stop_reason: str | None = None
    stop_text: str | None = None
    final_metrics: dict[str, dict[str, float]] = Field(
        description="Metrics of the exported model: 'valid' (at the best round) and 'test'"
    )
    notes: list[str] = Field(default_factory=list)


def spec_hash(spec: FedSpec) -> str:
    """sha256 of the validated spec as canonical JSON (sorted keys)."""
    body = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def _parties(
    parties: Sequence[str],
    fused: Mapping[str, TableRef],
    split_rows: Mapping[str, Mapping[str, int]],
    left_out: Mapping[str, str],
) -> list[CardParty]:
    return [
        CardParty(
            party=p,
            fused_sha256=fused[p].sha256 if p in fused else None,
            fused_rows=fused[p].rows if p in fused else None,
            split_rows=dict(split_rows.get(p, {})),
            left_out=left_out.get(p),
        )
        for p in parties
    ]


def _best(history: Sequence[Mapping[str, float]], best_round: int) -> dict[str, float]:
    return dict(history[best_round - 1]) if 0 < best_round <= len(history) else {}


def horizontal_card(
    *,
    spec: FedSpec,
    identity: str,
    code: CodeVersion,
    run_key: str,
    lossless: bool,
    fused: Mapping[str, TableRef],
    split_rows: Mapping[str, Mapping[str, int]],
    left_out: Mapping[str, str],
    rounds: Sequence[RoundAggregate],
    valid: Sequence[Mapping[str, float]],
    best_round: int,
    rounds_run: int,
    stop_reason: str | None,
    test: Mapping[str, float],
) -> ModelCard:
    """The card of a horizontal run (averaging rounds, or lossless mode's one model)."""
    cards = [
        CardRound(
            round=r.round,
            accepted=[m.party for m in r.members],
            weights={m.party: m.weight for m in r.members},
            rejected=dict(r.dropped),
            valid=dict(valid[r.round - 1]) if 0 < r.round <= len(valid) else {},
        )
        for r in rounds
    ]
    parties = [p.id for p in spec.parties]
    notes = (
        ["lossless mode: one LightGBM model trained data-parallel over every party's rows"]
        if lossless
        else []
    )
    return ModelCard(
        layout="lossless" if lossless else "horizontal",
        consortium=spec.consortium.name,
        run_key=run_key,
        spec_identity=identity,
        spec_hash=spec_hash(spec),
        code=code,
        parties=_parties(parties, fused, split_rows, left_out),
        rounds=cards,
        rounds_run=rounds_run,
        best_round=best_round,
        stop_reason=stop_reason,
        stop_text=STOP_TEXT.get(stop_reason, stop_reason) if stop_reason else None,
        final_metrics={"valid": _best(valid, best_round), "test": dict(test)},
        notes=notes,
    )


def vertical_card(
    *,
    spec: FedSpec,
    identity: str,
    code: CodeVersion,
    run_key: str,
    label_party: str,
    mode: str,
    fused: Mapping[str, TableRef],
    overlap: int,
    accepted: Mapping[int, Sequence[str]],
    rejected: Mapping[int, Mapping[str, str]],
    valid: Sequence[Mapping[str, float]],
    best_round: int,
    rounds_run: int,
    stop_reason: str | None,
    test: Mapping[str, float],
) -> ModelCard:
    """The card of a vertical run: every party's block, the rounds its parties took part
    in (rounds resumed from an earlier call are listed with their metrics only)."""
    parties = [p.id for p in spec.parties]
    numbers = range(1, len(valid) + 1) if mode != "one_shot" else range(1, 2)
    cards = [
        CardRound(
            round=t,
            accepted=list(accepted.get(t, parties if mode == "one_shot" else [])),
            rejected=dict(rejected.get(t, {})),
            valid=dict(valid[t - 1]) if t <= len(valid) else {},
        )
        for t in numbers
    ]
    notes = [f"mode {mode}; entities at every party (PSI): {overlap}"]
    unrecorded = [t for t in numbers if mode != "one_shot" and t not in accepted]
    if unrecorded:
        notes.append(
            f"rounds {unrecorded[0]}-{unrecorded[-1]} ran in an earlier call of this run: "
            "their party lists are not recorded"
        )
    return ModelCard(
        layout="vertical",
        consortium=spec.consortium.name,
        run_key=run_key,
        spec_identity=identity,
        spec_hash=spec_hash(spec),
        code=code,
        parties=_parties(parties, fused, {}, {}),
        label_party=label_party,
        rounds=cards,
        rounds_run=rounds_run,
        best_round=best_round,
        stop_reason=stop_reason,
        stop_text=STOP_TEXT.get(stop_reason, stop_reason) if stop_reason else None,
        final_metrics={"valid": _best(valid, best_round), "test": dict(test)},
        notes=notes,
    )


def _cell(text: object) -> str:
    """A Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|") or "-"


def card_markdown(card: ModelCard, *, files: Mapping[str, str] | None = None) -> str:
    """The card as Markdown (the UI's model-card artifact)."""
    lines = [
        f"# Model card: `{_cell(card.consortium)}` ({card.layout})",
        "",
        f"- run key: `{card.run_key}`",
        f"- spec: `{_cell(card.spec_identity)}`, sha256 `{card.spec_hash}`",
        f"- code: {_cell(card.code.text())}",
        f"- rounds run: {card.rounds_run}; best round: {card.best_round}",
        f"- stopped: {_cell(card.stop_text or 'not stopped early')}",
        *([f"- label party: {_cell(card.label_party)}"] if card.label_party else []),
        *(f"- {_cell(n)}" for n in card.notes),
        "",
        "## Parties",
        "",
        *markdown_table(
            [
                {
                    "party": _cell(p.party),
                    "fused table sha256": f"`{p.fused_sha256}`" if p.fused_sha256 else "-",
                    "fused rows": str(p.fused_rows) if p.fused_rows is not None else "-",
                    "train / valid / test": " / ".join(
                        str(p.split_rows.get(s, "-")) for s in ("train", "valid", "test")
                    )
                    if p.split_rows
                    else "-",
                    "left out": _cell(p.left_out or "-"),
                }
                for p in card.parties
            ]
        ),
    ]
    if card.rounds:
        lines += [
            "",
            "## Rounds",
            "",
            *markdown_table(
                [
                    {
                        "round": str(r.round) + (" (best)" if r.round == card.best_round else ""),
                        "accepted": _cell(
                            ", ".join(
                                f"{p} ({r.weights[p]:.3f})" if p in r.weights else p
                                for p in r.accepted
                            )
                            or "-"
                        ),
                        "rejected": _cell(
                            "; ".join(f"{p}: {why}" for p, why in r.rejected.items()) or "-"
                        ),
                    }
                    for r in card.rounds
                ]
            ),
        ]
    finals = [(split, m) for split, m in card.final_metrics.items() if m]
    if finals:
        lines += ["", "## Final metrics", "", *markdown_table(metric_rows(finals))]
    if files:
        lines += ["", "## Files (coordinator store)", ""]
        lines += [f"- {_cell(what)}: `{_cell(where)}`" for what, where in files.items()]
    return "\n".join(lines) + "\n"
