"""Stop training when a route collapses (DAFT's failure mode of heterogeneous dual encoders)."""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from st_daft.evaluation.collapse import DEFAULT_MAX_MEAN_COSINE, DEFAULT_MIN_STD, STATISTIC_NAMES, is_collapsed

logger = logging.getLogger(__name__)

__all__ = ["CollapseStopCallback"]


class CollapseStopCallback(TrainerCallback, ExportableState):
    """Reads a :class:`~st_daft.evaluation.collapse.CollapseEvaluator`'s metrics at every evaluation, records them, and
    stops
    training as soon as a route collapsed (:func:`~st_daft.evaluation.collapse.is_collapsed`), with the reason, e.g.
    ``"the query route collapsed: mean cosine 0.9912 > 0.95 (max_mean_cosine)"``.

    Early stopping on the KL estimate (the end of DAFT's alignment stage) is transformers' own
    ``EarlyStoppingCallback`` on ``metric_for_best_model="eval_{name}_knn_kl"`` with ``greater_is_better=False``.

    The callback's state (history, collapse and stop reasons) is an ``ExportableState``: the trainer writes it into
    each checkpoint's ``trainer_state.json`` (``stateful_callbacks``) and, with
    ``restore_callback_states_from_checkpoint=True``, restores it when training resumes. The trainer then replaces
    this object by a restored copy: read the outcome from ``trainer.callback_handler.callbacks``.

    Args:
        evaluator_name: the ``name`` of the :class:`~st_daft.evaluation.collapse.CollapseEvaluator`; its metrics are
            found as the
            keys ending in ``{evaluator_name}_knn_kl`` etc. (the trainer prefixes them with ``eval_``).
        stop_on_collapse: stop training on collapse; otherwise only record it (a randomly initialised query route
            starts out collapsed, and alignment is what fixes it).
        max_mean_cosine: collapse threshold of :func:`~st_daft.evaluation.collapse.is_collapsed`.
        min_std: collapse threshold of :func:`~st_daft.evaluation.collapse.is_collapsed`.

    Attributes:
        history: one dict per evaluation with ``step``, ``epoch`` and the collapse statistics found.
        collapsed: whether a collapse was seen; ``collapse_reason`` the first reason.
        stopped_reason: why this callback stopped training, or None.
    """

    def __init__(
        self,
        evaluator_name: str = "",
        stop_on_collapse: bool = True,
        max_mean_cosine: float | None = DEFAULT_MAX_MEAN_COSINE,
        min_std: float | None = DEFAULT_MIN_STD,
    ) -> None:
        self.evaluator_name = evaluator_name
        self.stop_on_collapse = stop_on_collapse
        self.max_mean_cosine = max_mean_cosine
        self.min_std = min_std
        self.history: list[dict[str, Any]] = []
        self.collapsed = False
        self.collapse_reason: str | None = None
        self.stopped_reason: str | None = None

    def extract_statistics(self, metrics: dict[str, Any]) -> dict[str, float]:
        """Collapse statistics (unprefixed keys) found in ``metrics``, matched by the suffix ``{name}_{statistic}``
        (so a :class:`CollapseEvaluator` inside a ``SequentialEvaluator`` is found as well)."""
        statistics = {}
        for statistic in STATISTIC_NAMES:
            suffix = f"{self.evaluator_name}_{statistic}" if self.evaluator_name else statistic
            exact = [key for key in (f"eval_{suffix}", suffix) if key in metrics]
            matches = exact or sorted(key for key in metrics if key.endswith(f"_{suffix}"))
            if matches:
                statistics[statistic] = float(metrics[matches[0]])
        return statistics

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        statistics = self.extract_statistics(metrics or {})
        if not statistics:
            return
        self.history.append({"step": state.global_step, "epoch": state.epoch, **statistics})
        route_statistics = ("query_mean_cosine", "query_std", "document_mean_cosine", "document_std")
        if not any(key in statistics for key in route_statistics):
            return
        collapsed, reason = is_collapsed(statistics, max_mean_cosine=self.max_mean_cosine, min_std=self.min_std)
        if not collapsed:
            return
        if not self.collapsed:
            self.collapsed, self.collapse_reason = True, reason
        if self.stop_on_collapse:
            control.should_training_stop = True
            self.stopped_reason = reason
            logger.warning(f"training stopped: {reason} at step {state.global_step}")
        else:
            logger.warning(f"{reason} at step {state.global_step} (training continues: stop_on_collapse=False)")

    def state(self) -> dict[str, Any]:
        return {
            "args": {
                "evaluator_name": self.evaluator_name,
                "stop_on_collapse": self.stop_on_collapse,
                "max_mean_cosine": self.max_mean_cosine,
                "min_std": self.min_std,
            },
            "attributes": {
                "history": [dict(entry) for entry in self.history],
                "collapsed": self.collapsed,
                "collapse_reason": self.collapse_reason,
                "stopped_reason": self.stopped_reason,
            },
        }
