"""Retrieval data in BEIR layout: local folders and the Hugging Face Hub's ``BeIR/*`` datasets.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``) and
``qrels/{split}.tsv`` (``query-id``, ``corpus-id``, ``score``). :func:`load_beir` turns either source into a
:class:`RetrievalData`, from which come ``datasets`` training pairs (``query``, ``positive``) and the
``queries`` / ``corpus`` / ``relevant_docs`` dictionaries that MTEB and sentence-transformers' evaluators take.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset

logger = logging.getLogger(__name__)

__all__ = ["RetrievalData", "load_beir", "join_title_text", "DataError"]


class DataError(ValueError):
    """Raised when retrieval data is missing, malformed or inconsistent."""


def join_title_text(title: str | None, text: str | None) -> str:
    """Join a BEIR title and text the way BEIR and MTEB do: ``"{title} {text}"``, stripped."""
    return f"{title or ''} {text or ''}".strip()


@dataclass
class RetrievalData:
    """A retrieval collection: corpus, queries and relevance judgements of one split.

    Args:
        corpus: document id -> document text (title and text already joined).
        queries: query id -> query text, only the queries that have judgements in ``qrels``.
        qrels: query id -> {document id: relevance score}.
        name: a short name, used for MTEB task names and logs.
        split: the split the judgements come from.
    """

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    name: str = "beir"
    split: str = "test"
    titles: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check that every judgement points at a known, non-empty query and document."""
        if not self.corpus:
            raise DataError(f"{self.name}: the corpus is empty")
        if not self.qrels:
            raise DataError(f"{self.name}: no relevance judgements for split {self.split!r}")
        empty_docs = [doc_id for doc_id, text in self.corpus.items() if not text.strip()]
        if empty_docs:
            raise DataError(f"{self.name}: {len(empty_docs)} corpus documents have empty text, e.g. {empty_docs[:3]}")
        for query_id, judged in self.qrels.items():
            if query_id not in self.queries:
                raise DataError(f"{self.name}: qrels ({self.split}) name query id {query_id!r}, not in queries")
            if not self.queries[query_id].strip():
                raise DataError(f"{self.name}: query {query_id!r} has empty text")
            unknown = [doc_id for doc_id in judged if doc_id not in self.corpus]
            if unknown:
                raise DataError(
                    f"{self.name}: qrels ({self.split}) for query {query_id!r} name unknown corpus id(s) {unknown[:3]}"
                )

    @property
    def relevant_docs(self) -> dict[str, set[str]]:
        """query id -> set of relevant (score > 0) document ids, as InformationRetrievalEvaluator takes them."""
        return {qid: {did for did, score in judged.items() if score > 0} for qid, judged in self.qrels.items()}

    def training_pairs(self, query_column: str = "query", positive_column: str = "positive") -> Dataset:
        """One (query, positive) row per relevant judgement, in qrels order."""
        queries, positives = [], []
        for query_id, judged in self.qrels.items():
            for doc_id, score in judged.items():
                if score > 0:
                    queries.append(self.queries[query_id])
                    positives.append(self.corpus[doc_id])
        if not queries:
            raise DataError(f"{self.name}: split {self.split!r} has no positive (score > 0) judgements")
        return Dataset.from_dict({query_column: queries, positive_column: positives})

    def sample(self, num_queries: int, num_distractors: int = 0, seed: int = 0) -> RetrievalData:
        """A smaller collection: ``num_queries`` queries, their relevant documents and ``num_distractors`` others."""
        import random

        rng = random.Random(seed)
        query_ids = sorted(self.qrels)
        chosen = rng.sample(query_ids, min(num_queries, len(query_ids)))
        qrels = {qid: self.qrels[qid] for qid in chosen}
        keep = {did for judged in qrels.values() for did in judged}
        others = sorted(set(self.corpus) - keep)
        keep.update(rng.sample(others, min(num_distractors, len(others))))
        corpus = {did: text for did, text in self.corpus.items() if did in keep}
        return RetrievalData(
            corpus=corpus,
            queries={qid: self.queries[qid] for qid in chosen},
            qrels=qrels,
            name=self.name,
            split=self.split,
            titles={did: t for did, t in self.titles.items() if did in keep},
        )


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise DataError(f"missing file {path} (a BEIR folder needs corpus.jsonl, queries.jsonl and qrels/<split>.tsv)")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{line_number}: not valid JSON ({error.msg}); is this a BEIR jsonl file?"
                ) from None
            missing = [key for key in required if key not in row]
            if missing:
                raise DataError(f"{path}:{line_number}: missing field(s) {missing}; BEIR rows need {list(required)}")
            rows.append(row)
    return rows


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        raise DataError(f"missing qrels file {path}; splits available: {available or 'none'}")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        for line_number, row in enumerate(reader, start=1):
            if not row or (line_number == 1 and row[0] == "query-id"):
                continue
            if len(row) < 3:
                raise DataError(f"{path}:{line_number}: expected 'query-id<TAB>corpus-id<TAB>score', got {row!r}")
            try:
                score = int(float(row[2]))
            except ValueError:
                raise DataError(f"{path}:{line_number}: score {row[2]!r} is not a number") from None
            qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


def _load_beir_folder(folder: Path, split: str) -> RetrievalData:
    corpus_rows = _read_jsonl(folder / "corpus.jsonl", ("_id", "text"))
    query_rows = _read_jsonl(folder / "queries.jsonl", ("_id", "text"))
    qrels = _read_qrels(folder / "qrels" / f"{split}.tsv")
    corpus = {str(row["_id"]): join_title_text(row.get("title"), row["text"]) for row in corpus_rows}
    titles = {str(row["_id"]): row.get("title") or "" for row in corpus_rows}
    all_queries = {str(row["_id"]): row["text"] for row in query_rows}
    queries = {qid: all_queries[qid] for qid in qrels if qid in all_queries}
    missing = [qid for qid in qrels if qid not in all_queries]
    if missing:
        raise DataError(f"{folder}: qrels/{split}.tsv names query id(s) {missing[:3]} not in queries.jsonl")
    return RetrievalData(corpus=corpus, queries=queries, qrels=qrels, name=folder.name, split=split, titles=titles)


def _load_beir_hub(dataset_id: str, split: str) -> RetrievalData:  # pragma: no cover - needs the Hub
    """Load ``BeIR/<name>`` (configs ``corpus`` and ``queries``) and ``BeIR/<name>-qrels`` from the Hub."""
    from datasets import load_dataset

    corpus_ds = load_dataset(dataset_id, "corpus", split="corpus")
    queries_ds = load_dataset(dataset_id, "queries", split="queries")
    qrels_ds = load_dataset(f"{dataset_id}-qrels", split=split)
    corpus = {str(row["_id"]): join_title_text(row.get("title"), row["text"]) for row in corpus_ds}
    titles = {str(row["_id"]): row.get("title") or "" for row in corpus_ds}
    qrels: dict[str, dict[str, int]] = {}
    for row in qrels_ds:
        qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(row["score"])
    all_queries = {str(row["_id"]): row["text"] for row in queries_ds}
    queries = {qid: all_queries[qid] for qid in qrels if qid in all_queries}
    name = dataset_id.split("/")[-1]
    return RetrievalData(corpus=corpus, queries=queries, qrels=qrels, name=name, split=split, titles=titles)


def load_beir(source: str | Path, split: str = "test") -> RetrievalData:
    """Load one split of a BEIR collection from a local folder or a Hub dataset id (e.g. ``BeIR/scifact``).

    Raises:
        DataError: a file is missing or malformed, or judgements name unknown queries/documents or empty texts.
    """
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise DataError(f"{path} is a file; expected a BEIR folder with corpus.jsonl, queries.jsonl and qrels/")
        return _load_beir_folder(path, split)
    if isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/")):
        logger.info("%s is not a local folder; loading it from the Hugging Face Hub", source)
        return _load_beir_hub(source, split)
    raise DataError(f"{source} is neither a local BEIR folder nor a Hub dataset id like 'BeIR/scifact'")
