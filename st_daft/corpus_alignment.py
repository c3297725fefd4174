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

from datasets import Dataset
from sentence_transformers import SentenceTransformer

from st_daft.cache import embed_documents
from st_daft.store import DocumentEmbeddingStore

__all__ = ["alignment_texts", "alignment_dataset", "TEXT_KINDS"]

TEXT_KINDS = ("titles", "sentences", "spans", "passages")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentences(text: str, min_words: int) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if len(s.split()) >= min_words]


def alignment_texts(
    corpus: dict[str, str],
    titles: dict[str, str] | None = None,
    kinds: Iterable[str] = TEXT_KINDS,
    max_texts: int = 40000,
    span_words: tuple[int, int] = (3, 12),
    passage_words: int = 64,
    seed: int = 0,
) -> list[str]:
    """Up to ``max_texts`` distinct texts cut from ``corpus`` (id -> text), balanced across ``kinds``.

    Kinds: ``titles`` (the corpus titles, short and query-like), ``sentences`` (sentences of 4+ words),
    ``spans`` (random windows of ``span_words`` words), ``passages`` (the first ``passage_words`` words).
    """
    kinds = tuple(kinds)
    unknown = [kind for kind in kinds if kind not in TEXT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown text kind(s) {unknown}; choose from {list(TEXT_KINDS)}")
    if not corpus:
        raise ValueError("cannot cut alignment texts from an empty corpus")
    rng = random.Random(seed)
    documents = list(corpus.values())
    pools: dict[str, list[str]] = {}
    if "titles" in kinds:
        pools["titles"] = [title.strip() for title in (titles or {}).values() if len(title.split()) >= 2]
    if "sentences" in kinds:
        pools["sentences"] = [s for text in documents for s in _sentences(text, 4)]
    if "spans" in kinds:
        spans = []
        for text in documents:
            words = text.split()
            for _ in range(3):
                length = rng.randint(*span_words)
                if len(words) > length:
                    start = rng.randrange(len(words) - length)
                    spans.append(" ".join(words[start : start + length]))
        pools["spans"] = spans
    if "passages" in kinds:
        pools["passages"] = [" ".join(text.split()[:passage_words]) for text in documents]
    pools = {kind: pool for kind, pool in pools.items() if pool}
    if not pools:
        raise ValueError("the corpus yields no alignment texts of the requested kinds")
    for pool in pools.values():
        rng.shuffle(pool)
    # Round-robin over the kinds so each is represented, then deduplicate.
    selected: list[str] = []
    seen: set[str] = set()
    iterators = {kind: iter(pool) for kind, pool in pools.items()}
    while iterators and len(selected) < max_texts:
        for kind in list(iterators):
            text = next(iterators[kind], None)
            if text is None:
                del iterators[kind]
            elif text not in seen:
                seen.add(text)
                selected.append(text)
                if len(selected) >= max_texts:
                    break
    return selected


def alignment_dataset(
    model: SentenceTransformer,
    texts: list[str],
    batch_size: int = 128,
    show_progress_bar: bool = True,
    store: DocumentEmbeddingStore | None = None,
) -> Dataset:
    """``{"text", "label"}`` rows: each text and the document route's (normalised) embedding of it.

    With a :class:`~st_daft.store.DocumentEmbeddingStore`, targets computed by an earlier run with the same document
    route are read back instead of encoded again.
    """
    if not texts:
        raise ValueError("no alignment texts")
    targets = embed_documents(model, texts, batch_size, show_progress_bar=show_progress_bar, store=store)
    return Dataset.from_dict({"text": texts, "label": targets.tolist()})
