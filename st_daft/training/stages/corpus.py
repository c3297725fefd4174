"""The corpus stage (label-free): the document route is frozen and the query route learns to reproduce its
embeddings of texts cut from the corpus (:class:`~st_daft.losses.LabelFreeAlignmentLoss`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import ClassVar

from datasets import concatenate_datasets
from sentence_transformers import SentenceTransformerTrainingArguments

from st_daft.evaluation.baselines import BM25Search
from st_daft.label_free.corpus_texts import (
    TEXT_KINDS,
    alignment_dataset,
    alignment_examples,
    lexical_ranking_columns,
    pseudo_query_dataset,
    with_teacher_neighbours,
)
from st_daft.label_free.general_corpus import GENERAL_TEXTS_AVAILABLE, general_texts
from st_daft.losses.corpus_sample import resolve_sample_size
from st_daft.losses.label_free import LabelFreeAlignmentLoss
from st_daft.models.asymmetric import (
    DOCUMENT_ROUTE,
    QUERY_ROUTE,
    freeze_route,
)
from st_daft.training.stages.base import StageContext, StageResult, _require_resolved
from st_daft.training.stages.frozen import _check_sample_size, _FrozenDocumentStage
from st_daft.training.stages.settings import non_negative_float, non_negative_int, positive_float, positive_int, setting
from st_daft.training.stages.vocabulary import VocabularyStage

logger = logging.getLogger(__name__)


@dataclass
class CorpusStage(_FrozenDocumentStage):
    """Label-free alignment on texts cut from the corpus (and any unlabelled queries).

    Args:
        max_steps: optimiser steps. Default (None): beside labelled queries 600, or 900 with the general texts (twice
            the texts); 1,200 for a corpus alone.
        max_texts: texts cut from the corpus.
        text_kinds: which texts (titles, sentences, spans, passages).
        regression: ``"cosine"`` or ``"mse"`` regression onto the document-route embeddings.
        contrastive_weight: weight of the in-batch InfoNCE term.
        document_weight: weight of the pseudo-query term: each text cut from a document must find that document
            among the whole corpus (InfoNCE over the document route's corpus embeddings, the cache the align stage
            uses too); 0 disables it. Default (None): 1 for a corpus without labelled queries, 0 with them:
            the term fits the route to the training corpus, which is what a corpus-only run wants and what a
            labelled run already gets from align (figures: docs/results/experiments.md).
        document_scale: inverse temperature of that term (default: the in-batch term's, 20).
        pseudo_queries: more texts cut from the corpus beyond ``max_texts`` that are not encoded: each is a
            pseudo-query whose target is its source document's embedding (from the corpus cache), so they add
            query -> document pairs at no encoding cost. Only with the pseudo-query term (``document_weight > 0``).
        ranking_weight: weight of a listwise term distilling the document route's ranking of the whole corpus for
            each text (:class:`~st_daft.losses.LabelFreeAlignmentLoss`); 0 disables it. The route learns to order
            the corpus as the document route does, which pays where the document route is the stronger ranker
            (figures: the label-free guide, docs/guide/label-free.md).
        lexical_weight: fuse BM25 into the ranking term's teacher: each text's ``lexical_top_k`` best documents by
            BM25 (bm25s, stemmed; the ``bm25`` extra) add ``lexical_weight`` times their BM25 score, divided by the
            text's best, to the document route's cosine
            (:func:`~st_daft.label_free.corpus_texts.lexical_ranking_columns`).
            0 disables it; needs ``ranking_weight > 0``.
        lexical_top_k: documents per text in that fusion.
        corpus_sample_size: corpus documents each step's pseudo-query and ranking terms score: None for all of them
            up to 65,536 documents and 16,384 above, 0 for all of them always, else that many
            (:mod:`st_daft.losses.corpus_sample`: the batch's source documents, their teacher's best and uniform rows
            with the sampled softmax's correction). Sampled, the corpus cache is read where it is instead of copied to
            every process's device as float32.
        teacher_neighbours: when sampled, each text's best documents by the document route that every step scores
            (:func:`~st_daft.label_free.corpus_texts.with_teacher_neighbours`, one exact search before training).
        lexical_language: BM25's stopwords and stemmer (an ISO 639-3 code, ``"eng"``).
        general_texts: how many of the general-domain English texts that ship with st-daft
            (:func:`~st_daft.label_free.general_corpus.general_texts`, WordNet definitions and examples) join the
            texts, as
            regression targets like unlabelled queries. Default (None): 20,000 for a static query route beside
            labelled queries, which keeps the route working on collections unlike the training one
            (docs/guide/label-free.md); 0 for a corpus alone, whose
            own text is what the route is for, and for other query routes (not measured).
    """

    name: ClassVar[str] = "corpus"
    folder: ClassVar[str] = "stage-0-corpus"
    needs_labels: ClassVar[bool] = False
    # None: 600 beside labelled queries (the measured static recipe; a longer stage did not help, see
    # docs/results/experiments.md), 900 when the general texts join them (twice the texts), 1,200 for a corpus alone,
    # where the ranking term keeps gaining
    max_steps: int | None = setting(
        None,
        flag="--corpus-steps",
        help="corpus-stage steps (default: 900 beside labelled queries with the general texts, 600 without them, 1200 "
        "for a corpus alone)",
        type=positive_int,
        budget=True,
    )
    learning_rate: float = setting(
        1e-3, flag="--corpus-lr", help="corpus-stage learning rate (1e-3)", type=positive_float, budget=True
    )
    batch_size: int = 128
    eval_steps: int = 150
    max_texts: int = setting(
        20000,
        flag="--corpus-max-texts",
        help="texts cut from the corpus (default 20000)",
        type=positive_int,
        budget=True,
    )
    text_kinds: tuple[str, ...] = TEXT_KINDS
    regression: str = "cosine"
    contrastive_weight: float = 1.0
    document_weight: float | None = setting(
        None,
        flag="--corpus-document-weight",
        help="corpus stage: weight of the pseudo-query term, each cut text against the whole corpus with its "
        "source document as the positive (default: 1 for a corpus alone, 0 with labelled queries)",
        type=non_negative_float,
    )
    document_scale: float | None = None
    pseudo_queries: int = setting(
        0,
        flag="--corpus-pseudo-queries",
        help="corpus stage: more texts cut from the corpus, not encoded, each trained only as a pseudo-query for its "
        "source document (needs the pseudo-query term; default 0)",
        type=non_negative_int,
    )
    ranking_weight: float = setting(
        10.0,
        flag="--corpus-ranking-weight",
        help="corpus stage: weight of a term distilling the document encoder's ranking of the whole corpus for each "
        "text (default 10; 0 turns it off)",
        type=non_negative_float,
    )
    lexical_weight: float = setting(
        0.0,
        flag="--corpus-lexical-weight",
        help="corpus stage: fuse BM25 into that ranking's teacher: each text's 32 best documents by BM25 add W times "
        "their score (divided by the text's best) to the document encoder's cosine (needs the bm25 extra; default 0)",
        type=non_negative_float,
    )
    lexical_top_k: int = 32
    lexical_language: str = "eng"
    general_texts: int | None = setting(
        None,
        flag="--general-texts",
        help="corpus stage: how many of the general-domain English texts that ship with st-daft (WordNet "
        "definitions and examples, up to 20000) join its texts (default: 20000 for a static route beside labelled "
        "queries, else 0)",
        type=non_negative_int,
    )
    corpus_sample_size: int | None = None
    teacher_neighbours: int = setting(
        16,
        flag="--corpus-teacher-neighbours",
        help="corpus stage, on a sample of the corpus (--corpus-sample-size): each text's K best documents by the "
        "document encoder, found once before training, are in every step's sample (default 16; 0: none)",
        type=non_negative_int,
        metavar="K",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.general_texts is not None and not 0 <= self.general_texts <= GENERAL_TEXTS_AVAILABLE:
            raise ValueError(
                f"corpus stage: general_texts must be between 0 and {GENERAL_TEXTS_AVAILABLE} (the texts that ship "
                f"with st-daft), got {self.general_texts}"
            )
        if not self.lexical_weight >= 0 or self.lexical_top_k < 1:
            raise ValueError(
                f"corpus stage: lexical_weight must be 0 or more and lexical_top_k at least 1, got "
                f"{self.lexical_weight} and {self.lexical_top_k}"
            )
        if not self.ranking_weight >= 0:
            raise ValueError(f"corpus stage: ranking_weight must be 0 or more, got {self.ranking_weight}")
        if self.pseudo_queries < 0:
            raise ValueError(f"corpus stage: pseudo_queries must be 0 or more, got {self.pseudo_queries}")
        if self.max_texts < 1:
            raise ValueError(f"corpus stage: max_texts must be at least 1, got {self.max_texts}")
        if self.document_weight is not None and not self.document_weight >= 0:
            raise ValueError(f"corpus stage: document_weight must be 0 or more, got {self.document_weight}")
        _check_sample_size("corpus", self.corpus_sample_size)
        if self.teacher_neighbours < 0:
            raise ValueError(f"corpus stage: teacher_neighbours must be 0 or more, got {self.teacher_neighbours}")

    def resolved(self, context: StageContext) -> CorpusStage:
        """The general texts (20,000 for a static route beside labelled queries, else 0), the budget (beside labelled
        queries 600 steps, 900 with the general texts; 1,200 alone) and the pseudo-query term's weight (0 beside
        labelled queries, 1 alone), where left to the run."""
        labelled = context.train_data is not None
        general = self.general_texts
        if general is None:
            general = 20000 if labelled and VocabularyStage().applies_to(context.model) is None else 0
        steps = self.max_steps
        if steps is None:
            steps = (900 if general else 600) if labelled else 1200
        return replace(
            self,
            max_steps=steps,
            document_weight=self.document_weight if self.document_weight is not None else (0.0 if labelled else 1.0),
            general_texts=general,
        )

    def router_mapping(self, context: StageContext) -> dict[str, str]:
        return {"text": QUERY_ROUTE}

    def check(self, context: StageContext) -> None:
        super().check(context)
        if self.lexical_weight > 0:
            if self.ranking_weight == 0:
                raise ValueError(
                    "corpus stage: lexical_weight (--corpus-lexical-weight) fuses BM25 into the ranking term's "
                    "teacher, and ranking_weight (--corpus-ranking-weight) is 0"
                )

            try:
                BM25Search(language=self.lexical_language)
            except (ImportError, ValueError) as error:
                raise ValueError(f"corpus stage: lexical_weight (--corpus-lexical-weight): {error}") from None

    def run(self, context: StageContext, args: SentenceTransformerTrainingArguments | None) -> StageResult:
        _require_resolved(self, "document_weight")
        _require_resolved(self, "general_texts")
        freeze_route(context.model, DOCUMENT_ROUTE)
        document_weight = self.document_weight
        pseudo_queries = self.pseudo_queries if document_weight > 0 else 0
        if self.pseudo_queries and not pseudo_queries:
            logger.warning("corpus stage: pseudo_queries=%d ignored: the pseudo-query term is off", self.pseudo_queries)
        # One cut for both: the first max_texts are the same texts a run without pseudo-queries encodes.
        examples = alignment_examples(
            context.corpus,
            context.titles,
            kinds=self.text_kinds,
            max_texts=self.max_texts + pseudo_queries,
            seed=context.seed,
        )
        examples, extra = examples[: self.max_texts], examples[self.max_texts :]
        if len(extra) < pseudo_queries:
            logger.warning(
                "corpus stage: %d pseudo-queries asked for, the corpus has %d texts to cut beyond max_texts=%d",
                pseudo_queries, len(extra), self.max_texts,
            )  # fmt: skip
        texts = [text for text, _ in examples]
        cut = set(texts)
        # Unlabelled queries and general texts are regression targets alike: no source document.
        general = general_texts(self.general_texts)
        queries = [query for query in dict.fromkeys([*context.unlabeled_queries, *general]) if query not in cut]
        documents, source_rows, sample_size = None, None, None
        if document_weight > 0 or self.ranking_weight > 0:
            # The corpus embeddings are the align stage's cache: embedded once (or read from the store), shared.
            cache = context.current_cache()
            sample_size = resolve_sample_size(len(cache), self.corpus_sample_size)
            # Sampled, the loss reads rows where the cache is (a float16 memmap stays on disk): no float32 copy.
            documents = cache.float32() if sample_size is None else cache.embeddings
            row_of = {doc_id: row for row, doc_id in enumerate(cache.ids)}
            source_rows = [row_of[doc_id] for _, doc_id in examples] + [-1] * len(queries)  # a query has no source
        encoded_lexical = pseudo_lexical = None
        if self.lexical_weight > 0 and documents is not None:  # without the ranking term the loss refuses it
            corpus_texts = [context.corpus[doc_id] for doc_id in cache.ids]  # rows as in the corpus embeddings
            ranked = texts + queries + [text for text, _ in extra]
            columns = lexical_ranking_columns(corpus_texts, ranked, self.lexical_top_k, self.lexical_language)
            encoded_lexical, pseudo_lexical = columns[: len(texts + queries)], columns[len(texts + queries) :]
        rows = alignment_dataset(
            context.model,
            texts + queries,
            store=context.store,
            document_rows=source_rows,
            lexical_columns=encoded_lexical,
        )
        if extra:
            pseudo = pseudo_query_dataset(extra, cache.ids, documents, lexical_columns=pseudo_lexical)
            rows = concatenate_datasets([rows, pseudo])
        neighbours = 0  # the teacher's best documents in every sample: only the ranking term, sampled, needs them
        if sample_size is not None and self.ranking_weight > 0:
            neighbours = min(self.teacher_neighbours, len(documents))
        if sample_size is not None:
            best = f", their {neighbours} best by the document route" if neighbours else ""
            logger.info(
                "corpus stage: each step scores %d of the corpus's %d documents (the batch's sources%s, uniform rows)",
                sample_size, len(documents), best,
            )  # fmt: skip
        if neighbours:
            rows = with_teacher_neighbours(rows, documents, neighbours, show_progress_bar=True)
        loss = LabelFreeAlignmentLoss(
            context.model,
            regression=self.regression,
            contrastive_weight=self.contrastive_weight,
            document_embeddings=documents,
            document_weight=document_weight,
            document_scale=self.document_scale,
            ranking_weight=self.ranking_weight,
            lexical_weight=self.lexical_weight,
            corpus_sample_size=self.corpus_sample_size,
            neighbour_columns=neighbours,
        )
        result = self.train_frozen(context, args, rows, loss)
        result.extra.update(
            num_texts=len(texts),
            num_pseudo_queries=len(extra),
            num_unlabeled_queries=len(set(context.unlabeled_queries) - cut),
            num_general_texts=len(general),
            document_weight=document_weight,
            corpus_sample_size=sample_size or 0,
        )
        return result
