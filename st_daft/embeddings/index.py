"""Search structures over a (corrected) document cache, built chunk by chunk so that a million-row float16 cache
never needs a full float32 copy.

- :func:`build_faiss_index`: an inner-product faiss index (``flat`` exact, ``ivf`` or ``hnsw`` approximate) filled
  chunk by chunk from a tensor or a (memory-mapped) array, optionally through a ``transform`` (the corrector: the
  corrected cache streams into the index and is never stored) and re-using a previous IVF index's trained cells
  (``like``: a rebuild after a corrector update skips k-means, it only re-assigns rows).
- :func:`corrected_matrix`: ``normalize(h(cache))`` computed chunk by chunk, into memory or into a float16 ``.npy``
  memmap.
- :func:`query_side_queries`: for a *linear* corrector ``h(e) = e + We + b`` the score ``q . h(e)`` equals
  ``(q + W^T q) . e + q . b``, and ``q . b`` is the same for every document, so searching the *stale* index with the
  corrected query ``q + W^T q`` ranks documents exactly as ``q . h(e)`` does: the index is never rebuilt. The
  miner's other modes rank by ``q . normalize(h(e))``; the two rankings differ by the norm of ``h(e)`` (close to 1
  with the MSE drift loss, which pulls ``h(e)`` towards unit fresh embeddings), measured in
  ``benchmarks/cache_scale.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "INDEX_KINDS",
    "build_faiss_index",
    "corrected_matrix",
    "exact_search",
    "query_side_queries",
    "as_float32_chunks",
]

INDEX_KINDS = ("flat", "ivf", "hnsw")


def as_float32_chunks(embeddings: Tensor | np.ndarray, chunk_size: int = 65536):
    """Yield ``(start, float32 numpy chunk)`` of a tensor or (memory-mapped) array, one chunk in memory at a time."""
    for start in range(0, len(embeddings), chunk_size):
        chunk = embeddings[start : start + chunk_size]
        if isinstance(chunk, Tensor):
            chunk = chunk.detach().to("cpu", torch.float32).numpy()
        yield start, np.ascontiguousarray(chunk, dtype=np.float32)


def build_faiss_index(
    embeddings: Tensor | np.ndarray,
    kind: str = "flat",
    nlist: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_search: int = 128,
    ef_construction: int = 40,
    seed: int = 0,
    chunk_size: int = 65536,
    train_size: int = 262144,
    storage: str = "float32",
    show_progress_bar: bool = False,
    transform: Any = None,
    like: Any = None,
) -> Any:
    """A faiss inner-product index over ``embeddings`` (rows: L2-normalised document embeddings), added in chunks.

    ``kind``: ``"flat"`` (``IndexFlatIP``: exact, the default), ``"ivf"`` (``IndexIVFFlat``, ``nlist`` cells, default
    about 4 sqrt(n), trained on up to ``train_size`` rows, searched with ``nprobe``) or ``"hnsw"`` (``IndexHNSWFlat``,
    ``hnsw_m`` links, ``ef_construction``, searched with ``ef_search``). ``storage="float16"`` keeps the vectors of
    any kind as float16 (faiss scalar quantizer; ``flat``: ``IndexScalarQuantizer``, still an exhaustive search):
    half the memory of a float32 index, and over a float16 cache the same scores up to float16 rounding, faster, and
    the same neighbours (docs/results/scale.md).

    ``transform`` maps each float32 chunk (a ``(rows, dim)`` tensor) before it is added, e.g.
    ``lambda chunk: F.normalize(corrector(chunk), dim=1)``: the index is built over the corrected cache without
    writing the corrected matrix anywhere. ``like`` is a previous index of the same kind and dimension (e.g. over the
    stale cache): an IVF index re-uses its trained cells instead of running k-means again (the corrector's drift moves
    rows a little; the cells still partition the space), any other kind is built as usual.
    """
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("a cache index needs faiss: pip install faiss-cpu") from None
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}: choose 'flat', 'ivf' or 'hnsw'")
    if storage not in ("float32", "float16"):
        raise ValueError(f"unknown index storage {storage!r}: choose 'float32' or 'float16'")
    size, dimension = int(embeddings.shape[0]), int(embeddings.shape[1])
    half = storage == "float16"
    if like is not None and kind == "ivf" and isinstance(like, faiss.IndexIVF):
        if like.d != dimension:
            raise ValueError(f"the index to re-use has dimension {like.d}, the embeddings {dimension}")
        index = faiss.clone_index(like)
        index.reset()  # keeps the trained cells, drops the rows
        index.nprobe = min(nprobe, index.nlist)
    elif kind == "flat" and half:
        index = faiss.IndexScalarQuantizer(dimension, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    elif kind == "flat":
        index = faiss.IndexFlatIP(dimension)
    elif kind == "ivf":
        cells = nlist or max(1, min(size // 39, int(4 * size**0.5)))
        quantizer = faiss.IndexFlatIP(dimension)
        if half:
            fp16 = faiss.ScalarQuantizer.QT_fp16
            index = faiss.IndexIVFScalarQuantizer(quantizer, dimension, cells, fp16, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFFlat(quantizer, dimension, cells, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        sample = np.sort(np.random.default_rng(seed).choice(size, min(size, train_size), replace=False))
        index.train(_transformed(_rows(embeddings, sample), transform))
        index.nprobe = min(nprobe, cells)
    else:
        if half:
            index = faiss.IndexHNSWSQ(dimension, faiss.ScalarQuantizer.QT_fp16, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.train(np.zeros((1, dimension), dtype=np.float32))  # fp16 needs no statistics
        else:
            index = faiss.IndexHNSWFlat(dimension, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    chunks = as_float32_chunks(embeddings, chunk_size)
    total = (size + chunk_size - 1) // chunk_size
    for _, chunk in tqdm(chunks, total=total, desc=f"faiss {kind} index", disable=not show_progress_bar):
        index.add(_transformed(chunk, transform))
    return index


@torch.no_grad()
def _transformed(chunk: np.ndarray, transform: Any) -> np.ndarray:
    if transform is None:
        return np.ascontiguousarray(chunk, dtype=np.float32)
    vectors = transform(torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)))
    return np.ascontiguousarray(vectors.detach().to("cpu", torch.float32).numpy())


@torch.no_grad()
def corrected_matrix(
    embeddings: Tensor | np.ndarray,
    corrector: torch.nn.Module,
    normalize: bool = True,
    chunk_size: int = 65536,
    path: str | Path | None = None,
    show_progress_bar: bool = False,
) -> Tensor | np.ndarray:
    """``h(embeddings)`` (L2-normalised by default), chunk by chunk on the corrector's device.

    Without ``path`` the result is a float32 tensor in memory. With ``path`` it is written into a float16 ``.npy``
    memmap there (half the memory of float32, and only one chunk in RAM at a time) and returned as that memmap.
    """
    parameter = next(corrector.parameters())
    size, dimension = int(embeddings.shape[0]), int(embeddings.shape[1])
    output: Tensor | np.ndarray
    if path is None:
        output = torch.empty(size, dimension, dtype=torch.float32)
    else:
        output = np.lib.format.open_memmap(Path(path), mode="w+", dtype=np.float16, shape=(size, dimension))
    total = (size + chunk_size - 1) // chunk_size
    chunks = as_float32_chunks(embeddings, chunk_size)
    for start, chunk in tqdm(chunks, total=total, desc="correcting the cache", disable=not show_progress_bar):
        corrected = corrector(torch.from_numpy(chunk).to(parameter.device))
        if normalize:
            corrected = F.normalize(corrected, dim=1)
        corrected = corrected.to("cpu", torch.float32)
        if isinstance(output, Tensor):
            output[start : start + len(corrected)] = corrected
        else:
            output[start : start + len(corrected)] = corrected.numpy().astype(np.float16)
    if isinstance(output, np.memmap):
        output.flush()
    return output


@torch.no_grad()
def exact_search(
    embeddings: Tensor | np.ndarray,
    queries: Tensor,
    k: int,
    transform: Any = None,
    chunk_size: int = 65536,
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner-product search of ``queries`` over a (memory-mapped, float16) matrix, chunk by chunk
    (one float32 chunk in memory at a time); ``transform`` maps each float32 chunk first (e.g. the corrector)."""
    queries = queries.to(torch.float32)
    best_scores = torch.full((len(queries), 0), -torch.inf)
    best_rows = torch.zeros((len(queries), 0), dtype=torch.long)
    for start, chunk in as_float32_chunks(embeddings, chunk_size):
        vectors = torch.from_numpy(chunk)
        if transform is not None:
            vectors = transform(vectors)
        scores = queries @ vectors.T
        top_scores, top_rows = scores.topk(min(k, scores.shape[1]), dim=1)
        best_scores = torch.cat([best_scores, top_scores], dim=1)
        best_rows = torch.cat([best_rows, top_rows + start], dim=1)
        best_scores, order = best_scores.topk(min(k, best_scores.shape[1]), dim=1)
        best_rows = best_rows.gather(1, order)
    return best_scores, best_rows


@torch.no_grad()
def query_side_queries(corrector: Any, queries: Tensor) -> Tensor:
    """``q + W^T q`` for a linear corrector ``h(e) = e + We + b``: searching stale embeddings ``e`` with it ranks them
    as ``q . h(e)`` does (``q . b`` is one constant per query)."""
    if not corrector.is_linear:
        raise ValueError(
            f"query-side correction needs a linear corrector (depth 1, no normalisation); this one has depth "
            f"{corrector.depth}: use index='two-step' (linear shortlist, exact re-rank) or a rebuilt index"
        )
    weight = corrector.mlp[0].weight.detach().to("cpu", torch.float32)  # nn.Linear: We is e @ weight.T
    queries = queries.to(torch.float32)
    return queries + queries @ weight


def _rows(embeddings: Tensor | np.ndarray, rows: np.ndarray) -> np.ndarray:
    if isinstance(embeddings, Tensor):
        return embeddings[torch.from_numpy(rows)].to(torch.float32).numpy()
    return np.asarray(embeddings[rows], dtype=np.float32)
