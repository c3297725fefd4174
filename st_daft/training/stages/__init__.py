"""The recipe's stages as objects: each holds its own settings and ``run``s on a shared
:class:`~st_daft.training.stages.base.StageContext`, returning one :class:`~st_daft.training.stages.base.StageResult`.

- :class:`VocabularyStage` (static query routes, label-free): the static table starts from the document route's
  vectors of the vocabulary and of the corpus's tokens;
- :class:`CorpusStage` (label-free): the query route learns the frozen document route's embeddings of texts cut from
  the corpus;
- :class:`AlignStage` (DAFT stage 1): the query route is aligned with the frozen document route, every corpus
  document a negative, early-stopped on the 1-NN KL estimate;
- :class:`FinetuneStage` (DAFT stage 2): both routes train, optionally with mined hard negatives.

``STAGE_TYPES`` names them in the order a recipe runs them.
"""

from __future__ import annotations

from st_daft.training.stages.align import AlignStage
from st_daft.training.stages.base import (
    DEVICES,
    PRECISIONS,
    Stage,
    StageContext,
    StageResult,
    TrainedStage,
    check_checkpoint,
    check_device,
    last_complete_checkpoint,
    training_arguments,
)
from st_daft.training.stages.corpus import CorpusStage
from st_daft.training.stages.finetune import FinetuneStage, check_mining_index_option
from st_daft.training.stages.vocabulary import VocabularyStage

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
    "DEVICES",
    "PRECISIONS",
    "check_mining_index_option",
    "training_arguments",
    "last_complete_checkpoint",
    "check_checkpoint",
    "check_device",
]

STAGE_TYPES: dict[str, type[Stage]] = {
    stage.name: stage for stage in (VocabularyStage, CorpusStage, AlignStage, FinetuneStage)
}
