"""NonFiniteLossCallback: a NaN loss at step k stops training there, names the step, applies nothing, saves nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from torch import nn

from st_daft.callbacks.non_finite import NonFiniteLossCallback, NonFiniteLossError
from tests.conftest import QUESTIONS, TOPICS


class NaNAtStep(nn.Module):
    """Wraps a loss and multiplies its value by NaN on the ``step``-th training forward pass (1-based)."""

    def __init__(self, loss: nn.Module, step: int) -> None:
        super().__init__()
        self.loss, self.model, self.step, self.calls = loss, loss.model, step, 0

    def forward(self, sentence_features, labels=None):
        value = self.loss(sentence_features, labels)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.step:
                value = value * float("nan")
        return value


def _train(model_dir: Path, output: Path, nan_step: int, raise_error: bool = True):
    model = SentenceTransformer(str(model_dir))
    pairs = Dataset.from_dict({"query": list(QUESTIONS.values()), "positive": list(TOPICS.values())})
    loss = NaNAtStep(MultipleNegativesRankingLoss(model), nan_step)
    callback = NonFiniteLossCallback(loss, raise_error=raise_error)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output),
        max_steps=5,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=1,
        logging_steps=1,
        report_to="none",
        seed=0,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=pairs, loss=loss, callbacks=[callback])
    return model, trainer, callback


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tiny_document_model_dir, tmp_path) -> None:
    model, trainer, callback = _train(tiny_document_model_dir, tmp_path / "run", nan_step=4)
    with pytest.raises(NonFiniteLossError, match="step 4") as caught:
        trainer.train()
    assert "checkpoint-3" in str(caught.value)
    assert callback.stopped_step == 4 and trainer.state.global_step == 4
    saved = sorted(path.name for path in (tmp_path / "run").glob("checkpoint-*"))
    assert saved == ["checkpoint-1", "checkpoint-2", "checkpoint-3"], "nothing may be saved from the NaN step"
    # The NaN step's update was not applied: the weights are finite and equal the last good checkpoint's.
    last_good = load_file(next((tmp_path / "run" / "checkpoint-3").rglob("model.safetensors")))
    current = model[0].auto_model.state_dict()
    assert all(bool(torch.isfinite(tensor).all()) for tensor in current.values())
    for name, tensor in last_good.items():
        torch.testing.assert_close(current[name], tensor, rtol=0, atol=0, msg=name)


def test_without_raising_training_just_stops(tiny_document_model_dir, tmp_path) -> None:
    model, trainer, callback = _train(tiny_document_model_dir, tmp_path / "run", nan_step=2, raise_error=False)
    trainer.train()
    assert callback.stopped_step == 2 and "step 2" in callback.message
    assert [path.name for path in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-1"]
    assert all(bool(torch.isfinite(parameter).all()) for parameter in model.parameters())
