"""The fine-tune stage (DAFT stage 2): both routes train with
:class:`~st_daft.losses.CollapseSafeContrastiveLoss`, each with its own learning rate, optionally with hard negatives
mined from a (corrected) corpus cache (Monath et al. 2024); the checkpoint with the best validation nDCG@10 is kept,
and training stops with the reason if a route collapses.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from sentence_transformers import SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.evaluation import SequentialEvaluator

from st_daft.callbacks.collapse import CollapseStopCallback
from st_daft.callbacks.negative_mining import build_negative_mining
from st_daft.data import RetrievalData
from st_daft.embeddings.index import INDEX_KINDS
from st_daft.evaluation.collapse import CollapseEvaluator
from st_daft.losses.collapse_safe import CollapseSafeContrastiveLoss
from st_daft.models.asymmetric import (
    QUERY_ROUTE,
    route_parameter_pattern,
)
from st_daft.negatives.corrector import CORRECTOR_LOSSES, CorrectorNetwork
from st_daft.negatives.strategy import INDEX_MODES, parse_negatives
from st_daft.training.stages.base import (
    KL_EVALUATOR_NAME,
    KL_METRIC,
    VALIDATION_METRIC,
    StageContext,
    StageResult,
    TrainedStage,
    training_arguments,
    validation_evaluator,
)
from st_daft.training.stages.settings import (
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    setting,
    switch,
)
from st_daft.utils.distributed import is_distributed

logger = logging.getLogger(__name__)

#: The default replay buffer: the most recent observations the ridge objective's closed-form linear map is fitted on
#: (a shorter memory tracks the drift better; over 1,000 rows keeps the fit over-determined up to 1,024 dimensions).
CORRECTOR_BUFFER = 1024


def negatives_flag(value: str) -> str:
    """``--negatives``: a strategy spec, refused naming what it expected."""
    try:
        return parse_negatives(value).spec
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def index_option_flag(value: str) -> tuple[str, int | str]:
    """``KEY=VALUE`` of ``--mining-index-option``: the value an integer where it reads as one, checked by key."""
    key, equals, text = value.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    option = (key, int(text)) if text.lstrip("-").isdigit() else (key, text)
    try:
        check_mining_index_option(*option)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return option


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
            (corrector network), ``"refresh:N"`` or ``"corrected+refresh:N"`` (see :mod:`st_daft.negatives.miner`).
        num_negatives: mined negatives per query.
        mining_index: how the mined negatives are searched for: ``"auto"`` (exact scores up to 100,000 documents,
            else a flat faiss index), ``"exact"``, a faiss index over the (corrected) cache, rebuilt every 50 steps
            while correcting (``"flat"``, ``"ivf"``, ``"hnsw"``), or a stale index searched with corrected queries
            and never rebuilt (``"query-side"``, with a linear corrector; ``"two-step"``, re-ranked by the corrector):
            see :class:`~st_daft.negatives.miner.NegativeMiner`. For millions of documents, ``"ivf"`` or ``"two-step"``.
        mining_index_options: options of :func:`~st_daft.embeddings.index.build_faiss_index` (``nlist``, ``nprobe``,
            ``hnsw_m``, ``ef_search``, ``ef_construction``, ``storage``: default the cache's type), ``base`` (the
            stale index of the query-side modes) and ``shortlist`` (the rows ``"two-step"`` re-ranks).
        corrector_loss: the corrector's objective for the correcting strategies (see
            :class:`~st_daft.negatives.corrector.CorrectorTrainer`): ``"mse"``, ``"cosine"``, ``"kl"`` (the query's
            scores over the step's candidates), ``"mse+kl"`` or ``"ridge"`` (a linear map refitted in closed form on a
            replay buffer of the last 1,024 observations). docs/guide/corrector.md gives the measured trade-offs.
        corrector_warmup: corrector updates with MSE only before the KL term starts (``"kl"``, ``"mse+kl"``).
        corrector_steps: corrector updates per training step.
        corrector_buffer: earlier observations each update replays beside the step's own, or the ridge map is
            fitted on.
        stop_on_collapse: end the stage when a route collapses.
    """

    name: ClassVar[str] = "finetune"
    folder: ClassVar[str] = "stage-2-finetune"
    needs_router: ClassVar[bool] = False
    epochs: float = setting(
        2.0,
        flag="--finetune-epochs",
        help="fine-tuning epochs (2)",
        type=positive_float,
        budget=True,
        implies={"max_steps": -1},
    )
    max_steps: int = setting(
        -1, flag="--finetune-steps", help="fine-tuning steps (over epochs)", type=positive_int, budget=True
    )
    batch_size: int = setting(
        32, flag="--batch-size", help="fine-tuning batch size (default 32)", type=positive_int, budget=True
    )
    learning_rate: float = setting(
        1e-4, flag="--query-lr", help="fine-tuning query-route lr (1e-4)", type=positive_float, budget=True
    )
    document_learning_rate: float = setting(
        2e-5, flag="--document-lr", help="fine-tuning document-route lr", type=positive_float, budget=True
    )
    scale: float = 20.0
    guard: str = setting("variance", flag="--guard", help="collapse guard", choices=["variance", "uniformity", "none"])
    guard_weight: float = setting(1.0, flag="--guard-weight", help="weight of the guard", type=non_negative_float)
    negatives: str = setting(
        "in-batch",
        flag="--negatives",
        help="fine-tuning negatives: in-batch (default) | stale | corrected | refresh:N | corrected+refresh:N "
        "(mined from the document cache during training; N: steps between full re-embeddings)",
        type=negatives_flag,
    )
    num_negatives: int = setting(4, flag="--num-negatives", help="mined negatives per query (4)", type=positive_int)
    mining_index: str = setting(
        "auto",
        flag="--mining-index",
        help="how mined negatives are searched for: auto (default: exact up to 100,000 documents, else flat), or a "
        "faiss index over the corrected cache (flat, ivf, hnsw), or a stale index searched with corrected queries "
        "(query-side: a linear corrector; two-step: re-ranked by the corrector); ivf or two-step for millions",
        choices=["auto", "exact", "flat", "ivf", "hnsw", "query-side", "two-step"],
    )
    mining_index_options: dict[str, Any] = setting(
        default_factory=dict,
        flag="--mining-index-option",
        help="an option of the mining index, repeatable: nlist, nprobe, hnsw_m, ef_search, ef_construction, shortlist "
        "(integers), storage (float32|float16; default: --cache-dtype's), base (the stale index of query-side and "
        "two-step: flat|ivf|hnsw)",
        type=index_option_flag,
        action="append",
        metavar="KEY=VALUE",
        to_field=dict,
    )
    corrector_loss: str = setting(
        "ridge",
        flag="--corrector-loss",
        help="the corrector's objective for the correcting strategies: ridge (default: a linear map refitted in "
        "closed form), mse, cosine, kl (query scores over the step's candidates), mse+kl",
        choices=list(CORRECTOR_LOSSES),
    )
    corrector_warmup: int = setting(
        0,
        flag="--corrector-warmup",
        help="corrector updates with MSE only before a KL term starts",
        type=non_negative_int,
    )
    corrector_steps: int = setting(
        1, flag="--corrector-steps", help="corrector updates per training step (1)", type=positive_int
    )
    corrector_buffer: int = setting(
        CORRECTOR_BUFFER,
        flag="--corrector-buffer",
        help="earlier observations the corrector replays, or the ridge map is fitted on (1024)",
        type=non_negative_int,
    )
    stop_on_collapse: bool = switch(True, flag="--no-stop-on-collapse", help="keep training when a route collapses")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.corrector_loss not in CORRECTOR_LOSSES:
            choices = list(CORRECTOR_LOSSES)
            loss = self.corrector_loss
            raise ValueError(f"unknown corrector_loss (--corrector-loss) {loss!r}: choose from {choices}")
        if self.corrector_warmup < 0:
            raise ValueError(f"corrector_warmup (--corrector-warmup) must be >= 0, got {self.corrector_warmup}")
        if self.corrector_steps < 1 or self.corrector_buffer < 0:
            raise ValueError(
                f"corrector_steps (--corrector-steps) must be >= 1 and corrector_buffer (--corrector-buffer) >= 0, "
                f"got {self.corrector_steps} and {self.corrector_buffer}"
            )
        if self.corrector_loss == "ridge" and self.corrector_buffer < 1:
            raise ValueError(
                "corrector_loss (--corrector-loss) 'ridge' fits its map on the replay buffer: corrector_buffer "
                f"(--corrector-buffer) must be >= 1, got {self.corrector_buffer}"
            )
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
        options = dict(self.mining_index_options)
        shortlist = options.pop("shortlist", 256)
        # Searching with corrected queries needs a linear corrector; so does the ridge objective's closed-form map.
        linear = self.mining_index == "query-side" or self.corrector_loss == "ridge"
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
            corrector_loss=self.corrector_loss,
            corrector_warmup=self.corrector_warmup,
            corrector_steps=self.corrector_steps,
            corrector_buffer=self.corrector_buffer,
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
