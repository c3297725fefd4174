"""Texts for label-free alignment, cut from a corpus, and their frozen document-route targets.

The query route has to work on queries the training set never showed it. The corpus the user already has holds
the vocabulary and phrasing of their domain, in every length a query comes in: :func:`alignment_texts` cuts
titles (pseudo-queries), sentences, short spans and passage openings from it, and :func:`alignment_dataset`
pairs each with the document route's embedding of the same text (computed once; the route is frozen).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable, Sequence

import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from torch import Tensor
from tqdm.auto import tqdm

from st_daft.embeddings.encode import embed_sharded
from st_daft.embeddings.index import exact_search
from st_daft.embeddings.store import DocumentEmbeddingStore
from st_daft.evaluation.baselines import BM25Search
from st_daft.utils.distributed import compute_sharded

logger = logging.getLogger(__name__)

__all__ = [
    "alignment_examples",
    "alignment_texts",
    "alignment_dataset",
    "document_embeddings",
    "pseudo_query_dataset",
    "lexical_ranking_columns",
    "with_teacher_neighbours",
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
    lexical_columns: Tensor | None = None,
) -> Dataset:
    """``{"text", "label"}`` rows: each text and the document route's (normalised) embedding of it.

    With ``document_rows`` (one per text: the row of the text's source document in the document embeddings given to
    :class:`~st_daft.losses.LabelFreeAlignmentLoss`, ``-1`` for none), the row is appended to each label as one
    extra column, so the loss can also score the text against the whole corpus with its source as the positive.

    With ``lexical_columns`` (one row per text, :func:`lexical_ranking_columns`), those columns follow the source row:
    the lexical ranking the loss adds to its ranking teacher.

    With a :class:`~st_daft.embeddings.store.DocumentEmbeddingStore`, targets computed by an earlier run with the same
    document
    route are read back instead of encoded again.
    """
    if not texts:
        raise ValueError("no alignment texts")
    if lexical_columns is not None and document_rows is None:
        raise ValueError("lexical_columns follow the source document's row: pass document_rows too")
    logger.info("alignment targets: the document route's embeddings of %d texts", len(texts))
    # Under torchrun each process embeds 1/world_size of the texts; every process gets all the targets.
    targets = embed_sharded(model, texts, batch_size, show_progress_bar=show_progress_bar, store=store)
    if document_rows is not None:
        if len(document_rows) != len(texts):
            raise ValueError(f"document_rows has {len(document_rows)} entries for {len(texts)} texts")
        rows = torch.tensor(document_rows, dtype=targets.dtype)[:, None]
        targets = torch.cat([targets, rows], dim=1)
    return Dataset.from_dict({"text": texts, "label": _with_columns(targets, lexical_columns).tolist()})


def _with_columns(labels: Tensor, columns: Tensor | None) -> Tensor:
    if columns is None:
        return labels
    if len(columns) != len(labels):
        raise ValueError(f"{len(columns)} rows of lexical columns for {len(labels)} texts")
    return torch.cat([labels, columns.to(labels.dtype)], dim=1)


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
    examples: list[tuple[str, str]],
    document_ids: list[str],
    document_embeddings: Tensor,
    lexical_columns: Tensor | None = None,
) -> Dataset:
    """``{"text", "label"}`` rows for ``(text, source document id)`` pairs (:func:`alignment_examples`) whose target
    is the source document's embedding, with the document's row appended as the last label column.

    A text cut from a document is a pseudo-query for it: these pairs train the query route on the real task (query
    -> document) with no labels, and they need no encoding beyond the corpus itself, which retrieval embeds anyway.
    Use with :class:`~st_daft.losses.LabelFreeAlignmentLoss` given the same ``document_embeddings``;
    ``lexical_columns`` as in :func:`alignment_dataset`.
    """
    if not examples:
        raise ValueError("no alignment texts")
    row_of = {doc_id: row for row, doc_id in enumerate(document_ids)}
    unknown = sorted({doc_id for _, doc_id in examples if doc_id not in row_of})
    if unknown:
        raise ValueError(f"source document(s) {unknown[:3]} are not among the {len(row_of)} document ids")
    rows = torch.tensor([row_of[doc_id] for _, doc_id in examples])
    targets = torch.cat([document_embeddings[rows].float(), rows[:, None].float()], dim=1)
    labels = _with_columns(targets, lexical_columns)
    return Dataset.from_dict({"text": [text for text, _ in examples], "label": labels.tolist()})


def lexical_ranking_columns(
    documents: Sequence[str],
    texts: list[str],
    top_k: int = 32,
    language: str | None = "eng",
    show_progress_bar: bool = False,
) -> Tensor:
    """``(len(texts), 2 * top_k)`` label columns: each text's ``top_k`` best documents by BM25 (rows of
    ``documents``; ``-1`` where the text shares no term with more documents), then their BM25 scores divided by the
    text's best score (so in ``[0, 1]``).

    :class:`~st_daft.losses.LabelFreeAlignmentLoss` (``lexical_weight``) adds these scores to its ranking teacher:
    the document route's scores fused with BM25's, a better ranker than either where queries share words with their
    documents (docs/results/fusion.md). BM25 is
    :class:`~st_daft.evaluation.baselines.BM25Search` (bm25s, stopwords, Snowball stemmer; the ``bm25`` extra). The
    texts are
    split across a torchrun group's processes; every process indexes ``documents``.
    """

    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    bm25 = BM25Search(language=language).fit(documents)

    def compute(chunk: list[str], show: bool) -> Tensor:
        rows = torch.full((len(chunk), top_k), -1.0)
        scores = torch.zeros(len(chunk), top_k)
        for start in range(0, len(chunk), 4096):
            found, normalised = bm25.normalised_top_k(chunk[start : start + 4096], top_k)
            matched = torch.from_numpy(normalised > 0)
            end = start + len(found)
            width = found.shape[1]
            rows[start:end, :width] = torch.where(matched, torch.from_numpy(found).float(), -1.0)
            scores[start:end, :width] = torch.from_numpy(normalised) * matched
        return torch.cat([rows, scores], dim=1)

    return compute_sharded(texts, compute, show_progress_bar)


def with_teacher_neighbours(
    dataset: Dataset,
    corpus_embeddings: Tensor,
    top_k: int = 16,
    show_progress_bar: bool = False,
    query_block: int = 4096,
) -> Dataset:
    """``dataset`` (:func:`alignment_dataset`, :func:`pseudo_query_dataset`, or both concatenated) with ``top_k``
    more label columns: for each text, the rows of the corpus documents whose embeddings score highest (cosine)
    against the text's target, i.e. the document route's best documents for it.

    :class:`~st_daft.losses.LabelFreeAlignmentLoss` scores a sample of the corpus each step when the corpus is large
    (``corpus_sample_size``); given these columns (``neighbour_columns=top_k``) the sample always holds the
    teacher's best documents, where its ranking puts most of its mass, and the uniform rows estimate the rest.

    The search is exact, over the corpus matrix where it is (a memory-mapped float16 cache is read chunk by chunk,
    one float32 chunk at a time), ``query_block`` texts against one pass over the corpus; the texts are split across a
    torchrun group's processes. Cost: texts x documents x dimension multiply-adds (20,000 texts against 1M 384-d
    documents: 7.7 TFLOP, minutes on a CPU).
    """
    if not 1 <= top_k <= len(corpus_embeddings):
        raise ValueError(f"top_k must be between 1 and the {len(corpus_embeddings)} documents, got {top_k}")
    labels = torch.tensor(dataset["label"], dtype=torch.float32)
    dimension = corpus_embeddings.shape[1]
    targets = torch.nn.functional.normalize(labels[:, :dimension], dim=1)

    def normalised(chunk: Tensor) -> Tensor:
        return torch.nn.functional.normalize(chunk, dim=1)

    def compute(indices: list[int], show: bool) -> Tensor:
        rows = []
        blocks = range(0, len(indices), query_block)
        for start in tqdm(blocks, desc="Teacher's best documents", disable=not show):
            block = targets[indices[start : start + query_block]]
            rows.append(exact_search(corpus_embeddings, block, top_k, transform=normalised, chunk_size=16384)[1])
        return torch.cat(rows).float()

    logger.info("corpus sample: the document route's %d best documents for each of %d texts", top_k, len(targets))
    columns = compute_sharded(list(range(len(targets))), compute, show_progress_bar)
    return Dataset.from_dict({"text": dataset["text"], "label": torch.cat([labels, columns], dim=1).tolist()})
