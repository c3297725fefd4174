"""Hybrid search: a dense model's similarity fused with BM25's, as one MTEB search model.

A light query route and BM25 fail on different queries: the route misses rare names that a document states
exactly (a drug, a gene, a function), BM25 misses documents that answer in other words. Their scores fused,

    ``score(q, d) = sim(q, d) + weight * BM25(q, d) / max_d' BM25(q, d')``

(the query's BM25 scores divided by its best one, so in ``[0, 1]`` like a cosine), rank better than either on
collections of both kinds, where BM25 is strong (SciFact) and where it is weak (python-faq): the figures, per
weight and seed, are on the docs' results page "Fusion with BM25" (docs/results/fusion.md). The query side stays
inference-free: a table lookup for the route, a tokenizer and an inverted index for BM25. This is the fusion the
corpus stage's lexical teacher distils (:func:`~st_daft.label_free.corpus_texts.lexical_ranking_columns`), here applied
at
search time instead.

:class:`HybridSearch` implements MTEB's search protocol (``index``, ``search``), so
:func:`~st_daft.evaluation.mteb.evaluate_retrieval` and ``st-daft evaluate --fuse-bm25`` score it with the same code and
judgements as the dense model alone. BM25 is :class:`~st_daft.evaluation.baselines.BM25Search` (the ``bm25`` extra).

Example::

    from sentence_transformers import SentenceTransformer
    from st_daft import HybridSearch, evaluate_retrieval

    model = SentenceTransformer("path/to/trained-route")
    print(evaluate_retrieval(HybridSearch(model, weight=0.15), "data/scifact")["ndcg_at_10"])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from st_daft.embeddings.encode import embed_documents
from st_daft.evaluation.baselines import BM25Search, mteb_corpus_texts, mteb_query_texts
from st_daft.evaluation.collapse import warn_zero_query_vectors
from st_daft.evaluation.fusion import DEFAULT_FUSION_WEIGHT, add_lexical_scores

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models import ModelMeta
    from sentence_transformers import SentenceTransformer

    from st_daft.embeddings.store import DocumentEmbeddingStore
    from st_daft.evaluation.baselines import BM25Search

__all__ = ["HybridSearch", "DEFAULT_FUSION_WEIGHT"]

_SIMILARITIES = ("cosine", "dot")


class HybridSearch:
    """A SentenceTransformer's similarity plus ``weight`` times BM25's score over the query's best, as an MTEB search
    model.

    Documents are encoded with ``model.encode_document`` (read from ``document_store`` where it holds them) and
    queries with ``model.encode_query``, so a Router model uses its two routes as in dense evaluation. Every document
    gets its exact similarity; BM25 scores come from BM25's ``depth`` best documents of each query (when re-ranking
    too), the others count as 0. With ``weight=0`` the ranking is the dense model's. The document
    embeddings are held in memory in float32, as in MTEB's own dense search, and scored against a chunk of queries
    at a time (at most :attr:`max_scores_per_chunk` scores: 2**28, 1 GiB).

    Args:
        model: the dense model; its ``similarity_fn_name`` must be ``"cosine"`` (the default) or ``"dot"``.
        weight: BM25's weight in the fused score (non-negative).
        depth: how many of BM25's best documents per query are scored lexically.
        lexical: the BM25 search model; :class:`~st_daft.evaluation.baselines.BM25Search` with its defaults when None.
        document_store: a :class:`~st_daft.embeddings.store.DocumentEmbeddingStore` to read document embeddings from.
        name: the model's label in results; ``"<model name> + BM25"`` by default.

    Raises:
        ValueError: a negative or non-finite ``weight``, ``depth`` below 1, or another similarity function.
        ImportError: the ``bm25`` extra is not installed (when ``lexical`` is None).
    """

    max_scores_per_chunk: int = 2**28

    def __init__(
        self,
        model: SentenceTransformer,
        weight: float = DEFAULT_FUSION_WEIGHT,
        depth: int = 1000,
        lexical: BM25Search | None = None,
        document_store: DocumentEmbeddingStore | None = None,
        name: str | None = None,
    ) -> None:
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"HybridSearch: weight (--fusion-weight) must be a non-negative number, got {weight}")
        if depth < 1:
            raise ValueError(f"HybridSearch: depth must be at least 1, got {depth}")
        similarity = model.similarity_fn_name or "cosine"
        if similarity not in _SIMILARITIES:
            raise ValueError(f"HybridSearch: the model's similarity must be one of {_SIMILARITIES}, got {similarity!r}")
        if lexical is None:
            lexical = BM25Search()
        self.model = model
        self.weight = float(weight)
        self.depth = depth
        self.lexical = lexical
        self.document_store = document_store
        self.normalize = similarity == "cosine"
        model_name = model.model_card_data.model_name or model.model_card_data.base_model or "model"
        self.name = name or f"{model_name} + BM25"
        self._document_ids: list[str] = []
        self._documents: torch.Tensor | None = None

    @property
    def mteb_model_meta(self) -> ModelMeta:
        """MTEB's description of the model (its name labels the results)."""
        from mteb.models import ModelMeta

        return ModelMeta.create_empty(overwrites={"name": "st-daft/hybrid-bm25", "revision": f"w={self.weight:g}"})

    def index(
        self,
        corpus: Any,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        encode_kwargs: dict[str, Any],
        num_proc: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Index the corpus for BM25 and encode it with the document route (an MTEB corpus: ``id``, ``text``,
        optionally ``title``)."""

        self._document_ids, texts = mteb_corpus_texts(corpus)
        self.lexical.index_texts(self._document_ids, texts, task_metadata, hf_subset)
        documents = embed_documents(
            self.model,
            texts,
            batch_size=encode_kwargs.get("batch_size", 64),
            show_progress_bar=encode_kwargs.get("show_progress_bar", False),
            store=self.document_store,
        )
        self._documents = F.normalize(documents, dim=-1) if self.normalize else documents

    @property
    def document_ids(self) -> list[str]:
        """The indexed documents' ids: the columns of :meth:`fused_scores`."""
        return list(self._document_ids)

    def fused_scores(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """``(len(texts), documents)`` fused scores of the indexed corpus (columns in :attr:`document_ids` order);
        BM25 over each text's ``depth`` best documents."""

        if self._documents is None:
            raise RuntimeError("HybridSearch.fused_scores before index")
        queries = self.model.encode_query(texts, batch_size=batch_size, convert_to_numpy=True)
        warn_zero_query_vectors(queries)
        queries = torch.from_numpy(np.asarray(queries, dtype=np.float32))
        if self.normalize:
            queries = F.normalize(queries, dim=-1)
        scores = queries @ self._documents.T
        if self.weight > 0:
            rows, lexical = self.lexical.normalised_top_k(texts, self.depth)
            add_lexical_scores(scores.numpy(), rows, lexical, self.weight)  # the searcher's fusion too
        return scores

    def search(
        self,
        queries: Any,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        top_k: int,
        encode_kwargs: dict[str, Any],
        top_ranked: dict[str, list[str]] | None = None,
        num_proc: int | None = None,
        **kwargs: Any,
    ) -> dict[str, dict[str, float]]:
        """The ``top_k`` documents of each query by fused score (re-ranking ``top_ranked`` when given)."""

        if self._documents is None:
            raise RuntimeError("HybridSearch.search before index")
        query_ids, texts = mteb_query_texts(queries)
        count = len(self._document_ids)
        batch_size = encode_kwargs.get("batch_size", 64)
        row_of = {document_id: row for row, document_id in enumerate(self._document_ids)} if top_ranked else {}
        results: dict[str, dict[str, float]] = {}
        # Chunks of queries: one chunk's scores over the whole corpus (at most max_scores_per_chunk) at a time.
        chunk = max(1, min(256, self.max_scores_per_chunk // max(count, 1)))
        for start in range(0, len(texts), chunk):
            scores = self.fused_scores(texts[start : start + chunk], batch_size=batch_size)
            chunk_ids = query_ids[start : start + chunk]
            if not top_ranked:
                values, rows = torch.topk(scores, min(top_k, count), dim=1)
                for query_id, query_rows, query_values in zip(chunk_ids, rows.tolist(), values.tolist()):
                    results[query_id] = {self._document_ids[r]: v for r, v in zip(query_rows, query_values)}
                continue
            for offset, query_id in enumerate(chunk_ids):
                # Only the query's candidates (each once), best first; a query without a list ranks every document.
                candidates = list(dict.fromkeys(top_ranked.get(query_id, self._document_ids)))
                rows = torch.tensor([row_of[d] for d in candidates if d in row_of], dtype=torch.long)
                values, order = torch.topk(scores[offset, rows], min(top_k, len(rows)))
                results[query_id] = {self._document_ids[r]: v for r, v in zip(rows[order].tolist(), values.tolist())}
        return results

    def __repr__(self) -> str:
        return f"HybridSearch(name={self.name!r}, weight={self.weight:g}, depth={self.depth}, lexical={self.lexical!r})"
