"""Retrieval evaluation with MTEB, through the model's query and document routes.

:func:`evaluate_retrieval` scores a :class:`~sentence_transformers.SentenceTransformer` (a symmetric model, or an
asymmetric one whose :class:`~sentence_transformers.sentence_transformer.modules.Router` has a ``"query"`` and a
``"document"`` route) on a retrieval collection with ``mteb.evaluate``. The collection is a :class:`RetrievalData`,
a local BEIR folder, a Hub ``BeIR/*`` dataset id, or the name of an MTEB retrieval task (e.g. ``"SciFact"``).

Local collections become MTEB tasks with :func:`to_mteb_task`: an ``AbsTaskRetrieval`` whose data is held in memory,
so MTEB never downloads anything for them. MTEB's SentenceTransformer wrapper encodes queries with
``model.encode_query`` and documents with ``model.encode_document``, which set ``task="query"`` / ``task="document"``
and so select the Router's routes. No MTEB result cache is read or written (``cache=None``), and the model's metadata
is built from the loaded model alone, never fetched from the Hub.

Example::

    from st_daft.evaluation import evaluate_retrieval

    scores = evaluate_retrieval("runs/daft-model", "data/scifact", split="test", output_path="results.json")
    print(scores["ndcg_at_10"])
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from st_daft.data import DataError, RetrievalData, load_beir
from st_daft.store import DocumentEmbeddingStore, document_encoder_key

if TYPE_CHECKING:
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.models import SentenceTransformerEncoderWrapper
    from mteb.results import TaskResult
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

__all__ = ["LOCAL_TASK_PREFIX", "to_mteb_task", "evaluate_retrieval"]

LOCAL_TASK_PREFIX = "BEIR-local-"
"""Prefix of the names of the MTEB tasks made from local collections, e.g. ``BEIR-local-scifact``."""

# Score families that MTEB reports for retrieval and that are kept in the flat result. MTEB's ``nauc_*`` scores
# (how well the similarity scores are calibrated) are left out: they are diagnostics, often NaN on small sets.
_KEPT_SCORE = re.compile(r"^(main_score|accuracy|(ndcg|map|recall|precision|mrr|hit_rate)_at_\d+)$")


@functools.cache
def _local_retrieval_task_class() -> type[AbsTaskRetrieval]:
    """The base class of local retrieval tasks, created on first use so that importing this module stays cheap."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    class LocalRetrievalTask(AbsTaskRetrieval):
        """An MTEB retrieval task over an in-memory :class:`RetrievalData`; loading it never downloads anything.

        Subclasses set ``metadata`` at class level, as MTEB tasks do (``AbsTask.unload_data`` drops
        instance-level metadata), see :func:`to_mteb_task`.
        """

        def __init__(self, data: RetrievalData, seed: int = 42, **kwargs: Any) -> None:
            self.retrieval_data = data
            super().__init__(seed=seed, **kwargs)

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            """Fill ``self.dataset["default"][split]`` with the corpus, queries and relevance judgements."""
            if self.data_loaded:
                return
            data = self.retrieval_data
            # The corpus text already joins title and text, as MTEB would: no ``title`` column, so it is used as is.
            split_data = RetrievalSplitData(
                corpus=Dataset.from_dict({"id": list(data.corpus), "text": list(data.corpus.values())}),
                queries=Dataset.from_dict({"id": list(data.queries), "text": list(data.queries.values())}),
                relevant_docs={query_id: dict(judged) for query_id, judged in data.qrels.items()},
                top_ranked=None,
            )
            self.dataset = {"default": {data.split: split_data}}
            self.data_loaded = True

    LocalRetrievalTask.__module__ = __name__
    return LocalRetrievalTask


def _content_revision(data: RetrievalData) -> str:
    """A short hash of the collection's content, recorded by MTEB as the dataset revision."""
    digest = hashlib.sha256()
    for part in (data.corpus, data.queries, data.qrels):
        digest.update(json.dumps(part, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]


def to_mteb_task(
    data: RetrievalData,
    name: str | None = None,
    languages: Sequence[str] = ("eng-Latn",),
    description: str | None = None,
) -> AbsTaskRetrieval:
    """Wrap a :class:`RetrievalData` as an MTEB retrieval task that holds its data in memory.

    The task is an instance of a fresh ``AbsTaskRetrieval`` subclass with valid mteb 2.x ``TaskMetadata``: type
    ``Retrieval``, category ``t2t``, eval split ``data.split``, main score ``ndcg_at_10``. Its ``load_data`` fills
    ``task.dataset["default"][data.split]`` with ``corpus`` / ``queries`` datasets (``id``, ``text``) and
    ``relevant_docs`` straight from ``data``, so MTEB never tries to download it. The dataset revision is a hash of
    the collection's content.

    Args:
        data: the collection to evaluate on.
        name: the task name; defaults to ``f"BEIR-local-{data.name}"``.
        languages: the collection's languages as ISO 639-3 + ISO 15924 codes, e.g. ``["eng-Latn"]``.
        description: the task description; a summary of the collection by default.

    Returns:
        An ``AbsTaskRetrieval`` ready for ``mteb.evaluate``.
    """
    from mteb.abstasks.task_metadata import TaskMetadata

    name = name or f"{LOCAL_TASK_PREFIX}{data.name}"
    metadata = TaskMetadata(
        name=name,
        description=description
        or (
            f"Local BEIR-format retrieval collection {data.name!r}, {data.split} split: "
            f"{len(data.queries)} queries, {len(data.corpus)} documents."
        ),
        dataset={"path": f"local/{data.name}", "revision": _content_revision(data)},
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=[data.split],
        eval_langs=list(languages),
        main_score="ndcg_at_10",
        dialect=[],
        sample_creation="found",
        bibtex_citation="",
    )
    class_name = "Local" + re.sub(r"\W+", "_", name).strip("_") + "Retrieval"
    task_class = type(class_name, (_local_retrieval_task_class(),), {"metadata": metadata, "__module__": __name__})
    return task_class(data)


def _named_task(name: str, split: str) -> AbsTaskRetrieval:
    """An MTEB retrieval task by name (e.g. ``"SciFact"``), restricted to ``split``; its data comes from the Hub."""
    import mteb
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    task = mteb.get_task(name)
    if not isinstance(task, AbsTaskRetrieval):
        raise DataError(f"MTEB task {name!r} is a {task.metadata.type} task, not a retrieval task")
    if split not in task.metadata.eval_splits:
        raise DataError(f"MTEB task {name!r} has no split {split!r}; its splits: {task.metadata.eval_splits}")
    return task.filter_eval_splits([split])


def _resolve_task(data: RetrievalData | str | Path | AbsTaskRetrieval, split: str | None) -> AbsTaskRetrieval:
    """Turn any accepted ``data`` into an MTEB retrieval task evaluated on one split."""
    if isinstance(data, RetrievalData):
        if split is not None and split != data.split:
            raise DataError(f"{data.name}: the data holds the {data.split!r} split, not {split!r}")
        return to_mteb_task(data)
    if not isinstance(data, (str, Path)):
        from mteb.abstasks.retrieval import AbsTaskRetrieval

        if isinstance(data, AbsTaskRetrieval):
            return data.filter_eval_splits([split]) if split else data
        raise TypeError(
            f"data must be a RetrievalData, a path, a Hub dataset id or an MTEB task name, got {type(data)}"
        )
    split = split or "test"
    if Path(data).exists() or "/" in str(data):
        # A local BEIR folder or a Hub ``BeIR/*`` id: load_beir explains what is missing (e.g. the split's qrels).
        return to_mteb_task(load_beir(data, split))
    try:
        return _named_task(str(data), split)
    except KeyError as error:
        raise DataError(
            f"{data!r} is neither a local BEIR folder, a Hub dataset id like 'BeIR/scifact', nor an MTEB task name "
            f"({error.args[0] if error.args else error})"
        ) from None


def _wrap_model(model: SentenceTransformer) -> SentenceTransformerEncoderWrapper:
    """Wrap ``model`` the way ``mteb.evaluate`` would, quietly and without any Hub look-up.

    MTEB's wrapper encodes ``PromptType.query`` inputs with ``model.encode_query`` and ``PromptType.document`` inputs
    with ``model.encode_document`` (sentence-transformers >= 5), i.e. through the Router's query / document routes.
    Its metadata comes from the loaded model only (``ModelMeta.from_sentence_transformer_model`` without
    ``fetch_from_hf``). The deprecation warnings MTEB emits while building it are silenced, and so are its log
    warnings about counting embedding parameters, which it cannot do for a Router model (no single tokenizer).
    """
    from mteb.models import SentenceTransformerEncoderWrapper

    meta_logger = logging.getLogger("mteb.models.model_meta")
    previous_level = meta_logger.level
    meta_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mteb(\.|$)")
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"mteb(\.|$)")
            return SentenceTransformerEncoderWrapper(model)
    finally:
        meta_logger.setLevel(previous_level)


@contextmanager
def _documents_from_store(model: SentenceTransformer, store: DocumentEmbeddingStore | None) -> Iterator[None]:
    """While active, ``model.encode_document`` reads texts ``store`` holds for this document route from it.

    MTEB's wrapper calls ``model.encode_document`` batch by batch; an instance attribute shadows the method for the
    evaluation only, so the model is unchanged afterwards. Non-text inputs go straight to the model.
    """
    if store is None:
        yield
        return
    original = model.encode_document
    encoder_key = document_encoder_key(model)

    def encode_document(inputs: Any, prompt: str | None = None, **kwargs: Any) -> Any:
        if not isinstance(inputs, list) or not all(isinstance(text, str) for text in inputs):
            return original(inputs, prompt=prompt, **kwargs)
        options = {**kwargs, "convert_to_numpy": True, "convert_to_tensor": False}

        def compute(missing: list[str]) -> np.ndarray:
            return original(missing, prompt=prompt, **options)

        return store.embeddings(model, inputs, compute, kind="document", prompt=prompt, encoder_key=encoder_key)

    model.encode_document = encode_document
    try:
        yield
    finally:
        del model.encode_document
        logger.info("document store: %d documents read back, %d encoded", store.hits, store.misses)


def _count(task: AbsTaskRetrieval, split: str, column: str) -> int:
    """The number of queries or documents MTEB evaluated on, summed over the task's subsets."""
    total = 0
    for subset in task.hf_subsets:
        split_data = task.dataset[subset][split] if subset in task.dataset else task.dataset[split]
        total += len(split_data[column])
    return total


def _flat_scores(task_result: TaskResult, split: str) -> dict[str, float]:
    """MTEB's retrieval scores of ``split`` as one flat dict, averaged over subsets if the task has several."""
    per_subset = task_result.scores[split]
    flat: dict[str, float] = {}
    for key in per_subset[0]:
        if not _KEPT_SCORE.match(key):
            continue
        values = [scores.get(key) for scores in per_subset]
        if all(isinstance(value, Real) and not isinstance(value, bool) for value in values):
            mean = sum(float(value) for value in values) / len(values)
            if math.isfinite(mean):
                flat[key] = mean
    return flat


def evaluate_retrieval(
    model: SentenceTransformer | str | Path,
    data: RetrievalData | str | Path | AbsTaskRetrieval,
    split: str | None = None,
    output_path: str | Path | None = None,
    batch_size: int = 64,
    show_progress_bar: bool = True,
    document_store: DocumentEmbeddingStore | str | Path | None = None,
) -> dict[str, float | int | str]:
    """Evaluate a (possibly asymmetric) SentenceTransformer on a retrieval collection with MTEB.

    Queries are encoded with ``model.encode_query`` and documents with ``model.encode_document``, so a model with a
    ``Router`` uses its ``"query"`` route for queries and its ``"document"`` route for documents; a symmetric model
    encodes both the same way. Runs ``mteb.evaluate`` with ``cache=None`` (no results are read from or written to
    MTEB's result cache) and no CO2 tracking; local collections are never downloaded.

    Args:
        model: a SentenceTransformer, or a path / model id to load with ``SentenceTransformer(model)``.
        data: a :class:`RetrievalData`; a local BEIR folder or a Hub dataset id such as ``"BeIR/scifact"`` (loaded
            with :func:`~st_daft.data.load_beir`); an MTEB retrieval task name such as ``"SciFact"`` (its data comes
            from the Hub); or an MTEB ``AbsTaskRetrieval``.
        split: the split to evaluate. Defaults to the split a :class:`RetrievalData` holds (asking for another one
            raises :class:`~st_daft.data.DataError`), and to ``"test"`` otherwise.
        output_path: if given, the returned dict is also written there as JSON (parent folders are created).
        batch_size: the encoding batch size.
        show_progress_bar: whether to show encoding progress bars.
        document_store: a :class:`~st_daft.store.DocumentEmbeddingStore` (or its folder). Document embeddings it
            holds for this model's exact document route are read back, the others are encoded and stored: comparing
            several query routes against one frozen document encoder embeds each corpus once.

    Returns:
        A flat dict: ``task``, ``split``, ``model`` (when known), ``num_queries``, ``num_documents``, MTEB's
        retrieval scores at k in 1, 3, 5, 10, 20, 100, 1000 (``ndcg_at_k``, ``map_at_k``, ``recall_at_k``,
        ``precision_at_k``, ``mrr_at_k``, ``hit_rate_at_k``), ``accuracy`` (= recall@1), ``main_score``
        (= ``ndcg_at_10`` for BEIR collections) and ``evaluation_time`` in seconds.

    Raises:
        DataError: the data cannot be found or loaded, e.g. the folder has no qrels for ``split``.
    """
    import mteb
    from sentence_transformers import SentenceTransformer

    model_label: str | None = None
    if isinstance(model, (str, Path)):
        model_label = str(model)
        model = SentenceTransformer(str(model))
    elif not isinstance(model, SentenceTransformer):
        raise TypeError(f"model must be a SentenceTransformer or a path to one, got {type(model)}")
    else:
        model_label = model.model_card_data.model_name or model.model_card_data.base_model

    task = _resolve_task(data, split)
    split = task.eval_splits[0]
    if len(task.eval_splits) != 1:
        task.filter_eval_splits([split])

    # Load the data here rather than inside mteb.evaluate, which would unload it afterwards: the counts need it.
    loaded_here = not task.data_loaded
    if loaded_here:
        task.load_data()
    if document_store is not None and not isinstance(document_store, DocumentEmbeddingStore):
        document_store = DocumentEmbeddingStore(document_store)
    try:
        with _documents_from_store(model, document_store):
            model_result = mteb.evaluate(
                _wrap_model(model),
                task,
                cache=None,
                co2_tracker=False,
                raise_error=True,
                encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress_bar},
                show_progress_bar=show_progress_bar,
            )
        num_queries = _count(task, split, "queries")
        num_documents = _count(task, split, "corpus")
    finally:
        if loaded_here and task.data_loaded:
            task.unload_data()

    task_result = model_result.task_results[0]
    results: dict[str, float | int | str] = {"task": task.metadata.name, "split": split}
    if model_label:
        results["model"] = model_label
    results["num_queries"] = num_queries
    results["num_documents"] = num_documents
    results.update(_flat_scores(task_result, split))
    if task_result.evaluation_time is not None:
        results["evaluation_time"] = float(task_result.evaluation_time)

    logger.info(
        "%s (%s, %d queries, %d documents): nDCG@10 %.4f, MRR@10 %.4f, Recall@100 %.4f",
        results["task"],
        split,
        num_queries,
        num_documents,
        results.get("ndcg_at_10", float("nan")),
        results.get("mrr_at_10", float("nan")),
        results.get("recall_at_100", float("nan")),
    )
    if output_path is not None:
        output_path = Path(output_path)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results
