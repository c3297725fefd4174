"""Texts for label-free alignment, cut from a corpus, and their frozen document-route targets.

The query route has to work on queries the training set never showed it. The corpus the user already has holds
the vocabulary and phrasing of their domain, in every length a query comes in: :func:`alignment_texts` cuts
titles (pseudo-queries), sentences, short spans and passage openings from it, and :func:`alignment_dataset`
pairs each with the document route's embedding of the same text (computed once; the route is frozen).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from torch import Tensor

from st_daft.distributed import embed_sharded
from st_daft.store import DocumentEmbeddingStore

__all__ = [
    "alignment_examples",
    "alignment_texts",
    "alignment_dataset",
    "document_embeddings",
    "pseudo_query_dataset",
    "TEXT_KINDS",
]

TEXT_KINDS = ("titles", "sentences", "spans", "passages")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentences(text: str, min_words: int) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if len(s.split()) >= min_words]


def alignment_examples(
    corpus: dict[str, str],
    titles: dict[str, str] | None = None,
    kinds: Iterable[str] = TEXT_KINDS,
    max_texts: int = 40000,
    span_words: tuple[int, int] = (3, 12),
    passage_words: int = 64,
    seed: int = 0,
    spans_per_document: int = 3,
) -> list[tuple[str, str]]:
    """Up to ``max_texts`` distinct ``(text, source document id)`` pairs cut from ``corpus``, balanced across ``kinds``.

    Kinds: ``titles`` (the corpus titles, short and query-like), ``sentences`` (sentences of 4+ words),
    ``spans`` (``spans_per_document`` random windows of ``span_words`` words per document), ``passages`` (the first
    ``passage_words`` words). Each kind's pool is shuffled and the kinds are taken in turn, so every kind is
    represented whatever ``max_texts`` is; a text cut from several documents is kept once, with its first source.
    """
    kinds = tuple(kinds)
    unknown = [kind for kind in kinds if kind not in TEXT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown text kind(s) {unknown}; choose from {list(TEXT_KINDS)}")
    if not corpus:
        raise ValueError("cannot cut alignment texts from an empty corpus")
    if not 1 <= span_words[0] <= span_words[1]:
        raise ValueError(f"span_words must be (min, max) with 1 <= min <= max, got {span_words}")
    rng = random.Random(seed)
    pools: dict[str, list[tuple[str, str]]] = {}
    if "titles" in kinds:
        pools["titles"] = [
            (title.strip(), doc_id) for doc_id, title in (titles or {}).items() if len(title.split()) >= 2
        ]
    if "sentences" in kinds:
        pools["sentences"] = [(s, doc_id) for doc_id, text in corpus.items() for s in _sentences(text, 4)]
    if "spans" in kinds:
        spans = []
        for doc_id, text in corpus.items():
            words = text.split()
            for _ in range(spans_per_document):
                length = rng.randint(*span_words)
                if len(words) > length:
                    start = rng.randrange(len(words) - length)
                    spans.append((" ".join(words[start : start + length]), doc_id))
        pools["spans"] = spans
    if "passages" in kinds:
        pools["passages"] = [(" ".join(text.split()[:passage_words]), doc_id) for doc_id, text in corpus.items()]
    pools = {kind: pool for kind, pool in pools.items() if pool}
    if not pools:
        raise ValueError("the corpus yields no alignment texts of the requested kinds")
    for pool in pools.values():
        rng.shuffle(pool)
    # Round-robin over the kinds so each is represented, then deduplicate.
    selected: list[tuple[str, str]] = []
    seen: set[str] = set()
    iterators = {kind: iter(pool) for kind, pool in pools.items()}
    while iterators and len(selected) < max_texts:
        for kind in list(iterators):
            example = next(iterators[kind], None)
            if example is None:
                del iterators[kind]
            elif example[0] not in seen:
                seen.add(example[0])
                selected.append(example)
                if len(selected) >= max_texts:
                    break
    return selected


def alignment_texts(
    corpus: dict[str, str],
    titles: dict[str, str] | None = None,
    kinds: Iterable[str] = TEXT_KINDS,
    max_texts: int = 40000,
    span_words: tuple[int, int] = (3, 12),
    passage_words: int = 64,
    seed: int = 0,
) -> list[str]:
    """The texts of :func:`alignment_examples` (same arguments), without their source documents."""
    examples = alignment_examples(corpus, titles, kinds, max_texts, span_words, passage_words, seed)
    return [text for text, _ in examples]


def alignment_dataset(
    model: SentenceTransformer,
    texts: list[str],
    batch_size: int = 128,
    show_progress_bar: bool = True,
    store: DocumentEmbeddingStore | None = None,
    document_rows: list[int] | None = None,
) -> Dataset:
    """``{"text", "label"}`` rows: each text and the document route's (normalised) embedding of it.

    With ``document_rows`` (one per text: the row of the text's source document in the document embeddings given to
    :class:`~st_daft.losses.LabelFreeAlignmentLoss`, ``-1`` for none), the row is appended to each label as one
    extra column, so the loss can also score the text against the whole corpus with its source as the positive.

    With a :class:`~st_daft.store.DocumentEmbeddingStore`, targets computed by an earlier run with the same document
    route are read back instead of encoded again.
    """
    if not texts:
        raise ValueError("no alignment texts")
    # Under torchrun each process embeds 1/world_size of the texts; every process gets all the targets.
    targets = embed_sharded(model, texts, batch_size, show_progress_bar=show_progress_bar, store=store)
    if document_rows is not None:
        if len(document_rows) != len(texts):
            raise ValueError(f"document_rows has {len(document_rows)} entries for {len(texts)} texts")
        rows = torch.tensor(document_rows, dtype=targets.dtype)[:, None]
        targets = torch.cat([targets, rows], dim=1)
    return Dataset.from_dict({"text": texts, "label": targets.tolist()})


def document_embeddings(
    model: SentenceTransformer,
    corpus: dict[str, str],
    batch_size: int = 64,
    show_progress_bar: bool = True,
    store: DocumentEmbeddingStore | None = None,
) -> tuple[list[str], Tensor]:
    """The corpus ids and the document route's embeddings of the documents, in the same order (rows)."""
    ids = list(corpus)
    embeddings = embed_sharded(
        model, [corpus[doc_id] for doc_id in ids], batch_size, show_progress_bar=show_progress_bar, store=store
    )
    return ids, embeddings


def pseudo_query_dataset(
    examples: list[tuple[str, str]], document_ids: list[str], document_embeddings: Tensor
) -> Dataset:
    """``{"text", "label"}`` rows for ``(text, source document id)`` pairs (:func:`alignment_examples`) whose target
    is the source document's embedding, with the document's row appended as the last label column.

    A text cut from a document is a pseudo-query for it: these pairs train the query route on the real task (query
    -> document) with no labels, and they need no encoding beyond the corpus itself, which retrieval embeds anyway.
    Use with :class:`~st_daft.losses.LabelFreeAlignmentLoss` given the same ``document_embeddings``.
    """
    if not examples:
        raise ValueError("no alignment texts")
    row_of = {doc_id: row for row, doc_id in enumerate(document_ids)}
    unknown = sorted({doc_id for _, doc_id in examples if doc_id not in row_of})
    if unknown:
        raise ValueError(f"source document(s) {unknown[:3]} are not among the {len(row_of)} document ids")
    rows = torch.tensor([row_of[doc_id] for _, doc_id in examples])
    targets = torch.cat([document_embeddings[rows].float(), rows[:, None].float()], dim=1)
    return Dataset.from_dict({"text": [text for text, _ in examples], "label": targets.tolist()})
