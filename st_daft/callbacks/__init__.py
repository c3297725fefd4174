"""Trainer callbacks of st-daft, each small and holding one job (as sentence-transformers' sparse_encoder.callbacks)."""

from st_daft.callbacks.collapse import CollapseStopCallback
from st_daft.callbacks.model_card import ModelCardCallback
from st_daft.callbacks.negative_mining import (
    CorpusRefreshCallback,
    MiningStepCallback,
    NegativeMiningStateCallback,
    build_negative_mining,
    negative_mining_callbacks,
)
from st_daft.callbacks.non_finite import NonFiniteLossCallback, NonFiniteLossError
from st_daft.callbacks.statistics import LoggingStatistics, LogStatisticsCallback

__all__ = [
    "CollapseStopCallback",
    "CorpusRefreshCallback",
    "LoggingStatistics",
    "LogStatisticsCallback",
    "MiningStepCallback",
    "ModelCardCallback",
    "NegativeMiningStateCallback",
    "build_negative_mining",
    "negative_mining_callbacks",
    "NonFiniteLossCallback",
    "NonFiniteLossError",
]
