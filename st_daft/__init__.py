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
from st_daft.data import DataError, RetrievalData, load_beir
from st_daft.evaluation import evaluate_retrieval, to_mteb_task
from st_daft.losses import CollapseSafeContrastiveLoss, DAFTAlignmentLoss
from st_daft.model import (
    DOCUMENT_ROUTE,
    QUERY_ROUTE,
    build_asymmetric_model,
    count_parameters,
    default_document_encoder,
    freeze_route,
    frozen_route,
    get_route,
    get_router,
    route_parameter_pattern,
    set_route_trainable,
    unfreeze_route,
)
from st_daft.recipe import DAFTConfig, StageConfig, train_daft

__version__ = "0.1.0"

__all__ = [
    "CacheMismatchError",
    "CollapseEvaluator",
    "CollapseMonitorCallback",
    "CollapseSafeContrastiveLoss",
    "DAFTAlignmentLoss",
    "DAFTConfig",
    "DOCUMENT_ROUTE",
    "DataError",
    "QUERY_ROUTE",
    "RetrievalData",
    "StageConfig",
    "StaleEmbeddingCache",
    "build_asymmetric_model",
    "count_parameters",
    "collapse_statistics",
    "default_document_encoder",
    "effective_rank",
    "evaluate_retrieval",
    "freeze_route",
    "frozen_route",
    "get_route",
    "get_router",
    "is_collapsed",
    "knn_kl_divergence",
    "load_beir",
    "mean_pairwise_cosine",
    "per_dimension_std",
    "route_parameter_pattern",
    "set_route_trainable",
    "train_daft",
    "to_mteb_task",
    "unfreeze_route",
]
