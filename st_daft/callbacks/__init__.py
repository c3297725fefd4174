"""Trainer callbacks of st-daft, each small and holding one job (as sentence-transformers' sparse_encoder.callbacks)."""

from st_daft.callbacks.negative_mining import (
    CorpusRefreshCallback,
    MiningStepCallback,
    NegativeMiningStateCallback,
    negative_mining_callbacks,
)
from st_daft.callbacks.statistics import LoggingStatistics, LogStatisticsCallback

__all__ = [
    "CorpusRefreshCallback",
    "LoggingStatistics",
    "LogStatisticsCallback",
    "MiningStepCallback",
    "NegativeMiningStateCallback",
    "negative_mining_callbacks",
]
