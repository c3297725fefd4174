"""Score fusion of a dense similarity with BM25, in numpy only: the one rule both evaluation and serving apply.

``score(q, d) = sim(q, d) + weight * BM25(q, d) / max_d' BM25(q, d')``: each query's BM25 scores divided by its best
one (so in ``[0, 1]`` like a cosine), weighted, and added to the dense similarity of the same document; a document
outside BM25's candidates gets no lexical term. :class:`~st_daft.evaluation.hybrid.HybridSearch` (``st-daft evaluate
--fuse-bm25``) adds it to a query's similarity to every document, :class:`~st_daft.serving.Searcher` to the
similarity of its candidates (the dense search's best and BM25's): the same float32 arithmetic on the same numbers,
so both rank alike. This module imports numpy only, so a query service uses it without torch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_FUSION_WEIGHT", "add_lexical_scores", "normalise_lexical_scores"]

DEFAULT_FUSION_WEIGHT = 0.15
"""BM25's weight when none is given (``st-daft evaluate --fuse-bm25``, ``Searcher.search(fuse_bm25=True)``): where
the default labelled route peaked on python-faq, with most of its SciFact gain; corpus-only routes would pick a
larger weight on SciFact (docs/results/fusion.md)."""


def normalise_lexical_scores(scores: np.ndarray) -> np.ndarray:
    """``(queries, depth)`` BM25 scores, best first, each row divided by its first (best) score: in ``[0, 1]``, all 0
    for a query that shares no term with any document."""
    scores = np.asarray(scores, dtype=np.float32)
    return scores / np.maximum(scores[:, :1], 1e-12)


def add_lexical_scores(dense: np.ndarray, columns: np.ndarray, lexical: np.ndarray, weight: float) -> np.ndarray:
    """Fuse in place: ``dense[i, columns[i, j]] += weight * lexical[i, j]`` and return ``dense``.

    Args:
        dense: ``(queries, candidates)`` float32 similarities, e.g. to every document.
        columns: ``(queries, depth)`` the columns of ``dense`` that BM25's ``depth`` best documents of each query are
            (distinct within a row).
        lexical: ``(queries, depth)`` their BM25 scores from :func:`normalise_lexical_scores`.
        weight: BM25's weight, non-negative.
    """
    if weight and lexical.size:
        rows = np.arange(len(dense))[:, None]
        dense[rows, columns] += weight * np.asarray(lexical, dtype=np.float32)
    return dense
