"""Lexical baselines, scored by MTEB exactly as a dense model is: BM25 (bm25s, Snowball-stemmed, stopwords removed).

:class:`BM25Search` implements MTEB's search protocol (``index`` the corpus, ``search`` the queries, return a run
``{query id: {document id: score}}``), so ``mteb.evaluate`` — and :func:`st_daft.evaluation.mteb.evaluate_retrieval` —
score its rankings with the same relevance judgements and the same code (pytrec_eval's nDCG@k, recall@k, ...) as a
SentenceTransformer's. Needs the ``bm25`` extra: ``pip install "st-daft[bm25]"`` (``bm25s``, ``PyStemmer``).

Example::

    from st_daft.evaluation.baselines import BM25Search
    from st_daft.evaluation.mteb import evaluate_retrieval

    print(evaluate_retrieval(BM25Search(), "data/scifact")["ndcg_at_10"])
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from st_daft.evaluation.fusion import normalise_lexical_scores

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models import ModelMeta

logger = logging.getLogger(__name__)

__all__ = ["BM25Search", "BASELINES", "make_baseline"]

# ISO 639-3 -> (bm25s stopword list, Snowball stemmer): the languages bm25s has stopwords for.
_LANGUAGES: dict[str, tuple[str, str]] = {
    "eng": ("en", "english"),
    "deu": ("de", "german"),
    "nld": ("nl", "dutch"),
    "fra": ("fr", "french"),
    "spa": ("es", "spanish"),
    "por": ("pt", "portuguese"),
    "ita": ("it", "italian"),
    "rus": ("ru", "russian"),
    "swe": ("sv", "swedish"),
    "nor": ("no", "norwegian"),
    "nob": ("no", "norwegian"),
}

BM25_SETTINGS_FILE = "bm25_settings.json"


def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


_INSTALL = 'BM25 needs the bm25 extra: pip install "st-daft[bm25]" (bm25s and PyStemmer)'


def mteb_corpus_texts(corpus: Any) -> tuple[list[str], list[str]]:
    """``(ids, texts)`` of an MTEB corpus dataset (``id``, ``text``, optionally ``title``); texts joined as
    ``"{title} {text}"``."""
    from st_daft.data import join_title_text  # here: a searcher's BM25 needs no datasets

    texts = [join_title_text(row.get("title"), row["text"]) for row in corpus]
    return [str(row["id"]) for row in corpus], texts


def mteb_query_texts(queries: Any) -> tuple[list[str], list[str]]:
    """``(ids, texts)`` of an MTEB queries dataset; a conversation (a list of turns) is joined into one text."""
    texts = [text if isinstance(text, str) else " ".join(map(str, text)) for text in queries["text"]]
    return [str(query_id) for query_id in queries["id"]], texts


class BM25Search:
    """BM25 over a retrieval task's corpus with bm25s, as an MTEB search model.

    Texts are lower-cased, split into word tokens, stripped of the language's stopwords and Snowball-stemmed
    (PyStemmer); documents are ``"{title} {text}"`` as everywhere in st-daft. Scoring is bm25s's ``method``
    (Lucene's BM25 by default) with ``k1`` and ``b``.

    Args:
        language: an ISO 639-3 code (``"eng"``); by default the task's own language when bm25s has stopwords for it
            (English, German, Dutch, French, Spanish, Portuguese, Italian, Russian, Swedish, Norwegian), else no
            stopwords and no stemmer.
        k1: BM25's term-frequency saturation.
        b: BM25's length normalisation.
        method: bm25s's scoring variant: ``"lucene"``, ``"robertson"``, ``"atire"``, ``"bm25l"``, ``"bm25+"``.
        show_progress_bar: bm25s's progress bars.

    Raises:
        ImportError: ``bm25s`` or ``PyStemmer`` is not installed.
    """

    name = "BM25"

    def __init__(
        self,
        language: str | None = None,
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        show_progress_bar: bool = False,
    ) -> None:
        try:
            import bm25s  # noqa: F401
            import Stemmer  # noqa: F401
        except ImportError as error:
            raise ImportError(f"{_INSTALL} ({error})") from None
        if language is not None and language not in _LANGUAGES:
            raise ValueError(f"BM25: no stopwords/stemmer for language {language!r}; choose from {sorted(_LANGUAGES)}")
        self.language = language
        self.k1, self.b, self.method = k1, b, method
        self.show_progress_bar = show_progress_bar
        self._retriever: Any = None
        self._document_ids: list[str] = []
        self._stopwords: str | None = None
        self._stemmer: Any = None
        self._indexed_language: str | None = None

    @property
    def mteb_model_meta(self) -> ModelMeta:
        """MTEB's description of the model (its name labels the results)."""
        from mteb.models import ModelMeta

        return ModelMeta.create_empty(overwrites={"name": "st-daft/bm25s-stemmed", "revision": self.method})

    def _task_language(self, task_metadata: TaskMetadata, hf_subset: str) -> str | None:
        if self.language is not None:
            return self.language
        languages = task_metadata.eval_langs
        if isinstance(languages, dict):
            languages = languages.get(hf_subset, [])
        codes = {code.split("-")[0] for code in languages}
        language = next(iter(codes)) if len(codes) == 1 else None
        if language not in _LANGUAGES:
            logger.warning("BM25: no stopwords/stemmer for %s (languages %s): plain tokens", task_metadata.name, codes)
            return None
        return language

    def _tokenize(self, texts: list[str]) -> Any:
        import bm25s

        return bm25s.tokenize(
            texts, stopwords=self._stopwords, stemmer=self._stemmer, show_progress=self.show_progress_bar
        )

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
        """Tokenize and index the corpus (an MTEB corpus dataset: ``id``, ``text``, optionally ``title``)."""
        document_ids, texts = mteb_corpus_texts(corpus)
        self.index_texts(document_ids, texts, task_metadata, hf_subset)

    def fit(self, documents: Sequence[str]) -> BM25Search:
        """Index plain texts (rows ``0 .. len(documents) - 1``) in ``language`` (English when None), for
        :meth:`top_k`; the MTEB protocol (:meth:`index`, :meth:`search`) is not needed for this."""
        return self.index_texts([str(row) for row in range(len(documents))], list(documents))

    def index_texts(
        self,
        document_ids: Sequence[str],
        texts: list[str],
        task_metadata: TaskMetadata | None = None,
        hf_subset: str = "default",
    ) -> BM25Search:
        """Index ``texts`` under ``document_ids``: in the task's language as :meth:`index` does when
        ``task_metadata`` is given, else in ``language`` (English when None) as :meth:`fit` does."""
        if task_metadata is not None:
            self._use_language(self._task_language(task_metadata, hf_subset))
        else:
            self._use_language(self.language or "eng")
        self._document_ids = list(document_ids)
        self._index_texts(texts)
        return self

    def top_k(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, scores)``, each ``(len(texts), min(k, documents))``: every text's best indexed documents, best
        first, and their BM25 scores (0 where a text shares no term with a document)."""
        if self._retriever is None:
            raise RuntimeError("BM25Search.top_k before fit")
        k = min(k, len(self._document_ids))
        bm25s_logger = logging.getLogger("bm25s")
        # Not one "The query is empty" line per stopword-only text. A filter, not setLevel: a logger's level change
        # clears every logger's cache, which costs a searcher more than its BM25 search.
        bm25s_logger.addFilter(_warnings_only)
        try:
            rows, scores = self._retriever.retrieve(self._tokenize(list(texts)), k=k, show_progress=False)
        finally:
            bm25s_logger.removeFilter(_warnings_only)
        return np.asarray(rows, dtype=np.int64), np.asarray(scores, dtype=np.float32)

    def normalised_top_k(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`top_k` with each text's scores divided by its best one, so in ``[0, 1]`` (all 0 for a text that
        shares no term with any document)."""
        rows, scores = self.top_k(texts, k)
        return rows, normalise_lexical_scores(scores)

    def save(self, folder: str | Path) -> None:
        """Write the index to ``folder`` (bm25s's files and ``bm25_settings.json``: language, k1, b, method, row
        count), for :meth:`load`."""
        if self._retriever is None:
            raise RuntimeError("BM25Search.save before fit")
        folder = Path(folder)
        self._retriever.save(str(folder))
        settings = {
            "language": self._indexed_language,
            "k1": self.k1,
            "b": self.b,
            "method": self.method,
            "documents": len(self._document_ids),
        }
        (folder / BM25_SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path, document_ids: Sequence[str] | None = None, mmap: bool = True) -> BM25Search:
        """An index :meth:`save` wrote (memory-mapped with ``mmap``), tokenising queries as it tokenised documents;
        ``document_ids`` name its rows (``"0"``, ``"1"``, ... when None).

        Raises:
            FileNotFoundError: ``folder`` or one of its files is missing (named).
            ValueError: the settings file is unreadable, or ``document_ids`` do not match its row count.
        """
        import bm25s

        folder = Path(folder)
        settings_file = folder / BM25_SETTINGS_FILE
        if not settings_file.is_file():
            raise FileNotFoundError(f"{settings_file}: BM25 index settings not found")
        try:
            settings = json.loads(settings_file.read_text(encoding="utf-8"))
            search = cls(settings["language"], settings["k1"], settings["b"], settings["method"])
            size = int(settings["documents"])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{settings_file}: not a BM25 settings file ({error})") from None
        if document_ids is not None and len(document_ids) != size:
            raise ValueError(
                f"{settings_file}: the BM25 index has {size} documents, the search index {len(document_ids)}"
            )
        bm25s_logger = logging.getLogger("bm25s")
        level = bm25s_logger.level
        bm25s_logger.setLevel(max(level, logging.WARNING))
        try:
            search._retriever = bm25s.BM25.load(str(folder), mmap=mmap)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"{folder}: the BM25 index does not load ({error})") from None
        finally:
            bm25s_logger.setLevel(level)
        search._use_language(settings["language"])
        search._document_ids = list(document_ids) if document_ids is not None else [str(row) for row in range(size)]
        return search

    def _use_language(self, language: str | None) -> None:
        import Stemmer

        self._indexed_language = language
        self._stopwords, stemmer_name = _LANGUAGES[language] if language else (None, None)
        self._stemmer = Stemmer.Stemmer(stemmer_name) if stemmer_name else None

    def _index_texts(self, texts: list[str]) -> None:
        import bm25s

        self._retriever = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        self._retriever.index(self._tokenize(texts), show_progress=self.show_progress_bar)

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
        """The ``top_k`` documents of each query with their BM25 scores (re-ranking ``top_ranked`` when given)."""
        if self._retriever is None:
            raise RuntimeError("BM25Search.search before index")
        query_ids, texts = mteb_query_texts(queries)
        k = len(self._document_ids) if top_ranked else min(top_k, len(self._document_ids))
        rows, scores = self._retriever.retrieve(self._tokenize(texts), k=k, show_progress=self.show_progress_bar)
        results: dict[str, dict[str, float]] = {}
        for position, query_id in enumerate(query_ids):
            allowed = set(top_ranked[query_id]) if top_ranked and query_id in top_ranked else None
            ranked = {
                self._document_ids[row]: float(score)
                for row, score in zip(rows[position], scores[position])
                if allowed is None or self._document_ids[row] in allowed
            }
            results[query_id] = dict(list(ranked.items())[:top_k]) if allowed is not None else ranked
        return results

    def __repr__(self) -> str:
        return f"BM25Search(language={self.language!r}, k1={self.k1}, b={self.b}, method={self.method!r})"


BASELINES = ("bm25",)
"""Names :func:`make_baseline` (and ``st-daft evaluate --baseline``) accepts."""


def make_baseline(name: str) -> BM25Search:
    """A baseline search model by name (``"bm25"``)."""
    if name == "bm25":
        return BM25Search()
    raise ValueError(f"unknown baseline {name!r}; choose from {list(BASELINES)}")
