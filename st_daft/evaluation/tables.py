"""Plain-text tables of an evaluation: rows of models, columns of collections, one metric (what
``st-daft evaluate`` prints)."""

from __future__ import annotations

from typing import Any

_METRIC_NAMES = {"ndcg": "nDCG", "recall": "Recall", "map": "MAP", "mrr": "MRR", "precision": "P", "hit_rate": "Hit"}


def metric_title(metric: str) -> str:
    """``"ndcg_at_10"`` -> ``"nDCG@10"``."""
    family, _, k = metric.rpartition("_at_")
    return f"{_METRIC_NAMES.get(family, family)}@{k}" if family else metric


def format_table(comparison: dict[str, Any], metric: str = "ndcg_at_10", digits: int = 3) -> str:
    """A Markdown table of one score from :func:`evaluate_collections`: a row per model, a column per collection,
    and the mean over the collections."""
    names = comparison["collections"]
    lines = [
        f"| {metric_title(metric)} ({comparison['split']}) | " + " | ".join(names) + " | mean |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for label in comparison["models"]:
        cells = [comparison["scores"][label][name].get(metric) for name in names]
        cells.append(comparison["mean"][label].get(metric))
        shown = ["" if value is None else f"{value:.{digits}f}" for value in cells]
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    return "\n".join(lines)
