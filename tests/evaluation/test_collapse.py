"""Tests of st_daft.evaluation.collapse (metric functions, CollapseEvaluator) and of the callbacks that use them:
CollapseStopCallback, transformers' EarlyStoppingCallback on the KL, LogStatisticsCallback."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import EarlyStoppingCallback, TrainerControl, TrainerState

from st_daft.callbacks.collapse import CollapseStopCallback
from st_daft.callbacks.statistics import LogStatisticsCallback
from st_daft.evaluation import collapse
from st_daft.evaluation.collapse import (
    CollapseEvaluator,
    collapse_statistics,
    effective_rank,
    is_collapsed,
    knn_kl_divergence,
    mean_pairwise_cosine,
    per_dimension_std,
)

DIM = 16
# words of the tiny BERT's vocabulary (tests/conftest.py)
DOCUMENTS = [
    "cells divide by mitosis and the nucleus holds the chromosomes",
    "the heart pumps blood through arteries and veins to the body",
    "a virus infects host cells and copies its genome inside them",
    "python lists are mutable sequences and tuples are immutable",
    "stars fuse hydrogen into helium in their hot dense cores",
    "rain forms when water vapour condenses into droplets in clouds",
    "neurons in the brain signal with spikes across synapses",
    "bones store calcium and marrow makes new blood cells",
]
QUERIES = [
    "how do cells divide",
    "what pumps blood",
    "how does a virus copy its genome",
    "are python tuples mutable",
    "what do stars fuse",
    "how does rain form",
    "how do neurons signal",
    "where is calcium stored",
]
STATISTIC_NAMES = [
    "query_mean_cosine",
    "query_std",
    "query_effective_rank",
    "document_mean_cosine",
    "document_std",
    "document_effective_rank",
    "knn_kl",
    "paired_cosine",
]


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


@pytest.fixture()
def healthy() -> np.ndarray:
    return _unit_rows(np.random.default_rng(0).standard_normal((500, DIM)))


@pytest.fixture()
def collapsed() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.standard_normal(DIM) + 1e-3 * rng.standard_normal((500, DIM))


def _brute_force_kl(p: np.ndarray, q: np.ndarray, k: int) -> float:
    """Direct transcription of the Wang-Kulkarni-Verdú estimator."""
    n, d = p.shape
    within = np.linalg.norm(p[:, None] - p[None], axis=-1)
    np.fill_diagonal(within, np.inf)
    between = np.linalg.norm(p[:, None] - q[None], axis=-1)
    rho = np.sort(within, axis=1)[:, k - 1]
    nu = np.sort(between, axis=1)[:, k - 1]
    return d / n * np.log(nu / rho).sum() + np.log(len(q) / (n - 1))


# ---------------------------------------------------------------------------------------------- metric functions


def test_healthy_embeddings_statistics(healthy: np.ndarray) -> None:
    assert abs(mean_pairwise_cosine(healthy)) < 0.02
    # uniformly spread unit vectors: per-dimension std about 1 / sqrt(d)
    assert per_dimension_std(healthy) == pytest.approx(1 / math.sqrt(DIM), rel=0.05)
    assert effective_rank(healthy) > 0.9 * DIM
    assert effective_rank(healthy) <= DIM + 1e-9
    assert is_collapsed(collapse_statistics(healthy)) == (False, "")


def test_collapsed_embeddings_statistics(collapsed: np.ndarray) -> None:
    assert mean_pairwise_cosine(collapsed) > 0.999
    assert per_dimension_std(collapsed) < 1e-3
    # without centring the shared direction dominates the spectrum: effective rank about 1
    assert effective_rank(collapsed, center=False) < 1.1
    statistics = collapse_statistics(collapsed)
    flag, reason = is_collapsed(statistics)
    assert flag
    assert "query route" in reason and "mean cosine" in reason and "0.95" in reason


def test_effective_rank_detects_dimensional_collapse() -> None:
    rng = np.random.default_rng(2)
    direction = rng.standard_normal(DIM)
    one_direction = rng.standard_normal((300, 1)) * direction + 1e-4 * rng.standard_normal((300, DIM))
    assert effective_rank(one_direction) < 1.1
    two_directions = rng.standard_normal((300, 2)) @ rng.standard_normal((2, DIM))
    assert effective_rank(two_directions) == pytest.approx(2.0, abs=0.3)
    assert effective_rank(np.tile(direction, (10, 1))) == 0.0


def test_mean_pairwise_cosine_matches_brute_force() -> None:
    embeddings = np.random.default_rng(3).standard_normal((40, 8)) + 0.5
    unit = _unit_rows(embeddings)
    gram = unit @ unit.T
    expected = (gram.sum() - np.trace(gram)) / (40 * 39)
    assert mean_pairwise_cosine(embeddings) == pytest.approx(expected, abs=1e-12)
    # torch tensors of any float dtype and numpy arrays give the same result
    assert mean_pairwise_cosine(torch.tensor(embeddings, dtype=torch.float32)) == pytest.approx(expected, abs=1e-6)
    assert mean_pairwise_cosine(np.ones((5, 3))) == pytest.approx(1.0)


def test_per_dimension_std_matches_torch() -> None:
    embeddings = torch.randn(50, 8, generator=torch.Generator().manual_seed(4))
    expected = torch.nn.functional.normalize(embeddings, dim=1).std(dim=0).mean().item()
    assert per_dimension_std(embeddings) == pytest.approx(expected, rel=1e-6)
    assert isinstance(per_dimension_std(embeddings), float)


def test_is_collapsed_thresholds_and_reasons() -> None:
    statistics = {"query_mean_cosine": 0.99, "query_std": 0.05}
    assert is_collapsed(statistics) == (True, "the query route collapsed: mean cosine 0.9900 > 0.95 (max_mean_cosine)")
    assert is_collapsed(statistics, max_mean_cosine=0.995) == (False, "")
    assert not is_collapsed(statistics, max_mean_cosine=None)[0]

    flag, reason = is_collapsed({"query_mean_cosine": 0.5, "query_std": 1e-4}, max_mean_cosine=None)
    assert flag and "per-dimension std" in reason and "0.001" in reason and "min_std" in reason

    flag, reason = is_collapsed({"query_mean_cosine": 0.2, "document_mean_cosine": 0.97, "document_std": 0.01})
    assert flag and reason.startswith("the document route collapsed: mean cosine 0.9700 > 0.95")

    flag, reason = is_collapsed({"query_mean_cosine": float("nan"), "query_std": 0.1})
    assert flag and "nan" in reason

    with pytest.raises(ValueError, match="query_mean_cosine"):
        is_collapsed({"knn_kl": 1.0})


def test_knn_kl_same_distribution_small_shift_large() -> None:
    rng = np.random.default_rng(5)
    p = rng.standard_normal((1000, 4))
    q = rng.standard_normal((1000, 4))
    shift = np.array([2.0, 0.0, 0.0, 0.0])  # true KL = |shift|^2 / 2 = 2
    same = knn_kl_divergence(p, q)
    shifted = knn_kl_divergence(p, q + shift)
    scaled = knn_kl_divergence(p, 2.0 * q)  # true KL = (d/2) (1/4 - 1 + ln 4) = 1.27
    assert abs(same) < 0.15
    assert 1.2 < shifted < 2.8
    assert 0.8 < scaled < 2.0
    assert abs(same) < shifted / 5 and abs(same) < scaled / 5


def test_knn_kl_grows_with_shift() -> None:
    rng = np.random.default_rng(6)
    p = rng.standard_normal((800, 8))
    q = rng.standard_normal((800, 8))
    direction = np.eye(8)[0]
    estimates = [knn_kl_divergence(p, q + shift * direction) for shift in (0.0, 1.0, 2.0, 3.0)]
    assert estimates == sorted(estimates)
    assert estimates[-1] - estimates[0] > 2.0


@pytest.mark.parametrize("k", [1, 3])
def test_knn_kl_matches_brute_force_and_chunking(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    p, q = rng.standard_normal((60, 5)), rng.standard_normal((45, 5)) + 0.5
    expected = _brute_force_kl(p, q, k)
    assert knn_kl_divergence(p, q, k=k) == pytest.approx(expected, rel=1e-9)
    monkeypatch.setattr(collapse, "_DISTANCE_CHUNK_BYTES", 8 * 45 * 7)  # 7-row chunks
    assert knn_kl_divergence(torch.tensor(p), torch.tensor(q), k=k) == pytest.approx(expected, rel=1e-9)


def test_knn_kl_duplicates_and_collapse_stay_finite(healthy: np.ndarray, collapsed: np.ndarray) -> None:
    with_duplicates = np.concatenate([healthy[:100], healthy[:100]])
    assert math.isfinite(knn_kl_divergence(with_duplicates, healthy[100:]))
    # a collapsed query route (one vector that is not among the documents) is far from a healthy document route
    constant = np.tile(_unit_rows(np.ones((1, DIM))), (100, 1))
    assert math.isfinite(knn_kl_divergence(constant, healthy)) and knn_kl_divergence(constant, healthy) > 100
    assert knn_kl_divergence(collapsed, healthy) > 10 * abs(knn_kl_divergence(healthy[:250], healthy[250:]))
    assert math.isnan(knn_kl_divergence(np.full((5, 3), np.nan), healthy[:5, :3]))


def test_knn_kl_input_validation() -> None:
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError, match="same dimension"):
        knn_kl_divergence(rng.standard_normal((10, 4)), rng.standard_normal((10, 5)))
    with pytest.raises(ValueError, match="2-D"):
        knn_kl_divergence(rng.standard_normal(10), rng.standard_normal((10, 1)))
    with pytest.raises(ValueError, match="2-D"):
        knn_kl_divergence(rng.standard_normal((2, 3, 4)), rng.standard_normal((10, 4)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        knn_kl_divergence(rng.standard_normal((1, 4)), rng.standard_normal((10, 4)))
    with pytest.raises(ValueError, match="k must"):
        knn_kl_divergence(rng.standard_normal((5, 4)), rng.standard_normal((10, 4)), k=5)
    with pytest.raises(ValueError, match="2-D"):
        mean_pairwise_cosine(rng.standard_normal(4))


def test_collapse_statistics_keys_and_shape_check(healthy: np.ndarray, collapsed: np.ndarray) -> None:
    assert list(collapse_statistics(healthy)) == ["query_mean_cosine", "query_std", "query_effective_rank"]
    statistics = collapse_statistics(collapsed, healthy)
    assert sorted(statistics) == sorted(STATISTIC_NAMES)
    assert all(isinstance(value, float) and math.isfinite(value) for value in statistics.values())
    assert is_collapsed(statistics)[0]
    assert collapse_statistics(healthy, healthy)["paired_cosine"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same texts"):
        collapse_statistics(healthy, healthy[:100])


# ---------------------------------------------------------------------------------------------- evaluator


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return DOCUMENTS + QUERIES


def test_collapse_evaluator_on_plain_model(tiny_document_model_dir: Path, texts: list[str], tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_document_model_dir))
    evaluator = CollapseEvaluator(texts, name="dev", batch_size=8)
    assert evaluator.greater_is_better is False
    metrics = evaluator(model, output_path=str(tmp_path), epoch=1, steps=10)

    assert sorted(metrics) == sorted(f"dev_{name}" for name in STATISTIC_NAMES)
    assert all(isinstance(value, float) and math.isfinite(value) for value in metrics.values())
    assert evaluator.primary_metric == "dev_knn_kl"
    # both routes are the same network without a Router
    assert metrics["dev_paired_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "collapse_evaluation_dev_results.csv").read_text().startswith("epoch,steps,knn_kl,")


def test_collapse_evaluator_on_router_model(tiny_document_model_dir: Path, texts: list[str]) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Router

    document_encoder = SentenceTransformer(str(tiny_document_model_dir))
    query_encoder = SentenceTransformer(str(tiny_document_model_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in query_encoder.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    router = Router.for_query_document(
        query_modules=list(query_encoder.children()), document_modules=list(document_encoder.children())
    )
    model = SentenceTransformer(modules=[router])

    metrics = CollapseEvaluator(texts)(model)
    assert sorted(metrics) == sorted(STATISTIC_NAMES)
    assert all(math.isfinite(value) for value in metrics.values())
    assert metrics["paired_cosine"] < 0.999
    # genuinely different routes: no zero distance, so the estimate is not dominated by the epsilon guard
    assert abs(metrics["knn_kl"]) < 1000


def test_collapse_evaluator_validates_texts() -> None:
    with pytest.raises(ValueError, match="at least"):
        CollapseEvaluator(["only one"])


# ---------------------------------------------------------------------------------------------- callbacks


def _evaluate(
    callback: CollapseStopCallback,
    state: TrainerState,
    step: int,
    kl: float,
    mean_cosine: float = 0.3,
    prefix: str = "eval_dev_",
    early_stopping: EarlyStoppingCallback | None = None,
) -> TrainerControl:
    """One evaluation as the trainer runs it: callbacks' on_evaluate, then the trainer's best-metric update."""
    state.global_step = step
    control = TrainerControl()
    metrics = {
        "eval_loss": 1.0,
        f"{prefix}knn_kl": kl,
        f"{prefix}paired_cosine": 0.5,
        f"{prefix}query_mean_cosine": mean_cosine,
        f"{prefix}query_std": 0.05,
        f"{prefix}query_effective_rank": 10.0,
        f"{prefix}document_mean_cosine": 0.2,
        f"{prefix}document_std": 0.05,
        f"{prefix}document_effective_rank": 12.0,
    }
    args = SimpleNamespace(output_dir="unused", metric_for_best_model=f"{prefix}knn_kl", greater_is_better=False)
    callback.on_evaluate(args, state, control, metrics=metrics)
    if early_stopping is not None:
        early_stopping.on_evaluate(args, state, control, metrics=metrics)
        if state.best_metric is None or kl < state.best_metric:  # Trainer._determine_best_metric
            state.best_metric, state.best_global_step = kl, step
    return control


def test_kl_patience_through_early_stopping() -> None:
    """The end of DAFT's alignment stage: transformers' EarlyStoppingCallback on the KL, with its threshold."""
    callback = CollapseStopCallback(evaluator_name="dev")
    early = EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=0.1)
    state = TrainerState()
    assert not _evaluate(callback, state, 10, kl=5.0, early_stopping=early).should_training_stop
    assert not _evaluate(callback, state, 20, kl=4.0, early_stopping=early).should_training_stop
    # within the threshold: no improvement
    assert not _evaluate(callback, state, 30, kl=3.95, early_stopping=early).should_training_stop
    assert early.early_stopping_patience_counter == 1
    # an improvement resets the counter
    assert not _evaluate(callback, state, 40, kl=3.5, early_stopping=early).should_training_stop
    assert not _evaluate(callback, state, 50, kl=3.6, early_stopping=early).should_training_stop
    control = _evaluate(callback, state, 60, kl=3.7, early_stopping=early)
    assert control.should_training_stop
    assert (state.best_metric, state.best_global_step) == (3.5, 40)
    assert not callback.collapsed and callback.collapse_reason is None and callback.stopped_reason is None
    assert [entry["step"] for entry in callback.history] == [10, 20, 30, 40, 50, 60]
    assert callback.history[0]["knn_kl"] == 5.0 and callback.history[0]["query_std"] == 0.05


def test_callback_never_stops_on_kl() -> None:
    callback = CollapseStopCallback(evaluator_name="dev")
    state = TrainerState()
    for step, kl in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1):
        assert not _evaluate(callback, state, step, kl=kl).should_training_stop
    assert callback.history[0]["knn_kl"] == 1.0 and callback.stopped_reason is None


def test_callback_stops_on_collapse(caplog: pytest.LogCaptureFixture) -> None:
    callback = CollapseStopCallback(evaluator_name="dev")
    state = TrainerState()
    assert not _evaluate(callback, state, 10, kl=5.0).should_training_stop
    with caplog.at_level("WARNING", logger="st_daft.callbacks.collapse"):
        control = _evaluate(callback, state, 20, kl=1.0, mean_cosine=0.99)
    assert control.should_training_stop
    assert callback.collapsed
    assert callback.collapse_reason == "the query route collapsed: mean cosine 0.9900 > 0.95 (max_mean_cosine)"
    assert callback.stopped_reason == callback.collapse_reason
    assert "training stopped: the query route collapsed: mean cosine 0.9900 > 0.95" in caplog.text
    assert [entry["step"] for entry in callback.history] == [10, 20]


def test_callback_records_collapse_without_stopping() -> None:
    callback = CollapseStopCallback(evaluator_name="dev", stop_on_collapse=False, min_std=0.1)
    control = _evaluate(callback, TrainerState(), 10, kl=1.0)
    assert not control.should_training_stop
    assert callback.collapsed and "per-dimension std" in callback.collapse_reason
    assert callback.stopped_reason is None
    # a route that stays collapsed never stops a stage that only records it
    assert not _evaluate(callback, TrainerState(), 20, kl=0.5).should_training_stop
    assert callback.stopped_reason is None and len(callback.history) == 2


def test_callback_finds_metrics_by_suffix() -> None:
    # unnamed evaluator, metrics prefixed only with "eval_"
    callback = CollapseStopCallback()
    _evaluate(callback, TrainerState(), 1, kl=2.0, prefix="eval_")
    assert callback.history[0]["knn_kl"] == 2.0
    # named evaluator inside a SequentialEvaluator next to another one
    callback = CollapseStopCallback(evaluator_name="dev")
    metrics = {"eval_other_knn_kl": 9.0, "eval_dev_knn_kl": 3.0, "eval_sts_dev_spearman_cosine": 0.8}
    assert callback.extract_statistics(metrics) == {"knn_kl": 3.0}
    assert callback.extract_statistics({"eval_multi_dev_knn_kl": 4.0}) == {"knn_kl": 4.0}
    # no collapse statistics at all: nothing recorded
    callback.on_evaluate(SimpleNamespace(), TrainerState(), TrainerControl(), metrics={"eval_loss": 1.0})
    assert callback.history == []


class _FakeLoss:
    def __init__(self) -> None:
        self.calls = 0

    def pop_logging_statistics(self) -> dict[str, float]:
        self.calls += 1
        return {"batch_query_mean_cosine": 0.25, "batch_query_std": 0.1}


def test_log_statistics_callback_merges_loss_statistics() -> None:
    loss = _FakeLoss()
    callback = LogStatisticsCallback(loss)
    state = TrainerState(global_step=5)
    logs = {"loss": 1.5, "learning_rate": 1e-4}
    state.log_history.append({**logs, "step": 5})
    callback.on_log(SimpleNamespace(), state, TrainerControl(), logs=logs)
    assert logs["batch_query_mean_cosine"] == 0.25 and logs["batch_query_std"] == 0.1
    assert state.log_history[-1] == {**logs, "step": 5}

    eval_logs = {"eval_loss": 1.0}
    state.log_history.append({**eval_logs, "step": 5})
    callback.on_log(SimpleNamespace(), state, TrainerControl(), logs=eval_logs)
    assert eval_logs["eval_batch_query_mean_cosine"] == 0.25
    assert state.log_history[-1]["eval_batch_query_std"] == 0.1

    summary = {"train_runtime": 3.0, "train_loss": 1.2}
    callback.on_log(SimpleNamespace(), state, TrainerControl(), logs=summary)
    assert summary == {"train_runtime": 3.0, "train_loss": 1.2}
    assert loss.calls == 2

    # without a loss (or one without the method), logs are untouched
    logs = {"loss": 1.0}
    LogStatisticsCallback(object()).on_log(SimpleNamespace(), state, TrainerControl(), logs=logs)
    assert logs == {"loss": 1.0}


def test_callback_state_round_trip() -> None:
    """The state transformers writes into trainer_state.json (ExportableState) restores an equal callback."""
    callback = CollapseStopCallback(evaluator_name="dev", stop_on_collapse=False, min_std=0.1)
    state = TrainerState()
    for step, kl in [(10, 5.0), (20, 4.0), (30, 4.5), (40, 4.2)]:
        _evaluate(callback, state, step, kl=kl)
    saved = json.loads(json.dumps(callback.state()))  # JSON through and through
    expected_args = {"evaluator_name": "dev", "stop_on_collapse": False, "max_mean_cosine": 0.95, "min_std": 0.1}
    assert saved["args"] == expected_args
    assert saved["attributes"]["collapsed"] is True and len(saved["attributes"]["history"]) == 4

    restored = CollapseStopCallback.from_state(saved)
    assert restored.state() == callback.state()
    assert restored.history[1]["knn_kl"] == 4.0 and restored.collapse_reason == callback.collapse_reason
    # it keeps recording from where it was
    _evaluate(restored, TrainerState(), 50, kl=4.1)
    assert [entry["step"] for entry in restored.history] == [10, 20, 30, 40, 50]


def test_callback_in_trainer(tiny_document_model_dir: Path, texts: list[str], tmp_path: Path) -> None:
    """The callback finds the evaluator's metrics in a real (tiny) training run; its state lands in the checkpoint's
    trainer_state.json and is restored when training resumes."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(str(tiny_document_model_dir))
    train_dataset = Dataset.from_dict({"query": QUERIES, "positive": DOCUMENTS})
    loss = MultipleNegativesRankingLoss(model)
    loss.pop_logging_statistics = lambda: {"batch_query_std": 0.123}

    def trainer_with(monitor: CollapseStopCallback) -> SentenceTransformerTrainer:
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / "run"),
            max_steps=4,
            per_device_train_batch_size=4,
            eval_strategy="steps",
            eval_steps=2,
            logging_steps=2,
            save_steps=2,
            report_to=[],
            disable_tqdm=True,
            restore_callback_states_from_checkpoint=True,
        )
        return SentenceTransformerTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            loss=loss,
            evaluator=CollapseEvaluator(texts, name="dev"),
            callbacks=[LogStatisticsCallback(loss), monitor],
        )

    # a randomly initialised BERT is strongly anisotropic (mean cosine ~0.98): a "collapsed" model from the start
    monitor = CollapseStopCallback(evaluator_name="dev", max_mean_cosine=0.5)
    trainer = trainer_with(monitor)
    trainer.train()

    # the first evaluation (step 2 of 4) finds the collapse and stops training
    assert trainer.state.global_step == 2
    assert [entry["step"] for entry in monitor.history] == [2]
    assert set(STATISTIC_NAMES) <= set(monitor.history[0])
    assert monitor.collapsed and monitor.stopped_reason.startswith("the query route collapsed: mean cosine")
    assert any("eval_dev_knn_kl" in entry for entry in trainer.state.log_history)
    assert any(entry.get("batch_query_std") == 0.123 and "loss" in entry for entry in trainer.state.log_history)
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    saved_monitor = saved["stateful_callbacks"]["CollapseStopCallback"]
    assert saved_monitor["attributes"]["collapsed"] is True and len(saved_monitor["attributes"]["history"]) == 1

    # resuming restores the state (the trainer swaps in a restored copy), and recording goes on from there
    resumed = trainer_with(CollapseStopCallback(evaluator_name="dev", max_mean_cosine=1.0))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    restored = next(cb for cb in resumed.callback_handler.callbacks if isinstance(cb, CollapseStopCallback))
    assert restored.history[0]["step"] == 2 and restored.collapsed
