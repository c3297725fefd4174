"""st-daft: fast asymmetric retrievers for sentence-transformers.

A tiny query encoder (static embeddings or a 1-2 layer transformer) beside a strong document encoder, trained with
DAFT (Leonhardt, Jahnke & Anand 2022) so that it neither collapses nor drifts out of the document encoder's space.
"""

from st_daft.cache import CacheMismatchError, StaleEmbeddingCache
from st_daft.collapse import (
    CollapseEvaluator,
    CollapseMonitorCallback,
    collapse_statistics,
    effective_rank,
    is_collapsed,
    knn_kl_divergence,
    mean_pairwise_cosine,
    per_dimension_std,
)
from st_daft.corpus_alignment import alignment_dataset, alignment_examples, alignment_texts, pseudo_query_dataset
from st_daft.corrector import CorrectorNetwork, drift_loss, staleness_error
from st_daft.data import DataError, RetrievalData, load_beir
from st_daft.evaluation import evaluate_retrieval, to_mteb_task
from st_daft.losses import CollapseSafeContrastiveLoss, DAFTAlignmentLoss, LabelFreeAlignmentLoss
from st_daft.mining import MinedNegativesLoss, NegativeMiner, NegativeMiningCallback, NegativeStrategy, parse_negatives
from st_daft.model import (
    DOCUMENT_ROUTE,
    QUERY_ROUTE,
    build_asymmetric_model,
    count_parameters,
    default_document_encoder,
    export_route,
    freeze_route,
    frozen_route,
    get_route,
    get_router,
    route_parameter_pattern,
    set_route_trainable,
    unfreeze_route,
)
from st_daft.recipe import DAFTConfig, StageConfig, train_daft
from st_daft.store import DocumentEmbeddingStore, document_encoder_key
from st_daft.vocabulary import initialize_static_route

__version__ = "0.1.0"

__all__ = [
    "alignment_dataset",
    "alignment_texts",
    "alignment_examples",
    "pseudo_query_dataset",
    "build_asymmetric_model",
    "CacheMismatchError",
    "collapse_statistics",
    "CollapseEvaluator",
    "CollapseMonitorCallback",
    "CollapseSafeContrastiveLoss",
    "CorrectorNetwork",
    "count_parameters",
    "DAFTAlignmentLoss",
    "DAFTConfig",
    "DataError",
    "default_document_encoder",
    "DOCUMENT_ROUTE",
    "document_encoder_key",
    "DocumentEmbeddingStore",
    "drift_loss",
    "effective_rank",
    "evaluate_retrieval",
    "export_route",
    "freeze_route",
    "frozen_route",
    "get_route",
    "get_router",
    "initialize_static_route",
    "is_collapsed",
    "knn_kl_divergence",
    "LabelFreeAlignmentLoss",
    "load_beir",
    "mean_pairwise_cosine",
    "MinedNegativesLoss",
    "NegativeMiner",
    "NegativeMiningCallback",
    "NegativeStrategy",
    "parse_negatives",
    "per_dimension_std",
    "QUERY_ROUTE",
    "RetrievalData",
    "route_parameter_pattern",
    "set_route_trainable",
    "StageConfig",
    "StaleEmbeddingCache",
    "staleness_error",
    "to_mteb_task",
    "train_daft",
    "unfreeze_route",
]
