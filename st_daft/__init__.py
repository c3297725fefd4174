"""st-daft: fast asymmetric retrievers for sentence-transformers.

A tiny query encoder (static embeddings or a 1-2 layer transformer) beside a strong document encoder, trained with
DAFT (Leonhardt, Jahnke & Anand 2022) so that it neither collapses nor drifts out of the document encoder's space.

Names are imported on first use (PEP 562): ``from st_daft.serving import StaticQueryEncoder`` in a query
service loads numpy, tokenizers and model2vec, not torch, transformers or sentence-transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from st_daft.utils.deprecated_import import setup_deprecated_module_imports

# the one list of public names: module -> the names it defines; each is imported when first asked for
_EXPORTS: dict[str, tuple[str, ...]] = {
    "st_daft.data": (
        "DataError",
        "load_beir",
        "load_corpus",
        "load_queries_file",
        "RetrievalData",
    ),
    "st_daft.utils.output": (
        "claim_output",
        "OutputError",
        "OutputFolder",
    ),
    "st_daft.models.asymmetric": (
        "build_asymmetric_model",
        "count_parameters",
        "default_document_encoder",
        "DOCUMENT_ROUTE",
        "export_route",
        "freeze_route",
        "frozen_route",
        "get_route",
        "get_router",
        "interpolate_route",
        "QUERY_ROUTE",
        "route_parameter_pattern",
        "route_weights",
        "set_route_trainable",
        "unfreeze_route",
    ),
    "st_daft.models.card": (
        "attach_model_card",
        "push_to_hub",
        "record_evaluation",
        "record_negatives",
        "record_stage",
        "write_model_card",
    ),
    "st_daft.models.card_data": ("DAFTModelCardData",),
    "st_daft.embeddings.cache": (
        "CacheMismatchError",
        "StaleEmbeddingCache",
    ),
    "st_daft.embeddings.store": (
        "document_encoder_key",
        "DocumentEmbeddingStore",
    ),
    "st_daft.negatives.corrector": (
        "CorrectorNetwork",
        "CorrectorTrainer",
        "drift_loss",
        "staleness_error",
    ),
    "st_daft.negatives.miner": ("NegativeMiner",),
    "st_daft.negatives.strategy": (
        "NegativeStrategy",
        "parse_negatives",
        "RefreshPolicy",
    ),
    "st_daft.evaluation.collapse": (
        "collapse_statistics",
        "CollapseEvaluator",
        "effective_rank",
        "is_collapsed",
        "knn_kl_divergence",
        "mean_pairwise_cosine",
        "per_dimension_std",
    ),
    "st_daft.evaluation.hybrid": ("HybridSearch",),
    "st_daft.evaluation.mteb": (
        "evaluate_retrieval",
        "to_mteb_task",
    ),
    "st_daft.evaluation.retrieval_evaluator": ("CachedCorpusRetrievalEvaluator",),
    "st_daft.label_free.corpus_texts": (
        "alignment_dataset",
        "alignment_examples",
        "alignment_texts",
        "lexical_ranking_columns",
        "pseudo_query_dataset",
    ),
    "st_daft.label_free.general_corpus": ("general_texts",),
    "st_daft.label_free.token_statistics": (
        "contextual_token_statistics",
        "TokenStatistics",
    ),
    "st_daft.label_free.vocabulary": ("initialize_static_route",),
    "st_daft.losses.alignment": ("DAFTAlignmentLoss",),
    "st_daft.losses.collapse_safe": ("CollapseSafeContrastiveLoss",),
    "st_daft.losses.label_free": ("LabelFreeAlignmentLoss",),
    "st_daft.losses.mined_negatives": ("MinedNegativesLoss",),
    "st_daft.callbacks.collapse": ("CollapseStopCallback",),
    "st_daft.callbacks.model_card": ("ModelCardCallback",),
    "st_daft.callbacks.negative_mining": (
        "build_negative_mining",
        "CorpusRefreshCallback",
        "MiningStepCallback",
        "negative_mining_callbacks",
        "NegativeMiningStateCallback",
    ),
    "st_daft.callbacks.non_finite": ("NonFiniteLossCallback",),
    "st_daft.training.recipe": (
        "DAFTConfig",
        "default_stages",
        "train_daft",
        "TrainingSummary",
    ),
    "st_daft.training.soup": ("soup_static_routes",),
    "st_daft.training.stages.align": ("AlignStage",),
    "st_daft.training.stages.base": ("StageResult",),
    "st_daft.training.stages.corpus": ("CorpusStage",),
    "st_daft.training.stages.finetune": ("FinetuneStage",),
    "st_daft.training.stages.vocabulary": ("VocabularyStage",),
    "st_daft.serving": (
        "export_static_model",
        "Searcher",
        "SearchIndexError",
        "StaticQueryEncoder",
    ),
    "st_daft.serving.build": (
        "build_search_index",
        "SearcherRetrieval",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [name for names in _EXPORTS.values() for name in names]

setup_deprecated_module_imports()


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'st_daft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
