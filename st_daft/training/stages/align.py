"""The align stage (DAFT stage 1, Leonhardt et al. 2022): the document route is frozen; a
:class:`~st_daft.embeddings.cache.StaleEmbeddingCache` of the corpus is built once (exact, because the route does not
move) and :class:`~st_daft.losses.DAFTAlignmentLoss` trains the query route with every corpus document as a
negative, early-stopped on the 1-NN KL estimate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from sentence_transformers import SentenceTransformerTrainingArguments

from st_daft.losses.alignment import DAFTAlignmentLoss
from st_daft.models.asymmetric import (
    DOCUMENT_ROUTE,
    QUERY_ROUTE,
    freeze_route,
    interpolate_route,
    route_weights,
)
from st_daft.training.stages.base import (
    ALIGN_SELECTIONS,
    INTERPOLATION_START_FILE,
    StageContext,
    StageResult,
    _require_resolved,
)
from st_daft.training.stages.corpus import CorpusStage
from st_daft.training.stages.frozen import _check_sample_size, _FrozenDocumentStage
from st_daft.training.stages.settings import positive_float, positive_int, setting, unit_float
from st_daft.training.stages.vocabulary import VocabularyStage
from st_daft.utils.distributed import is_main_process
from st_daft.utils.io import atomic_torch_save

logger = logging.getLogger(__name__)


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
            saved in the stage's folder, so a resumed run averages with the same start. It trades a little of the
            training collection for a collection unlike it (ten seeds: docs/results/quality.md and the label-free
            guide).
    """

    name: ClassVar[str] = "align"
    folder: ClassVar[str] = "stage-1-align"
    max_steps: int = setting(
        300, flag="--align-steps", help="alignment steps (default 300)", type=positive_int, budget=True
    )
    batch_size: int = setting(
        64, flag="--align-batch-size", help="alignment batch size (64)", type=positive_int, budget=True
    )
    learning_rate: float = setting(
        1e-3, flag="--align-lr", help="alignment learning rate (1e-3)", type=positive_float, budget=True
    )
    eval_steps: int = 50
    scale: float = 20.0
    cache_negatives: bool = True
    selection: str = setting(
        "auto",
        flag="--align-select",
        help="which alignment checkpoint is kept: validation (best validation nDCG@10, the full budget), kl "
        "(lowest 1-NN KL, early-stopped: DAFT's criterion) or auto (default): validation when the run has "
        "labelled queries",
        choices=("auto", "kl", "validation"),
    )
    interpolation: float | None = setting(
        None,
        flag="--align-interpolation",
        help="keep this share of the aligned query route and the rest of the route alignment started from, in every "
        "weight (WiSE-FT; 0-1; default 0.75 for a static route after the corpus stage when align is the last stage, "
        "else 1: the aligned route)",
        type=unit_float,
    )
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
