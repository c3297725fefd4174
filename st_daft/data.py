"""Retrieval data in BEIR layout: local folders and the Hugging Face Hub's ``BeIR/*`` datasets; plain corpora and
query logs.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``) and
``qrels/{split}.tsv`` (``query-id``, ``corpus-id``, ``score``). :func:`load_beir` turns either source into a
:class:`RetrievalData`, from which come ``datasets`` training pairs (``query``, ``positive``) and the
``queries`` / ``corpus`` / ``relevant_docs`` dictionaries that MTEB and sentence-transformers' evaluators take.
:func:`load_corpus` reads a corpus alone (a BEIR ``corpus.jsonl``, any JSONL with a text field, or a text file with
one document per line) and :func:`load_queries_file` a query log without judgements.

Every reader checks its input before anything is trained and names the file and line of what is wrong (see
docs/errors.md): invalid JSON, missing fields, fields of the wrong type, duplicate ids, empty files, judgements that
name unknown ids. ``_id`` fields may be strings or integers (integers are read as their decimal string, the way
the ids in ``qrels/*.tsv`` are written); any other type is an error. Empty texts are an error for training and a
warning that names them for evaluation (``load_beir(..., empty_texts="warn")``): real collections have a few.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "RetrievalData",
    "load_beir",
    "load_corpus",
    "load_queries_file",
    "join_title_text",
    "DataError",
    "looks_like_local_path",
]

EmptyTexts = Literal["error", "warn"]
"""What empty (or whitespace-only) texts are: an ``"error"`` (training) or a logged ``"warn"``-ing (evaluation)."""

_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_NAMED = 10  # how many ids a message names before it says "..."


class DataError(ValueError):
    """Raised when retrieval data is missing, malformed or inconsistent."""


def join_title_text(title: str | None, text: str | None) -> str:
    """Join a BEIR title and text the way BEIR and MTEB do: ``"{title} {text}"``, stripped."""
    return f"{title or ''} {text or ''}".strip()


def _named(ids: list[str]) -> str:
    """``['a', 'b']``, or the first few and ``...`` for a long list."""
    shown = ", ".join(repr(item) for item in ids[:_NAMED])
    return f"[{shown}{', ...' if len(ids) > _NAMED else ''}]"


@dataclass
class RetrievalData:
    """A retrieval collection: corpus, queries and relevance judgements of one split.

    Args:
        corpus: document id -> document text (title and text already joined).
        queries: query id -> query text, only the queries that have judgements in ``qrels``.
        qrels: query id -> {document id: relevance score}.
        name: a short name, used for MTEB task names and logs.
        split: the split the judgements come from.
        titles: document id -> title, where the source has titles.
        empty_texts: ``"error"`` (default, for training): empty documents or judged queries raise
            :class:`DataError`; ``"warn"`` (for evaluation): they are kept and a warning names them.
    """

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    name: str = "beir"
    split: str = "test"
    titles: dict[str, str] = field(default_factory=dict, repr=False)
    empty_texts: EmptyTexts = field(default="error", repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check that every judgement points at a known query and document, and that the texts are not empty.

        Queries whose judgements are all 0 (no relevant document) are named in a warning: they give no training
        pair, and every model scores 0 on them in evaluation.
        """
        if self.empty_texts not in ("error", "warn"):
            raise ValueError(f"empty_texts must be 'error' or 'warn', got {self.empty_texts!r}")
        if not self.corpus:
            raise DataError(f"{self.name}: the corpus is empty")
        if not self.qrels:
            raise DataError(f"{self.name}: no relevance judgements for split {self.split!r}")
        for query_id, judged in self.qrels.items():
            if query_id not in self.queries:
                raise DataError(f"{self.name}: qrels ({self.split}) name query id {query_id!r}, not in queries")
            unknown = [doc_id for doc_id in judged if doc_id not in self.corpus]
            if unknown:
                raise DataError(
                    f"{self.name}: qrels ({self.split}) for query {query_id!r} name unknown corpus id(s) {unknown[:3]}"
                )
        empty_docs = [doc_id for doc_id, text in self.corpus.items() if not text.strip()]
        empty_queries = [query_id for query_id in self.qrels if not self.queries[query_id].strip()]
        if self.empty_texts == "error":
            if empty_docs:
                raise DataError(
                    f"{self.name}: {len(empty_docs)} corpus document(s) have empty text: {_named(empty_docs)}"
                )
            if empty_queries:
                raise DataError(f"{self.name}: query {empty_queries[0]!r} has empty text")
        else:
            if empty_docs:
                logger.warning(
                    "%s: %d corpus document(s) have empty text; they are kept and evaluated: %s",
                    self.name,
                    len(empty_docs),
                    _named(empty_docs),
                )
            if empty_queries:
                logger.warning(
                    "%s: %d %s quer(y/ies) have empty text; they are kept and evaluated: %s",
                    self.name,
                    len(empty_queries),
                    self.split,
                    _named(empty_queries),
                )
        without_positive = [qid for qid, judged in self.qrels.items() if not any(s > 0 for s in judged.values())]
        if without_positive:
            logger.warning(
                "%s: %d %s quer(y/ies) have no relevant (score > 0) document: no training pair, and every model "
                "scores 0 on them: %s",
                self.name,
                len(without_positive),
                self.split,
                _named(without_positive),
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
            empty_texts=self.empty_texts,
        )


# ---------------------------------------------------------------------------------------------------- local or Hub

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_BARE_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def looks_like_local_path(source: str | Path, bare_names: bool = False) -> bool:
    """Whether ``source``, which does not exist here, was meant as a local path rather than a Hub id: it is not of
    the form ``owner/name`` (nor a bare ``name`` where ``bare_names`` allows one, as models' ids do), or its first
    part is a folder here (``out/run`` beside an ``out/`` folder). Such a path is never sent to the Hub."""
    if isinstance(source, Path):
        return True
    if _HUB_ID.fullmatch(source):
        return Path(source.split("/")[0]).is_dir() or source.endswith((".json", ".jsonl", ".tsv", ".txt"))
    return not (bare_names and _BARE_HUB_NAME.fullmatch(source) and not source.endswith((".json", ".jsonl")))


def hub_failure(error: BaseException) -> str:
    """Why loading from the Hugging Face Hub failed, in words: offline mode, no connection, or not found."""
    from huggingface_hub import constants

    text = f"{type(error).__name__} {error}"
    if constants.HF_HUB_OFFLINE or "OfflineModeIsEnabled" in text:
        return "not found here, and the Hugging Face Hub is not asked in offline mode (HF_HUB_OFFLINE is set)"
    if "connect" in text.lower() or "reach" in text.lower():
        return "not found here, and the Hugging Face Hub could not be reached"
    reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    return f"not found on the Hugging Face Hub ({reason})"


# ---------------------------------------------------------------------------------------------------- line readers


def _missing_file(path: Path, what: str) -> DataError:
    """A missing-file error that mentions look-alikes in the same folder (``corpus.jsonl.gz``, ``Corpus.jsonl``)."""
    if path.is_dir():
        return DataError(f"{path} is a folder, not a file ({what})")
    stem = path.name.split(".")[0].lower()
    siblings = path.parent.glob("*") if path.parent.is_dir() else []
    near = sorted(p.name for p in siblings if p.name.lower().startswith(stem))
    hint = f"; found {near}" if near else ""
    return DataError(f"missing file {path} ({what}){hint}")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file; a binary or compressed file is named, with its line."""
    line_number = 0
    try:
        with path.open(encoding="utf-8-sig") as handle:  # a byte-order mark (some editors write one) is not text
            for line_number, line in enumerate(handle, start=1):
                yield line_number, line
    except UnicodeDecodeError:
        raise DataError(
            f"{path}:{line_number + 1}: not UTF-8 text (a compressed or binary file? decompress it first)"
        ) from None


def _json_lines(path: Path, hint: str) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` of each non-blank line of a JSON-lines file."""
    for line_number, line in _lines(path):
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as error:
            reason = f"{error.msg.removesuffix(' at')} at column {error.colno}"
            raise DataError(f"{path}:{line_number}: not valid JSON ({reason}); {hint}") from None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _id_value(path: Path, line_number: int, row: dict, key: str) -> str:
    """The row's id as a string: strings as they are, integers as their decimal string, anything else an error."""
    value = row[key]
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"{path}:{line_number}: {key} must be a string (or an integer), got {value!r} ({_type_name(value)})"
    )


def _text_value(path: Path, line_number: int, row: dict, key: str, optional: bool = False) -> str:
    """A text field, which must be a string (``null`` too for an optional one such as ``title``)."""
    value = row.get(key)
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{path}:{line_number}: {key} must be a string, got {json.dumps(value)[:40]} ({_type_name(value)})"
        )
    return value


def _check_unique(path: Path, key: str, ids: list[tuple[int, str]]) -> None:
    """Refuse repeated ids, naming each with the lines it is on: a later row must never replace an earlier one."""
    first_line: dict[str, int] = {}
    repeated: list[str] = []
    for line_number, item in ids:
        if item in first_line:
            repeated.append(f"{item!r} (lines {first_line[item]} and {line_number})")
        else:
            first_line[item] = line_number
    if repeated:
        shown = ", ".join(repeated[:_NAMED]) + (", ..." if len(repeated) > _NAMED else "")
        raise DataError(f"{path}: {len(repeated)} duplicate {key}(s): {shown}; every {key} must be unique")


@dataclass
class _BeirRows:
    """The rows of a BEIR ``corpus.jsonl`` or ``queries.jsonl``: id -> (line number, title, text)."""

    path: Path
    rows: dict[str, tuple[int, str, str]]

    def empty(self, ids: list[str] | None = None) -> list[tuple[str, int]]:
        """``(id, line)`` of the rows (of ``ids``, if given) whose joined title and text are empty."""
        chosen = self.rows if ids is None else {i: self.rows[i] for i in ids}
        return [(i, line) for i, (line, title, text) in chosen.items() if not join_title_text(title, text)]


def _read_beir_jsonl(path: Path, with_title: bool) -> _BeirRows:
    if not path.is_file():
        raise _missing_file(path, "a BEIR folder needs corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    required = ["_id", "text"]
    parsed: list[tuple[int, str, str, str]] = []
    for line_number, row in _json_lines(path, "is this a BEIR jsonl file?"):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}:{line_number}: expected a JSON object with fields {required}, got {_type_name(row)}"
            )
        missing = [key for key in required if key not in row]
        if missing:
            raise DataError(f"{path}:{line_number}: missing field(s) {missing}; BEIR rows need {required}")
        title = _text_value(path, line_number, row, "title", optional=True) if with_title else ""
        parsed.append(
            (line_number, _id_value(path, line_number, row, "_id"), title, _text_value(path, line_number, row, "text"))
        )
    if not parsed:
        raise DataError(f"{path} is empty: no rows (a BEIR jsonl file has one JSON object per line)")
    _check_unique(path, "_id", [(line_number, item) for line_number, item, _, _ in parsed])
    return _BeirRows(path, {item: (line_number, title, text) for line_number, item, title, text in parsed})


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a qrels file")
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        raise DataError(f"missing qrels file {path}; splits available: {available or 'none'}")
    qrels: dict[str, dict[str, int]] = {}
    judged_on: dict[tuple[str, str], int] = {}
    with path.open(encoding="utf-8-sig", newline="") as handle:  # a byte-order mark is not the header's text
        reader = csv.reader(handle, delimiter="\t")
        try:
            for line_number, row in enumerate(reader, start=1):
                while row and not row[-1].strip():  # a trailing tab is not a column
                    row = row[:-1]
                if not row or (line_number == 1 and row[0] == "query-id"):
                    continue
                if len(row) != 3:
                    raise DataError(
                        f"{path}:{line_number}: expected 'query-id<TAB>corpus-id<TAB>score' (3 tab-separated columns), "
                        f"got {len(row)}: {row!r}"
                    )
                query_id, doc_id = row[0].strip(), row[1].strip()
                if not query_id or not doc_id:
                    raise DataError(f"{path}:{line_number}: empty query-id or corpus-id in {row!r}")
                try:
                    score = int(float(row[2]))
                except ValueError:
                    raise DataError(f"{path}:{line_number}: score {row[2]!r} is not a number") from None
                previous = qrels.get(query_id, {}).get(doc_id)
                if previous is not None and previous != score:
                    raise DataError(
                        f"{path}:{line_number}: query {query_id!r} and document {doc_id!r} judged {score} here and "
                        f"{previous} on line {judged_on[query_id, doc_id]}"
                    )
                judged_on.setdefault((query_id, doc_id), line_number)
                qrels.setdefault(query_id, {})[doc_id] = score
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text (a compressed or binary file?)") from None
        except csv.Error as error:
            raise DataError(f"{path}:{reader.line_num}: not a tab-separated line ({error})") from None
    if not qrels:
        raise DataError(f"{path} has no judgements (expected 'query-id<TAB>corpus-id<TAB>score' lines)")
    return qrels


def _refuse_empty_texts(corpus: _BeirRows, queries: _BeirRows, judged_queries: list[str]) -> None:
    """Name every empty document and judged query with its file and line (training refuses them)."""
    empty_docs = corpus.empty()
    if empty_docs:
        named = ", ".join(f"{item!r} (line {line})" for item, line in empty_docs[:_NAMED])
        raise DataError(
            f"{corpus.path}: {len(empty_docs)} corpus document(s) have empty text: {named}"
            f"{', ...' if len(empty_docs) > _NAMED else ''} (evaluation keeps them with a warning; training cannot)"
        )
    empty_queries = queries.empty(judged_queries)
    if empty_queries:
        item, line = empty_queries[0]
        more = f" ({len(empty_queries)} judged queries are empty)" if len(empty_queries) > 1 else ""
        raise DataError(f"{queries.path}:{line}: query {item!r} has empty text{more}")


def _load_beir_folder(folder: Path, split: str, empty_texts: EmptyTexts) -> RetrievalData:
    absent = [name for name in ("corpus.jsonl", "queries.jsonl") if not (folder / name).exists()]
    if len(absent) == 2:
        raise DataError(
            f"missing files {', '.join(absent)} in {folder} (a BEIR folder needs corpus.jsonl, queries.jsonl and "
            "qrels/<split>.tsv)"
        )
    corpus_rows = _read_beir_jsonl(folder / "corpus.jsonl", with_title=True)
    query_rows = _read_beir_jsonl(folder / "queries.jsonl", with_title=False)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    qrels = _read_qrels(qrels_path)
    missing = [qid for qid in qrels if qid not in query_rows.rows]
    if missing:
        raise DataError(f"{qrels_path}: judgements name query id(s) {missing[:3]} not in queries.jsonl")
    for query_id, judged in qrels.items():
        unknown = [doc_id for doc_id in judged if doc_id not in corpus_rows.rows]
        if unknown:
            raise DataError(
                f"{qrels_path}: judgements of query {query_id!r} name unknown corpus id(s) {unknown[:3]} "
                "(not in corpus.jsonl)"
            )
    if empty_texts == "error":
        _refuse_empty_texts(corpus_rows, query_rows, list(qrels))
        if not any(score > 0 for judged in qrels.values() for score in judged.values()):
            raise DataError(f"{qrels_path}: no positive (score > 0) judgement, so no training pair; training needs one")
    corpus = {item: join_title_text(title, text) for item, (_, title, text) in corpus_rows.rows.items()}
    titles = {item: title for item, (_, title, _) in corpus_rows.rows.items()}
    queries = {qid: query_rows.rows[qid][2] for qid in qrels}
    return RetrievalData(
        corpus=corpus,
        queries=queries,
        qrels=qrels,
        name=folder.name,
        split=split,
        titles=titles,
        empty_texts=empty_texts,
    )


def _load_beir_hub(dataset_id: str, split: str, empty_texts: EmptyTexts) -> RetrievalData:
    """Load ``BeIR/<name>`` (configs ``corpus`` and ``queries``) and ``BeIR/<name>-qrels`` from the Hub."""
    from datasets import load_dataset

    try:
        corpus_ds = load_dataset(dataset_id, "corpus", split="corpus")
        queries_ds = load_dataset(dataset_id, "queries", split="queries")
        qrels_ds = load_dataset(f"{dataset_id}-qrels", split=split)
    except (OSError, ValueError) as error:  # offline, unreachable, no such dataset or split
        raise DataError(f"{dataset_id}: {hub_failure(error)}; check the id, or give a local BEIR folder") from None
    corpus = {str(row["_id"]): join_title_text(row.get("title"), row["text"]) for row in corpus_ds}
    titles = {str(row["_id"]): row.get("title") or "" for row in corpus_ds}
    if len(corpus) != len(corpus_ds):
        raise DataError(f"{dataset_id}: the corpus has {len(corpus_ds) - len(corpus)} duplicate _id(s)")
    qrels: dict[str, dict[str, int]] = {}
    for row in qrels_ds:
        qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(row["score"])
    all_queries = {str(row["_id"]): row["text"] for row in queries_ds}
    queries = {qid: all_queries[qid] for qid in qrels if qid in all_queries}
    name = dataset_id.split("/")[-1]
    return RetrievalData(
        corpus=corpus, queries=queries, qrels=qrels, name=name, split=split, titles=titles, empty_texts=empty_texts
    )


def load_beir(source: str | Path, split: str = "test", *, empty_texts: EmptyTexts = "error") -> RetrievalData:
    """Load one split of a BEIR collection from a local folder or a Hub dataset id (e.g. ``BeIR/scifact``).

    Args:
        source: a BEIR folder or a Hub dataset id.
        split: the qrels split (``qrels/{split}.tsv``).
        empty_texts: ``"error"`` (training): an empty document or judged query raises, naming file and line;
            ``"warn"`` (evaluation): they are kept, and a warning names their ids.

    Raises:
        DataError: a file is missing, empty or malformed (invalid JSON, missing or mis-typed fields, duplicate
            ids), or judgements name unknown queries/documents; every message names the file and line.
    """
    if empty_texts not in ("error", "warn"):
        raise ValueError(f"empty_texts must be 'error' or 'warn', got {empty_texts!r}")
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise DataError(f"{path} is a file; expected a BEIR folder with corpus.jsonl, queries.jsonl and qrels/")
        return _load_beir_folder(path, split, empty_texts)
    if isinstance(source, str) and not looks_like_local_path(source):
        logger.info("%s is not a local folder; loading it from the Hugging Face Hub", source)
        return _load_beir_hub(source, split, empty_texts)
    raise DataError(f"{source} does not exist; give a local BEIR folder or a Hub dataset id like 'BeIR/scifact'")


# ------------------------------------------------------------------------------------ corpora and query logs alone


def _is_json_lines(path: Path) -> bool:
    """JSON lines by suffix, or a file of another name whose first non-blank line is a JSON object."""
    if path.suffix.lower() in _JSON_SUFFIXES:
        return True
    for _, line in _lines(path):
        if line.strip():
            try:
                return isinstance(json.loads(line), dict)
            except json.JSONDecodeError:
                return False
    return False


def _text_file(path: Path, what: str) -> Path:
    """The file to read for ``path``: the file itself, or ``what`` (e.g. ``corpus.jsonl``) inside a folder."""
    if path.is_dir():
        inner = path / what
        if not inner.is_file():
            raise _missing_file(inner, f"a folder given as a {what.split('.')[0]} needs {what}")
        return inner
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    return path


def load_corpus(path: str | Path, text_field: str = "text") -> dict[str, str]:
    """A corpus alone, for training without labelled queries: document id -> text.

    Accepts a BEIR folder or its ``corpus.jsonl`` (``title`` and ``text`` joined as :func:`load_beir` joins them),
    any JSON-lines file whose objects have a ``text_field`` (ids from ``_id`` or ``id`` when present, else the line
    number; a line may also be a bare JSON string), or a text file with one document per line (ids are line numbers).
    JSON lines are recognised by the suffix (``.jsonl``, ``.json``, ``.ndjson``) or by a first line that is a JSON
    object. Blank lines are skipped. Empty texts in JSON lines are dropped with a warning that names their lines.

    Raises:
        DataError: the file is missing, empty, not UTF-8, or a line is invalid JSON, lacks ``text_field``, has a
            text that is not a string or an id that is neither a string nor an integer, or repeats an id.
    """
    file = _text_file(Path(path), "corpus.jsonl")
    documents: list[tuple[int, str, str]] = []  # line, id, text
    dropped: list[int] = []
    if _is_json_lines(file):
        hint = f"expected one JSON object with a {text_field!r} field (or a JSON string) per line"
        for line_number, row in _json_lines(file, hint):
            if isinstance(row, str):
                doc_id, text = str(line_number), row
            elif isinstance(row, dict):
                if text_field not in row:
                    raise DataError(f"{file}:{line_number}: missing field {text_field!r} (fields: {sorted(row)[:8]})")
                key = "_id" if "_id" in row else "id" if "id" in row else None
                doc_id = _id_value(file, line_number, row, key) if key else str(line_number)
                title = _text_value(file, line_number, row, "title", optional=True)
                text = join_title_text(title, _text_value(file, line_number, row, text_field))
            else:
                raise DataError(f"{file}:{line_number}: {hint}, got {_type_name(row)}")
            if text.strip():
                documents.append((line_number, doc_id, text))
            else:
                dropped.append(line_number)
    else:
        documents = [(number, str(number), line.strip()) for number, line in _lines(file) if line.strip()]
    _check_unique(file, "id", [(line_number, doc_id) for line_number, doc_id, _ in documents])
    if dropped:
        logger.warning("%s: %d empty document(s) left out, on line(s) %s", file, len(dropped), dropped[:_NAMED])
    if not documents:
        raise DataError(f"{file} holds no documents" + (f" ({len(dropped)} empty ones)" if dropped else ""))
    return {doc_id: text for _, doc_id, text in documents}


def load_queries_file(path: str | Path, text_field: str = "text") -> list[str]:
    """The texts of a query log without judgements (e.g. for ``--unlabeled-queries``), each query once.

    Accepts a JSON-lines file whose objects have a ``text_field`` (a BEIR ``queries.jsonl``, or a BEIR folder whose
    ``queries.jsonl`` is read) or whose lines are JSON strings, or a text file with one query per line. Blank lines
    are skipped, empty texts in JSON lines are left out with a warning naming their lines, and repeated queries are
    kept once, in first-seen order.

    Raises:
        DataError: the file is missing, empty, not UTF-8, or a line is invalid JSON, lacks ``text_field`` or has a
            text that is not a string.
    """
    file = _text_file(Path(path), "queries.jsonl")
    texts: list[str] = []
    dropped: list[int] = []
    if _is_json_lines(file):
        hint = f"expected one JSON object with a {text_field!r} field (or a JSON string) per line"
        for line_number, row in _json_lines(file, hint):
            if isinstance(row, dict):
                if text_field not in row:
                    raise DataError(f"{file}:{line_number}: missing field {text_field!r} (fields: {sorted(row)[:8]})")
                text = _text_value(file, line_number, row, text_field)
            elif isinstance(row, str):
                text = row
            else:
                raise DataError(f"{file}:{line_number}: {hint}, got {_type_name(row)}")
            if text.strip():
                texts.append(text.strip())
            else:
                dropped.append(line_number)
    else:
        texts = [line.strip() for _, line in _lines(file) if line.strip()]
    if dropped:
        logger.warning("%s: %d empty quer(y/ies) left out, on line(s) %s", file, len(dropped), dropped[:_NAMED])
    unique = list(dict.fromkeys(texts))
    if not unique:
        raise DataError(f"{file} holds no queries" + (f" ({len(dropped)} empty ones)" if dropped else ""))
    if len(unique) < len(texts):
        logger.info("%s: %d queries, %d distinct", file, len(texts), len(unique))
    return unique
