"""st-daft: fast asymmetric retrievers for sentence-transformers.

A tiny query encoder (static embeddings or a 1-2 layer transformer) beside a strong document encoder, trained with
DAFT (Leonhardt, Jahnke & Anand 2022) so that it neither collapses nor drifts out of the document encoder's space.
"""

from st_daft.cache import CacheMismatchError, StaleEmbeddingCache
from st_daft.callbacks import (
    CollapseStopCallback,
    CorpusRefreshCallback,
    MiningStepCallback,
    ModelCardCallback,
    NegativeMiningStateCallback,
    NonFiniteLossCallback,
    negative_mining_callbacks,
)
from st_daft.collapse import (
    CollapseEvaluator,
    collapse_statistics,
    effective_rank,
    is_collapsed,
    knn_kl_divergence,
    mean_pairwise_cosine,
    per_dimension_std,
)
from st_daft.corpus_alignment import alignment_dataset, alignment_examples, alignment_texts, pseudo_query_dataset
from st_daft.corrector import CorrectorNetwork, CorrectorTrainer, drift_loss, staleness_error
from st_daft.data import DataError, RetrievalData, load_beir, load_corpus, load_queries_file
from st_daft.evaluation import evaluate_retrieval, to_mteb_task
from st_daft.losses import (
    CollapseSafeContrastiveLoss,
    DAFTAlignmentLoss,
    LabelFreeAlignmentLoss,
    MinedNegativesLoss,
    build_negative_mining,
)
from st_daft.mining import NegativeMiner, NegativeStrategy, RefreshPolicy, parse_negatives
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
from st_daft.model_card import (
    DAFTModelCardData,
    attach_model_card,
    push_to_hub,
    record_evaluation,
    record_negatives,
    record_stage,
    write_model_card,
)
from st_daft.recipe import DAFTConfig, TrainingSummary, default_stages, train_daft
from st_daft.serving import export_static_model
from st_daft.stages import AlignStage, CorpusStage, FinetuneStage, StageResult, VocabularyStage
from st_daft.store import DocumentEmbeddingStore, document_encoder_key
from st_daft.vocabulary import initialize_static_route

__version__ = "0.1.0"

__all__ = [
    "AlignStage",
    "alignment_dataset",
    "alignment_texts",
    "attach_model_card",
    "alignment_examples",
    "pseudo_query_dataset",
    "build_asymmetric_model",
    "build_negative_mining",
    "CacheMismatchError",
    "collapse_statistics",
    "CollapseEvaluator",
    "CollapseStopCallback",
    "CollapseSafeContrastiveLoss",
    "CorpusRefreshCallback",
    "CorrectorNetwork",
    "CorpusStage",
    "CorrectorTrainer",
    "count_parameters",
    "DAFTAlignmentLoss",
    "DAFTConfig",
    "DAFTModelCardData",
    "DataError",
    "default_document_encoder",
    "default_stages",
    "DOCUMENT_ROUTE",
    "document_encoder_key",
    "DocumentEmbeddingStore",
    "drift_loss",
    "effective_rank",
    "evaluate_retrieval",
    "export_route",
    "FinetuneStage",
    "export_static_model",
    "freeze_route",
    "frozen_route",
    "get_route",
    "get_router",
    "initialize_static_route",
    "is_collapsed",
    "knn_kl_divergence",
    "LabelFreeAlignmentLoss",
    "load_beir",
    "load_corpus",
    "load_queries_file",
    "mean_pairwise_cosine",
    "MinedNegativesLoss",
    "MiningStepCallback",
    "ModelCardCallback",
    "negative_mining_callbacks",
    "NegativeMiner",
    "NegativeMiningStateCallback",
    "NonFiniteLossCallback",
    "NegativeStrategy",
    "parse_negatives",
    "per_dimension_std",
    "push_to_hub",
    "QUERY_ROUTE",
    "record_evaluation",
    "record_negatives",
    "record_stage",
    "RefreshPolicy",
    "RetrievalData",
    "route_parameter_pattern",
    "set_route_trainable",
    "StageResult",
    "StaleEmbeddingCache",
    "staleness_error",
    "to_mteb_task",
    "train_daft",
    "TrainingSummary",
    "unfreeze_route",
    "write_model_card",
    "VocabularyStage",
]
