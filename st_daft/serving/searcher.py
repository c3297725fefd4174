"""A search over an index folder at lookup cost: a static query route, a faiss index and, for fusion, BM25; no torch.

An index folder (written by :func:`st_daft.build_search_index` or ``st-daft index``) holds

- ``manifest.json``: what the folder holds (documents, dimension, similarity, the document route's fingerprint, the
  faiss index's kind and options, the fusion settings) and the name of every file below;
- ``query/``: the query route as a model2vec folder (what ``st-daft export --format model2vec`` writes);
- ``documents/embeddings.npy``: the document route's embeddings of the corpus, float16 (or float32), memory-mapped
  (with the corpus cache's ``cache_metadata.json`` beside it, which also lets an interrupted build resume);
- ``ids.json``: the document ids, one per row;
- ``faiss.index``: the faiss inner-product index over those rows (exact ``flat`` below 100,000 documents, ``ivf``
  above), memory-mapped where faiss can when larger than :data:`MMAP_FAISS_BYTES` (a mapped IVF index searches
  several times slower than one in memory, so a small one is read whole);
- ``bm25/`` (optional): a bm25s index of the same corpus, tokenised as
  :class:`~st_daft.evaluation.baselines.BM25Search` does.

:meth:`Searcher.search` encodes the queries with the route (a table lookup, :class:`StaticQueryEncoder`), asks the
faiss index for each query's ``k`` best rows, and scores them again from the float16 embeddings (one dot product per
candidate), so an approximate index's results carry exact scores. With ``fuse_bm25`` it adds BM25's ``depth`` best
documents to the candidates and fuses ``similarity + weight * BM25 / best BM25``
(:mod:`st_daft.evaluation.fusion`, the rule ``st-daft evaluate --fuse-bm25`` ranks by): a document outside both
lists scores at most the ``k``-th dense score, so over an exact index the fused top ``k`` is the one an exhaustive
fusion gives. The searcher imports numpy, tokenizers, model2vec, faiss and, for fusion, bm25s; never torch,
transformers or mteb.

Example::

    from st_daft.serving import Searcher

    searcher = Searcher.load("scifact-index")
    ids, scores = searcher.search("do statins reduce mortality?", k=5, fuse_bm25=True)
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from st_daft.evaluation.fusion import DEFAULT_FUSION_WEIGHT, add_lexical_scores

logger = logging.getLogger(__name__)

__all__ = ["Searcher", "SearchIndexError", "MANIFEST_FILE", "INDEX_FORMAT", "INDEX_FORMAT_VERSION"]

MANIFEST_FILE = "manifest.json"
INDEX_FORMAT = "st-daft-search-index"
INDEX_FORMAT_VERSION = 1
DOCUMENT_FINGERPRINT_KEY = "st_daft_document_fingerprint"
"""The key of the query route's model2vec ``config.json`` naming the document route it was trained beside."""
CACHE_METADATA_FILE = "cache_metadata.json"  # st_daft's corpus cache, beside the embeddings
_FILES = ("query_route", "embeddings", "ids", "faiss")
MMAP_FAISS_BYTES = 256 * 2**20
"""faiss index files larger than this are memory-mapped (loading reads no vector), smaller ones read whole."""


class SearchIndexError(ValueError):
    """An index folder, or one of its files, cannot serve: missing, truncated, or from another document route."""


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise SearchIndexError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise SearchIndexError(f"{path}: {what} is not valid JSON ({error})") from None


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an index folder, checked for its format and the files it must name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SearchIndexError(f"{folder}: no such index folder")
    path = folder / MANIFEST_FILE
    manifest = _read_json(path, "the index manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise SearchIndexError(f"{path}: not an st-daft search index manifest")
    if manifest.get("format_version") != INDEX_FORMAT_VERSION:
        raise SearchIndexError(
            f"{path}: index format {manifest.get('format_version')!r}; this st-daft reads {INDEX_FORMAT_VERSION}"
        )
    missing = [key for key in _FILES if key not in manifest.get("files", {})]
    if missing or not {"documents", "dimension", "document_fingerprint"} <= manifest.keys():
        raise SearchIndexError(f"{path}: incomplete manifest (missing {missing or 'documents/dimension/fingerprint'})")
    return manifest


def open_embeddings(path: Path, shape: tuple[int, int], dtype: str = "float16") -> np.ndarray:
    """The embeddings file as a read-only memmap (no row is read yet), refused naming the file when it is missing,
    truncated, or of another shape or type."""
    if not path.is_file():
        raise SearchIndexError(f"{path}: document embeddings file not found")
    try:
        embeddings = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as error:
        raise SearchIndexError(f"{path}: document embeddings file is truncated or corrupt ({error})") from None
    if embeddings.shape != shape:
        raise SearchIndexError(f"{path}: embeddings of shape {embeddings.shape}, the manifest says {shape}")
    if embeddings.dtype != np.dtype(dtype):
        raise SearchIndexError(f"{path}: {embeddings.dtype} embeddings, the manifest says {dtype}")
    return embeddings


def _read_faiss(path: Path, size: int, dimension: int) -> Any:
    import faiss

    if not path.is_file():
        raise SearchIndexError(f"{path}: faiss index file not found")
    try:
        if path.stat().st_size <= MMAP_FAISS_BYTES:
            raise RuntimeError("small: read whole")
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        try:  # small, or a kind faiss cannot map: read it whole
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            raise SearchIndexError(f"{path}: faiss index is truncated or corrupt ({str(error)[:200]})") from None
    if index.ntotal != size or index.d != dimension:
        raise SearchIndexError(
            f"{path}: faiss index of {index.ntotal} x {index.d}, the manifest says {size} documents x {dimension}"
        )
    return index


def _as_list(queries: str | Sequence[str]) -> tuple[list[str], bool]:
    if isinstance(queries, str):
        return [queries], True
    queries = list(queries)
    bad = [type(query).__name__ for query in queries if not isinstance(query, str)]
    if bad:
        raise TypeError(f"queries must be strings, got {bad[0]}")
    return queries, False


class Searcher:
    """Top-``k`` search over an index folder: query route, faiss index, float16 embeddings, ids, optional BM25.

    Load one with :meth:`load`. The module docs describe the folder and how a query is answered.

    Attributes:
        ids: the document ids, one per row.
        manifest: the folder's manifest.
        timings: seconds spent in each phase of the last :meth:`search` call (``encode``, ``dense``, ``bm25``,
            ``fusion``).
    """

    def __init__(
        self,
        encoder: Any,
        embeddings: np.ndarray,
        ids: list[str],
        index: Any,
        manifest: dict[str, Any],
        lexical: Any = None,
        folder: Path | None = None,
    ) -> None:
        self.encoder = encoder
        self.embeddings = embeddings
        self.ids = ids
        self.index = index
        self.manifest = manifest
        self.lexical = lexical
        self.folder = folder
        self.normalize = manifest.get("similarity", "cosine") == "cosine"
        fusion = manifest.get("fusion", {})
        self.fusion_weight = float(fusion.get("weight", DEFAULT_FUSION_WEIGHT))
        self.depth = int(fusion.get("depth", 1000))
        self.timings: dict[str, float] = {}

    @classmethod
    def load(
        cls,
        folder: str | Path,
        query_route: str | Path | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        bm25: bool = True,
        threads: int | None = 1,
    ) -> Searcher:
        """Open an index folder: the manifest and ids are read, the embeddings and the faiss index memory-mapped.

        Args:
            folder: the index folder.
            query_route: another model2vec query route folder to search with (default: the folder's own); it must
                name the index's document route (its ``config.json``'s ``st_daft_document_fingerprint``).
            nprobe: an IVF index's cells searched per query (default: the manifest's).
            ef_search: an HNSW index's search breadth (default: the manifest's).
            bm25: open the BM25 index when the folder has one (needed for ``fuse_bm25``).
            threads: faiss's OpenMP threads for the process (``None``: leave faiss's setting). One by default: a
                query searches in well under a millisecond, and forking threads for it costs more than it saves,
                much more on a busy CPU; a service runs queries side by side instead.

        Raises:
            SearchIndexError: a file is missing, truncated or inconsistent with the manifest (named), or the query
                route or the embeddings come from another document route than the manifest records.
        """
        from st_daft.serving.static_encoder import StaticQueryEncoder

        folder = Path(folder)
        manifest = read_manifest(folder)
        files = manifest["files"]
        size, dimension = int(manifest["documents"]), int(manifest["dimension"])
        fingerprint = manifest["document_fingerprint"]

        route_folder = Path(query_route) if query_route is not None else folder / files["query_route"]
        route_config = _read_json(route_folder / "config.json", "the query route's config")
        paired = route_config.get(DOCUMENT_FINGERPRINT_KEY)
        if paired != fingerprint:
            raise SearchIndexError(
                f"{route_folder / 'config.json'}: this query route was exported beside document route {paired!r}; "
                f"the index's documents were embedded by {fingerprint!r} (manifest {folder / MANIFEST_FILE})"
            )
        encoder = StaticQueryEncoder(route_folder)
        if encoder.dimension != dimension:
            raise SearchIndexError(f"{route_folder}: {encoder.dimension}-d query route for {dimension}-d documents")

        embeddings_path = folder / files["embeddings"]
        cache_metadata = embeddings_path.parent / CACHE_METADATA_FILE
        if cache_metadata.is_file():  # the corpus cache's own record of the route that embedded the rows
            recorded = _read_json(cache_metadata, "the embeddings' metadata").get("fingerprint")
            if recorded != fingerprint:
                raise SearchIndexError(
                    f"{cache_metadata}: the document embeddings come from document route {recorded!r}, the manifest "
                    f"records {fingerprint!r}: these embeddings belong to another index"
                )
        embeddings = open_embeddings(embeddings_path, (size, dimension), manifest.get("embeddings_dtype", "float16"))

        ids_path = folder / files["ids"]
        ids = _read_json(ids_path, "the document ids")
        if not isinstance(ids, list) or len(ids) != size:
            count = len(ids) if isinstance(ids, list) else type(ids).__name__
            raise SearchIndexError(f"{ids_path}: {count} ids for {size} documents")
        ids = [str(document_id) for document_id in ids]

        index = _read_faiss(folder / files["faiss"], size, dimension)
        if threads is not None:
            import faiss

            faiss.omp_set_num_threads(threads)
        options = manifest.get("index", {}).get("options", {})
        probes = nprobe if nprobe is not None else options.get("nprobe")
        if probes is not None and hasattr(index, "nprobe"):
            index.nprobe = int(probes)
        breadth = ef_search if ef_search is not None else options.get("ef_search")
        if breadth is not None and hasattr(index, "hnsw"):
            index.hnsw.efSearch = int(breadth)

        lexical = None
        if bm25 and files.get("bm25"):
            from st_daft.evaluation.baselines import BM25Search

            try:
                lexical = BM25Search.load(folder / files["bm25"], ids)
            except (FileNotFoundError, ValueError) as error:
                raise SearchIndexError(str(error)) from None
        return cls(encoder, embeddings, ids, index, manifest, lexical, folder)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dimension(self) -> int:
        return int(self.embeddings.shape[1])

    def encode(self, queries: Sequence[str]) -> np.ndarray:
        """``(len(queries), dim)`` float32 query vectors (unit length for a cosine index; a query with no known token
        stays the zero vector)."""
        vectors = np.asarray(self.encoder.encode(list(queries)), dtype=np.float32)
        if self.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.where(norms > 0, norms, 1.0)
        return vectors

    def rows_scores(self, vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Dense scores of query ``vectors[i]`` against document rows ``rows[i]`` (``(queries, candidates)``), from
        the float16 embeddings (normalised for a cosine index)."""
        rows = np.asarray(rows).reshape(len(vectors), -1)
        scores = np.empty(rows.shape, dtype=np.float32)
        for query, (vector, query_rows) in enumerate(zip(vectors, rows)):
            order = np.argsort(query_rows, kind="stable")  # sorted reads of the memmap
            documents = np.asarray(self.embeddings[query_rows[order]], dtype=np.float32)
            values = np.einsum("cd,d->c", documents, vector)
            if self.normalize:
                values /= np.maximum(np.sqrt(np.einsum("cd,cd->c", documents, documents)), 1e-12)
            scores[query, order] = values
        return scores

    def dense_search(self, vectors: np.ndarray, k: int) -> np.ndarray:
        """``(queries, k)`` rows the faiss index finds best for each vector (``-1`` where it finds fewer)."""
        k = min(k, len(self))
        _, rows = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return rows

    def lexical_search(self, queries: Sequence[str], depth: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """BM25's ``depth`` best rows of each query and their scores over the query's best (``[0, 1]``)."""
        if self.lexical is None:
            bm25 = self.manifest["files"].get("bm25")
            hint = "it was built without --bm25" if not bm25 else "it was loaded with bm25=False"
            raise ValueError(f"fuse_bm25: the index {self.folder} has no BM25 index loaded ({hint})")
        return self.lexical.normalised_top_k(list(queries), depth or self.depth)

    def search(
        self,
        queries: str | Sequence[str],
        k: int = 10,
        fuse_bm25: float | bool | None = None,
        vectors: np.ndarray | None = None,
    ) -> tuple[list[str], np.ndarray] | tuple[list[list[str]], list[np.ndarray]]:
        """The ``k`` best documents of each query: ``(ids, scores)``, best first.

        For one string, a list of ids and an array of scores; for a list of strings, a list of each. A query whose
        vector is zero (empty, or none of its tokens known to the route) gets a warning and an empty result, or with
        ``fuse_bm25`` BM25's ranking alone (empty too when it shares no term with the corpus).

        Args:
            queries: a query text or a list of them.
            k: how many documents per query.
            fuse_bm25: BM25's weight in ``similarity + weight * BM25 / best BM25`` (``True``: the index's weight,
                0.15 by default; ``None`` or ``False``: dense similarity alone). Needs an index built with BM25.
            vectors: the queries' vectors, when encoded elsewhere (e.g. another encoder of the same document space);
                the route's encoding is skipped.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        texts, single = _as_list(queries)
        weight = self.fusion_weight if fuse_bm25 is True else float(fuse_bm25 or 0.0)
        if weight < 0 or not np.isfinite(weight):
            raise ValueError(f"fuse_bm25: BM25's weight must be a non-negative number, got {fuse_bm25}")
        fuse = fuse_bm25 is not None and fuse_bm25 is not False
        timings = {"encode": 0.0, "dense": 0.0, "bm25": 0.0, "fusion": 0.0}
        start = time.perf_counter()
        if vectors is None:
            vectors = self.encode(texts)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
        timings["encode"] = time.perf_counter() - start

        known = np.any(vectors != 0, axis=1)
        if not known.all():
            examples = ", ".join(repr(texts[row][:60]) for row in np.flatnonzero(~known)[:3])
            what = "BM25's ranking alone" if fuse else "no results"
            warnings.warn(
                f"{int((~known).sum())} of {len(texts)} queries have no token the query route knows ({examples}): "
                f"{what} for them",
                stacklevel=2,
            )
        start = time.perf_counter()
        rows = np.full((len(texts), min(k, len(self))), -1, dtype=np.int64)
        if known.any():
            rows[known] = self.dense_search(vectors[known], k)
        timings["dense"] = time.perf_counter() - start
        lexical_rows = lexical = None
        if fuse:
            start = time.perf_counter()
            lexical_rows, lexical = self.lexical_search(texts)
            timings["bm25"] = time.perf_counter() - start

        start = time.perf_counter()
        result_ids: list[list[str]] = []
        result_scores: list[np.ndarray] = []
        for query in range(len(texts)):
            dense_rows = rows[query][rows[query] >= 0]
            columns = np.zeros(0, dtype=np.int64)
            if fuse:
                # BM25's documents; without a query vector only those sharing a term with the query.
                keep = lexical[query] > 0 if not known[query] else np.ones(lexical.shape[1], dtype=bool)
                if lexical[query, :1].sum() <= 0:
                    keep[:] = False  # no term in common with any document: no lexical candidates
                query_rows, query_lexical = lexical_rows[query][keep], lexical[query][keep]
                candidates, columns = np.unique(np.concatenate([dense_rows, query_rows]), return_inverse=True)
                columns = columns[len(dense_rows) :]
            else:
                candidates = dense_rows
            if known[query]:
                scores = self.rows_scores(vectors[query : query + 1], candidates[None, :])
            else:
                scores = np.zeros((1, len(candidates)), dtype=np.float32)
            if len(columns):
                add_lexical_scores(scores, columns[None, :], query_lexical[None, :], weight)
            scores = scores[0]
            if not len(candidates):
                result_ids.append([])
                result_scores.append(np.zeros(0, dtype=np.float32))
                continue
            order = np.argsort(-scores, kind="stable")[:k]
            result_ids.append([self.ids[row] for row in candidates[order]])
            result_scores.append(scores[order])
        timings["fusion" if fuse else "dense"] += time.perf_counter() - start
        self.timings = timings
        if single:
            return result_ids[0], result_scores[0]
        return result_ids, result_scores

    def __repr__(self) -> str:
        kind = self.manifest.get("index", {}).get("kind")
        return (
            f"Searcher(documents={len(self):,}, dimension={self.dimension}, index={kind!r}, "
            f"bm25={self.lexical is not None}, folder={str(self.folder)!r})"
        )
