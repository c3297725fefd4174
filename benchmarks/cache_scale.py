"""Million-document caches: apply a corrector and rebuild an index within a bounded memory, and mine fast.

Question: Can a corrector be applied and the miner's index rebuilt over a million-row cache within bounded memory,
    and how fast and exact is mining then?
Command: ``python benchmarks/cache_scale.py --work runs/cache-scale-1m --size 1000000 --clusters 2000 --nlist 1024
    --output benchmarks/results/scale/cache_scale_1m.json``
Results: benchmarks/results/scale/cache_scale_1m.json
Page: docs/results/scale.md


A synthetic float16 cache of ``--size`` x ``--dimension`` unit vectors (clustered, as document embeddings are) is
written chunk by chunk into a memmap outside the repository. A measured drift maps each stale vector to its fresh
one: ``fresh = normalize(stale + stale D + 0.1 tanh(stale M))`` (a structured linear drift plus a small non-linear
part). Two correctors learn it online from a sample (:class:`~st_daft.negatives.corrector.CorrectorTrainer`): a linear
one
(depth 1, for query-side correction) and a 2-layer one. Then, timed and with the peak resident memory recorded:

- the rebuild a correcting miner does every N steps: the corrector applied chunk by chunk and the corrected rows
  streamed into an IVF index that re-uses the cells the stale index trained (``build_faiss_index(..., transform=,
  like=)``); and, for comparison, the two-pass rebuild (the corrected cache written into a float16 memmap by
  :func:`st_daft.embeddings.index.corrected_matrix`, then an IVF index trained and filled over it);
- mining queries/s and recall@k against exact search over the exactly corrected cache, for: exact chunked search,
  IVF, HNSW (on ``--hnsw-size`` rows if smaller), query-side linear correction (the *stale* IVF index searched with
  ``q + W^T q``, never rebuilt) and two-step (a query-side shortlist re-ranked by the 2-layer corrector).

    python benchmarks/cache_scale.py --work runs/cache-scale --output benchmarks/results/scale/cache_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from st_daft.embeddings.cache import StaleEmbeddingCache
from st_daft.embeddings.index import build_faiss_index, corrected_matrix, exact_search, query_side_queries
from st_daft.negatives.corrector import CorrectorNetwork, CorrectorTrainer, staleness_error
from st_daft.negatives.miner import linear_part


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Drift:
    """The synthetic drift from stale to fresh embeddings."""

    def __init__(self, dimension: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.linear = 0.35 * torch.randn(dimension, dimension, generator=generator) / dimension**0.5
        self.mixing = torch.randn(dimension, dimension, generator=generator) / dimension**0.5

    def __call__(self, stale: torch.Tensor) -> torch.Tensor:
        stale = stale.float()
        return F.normalize(stale + stale @ self.linear + 0.1 * torch.tanh(2 * stale @ self.mixing), dim=1)


def write_stale_cache(path: Path, size: int, dimension: int, clusters: int, seed: int, chunk: int = 65536) -> np.memmap:
    """Clustered unit vectors (cluster centres plus noise), written chunk by chunk as a float16 .npy memmap."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dimension, generator=generator), dim=1)
    spread = 0.6 + 0.8 * torch.rand(clusters, generator=generator)  # clusters of different tightness
    memmap = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(size, dimension))
    for start in range(0, size, chunk):
        count = min(chunk, size - start)
        assignment = torch.randint(0, clusters, (count,), generator=generator)
        noise = torch.randn(count, dimension, generator=generator) * (spread[assignment] / dimension**0.5)[:, None]
        memmap[start : start + count] = F.normalize(centres[assignment] + noise, dim=1).numpy().astype(np.float16)
    memmap.flush()
    return memmap


def train_corrector(stale: np.ndarray, drift: Drift, depth: int, sample: int, steps: int, seed: int):
    """Online training as in a mining run: batches of observed (stale, fresh) pairs, replay buffer."""
    generator = np.random.default_rng(seed)
    rows = np.sort(generator.choice(len(stale), sample, replace=False))
    sample_stale = torch.from_numpy(np.asarray(stale[rows], dtype=np.float32))
    cache = StaleEmbeddingCache([str(i) for i in range(sample)], sample_stale, [bytes(16)] * sample, "synthetic")
    fresh = drift(sample_stale)
    corrector = CorrectorNetwork(stale.shape[1], depth=depth)
    trainer = CorrectorTrainer(corrector, lr=2e-3, steps=1, buffer=0)
    batch = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(steps):
        observed = torch.randint(0, sample, (1024,), generator=batch)
        trainer.observe(observed, fresh[observed])
        trainer.step(cache)
    corrector.eval()
    return corrector, time.perf_counter() - started


def timed_search(search, queries: torch.Tensor, k: int, batch: int = 256) -> tuple[torch.Tensor, float]:
    rows, started = [], time.perf_counter()
    for start in range(0, len(queries), batch):
        rows.append(search(queries[start : start + batch], k))
    seconds = time.perf_counter() - started
    return torch.cat(rows), len(queries) / seconds


def recall(found: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    hits = [len(set(a[:k].tolist()) & set(b[:k].tolist())) for a, b in zip(found, truth)]
    return sum(hits) / (k * len(truth))


def faiss_search(index):
    def search(queries: torch.Tensor, k: int) -> torch.Tensor:
        return torch.from_numpy(index.search(np.ascontiguousarray(queries.numpy()), k)[1]).long()

    return search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the memmaps (outside the repository)")
    parser.add_argument("--output", default="benchmarks/results/scale/cache_scale.json")
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--dimension", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--exact-queries", type=int, default=256, help="queries timed for exact search (slow)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--ivf-train-size", type=int, default=65536)
    parser.add_argument("--hnsw-size", type=int, default=200_000, help="rows of the HNSW measurement")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--shortlist", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--train-sample", type=int, default=50_000)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    k = args.k
    result: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}",
        "config": vars(args),
    }

    started = time.perf_counter()
    stale = write_stale_cache(work / "stale.npy", args.size, args.dimension, args.clusters, args.seed)
    result["write_stale_cache_seconds"] = time.perf_counter() - started
    stale = np.load(work / "stale.npy", mmap_mode="r")
    drift = Drift(args.dimension, args.seed + 1)

    # the correctors, and how much of the drift they explain on documents they never saw
    correctors = {}
    held_out = torch.from_numpy(np.asarray(stale[-5000:], dtype=np.float32))
    fresh_held_out = drift(held_out)
    result["stale_error"] = staleness_error(held_out, fresh_held_out).mean().item()
    for name, depth in (("linear", 1), ("mlp", 2)):
        corrector, seconds = train_corrector(stale, drift, depth, args.train_sample, args.train_steps, args.seed)
        correctors[name] = corrector
        with torch.no_grad():
            error = staleness_error(corrector(held_out), fresh_held_out).mean().item()
        result[f"corrector_{name}"] = {"corrected_error": error, "train_seconds": seconds}
    print(json.dumps({key: result[key] for key in ("stale_error", "corrector_linear", "corrector_mlp")}, indent=2))

    # queries near fresh documents, as a training query is near its positive
    generator = torch.Generator().manual_seed(args.seed + 2)
    anchors = torch.randint(0, args.size, (args.queries,), generator=generator).sort().values
    anchor_fresh = drift(torch.from_numpy(np.asarray(stale[anchors.numpy()], dtype=np.float32)))
    queries = F.normalize(anchor_fresh + 0.5 * F.normalize(torch.randn(args.queries, args.dimension), dim=1), dim=1)

    modes: dict[str, dict] = {}
    result["modes"] = modes
    exact_qps: list[float] = []
    mlp = correctors["mlp"]

    def write_partial() -> None:
        result["peak_rss_gib"] = peak_rss_gib()
        if exact_qps:
            for values in modes.values():
                values.setdefault("speedup_vs_exact", values["queries_per_second"] / exact_qps[0])
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))

    # ground truth: exact search over normalize(h(stale)), h applied in float32 chunk by chunk
    def normalized(corrector):
        return lambda chunk: F.normalize(corrector(chunk), dim=1)

    started = time.perf_counter()
    truth = exact_search(stale, queries, k, transform=normalized(mlp))[1]
    truth_linear = exact_search(stale, queries, k, transform=normalized(correctors["linear"]))[1]
    truth_unnormalized_linear = exact_search(stale, queries, k, transform=correctors["linear"])[1]
    result["ground_truth_seconds"] = time.perf_counter() - started

    # 0. the stale IVF index, trained once per cache (at the start and after a full refresh)
    started = time.perf_counter()
    stale_ivf = build_faiss_index(stale, "ivf", nlist=args.nlist, train_size=args.ivf_train_size)
    result["stale_ivf_build_seconds"] = time.perf_counter() - started

    # 1. the rebuild a correcting miner does every N steps: the corrector applied chunk by chunk and the corrected
    # rows streamed into an IVF index that re-uses the stale index's trained cells (no k-means, no corrected copy)
    started = time.perf_counter()
    streamed_ivf = build_faiss_index(stale, "ivf", transform=normalized(mlp), like=stale_ivf, nprobe=args.nprobe[0])
    streamed_seconds = time.perf_counter() - started
    result["rebuild_streamed"] = {
        "apply_corrector_and_fill_ivf_seconds": streamed_seconds,
        "peak_rss_gib_so_far": peak_rss_gib(),
    }
    print(json.dumps(result["rebuild_streamed"], indent=2))

    def measure_ivf(index, label: str) -> None:
        for nprobe in args.nprobe:
            index.nprobe = nprobe
            found, qps = timed_search(faiss_search(index), queries, k)
            modes[f"ivf nlist={args.nlist} nprobe={nprobe} ({label})"] = {
                "queries_per_second": qps,
                "recall_at_k": recall(found, truth, k),
            }

    measure_ivf(streamed_ivf, "corrected, streamed rebuild, stale cells")
    del streamed_ivf
    write_partial()

    # 1b. for comparison, the two-pass rebuild: the corrected cache written to a float16 memmap, then k-means again
    started = time.perf_counter()
    corrected = corrected_matrix(stale, mlp, path=work / "corrected.npy")
    apply_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ivf = build_faiss_index(corrected, "ivf", nlist=args.nlist, train_size=args.ivf_train_size)
    ivf_seconds = time.perf_counter() - started
    result["rebuild"] = {
        "apply_corrector_seconds": apply_seconds,
        "ivf_build_seconds": ivf_seconds,
        "total_seconds": apply_seconds + ivf_seconds,
        "peak_rss_gib_so_far": peak_rss_gib(),
    }
    print(json.dumps(result["rebuild"], indent=2))
    write_partial()

    exact_queries = queries[: args.exact_queries]
    found, qps = timed_search(lambda q, n: exact_search(corrected, q, n)[1], exact_queries, k)
    modes["exact (chunked, float16 corrected memmap)"] = {
        "queries_per_second": qps,
        "recall_at_k": recall(found, truth[: args.exact_queries], k),
    }
    exact_qps.append(qps)
    measure_ivf(ivf, "corrected, rebuilt")
    del ivf
    print(json.dumps(modes, indent=2))
    write_partial()

    # 2. query-side linear correction: the stale index, never rebuilt, searched with q + W^T q
    linear = correctors["linear"]
    for nprobe in args.nprobe:
        stale_ivf.nprobe = nprobe
        search = faiss_search(stale_ivf)

        def query_side(q: torch.Tensor, n: int, search=search) -> torch.Tensor:
            return search(query_side_queries(linear, q), n)

        found, qps = timed_search(query_side, queries, k)
        modes[f"query-side linear, stale ivf nprobe={nprobe}"] = {
            "queries_per_second": qps,
            "recall_at_k": recall(found, truth_linear, k),
            "recall_at_k_vs_unnormalized_linear": recall(found, truth_unnormalized_linear, k),
        }

    # 3. two-step: query-side shortlist with h's least-squares linear part, exact re-rank by normalize(h(stale[rows]))
    sample_rows = np.sort(np.random.default_rng(args.seed).choice(args.size, 16384, replace=False))
    sample_cache = StaleEmbeddingCache(
        [str(i) for i in range(len(sample_rows))],
        torch.from_numpy(np.asarray(stale[sample_rows], dtype=np.float32)),
        [bytes(16)] * len(sample_rows),
        "sample",
    )
    weight = linear_part(mlp, sample_cache)
    for nprobe in args.nprobe[-2:]:
        stale_ivf.nprobe = nprobe
        search = faiss_search(stale_ivf)
        for shortlist in args.shortlist:

            def two_step(q: torch.Tensor, n: int, shortlist: int = shortlist, search=search) -> torch.Tensor:
                rows = search(q + q @ weight, shortlist)
                vectors = torch.from_numpy(np.asarray(stale[np.clip(rows.numpy(), 0, None).ravel()], dtype=np.float32))
                with torch.no_grad():
                    vectors = F.normalize(mlp(vectors), dim=1).reshape(*rows.shape, -1)
                scores = torch.einsum("bd,bkd->bk", q, vectors).masked_fill(rows < 0, -torch.inf)
                return rows.gather(1, scores.topk(n, dim=1).indices)

            found, qps = timed_search(two_step, queries, k)
            modes[f"two-step: stale ivf nprobe={nprobe} shortlist {shortlist}, mlp re-rank"] = {
                "queries_per_second": qps,
                "recall_at_k": recall(found, truth, k),
            }
    del stale_ivf
    print(json.dumps(modes, indent=2))
    write_partial()

    # 4. HNSW over the corrected matrix (its first --hnsw-size rows; ground truth recomputed on them)
    size = min(args.hnsw_size, args.size)
    subset = corrected[:size]
    started = time.perf_counter()
    hnsw = build_faiss_index(subset, "hnsw", hnsw_m=args.hnsw_m)
    result["hnsw"] = {"rows": size, "build_seconds": time.perf_counter() - started}
    subset_truth = exact_search(stale[:size], queries, k, transform=normalized(mlp))[1]
    found, subset_exact_qps = timed_search(lambda q, n: exact_search(subset, q, n)[1], exact_queries, k)
    result["hnsw"]["exact_queries_per_second_on_same_rows"] = subset_exact_qps
    for ef_search in args.ef_search:
        hnsw.hnsw.efSearch = ef_search
        found, qps = timed_search(faiss_search(hnsw), queries, k)
        modes[f"hnsw M={args.hnsw_m} efSearch={ef_search} on {size:,} rows (corrected)"] = {
            "queries_per_second": qps,
            "recall_at_k": recall(found, subset_truth, k),
            "speedup_vs_exact_on_same_rows": qps / subset_exact_qps,
        }
    del hnsw

    for values in modes.values():
        values.setdefault("speedup_vs_exact", values["queries_per_second"] / exact_qps[0])
    write_partial()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
