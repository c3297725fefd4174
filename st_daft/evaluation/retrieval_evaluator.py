"""Validation retrieval against document embeddings computed once.

While the document route is frozen (the ``corpus`` and ``align`` stages) its embeddings of the validation corpus do
not change, so re-encoding that corpus at every evaluation, as sentence-transformers'
:class:`~sentence_transformers.sentence_transformer.evaluation.InformationRetrievalEvaluator` does, spends most of
each evaluation recomputing the same vectors through the expensive encoder. :class:`CachedCorpusRetrievalEvaluator`
is that evaluator (same metrics, same names, same model-card entries) with the documents' embeddings given once:
each call encodes only the queries, through the query route.
"""

from __future__ import annotations

from typing import Any

import torch
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from torch import Tensor

__all__ = ["CachedCorpusRetrievalEvaluator"]


class CachedCorpusRetrievalEvaluator(InformationRetrievalEvaluator):
    """:class:`InformationRetrievalEvaluator` over precomputed document embeddings.

    Args:
        queries: query id -> query text.
        relevant_docs: query id -> ids of its relevant documents.
        corpus_ids: the ids of the rows of ``corpus_embeddings``, in order.
        corpus_embeddings: one row per document, from the (frozen) document route; for example rows of the stage's
            :class:`~st_daft.embeddings.cache.StaleEmbeddingCache`, exact while that route does not train.
        **kwargs: the other arguments of :class:`InformationRetrievalEvaluator` (``name``, ``ndcg_at_k``, ...).

    Example::

        rows = torch.tensor([cache.row_of_id[doc_id] for doc_id in corpus_ids])
        evaluator = CachedCorpusRetrievalEvaluator(queries, qrels, corpus_ids, cache.float32(rows), name="validation")
        evaluator(model)["validation_cosine_ndcg@10"]
    """

    def __init__(
        self,
        queries: dict[str, str],
        relevant_docs: dict[str, set[str]],
        corpus_ids: list[str],
        corpus_embeddings: Tensor,
        **kwargs: Any,
    ) -> None:
        if corpus_embeddings.ndim != 2 or len(corpus_ids) != corpus_embeddings.shape[0]:
            raise ValueError(
                f"corpus_embeddings must hold one row per corpus id: {len(corpus_ids)} ids, "
                f"embeddings of shape {tuple(corpus_embeddings.shape)}"
            )
        if len(set(corpus_ids)) != len(corpus_ids):
            raise ValueError("corpus_ids must be unique")
        # The parent keeps the texts only to encode them; with the embeddings given they are never read.
        super().__init__(queries, dict.fromkeys(corpus_ids, ""), relevant_docs, **kwargs)
        embeddings = corpus_embeddings.detach().float()
        if self.truncate_dim is not None:
            embeddings = embeddings[:, : self.truncate_dim]
        self.corpus_embeddings = embeddings

    def compute_all_metrics(
        self,
        model: Any,
        corpus_model: Any = None,
        corpus_embeddings: Tensor | None = None,
        output_path: str | None = None,
    ) -> dict[str, Any]:
        if corpus_embeddings is None:
            # Scored where the query embeddings are (the model's device).
            corpus_embeddings = self.corpus_embeddings.to(getattr(model, "device", torch.device("cpu")))
        return super().compute_all_metrics(model, corpus_model, corpus_embeddings, output_path)
