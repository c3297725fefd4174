"""st-daft: fast asymmetric retrievers for sentence-transformers.

A tiny query encoder (static embeddings or a 1-2 layer transformer) beside a strong document encoder, trained with
DAFT (Leonhardt, Jahnke & Anand 2022) so that it neither collapses nor drifts out of the document encoder's space.

Names are imported on first use (PEP 562): ``from st_daft.serving import StaticQueryEncoder`` in a query
service loads numpy, tokenizers and model2vec, not torch, transformers or sentence-transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from st_daft.cache import (
        CacheMismatchError,
        StaleEmbeddingCache,
    )
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
    from st_daft.corpus_alignment import (
        alignment_dataset,
        alignment_examples,
        alignment_texts,
        lexical_ranking_columns,
        pseudo_query_dataset,
    )
    from st_daft.corrector import (
        CorrectorNetwork,
        CorrectorTrainer,
        drift_loss,
        staleness_error,
    )
    from st_daft.data import (
        DataError,
        RetrievalData,
        load_beir,
        load_corpus,
        load_queries_file,
    )
    from st_daft.evaluation import (
        evaluate_retrieval,
        to_mteb_task,
    )
    from st_daft.general_corpus import general_texts
    from st_daft.hybrid import HybridSearch
    from st_daft.losses import (
        CollapseSafeContrastiveLoss,
        DAFTAlignmentLoss,
        LabelFreeAlignmentLoss,
        MinedNegativesLoss,
        build_negative_mining,
    )
    from st_daft.mining import (
        NegativeMiner,
        NegativeStrategy,
        RefreshPolicy,
        parse_negatives,
    )
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
        interpolate_route,
        route_parameter_pattern,
        route_weights,
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
    from st_daft.recipe import (
        DAFTConfig,
        TrainingSummary,
        default_stages,
        train_daft,
    )
    from st_daft.retrieval_evaluator import CachedCorpusRetrievalEvaluator
    from st_daft.serving import (
        StaticQueryEncoder,
        export_static_model,
    )
    from st_daft.soup import soup_static_routes
    from st_daft.stages import (
        AlignStage,
        CorpusStage,
        FinetuneStage,
        StageResult,
        VocabularyStage,
    )
    from st_daft.store import (
        DocumentEmbeddingStore,
        document_encoder_key,
    )
    from st_daft.vocabulary import TokenStatistics, contextual_token_statistics, initialize_static_route

# public name -> the module that defines it; imported when first asked for
_MODULE_OF: dict[str, str] = {
    **dict.fromkeys(("CacheMismatchError", "StaleEmbeddingCache"), "st_daft.cache"),
    **dict.fromkeys(
        (
            "CollapseStopCallback",
            "CorpusRefreshCallback",
            "MiningStepCallback",
            "ModelCardCallback",
            "NegativeMiningStateCallback",
            "NonFiniteLossCallback",
            "negative_mining_callbacks",
        ),
        "st_daft.callbacks",
    ),
    **dict.fromkeys(
        (
            "CollapseEvaluator",
            "collapse_statistics",
            "effective_rank",
            "is_collapsed",
            "knn_kl_divergence",
            "mean_pairwise_cosine",
            "per_dimension_std",
        ),
        "st_daft.collapse",
    ),
    **dict.fromkeys(
        (
            "alignment_dataset",
            "alignment_examples",
            "alignment_texts",
            "lexical_ranking_columns",
            "pseudo_query_dataset",
        ),
        "st_daft.corpus_alignment",
    ),
    "general_texts": "st_daft.general_corpus",
    "HybridSearch": "st_daft.hybrid",
    "soup_static_routes": "st_daft.soup",
    **dict.fromkeys(("CorrectorNetwork", "CorrectorTrainer", "drift_loss", "staleness_error"), "st_daft.corrector"),
    **dict.fromkeys(("DataError", "RetrievalData", "load_beir", "load_corpus", "load_queries_file"), "st_daft.data"),
    **dict.fromkeys(("evaluate_retrieval", "to_mteb_task"), "st_daft.evaluation"),
    "CachedCorpusRetrievalEvaluator": "st_daft.retrieval_evaluator",
    **dict.fromkeys(
        (
            "CollapseSafeContrastiveLoss",
            "DAFTAlignmentLoss",
            "LabelFreeAlignmentLoss",
            "MinedNegativesLoss",
            "build_negative_mining",
        ),
        "st_daft.losses",
    ),
    **dict.fromkeys(("NegativeMiner", "NegativeStrategy", "RefreshPolicy", "parse_negatives"), "st_daft.mining"),
    **dict.fromkeys(
        (
            "DOCUMENT_ROUTE",
            "QUERY_ROUTE",
            "build_asymmetric_model",
            "count_parameters",
            "default_document_encoder",
            "export_route",
            "freeze_route",
            "frozen_route",
            "get_route",
            "get_router",
            "interpolate_route",
            "route_parameter_pattern",
            "route_weights",
            "set_route_trainable",
            "unfreeze_route",
        ),
        "st_daft.model",
    ),
    **dict.fromkeys(
        (
            "DAFTModelCardData",
            "attach_model_card",
            "push_to_hub",
            "record_evaluation",
            "record_negatives",
            "record_stage",
            "write_model_card",
        ),
        "st_daft.model_card",
    ),
    **dict.fromkeys(("DAFTConfig", "TrainingSummary", "default_stages", "train_daft"), "st_daft.recipe"),
    **dict.fromkeys(("StaticQueryEncoder", "export_static_model"), "st_daft.serving"),
    **dict.fromkeys(("AlignStage", "CorpusStage", "FinetuneStage", "StageResult", "VocabularyStage"), "st_daft.stages"),
    **dict.fromkeys(("DocumentEmbeddingStore", "document_encoder_key"), "st_daft.store"),
    **dict.fromkeys(
        ("TokenStatistics", "contextual_token_statistics", "initialize_static_route"), "st_daft.vocabulary"
    ),
}

__all__ = [
    "alignment_dataset",
    "alignment_examples",
    "alignment_texts",
    "AlignStage",
    "attach_model_card",
    "build_asymmetric_model",
    "build_negative_mining",
    "CachedCorpusRetrievalEvaluator",
    "CacheMismatchError",
    "collapse_statistics",
    "CollapseEvaluator",
    "CollapseSafeContrastiveLoss",
    "CollapseStopCallback",
    "contextual_token_statistics",
    "CorpusRefreshCallback",
    "CorpusStage",
    "CorrectorNetwork",
    "CorrectorTrainer",
    "count_parameters",
    "DAFTAlignmentLoss",
    "DAFTConfig",
    "DAFTModelCardData",
    "DataError",
    "default_document_encoder",
    "default_stages",
    "document_encoder_key",
    "DOCUMENT_ROUTE",
    "DocumentEmbeddingStore",
    "drift_loss",
    "effective_rank",
    "evaluate_retrieval",
    "export_route",
    "export_static_model",
    "FinetuneStage",
    "freeze_route",
    "frozen_route",
    "general_texts",
    "get_route",
    "get_router",
    "HybridSearch",
    "initialize_static_route",
    "interpolate_route",
    "is_collapsed",
    "knn_kl_divergence",
    "LabelFreeAlignmentLoss",
    "load_beir",
    "load_corpus",
    "lexical_ranking_columns",
    "load_queries_file",
    "mean_pairwise_cosine",
    "MinedNegativesLoss",
    "MiningStepCallback",
    "ModelCardCallback",
    "negative_mining_callbacks",
    "NegativeMiner",
    "NegativeMiningStateCallback",
    "NegativeStrategy",
    "NonFiniteLossCallback",
    "parse_negatives",
    "per_dimension_std",
    "pseudo_query_dataset",
    "push_to_hub",
    "QUERY_ROUTE",
    "record_evaluation",
    "record_negatives",
    "record_stage",
    "RefreshPolicy",
    "RetrievalData",
    "route_parameter_pattern",
    "route_weights",
    "set_route_trainable",
    "soup_static_routes",
    "StageResult",
    "StaleEmbeddingCache",
    "staleness_error",
    "StaticQueryEncoder",
    "to_mteb_task",
    "TokenStatistics",
    "train_daft",
    "TrainingSummary",
    "unfreeze_route",
    "VocabularyStage",
    "write_model_card",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'st_daft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
