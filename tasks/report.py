"""Training report: comparison table, per-round plot, feature importance by party and modality;
the per-party metrics table, the training progress line and the data quality table.

Pure functions: figures come back as PNG bytes and the report as Markdown text; the flow
writes them to the coordinator store and publishes them as Prefect artifacts (the UI's copy
of the report carries its plots inline, as ``data:`` URIs, since the UI cannot reach a store).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, Field

from tasks.horizontal.ensemble import GlobalEnsemble
from tasks.horizontal.model_text import load_booster
from tasks.prepare.design import FeatureSchema
from tasks.prepare.preprocess import QualityReport
from tasks.types import Objective

HEADLINE = {"binary": "auc", "multiclass": "accuracy", "regression": "rmse"}

#: A table artifact's cell without a figure (the UI reads a bare ``-`` as a list bullet).
NO_FIGURE = "–"

#: Column titles of metrics whose key alone would not say what they are.
METRIC_TITLES = {
    "auc_bound": "auc ± (binned)",
    "auc_weighted_mean": "auc (size-weighted mean)",
}

#: What the AUC columns of an aggregate row mean (the report and the CLI print it).
AUC_NOTE = (
    "auc of an aggregate row is the AUC over the pooled test rows of every party "
    "(multiclass: one-vs-rest macro), computed from the parties' summed per-label "
    "histograms of predicted probabilities on 2^14 bins; it is within auc ± (half the "
    "share of positive-negative pairs sharing a bin) of the exact pooled AUC. "
    "auc (size-weighted mean) is the mean of the parties' own AUCs weighted by test "
    "rows, leaving out parties with one class; a party row's auc is on its own test rows."
)


#: Why a vertical run's AUC needs no histograms (its report and the CLI print it).
VERTICAL_AUC_NOTE = (
    "auc is on the label party's test rows: it holds every label and the fused score of "
    "every aligned entity, so this is already the AUC of the pooled test rows."
)


def metric_title(name: str) -> str:
    return METRIC_TITLES.get(name, name)


def format_metric(name: str, value: float, digits: int = 4) -> str:
    """A metric as shown: the AUC bound in two significant digits, the rest fixed."""
    return f"{value:.1e}" if name == "auc_bound" else f"{value:.{digits}f}"


def significant(value: float, digits: int = 4) -> str:
    """A figure rounded to ``digits`` significant digits (``NaN`` shown as such)."""
    return "NaN" if math.isnan(value) else f"{value:.{digits}g}"


def has_pooled_auc(models: Sequence[Mapping[str, float]]) -> bool:
    return any("auc_bound" in m or "auc_weighted_mean" in m for m in models)


class Comparison(BaseModel):
    """Test metrics of the federated model and its baselines (same parameters, tree budget)."""

    federated: dict[str, float]
    federated_by_party: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="The federated model on each party's own test rows (the rows its "
        "local-only model is scored on)",
    )
    local_only: dict[str, dict[str, float]] = Field(default_factory=dict)
    local_only_mean: dict[str, float] = Field(default_factory=dict)
    centralised: dict[str, float] = Field(default_factory=dict)


def importance_by_party_modality(
    ensemble: GlobalEnsemble, schema: FeatureSchema, *, upto_round: int | None = None
) -> dict[str, dict[str, float]]:
    """Share of total split gain, by the party whose trees made the split and the feature's
    modality (weights applied)."""
    names = ensemble.feature_names
    out: dict[str, dict[str, float]] = {}
    for members in ensemble.rounds[: ensemble.resolve_round(upto_round)]:
        for party, weight, text in members:
            gains = load_booster(text).feature_importance(importance_type="gain")
            row = out.setdefault(party, {})
            for name, gain in zip(names, gains, strict=True):
                modality = schema.modality.get(name, "other")
                row[modality] = row.get(modality, 0.0) + abs(weight) * float(gain)
    total = sum(v for row in out.values() for v in row.values()) or 1.0
    return {p: {m: v / total for m, v in sorted(row.items())} for p, row in sorted(out.items())}


def _png(fig: object) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return buffer.getvalue()


def plot_rounds(
    valid: Sequence[Mapping[str, float]], *, objective: Objective, best_round: int
) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = HEADLINE[objective]
    loss = "rmse" if objective == "regression" else "logloss"
    rounds = np.arange(1, len(valid) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(rounds, [v.get(loss, np.nan) for v in valid], marker="o", label=f"valid {loss}")
    ax.set_xlabel("round")
    ax.set_ylabel(loss)
    if metric != loss:
        twin = ax.twinx()
        twin.plot(
            rounds,
            [v.get(metric, np.nan) for v in valid],
            color="tab:orange",
            marker="s",
            label=f"valid {metric}",
        )
        twin.set_ylabel(metric)
    if best_round:
        ax.axvline(best_round, color="grey", linestyle="--", linewidth=1)
    ax.set_title("Aggregated validation metrics per round")
    fig.legend(loc="upper right", fontsize=8)
    return _png(fig)


def plot_importance(importance: Mapping[str, Mapping[str, float]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parties = list(importance)
    modalities = sorted({m for row in importance.values() for m in row})
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bottom = np.zeros(len(parties))
    for modality in modalities:
        values = np.array([importance[p].get(modality, 0.0) for p in parties])
        ax.bar(parties, values, bottom=bottom, label=modality)
        bottom += values
    ax.set_ylabel("share of split gain")
    ax.set_title("Feature importance by party and modality")
    ax.legend(fontsize=8)
    return _png(fig)


def comparison_rows(comparison: Comparison, objective: Objective) -> list[dict[str, str]]:
    """Model rows: the federated model and its baselines over all parties' test rows, then
    per party the federated and the local-only model on that party's own test rows (the
    only fair comparison for a single party's model)."""
    rows = [("federated", comparison.federated)]
    if comparison.local_only_mean:
        rows.append(("local-only (per party)", comparison.local_only_mean))
    if comparison.centralised:
        rows.append(("centralised (pools data; comparison only)", comparison.centralised))
    for party, local in comparison.local_only.items():
        if party in comparison.federated_by_party:
            rows.append((f"{party}: federated", comparison.federated_by_party[party]))
        rows.append((f"{party}: local-only", local))
    return metric_rows(rows)


def metric_rows(models: Sequence[tuple[str, Mapping[str, float]]]) -> list[dict[str, str]]:
    """One row per model, a column per metric any model has (``-`` where it lacks one;
    MSE left out beside its root; titles from :data:`METRIC_TITLES`), four decimals."""
    metrics = sorted({k for _, m in models for k in m if k != "mse"})
    return [
        {
            "model": name,
            **{metric_title(k): format_metric(k, m[k]) if k in m else "-" for k in metrics},
        }
        for name, m in models
    ]


def markdown_table(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Rows of equal keys as the lines of a Markdown table (header from the first row)."""
    header = list(rows[0])
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r[h] for h in header) + " |" for r in rows),
    ]


def split_size_lines(sizes: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The rows of every party's train, validation and test split (counts only)."""
    if not sizes:
        return []
    return [
        "## Rows per split",
        "",
        *markdown_table(
            [
                {
                    "party": party,
                    "train": str(n.get("train", 0)),
                    "validation": str(n.get("valid", 0)),
                    "test": str(n.get("test", 0)),
                }
                for party, n in sizes.items()
            ]
        ),
        "",
    ]


def markdown_report(
    *,
    consortium: str,
    objective: Objective,
    comparison: Comparison,
    valid: Sequence[Mapping[str, float]],
    best_round: int,
    trees: int,
    model_bytes: int,
    importance: Mapping[str, Mapping[str, float]],
    artefacts: Mapping[str, str],
    dropped: Mapping[int, Mapping[str, str]],
    stopped: str | None = None,
    left_out: Mapping[str, str] | None = None,
    warnings: Sequence[str] = (),
    split_sizes: Mapping[str, Mapping[str, int]] | None = None,
    plots: Mapping[str, str] | None = None,
) -> str:
    """The report as Markdown. ``plots`` maps ``rounds`` and ``importance`` to the image's
    link (a file beside the report, or a ``data:`` URI); a plot not in it is left out.
    ``artefacts`` maps what each file is to its path relative to the coordinator store."""
    plots = plots or {}
    lines = [
        f"# fedfuse training report: `{consortium}`",
        "",
        f"Objective **{objective}**; best round **{best_round}** of {len(valid)}; "
        f"global ensemble: {trees} trees, {model_bytes / 1024:.0f} KiB."
        + (f" Stopped: {stopped}." if stopped else ""),
        "",
        "## Test metrics",
        "",
        *markdown_table(comparison_rows(comparison, objective)),
        "",
        *([AUC_NOTE, ""] if has_pooled_auc([comparison.federated, *valid]) else []),
        "The centralised model pools every party's rows and exists only as a yardstick.",
        "",
        *split_size_lines(split_sizes or {}),
        "## Validation per round",
        "",
        *([f"![validation per round]({plots['rounds']})", ""] if "rounds" in plots else []),
        "| round | "
        + " | ".join(metric_title(k) for k in (sorted(valid[0]) if valid else []))
        + " |",
        "|---|" + "---|" * (len(valid[0]) if valid else 0),
        *(
            f"| round {i}{' (best)' if i == best_round else ''} | "
            + " | ".join(format_metric(k, v[k], 5) for k in sorted(v))
            + " |"
            for i, v in enumerate(valid, start=1)
        ),
        "",
        "## Feature importance by party and modality",
        "",
        *([f"![importance]({plots['importance']})", ""] if "importance" in plots else []),
        *(
            f"- {party}: " + ", ".join(f"{m} {share:.1%}" for m, share in row.items())
            for party, row in importance.items()
        ),
    ]
    if left_out:
        lines += ["", "## Parties left out of training", ""]
        lines += [f"- {party}: {why}" for party, why in sorted(left_out.items())]
    if dropped:
        lines += ["", "## Updates left out", ""]
        lines += [
            f"- round {r}, {party}: {why}"
            for r, d in sorted(dropped.items())
            for party, why in sorted(d.items())
        ]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    lines += ["", "## Artefacts (in the coordinator store)", ""] + [
        f"- {k}: `{v}`" for k, v in artefacts.items()
    ]
    return "\n".join(lines) + "\n"


def png_data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI, the form the Prefect UI's Markdown shows inline."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


#: The ``party`` cell of a metrics row holding the consortium's aggregate figures.
ALL_PARTIES = "all parties"


def round_metric_rows(
    valid: Sequence[Mapping[str, float]],
    party_valid: Sequence[Mapping[str, Mapping[str, float]]],
    *,
    best_round: int,
) -> list[dict[str, str]]:
    """Validation metrics per round: the aggregate row (``all parties``), then one row per
    evaluated party (its own validation rows), four significant digits, the best round's
    rows marked. A round without per-party figures (lossless mode, a run checkpointed
    before they were kept) has its aggregate row only. Titles from :data:`METRIC_TITLES`;
    MSE is left out beside its root."""
    by_round: list[list[tuple[str, Mapping[str, float]]]] = []
    for i, aggregate in enumerate(valid):
        parties = party_valid[i] if i < len(party_valid) else {}
        by_round.append([(ALL_PARTIES, aggregate), *sorted(parties.items())])
    metrics = sorted({k for rows in by_round for _, m in rows for k in m if k != "mse"})
    return [
        {
            "round": f"round {i}",
            "party": party,
            **{metric_title(k): significant(m[k]) if k in m else NO_FIGURE for k in metrics},
            "best": "best" if i == best_round else "",
        }
        for i, rows in enumerate(by_round, start=1)
        for party, m in rows
    ]


def progress_text(
    round_: int,
    rounds: int,
    *,
    parties: Sequence[str],
    left_out: Mapping[str, str],
    running: bool = False,
    stopped: str | None = None,
    best_round: int = 0,
) -> str:
    """The training progress line: which round, the parties it runs at (``running``) or
    that evaluated it (done), and which parties are out of it, with their reasons."""
    state = "running" if running else "done"
    where = "at" if running else "evaluated at"
    text = f"round {round_} of at most {rounds} {state}; {where}: " + (", ".join(parties) or "-")
    if left_out:
        text += "; left out: " + "; ".join(f"{p} ({why})" for p, why in sorted(left_out.items()))
    if stopped:
        text += f"; stopped: {stopped}; best round {best_round}"
    return text


def _reason_text(reason: str, count: int) -> str:
    return f"{count} row{'s' if count != 1 else ''}: {reason}"


def quality_rows(reports: Sequence[QualityReport]) -> list[dict[str, str]]:
    """The data quality table, one row per party and source: row counts, every quarantine
    reason with its row count (most rows first; reasons name files, columns and rows, never
    a cell), the column with the most missing values, and the columns holding values outside
    their vocabulary (counts only). The quarantined rows themselves stay in the party's
    ``rejected/``."""
    rows: list[dict[str, str]] = []
    for q in reports:
        reasons = sorted(q.rejected_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
        worst = max(q.null_rates.items(), key=lambda kv: (kv[1], kv[0]), default=None)
        rows.append(
            {
                "party": q.party,
                "source": q.source,
                "rows_in": str(q.rows_in),
                "rows_out": str(q.rows_out),
                "rejected": str(q.rows_rejected),
                "duplicates": str(q.duplicates_removed),
                "reasons": "; ".join(_reason_text(r, n) for r, n in reasons) or NO_FIGURE,
                "most_missing": (
                    f"{worst[0]}: {significant(100.0 * worst[1], 3)}% missing"
                    if worst is not None and worst[1] > 0
                    else NO_FIGURE
                ),
                # rows per column whose value was outside the vocabulary (mapped to the
                # other bucket where there is one, else missing); never the values
                "outside_vocabulary": "; ".join(
                    f"{column}: {n} row{'s' if n != 1 else ''}"
                    for column, n in sorted(q.unknown_categories.items())
                )
                or NO_FIGURE,
            }
        )
    return rows
