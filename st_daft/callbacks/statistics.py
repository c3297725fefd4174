"""Merge statistics that losses and miners gather during training into the trainer's logs."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = ["LoggingStatistics", "LogStatisticsCallback"]


@runtime_checkable
class LoggingStatistics(Protocol):
    """Anything that accumulates statistics between logging steps (a loss, a miner) and hands them over on demand."""

    def pop_logging_statistics(self) -> dict[str, float]: ...


class LogStatisticsCallback(TrainerCallback):
    """Adds each source's ``pop_logging_statistics()`` to the trainer's logs, as sentence-transformers' own callbacks
    do (e.g. ``SpladeRegularizerWeightSchedulerCallback`` writes into ``logs`` in ``on_log``).

    Training logs (with a ``loss`` key) get the statistics as they are; evaluation logs (``eval_*`` keys) get them with
    an ``eval_`` prefix, since they then come from evaluation batches; other logs (the end-of-training summary) are
    left alone. The statistics also go into ``state.log_history[-1]``, so they are saved in ``trainer_state.json``,
    and the console printer (added after user callbacks) shows them. Reporting integrations (TensorBoard, W&B) run
    before user callbacks and so do not see them.

    Args:
        sources: objects with ``pop_logging_statistics()`` (e.g. :class:`~st_daft.losses.CollapseSafeContrastiveLoss`,
            a negative miner). Sources without it are ignored, so a plain loss can be passed as well.
    """

    def __init__(self, *sources: Any) -> None:
        self.sources = [source for source in sources if isinstance(source, LoggingStatistics)]

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None:
            return
        if "loss" in logs:
            prefix = ""
        elif any(key.startswith("eval_") for key in logs):
            prefix = "eval_"
        else:
            return
        statistics: dict[str, float] = {}
        for source in self.sources:
            popped = source.pop_logging_statistics() or {}
            statistics.update({f"{prefix}{key}": float(value) for key, value in popped.items()})
        if not statistics:
            return
        logs.update(statistics)
        if state.log_history:
            state.log_history[-1].update(statistics)
