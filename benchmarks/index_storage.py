"""The negative miner's faiss index over a float16 cache: float32 storage against float16 storage.

Question: What does float16 storage save in the miner's faiss index over a float16 cache, and does it find the same
    neighbours?
Command: ``python benchmarks/index_storage.py --work runs/index-storage --output
    benchmarks/results/scale/index_storage.json``
Results: benchmarks/results/scale/index_storage.json
Page: docs/results/scale.md


A float16 cache (``--cache-dtype float16``) of ``--rows`` clustered unit vectors (``cache_scale.write_stale_cache``) is
written once as a memmap. Then, each in a fresh process so that its memory is its own, an index of each kind
(``flat``, ``ivf``, ``hnsw``) is built over it with ``storage="float32"`` and ``storage="float16"``
(:func:`st_daft.embeddings.index.build_faiss_index`, as the miner builds it), and searched with ``--queries`` perturbed
cache
rows for their top ``--k``. Each reports build seconds, the anonymous resident memory the index holds, search
milliseconds for the batch, and the overlap of its top k with the exact top k over the float16 cache (chunked
``exact_search``). HNSW runs on the first ``--hnsw-rows`` rows (its build is the slow part on a CPU).

    python benchmarks/index_storage.py --work runs/index-storage --output benchmarks/results/S.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import add_cache_arguments, child_result, clustered_cache, settings_report, write_report  # noqa: E402


def queries_and_truth(cache: np.ndarray, count: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from st_daft.embeddings.index import exact_search

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(cache), count, replace=False))
    queries = np.asarray(cache[rows], dtype=np.float32) + rng.normal(0, 0.02, (count, cache.shape[1]))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    return queries, exact_search(cache, torch.from_numpy(queries), k)[1].numpy()


def child(args: argparse.Namespace) -> dict:
    from measure import resident_mib

    from st_daft.embeddings.index import build_faiss_index

    cache = np.load(args.work / "cache.npy", mmap_mode="r")
    if args.child_kind == "hnsw":
        cache = cache[: args.hnsw_rows]
    queries, truth = queries_and_truth(cache, args.queries, args.k)
    before = resident_mib()["RssAnon"]
    started = time.perf_counter()
    index = build_faiss_index(cache, args.child_kind, storage=args.child_storage, nprobe=args.nprobe)
    seconds = time.perf_counter() - started
    held = resident_mib()["RssAnon"] - before
    index.search(queries[:4], args.k)  # warm
    started = time.perf_counter()
    found = index.search(queries, args.k)[1]
    search_ms = (time.perf_counter() - started) * 1000
    overlap = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found.tolist(), truth.tolist())]))
    return {
        "kind": args.child_kind,
        "storage": args.child_storage,
        "rows": len(cache),
        "index_type": type(index).__name__,
        "build_seconds": round(seconds, 2),
        "memory_mib": round(held, 1),
        "search_ms": round(search_ms, 1),
        f"overlap_at_{args.k}_with_exact": round(overlap, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cache_arguments(parser)
    parser.add_argument("--hnsw-rows", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--child-kind", help=argparse.SUPPRESS)
    parser.add_argument("--child-storage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_kind:
        print(json.dumps(child(args)))
        return
    clustered_cache(args)
    results = []
    for kind in ("flat", "ivf", "hnsw"):
        for storage in ("float32", "float16"):
            command = [sys.executable, __file__, *sys.argv[1:], "--child-kind", kind, "--child-storage", storage]
            results.append(child_result(command))
            print(results[-1], flush=True)
    report = settings_report("index_storage", args, results)
    write_report(args.output, report)


if __name__ == "__main__":
    main()
