"""What every stage shares: :class:`Stage` (its settings, resolved against the run) and :class:`TrainedStage`
(one ``SentenceTransformerTrainer`` run, checkpointed and resumable), the :class:`StageContext` they run on and the
:class:`StageResult` each returns, the training arguments they build and the validation evaluator they select on.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from transformers import EarlyStoppingCallback
from transformers.trainer_utils import get_last_checkpoint, sort_checkpoints

from st_daft.callbacks.collapse import CollapseStopCallback
from st_daft.callbacks.non_finite import NonFiniteLossCallback
from st_daft.callbacks.statistics import LogStatisticsCallback
from st_daft.data import RetrievalData
from st_daft.embeddings.cache import StaleEmbeddingCache
from st_daft.embeddings.store import DocumentEmbeddingStore
from st_daft.evaluation.retrieval_evaluator import CachedCorpusRetrievalEvaluator
from st_daft.models.asymmetric import (
    DOCUMENT_ROUTE,
    QUERY_ROUTE,
    has_route,
)
from st_daft.models.fingerprint import encoding_fingerprint
from st_daft.utils.distributed import barrier, is_main_process
from st_daft.utils.io import check_safetensors

logger = logging.getLogger(__name__)


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

    ``seconds`` is the stage's wall time as :func:`~st_daft.training.recipe.train_daft` measures it (targets encoded,
    corpus
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


def check_device(device: str | None, precision: str = "fp32") -> str:
    """The device a run trains on (``device``, or transformers' pick for None: CUDA, MPS, else the CPU), refusing
    one torch does not see and a precision it cannot train in (float16 mixed precision on the CPU), naming the
    option. Cheap: called before any model is loaded.

    Raises:
        ValueError: the device is not there, or the precision does not run on it.
    """
    for name, available in (("cuda", torch.cuda.is_available), ("mps", torch.backends.mps.is_available)):
        if device == name and not available():
            raise ValueError(f"--device {name}: torch sees no {name.upper()} device on this machine; use --device cpu")
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    resolved = device or ("cuda" if cuda else "mps" if mps else "cpu")
    if precision == "fp16" and resolved == "cpu":
        raise ValueError(
            "--precision fp16: float16 mixed precision trains on a GPU, and this run trains on the CPU; use "
            "--precision bf16 or fp32"
        )
    if precision == "bf16" and resolved == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16: this CUDA device has no bfloat16; use --precision fp16 or fp32")
    return resolved


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
    check_device(context.device, context.precision)
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


def check_checkpoint(checkpoint: str | Path) -> None:
    """Refuse a complete checkpoint whose weights cannot be read (a truncated ``model.safetensors``: a disk that
    filled, a copy cut short), naming the file: resuming from it would fail inside the trainer without a name."""
    checkpoint = Path(checkpoint)
    for weights in sorted(checkpoint.rglob("*.safetensors")):
        try:
            check_safetensors(weights)
        except ValueError as error:
            raise ValueError(
                f"--resume: {error}; delete {checkpoint} to resume from the checkpoint before it, or train again "
                "with --overwrite instead of --resume"
            ) from None


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

        :func:`~st_daft.training.recipe.train_daft` resolves every stage before :meth:`check` and :meth:`prepare`, so
        the
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
        if resume:
            check_checkpoint(resume)
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
