"""Retrieval evaluation with MTEB, through the model's query and document routes.

:func:`evaluate_retrieval` scores a :class:`~sentence_transformers.SentenceTransformer` (a symmetric model, or an
asymmetric one whose :class:`~sentence_transformers.sentence_transformer.modules.Router` has a ``"query"`` and a
``"document"`` route) on a retrieval collection with ``mteb.evaluate``. The collection is a :class:`RetrievalData`,
a local BEIR folder, a Hub ``BeIR/*`` dataset id, or the name of an MTEB retrieval task (e.g. ``"SciFact"``).

Local collections become MTEB tasks with :func:`to_mteb_task`: an ``AbsTaskRetrieval`` whose data is held in memory,
so MTEB never downloads anything for them. The model reaches MTEB through MTEB's own encoder wrapper
(``SentenceTransformerEncoderWrapper``), which encodes queries with ``model.encode_query`` and documents with
``model.encode_document`` (``task="query"`` / ``task="document"``: the Router's routes); a subclass of it reads
document embeddings from a :class:`~st_daft.embeddings.store.DocumentEmbeddingStore` when one is given. Search models
such as
:class:`~st_daft.evaluation.baselines.BM25Search` rank by themselves, and MTEB scores every model's rankings with the
same code.
No MTEB result cache is read or written (``cache=None``), and the model's metadata is built from the loaded model
alone, never fetched from the Hub. :func:`evaluate_collections` runs several models on several collections and
:func:`format_table` prints the comparison (``st-daft evaluate MODEL --data A --data B --baseline bm25``).

Example::

    from st_daft.evaluation.mteb import evaluate_retrieval

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
from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from st_daft.data import DataError, RetrievalData, load_beir
from st_daft.embeddings.store import DocumentEmbeddingStore, document_encoder_key, document_prompt
from st_daft.evaluation.collapse import warn_zero_query_vectors
from st_daft.evaluation.hybrid import HybridSearch

if TYPE_CHECKING:
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.models import SearchProtocol, SentenceTransformerEncoderWrapper
    from mteb.results import TaskResult
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

__all__ = ["LOCAL_TASK_PREFIX", "to_mteb_task", "evaluate_retrieval", "evaluate_collections"]

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
        return to_mteb_task(load_beir(data, split, empty_texts="warn"))
    try:
        return _named_task(str(data), split)
    except KeyError as error:
        raise DataError(
            f"{data!r} is neither a local BEIR folder, a Hub dataset id like 'BeIR/scifact', nor an MTEB task name "
            f"({error.args[0] if error.args else error})"
        ) from None


@functools.cache
def _store_encoder_class() -> type[SentenceTransformerEncoderWrapper]:
    """MTEB's SentenceTransformer wrapper, with documents read from a document store; created on first use."""
    from mteb.models import SentenceTransformerEncoderWrapper
    from mteb.types import PromptType

    class DocumentStoreEncoderWrapper(SentenceTransformerEncoderWrapper):
        """MTEB's encoder for a SentenceTransformer, reading document embeddings from a ``DocumentEmbeddingStore``.

        MTEB asks its encoder for ``PromptType.query`` and ``PromptType.document`` embeddings; the parent class
        answers with ``model.encode_query`` and ``model.encode_document`` (the Router's query and document routes).
        With a store, document texts it holds for this exact document route (same :func:`document_encoder_key`,
        same prompt) are read back and only the others go through ``model.encode_document``; queries, and
        everything when there is no store, take the parent's path unchanged.
        """

        def __init__(
            self, model: SentenceTransformer, document_store: DocumentEmbeddingStore | None = None, **kwargs: Any
        ) -> None:
            super().__init__(model, **kwargs)
            self.document_store = document_store
            self._encoder_key = document_encoder_key(model) if document_store is not None else None

        def encode(
            self,
            inputs: Any,
            *,
            task_metadata: Any,
            hf_split: str,
            hf_subset: str,
            prompt_type: PromptType | None = None,
            **kwargs: Any,
        ) -> Any:
            texts = None
            if self.document_store is not None and prompt_type == PromptType.document:
                batches = list(inputs)
                if all("text" in batch for batch in batches):
                    texts = [text for batch in batches for text in batch["text"]]
            if texts is None or not all(isinstance(text, str) for text in texts):
                embeddings = super().encode(
                    inputs,
                    task_metadata=task_metadata,
                    hf_split=hf_split,
                    hf_subset=hf_subset,
                    prompt_type=prompt_type,
                    **kwargs,
                )
                if prompt_type == PromptType.query:
                    warn_zero_query_vectors(embeddings, inputs)
                return embeddings
            prompt_name = self.get_prompt_name(task_metadata, prompt_type)
            prompt = (self.model_prompts or {}).get(prompt_name) if prompt_name else None
            options = {**kwargs, "convert_to_numpy": True, "convert_to_tensor": False}

            def compute(missing: list[str]) -> np.ndarray:
                return self.model.encode_document(missing, prompt=prompt, **options)

            return self.document_store.embeddings(
                self.model,
                texts,
                compute,
                kind="document",
                prompt=document_prompt(self.model, prompt),  # without MTEB's prompt, the model's own
                encoder_key=self._encoder_key,
            )

    DocumentStoreEncoderWrapper.__module__ = __name__
    return DocumentStoreEncoderWrapper


def _wrap_model(
    model: SentenceTransformer, document_store: DocumentEmbeddingStore | None = None
) -> SentenceTransformerEncoderWrapper:
    """Wrap ``model`` the way ``mteb.evaluate`` would, quietly, without any Hub look-up, reading ``document_store``.

    MTEB's wrapper encodes ``PromptType.query`` inputs with ``model.encode_query`` and ``PromptType.document`` inputs
    with ``model.encode_document`` (sentence-transformers >= 5), i.e. through the Router's query / document routes;
    documents the store holds are read from it instead. The metadata comes from the loaded model only
    (``ModelMeta.from_sentence_transformer_model`` without ``fetch_from_hf``). The deprecation warnings MTEB emits
    while building it are silenced, and so are its log warnings about counting embedding parameters, which it cannot
    do for a Router model (no single tokenizer).
    """
    meta_logger = logging.getLogger("mteb.models.model_meta")
    previous_level = meta_logger.level
    meta_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mteb(\.|$)")
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"mteb(\.|$)")
            return _store_encoder_class()(model, document_store=document_store)
    finally:
        meta_logger.setLevel(previous_level)


def _is_search_model(model: Any) -> bool:
    """An MTEB search model (``index`` + ``search``, e.g. :class:`~st_daft.evaluation.baselines.BM25Search`)."""
    return callable(getattr(model, "index", None)) and callable(getattr(model, "search", None))


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


def _load_model(model: Any) -> tuple[Any, str | None]:
    """``(model, label)``: a path or id loaded as a SentenceTransformer; a SentenceTransformer or search model as is."""
    from sentence_transformers import SentenceTransformer

    if isinstance(model, (str, Path)):
        return SentenceTransformer(str(model)), str(model)
    if isinstance(model, SentenceTransformer):
        return model, model.model_card_data.model_name or model.model_card_data.base_model
    if _is_search_model(model):
        return model, getattr(model, "name", None) or model.mteb_model_meta.name
    raise TypeError(
        f"model must be a SentenceTransformer, a path to one, or an MTEB search model (index/search), got {type(model)}"
    )


def evaluate_retrieval(
    model: SentenceTransformer | str | Path | SearchProtocol,
    data: RetrievalData | str | Path | AbsTaskRetrieval,
    split: str | None = None,
    output_path: str | Path | None = None,
    batch_size: int = 64,
    show_progress_bar: bool = True,
    document_store: DocumentEmbeddingStore | str | Path | None = None,
) -> dict[str, float | int | str]:
    """Evaluate a (possibly asymmetric) SentenceTransformer, or a search model such as BM25, with MTEB.

    Queries are encoded with ``model.encode_query`` and documents with ``model.encode_document``, so a model with a
    ``Router`` uses its ``"query"`` route for queries and its ``"document"`` route for documents; a symmetric model
    encodes both the same way. A search model (MTEB's ``SearchProtocol``: ``index`` and ``search``, e.g.
    :class:`~st_daft.evaluation.baselines.BM25Search`) ranks the documents itself, and MTEB scores its rankings with
    the same
    code and judgements. Runs ``mteb.evaluate`` with ``cache=None`` (no results are read from or written to MTEB's
    result cache) and no CO2 tracking; local collections are never downloaded.

    Args:
        model: a SentenceTransformer, a path / model id to load with ``SentenceTransformer(model)``, or an MTEB
            search model.
        data: a :class:`RetrievalData`; a local BEIR folder or a Hub dataset id such as ``"BeIR/scifact"`` (loaded
            with :func:`~st_daft.data.load_beir`; empty documents and queries are kept, and a warning names them);
            an MTEB retrieval task name such as ``"SciFact"`` (its data comes from the Hub); or an MTEB
            ``AbsTaskRetrieval``.
        split: the split to evaluate. Defaults to the split a :class:`RetrievalData` holds (asking for another one
            raises :class:`~st_daft.data.DataError`), and to ``"test"`` otherwise.
        output_path: if given, the returned dict is also written there as JSON (parent folders are created).
        batch_size: the encoding batch size.
        show_progress_bar: whether to show encoding progress bars.
        document_store: a :class:`~st_daft.embeddings.store.DocumentEmbeddingStore` (or its folder). Document
            embeddings it
            holds for this model's exact document route are read back, the others are encoded and stored: comparing
            several query routes against one frozen document encoder embeds each corpus once. Not used by search
            models.

    Returns:
        A flat dict: ``task``, ``split``, ``model`` (when known), ``num_queries``, ``num_documents``, MTEB's
        retrieval scores at k in 1, 3, 5, 10, 20, 100, 1000 (``ndcg_at_k``, ``map_at_k``, ``recall_at_k``,
        ``precision_at_k``, ``mrr_at_k``, ``hit_rate_at_k``), ``accuracy`` (= recall@1), ``main_score``
        (= ``ndcg_at_10`` for BEIR collections) and ``evaluation_time`` in seconds.

    Raises:
        DataError: the data cannot be found or loaded, e.g. the folder has no qrels for ``split``.
    """
    import mteb

    model, model_label = _load_model(model)
    if _is_search_model(model):
        mteb_model = model
    else:
        if document_store is not None and not isinstance(document_store, DocumentEmbeddingStore):
            document_store = DocumentEmbeddingStore(document_store)
        mteb_model = _wrap_model(model, document_store)

    store = getattr(mteb_model, "document_store", None)
    counts_before = (store.hits, store.misses, store.repeats) if store is not None else (0, 0, 0)
    task = _resolve_task(data, split)
    split = task.eval_splits[0]
    if len(task.eval_splits) != 1:
        task.filter_eval_splits([split])

    # Load the data here rather than inside mteb.evaluate, which would unload it afterwards: the counts need it.
    loaded_here = not task.data_loaded
    if loaded_here:
        task.load_data()
    try:
        model_result = mteb.evaluate(
            mteb_model,
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
    if store is not None:
        hits, misses, repeats = (
            now - before for now, before in zip((store.hits, store.misses, store.repeats), counts_before)
        )
        repeated = f" ({repeats} repeat another document's text and share its row)" if repeats else ""
        logger.info("document store: %d documents read back, %d encoded%s", hits, misses, repeated)

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
        "%s on %s (%s, %d queries, %d documents): nDCG@10 %.4f, MRR@10 %.4f, Recall@100 %.4f",
        model_label or "model",
        results["task"],
        split,
        num_queries,
        num_documents,
        results.get("ndcg_at_10", float("nan")),
        results.get("mrr_at_10", float("nan")),
        results.get("recall_at_100", float("nan")),
    )
    if output_path is not None:
        _write_json(output_path, results)
    return results


def _write_json(path: str | Path, content: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _collection_name(task: AbsTaskRetrieval, taken: set[str]) -> str:
    """A short, unique column name: the folder's name for a local collection, the task name otherwise."""
    name = task.metadata.name.removeprefix(LOCAL_TASK_PREFIX)
    unique, number = name, 2
    while unique in taken:
        unique, number = f"{name}-{number}", number + 1
    taken.add(unique)
    return unique


def evaluate_collections(
    models: Sequence[SentenceTransformer | str | Path | SearchProtocol],
    collections: Sequence[RetrievalData | str | Path | AbsTaskRetrieval],
    split: str | None = None,
    *,
    labels: Sequence[str] | None = None,
    output_path: str | Path | None = None,
    batch_size: int = 64,
    show_progress_bar: bool = True,
    document_store: DocumentEmbeddingStore | str | Path | None = None,
    fuse_bm25: float | None = None,
) -> dict[str, Any]:
    """Evaluate several models (e.g. a trained route and :class:`~st_daft.evaluation.baselines.BM25Search`) on several
    collections with :func:`evaluate_retrieval`, and average each model's scores over the collections.

    Every collection is loaded and checked before any model runs, so a bad input is named first. Each model is
    loaded once, and each collection's data once for all models.

    Args:
        models: SentenceTransformers, paths to them, or MTEB search models.
        collections: anything :func:`evaluate_retrieval` takes as ``data``.
        split: the split of every collection (``"test"`` by default).
        labels: a row label per model; by default the path given, the model's name, or ``"BM25"``.
        output_path: if given, the returned dict is written there as JSON.
        batch_size: as in :func:`evaluate_retrieval`.
        show_progress_bar: as in :func:`evaluate_retrieval`.
        document_store: as in :func:`evaluate_retrieval`.
        fuse_bm25: if given, a BM25 weight: every SentenceTransformer (or path) among ``models`` also gets a row
            ``"<label> + BM25 (<weight>)"`` scored by :class:`~st_daft.evaluation.hybrid.HybridSearch` with that weight
            (the
            ``bm25`` extra), from the same loaded model and ``document_store``.

    Returns:
        ``{"split", "collections": [names], "models": [labels], "scores": {label: {collection: flat scores}},
        "mean": {label: {score: mean over the collections}}}``; :func:`format_table` prints it.
    """
    if not models or not collections:
        raise ValueError("evaluate_collections needs at least one model and one collection")
    if labels is not None and len(labels) != len(models):
        raise ValueError(f"{len(labels)} labels for {len(models)} models")
    tasks = [_resolve_task(data, split) for data in collections]  # every collection checked before any model runs
    names: list[str] = []
    taken: set[str] = set()
    for task in tasks:
        names.append(_collection_name(task, taken))
    loaded = [_load_model(model) for model in models]
    row_labels = list(labels) if labels is not None else [label or f"model-{i}" for i, (_, label) in enumerate(loaded)]
    if document_store is not None and not isinstance(document_store, DocumentEmbeddingStore):
        document_store = DocumentEmbeddingStore(document_store)
    if fuse_bm25 is not None:
        dense = [(model, label) for (model, _), label in zip(loaded, row_labels) if not _is_search_model(model)]
        for model, label in dense:
            fused_label = f"{label} + BM25 ({fuse_bm25:g})"
            loaded.append((HybridSearch(model, weight=fuse_bm25, document_store=document_store), fused_label))
            row_labels.append(fused_label)
    if len(set(row_labels)) != len(row_labels):
        raise ValueError(f"models need distinct labels, got {row_labels}")

    scores: dict[str, dict[str, dict[str, Any]]] = {label: {} for label in row_labels}
    for task, name in zip(tasks, names):
        loaded_here = not task.data_loaded
        if loaded_here:
            task.load_data()
        try:
            for (model, _), label in zip(loaded, row_labels):
                result = evaluate_retrieval(
                    model,
                    task,
                    batch_size=batch_size,
                    show_progress_bar=show_progress_bar,
                    document_store=document_store,
                )
                scores[label][name] = {**result, "model": label}
        finally:
            if loaded_here and task.data_loaded:
                task.unload_data()

    means: dict[str, dict[str, float]] = {}
    for label, per_collection in scores.items():
        keys = [key for key in per_collection[names[0]] if _KEPT_SCORE.match(key)]
        shared = [key for key in keys if all(key in per_collection[name] for name in names)]
        means[label] = {key: sum(per_collection[name][key] for name in names) / len(names) for key in shared}
    comparison = {
        "split": tasks[0].eval_splits[0],
        "collections": names,
        "models": row_labels,
        "scores": scores,
        "mean": means,
    }
    if output_path is not None:
        _write_json(output_path, comparison)
    return comparison
