"""The vocabulary stage (static query routes, label-free): every token of the query tokenizer is embedded by the
document route, the tokens of the corpus take their mean contextual vectors over it, and the static table starts
from those vectors (:mod:`st_daft.label_free.vocabulary`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments

from st_daft.embeddings.cache import StaleEmbeddingCache
from st_daft.evaluation.collapse import CollapseEvaluator
from st_daft.label_free.token_statistics import TokenStatistics, contextual_token_statistics, mean_pooled_transformer
from st_daft.label_free.vocabulary import (
    add_words_to_static_route,
    corpus_token_weights,
    corpus_words,
    corpus_words_unsupported,
    initialize_static_route,
    reweight_static_route,
)
from st_daft.models.asymmetric import (
    DOCUMENT_ROUTE,
    QUERY_ROUTE,
    get_route,
    has_route,
    route_prompt,
)
from st_daft.training.stages.base import KL_EVALUATOR_NAME, Stage, StageContext, StageResult, _require_resolved
from st_daft.training.stages.settings import non_negative_int, positive_int, setting, switch

logger = logging.getLogger(__name__)


@dataclass
class VocabularyStage(Stage):
    """Static query routes: start the table from the document route's vectors of each vocabulary token.

    Every token is first embedded alone by the document route (model2vec's distillation). With contextual vectors,
    the tokens the corpus contains then take the mean of their contextual output vectors over the corpus instead:
    for a mean-pooled document route that is the static table closest to the route on this corpus
    (:func:`~st_daft.label_free.token_statistics.contextual_token_statistics`). It fits the route to the corpus's
    senses of its words, which is what a corpus-only run wants and hurts a collection unlike the training one, so
    ``"auto"`` turns it on for a corpus alone only (figures: docs/results/corpus-only.md and
    docs/results/experiments.md).

    Args:
        zipf_weighting: weight token vectors by log(1 + rank) (model2vec's distillation).
        idf_weighting: then set every row's norm to its token's BM25 inverse document frequency over the corpus
            (:func:`~st_daft.label_free.vocabulary.corpus_token_weights`), keeping its direction: rare words of this
            corpus
            count more in a query than common ones, as in BM25.
        contextual: take contextual vectors for the corpus's tokens. Default (None): on for a corpus without
            labelled queries, off beside them. Needs a mean-pooled document route (skipped with a warning
            otherwise).
        max_documents: documents read for the contextual vectors and the corpus words (a seeded sample of a larger
            corpus): one pass of the document route over them. When they are the whole corpus, that pass also
            gives the corpus cache of the later stages
            (:meth:`~st_daft.embeddings.cache.StaleEmbeddingCache.from_embeddings`).
        batch_size: documents per document-route batch in that pass.
        corpus_words: add up to this many of the corpus's words that the query tokenizer splits into pieces as
            whole-word rows of the table (:func:`~st_daft.label_free.vocabulary.add_words_to_static_route`), the words
            in most
            documents first; 0 adds none. Default (None): 20,000 for a corpus without labelled queries, 0 beside
            them. Needs a WordPiece tokenizer and a table as wide as the route (no ``Dense`` after it): the
            default is 0 on other routes, a count given is refused before any step.
        min_word_documents: a word is added only when at least this many documents contain it.
    """

    name: ClassVar[str] = "vocabulary"
    folder: ClassVar[str] = "stage-vocabulary"
    needs_labels: ClassVar[bool] = False
    zipf_weighting: bool = switch(True, flag="--no-zipf", help="vocabulary stage without Zipf weighting")
    idf_weighting: bool = switch(
        False,
        flag="--idf-weights",
        help="vocabulary stage: each token's weight in a query is its BM25 IDF over the corpus (row norms)",
    )
    contextual: bool | None = setting(
        None,
        flag="--contextual-vocabulary",
        help="vocabulary stage: the corpus's tokens take their mean contextual vectors over the corpus (one pass of "
        "the document encoder over it); auto (default): on for a corpus alone, off beside labelled queries",
        choices=["auto", "on", "off"],
        to_field={"auto": None, "on": True, "off": False}.get,
    )
    max_documents: int = 20000
    batch_size: int = 32
    corpus_words: int | None = setting(
        None,
        flag="--corpus-words",
        help="vocabulary stage: give up to N of the corpus's words that the tokenizer splits into pieces their own "
        "whole-word rows in the static query route, words in most documents first (default: 20000 for a corpus "
        "alone, 0 beside labelled queries)",
        type=non_negative_int,
    )
    min_word_documents: int = setting(
        2,
        flag="--min-word-documents",
        help="vocabulary stage: a corpus word gets its own row only if at least N documents hold it (default 2; 1 "
        "admits words a single document holds)",
        type=positive_int,
    )

    def __post_init__(self) -> None:
        if (self.corpus_words is not None and self.corpus_words < 0) or self.min_word_documents < 1:
            raise ValueError(
                f"vocabulary stage: corpus_words must be >= 0 and min_word_documents >= 1, got {self.corpus_words} "
                f"and {self.min_word_documents}"
            )
        if self.max_documents < 1 or self.batch_size < 1:
            raise ValueError(
                f"vocabulary stage: max_documents and batch_size must be at least 1, got {self.max_documents} and "
                f"{self.batch_size}"
            )

    def resolved(self, context: StageContext) -> VocabularyStage:
        """Contextual vectors and corpus words as set, or else by the run: for a corpus alone, contextual vectors on
        and up to 20,000 corpus words (where the route can take them); beside labelled queries, neither."""
        alone = context.train_data is None
        contextual = alone if self.contextual is None else self.contextual
        words = self.corpus_words
        if words is None:
            words = 20000 if alone and corpus_words_unsupported(context.model) is None else 0
        return replace(self, contextual=contextual, corpus_words=words)

    def check(self, context: StageContext) -> None:
        reason = corpus_words_unsupported(context.model) if self.corpus_words else None
        if reason is not None:
            raise ValueError(f"vocabulary stage: corpus_words (--corpus-words) cannot be used: {reason}")

    def applies_to(self, model: SentenceTransformer) -> str | None:
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding

        if not has_route(model, QUERY_ROUTE) or not isinstance(get_route(model, QUERY_ROUTE)[0], StaticEmbedding):
            return "the query route does not start with a StaticEmbedding"
        return None

    def run(self, context: StageContext, args: SentenceTransformerTrainingArguments | None = None) -> StageResult:
        _require_resolved(self, "contextual")
        _require_resolved(self, "corpus_words")
        documents = self._sampled_documents(context) if self.corpus_words or self.contextual else []
        words: list[str] = []
        if self.corpus_words:
            static = get_route(context.model, QUERY_ROUTE)[0]
            words = corpus_words(static.tokenizer, documents, self.corpus_words, self.min_word_documents)
        statistics = self._contextual_statistics(context, documents, words) if self.contextual else None
        added = add_words_to_static_route(context.model, words) if words else 0
        if words:
            logger.info("vocabulary stage: %d corpus words added to the query route's vocabulary", added)
        info = initialize_static_route(
            context.model,
            zipf_weighting=self.zipf_weighting,
            store=context.store,
            contextual=statistics,
            contextual_words=words,
        )
        info["contextual"] = statistics is not None
        info["corpus_words"] = float(added)
        if self.idf_weighting:
            static = get_route(context.model, QUERY_ROUTE)[0]
            reweight_static_route(context.model, corpus_token_weights(static, context.corpus.values()))
        info["idf"] = self.idf_weighting
        if statistics is not None:
            info["contextual_documents"] = float(min(len(context.corpus), self.max_documents))
        # The statistics the trained stages end with, so every stage reports the KL it reached.
        final_metrics = CollapseEvaluator(context.kl_texts, name=KL_EVALUATOR_NAME, write_csv=False)(context.model)
        return StageResult(self.name, final_metrics=final_metrics, extra=dict(info))

    def _sampled_documents(self, context: StageContext) -> list[str]:
        """The corpus, or a seeded sample of ``max_documents`` of it (the same on every process)."""
        documents = list(context.corpus.values())
        if len(documents) > self.max_documents:
            generator = torch.Generator().manual_seed(context.seed)
            sample = torch.randperm(len(documents), generator=generator)[: self.max_documents]
            documents = [documents[i] for i in sample.tolist()]
        return documents

    def _contextual_statistics(
        self, context: StageContext, documents: list[str], words: list[str]
    ) -> TokenStatistics | None:
        reason = mean_pooled_transformer(context.model)
        if reason is not None:
            logger.warning("vocabulary stage: one-token vectors only, no contextual ones: %s", reason)
            return None
        # Kept in the document store (shared by runs) or else the run's folder (read back on --resume).
        folder = context.store.folder if context.store is not None else context.output_dir / self.folder
        # The pass over the whole corpus also makes the corpus cache the later stages need, unless the cache would
        # differ (a sample of the corpus, a document prompt) or already exists.
        whole_corpus = len(documents) == len(context.corpus)
        keep = whole_corpus and not route_prompt(context.model, DOCUMENT_ROUTE) and context.cache is None
        statistics = contextual_token_statistics(
            context.model,
            documents,
            batch_size=self.batch_size,
            cache_folder=folder,
            words=words,
            return_document_embeddings=keep,
        )
        if statistics.document_embeddings is not None:  # None: not kept, or read back (the pass did not run)
            embeddings = statistics.document_embeddings
            context.adopt_cache(
                StaleEmbeddingCache.from_embeddings(
                    context.model, context.corpus, embeddings, dtype=context.cache_dtype, store=context.store
                )
            )
        return statistics
