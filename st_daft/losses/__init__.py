"""Losses for asymmetric retrievers, in the style of ``sentence_transformers.sentence_transformer.losses``."""

from st_daft.losses.alignment import DAFTAlignmentLoss
from st_daft.losses.collapse_safe import CollapseSafeContrastiveLoss
from st_daft.losses.label_free import LabelFreeAlignmentLoss
from st_daft.losses.mined_negatives import MinedNegativesLoss

__all__ = [
    "DAFTAlignmentLoss",
    "CollapseSafeContrastiveLoss",
    "LabelFreeAlignmentLoss",
    "MinedNegativesLoss",
]
