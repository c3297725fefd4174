"""Query-encoding throughput of trained models, all measured in one process, one after the other.

Usage::

    python benchmarks/query_speed.py --queries ../shared/data/scifact runs/bench/a runs/bench/e ...
    python benchmarks/query_speed.py --threads 1 --output benchmarks/results/query_speed_1thread.json runs/bench/e

For each model: ``encode_query`` queries per second at batch size 1 (one call per query) and 32, over the SciFact
test claims, after a warm-up pass. Ratios between models are only meaningful within one run.

For every asymmetric (Router) model, its query route is also exported with :func:`st_daft.export_route` (in memory)
and measured as ``"<name> (query route only)"``: the model a search service would serve queries with. Its vectors
equal the full model's ``encode_query`` vectors (the largest absolute difference over the first 32 queries is
recorded as ``max_abs_diff``); only the per-call overhead of sentence-transformers' ``encode``, which walks every
parameter and module of the model, differs. ``--no-export-query-route`` skips these rows.

The JSON keeps its earlier shape (``{"threads", "num_queries", "models": {name: {"batch_1", "batch_32"}}}``), with the
query-only rows as extra ``models`` entries; ``threads`` is ``torch.get_num_threads()`` during the run, set with
``--threads``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Router

from st_daft import export_route, load_beir

QUERY_ONLY_SUFFIX = " (query route only)"


def throughput(model: SentenceTransformer, texts: list[str], batch_size: int, min_seconds: float = 3.0) -> float:
    """Queries per second of ``model.encode_query`` over ``texts`` in calls of ``batch_size`` (repeated)."""
    model.encode_query(texts[:batch_size], batch_size=batch_size)  # warm-up
    encoded, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds:
        for start in range(0, len(texts), batch_size):
            model.encode_query(texts[start : start + batch_size], batch_size=batch_size, show_progress_bar=False)
            encoded += len(texts[start : start + batch_size])
    return encoded / (time.perf_counter() - started)


def measure(model: SentenceTransformer, texts: list[str], min_seconds: float) -> dict[str, float]:
    model.eval()
    with torch.inference_mode():
        return {f"batch_{size}": round(throughput(model, texts, size, min_seconds), 1) for size in (1, 32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--queries", default="../shared/data/scifact", help="BEIR folder whose test queries are used")
    parser.add_argument("--output", default="benchmarks/results/query_speed.json")
    parser.add_argument(
        "--export-query-route",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure each asymmetric model's exported query route (default: on)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="time spent per model and batch size")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    texts = list(load_beir(args.queries, "test").queries.values())
    results = {"threads": torch.get_num_threads(), "num_queries": len(texts), "models": {}}
    for path in args.models:
        name = Path(path).name
        model = SentenceTransformer(path, device="cpu")
        results["models"][name] = measure(model, texts, args.min_seconds)
        print(name, results["models"][name], flush=True)
        if args.export_query_route and any(isinstance(module, Router) for module in model.children()):
            served = export_route(model)
            sample = texts[:32]
            difference = np.abs(served.encode_query(sample) - model.encode_query(sample)).max()
            del model  # measure the query route alone, as it would be served
            speeds = {**measure(served, texts, args.min_seconds), "max_abs_diff": float(difference)}
            results["models"][name + QUERY_ONLY_SUFFIX] = speeds
            print(name + QUERY_ONLY_SUFFIX, speeds, flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
