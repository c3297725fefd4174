"""Stop training at the first NaN/inf loss or gradient, before the optimizer applies it, and save nothing from it.

transformers' trainer only hides a non-finite loss from its logs (``logging_nan_inf_filter``) and lets the optimizer
step on NaN gradients, which poisons every parameter (and Adam's moments) for good; the next checkpoint then holds
the poisoned state and ``load_best_model_at_end``/``--resume`` cannot get back to a good one. This callback checks,
in ``on_pre_optimizer_step`` (after the backward pass and the gradient all-reduce, before ``optimizer.step()``):

- the loss of every training forward pass since the previous step (a forward hook on the loss module, when given),
- every gradient of the model,

and on anything non-finite it drops the gradients (``param.grad = None``: torch optimizers skip such parameters, so
neither the weights nor Adam's moments move; zeroed gradients would still move them through the moments), asks the
trainer to stop, cancels the evaluation and checkpoint of that step (and of the epoch end that follows), and names
the step. The last checkpoint saved before it is the last good one. With ``raise_error`` (the default) training then
ends with :class:`NonFiniteLossError` in ``on_train_end`` (after the trainer has loaded its best checkpoint), so a
recipe does not go on to save a model or start the next stage as if nothing happened.

Add it with ``trainer.add_callback(NonFiniteLossCallback(loss))`` (or in ``callbacks=[...]``): it must come after
transformers' ``DefaultFlowCallback``, whose ``on_step_end`` asks for the step's checkpoint that this one cancels.
Under torchrun the decision is all-reduced, so every rank stops at the same step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteLossCallback", "NonFiniteLossError"]


class NonFiniteLossError(ValueError):
    """Training met a NaN/inf loss or gradient (the message names the step and the last good checkpoint)."""


class NonFiniteLossCallback(TrainerCallback):
    """Stops training at a NaN/inf loss or gradient without applying it (see the module docstring).

    Args:
        loss: the training loss module (an ``nn.Module``); its outputs are watched through a forward hook, so a
            non-finite loss is caught even when its gradients happen to be finite. Without it only the gradients
            are checked.
        raise_error: raise :class:`NonFiniteLossError` at the end of training when it was stopped.

    Attributes:
        stopped_step: the (1-based) optimizer step whose loss or gradients were non-finite, else None.
        message: what happened, naming the step and the last good checkpoint.
    """

    def __init__(self, loss: torch.nn.Module | None = None, raise_error: bool = True) -> None:
        self.raise_error = raise_error
        self.stopped_step: int | None = None
        self.message: str | None = None
        self.last_checkpoint: str | None = None
        self._bad_loss: float | None = None
        self._hook = loss.register_forward_hook(self._watch_loss) if isinstance(loss, torch.nn.Module) else None

    def _watch_loss(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not torch.is_grad_enabled():  # evaluation batches
            return
        value = output.get("loss") if isinstance(output, dict) else output
        if isinstance(value, dict):  # several named parts: the trainer sums them
            value = sum(value.values())
        if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value.detach()).all()):
            self._bad_loss = float(value.detach().float().sum())

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self._bad_loss = None

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if self.stopped_step is not None or model is None:
            return
        parameters = [parameter for parameter in model.parameters() if parameter.grad is not None]
        bad_gradients = any(not bool(torch.isfinite(parameter.grad).all()) for parameter in parameters)
        flag = torch.tensor(float(bad_gradients or self._bad_loss is not None))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must stop at the same step, or the others wait forever in the next all-reduce.
            if torch.distributed.get_backend() == "nccl":
                flag = flag.to(parameters[0].device if parameters else "cuda")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not bool(flag.item()):
            return
        for parameter in model.parameters():
            parameter.grad = None  # optimizers skip parameters without gradient: this step changes nothing
        step = state.global_step + 1
        what = f"loss {self._bad_loss}" if self._bad_loss is not None else "non-finite loss or gradients"
        if self._bad_loss is None and bad_gradients:
            what = "non-finite gradients"
        last_good = self.last_checkpoint or state.best_model_checkpoint
        self.stopped_step = step
        self.message = (
            f"training stopped at step {step}: {what}; the update of that step was not applied and nothing was "
            f"saved from it" + (f"; last good checkpoint: {last_good}" if last_good else "; no checkpoint was saved")
        )
        logger.error(self.message)
        control.should_training_stop = True

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.stopped_step is not None:  # runs after DefaultFlowCallback, which may have asked for them
            control.should_save = False
            control.should_evaluate = False
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.last_checkpoint = str(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.stopped_step is not None:
            control.should_save = False
            control.should_evaluate = False

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.stopped_step is not None and self.raise_error:
            raise NonFiniteLossError(self.message)
