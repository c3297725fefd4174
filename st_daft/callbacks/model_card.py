"""Record a training run on the st-daft model card from inside a user's own ``SentenceTransformerTrainer``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from st_daft.models.asymmetric import DOCUMENT_ROUTE, QUERY_ROUTE, get_route, has_route
from st_daft.models.card import attach_model_card, negatives_from_log_history, record_negatives, record_stage

__all__ = ["ModelCardCallback"]


class ModelCardCallback(TrainerCallback):
    """Puts what a ``SentenceTransformerTrainer`` run did on the model's st-daft card
    (:class:`~st_daft.models.card_data.DAFTModelCardData`), so that ``model.save()`` writes it into ``README.md``.

    On ``on_init_end`` / ``on_train_begin`` the card is attached (:func:`~st_daft.models.card.attach_model_card`);
    on ``on_train_end`` one stage is recorded (:func:`~st_daft.models.card.record_stage`) from what the trainer shows:

    - ``steps``: ``state.global_step``; ``budget``: ``state.max_steps``;
    - ``learning_rates``: per route, ``"frozen"`` when the route has no trainable parameter, else the entry of
      ``args.learning_rate_mapping`` matching the route's parameter names, else ``args.learning_rate``;
    - ``stopped_reason``: the ``stopped_reason`` of the first watched callback that has one (e.g. a
      :class:`~st_daft.callbacks.CollapseStopCallback`), else "ended early at step N of M" when training stopped
      before its budget, else None (budget reached); ``collapsed``: the watched callbacks' ``collapsed``;
    - ``final_metrics``: the evaluation logged at the kept checkpoint (``state.best_model_checkpoint``), else the
      last evaluation in ``state.log_history``, without the ``eval_`` prefix (the collapse statistics among them);

    and, when the run logged ``mining_*`` statistics (a negative miner), the negatives strategy and its counts
    (:func:`~st_daft.models.card.record_negatives`).

    Args:
        stage_name: the stage's name on the card; default ``"align"`` when only the query route trained,
            ``"finetune"`` otherwise.
        watch: callbacks to read ``stopped_reason`` / ``collapsed`` from (e.g. a ``CollapseStopCallback``).
        negatives: the negatives strategy's name for the card (default: inferred from the logged statistics).
        budget: the stage's budget as text (e.g. ``"2 epochs"``), instead of ``state.max_steps``.
    """

    def __init__(
        self,
        stage_name: str | None = None,
        watch: list[Any] | tuple[Any, ...] = (),
        negatives: str | None = None,
        budget: str | int | None = None,
    ) -> None:
        self.stage_name = stage_name
        self.watch = list(watch)
        self.negatives = negatives
        self.budget = budget
        self.recorded: dict[str, Any] | None = None

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if kwargs.get("model") is not None:
            attach_model_card(kwargs["model"])

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if kwargs.get("model") is not None:
            attach_model_card(kwargs["model"])

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        model = kwargs.get("model")
        if model is None:
            return
        rates = _learning_rates(model, args)
        name = self.stage_name or ("align" if rates.get(DOCUMENT_ROUTE) == "frozen" else "finetune")
        stopped_reason = next((w.stopped_reason for w in self.watch if getattr(w, "stopped_reason", None)), None)
        if stopped_reason is None and state.max_steps and 0 < state.global_step < state.max_steps:
            stopped_reason = f"ended early at step {state.global_step} of {state.max_steps}"
        collapsed = [bool(w.collapsed) for w in self.watch if hasattr(w, "collapsed")]
        self.recorded = {
            "name": name,
            "steps": state.global_step,
            "budget": self.budget if self.budget is not None else state.max_steps,
            "learning_rates": rates,
            "stopped_reason": stopped_reason,
            "collapsed": any(collapsed) if collapsed else None,
            "final_metrics": final_evaluation(state),
        }
        record_stage(model, self.recorded)
        negatives = negatives_from_log_history(state.log_history, self.negatives)
        if negatives is not None:
            record_negatives(model, negatives)


def final_evaluation(state: TrainerState) -> dict[str, float]:
    """The evaluation logged at the kept checkpoint, else the last one, without the ``eval_`` prefix."""
    evaluations = [row for row in state.log_history if any(key.startswith("eval_") for key in row)]
    if not evaluations:
        return {}
    chosen = evaluations[-1]
    if state.best_model_checkpoint:
        match = re.search(r"checkpoint-(\d+)$", str(Path(state.best_model_checkpoint)))
        best = [row for row in evaluations if match and row.get("step") == int(match.group(1))]
        chosen = best[-1] if best else chosen
    return {
        key[len("eval_") :]: float(value)
        for key, value in chosen.items()
        if key.startswith("eval_") and isinstance(value, (int, float))
    }


def _learning_rates(model: Any, args: TrainingArguments) -> dict[str, float | str]:
    """Per route: "frozen", the matching ``learning_rate_mapping`` entry, or the trainer's learning rate."""
    mapping = getattr(args, "learning_rate_mapping", None) or {}
    if not (has_route(model, QUERY_ROUTE) and has_route(model, DOCUMENT_ROUTE)):
        trainable = any(parameter.requires_grad for parameter in model.parameters())
        return {"all": args.learning_rate if trainable else "frozen"}
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    rates: dict[str, float | str] = {}
    for route in (QUERY_ROUTE, DOCUMENT_ROUTE):
        trainable = [names.get(id(p), "") for p in get_route(model, route).parameters() if p.requires_grad]
        if not trainable:
            rates[route] = "frozen"
            continue
        rate = next(
            (value for pattern, value in mapping.items() if any(re.search(pattern, name) for name in trainable)),
            args.learning_rate,
        )
        rates[route] = float(rate)
    return rates
