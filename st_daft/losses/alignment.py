"""DAFT stage 1: align the query route to a frozen document route."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.util import cos_sim
from torch import Tensor, nn

from st_daft.citations import DAFT_CITATION
from st_daft.embeddings.cache import StaleEmbeddingCache
from st_daft.losses.corpus_sample import resolve_sample_size, sample_corpus
from st_daft.models.asymmetric import DOCUMENT_ROUTE, route_or_model


class DAFTAlignmentLoss(nn.Module):
    def __init__(
        self,
        model: SentenceTransformer,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        document_cache: StaleEmbeddingCache | None = None,
        cache_negatives: bool = True,
        negative_sample_size: int | None = None,
    ) -> None:
        """
        Stage 1 of DAFT (Distribution-Aligned Fine-Tuning, Leonhardt, Jahnke & Anand 2022): the document route is
        frozen and only the query route (and its projection) learns. Heterogeneous dual encoders, whose query and
        document encoders share neither parameters nor initialisation, collapse to constant vectors when both sides
        are trained from the start with a contrastive loss. Training the query route alone against fixed document
        embeddings first moves the query embeddings into the document encoder's distribution; joint training
        (:class:`CollapseSafeContrastiveLoss`) then starts from aligned encoders.

        The loss is InfoNCE (:class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss`)
        of each query against its positive, the optional hard-negative columns and the other in-batch documents.
        Document embeddings are computed without gradient and with the document route in eval mode (no dropout), so
        the document side is a fixed function however the trainer sets the model.

        Because that function is fixed, a :class:`~st_daft.embeddings.cache.StaleEmbeddingCache` built with the same
        document
        route is exact: with ``document_cache`` the batch's documents are looked up instead of encoded (texts not in
        the cache are still encoded), and with ``cache_negatives`` every other cached document joins the softmax as
        a negative, the full-corpus softmax that aligns a static query route in a few hundred steps. Above 65,536
        cached documents (or ``negative_sample_size``) each step draws that many of them uniformly instead, and
        adds the sampled softmax's importance correction to their logits (:mod:`st_daft.losses.corpus_sample`): the
        cache stays where it is (a memory-mapped float16 cache stays on disk) and only the sample moves to the
        device.

        Args:
            model: an asymmetric model from :func:`st_daft.build_asymmetric_model` (or any Router model).
            scale: inverse temperature of the softmax.
            similarity_fct: similarity between query and document embeddings.
            document_cache: cache of document-route embeddings of the corpus, built from this model's current
                document route. Refused if its fingerprint does not match the route.
            cache_negatives: use every cached document that is not in the batch as an extra negative.
            negative_sample_size: cached negatives each step scores: None for all of them up to 65,536 documents
                and 16,384 drawn uniformly above, 0 for all of them always, else that many.

        Requirements:
            1. (query, positive) pairs or (query, positive, negative_1, ..., negative_n) tuples
            2. ``router_mapping`` mapping the first column to ``"query"`` and the others to ``"document"``

        Inputs:
            +-------------------------------------------------+--------+
            | Texts                                           | Labels |
            +=================================================+========+
            | (query, positive) pairs                         | none   |
            +-------------------------------------------------+--------+
            | (query, positive, negative_1, ..., negative_n)  | none   |
            +-------------------------------------------------+--------+

        Example:
            ::

                from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
                from st_daft import StaleEmbeddingCache, build_asymmetric_model, freeze_route
                from st_daft.losses.alignment import DAFTAlignmentLoss

                model = build_asymmetric_model(query_encoder="static")
                freeze_route(model, "document")
                cache = StaleEmbeddingCache.build(model, corpus)  # corpus: {doc_id: text}
                loss = DAFTAlignmentLoss(model, document_cache=cache)
                args = SentenceTransformerTrainingArguments(
                    output_dir="out", router_mapping={"query": "query", "positive": "document"}
                )
                SentenceTransformerTrainer(model=model, args=args, train_dataset=pairs, loss=loss).train()
        """
        super().__init__()
        self.model = model
        self.document_cache = document_cache
        self.cache_negatives = cache_negatives
        self.negative_sample_size = (
            resolve_sample_size(len(document_cache), negative_sample_size) if document_cache is not None else None
        )
        self.ranking_loss = MultipleNegativesRankingLoss(model, scale=scale, similarity_fct=similarity_fct)
        if document_cache is not None and not document_cache.is_current(model):
            raise ValueError(
                "document_cache was built with a different document route than this model's "
                "(fingerprint mismatch); rebuild it with StaleEmbeddingCache.build(model, corpus)"
            )

    def embed_documents(self, features: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Frozen document embeddings of one column and their cache rows (-1 where not cached)."""
        if self.document_cache is None:
            rows = torch.full((_batch_size(features),), -1, dtype=torch.long)
        else:
            rows = self.document_cache.rows_for_features(features)
        device = self.model.device
        if bool((rows >= 0).all()):
            return self.document_cache.embeddings[rows].to(device, torch.float32), rows
        document_route = route_or_model(self.model, DOCUMENT_ROUTE)
        was_training = document_route.training
        document_route.eval()
        try:
            with torch.no_grad():
                embeddings = self.model(features)["sentence_embedding"]
        finally:
            document_route.train(was_training)
        if self.document_cache is not None:
            cached = rows >= 0
            embeddings[cached] = self.document_cache.embeddings[rows[cached]].to(device, embeddings.dtype)
        return embeddings, rows

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError("DAFTAlignmentLoss needs (query, positive[, negatives...]) columns")
        query_embeddings = self.model(sentence_features[0])["sentence_embedding"]
        documents = [self.embed_documents(features) for features in sentence_features[1:]]
        embeddings = [query_embeddings] + [embedding for embedding, _ in documents]
        if self.document_cache is not None and self.cache_negatives:
            batch_rows = torch.cat([rows for _, rows in documents])
            if self.negative_sample_size is not None:
                return self._sampled_loss(embeddings, batch_rows)
            keep = torch.ones(len(self.document_cache), dtype=torch.bool)
            keep[batch_rows[batch_rows >= 0]] = False
            embeddings.append(self.document_cache.embeddings[keep].to(query_embeddings.device, torch.float32))
        return self.ranking_loss.compute_loss_from_embeddings(embeddings, labels)

    def _sampled_loss(self, embeddings: list[Tensor], batch_rows: Tensor) -> Tensor:
        """The ranking loss's InfoNCE (queries against the batch's documents) with uniformly drawn cached documents
        as more negatives, each logit corrected by its log-weight: an estimate of the whole cache's softmax."""
        queries = embeddings[0]
        sample = sample_corpus(
            self.document_cache.embeddings, None, self.negative_sample_size, queries.device, excluded=batch_rows
        )
        similarity, scale = self.ranking_loss.similarity_fct, self.ranking_loss.scale
        scores = torch.cat(
            [
                similarity(queries, torch.cat(embeddings[1:])) * scale,
                similarity(queries, sample.embeddings.to(queries.dtype)) * scale + sample.log_weights,
            ],
            dim=1,
        )
        return torch.nn.functional.cross_entropy(scores, torch.arange(len(queries), device=queries.device))

    def get_config_dict(self) -> dict[str, Any]:
        return {
            **self.ranking_loss.get_config_dict(),
            "frozen_route": DOCUMENT_ROUTE,
            "document_cache_size": len(self.document_cache) if self.document_cache is not None else 0,
            "cache_negatives": self.cache_negatives,
            "negative_sample_size": self.negative_sample_size or 0,
        }

    @property
    def citation(self) -> str:
        return DAFT_CITATION


def _batch_size(features: dict[str, Any]) -> int:
    if "offsets" in features:
        return len(features["offsets"])
    return len(features["input_ids"])
