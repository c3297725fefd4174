"""The base of the two stages that train the query route against a frozen document route (DAFT's alignment idea):
early stopping on the 1-NN KL estimate between the routes' embeddings of held-out texts
(:class:`~st_daft.evaluation.collapse.CollapseEvaluator`), keeping the checkpoint with the lowest KL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.evaluation import SequentialEvaluator
from transformers import EarlyStoppingCallback

from st_daft.callbacks.collapse import CollapseStopCallback
from st_daft.evaluation.collapse import CollapseEvaluator
from st_daft.models.asymmetric import (
    DOCUMENT_ROUTE,
    unfreeze_route,
)
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

logger = logging.getLogger(__name__)


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


def _check_sample_size(stage: str, sample_size: int | None) -> None:
    if sample_size is not None and sample_size < 0:
        raise ValueError(
            f"{stage} stage: corpus_sample_size (--corpus-sample-size) must be 0 (the whole corpus) or more, got "
            f"{sample_size}"
        )
