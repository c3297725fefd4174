"""A document store of a million rows: the memory and time to open it and read rows back.

Question: What memory and time does a document store of millions of rows take to open and read?
Command: ``python benchmarks/store_scale.py --folder runs/store-scale --rows 1000000 --output
    benchmarks/results/scale/store_scale_after.json``
Results: benchmarks/results/scale/store_scale_*.json
Page: docs/results/scale.md

A :class:`~st_daft.embeddings.store.DocumentEmbeddingStore` is filled with ``--rows`` synthetic ``--dimension``-d
float32 vectors for the texts ``"document 0"``, ``"document 1"``, ... under all-MiniLM-L6-v2's document key (written
once, outside the repository, in the store's own shards of 8,192 rows). Then, each in a fresh process so that its peak
resident memory is its own:

- ``sample``: open the store and read back ``--sample`` random rows (an evaluation corpus of that size);
- ``corpus``: open the store and read back every row in chunks of 65,536 (as a corpus cache is built over it),
  checking each chunk against the vectors written.

Each reports seconds, the row count read, and memory above the process's after loading the model (the store's own
cost): the peak of its anonymous resident memory (``RssAnon``, polled every 5 ms: what the process itself holds)
and, at the end, its file-backed resident memory (``RssFile``: pages of files mapped into the process, page cache
the kernel drops under pressure rather than memory the process owns). ``ru_maxrss`` counts both and is given too.
``--label`` names the code measured (e.g. a commit), so two runs can be compared.

    python benchmarks/store_scale.py --folder runs/store-scale --label after --output benchmarks/results/S.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from measure import AnonymousPeak, child_result, machine, peak_rss_mib, resident_mib, write_report

CHUNK = 65536


def synthetic_vectors(rows: np.ndarray, dimension: int) -> np.ndarray:
    """Deterministic vectors for ``rows`` (row i's depends on i only)."""
    columns = np.arange(dimension, dtype=np.float64)[None, :]
    return np.sin(np.asarray(rows, dtype=np.float64)[:, None] * 0.001 + columns * 0.37).astype(np.float32)


def vectors_of(texts: list[str], dimension: int) -> np.ndarray:
    """The vectors of texts ``"document i"``."""
    return synthetic_vectors(np.array([int(text.split()[1]) for text in texts]), dimension)


def texts(start: int, stop: int) -> list[str]:
    return [f"document {i}" for i in range(start, stop)]


def load_model():
    from sentence_transformers import SentenceTransformer

    from st_daft.models.asymmetric import default_document_encoder

    return SentenceTransformer(default_document_encoder(), device="cpu")


def fill(folder: Path, rows: int, dimension: int) -> None:
    from st_daft.embeddings.store import DocumentEmbeddingStore

    model = load_model()
    store = DocumentEmbeddingStore(folder)
    started = time.perf_counter()
    for start in range(0, rows, CHUNK):
        stop = min(rows, start + CHUNK)
        store.embeddings(model, texts(start, stop), lambda missing: vectors_of(missing, dimension))
    print(json.dumps({"filled_rows": rows, "seconds": round(time.perf_counter() - started, 1)}))


def measure(folder: Path, mode: str, rows: int, dimension: int, sample: int) -> dict:
    from st_daft.embeddings.store import DocumentEmbeddingStore

    model = load_model()
    from st_daft.embeddings.store import document_encoder_key

    encoder_key = document_encoder_key(model)  # hashing the parameters is not the store's cost
    base, base_peak = resident_mib(), peak_rss_mib()

    def never(missing: list[str]) -> np.ndarray:
        raise AssertionError(f"{len(missing)} rows missing from the store")

    started = time.perf_counter()
    read = 0
    with AnonymousPeak() as anonymous:
        store = DocumentEmbeddingStore(folder)
        if mode == "sample":
            picked = np.sort(np.random.default_rng(0).choice(rows, size=sample, replace=False))
            vectors = store.embeddings(model, [f"document {i}" for i in picked], never, encoder_key=encoder_key)
            np.testing.assert_array_equal(vectors, synthetic_vectors(picked, dimension))
            read = len(vectors)
        else:
            for start in range(0, rows, CHUNK):
                stop = min(rows, start + CHUNK)
                vectors = store.embeddings(model, texts(start, stop), never, encoder_key=encoder_key)
                for first in range(start, stop, 4096):  # checked in pieces: the check's own memory stays small
                    last = min(stop, first + 4096)
                    expected = synthetic_vectors(np.arange(first, last), dimension)
                    np.testing.assert_array_equal(vectors[first - start : last - start], expected)
                read += len(vectors)
            del vectors
    seconds = time.perf_counter() - started
    return {
        "mode": mode,
        "rows_read": read,
        "seconds": round(seconds, 2),
        "peak_anonymous_mib": round(anonymous.peak - base["RssAnon"], 1),
        "file_backed_at_end_mib": round(resident_mib()["RssFile"] - base["RssFile"], 1),
        "ru_maxrss_mib": round(peak_rss_mib() - base_peak, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="the store (outside the repository)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dimension", type=int, default=384)
    parser.add_argument("--sample", type=int, default=10_000)
    parser.add_argument("--label", default="", help="what code is measured (e.g. a commit)")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--child", choices=["fill", "sample", "corpus"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "fill":
        fill(args.folder, args.rows, args.dimension)
        return
    if args.child:
        print(json.dumps(measure(args.folder, args.child, args.rows, args.dimension, args.sample)))
        return

    def child(mode: str) -> dict:
        command = [sys.executable, __file__, "--child", mode, "--folder", str(args.folder), "--rows", str(args.rows)]
        command += ["--dimension", str(args.dimension), "--sample", str(args.sample)]
        return child_result(command)

    results: dict = {
        "label": args.label,
        "rows": args.rows,
        "dimension": args.dimension,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    if not any(args.folder.rglob("shard-*")):
        results["fill"] = child("fill")
    results["sample"] = child("sample")
    results["corpus"] = child("corpus")
    print(json.dumps(results, indent=1))
    write_report(args.output, results, indent=1)


if __name__ == "__main__":
    main()
