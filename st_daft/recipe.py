"""The DAFT recipe: alignment (document route frozen) then joint fine-tuning, each with SentenceTransformerTrainer.

:func:`train_daft` runs the stages named in ``config.stages`` on one model, in this order:

- ``"vocabulary"`` (static query routes only): every token of the query tokenizer is embedded by the document
  route and the static table starts from those vectors (:mod:`st_daft.vocabulary`), so that tokens no training
  query contains start inside the document space.
- ``"corpus"``: label-free alignment: the document route is frozen and the query route learns to reproduce its
  embeddings of titles, sentences, spans and passage openings cut from the corpus
  (:class:`~st_daft.losses.LabelFreeAlignmentLoss`), early-stopped on the 1-NN KL criterion.

1. ``"align"``: the document route is frozen; a :class:`~st_daft.cache.StaleEmbeddingCache` of the corpus is built
   once (exact, because the route does not move) and :class:`~st_daft.losses.DAFTAlignmentLoss` trains the query
   route against it with every corpus document as a negative. A
   :class:`~st_daft.collapse.CollapseEvaluator` measures the 1-NN KL between the routes' embeddings of held-out texts
   and :class:`~st_daft.collapse.CollapseMonitorCallback` ends the stage when it stops improving; the checkpoint
   with the lowest KL is kept.
2. ``"finetune"``: both routes train with :class:`~st_daft.losses.CollapseSafeContrastiveLoss`, the query route and
   the document route each with its own learning rate (``learning_rate_mapping``); the checkpoint with the best
   validation nDCG@10 is kept, and training stops with a clear message if a route collapses.

``stages=("finetune",)`` alone is the plain (non-DAFT) baseline.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator, SequentialEvaluator

from st_daft.cache import StaleEmbeddingCache
from st_daft.collapse import CollapseEvaluator, CollapseMonitorCallback
from st_daft.corpus_alignment import alignment_dataset, alignment_texts
from st_daft.data import RetrievalData
from st_daft.losses import CollapseSafeContrastiveLoss, DAFTAlignmentLoss, LabelFreeAlignmentLoss
from st_daft.losses.mined_negatives import build_negative_mining
from st_daft.mining import parse_negatives
from st_daft.model import (
    DOCUMENT_ROUTE,
    QUERY_ROUTE,
    freeze_route,
    get_route,
    get_router,
    route_parameter_pattern,
    unfreeze_route,
)
from st_daft.store import DocumentEmbeddingStore
from st_daft.vocabulary import initialize_static_route

logger = logging.getLogger(__name__)

__all__ = ["StageConfig", "DAFTConfig", "train_daft", "split_validation", "validation_texts", "STAGES"]

STAGES = ("vocabulary", "corpus", "align", "finetune")
KL_EVALUATOR_NAME = "alignment"
IR_EVALUATOR_NAME = "validation"


@dataclass
class StageConfig:
    """Budget and optimiser settings of one stage.

    Args:
        max_steps: optimiser steps; when > 0 it overrides ``epochs``.
        epochs: passes over the training pairs.
        batch_size: pairs per step (the in-batch negatives).
        learning_rate: learning rate of the query route.
        document_learning_rate: learning rate of the document route (fine-tuning only).
        eval_steps: evaluate (and save a checkpoint) every this many steps; 0 = once per epoch.
        warmup_ratio: share of the steps spent warming up the learning rate.
        logging_steps: log the loss (and its parts and collapse statistics) every this many steps.
    """

    max_steps: int = -1
    epochs: float = 1.0
    batch_size: int = 64
    learning_rate: float = 1e-3
    document_learning_rate: float = 2e-5
    eval_steps: int = 0
    warmup_ratio: float = 0.1
    logging_steps: int = 10


@dataclass
class DAFTConfig:
    """Settings of :func:`train_daft`.

    Args:
        stages: ``("align", "finetune")`` for DAFT, ``("finetune",)`` for the plain baseline; prepend
            ``"vocabulary"`` and/or ``"corpus"`` for the label-free stages.
        corpus: budget of the label-free corpus alignment stage.
        corpus_max_texts: texts cut from the corpus for it.
        corpus_text_kinds: which texts (titles, sentences, spans, passages).
        corpus_regression: ``"cosine"`` or ``"mse"`` regression onto the document-route embeddings.
        corpus_contrastive_weight: weight of its in-batch InfoNCE term.
        zipf_weighting: weight distilled token vectors by log(1 + rank) in the vocabulary stage.
        align: budget of the alignment stage.
        finetune: budget of the joint fine-tuning stage.
        scale: inverse softmax temperature of both losses.
        cache_negatives: in alignment, use every corpus document as a negative.
        negatives: negatives of the fine-tuning stage: ``"in-batch"``, or mined during training from the document
            cache: ``"stale"``, ``"corrected"`` (corrector network), ``"refresh:N"`` (re-embed the corpus every N
            steps) or ``"corrected+refresh:N"`` (see :mod:`st_daft.mining`).
        num_negatives: mined negatives per query.
        guard: collapse guard of the fine-tuning loss (``"variance"``, ``"uniformity"``, ``"none"``).
        guard_weight: its weight.
        kl_patience: evaluations without KL improvement before alignment ends (None: run the full budget).
        stop_on_collapse: end a stage when a route collapses.
        validation_fraction: share of training queries held out for validation when the data has no dev split.
        num_validation_texts: held-out texts for the KL criterion.
        validation_corpus_size: documents the validation retrieval runs over (the validation queries' relevant
            documents plus random others); None for the whole corpus. Each evaluation re-encodes them.
        document_store: folder of a :class:`~st_daft.store.DocumentEmbeddingStore`. What the frozen document route
            embeds (vocabulary, label-free targets, the corpus cache) is kept there, keyed by the route's parameters,
            and later runs with the same document encoder read it back instead of encoding it again.
        seed: random seed.
    """

    stages: tuple[str, ...] = ("align", "finetune")
    corpus: StageConfig = field(
        default_factory=lambda: StageConfig(max_steps=1000, batch_size=128, learning_rate=1e-3, eval_steps=250)
    )
    corpus_max_texts: int = 40000
    corpus_text_kinds: tuple[str, ...] = ("titles", "sentences", "spans", "passages")
    corpus_regression: str = "cosine"
    corpus_contrastive_weight: float = 1.0
    zipf_weighting: bool = True
    align: StageConfig = field(default_factory=lambda: StageConfig(max_steps=300, batch_size=64, eval_steps=50))
    finetune: StageConfig = field(
        default_factory=lambda: StageConfig(epochs=2, batch_size=32, learning_rate=1e-4, document_learning_rate=2e-5)
    )
    scale: float = 20.0
    cache_negatives: bool = True
    negatives: str = "in-batch"
    num_negatives: int = 4
    guard: str = "variance"
    guard_weight: float = 1.0
    kl_patience: int | None = 3
    stop_on_collapse: bool = True
    validation_fraction: float = 0.1
    num_validation_texts: int = 500
    validation_corpus_size: int | None = 2000
    document_store: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [stage for stage in self.stages if stage not in STAGES]
        if unknown or not self.stages:
            raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
        if list(self.stages) != sorted(self.stages, key=STAGES.index):
            raise ValueError(f"stages run in the order {list(STAGES)}, got {list(self.stages)}")
        parse_negatives(self.negatives)  # a malformed strategy fails here, before any training
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {self.num_negatives}")


def split_validation(data: RetrievalData, fraction: float, seed: int = 0) -> tuple[RetrievalData, RetrievalData | None]:
    """Hold out ``fraction`` of the queries (at least one) as a validation collection over the same corpus."""
    if fraction <= 0:
        return data, None
    query_ids = sorted(data.qrels)
    random.Random(seed).shuffle(query_ids)
    held_out = set(query_ids[: max(1, int(len(query_ids) * fraction))])
    if len(held_out) == len(query_ids):
        raise ValueError(f"cannot hold out {fraction:.0%} of only {len(query_ids)} queries and still train")

    def subset(ids: set[str], split: str) -> RetrievalData:
        return RetrievalData(
            corpus=data.corpus,
            queries={qid: data.queries[qid] for qid in ids},
            qrels={qid: data.qrels[qid] for qid in ids},
            name=data.name,
            split=split,
            titles=data.titles,
        )

    return subset(set(query_ids) - held_out, data.split), subset(held_out, "validation")


def validation_texts(data: RetrievalData, count: int, seed: int = 0) -> list[str]:
    """Texts for the KL criterion: the held-out queries plus leading sentences of random corpus documents."""
    rng = random.Random(seed)
    texts = list(data.queries.values())
    documents = rng.sample(sorted(data.corpus), min(len(data.corpus), max(0, count - len(texts))))
    for doc_id in documents:
        first_sentence = re.split(r"(?<=[.!?])\s", data.corpus[doc_id], maxsplit=1)[0]
        texts.append(" ".join(first_sentence.split()[:48]))
    return texts[:count]


def _is_asymmetric(model: SentenceTransformer) -> bool:
    try:
        get_router(model)
    except ValueError:
        return False
    return True


def _best_evaluation(state: Any) -> dict[str, float]:
    """The logged evaluation of the checkpoint the trainer kept (saves evaluating the kept model once more)."""
    if not state.best_model_checkpoint:
        return {}
    best_step = int(Path(state.best_model_checkpoint).name.split("-")[-1])
    for row in reversed(state.log_history):
        if row.get("step") == best_step and any(key.startswith("eval_") for key in row):
            return {key[len("eval_") :]: value for key, value in row.items() if key.startswith("eval_")}
    return {}


def _validation_corpus(data: RetrievalData, size: int | None, seed: int) -> dict[str, str]:
    if size is None or size >= len(data.corpus):
        return data.corpus
    keep = {doc_id for judged in data.relevant_docs.values() for doc_id in judged}
    others = sorted(set(data.corpus) - keep)
    keep.update(random.Random(seed).sample(others, max(0, min(len(others), size - len(keep)))))
    return {doc_id: text for doc_id, text in data.corpus.items() if doc_id in keep}


def _has_static_query_route(model: SentenceTransformer) -> bool:
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    return isinstance(get_route(model, QUERY_ROUTE)[0], StaticEmbedding)


def _training_arguments(
    output_dir: Path, stage: StageConfig, config: DAFTConfig, metric: str, greater_is_better: bool, **overrides: Any
) -> SentenceTransformerTrainingArguments:
    strategy = "steps" if stage.eval_steps > 0 else "epoch"
    return SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        max_steps=stage.max_steps,
        num_train_epochs=stage.epochs,
        per_device_train_batch_size=stage.batch_size,
        learning_rate=stage.learning_rate,
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
        logging_steps=stage.logging_steps,
        seed=config.seed,
        report_to="none",
        use_cpu=True,
        **overrides,
    )


def _run_stage(
    name: str,
    model: SentenceTransformer,
    args: SentenceTransformerTrainingArguments,
    train_pairs: Dataset,
    loss: Any,
    evaluator: Any,
    monitor: CollapseMonitorCallback,
    resume_from_checkpoint: str | bool | None,
    extra_callbacks: list[Any] = (),
) -> dict[str, Any]:
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train_pairs, loss=loss, evaluator=evaluator, callbacks=[monitor]
    )
    # The monitor merges the loss's collapse statistics into the logs: it must see them before they are printed.
    trainer.callback_handler.callbacks.remove(monitor)
    trainer.callback_handler.callbacks.insert(0, monitor)
    for position, callback in enumerate(extra_callbacks, start=1):  # also before the printer
        trainer.callback_handler.callbacks.insert(position, callback)
    logger.info("stage %s: %s", name, args.output_dir)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    final_metrics = _best_evaluation(trainer.state) or evaluator(model)
    summary = {
        "stage": name,
        "global_step": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_metric": trainer.state.best_metric,
        "stopped_reason": monitor.stopped_reason,
        "collapsed": monitor.collapsed,
        "final_metrics": final_metrics,
        "log_history": trainer.state.log_history,
    }
    return summary


def train_daft(
    model: SentenceTransformer,
    train_data: RetrievalData,
    output_dir: str | Path,
    config: DAFTConfig | None = None,
    validation_data: RetrievalData | None = None,
    resume_from_checkpoint: bool = False,
) -> dict[str, Any]:
    """Train ``model`` with the stages of ``config`` and save the result to ``output_dir``.

    Args:
        model: an asymmetric model (:func:`~st_daft.build_asymmetric_model`); a symmetric one is allowed for the
            ``finetune`` stage alone (the symmetric baseline).
        train_data: training collection (its qrels give the (query, positive) pairs; its corpus the negatives).
        output_dir: where each stage keeps its checkpoints (``stage-1-align``, ``stage-2-finetune``) and where the
            final model is saved (loadable with ``SentenceTransformer(output_dir)``).
        config: the recipe's settings.
        validation_data: held-out queries over the same corpus; by default ``config.validation_fraction`` of the
            training queries.
        resume_from_checkpoint: resume each stage from its last checkpoint when one exists.

    Returns:
        A summary (per stage: steps, best checkpoint, stop reason, final validation metrics, log history), also
        written to ``output_dir/daft_summary.json``.
    """
    config = config or DAFTConfig()
    output_dir = Path(output_dir)
    asymmetric = _is_asymmetric(model)
    needs_router = [stage for stage in config.stages if stage != "finetune"]
    if not asymmetric and needs_router:
        raise ValueError(
            f"stage(s) {needs_router} need an asymmetric (Router) model; build one with build_asymmetric_model"
        )
    if validation_data is None:
        train_data, validation_data = split_validation(train_data, config.validation_fraction, config.seed)
    train_pairs = train_data.training_pairs()
    kl_texts = validation_texts(validation_data or train_data, config.num_validation_texts, config.seed)
    router_mapping = {"query": QUERY_ROUTE, "positive": DOCUMENT_ROUTE} if asymmetric else {}
    summary: dict[str, Any] = {"config": asdict(config), "num_train_pairs": len(train_pairs), "stages": []}
    output_dir.mkdir(parents=True, exist_ok=True)
    cache: StaleEmbeddingCache | None = None
    store = DocumentEmbeddingStore(config.document_store) if config.document_store else None

    def run_frozen_stage(
        name: str, stage_dir: Path, stage: StageConfig, pairs: Dataset, loss: Any, mapping: dict[str, str]
    ) -> dict[str, Any]:
        """A stage that trains the query route against the frozen document route, early-stopped on the KL."""
        evaluator = CollapseEvaluator(kl_texts, name=KL_EVALUATOR_NAME)
        # A randomly initialised query route starts out "collapsed" (near-constant outputs): alignment is what
        # fixes that, so these stages record collapse but do not stop on it.
        monitor = CollapseMonitorCallback(
            evaluator_name=KL_EVALUATOR_NAME, kl_patience=config.kl_patience, stop_on_collapse=False
        )
        args = _training_arguments(
            stage_dir,
            stage,
            config,
            metric=f"eval_{KL_EVALUATOR_NAME}_knn_kl",
            greater_is_better=False,
            router_mapping=mapping,
        )
        stage_summary = _run_stage(
            name, model, args, pairs, loss, evaluator, monitor, _resume(stage_dir, resume_from_checkpoint)
        )
        unfreeze_route(model, DOCUMENT_ROUTE)
        return stage_summary

    if "vocabulary" in config.stages:
        if _has_static_query_route(model):
            started = time.perf_counter()
            info = initialize_static_route(model, zipf_weighting=config.zipf_weighting, store=store)
            seconds = round(time.perf_counter() - started, 1)
            # The same statistics the trained stages end with, so every stage reports the KL it reached.
            final_metrics = CollapseEvaluator(kl_texts, name=KL_EVALUATOR_NAME, write_csv=False)(model)
            summary["stages"].append(
                {"stage": "vocabulary", **info, "seconds": seconds, "final_metrics": final_metrics}
            )
        else:
            logger.warning("vocabulary stage skipped: the query route does not start with a StaticEmbedding")

    if "corpus" in config.stages:
        stage_dir = output_dir / "stage-0-corpus"
        freeze_route(model, DOCUMENT_ROUTE)
        texts = alignment_texts(
            train_data.corpus,
            train_data.titles,
            kinds=config.corpus_text_kinds,
            max_texts=config.corpus_max_texts,
            seed=config.seed,
        )
        corpus_pairs = alignment_dataset(model, texts, store=store)
        loss = LabelFreeAlignmentLoss(
            model, regression=config.corpus_regression, contrastive_weight=config.corpus_contrastive_weight
        )
        stage_summary = run_frozen_stage("corpus", stage_dir, config.corpus, corpus_pairs, loss, {"text": QUERY_ROUTE})
        stage_summary["num_texts"] = len(texts)
        summary["stages"].append(stage_summary)

    if "align" in config.stages:
        stage_dir = output_dir / "stage-1-align"
        freeze_route(model, DOCUMENT_ROUTE)
        cache = StaleEmbeddingCache.build(model, train_data.corpus, store=store)
        loss = DAFTAlignmentLoss(
            model, scale=config.scale, document_cache=cache, cache_negatives=config.cache_negatives
        )
        stage_summary = run_frozen_stage("align", stage_dir, config.align, train_pairs, loss, router_mapping)
        summary["stages"].append(stage_summary)

    if "finetune" in config.stages:
        stage_dir = output_dir / "stage-2-finetune"
        loss = CollapseSafeContrastiveLoss(
            model, scale=config.scale, guard=config.guard, guard_weight=config.guard_weight
        )
        mining_callbacks: list[Any] = []
        if parse_negatives(config.negatives).mine:
            # The alignment stage's cache is exact for the document route fine-tuning starts from: reuse it.
            if cache is None or not cache.is_current(model):
                cache = StaleEmbeddingCache.build(model, train_data.corpus, store=store)
            loss, mining_callbacks = build_negative_mining(
                model,
                loss,
                cache,
                train_data.corpus,
                config.negatives,
                num_negatives=config.num_negatives,
                query_positives={
                    train_data.queries[qid]: [did for did, score in judged.items() if score > 0]
                    for qid, judged in train_data.qrels.items()
                },
            )
        evaluators: list[Any] = []
        if validation_data is not None:
            evaluators.append(
                InformationRetrievalEvaluator(
                    validation_data.queries,
                    _validation_corpus(validation_data, config.validation_corpus_size, config.seed),
                    validation_data.relevant_docs,
                    name=IR_EVALUATOR_NAME,
                    batch_size=64,
                    write_csv=False,
                    show_progress_bar=True,
                )
            )
        evaluators.append(CollapseEvaluator(kl_texts, name=KL_EVALUATOR_NAME))
        evaluator = SequentialEvaluator(evaluators)
        monitor = CollapseMonitorCallback(
            evaluator_name=KL_EVALUATOR_NAME, kl_patience=None, stop_on_collapse=config.stop_on_collapse, loss=loss
        )
        overrides: dict[str, Any] = {}
        if asymmetric:
            overrides["router_mapping"] = router_mapping
            overrides["learning_rate_mapping"] = {route_parameter_pattern(QUERY_ROUTE): config.finetune.learning_rate}
        stage = config.finetune
        if asymmetric:
            # The trainer's base learning rate applies to everything not in learning_rate_mapping: the documents.
            stage = StageConfig(**{**asdict(stage), "learning_rate": stage.document_learning_rate})
        if validation_data is not None:
            metric, greater = f"eval_{IR_EVALUATOR_NAME}_cosine_ndcg@10", True
        else:
            metric, greater = f"eval_{KL_EVALUATOR_NAME}_knn_kl", False
        args = _training_arguments(stage_dir, stage, config, metric=metric, greater_is_better=greater, **overrides)
        stage_summary = _run_stage(
            "finetune",
            model,
            args,
            train_pairs,
            loss,
            evaluator,
            monitor,
            _resume(stage_dir, resume_from_checkpoint),
            mining_callbacks,
        )
        summary["stages"].append(stage_summary)

    model.save(str(output_dir))
    with (output_dir / "daft_summary.json").open("w") as handle:
        json.dump(summary, handle, indent=2, default=str)
    for stage_summary in summary["stages"]:
        if "global_step" not in stage_summary:  # the vocabulary stage trains nothing
            logger.info("stage %s: %s", stage_summary["stage"], stage_summary)
            continue
        logger.info(
            "stage %s: %d steps, stopped: %s, final: %s",
            stage_summary["stage"],
            stage_summary["global_step"],
            stage_summary["stopped_reason"] or "budget reached",
            {k: round(v, 4) for k, v in stage_summary["final_metrics"].items() if isinstance(v, float)},
        )
    return summary


def _resume(stage_dir: Path, resume: bool) -> str | None:
    if not resume or not stage_dir.is_dir():
        return None
    checkpoints = sorted(stage_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


def remove_checkpoints(output_dir: str | Path) -> None:
    """Delete the per-stage checkpoint folders of a finished run (the final model stays)."""
    for stage_dir in Path(output_dir).glob("stage-*"):
        shutil.rmtree(stage_dir, ignore_errors=True)
