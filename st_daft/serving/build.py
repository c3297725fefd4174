"""Build an index folder a :class:`~st_daft.serving.Searcher` serves: ``st-daft index MODEL --data CORPUS --output
INDEX``.

:func:`build_search_index` takes an asymmetric model with a static query route and a corpus, and writes, in one
folder (its layout is in :mod:`st_daft.serving.searcher`'s docs):

1. the query route as a model2vec folder (:func:`~st_daft.serving.export_static_model`), recording the document
   route's fingerprint (:func:`~st_daft.models.fingerprint.encoding_fingerprint`), checked first, before any document is
   embedded: a route that is not static is refused;
2. the document route's embeddings of the corpus, float16 (or float32), through the corpus cache
   (:class:`~st_daft.embeddings.cache.StaleEmbeddingCache`): chunk by chunk into a memory-mapped file, sharded over
   ``torchrun`` processes, and read back by a resumed build (``resume=True``) when complete for this route and
   corpus;
3. the document ids, and a faiss inner-product index over the rows
   (:func:`~st_daft.embeddings.index.build_faiss_index`, float16 storage): ``flat`` (exact) below
   :data:`EXACT_INDEX_LIMIT` documents, ``ivf`` above, or as asked;
4. with ``bm25=True``, a bm25s index of the same texts (:class:`~st_daft.evaluation.baselines.BM25Search`: the
   tokenisation, stopwords and stemmer ``st-daft evaluate --baseline bm25`` and ``--fuse-bm25`` use);
5. ``manifest.json``, last: a folder without one is not an index.

:class:`SearcherRetrieval` wraps a loaded searcher as an MTEB search model, so ``evaluate_retrieval`` scores its
rankings with the judgements and code that score the model itself.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from st_daft.evaluation.fusion import DEFAULT_FUSION_WEIGHT
from st_daft.serving.searcher import (
    DOCUMENT_FINGERPRINT_KEY,
    INDEX_FORMAT,
    INDEX_FORMAT_VERSION,
    MANIFEST_FILE,
    Searcher,
)

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models import ModelMeta
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

__all__ = ["build_search_index", "SearcherRetrieval", "EXACT_INDEX_LIMIT", "SEARCH_INDEX_OPTIONS", "INDEX_CHOICES"]

EXACT_INDEX_LIMIT = 100_000
"""Corpora below this many documents get an exact (``flat``) index by default, larger ones ``ivf``."""

INDEX_CHOICES = ("auto", "flat", "ivf", "hnsw")
SEARCH_INDEX_OPTIONS = ("nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction", "train_size", "seed")
"""``--index-option`` keys: :func:`~st_daft.embeddings.index.build_faiss_index`'s integer settings."""
DEFAULT_NPROBE = 64
"""Cells an IVF index searches per query unless told otherwise (recall@10 against exact search is measured in
``benchmarks/search_end_to_end.py``)."""


def check_index_options(options: dict[str, Any]) -> dict[str, int]:
    """``options`` as integers, refused naming the key when it is unknown or not a positive integer."""
    checked = {}
    for key, value in options.items():
        if key not in SEARCH_INDEX_OPTIONS:
            raise ValueError(f"--index-option {key}: unknown; choose from {', '.join(SEARCH_INDEX_OPTIONS)}")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"--index-option {key}={value!r}: expected an integer") from None
        if number < (0 if key == "seed" else 1):
            raise ValueError(f"--index-option {key}={value}: must be positive")
        checked[key] = number
    return checked


def _write_faiss(index: Any, path: Path) -> None:
    import faiss

    temporary = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(temporary))
    os.replace(temporary, path)


def build_search_index(
    model: SentenceTransformer | str | Path,
    data: str | Path | dict[str, str],
    output: str | Path,
    index: str = "auto",
    index_options: dict[str, Any] | None = None,
    bm25: bool = False,
    batch_size: int = 64,
    query_dtype: str = "float32",
    embeddings_dtype: str = "auto",
    fusion_weight: float = DEFAULT_FUSION_WEIGHT,
    resume: bool = False,
    show_progress_bar: bool = True,
    document_store: Any = None,
    overwrite: bool = False,
    arguments: Sequence[str] | None = None,
) -> Path:
    """Write an index folder for :class:`~st_daft.serving.Searcher` (see the module docs); returns its path.

    Args:
        model: an asymmetric model (or its folder / Hub id) whose query route is static.
        data: a BEIR folder, a corpus file (JSON lines or one text a line, :func:`~st_daft.data.load_corpus`), or
            ``{id: text}``.
        output: the index folder: new or empty, or one ``st-daft index`` wrote (with ``resume`` or ``overwrite``;
            :func:`~st_daft.utils.output.claim_output`: nothing a user put there is removed).
        index: ``"auto"`` (``flat`` below :data:`EXACT_INDEX_LIMIT` documents, else ``ivf``), ``"flat"``,
            ``"ivf"`` or ``"hnsw"``.
        index_options: faiss settings (:data:`SEARCH_INDEX_OPTIONS`), e.g. ``{"nlist": 4096, "nprobe": 64}``.
        bm25: also write a BM25 index (the ``bm25`` extra) for ``Searcher.search(fuse_bm25=...)``.
        batch_size: the document route's encoding batch size.
        query_dtype: the query route table's type (``float32``, ``float16``, ``int8``).
        embeddings_dtype: the document embeddings' type: ``"auto"`` (``float32`` below :data:`EXACT_INDEX_LIMIT`
            documents, where it costs little, else ``float16``), ``float16`` (half the disk and memory) or
            ``float32`` (the very scores ``st-daft evaluate`` computes; float16 rounding moves a score a little,
            which reorders near-ties); the faiss index stores the same type.
        fusion_weight: BM25's weight when a search asks for fusion without one.
        resume: finish an interrupted build in ``output``: complete embeddings of this route and corpus are read
            back instead of computed again.
        show_progress_bar: progress bars for embedding, the faiss index and BM25.
        document_store: a :class:`~st_daft.embeddings.store.DocumentEmbeddingStore` (or its folder) to read the document
            route's embeddings from where it holds them (e.g. filled by ``st-daft evaluate --document-store``).
        overwrite: replace an index ``st-daft index`` wrote in ``output`` (only what it wrote is removed).
        arguments: the command line, recorded in the folder's marker.

    Raises:
        ValueError: a query route that is not static, an unknown index kind or option, a non-empty ``output``, a
            similarity other than cosine or dot; :class:`~st_daft.data.DataError` for a bad corpus.
    """
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from st_daft.data import load_corpus
    from st_daft.embeddings.store import DocumentEmbeddingStore
    from st_daft.models.fingerprint import encoding_fingerprint
    from st_daft.serving import export_static_model
    from st_daft.utils.distributed import init_distributed
    from st_daft.utils.output import claim_output

    if embeddings_dtype not in ("auto", "float16", "float32"):
        raise ValueError(f"embeddings dtype {embeddings_dtype!r}: choose auto, float16 or float32")
    if index not in INDEX_CHOICES:
        raise ValueError(f"index {index!r}: choose one of {', '.join(INDEX_CHOICES)}")
    options = check_index_options(dict(index_options or {}))
    if not (np.isfinite(fusion_weight) and fusion_weight >= 0):
        raise ValueError(f"fusion weight must be a non-negative number, got {fusion_weight}")
    if bm25:
        from st_daft.evaluation.baselines import BM25Search

        BM25Search()  # the bm25 extra, checked before any work
    output = Path(output)
    reads = [(what, source) for what, source in (("the model indexed", model), ("the corpus", data))]
    reads = [(what, source) for what, source in reads if isinstance(source, (str, Path))]
    claimed = claim_output(output, "index", arguments, overwrite=overwrite, resume=resume, reads=reads)
    if resume and claimed.previous is not None and claimed.previous.get("command") != "index":
        raise ValueError(f"--output {output}: --resume continues an `st-daft index` build; this folder holds another")
    label = str(model) if isinstance(model, (str, Path)) else model.model_card_data.model_name
    if not isinstance(model, SentenceTransformer):
        model = SentenceTransformer(str(model))
    similarity = model.similarity_fn_name or "cosine"
    if similarity not in ("cosine", "dot"):
        raise ValueError(f"the model's similarity is {similarity!r}; an index serves cosine or dot only")
    fingerprint = encoding_fingerprint(model)
    # The query route first: a route that cannot be served without torch is refused before any document is embedded.
    route = export_static_model(model, dtype=query_dtype, config={DOCUMENT_FINGERPRINT_KEY: fingerprint})
    corpus = data if isinstance(data, dict) else load_corpus(data)
    if not corpus:
        raise ValueError(f"--data {data}: the corpus is empty")
    if embeddings_dtype == "auto":  # exact scores where the index is small; half the memory where it is not
        embeddings_dtype = "float32" if len(corpus) < EXACT_INDEX_LIMIT else "float16"
    store = document_store
    if store is not None and not isinstance(store, DocumentEmbeddingStore):
        store = DocumentEmbeddingStore(store)
    init_distributed()
    with claimed.writing(planned=[MANIFEST_FILE, "query", "documents", "ids.json", "faiss.index", "bm25"]):
        return _write_index(
            model, corpus, output, route, fingerprint, similarity, label, index, options, bm25, batch_size, store,
            resume, embeddings_dtype, fusion_weight, show_progress_bar,
        )  # fmt: skip


def _write_index(
    model: Any,
    corpus: dict[str, str],
    output: Path,
    route: Any,
    fingerprint: str,
    similarity: str,
    label: str | None,
    index: str,
    options: dict[str, int],
    bm25: bool,
    batch_size: int,
    store: Any,
    resume: bool,
    embeddings_dtype: str,
    fusion_weight: float,
    show_progress_bar: bool,
) -> Path:
    """Everything :func:`build_search_index` writes, into the claimed folder."""
    import torch

    from st_daft.embeddings.cache import StaleEmbeddingCache
    from st_daft.embeddings.index import build_faiss_index
    from st_daft.utils.distributed import barrier, is_main_process
    from st_daft.utils.io import atomic_write_json

    if is_main_process():
        (output / MANIFEST_FILE).unlink(missing_ok=True)  # not an index until the manifest is written again
    barrier()

    cache = StaleEmbeddingCache.build(
        model,
        corpus,
        batch_size=batch_size,
        dtype=torch.float16 if embeddings_dtype == "float16" else torch.float32,
        show_progress_bar=show_progress_bar,
        folder=output / "documents",
        store=store,
        reuse=resume,
    )
    if not is_main_process():
        return output
    size, dimension = len(cache), cache.dimension
    kind = index if index != "auto" else ("flat" if size < EXACT_INDEX_LIMIT else "ivf")
    if kind == "ivf":
        options.setdefault("nprobe", DEFAULT_NPROBE)
    if kind == "hnsw":
        options.setdefault("ef_search", 128)

    query_folder = output / "query"
    if query_folder.exists():
        shutil.rmtree(query_folder)
    route.save_pretrained(str(query_folder), model_name=f"Query route of {label or 'an asymmetric model'}")
    atomic_write_json(output / "ids.json", cache.ids, indent=None)

    def normalise(chunk: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(chunk, dim=1)

    faiss_index = build_faiss_index(
        cache.embeddings,
        kind,
        storage=embeddings_dtype,
        show_progress_bar=show_progress_bar,
        transform=normalise if similarity == "cosine" else None,
        **options,
    )
    _write_faiss(faiss_index, output / "faiss.index")
    files: dict[str, Any] = {
        "query_route": "query",
        "embeddings": "documents/embeddings.npy",
        "ids": "ids.json",
        "faiss": "faiss.index",
        "bm25": None,
    }
    if bm25:
        from st_daft.evaluation.baselines import BM25Search

        lexical = BM25Search(show_progress_bar=show_progress_bar).index_texts(cache.ids, list(corpus.values()))
        bm25_folder = output / "bm25"
        if bm25_folder.exists():
            shutil.rmtree(bm25_folder)
        lexical.save(bm25_folder)
        files["bm25"] = "bm25"
    manifest = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "model": label,
        "documents": size,
        "dimension": dimension,
        "similarity": similarity,
        "document_fingerprint": fingerprint,
        "embeddings_dtype": embeddings_dtype,
        "index": {"kind": kind, "storage": embeddings_dtype, "options": options},
        "fusion": {"weight": float(fusion_weight), "depth": 1000},
        "files": files,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(output / MANIFEST_FILE, manifest)
    logger.info("search index: %d documents, %s index%s, in %s", size, kind, " + BM25" if bm25 else "", output)
    return output


class SearcherRetrieval:
    """A :class:`~st_daft.serving.Searcher` as an MTEB search model (``index``, ``search``): ``evaluate_retrieval``
    scores its rankings as it scores a SentenceTransformer's.

    ``index`` checks that the collection's corpus is the one the searcher's folder indexes (the same ids); ``search``
    returns each query's ``top_k`` documents (at most ``max_top_k``: 100 by default, which every score MTEB reports
    up to 100 needs).

    Args:
        searcher: a loaded searcher, or an index folder.
        fuse_bm25: as :meth:`Searcher.search`'s.
        max_top_k: the most documents returned per query.
        encode: query texts -> ``(queries, dim)`` vectors, to search with another query encoder of the same
            document space (e.g. the document model itself); the searcher's route by default.
    """

    def __init__(
        self,
        searcher: Searcher | str | Path,
        fuse_bm25: float | bool | None = None,
        max_top_k: int = 100,
        encode: Any = None,
    ) -> None:
        self.searcher = searcher if isinstance(searcher, Searcher) else Searcher.load(searcher)
        self.fuse_bm25 = fuse_bm25
        self.max_top_k = max_top_k
        self.encode = encode
        fused = "" if fuse_bm25 in (None, False) else " + BM25"
        self.name = f"index {self.searcher.folder}{fused}"

    @property
    def mteb_model_meta(self) -> ModelMeta:
        from mteb.models import ModelMeta

        return ModelMeta.create_empty(overwrites={"name": "st-daft/search-index", "revision": str(self.fuse_bm25)})

    def index(self, corpus: Any, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str, **kwargs: Any) -> None:
        """Check that ``corpus`` is the indexed one."""
        ids = {str(document_id) for document_id in corpus["id"]}
        indexed = set(self.searcher.ids)
        if ids != indexed:
            raise ValueError(
                f"the index {self.searcher.folder} holds {len(indexed)} documents, the collection {len(ids)} "
                f"({len(ids - indexed)} of them not indexed): build the index from this collection"
            )

    def search(
        self,
        queries: Any,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        top_k: int,
        top_ranked: dict[str, list[str]] | None = None,
        **kwargs: Any,
    ) -> dict[str, dict[str, float]]:
        """Each query's ``top_k`` documents with their scores."""
        from st_daft.evaluation.baselines import mteb_query_texts

        if top_ranked:
            raise ValueError("SearcherRetrieval does not re-rank given candidates (top_ranked)")
        query_ids, texts = mteb_query_texts(queries)
        k = min(top_k, self.max_top_k)
        results: dict[str, dict[str, float]] = {}
        for start in range(0, len(texts), 256):
            chunk = texts[start : start + 256]
            vectors = None if self.encode is None else self.encode(chunk)
            ids, scores = self.searcher.search(chunk, k=k, fuse_bm25=self.fuse_bm25, vectors=vectors)
            for query_id, query_ids_found, query_scores in zip(query_ids[start : start + 256], ids, scores):
                results[query_id] = {doc: float(score) for doc, score in zip(query_ids_found, query_scores)}
        return results
