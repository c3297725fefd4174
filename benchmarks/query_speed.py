"""Query-encoding throughput of trained models, all measured in one process, one after the other.

Usage::

    python benchmarks/query_speed.py --queries ../shared/data/scifact runs/bench/a runs/bench/e ...

For each model: ``encode_query`` queries per second at batch size 1 (one call per query) and 32, over the SciFact
test claims, after a warm-up pass. Ratios between models are only meaningful within one run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

from st_daft import load_beir


def throughput(model: SentenceTransformer, texts: list[str], batch_size: int, min_seconds: float = 3.0) -> float:
    """Queries per second of ``model.encode_query`` over ``texts`` in calls of ``batch_size`` (repeated)."""
    model.encode_query(texts[:batch_size], batch_size=batch_size)  # warm-up
    encoded, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds:
        for start in range(0, len(texts), batch_size):
            model.encode_query(texts[start : start + batch_size], batch_size=batch_size, show_progress_bar=False)
            encoded += len(texts[start : start + batch_size])
    return encoded / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--queries", default="../shared/data/scifact", help="BEIR folder whose test queries are used")
    parser.add_argument("--output", default="benchmarks/results/query_speed.json")
    args = parser.parse_args()
    texts = list(load_beir(args.queries, "test").queries.values())
    results = {"threads": torch.get_num_threads(), "num_queries": len(texts), "models": {}}
    for path in args.models:
        model = SentenceTransformer(path, device="cpu")
        model.eval()
        with torch.inference_mode():
            speeds = {f"batch_{size}": round(throughput(model, texts, size), 1) for size in (1, 32)}
        results["models"][Path(path).name] = speeds
        print(Path(path).name, speeds, flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
