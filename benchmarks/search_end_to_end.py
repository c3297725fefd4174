"""A whole query, measured end to end in one process: encode + search + fusion, for a static route's index folder.

Usage (the route: an asymmetric model with a static query route, e.g. ``st-daft train --data ../shared/data/scifact``)::

    nice -n 10 python benchmarks/search_end_to_end.py ROUTE --work /tmp/search-bench \\
        --output benchmarks/results/search/end_to_end.json

On SciFact (``--data``) it builds an index folder (``st-daft index``'s :func:`~st_daft.build_search_index`, exact
``flat`` + BM25) and an ``ivf`` copy of it from the same embeddings (a resumed build), then

- **quality**: nDCG@10 on the test split through ``evaluate_retrieval`` (MTEB's scoring) of the route as ``st-daft
  evaluate`` scores it (dense, and fused with :class:`~st_daft.hybrid.HybridSearch`), of the searcher over the index
  (exact, ANN, fused), of all-MiniLM-L6-v2 over the same index, of BM25 alone, and of mteb's own hybrid fusions (RRF,
  DBSF, RSF; ``mteb.models.hybrid_wrappers``) of the same dense and BM25 runs; the same on python-faq (``--faq``);
- **speed**: batch-1 p50/p99 latency and batch-32 queries/s of a whole query for: the static searcher (exact, ANN),
  all-MiniLM-L6-v2's ``encode`` with the same index, bm25s alone, the fused static + BM25 searcher (and MiniLM + BM25).
  Every query runs each configuration once, in a rotating order, so load from other processes falls on all alike;
  ratios are of the same run. The searcher's time split (encode / dense / BM25 / fusion) is the median of its own
  per-phase timings; MiniLM runs on ``--torch-threads`` (1) threads, the searcher's faiss on one;
- **1M rows** (``--rows``): a synthetic 384-d float16 corpus (clustered unit vectors) as an index folder with the
  route as query encoder and an IVF index: the load time and resident memory of ``Searcher.load`` in a fresh process,
  recall@10 of the IVF search against exact search, and the batch-1 time split of a query (route encoding of a
  SciFact claim, IVF search of a synthetic query vector, exact float16 search for comparison);
- **service**: ``examples/serve_search.py``'s app under uvicorn on the loopback address, ``--requests`` requests from
  1 and from 4 client threads: throughput and p50/p99.

Timings on a shared CPU are noisy: compare ratios of one run, not figures of different runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import machine, write_report  # noqa: E402


def percentiles(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(values, 50)), 4), "p99_ms": round(float(np.percentile(values, 99)), 4)}


def build_indexes(route: Any, data: Path, work: Path, store: Any) -> tuple[Path, Path]:
    """``(flat, ivf)`` index folders of ``data``'s corpus (float16 embeddings), and a float32 ``flat`` one beside
    them, built once (reused when a manifest is there)."""
    from st_daft import build_search_index
    from st_daft.utils.output import MARKER_FILE

    flat, ivf = work / f"{data.name}-flat", work / f"{data.name}-ivf"
    exact = work / f"{data.name}-flat32"
    if not (exact / "manifest.json").is_file():
        shutil.rmtree(exact, ignore_errors=True)
        build_search_index(route, data, exact, bm25=True, embeddings_dtype="float32", document_store=store)
    if not (flat / "manifest.json").is_file():
        shutil.rmtree(flat, ignore_errors=True)
        build_search_index(route, data, flat, index="flat", bm25=True, document_store=store)
    if not (ivf / "manifest.json").is_file():
        shutil.rmtree(ivf, ignore_errors=True)
        ivf.mkdir(parents=True)
        shutil.copytree(flat / "documents", ivf / "documents")  # a resumed build reads these embeddings back
        shutil.copy(flat / MARKER_FILE, ivf / MARKER_FILE)  # the folder st-daft wrote, so it may resume there
        build_search_index(route, data, ivf, index="ivf", bm25=True, resume=True, document_store=store)
    return flat, ivf


def quality(route: Any, minilm: Any, data: Path, flat: Path, ivf: Path, store: Any) -> dict[str, Any]:
    """nDCG@10 (test split) of every configuration, scored by MTEB through ``evaluate_retrieval``."""
    from mteb.models.hybrid_wrappers import HybridSearch as MtebHybridSearch

    from st_daft import HybridSearch, evaluate_retrieval
    from st_daft.evaluation.baselines import BM25Search
    from st_daft.serving import Searcher
    from st_daft.serving.build import SearcherRetrieval

    def ndcg(model: Any) -> float:
        result = evaluate_retrieval(model, data, split="test", show_progress_bar=False, document_store=store)
        return round(float(result["ndcg_at_10"]), 5)

    searcher, approximate = Searcher.load(flat), Searcher.load(ivf)
    exact = Searcher.load(flat.with_name(flat.name + "32"))

    def encode_minilm(texts: list[str]) -> np.ndarray:
        return minilm.encode(texts, batch_size=64, convert_to_numpy=True)

    scores = {
        "evaluate_dense": ndcg(route),
        "evaluate_fused": ndcg(HybridSearch(route, document_store=store)),
        "static_exact": ndcg(SearcherRetrieval(searcher)),
        "static_ann": ndcg(SearcherRetrieval(approximate)),
        "static_fused": ndcg(SearcherRetrieval(searcher, fuse_bm25=True)),
        "static_exact_float32": ndcg(SearcherRetrieval(exact)),
        "static_fused_float32": ndcg(SearcherRetrieval(exact, fuse_bm25=True)),
        "static_ann_fused": ndcg(SearcherRetrieval(approximate, fuse_bm25=True)),
        "minilm_exact": ndcg(SearcherRetrieval(searcher, encode=encode_minilm)),
        "minilm_fused": ndcg(SearcherRetrieval(searcher, fuse_bm25=True, encode=encode_minilm)),
        "bm25": ndcg(BM25Search()),
    }
    # mteb 2's fusions of the same two runs (the searcher's dense ranking and the same BM25), each sub-model's 100
    # best documents: equal weights (mteb's default), and the weights of our fusion (1 : 0.15).
    mteb_fusions: dict[str, float] = {}
    for strategy in ("rrf", "dbsf", "rsf"):
        for name, weights in (("equal", None), ("1:0.15", [1.0, 0.15])):
            hybrid = MtebHybridSearch(
                [SearcherRetrieval(searcher), BM25Search()], weights=weights, fusion_strategy=strategy
            )
            mteb_fusions[f"{strategy} ({name})"] = ndcg(hybrid)
    scores["mteb_fusions"] = mteb_fusions
    scores["searcher_minus_evaluate"] = {
        "dense": round(scores["static_exact"] - scores["evaluate_dense"], 6),
        "fused": round(scores["static_fused"] - scores["evaluate_fused"], 6),
        "dense_float32": round(scores["static_exact_float32"] - scores["evaluate_dense"], 6),
        "fused_float32": round(scores["static_fused_float32"] - scores["evaluate_fused"], 6),
    }
    return scores


def speed(flat: Path, ivf: Path, minilm: Any, queries: list[str], batch: int = 32) -> dict[str, Any]:
    """Batch-1 latency and batch-32 throughput of a whole query, every configuration in one rotating loop."""
    from st_daft.serving import Searcher

    searcher, approximate = Searcher.load(flat), Searcher.load(ivf)
    lexical = searcher.lexical

    def bm25_alone(texts: list[str]) -> Any:
        rows, scores = lexical.top_k(texts, 10)
        return [[searcher.ids[row] for row in query_rows] for query_rows in rows], scores

    def minilm_vectors(texts: list[str]) -> np.ndarray:
        return minilm.encode(texts, batch_size=len(texts), convert_to_numpy=True)

    configurations = {
        "static_exact": lambda texts: searcher.search(texts, k=10),
        "static_ann": lambda texts: approximate.search(texts, k=10),
        "minilm_exact": lambda texts: searcher.search(texts, k=10, vectors=minilm_vectors(texts)),
        "bm25": bm25_alone,
        "static_fused": lambda texts: searcher.search(texts, k=10, fuse_bm25=True),
        "minilm_fused": lambda texts: searcher.search(texts, k=10, fuse_bm25=True, vectors=minilm_vectors(texts)),
    }
    owners = {"static_exact": searcher, "static_ann": approximate, "static_fused": searcher}
    names = list(configurations)
    for name in names:  # warm-up: page in the index, the tables, the model
        configurations[name](queries[:batch])
    latencies: dict[str, list[float]] = {name: [] for name in names}
    phases: dict[str, dict[str, list[float]]] = {name: {} for name in owners}
    minilm_encode: list[float] = []
    for position, query in enumerate(queries):
        for offset in range(len(names)):
            name = names[(position + offset) % len(names)]
            start = time.perf_counter()
            configurations[name]([query])
            latencies[name].append(time.perf_counter() - start)
            if name in owners:
                for phase, seconds in owners[name].timings.items():
                    phases[name].setdefault(phase, []).append(seconds)
        start = time.perf_counter()
        minilm_vectors([query])
        minilm_encode.append(time.perf_counter() - start)
    throughput: dict[str, float] = {name: 0.0 for name in names}
    chunks = [queries[start : start + batch] for start in range(0, len(queries) - batch + 1, batch)]
    for position, chunk in enumerate(chunks):
        for offset in range(len(names)):
            name = names[(position + offset) % len(names)]
            start = time.perf_counter()
            configurations[name](chunk)
            throughput[name] += time.perf_counter() - start
    rows = {}
    for name in names:
        rows[name] = {
            "batch_1": percentiles(latencies[name]),
            f"batch_{batch}_queries_per_s": round(len(chunks) * batch / throughput[name], 1),
        }
        if name in phases:
            rows[name]["batch_1_split_p50_ms"] = {
                phase: round(1000 * float(np.median(seconds)), 4) for phase, seconds in phases[name].items()
            }
    minilm_p50 = percentiles(minilm_encode)["p50_ms"]
    for name in ("minilm_exact", "minilm_fused"):  # MiniLM's encode, measured alone; the rest is the index's
        rows[name]["batch_1_split_p50_ms"] = {"encode": minilm_p50}
    p50 = {name: rows[name]["batch_1"]["p50_ms"] for name in names}
    return {
        "num_queries": len(queries),
        "rows": rows,
        "static_vs_minilm_batch_1_p50": round(p50["minilm_exact"] / p50["static_exact"], 2),
        "static_ann_vs_minilm_batch_1_p50": round(p50["minilm_exact"] / p50["static_ann"], 2),
        "fused_vs_minilm_fused_batch_1_p50": round(p50["minilm_fused"] / p50["static_fused"], 2),
        "fused_vs_minilm_batch_1_p50": round(p50["minilm_exact"] / p50["static_fused"], 2),
        "static_vs_minilm_batch_32_qps": round(
            rows["static_exact"][f"batch_{batch}_queries_per_s"] / rows["minilm_exact"][f"batch_{batch}_queries_per_s"],
            2,
        ),
    }


def synthetic_index(route: Any, work: Path, rows: int, clusters: int, nlist: int) -> Path:
    """An index folder over ``rows`` synthetic clustered float16 unit vectors (``cache_scale.write_stale_cache``),
    with ``route``'s query route and an IVF index; written once (reused when its manifest is there)."""
    import faiss
    from cache_scale import write_stale_cache

    from st_daft.embeddings.index import build_faiss_index
    from st_daft.models.fingerprint import encoding_fingerprint
    from st_daft.serving import export_static_model
    from st_daft.serving.searcher import DOCUMENT_FINGERPRINT_KEY, INDEX_FORMAT, INDEX_FORMAT_VERSION
    from st_daft.utils.io import atomic_write_json

    folder = work / f"synthetic-{rows}"
    if (folder / "manifest.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "documents").mkdir(parents=True)
    fingerprint = encoding_fingerprint(route)
    export_static_model(route, folder / "query", config={DOCUMENT_FINGERPRINT_KEY: fingerprint})
    dimension = route.get_embedding_dimension()
    embeddings = write_stale_cache(folder / "documents" / "embeddings.npy", rows, dimension, clusters, seed=0)
    atomic_write_json(folder / "ids.json", [f"s{row}" for row in range(rows)], indent=None)
    started = time.perf_counter()
    options = {"nlist": nlist, "nprobe": 32, "train_size": 65536}
    index = build_faiss_index(embeddings, "ivf", storage="float16", show_progress_bar=True, **options)
    faiss.write_index(index, str(folder / "faiss.index"))
    manifest = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "model": "synthetic clustered unit vectors",
        "documents": rows,
        "dimension": dimension,
        "similarity": "cosine",
        "document_fingerprint": fingerprint,
        "embeddings_dtype": "float16",
        "index": {"kind": "ivf", "storage": "float16", "options": options},
        "build_s": round(time.perf_counter() - started, 1),
        "files": {
            "query_route": "query",
            "embeddings": "documents/embeddings.npy",
            "ids": "ids.json",
            "faiss": "faiss.index",
            "bm25": None,
        },
    }
    atomic_write_json(folder / "manifest.json", manifest)
    return folder


LOAD_CHILD = """
import json, sys, time
started = time.perf_counter()
from st_daft.serving import Searcher
searcher = Searcher.load(sys.argv[1])
loaded = time.perf_counter() - started
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
mib = lambda key: int(status[key].split()[0]) / 1024
heavy = [name for name in ("torch", "transformers", "mteb", "sentence_transformers") if name in sys.modules]
print(json.dumps({"load_s": round(loaded, 3), "rss_anon_mib": mib("RssAnon"), "rss_file_mib": mib("RssFile"),
                  "heavy_modules": heavy}))
"""


def synthetic(folder: Path, queries: list[str], probes: list[int], count: int = 200) -> dict[str, Any]:
    """Load time in a fresh process, IVF recall@10 against exact search, and a query's batch-1 time split."""
    import faiss

    from st_daft.serving import Searcher

    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    output = subprocess.run(
        [sys.executable, "-c", LOAD_CHILD, str(folder)], check=True, capture_output=True, text=True, env=environment
    ).stdout
    load = json.loads(output.strip().splitlines()[-1])
    searcher = Searcher.load(folder)
    embeddings = searcher.embeddings
    rows, dimension = embeddings.shape
    generator = np.random.default_rng(1)
    picked = np.sort(generator.choice(rows, count, replace=False))
    vectors = np.asarray(embeddings[picked], dtype=np.float32)
    vectors += generator.normal(scale=0.5 / dimension**0.5, size=vectors.shape).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact = faiss.IndexScalarQuantizer(dimension, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    for start in range(0, rows, 65536):
        exact.add(np.asarray(embeddings[start : start + 65536], dtype=np.float32))
    exact_latency = []
    truth = []
    for vector in vectors:
        start = time.perf_counter()
        _, found = exact.search(vector[None], 10)
        exact_latency.append(time.perf_counter() - start)
        truth.append(set(found[0].tolist()))
    recall = {}
    for nprobe in probes:
        searcher.index.nprobe = nprobe
        hits, latency = 0, []
        for vector, relevant in zip(vectors, truth):
            start = time.perf_counter()
            ids, _ = searcher.search("query", k=10, vectors=vector[None])
            latency.append(time.perf_counter() - start)
            hits += len({int(document_id[1:]) for document_id in ids} & relevant)
        recall[str(nprobe)] = {"recall_at_10": round(hits / (10 * count), 4), "search": percentiles(latency)}
    searcher.index.nprobe = int(searcher.manifest["index"]["options"]["nprobe"])
    encode = []
    for query in queries[:count]:
        start = time.perf_counter()
        searcher.encode([query])
        encode.append(time.perf_counter() - start)
    return {
        "rows": rows,
        "dimension": dimension,
        "index": searcher.manifest["index"],
        "index_build_s": searcher.manifest.get("build_s"),
        "load_fresh_process": load,
        "embeddings_file_mib": round((folder / "documents" / "embeddings.npy").stat().st_size / 2**20),
        "faiss_file_mib": round((folder / "faiss.index").stat().st_size / 2**20),
        "queries": count,
        "ivf_by_nprobe": recall,
        "exact_float16_search": percentiles(exact_latency),
        "route_encode": percentiles(encode),
    }


def load_test(url: str, queries: list[str], requests: int, clients: int, fuse: str) -> dict[str, Any]:
    """``requests`` GET requests (each a query of ``queries`` in turn) from ``clients`` threads, after 20 warm-up
    requests: requests/s and latency percentiles."""
    import httpx

    latencies: list[float] = []
    lock = threading.Lock()
    local = threading.local()

    def one(position: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=30)
        start = time.perf_counter()
        response = local.client.get(url, params={"q": queries[position % len(queries)], "fuse": fuse})
        response.raise_for_status()
        with lock:
            latencies.append(time.perf_counter() - start)

    for position in range(20):
        one(position)
    latencies.clear()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - started
    return {"requests": requests, "requests_per_s": round(requests / elapsed, 1), **percentiles(latencies)}


def service(flat: Path, queries: list[str], requests: int) -> dict[str, Any]:
    """examples/serve_search.py's app under uvicorn on 127.0.0.1, ``requests`` requests from 1 and 4 clients."""
    import uvicorn

    sys.path.insert(0, str(ROOT / "examples"))
    from serve_search import create_app

    from st_daft.serving import Searcher

    server = uvicorn.Server(
        uvicorn.Config(create_app(Searcher.load(flat)), host="127.0.0.1", port=0, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/search"
    results: dict[str, Any] = {}
    try:
        for clients in (1, 4):
            for fuse in ("0", "1"):
                name = f"clients_{clients}{'_fused' if fuse == '1' else ''}"
                results[name] = load_test(url, queries, requests, clients, fuse)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("route", help="asymmetric model folder with a static query route")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (outside the repository)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "scifact")
    parser.add_argument("--faq", type=Path, default=ROOT.parent / "shared" / "data" / "python-faq")
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows (0: skip)")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--nlist", type=int, default=1024, help="IVF cells of the synthetic index")
    parser.add_argument("--requests", type=int, default=1000, help="requests per service load test (0: skip)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="MiniLM's torch threads (1, like the searcher's faiss: on a busy CPU more threads wait on each other)",
    )
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--faq-only", action="store_true", help="python-faq's quality rows only (with --update)")
    parser.add_argument("--only-synthetic", action="store_true", help="build (and measure) the synthetic index only")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--update", action="store_true", help="keep the rest of --output; replace what is measured")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from st_daft import default_document_encoder, load_beir
    from st_daft.embeddings.store import DocumentEmbeddingStore

    torch.set_num_threads(args.torch_threads)
    args.work.mkdir(parents=True, exist_ok=True)
    store = DocumentEmbeddingStore(args.work / "store")
    route = SentenceTransformer(args.route)
    minilm = SentenceTransformer(default_document_encoder())
    report: dict[str, Any] = {
        "benchmark": "search_end_to_end",
        "command": " ".join(["python", "benchmarks/search_end_to_end.py", *sys.argv[1:]]),
        "route": args.route,
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": "one process; the CPU is shared with other work, so compare ratios within this run",
    }
    if args.update and args.output is not None and args.output.is_file():
        report = {**json.loads(args.output.read_text()), **report}
    queries = list(load_beir(args.data, "test").queries.values())
    if args.only_synthetic:
        folder = synthetic_index(route, args.work, args.rows, args.clusters, args.nlist)
        report["synthetic"] = synthetic(folder, queries, probes=[8, 16, 32, 64])
        write_report(args.output, report)
        print(json.dumps(report["synthetic"], indent=2))
        return
    if args.faq_only:
        faq_flat, faq_ivf = build_indexes(route, args.faq, args.work, store)
        report["python_faq"] = {"ndcg_at_10": quality(route, minilm, args.faq, faq_flat, faq_ivf, store)}
        write_report(args.output, report)
        print(json.dumps(report["python_faq"], indent=2))
        return
    scifact: dict[str, Any] = dict(report.get("scifact", {}))
    flat, ivf = build_indexes(route, args.data, args.work, store)
    if not args.skip_speed:
        scifact.update(speed(flat, ivf, minilm, queries))
    if not args.skip_quality:
        scifact["ndcg_at_10"] = quality(route, minilm, args.data, flat, ivf, store)
    report["scifact"] = scifact
    write_report(args.output, report)
    if not args.skip_quality and args.faq.is_dir():
        faq_flat, faq_ivf = build_indexes(route, args.faq, args.work, store)
        report["python_faq"] = {"ndcg_at_10": quality(route, minilm, args.faq, faq_flat, faq_ivf, store)}
        write_report(args.output, report)
    if args.rows:
        folder = synthetic_index(route, args.work, args.rows, args.clusters, args.nlist)
        report["synthetic"] = synthetic(folder, queries, probes=[8, 16, 32, 64])
        write_report(args.output, report)
    if args.requests:
        report["service"] = service(flat, queries, args.requests)
    write_report(args.output, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
