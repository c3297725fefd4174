"""The recipe's stages as objects: each holds its own settings and ``run``s on a shared :class:`StageContext`,
returning one :class:`StageResult`.

- :class:`VocabularyStage` (static query routes, label-free): every token of the query tokenizer is embedded by the
  document route, the tokens of the corpus take their mean contextual vectors over it (for a corpus alone, by
  default), and the static table starts from those vectors (:mod:`st_daft.vocabulary`).
- :class:`CorpusStage` (label-free): the document route is frozen and the query route learns to reproduce its
  embeddings of texts cut from the corpus (:class:`~st_daft.losses.LabelFreeAlignmentLoss`).
- :class:`AlignStage` (DAFT stage 1): the document route is frozen; a
  :class:`~st_daft.cache.StaleEmbeddingCache` of the corpus is built once (exact, because the route does not move)
  and :class:`~st_daft.losses.DAFTAlignmentLoss` trains the query route with every corpus document as a negative.
- :class:`FinetuneStage` (DAFT stage 2): both routes train with :class:`~st_daft.losses.CollapseSafeContrastiveLoss`,
  each route with its own learning rate; the checkpoint with the best validation nDCG@10 is kept, and training
  stops with the reason if a route collapses.

The two frozen-document stages early-stop on the 1-NN KL estimate between the routes' embeddings of held-out texts
(:class:`~st_daft.collapse.CollapseEvaluator`, transformers' ``EarlyStoppingCallback``) and keep the checkpoint with
the lowest KL.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from datasets import Dataset, concatenate_datasets
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator, SequentialEvaluator
from transformers import EarlyStoppingCallback
from transformers.trainer_utils import get_last_checkpoint, sort_checkpoints

from st_daft.cache import StaleEmbeddingCache
from st_daft.callbacks import CollapseStopCallback, LogStatisticsCallback, NonFiniteLossCallback
from st_daft.collapse import CollapseEvaluator
from st_daft.corpus_alignment import (
    TEXT_KINDS,
    alignment_dataset,
    alignment_examples,
    lexical_ranking_columns,
    pseudo_query_dataset,
    with_teacher_neighbours,
)
from st_daft.data import RetrievalData
from st_daft.distributed import barrier, is_distributed, is_main_process
from st_daft.fingerprint import encoding_fingerprint
from st_daft.general_corpus import GENERAL_TEXTS_AVAILABLE, general_texts
from st_daft.index import INDEX_KINDS
from st_daft.io import atomic_torch_save
from st_daft.losses import CollapseSafeContrastiveLoss, DAFTAlignmentLoss, LabelFreeAlignmentLoss
from st_daft.losses.corpus_sample import resolve_sample_size
from st_daft.model import (
    DOCUMENT_ROUTE,
    QUERY_ROUTE,
    freeze_route,
    get_route,
    has_route,
    interpolate_route,
    route_parameter_pattern,
    route_prompt,
    route_weights,
    unfreeze_route,
)
from st_daft.retrieval_evaluator import CachedCorpusRetrievalEvaluator
from st_daft.store import DocumentEmbeddingStore
from st_daft.vocabulary import (
    TokenStatistics,
    add_words_to_static_route,
    contextual_token_statistics,
    corpus_token_weights,
    corpus_words,
    corpus_words_unsupported,
    initialize_static_route,
    mean_pooled_transformer,
    reweight_static_route,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Stage",
    "TrainedStage",
    "VocabularyStage",
    "CorpusStage",
    "AlignStage",
    "FinetuneStage",
    "StageResult",
    "StageContext",
    "STAGE_TYPES",
    "training_arguments",
    "last_complete_checkpoint",
]

KL_EVALUATOR_NAME = "alignment"
IR_EVALUATOR_NAME = "validation"
KL_METRIC = f"eval_{KL_EVALUATOR_NAME}_knn_kl"
VALIDATION_METRIC = f"eval_{IR_EVALUATOR_NAME}_cosine_ndcg@10"
ALIGN_SELECTIONS = ("auto", "kl", "validation")
#: The query route as the align stage found it, kept in its folder for --resume (:attr:`AlignStage.interpolation`).
INTERPOLATION_START_FILE = "interpolation-start.pt"
#: What transformers writes last into a checkpoint folder (``Trainer._save_checkpoint``): a folder without it was
#: interrupted while it was written.
COMPLETE_CHECKPOINT_MARKER = "trainer_state.json"
PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("cpu", "cuda", "mps")


@dataclass
class StageResult:
    """What every stage returns (a stage that trains nothing has ``steps=0``).

    ``seconds`` is the stage's wall time as :func:`~st_daft.recipe.train_daft` measures it (targets encoded, corpus
    cached, trained, evaluated); ``training_seconds`` is the part spent in the trainer.
    """

    name: str
    steps: int = 0
    best_checkpoint: str | None = None
    best_metric: float | None = None
    stopped_reason: str | None = None
    collapsed: bool = False
    final_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    training_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        """One line for the console."""
        if self.steps == 0:
            details = f"{self.extra['tokens']:.0f} tokens distilled" if "tokens" in self.extra else "done"
            if self.extra.get("contextual_tokens"):
                details += (
                    f", {self.extra['contextual_tokens']:.0f} of them from contextual vectors over "
                    f"{self.extra['contextual_documents']:.0f} documents"
                )
            return f"stage {self.name}: {details} ({self.seconds:.0f} s)"
        return (
            f"stage {self.name}: {self.steps} steps, {self.stopped_reason or 'budget reached'}; "
            f"collapsed: {self.collapsed} ({self.seconds:.0f} s, {self.training_seconds:.0f} s of them training)"
        )


@dataclass
class StageContext:
    """What the stages share: the model, the data, held-out texts, the run's settings and the corpus cache.

    ``train_data`` is None for a corpus without queries (label-free stages only); ``corpus``/``titles`` are always
    set. ``unlabeled_queries`` are real query texts without judgements, added to the corpus stage's texts.
    """

    model: SentenceTransformer
    output_dir: Path
    corpus: dict[str, str]
    kl_texts: list[str]
    train_data: RetrievalData | None = None
    validation_data: RetrievalData | None = None
    titles: dict[str, str] = field(default_factory=dict)
    unlabeled_queries: list[str] = field(default_factory=list)
    store: DocumentEmbeddingStore | None = None
    seed: int = 0
    device: str | None = None
    precision: str = "fp32"
    validation_corpus_size: int | None = 2000
    resume: bool = False
    cache: StaleEmbeddingCache | None = None
    #: storage type of the corpus cache
    cache_dtype: torch.dtype = torch.float32
    #: where the corpus cache is kept on disk, memory-mapped (one sub-folder per document route), or None: in memory
    cache_folder: Path | None = None
    #: the names of the stages this run trains, in order (set by train_daft before it resolves them)
    run_stages: tuple[str, ...] = ()

    @property
    def asymmetric(self) -> bool:
        return has_route(self.model, QUERY_ROUTE)

    def current_cache(self) -> StaleEmbeddingCache:
        """The corpus cache of the document route as it is now: the one an earlier stage built while the route was
        frozen (the corpus stage's, the align stage's), or embedded now (or read from the store)."""
        if self.cache is None or not self.cache.is_current(self.model):
            folder = None if self.cache_folder is None else self.cache_folder / encoding_fingerprint(self.model)
            self.cache = StaleEmbeddingCache.build(
                self.model, self.corpus, dtype=self.cache_dtype, folder=folder, store=self.store, reuse=True
            )
        return self.cache

    def adopt_cache(self, cache: StaleEmbeddingCache) -> None:
        """Make ``cache`` (computed elsewhere) the corpus cache, written to the cache folder first when the run keeps
        its cache on disk."""
        if self.cache_folder is not None:
            folder = self.cache_folder / cache.fingerprint
            if is_main_process():
                cache.save(folder)
            barrier()
            cache = StaleEmbeddingCache.load(folder, mmap=True)
        self.cache = cache

    @property
    def router_mapping(self) -> dict[str, str]:
        return {"query": QUERY_ROUTE, "positive": DOCUMENT_ROUTE} if self.asymmetric else {}


def training_arguments(
    output_dir: Path,
    stage: TrainedStage,
    context: StageContext,
    metric: str,
    greater_is_better: bool,
    learning_rate: float | None = None,
    **overrides: Any,
) -> SentenceTransformerTrainingArguments:
    """The one place training arguments are built. The device is transformers' choice (CUDA, MPS, else CPU) unless
    ``context.device`` names one; ``context.precision`` maps to the trainer's ``fp16``/``bf16``."""
    _require_resolved(stage, "max_steps")  # a budget left to the run (CorpusStage) reaches the trainer resolved
    strategy = "steps" if stage.eval_steps > 0 else "epoch"
    if context.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' (--device cuda) was asked for, but torch sees no CUDA device")
    if context.device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' (--device mps) was asked for, but torch sees no MPS device")
    return SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        max_steps=stage.max_steps,
        num_train_epochs=stage.epochs,
        per_device_train_batch_size=stage.batch_size,
        learning_rate=stage.learning_rate if learning_rate is None else learning_rate,
        warmup_steps=stage.warmup_ratio,  # a float below 1 is a ratio (transformers v5)
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=stage.eval_steps or None,
        save_steps=stage.eval_steps or None,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        greater_is_better=greater_is_better,
        restore_callback_states_from_checkpoint=True,
        # two forward passes per step (queries, documents) through one DDP module: the graph is static
        ddp_static_graph=True,
        logging_steps=stage.logging_steps,
        seed=context.seed,
        report_to="none",
        use_cpu=context.device == "cpu",
        fp16=context.precision == "fp16",
        bf16=context.precision == "bf16",
        **overrides,
    )


def last_complete_checkpoint(folder: str | Path, required: tuple[str, ...] = ()) -> str | None:
    """The newest ``checkpoint-N`` in ``folder`` that was written to the end, skipping with a warning those a kill left
    half-written: a checkpoint is complete when transformers' ``trainer_state.json`` (written last by the trainer)
    parses, and every file in ``required`` (written after it by callbacks' ``on_save``, e.g. the miner's state) is
    there."""
    folder = Path(folder)
    if not folder.is_dir() or get_last_checkpoint(str(folder)) is None:
        return None
    for candidate in reversed(sort_checkpoints(str(folder))):
        missing = _incomplete(Path(candidate), required)
        if missing is None:
            return candidate
        logger.warning("skipping incomplete checkpoint %s (%s: interrupted while it was written)", candidate, missing)
    return None


def _incomplete(checkpoint: Path, required: tuple[str, ...]) -> str | None:
    """Why ``checkpoint`` is incomplete, or None."""
    try:
        json.loads((checkpoint / COMPLETE_CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {COMPLETE_CHECKPOINT_MARKER}"
    absent = [name for name in required if not (checkpoint / name).exists()]
    return f"no {absent[0]}" if absent else None


@dataclass
class Stage:
    """A step of the recipe. Subclasses set ``name`` and implement :meth:`run`."""

    name: ClassVar[str] = ""
    #: Needs (query, positive) judgements; label-free stages run on a bare corpus.
    needs_labels: ClassVar[bool] = True
    #: Needs a ``Router`` model (query and document routes).
    needs_router: ClassVar[bool] = True

    def applies_to(self, model: SentenceTransformer) -> str | None:
        """None when the stage can run on ``model``, else why it is skipped."""
        return None

    def check(self, context: StageContext) -> None:
        """Raise ``ValueError`` (naming the setting) for settings that cannot work on this data, before any step."""

    def resolved(self, context: StageContext) -> Stage:
        """This stage with the settings left to the run (None or ``"auto"``: "decide from the data") filled in.

        :func:`~st_daft.recipe.train_daft` resolves every stage before :meth:`check` and :meth:`prepare`, so the
        trainer, the model card and :meth:`run` see the values the run uses; every run-dependent default is here.
        """
        return self

    def prepare(self, context: StageContext) -> SentenceTransformerTrainingArguments | None:
        """Build the stage's training arguments (None for a stage that trains nothing); called for every stage
        before the first one runs, so a bad device or precision fails before any step."""
        return None

    def run(self, context: StageContext, args: SentenceTransformerTrainingArguments | None) -> StageResult:
        raise NotImplementedError

    def checkpoint_files(self) -> tuple[str, ...]:
        """Files a complete checkpoint of this stage holds beside the trainer's (written by its callbacks)."""
        return ()

    def settings(self) -> dict[str, Any]:
        return {"stage": self.name, **asdict(self)}


@dataclass
class VocabularyStage(Stage):
    """Static query routes: start the table from the document route's vectors of each vocabulary token.

    Every token is first embedded alone by the document route (model2vec's distillation). With contextual vectors,
    the tokens the corpus contains then take the mean of their contextual output vectors over the corpus instead:
    for a mean-pooled document route that is the static table closest to the route on this corpus
    (:func:`~st_daft.vocabulary.contextual_token_statistics`). It fits the route to the corpus's senses of its
    words, which is what a corpus-only run wants and hurts a collection unlike the training one (docs/benchmarks.md,
    nDCG@10): untrained, python-faq on its own corpus 0.376 -> 0.486 and SciFact's training claims 0.264 -> 0.514;
    after the corpus stage, corpus only (3-seed means), python-faq 0.617 -> 0.616 and SciFact 0.620 -> 0.637; trained
    on SciFact's labels (seed 0), SciFact test 0.787 -> 0.804 but python-faq 0.487 -> 0.384.

    Args:
        zipf_weighting: weight token vectors by log(1 + rank) (model2vec's distillation).
        idf_weighting: then set every row's norm to its token's BM25 inverse document frequency over the corpus
            (:func:`~st_daft.vocabulary.corpus_token_weights`), keeping its direction: rare words of this corpus
            count more in a query than common ones, as in BM25.
        contextual: take contextual vectors for the corpus's tokens. Default (None): on for a corpus without
            labelled queries, off beside them. Needs a mean-pooled document route (skipped with a warning
            otherwise).
        max_documents: documents read for the contextual vectors and the corpus words (a seeded sample of a larger
            corpus): one pass of the document route over them. When they are the whole corpus, that pass also
            gives the corpus cache of the later stages (:meth:`~st_daft.cache.StaleEmbeddingCache.from_embeddings`).
        batch_size: documents per document-route batch in that pass.
        corpus_words: add up to this many of the corpus's words that the query tokenizer splits into pieces as
            whole-word rows of the table (:func:`~st_daft.vocabulary.add_words_to_static_route`), the words in most
            documents first; 0 adds none. Default (None): 20,000 for a corpus without labelled queries, 0 beside
            them. Needs a WordPiece tokenizer and a table as wide as the route (no ``Dense`` after it): the
            default is 0 on other routes, a count given is refused before any step.
        min_word_documents: a word is added only when at least this many documents contain it.
    """

    name: ClassVar[str] = "vocabulary"
    folder: ClassVar[str] = "stage-vocabulary"
    needs_labels: ClassVar[bool] = False
    zipf_weighting: bool = True
    idf_weighting: bool = False
    contextual: bool | None = None
    max_documents: int = 20000
    batch_size: int = 32
    corpus_words: int | None = None
    min_word_documents: int = 2

    def __post_init__(self) -> None:
        if (self.corpus_words is not None and self.corpus_words < 0) or self.min_word_documents < 1:
            raise ValueError(
                f"vocabulary stage: corpus_words must be >= 0 and min_word_documents >= 1, got {self.corpus_words} "
                f"and {self.min_word_documents}"
            )
        if self.max_documents < 1 or self.batch_size < 1:
            raise ValueError(
                f"vocabulary stage: max_documents and batch_size must be at least 1, got {self.max_documents} and "
                f"{self.batch_size}"
            )

    def resolved(self, context: StageContext) -> VocabularyStage:
        """Contextual vectors and corpus words as set, or else by the run: for a corpus alone, contextual vectors on
        and up to 20,000 corpus words (where the route can take them); beside labelled queries, neither."""
        alone = context.train_data is None
        contextual = alone if self.contextual is None else self.contextual
        words = self.corpus_words
        if words is None:
            words = 20000 if alone and corpus_words_unsupported(context.model) is None else 0
        return replace(self, contextual=contextual, corpus_words=words)

    def check(self, context: StageContext) -> None:
        reason = corpus_words_unsupported(context.model) if self.corpus_words else None
        if reason is not None:
            raise ValueError(f"vocabulary stage: corpus_words (--corpus-words) cannot be used: {reason}")

    def applies_to(self, model: SentenceTransformer) -> str | None:
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding

        if not has_route(model, QUERY_ROUTE) or not isinstance(get_route(model, QUERY_ROUTE)[0], StaticEmbedding):
            return "the query route does not start with a StaticEmbedding"
        return None

    def run(self, context: StageContext, args: SentenceTransformerTrainingArguments | None = None) -> StageResult:
        _require_resolved(self, "contextual")
        _require_resolved(self, "corpus_words")
        documents = self._sampled_documents(context) if self.corpus_words or self.contextual else []
        words: list[str] = []
        if self.corpus_words:
            static = get_route(context.model, QUERY_ROUTE)[0]
            words = corpus_words(static.tokenizer, documents, self.corpus_words, self.min_word_documents)
        statistics = self._contextual_statistics(context, documents, words) if self.contextual else None
        added = add_words_to_static_route(context.model, words) if words else 0
        if words:
            logger.info("vocabulary stage: %d corpus words added to the query route's vocabulary", added)
        info = initialize_static_route(
            context.model,
            zipf_weighting=self.zipf_weighting,
            store=context.store,
            contextual=statistics,
            contextual_words=words,
        )
        info["contextual"] = statistics is not None
        info["corpus_words"] = float(added)
        if self.idf_weighting:
            static = get_route(context.model, QUERY_ROUTE)[0]
            reweight_static_route(context.model, corpus_token_weights(static, context.corpus.values()))
        info["idf"] = self.idf_weighting
        if statistics is not None:
            info["contextual_documents"] = float(min(len(context.corpus), self.max_documents))
        # The statistics the trained stages end with, so every stage reports the KL it reached.
        final_metrics = CollapseEvaluator(context.kl_texts, name=KL_EVALUATOR_NAME, write_csv=False)(context.model)
        return StageResult(self.name, final_metrics=final_metrics, extra=dict(info))

    def _sampled_documents(self, context: StageContext) -> list[str]:
        """The corpus, or a seeded sample of ``max_documents`` of it (the same on every process)."""
        documents = list(context.corpus.values())
        if len(documents) > self.max_documents:
            generator = torch.Generator().manual_seed(context.seed)
            sample = torch.randperm(len(documents), generator=generator)[: self.max_documents]
            documents = [documents[i] for i in sample.tolist()]
        return documents

    def _contextual_statistics(
        self, context: StageContext, documents: list[str], words: list[str]
    ) -> TokenStatistics | None:
        reason = mean_pooled_transformer(context.model)
        if reason is not None:
            logger.warning("vocabulary stage: one-token vectors only, no contextual ones: %s", reason)
            return None
        # Kept in the document store (shared by runs) or else the run's folder (read back on --resume).
        folder = context.store.folder if context.store is not None else context.output_dir / self.folder
        # The pass over the whole corpus also makes the corpus cache the later stages need, unless the cache would
        # differ (a sample of the corpus, a document prompt) or already exists.
        whole_corpus = len(documents) == len(context.corpus)
        keep = whole_corpus and not route_prompt(context.model, DOCUMENT_ROUTE) and context.cache is None
        statistics = contextual_token_statistics(
            context.model,
            documents,
            batch_size=self.batch_size,
            cache_folder=folder,
            words=words,
            return_document_embeddings=keep,
        )
        if statistics.document_embeddings is not None:  # None: not kept, or read back (the pass did not run)
            embeddings = statistics.document_embeddings
            context.adopt_cache(
                StaleEmbeddingCache.from_embeddings(
                    context.model, context.corpus, embeddings, dtype=context.cache_dtype, store=context.store
                )
            )
        return statistics


@dataclass
class TrainedStage(Stage):
    """Budget and optimiser settings shared by the stages that train.

    Args:
        max_steps: optimiser steps; when > 0 it overrides ``epochs``; -1 runs ``epochs``.
        epochs: passes over the training rows.
        batch_size: rows per step (the in-batch negatives).
        learning_rate: learning rate of the query route.
        eval_steps: evaluate (and save a checkpoint) every this many steps; 0 = once per epoch.
        warmup_ratio: share of the steps spent warming up the learning rate.
        logging_steps: log the loss (and its parts and collapse statistics) every this many steps.
    """

    folder: ClassVar[str] = ""
    max_steps: int = -1
    epochs: float = 1.0
    batch_size: int = 64
    learning_rate: float = 1e-3
    eval_steps: int = 0
    warmup_ratio: float = 0.1
    logging_steps: int = 10

    def __post_init__(self) -> None:
        where = f"{self.name} stage"
        if self.max_steps is not None and (self.max_steps == 0 or self.max_steps < -1):
            raise ValueError(f"{where}: max_steps must be at least 1 (or -1 to run epochs), got {self.max_steps}")
        if self.max_steps == -1 and not self.epochs > 0:
            raise ValueError(f"{where}: epochs must be positive, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"{where}: batch_size must be at least 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"{where}: learning_rate must be positive, got {self.learning_rate}")
        if self.eval_steps < 0 or self.logging_steps < 1:
            raise ValueError(f"{where}: eval_steps must be >= 0 and logging_steps >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"{where}: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def stage_dir(self, context: StageContext) -> Path:
        return context.output_dir / self.folder

    def train(
        self,
        context: StageContext,
        args: SentenceTransformerTrainingArguments,
        rows: Dataset,
        loss: Any,
        evaluator: Any,
        callbacks: list[Any],
    ) -> StageResult:
        """Run ``SentenceTransformerTrainer`` (resumed from the last complete checkpoint when asked) and sum it up."""
        started = time.perf_counter()
        _fit_batch_to_rows(self.name, args, len(rows))
        trainer = SentenceTransformerTrainer(
            model=context.model,
            args=args,
            train_dataset=rows,
            loss=loss,
            evaluator=evaluator,
            callbacks=[LogStatisticsCallback(loss), *callbacks],
        )
        trainer.add_callback(NonFiniteLossCallback(loss))  # after DefaultFlowCallback: it cancels that step's save
        resume = last_complete_checkpoint(args.output_dir, self.checkpoint_files()) if context.resume else None
        logger.info("stage %s: %s%s", self.name, args.output_dir, f" (resuming from {resume})" if resume else "")
        trainer.train(resume_from_checkpoint=resume)
        training_seconds = round(time.perf_counter() - started, 1)
        # Resuming replaces stateful callbacks by restored copies: read them back from the trainer.
        collapse = _find(trainer, CollapseStopCallback)
        stopper = _find(trainer, EarlyStoppingCallback)
        state = trainer.state
        stopped_reason = collapse.stopped_reason if collapse else None
        early_stopped = stopper and stopper.early_stopping_patience_counter >= stopper.early_stopping_patience
        if stopped_reason is None and early_stopped:
            stopped_reason = (
                f"the kNN KL divergence did not improve by more than {stopper.early_stopping_threshold:g} for "
                f"{stopper.early_stopping_patience_counter} evaluations "
                f"(best {state.best_metric:.4f} at step {state.best_global_step})"
            )
            logger.info("stage %s stopped: %s", self.name, stopped_reason)
        return StageResult(
            self.name,
            steps=state.global_step,
            best_checkpoint=state.best_model_checkpoint,
            best_metric=state.best_metric,
            stopped_reason=stopped_reason,
            collapsed=bool(collapse and collapse.collapsed),
            final_metrics=_best_evaluation(state) or evaluator(context.model),
            training_seconds=training_seconds,
            log_history=state.log_history,
        )


def _fit_batch_to_rows(stage: str, args: SentenceTransformerTrainingArguments, num_rows: int) -> None:
    """Under DDP sentence-transformers drops each process's last incomplete batch (an uneven one would hang the
    gather), so fewer rows than one global batch train for zero steps without a word: shrink the per-process batch
    to what the rows fill, and say so."""
    if not args.dataloader_drop_last:
        return
    processes = max(1, args.world_size)
    if num_rows < processes:
        raise ValueError(f"{stage} stage: {num_rows} training rows cannot feed {processes} processes")
    if num_rows < args.per_device_train_batch_size * processes:
        fitted = num_rows // processes
        logger.warning(
            "stage %s: %d training rows fill no batch of %d x %d processes; the batch size is %d per process",
            stage, num_rows, args.per_device_train_batch_size, processes, fitted,
        )  # fmt: skip
        args.per_device_train_batch_size = fitted


@dataclass
class _FrozenDocumentStage(TrainedStage):
    """A stage that trains the query route against the frozen document route, early-stopped on the KL (or keeping
    its best checkpoint on validation retrieval, where :meth:`selects_by_validation` says so).

    Args:
        kl_patience: evaluations without KL improvement before the stage ends (None: run the full budget); a stage
            that keeps its best checkpoint on validation retrieval runs its budget.
        kl_min_delta: smallest decrease of the KL that counts as an improvement.
    """

    kl_patience: int | None = 3
    kl_min_delta: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_patience is not None and self.kl_patience < 1:
            raise ValueError(f"{self.name} stage: kl_patience must be None or at least 1, got {self.kl_patience}")

    def selects_by_validation(self, context: StageContext) -> bool:
        """Whether the kept checkpoint is the best on validation retrieval instead of the lowest KL."""
        return False

    def prepare(self, context: StageContext) -> SentenceTransformerTrainingArguments:
        by_validation = self.selects_by_validation(context)
        return training_arguments(
            self.stage_dir(context),
            self,
            context,
            metric=VALIDATION_METRIC if by_validation else KL_METRIC,
            greater_is_better=by_validation,
            router_mapping=self.router_mapping(context),
        )

    def router_mapping(self, context: StageContext) -> dict[str, str]:
        return context.router_mapping

    def train_frozen(
        self, context: StageContext, args: SentenceTransformerTrainingArguments, rows: Dataset, loss: Any
    ) -> StageResult:
        # A randomly initialised query route starts out "collapsed" (near-constant outputs): alignment is what
        # fixes that, so these stages record collapse but do not stop on it.
        callbacks: list[Any] = [CollapseStopCallback(KL_EVALUATOR_NAME, stop_on_collapse=False)]
        if not self.selects_by_validation(context) and self.kl_patience is not None:
            callbacks.append(EarlyStoppingCallback(self.kl_patience, early_stopping_threshold=self.kl_min_delta))
        try:
            return self.train(context, args, rows, loss, self.evaluator(context), callbacks)
        finally:
            unfreeze_route(context.model, DOCUMENT_ROUTE)

    def evaluator(self, context: StageContext) -> Any:
        """The KL and collapse statistics, after validation retrieval where the kept checkpoint is chosen by it."""
        evaluator: Any = CollapseEvaluator(context.kl_texts, name=KL_EVALUATOR_NAME)
        if self.selects_by_validation(context):
            # The budget runs out and the best checkpoint on validation retrieval is kept; the documents' side of
            # it is the frozen route's cache, so an evaluation encodes only the validation queries.
            evaluator = SequentialEvaluator([validation_evaluator(context, context.current_cache()), evaluator])
        return evaluator


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
            uses too); 0 disables it. Default (None): 1 for a corpus without labelled queries, 0 with them.
            Measured (docs/benchmarks.md): corpus only, SciFact's training claims as dev 0.581 -> 0.633 and
            python-faq 0.603 -> 0.617; with SciFact's labels (align follows) SciFact test 0.787 -> 0.799 but
            python-faq, a collection unlike the training one, 0.487 -> 0.460: the term fits the route to the
            training corpus, which is what a corpus-only run wants and what a labelled run already gets from align.
        document_scale: inverse temperature of that term (default: the in-batch term's, 20).
        pseudo_queries: more texts cut from the corpus beyond ``max_texts`` that are not encoded: each is a
            pseudo-query whose target is its source document's embedding (from the corpus cache), so they add
            query -> document pairs at no encoding cost. Only with the pseudo-query term (``document_weight > 0``).
        ranking_weight: weight of a listwise term distilling the document route's ranking of the whole corpus for
            each text (:class:`~st_daft.losses.LabelFreeAlignmentLoss`); 0 disables it. Measured
            (docs/benchmarks.md): with SciFact's labels (align follows) SciFact test 0.804 -> 0.822 and python-faq
            0.477 -> 0.481 (3 seeds); corpus only, with 1,200 steps, python-faq 0.616 -> 0.653 (5 seeds) and
            SciFact 0.637 -> 0.650 (3 seeds). The route learns to order the corpus as the document route does,
            which pays where the document route is the stronger ranker.
        lexical_weight: fuse BM25 into the ranking term's teacher: each text's ``lexical_top_k`` best documents by
            BM25 (bm25s, stemmed; the ``bm25`` extra) add ``lexical_weight`` times their BM25 score, divided by the
            text's best, to the document route's cosine (:func:`~st_daft.corpus_alignment.lexical_ranking_columns`).
            0 disables it; needs ``ranking_weight > 0``.
        lexical_top_k: documents per text in that fusion.
        corpus_sample_size: corpus documents each step's pseudo-query and ranking terms score: None for all of them
            up to 65,536 documents and 16,384 above, 0 for all of them always, else that many
            (:mod:`st_daft.losses.corpus_sample`: the batch's source documents, their teacher's best and uniform rows
            with the sampled softmax's correction). Sampled, the corpus cache is read where it is instead of copied to
            every process's device as float32.
        teacher_neighbours: when sampled, each text's best documents by the document route that every step scores
            (:func:`~st_daft.corpus_alignment.with_teacher_neighbours`, one exact search before training).
        lexical_language: BM25's stopwords and stemmer (an ISO 639-3 code, ``"eng"``).
        general_texts: how many of the general-domain English texts that ship with st-daft
            (:func:`~st_daft.general_corpus.general_texts`, WordNet definitions and examples) join the texts, as
            regression targets like unlabelled queries. Default (None): 20,000 for a static query route beside
            labelled queries, which keeps the route working on collections unlike the training one (SciFact's labels,
            5 seeds, with 900 steps: python-faq 0.486 -> 0.496, SciFact 0.824 -> 0.824); 0 for a corpus alone, whose
            own text is what the route is for, and for other query routes (not measured).
    """

    name: ClassVar[str] = "corpus"
    folder: ClassVar[str] = "stage-0-corpus"
    needs_labels: ClassVar[bool] = False
    # None: 600 beside labelled queries (the measured static recipe; 2,000 steps over 40,000 texts gave 0.799 / 0.462),
    # 900 when the general texts join them (twice the texts), 1,200 for a corpus alone, where the ranking term keeps
    # gaining (docs/benchmarks.md)
    max_steps: int | None = None
    batch_size: int = 128
    eval_steps: int = 150
    max_texts: int = 20000
    text_kinds: tuple[str, ...] = TEXT_KINDS
    regression: str = "cosine"
    contrastive_weight: float = 1.0
    document_weight: float | None = None
    document_scale: float | None = None
    pseudo_queries: int = 0
    ranking_weight: float = 10.0
    lexical_weight: float = 0.0
    lexical_top_k: int = 32
    lexical_language: str = "eng"
    general_texts: int | None = None
    corpus_sample_size: int | None = None
    teacher_neighbours: int = 16

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
            from st_daft.baselines import BM25Search

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


def _check_sample_size(stage: str, sample_size: int | None) -> None:
    if sample_size is not None and sample_size < 0:
        raise ValueError(
            f"{stage} stage: corpus_sample_size (--corpus-sample-size) must be 0 (the whole corpus) or more, got "
            f"{sample_size}"
        )


@dataclass
class AlignStage(_FrozenDocumentStage):
    """DAFT's alignment: the query route against the frozen document route's corpus cache.

    Which checkpoint is kept: DAFT early-stops alignment on the 1-NN KL between the two routes' embeddings of the
    same texts (``selection="kl"``, the paper's recipe). After the label-free stages the query route starts closer
    to the document route, by that KL, than contrastive alignment keeps it, so the KL is lowest at the first
    evaluation and the stage stopped after 50 of 300 steps, well before retrieval stopped improving. With
    validation queries (a labelled run) ``selection="auto"`` therefore runs the budget and keeps the checkpoint with
    the best validation nDCG@10, scored against the frozen route's cache (the KL is still logged).

    Args:
        scale: inverse softmax temperature of :class:`~st_daft.losses.DAFTAlignmentLoss`.
        cache_negatives: use every corpus document as a negative.
        corpus_sample_size: cached negatives each step scores: None for all of them up to 65,536 documents and
            16,384 drawn uniformly above (with the sampled softmax's correction, :mod:`st_daft.losses.corpus_sample`),
            0 for all of them always, else that many.
        selection: ``"validation"`` (best validation nDCG@10), ``"kl"`` (lowest KL, early-stopped by
            ``kl_patience``) or ``"auto"``: validation when the run has validation queries, else KL.
        interpolation: the query route kept is ``interpolation * aligned + (1 - interpolation) * start`` in every
            weight, where start is the route the stage began from (the corpus stage's): WiSE-FT (Wortsman et al.,
            CVPR 2022), whose weight-space average of a fine-tuned model and its start keeps more of the start's
            robustness on other collections than the fine-tuned model alone. 1 keeps the aligned route. Default
            (None): 0.75 for a static query route after the corpus stage when align is the last stage, else 1 (not
            measured; an untrained start, as in DAFT's own ``align, finetune``, is nothing to keep). The start is
            saved in the stage's folder, so a resumed run averages with the same start. Measured (docs/benchmarks.md,
            SciFact's labels, 10 seeds): python-faq, a collection unlike the training one, 0.498 -> 0.501 (eight
            seeds up), SciFact test 0.824 -> 0.817 (nine seeds down).
    """

    name: ClassVar[str] = "align"
    folder: ClassVar[str] = "stage-1-align"
    max_steps: int = 300
    batch_size: int = 64
    eval_steps: int = 50
    scale: float = 20.0
    cache_negatives: bool = True
    selection: str = "auto"
    interpolation: float | None = None
    corpus_sample_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_sample_size("align", self.corpus_sample_size)
        if self.selection not in ALIGN_SELECTIONS:
            raise ValueError(f"align stage: selection must be one of {ALIGN_SELECTIONS}, got {self.selection!r}")
        if self.interpolation is not None and not 0 <= self.interpolation <= 1:
            raise ValueError(
                f"align stage: interpolation (--align-interpolation) must be between 0 and 1, got {self.interpolation}"
            )

    def resolved(self, context: StageContext) -> AlignStage:
        """``selection="auto"``: validation where the run has validation queries, else the KL; ``interpolation``
        left to the run: 0.75 for a static query route after the corpus stage, the run's last stage (measured), else
        1."""
        selection = self.selection
        if selection == "auto":
            selection = "validation" if context.validation_data is not None else "kl"
        interpolation = self.interpolation
        if interpolation is None:
            # Measured where the start is the corpus stage's static route and the average is the model: an
            # untrained start (DAFT's own align, finetune) is nothing to keep, and a finetune after it is untried.
            stages = context.run_stages
            position = stages.index(self.name) if self.name in stages else len(stages)
            static = VocabularyStage().applies_to(context.model) is None
            measured = CorpusStage.name in stages[:position] and position >= len(stages) - 1
            interpolation = 0.75 if static and measured else 1.0
        return replace(self, selection=selection, interpolation=interpolation)

    def check(self, context: StageContext) -> None:
        super().check(context)
        if self.selection == "validation" and context.validation_data is None:
            raise ValueError("align stage: selection='validation' needs validation queries, and this run has none")

    def selects_by_validation(self, context: StageContext) -> bool:
        _require_resolved(self, "selection", unresolved="auto")
        return self.selection == "validation"

    def run(self, context: StageContext, args: SentenceTransformerTrainingArguments | None) -> StageResult:
        _require_resolved(self, "interpolation")
        freeze_route(context.model, DOCUMENT_ROUTE)
        start = self._interpolation_start(context) if self.interpolation < 1 else None
        loss = DAFTAlignmentLoss(
            context.model,
            scale=self.scale,
            document_cache=context.current_cache(),  # the corpus stage's, if it built one
            cache_negatives=self.cache_negatives,
            negative_sample_size=self.corpus_sample_size,
        )
        result = self.train_frozen(context, args, context.train_data.training_pairs(), loss)
        result.extra["interpolation"] = self.interpolation
        if start is not None:
            interpolate_route(context.model, QUERY_ROUTE, start, self.interpolation)
            result.final_metrics = self.evaluator(context)(context.model)  # the kept route's, not the checkpoint's
            logger.info(
                "align stage: kept %g x the aligned query route + %g x its start (WiSE-FT)",
                self.interpolation, 1 - self.interpolation,
            )  # fmt: skip
        return result

    def _interpolation_start(self, context: StageContext) -> list[dict[str, torch.Tensor]]:
        """The query route as the stage found it, kept in the stage's folder: a resumed corpus stage that had
        stopped early trains on to its next evaluation, so the route found on --resume may not be the same."""
        path = self.stage_dir(context) / INTERPOLATION_START_FILE
        if context.resume and path.exists():
            return torch.load(path, map_location="cpu", weights_only=True)
        start = route_weights(context.model, QUERY_ROUTE)
        if is_main_process():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save([{name: tensor.cpu() for name, tensor in weights.items()} for weights in start], path)
        return start


@dataclass
class FinetuneStage(TrainedStage):
    """Joint fine-tuning of both routes with the collapse-safe contrastive loss.

    Args:
        learning_rate: learning rate of the query route (of the whole model when it has no Router).
        document_learning_rate: learning rate of the document route.
        scale: inverse softmax temperature.
        guard: collapse guard (``"variance"``, ``"uniformity"``, ``"none"``).
        guard_weight: its weight.
        negatives: ``"in-batch"``, or mined during training from the document cache: ``"stale"``, ``"corrected"``
            (corrector network), ``"refresh:N"`` or ``"corrected+refresh:N"`` (see :mod:`st_daft.mining`).
        num_negatives: mined negatives per query.
        mining_index: how the mined negatives are searched for: ``"auto"`` (exact scores up to 100,000 documents,
            else a flat faiss index), ``"exact"``, a faiss index over the (corrected) cache, rebuilt every 50 steps
            while correcting (``"flat"``, ``"ivf"``, ``"hnsw"``), or a stale index searched with corrected queries
            and never rebuilt (``"query-side"``, with a linear corrector; ``"two-step"``, re-ranked by the corrector):
            see :class:`~st_daft.mining.NegativeMiner`. For millions of documents, ``"ivf"`` or ``"two-step"``.
        mining_index_options: options of :func:`~st_daft.index.build_faiss_index` (``nlist``, ``nprobe``,
            ``hnsw_m``, ``ef_search``, ``ef_construction``, ``storage``: default the cache's type), ``base`` (the
            stale index of the query-side modes) and ``shortlist`` (the rows ``"two-step"`` re-ranks).
        stop_on_collapse: end the stage when a route collapses.
    """

    name: ClassVar[str] = "finetune"
    folder: ClassVar[str] = "stage-2-finetune"
    needs_router: ClassVar[bool] = False
    epochs: float = 2.0
    batch_size: int = 32
    learning_rate: float = 1e-4
    document_learning_rate: float = 2e-5
    scale: float = 20.0
    guard: str = "variance"
    guard_weight: float = 1.0
    negatives: str = "in-batch"
    num_negatives: int = 4
    mining_index: str = "auto"
    mining_index_options: dict[str, Any] = field(default_factory=dict)
    stop_on_collapse: bool = True

    def __post_init__(self) -> None:
        from st_daft.mining import INDEX_MODES, parse_negatives

        super().__post_init__()
        if self.mining_index not in ("auto", *INDEX_MODES):
            choices = ", ".join(("auto", *INDEX_MODES))
            raise ValueError(f"unknown mining_index (--mining-index) {self.mining_index!r}: choose {choices}")
        for option, value in self.mining_index_options.items():
            check_mining_index_option(option, value)
        if not self.document_learning_rate > 0:
            rate = self.document_learning_rate
            raise ValueError(f"finetune stage: document_learning_rate must be positive, got {rate}")
        if not parse_negatives(self.negatives).mine and (self.mining_index != "auto" or self.mining_index_options):
            raise ValueError(
                f"mining_index (--mining-index) and its options apply to mined negatives, not to --negatives "
                f"{self.negatives}: choose stale, corrected, refresh:N or corrected+refresh:N"
            )
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives (--num-negatives) must be at least 1, got {self.num_negatives}")

    def checkpoint_files(self) -> tuple[str, ...]:
        return ("negative_mining/miner_state.json",) if self.mines() else ()

    def mines(self) -> bool:
        from st_daft.mining import parse_negatives

        return parse_negatives(self.negatives).mine

    def check(self, context: StageContext) -> None:
        if self.mines() and self.num_negatives > len(context.corpus) - 1:
            raise ValueError(
                f"num_negatives (--num-negatives) is {self.num_negatives}, but the corpus has only "
                f"{len(context.corpus)} documents: at most {len(context.corpus) - 1} negatives per query"
            )

    def prepare(self, context: StageContext) -> SentenceTransformerTrainingArguments:
        overrides: dict[str, Any] = {}
        learning_rate = self.learning_rate
        if context.asymmetric:
            overrides["router_mapping"] = context.router_mapping
            overrides["learning_rate_mapping"] = {route_parameter_pattern(QUERY_ROUTE): self.learning_rate}
            # The trainer's base learning rate applies to everything not in learning_rate_mapping: the documents.
            learning_rate = self.document_learning_rate
        if context.validation_data is not None:
            metric, greater = VALIDATION_METRIC, True
        else:
            metric, greater = KL_METRIC, False
        return training_arguments(
            self.stage_dir(context), self, context, metric, greater, learning_rate=learning_rate, **overrides
        )

    def run(self, context: StageContext, args: SentenceTransformerTrainingArguments | None) -> StageResult:
        loss = CollapseSafeContrastiveLoss(
            context.model,
            scale=self.scale,
            guard=self.guard,
            guard_weight=self.guard_weight,
            gather_across_devices=is_distributed(),  # in-batch negatives from every process, as on one process
        )
        callbacks: list[Any] = []
        if self.mines():
            loss, callbacks = self._mining(context, loss)
        evaluators: list[Any] = []
        if context.validation_data is not None:
            evaluators.append(validation_evaluator(context))  # the documents train: re-encoded at each evaluation
        evaluators.append(CollapseEvaluator(context.kl_texts, name=KL_EVALUATOR_NAME))
        callbacks.append(CollapseStopCallback(KL_EVALUATOR_NAME, stop_on_collapse=self.stop_on_collapse))
        rows = context.train_data.training_pairs()
        return self.train(context, args, rows, loss, SequentialEvaluator(evaluators), callbacks)

    def _mining(self, context: StageContext, loss: Any) -> tuple[Any, list[Any]]:
        """``loss`` wrapped by :class:`~st_daft.losses.MinedNegativesLoss` (negatives mined during training from the
        document cache, corrected or refreshed by the strategy) and the callbacks that drive the mining."""

        # The alignment stage's cache is exact for the document route fine-tuning starts from: reuse it.
        context.current_cache()
        data = context.train_data
        # The corrector's hidden layers start from the run's seed, not from whatever the random state is after the
        # earlier stages (a resumed run skips their steps): same seed, same corrector, resumed or not.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            return self._build_mining(context, loss, data)

    def _build_mining(self, context: StageContext, loss: Any, data: RetrievalData) -> tuple[Any, list[Any]]:
        from st_daft.corrector import CorrectorNetwork
        from st_daft.losses import build_negative_mining

        options = dict(self.mining_index_options)
        shortlist = options.pop("shortlist", 256)
        linear = self.mining_index == "query-side"  # searching with corrected queries needs a linear corrector
        return build_negative_mining(
            context.model,
            loss,
            context.cache,
            context.corpus,
            self.negatives,
            corrector=CorrectorNetwork(context.cache.dimension, depth=1) if linear else None,
            index=None if self.mining_index == "auto" else self.mining_index,
            index_options=options,
            shortlist=shortlist,
            num_negatives=self.num_negatives,
            query_positives={
                data.queries[qid]: [did for did, score in judged.items() if score > 0]
                for qid, judged in data.qrels.items()
            },
        )


#: What ``FinetuneStage.mining_index_options`` may set: the counts, then the choices.
MINING_INDEX_OPTIONS: dict[str, tuple[str, ...] | None] = {
    **dict.fromkeys(("nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction", "shortlist")),
    "storage": ("float32", "float16"),
    "base": INDEX_KINDS,
}


def check_mining_index_option(option: str, value: Any) -> None:
    """Refuse an index option the miner would fail on mid-training, naming it."""
    where = f"mining_index_options (--mining-index-option) {option}={value!r}"
    if option not in MINING_INDEX_OPTIONS:
        raise ValueError(f"unknown {where}: choose from {list(MINING_INDEX_OPTIONS)}")
    choices = MINING_INDEX_OPTIONS[option]
    if choices is None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{where}: must be a positive integer")
    if choices is not None and value not in choices:
        raise ValueError(f"{where}: choose from {list(choices)}")


STAGE_TYPES: dict[str, type[Stage]] = {
    stage.name: stage for stage in (VocabularyStage, CorpusStage, AlignStage, FinetuneStage)
}


def _require_resolved(stage: Stage, setting: str, unresolved: Any = None) -> None:
    if getattr(stage, setting) == unresolved:
        raise RuntimeError(
            f"{stage.name} stage: {setting} is left to the run; call resolved(context) before prepare/run "
            "(train_daft does)"
        )


def validation_evaluator(
    context: StageContext, cache: StaleEmbeddingCache | None = None
) -> InformationRetrievalEvaluator:
    """nDCG@10 (and the rest) of the held-out validation queries over a sample of the corpus: the queries, their
    judged documents and random others up to ``context.validation_corpus_size``. With ``cache`` (a frozen document
    route's embeddings) the documents are read from it instead of being encoded at every evaluation."""
    validation = context.validation_data
    if validation is None:
        raise ValueError("validation retrieval needs validation queries (labelled training data)")
    if context.validation_corpus_size is not None and context.validation_corpus_size < len(validation.corpus):
        judged = {did for docs in validation.qrels.values() for did in docs}
        validation = validation.sample(
            len(validation.qrels), max(0, context.validation_corpus_size - len(judged)), seed=context.seed
        )
    settings: dict[str, Any] = {"name": IR_EVALUATOR_NAME, "batch_size": 64, "write_csv": False}
    if cache is not None and all(doc_id in cache.row_of_id for doc_id in validation.corpus):
        corpus_ids = list(validation.corpus)
        rows = torch.tensor([cache.row_of_id[doc_id] for doc_id in corpus_ids])
        return CachedCorpusRetrievalEvaluator(
            validation.queries, validation.relevant_docs, corpus_ids, cache.float32(rows), **settings
        )
    return InformationRetrievalEvaluator(
        validation.queries, validation.corpus, validation.relevant_docs, show_progress_bar=True, **settings
    )


def _find(trainer: SentenceTransformerTrainer, kind: type) -> Any:
    return next((callback for callback in trainer.callback_handler.callbacks if isinstance(callback, kind)), None)


def _best_evaluation(state: Any) -> dict[str, float]:
    """The logged evaluation of the checkpoint the trainer kept (saves evaluating the kept model once more)."""
    if not state.best_model_checkpoint:
        return {}
    best_step = int(Path(state.best_model_checkpoint).name.split("-")[-1])
    for row in reversed(state.log_history):
        if row.get("step") == best_step and any(key.startswith("eval_") for key in row):
            return {key[len("eval_") :]: value for key, value in row.items() if key.startswith("eval_")}
    return {}
