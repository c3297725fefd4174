"""Render benchmarks/results/*.json as the markdown tables of docs/benchmarks.md (between marker comments).

Usage::

    python benchmarks/report.py            # rewrites the generated blocks of docs/benchmarks.md
"""

from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = Path("benchmarks/results")
DOC = Path("docs/benchmarks.md")
# benchmarks/query_speed.py's key for a model's exported query route (st_daft.export_route), measured alone.
QUERY_ONLY_SUFFIX = " (query route only)"

LABELS = {
    "a": "(a) all-MiniLM-L6-v2, symmetric, zero-shot",
    "b": "(b) all-MiniLM-L6-v2, symmetric, fine-tuned",
    "c": "(c) static + MiniLM, zero-shot",
    "d": "(d) static + MiniLM, plain joint fine-tuning",
    "e": "(e) static + MiniLM, DAFT",
    "l4-static-vca": "(e+) static + MiniLM, label-free recipe: vocabulary + corpus + align (issue #4)",
    "f-plain": "(f) tiny:2,128 + MiniLM, plain joint fine-tuning",
    "f-daft": "(f) tiny:2,128 + MiniLM, DAFT",
}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _speeds() -> dict:
    """benchmarks/query_speed.py's measurements per model name (empty before it has run)."""
    speed_file = RESULTS / "query_speed.json"
    return json.loads(speed_file.read_text())["models"] if speed_file.is_file() else {}


def _result(name: str) -> dict | None:
    path = RESULTS / f"daft_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def daft_table() -> str:
    speeds = _speeds()
    rows = [
        "| configuration | SciFact nDCG@10 | R@100 | MRR@10 | python-faq nDCG@10 | queries/s b=1 | queries/s b=32 "
        "| train s | collapsed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in LABELS.items():
        result = _result(name)
        if result is None:
            continue
        speed = speeds.get(name, {})
        collapsed = any(stage.get("collapsed") for stage in result.get("stages", []))
        rows.append(
            f"| {label} | {_fmt(result['scifact']['ndcg_at_10'])} | {_fmt(result['scifact']['recall_at_100'])} "
            f"| {_fmt(result['scifact']['mrr_at_10'])} | {_fmt(result['python-faq']['ndcg_at_10'])} "
            f"| {_fmt(speed.get('batch_1'), 0)} | {_fmt(speed.get('batch_32'), 0)} "
            f"| {_fmt(result['train_seconds'], 0)} | {'yes' if collapsed else 'no'} |"
        )
        served = speeds.get(name + QUERY_ONLY_SUFFIX)
        if served:  # the same query vectors, so the same scores: only the throughput is new
            rows.append(
                f"| ↳ {label.split(' ', 1)[0]} served by its query route alone (`st-daft export`) | same | same | same "
                f"| same | {_fmt(served.get('batch_1'), 0)} | {_fmt(served.get('batch_32'), 0)} | – | – |"
            )
    return "\n".join(rows)


def collapse_table() -> str:
    rows = [
        "| configuration | stage | step | query mean cos | query std | document std | 1-NN KL |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("d", "e", "f-plain", "f-daft"):
        result = _result(name)
        for row in (result or {}).get("collapse_trace", []):
            if "eval_alignment_knn_kl" not in row:
                continue
            rows.append(
                f"| {name} | {row['stage']} | {row['step']} | {_fmt(row.get('eval_alignment_query_mean_cosine'))} "
                f"| {_fmt(row.get('eval_alignment_query_std'), 4)} | {_fmt(row.get('eval_alignment_document_std'), 4)} "
                f"| {_fmt(row.get('eval_alignment_knn_kl'), 1)} |"
            )
    return "\n".join(rows)


# Issue #4: which stage buys what, per query encoder (benchmarks/daft_scifact.py --name l4-...).
LABEL_FREE_ROWS = {
    "static (MiniLM input embeddings)": [
        ("c", "untrained"),
        ("l4-static-v", "vocabulary"),
        ("l4-static-c", "corpus"),
        ("l4-static-vc", "vocabulary + corpus"),
        ("l4-static-a", "align (DAFT stage 1)"),
        ("l4-static-va", "vocabulary + align"),
        ("l4-static-vca", "vocabulary + corpus + align"),
        ("l4-static-vc-unscaled", "vocabulary (not rescaled) + corpus"),
        ("l4-static-va-unscaled", "vocabulary (not rescaled) + align"),
        ("l4-static-vca-unscaled", "vocabulary (not rescaled) + corpus + align"),
        ("l4-static-vca-long", "vocabulary + corpus (2,000 steps, 40k texts) + align"),
        ("e", "align + finetune (DAFT, (e))"),
        ("l4-static-vcaf", "vocabulary + corpus + align + finetune"),
    ],
    "tiny:2,128 (random 2-layer BERT)": [
        ("l4-tiny-a", "align (DAFT stage 1)"),
        ("l4-tiny-ca", "corpus + align"),
        ("f-plain", "finetune only (plain)"),
        ("f-daft", "align + finetune (DAFT)"),
    ],
    "tokenlearn (64-d static + Dense)": [
        ("l4-tokenlearn-v", "vocabulary (projection fit)"),
        ("l4-tokenlearn-a", "align (DAFT stage 1)"),
        ("l4-tokenlearn-vca", "vocabulary + corpus + align"),
    ],
    "all-MiniLM-L6-v2 (symmetric)": [("a", "zero-shot"), ("b", "fine-tuned")],
}


def _stage_kls(result: dict) -> str:
    parts = []
    for stage in result.get("stages", []):
        kl = (stage.get("final_metrics") or {}).get("alignment_knn_kl")
        if kl is not None:
            parts.append(f"{stage['stage']} {kl:.1f}")
    return ", ".join(parts) or "–"


def label_free_table() -> str:
    speeds = _speeds()
    rows = [
        "| query encoder | stages | SciFact nDCG@10 | SciFact R@100 | python-faq nDCG@10 | python-faq R@100 "
        "| KL at the end of each stage | train s | queries/s b=1 / b=32 (query route alone) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for encoder, entries in LABEL_FREE_ROWS.items():
        for name, stages in entries:
            result = _result(name)
            if result is None:
                continue
            scifact, faq = result.get("scifact", {}), result.get("python-faq", {})
            speed = speeds.get(name + QUERY_ONLY_SUFFIX) or speeds.get(name) or {}
            rows.append(
                f"| {encoder} | {stages} | {_fmt(scifact.get('ndcg_at_10'))} | {_fmt(scifact.get('recall_at_100'))} "
                f"| {_fmt(faq.get('ndcg_at_10'))} | {_fmt(faq.get('recall_at_100'))} | {_stage_kls(result)} "
                f"| {_fmt(result.get('train_seconds'), 0)} "
                f"| {_fmt(speed.get('batch_1'), 0)} / {_fmt(speed.get('batch_32'), 0)} |"
            )
    return "\n".join(rows)


def replace_block(text: str, marker: str, content: str) -> str:
    pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"docs/benchmarks.md has no <!-- {marker}:start/end --> block")
    return pattern.sub(lambda match: match.group(1) + content + "\n" + match.group(2), text)


def main() -> None:
    text = DOC.read_text()
    text = replace_block(text, "daft-table", daft_table())
    text = replace_block(text, "collapse-table", collapse_table())
    text = replace_block(text, "labelfree-table", label_free_table())
    DOC.write_text(text)
    print(f"updated {DOC}")


if __name__ == "__main__":
    main()
