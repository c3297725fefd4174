"""Negative mining from a (corrected) stale cache: strategies, exclusions, accounting, checkpoints, refusals."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments

from st_daft.callbacks.negative_mining import (
    CACHE_FOLDER,
    CHECKPOINT_FOLDER,
    STATE_FILE,
    NegativeMiningStateCallback,
    load_negative_mining_state,
    negative_mining_callbacks,
    prune_caches,
    save_negative_mining_state,
)
from st_daft.callbacks.statistics import LogStatisticsCallback
from st_daft.embeddings.cache import CacheMismatchError, StaleEmbeddingCache, cache_is_current, token_keys
from st_daft.losses.collapse_safe import CollapseSafeContrastiveLoss
from st_daft.losses.mined_negatives import MinedNegativesLoss
from st_daft.models.asymmetric import DOCUMENT_ROUTE, QUERY_ROUTE, build_asymmetric_model, freeze_route, get_route
from st_daft.models.fingerprint import route_fingerprint
from st_daft.negatives.corrector import CorrectorNetwork, CorrectorTrainer
from st_daft.negatives.miner import NegativeMiner
from st_daft.negatives.strategy import RefreshPolicy, parse_negatives
from tests.conftest import QUESTIONS, TOPICS

EXTRA = {
    f"x{index}": f"{a} and {b}"
    for index, (a, b) in enumerate(zip(list(TOPICS.values()), list(TOPICS.values())[1:] + list(TOPICS.values())[:1]))
}
CORPUS = {f"d-{topic}": text for topic, text in TOPICS.items()} | EXTRA
PAIRS = Dataset.from_dict(
    {"query": [QUESTIONS[topic] for topic in TOPICS], "positive": [TOPICS[topic] for topic in TOPICS]}
)
QUERY_POSITIVES = {QUESTIONS[topic]: [f"d-{topic}"] for topic in TOPICS}
# a second relevant document for one query: it must never be mined as that query's negative
QUERY_POSITIVES[QUESTIONS["cell"]].append("x0")


@pytest.fixture()
def model(tiny_document_model_dir: Path) -> SentenceTransformer:
    torch.manual_seed(0)
    return build_asymmetric_model(str(tiny_document_model_dir), "static")


@pytest.fixture()
def cache(model: SentenceTransformer) -> StaleEmbeddingCache:
    return StaleEmbeddingCache.build(model, CORPUS, batch_size=8, show_progress_bar=False)


def _miner(cache: StaleEmbeddingCache, strategy: str = "corrected", **kwargs) -> NegativeMiner:
    corrector = CorrectorNetwork(cache.dimension, hidden=16) if parse_negatives(strategy).correct else None
    options = {"num_negatives": 2, "query_positives": QUERY_POSITIVES, "corrector": corrector} | kwargs
    return NegativeMiner(cache, CORPUS, strategy, **options)


def _mining(cache: StaleEmbeddingCache, strategy: str = "corrected", corrector_buffer: int = 0, **kwargs):
    """A miner with its corrector trainer and refresh policy, as build_negative_mining makes them."""
    miner = _miner(cache, strategy, **kwargs)
    trainer = CorrectorTrainer(miner.corrector, buffer=corrector_buffer) if miner.corrector is not None else None
    refresh = RefreshPolicy(miner.strategy.refresh_every) if miner.strategy.refresh_every else None
    return SimpleNamespace(miner=miner, trainer=trainer, refresh=refresh)


def _train(model, mining, output_dir: Path, max_steps: int, save_steps: int | None = None, resume: str | None = None):
    loss = MinedNegativesLoss(model, CollapseSafeContrastiveLoss(model, guard="none"), mining.miner, mining.trainer)
    callbacks = negative_mining_callbacks(mining.miner, mining.trainer, mining.refresh)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        router_mapping={"query": QUERY_ROUTE, "positive": DOCUMENT_ROUTE},
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps,
        logging_steps=1,
        seed=0,
        report_to="none",
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=PAIRS,
        loss=loss,
        callbacks=[*callbacks, LogStatisticsCallback(loss)],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


# ---------------------------------------------------------------------- strategies


@pytest.mark.parametrize(
    ("spec", "mine", "correct", "every"),
    [
        ("in-batch", False, False, None),
        ("stale", True, False, None),
        ("corrected", True, True, None),
        ("refresh:25", True, False, 25),
        ("corrected+refresh:3", True, True, 3),
    ],
)
def test_parse_negatives(spec: str, mine: bool, correct: bool, every: int | None) -> None:
    strategy = parse_negatives(spec)
    assert (strategy.mine, strategy.correct, strategy.refresh_every) == (mine, correct, every)


@pytest.mark.parametrize("spec", ["", "refresh", "refresh:0", "refresh:-2", "refresh:x", "corrected+stale", "hard"])
def test_malformed_strategy_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown negatives strategy"):
        parse_negatives(spec)


# ---------------------------------------------------------------------- mining


@pytest.mark.parametrize("index", ["exact", "flat", "hnsw", "ivf"])
@pytest.mark.parametrize("strategy", ["stale", "corrected"])
def test_mining_never_returns_a_positive(cache, model, index: str, strategy: str) -> None:
    miner = _miner(cache, strategy, num_negatives=3, index=index, index_options={"nlist": 2, "nprobe": 2})
    miner.bind(model)
    if miner.corrector is not None:  # a corrector that is not the identity
        torch.nn.init.normal_(miner.corrector.mlp[-1].weight, std=0.3)
        miner.corrector.version += 1
    queries = list(QUESTIONS.values())[:4]
    positives = cache.rows_for_ids([f"d-{topic}" for topic in list(QUESTIONS)[:4]])
    query_features = model.preprocess(queries, task=QUERY_ROUTE)

    # the query embeddings are chosen to score the positives (and the second relevant document) highest
    query_embeddings = miner.scoring_matrix()[positives] + miner.scoring_matrix()[cache.rows_for_ids(["x0"])]
    rows = miner.mine(query_embeddings, positives, token_keys(query_features))
    assert rows.shape == (4, 3)
    assert not set(rows.flatten().tolist()) & set(positives.tolist())
    assert cache.row_of_id["x0"] not in rows[0].tolist()  # the cell query's second relevant document
    if index in ("exact", "flat"):
        exact = _miner(cache, strategy, num_negatives=3, index="exact")
        exact.bind(model)
        exact.corrector = miner.corrector
        assert torch.equal(exact.mine(query_embeddings, positives, token_keys(query_features)), rows)


def test_margin_filter_drops_near_positive_candidates(cache, model) -> None:
    miner = _miner(cache, "stale", num_negatives=2, margin=0.05)
    matrix = miner.scoring_matrix()
    positives = torch.tensor([0, 1])
    queries = matrix[positives]
    rows = miner.mine(queries, positives)
    positive_scores = (queries * matrix[positives]).sum(dim=1)
    for index in range(2):
        mined_scores = matrix[rows[index]] @ queries[index]
        assert bool((mined_scores <= positive_scores[index] - 0.05 + 1e-6).all())


def test_in_batch_needs_no_cache_and_stale_does() -> None:
    NegativeMiner(None, strategy="in-batch")
    with pytest.raises(ValueError, match="needs a cache"):
        NegativeMiner(None, strategy="stale")


def test_more_negatives_than_the_corpus_is_refused_before_training(cache) -> None:
    with pytest.raises(ValueError, match=r"num_negatives \(--num-negatives\) is 1000 .* only 16 documents"):
        _miner(cache, "stale", num_negatives=1000)
    with pytest.raises(ValueError, match="--num-negatives"):
        _miner(cache, "corrected", num_negatives=len(CORPUS))
    assert _miner(cache, "stale", num_negatives=len(CORPUS) - 1).num_negatives == len(CORPUS) - 1


# ---------------------------------------------------------------------- training and accounting


def test_counts_add_up_and_reach_the_logs(model, cache, tmp_path: Path) -> None:
    mining = _mining(cache, "corrected")
    miner, statistics = mining.miner, mining.miner.statistics
    corrector_before = {k: v.clone() for k, v in miner.corrector.state_dict().items()}
    trainer = _train(model, mining, tmp_path / "run", max_steps=3)
    assert statistics.counts["loss_documents"] == 3 * 4
    assert 0 < statistics.counts["negatives"] <= 3 * 4 * 2
    assert statistics.counts["refresh"] == 0
    assert statistics.documents_encoded == statistics.counts["loss_documents"] + statistics.counts["negatives"]
    assert len(statistics.history) == 3
    assert all(
        {"stale_error", "corrected_error", "corrector_loss", "positive_rank"} <= set(h) for h in statistics.history
    )
    assert all(1 <= h["positive_rank"] <= 3 for h in statistics.history)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1]["mining_encoded_total"] == statistics.documents_encoded
    assert "mining_stale_error" in logged[-1] and "mining_overhead" in logged[-1]
    # the corrector trained: it left the identity
    assert any(not torch.equal(v, miner.corrector.state_dict()[k]) for k, v in corrector_before.items())
    # the model stays a plain SentenceTransformer: the corrector is no part of it
    model.save(str(tmp_path / "model"))
    assert not any("corrector" in key for key in SentenceTransformer(str(tmp_path / "model")).state_dict())


def test_refresh_reembeds_the_corpus(model, cache, tmp_path: Path) -> None:
    mining = _mining(cache, "corrected+refresh:2")
    _train(model, mining, tmp_path / "run", max_steps=3)
    statistics = mining.miner.statistics
    assert statistics.num_refreshes == 1 and mining.refresh.last_step == 2
    assert statistics.counts["refresh"] == len(CORPUS)
    assert statistics.documents_encoded == sum(statistics.counts.values())


def test_frozen_document_route_uses_the_exact_cache(model, cache, tmp_path: Path) -> None:
    freeze_route(model, DOCUMENT_ROUTE)
    mining = _mining(cache, "corrected")
    miner = mining.miner
    before = {k: v.clone() for k, v in miner.corrector.state_dict().items()}
    _train(model, mining, tmp_path / "run", max_steps=2)
    assert miner.exact and not miner.correcting
    assert all(torch.equal(v, miner.corrector.state_dict()[k]) for k, v in before.items())
    assert cache.is_current(model)  # still exact; the logged error is the dropout of train mode alone
    assert all(h["stale_error"] == pytest.approx(h["corrected_error"]) for h in miner.statistics.history)


def test_a_cache_of_another_encoder_is_refused_when_training_starts(model, cache, tmp_path: Path) -> None:
    with torch.no_grad():
        next(get_route(model, DOCUMENT_ROUTE).parameters()).add_(0.01)
    with pytest.raises(CacheMismatchError, match="another document encoder: fingerprint"):
        _train(model, _mining(cache, "corrected"), tmp_path / "run", max_steps=1)


# ---------------------------------------------------------------------- a user's own trainer script


def _user_script(model, loss, callbacks, output_dir: Path, max_steps: int, resume: str | None = None, **overrides):
    """What a user writes without the st-daft recipe: plain SentenceTransformerTrainer, the loss, the callbacks."""
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        router_mapping={"query": QUERY_ROUTE, "positive": DOCUMENT_ROUTE},
        logging_steps=1,
        seed=0,
        report_to="none",
        **({"learning_rate": 1e-5, "save_strategy": "no"} | overrides),
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=PAIRS, loss=loss, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _drifted_cache(model) -> StaleEmbeddingCache:
    """A cache of this document route whose vectors drifted by a fixed linear map (a synthetic, learnable drift)."""
    cache = StaleEmbeddingCache.build(model, CORPUS, batch_size=8, show_progress_bar=False)
    generator = torch.Generator().manual_seed(0)
    drift = torch.eye(cache.dimension) + 0.5 * torch.randn(cache.dimension, cache.dimension, generator=generator) / (
        cache.dimension**0.5
    )
    cache.embeddings = torch.nn.functional.normalize(cache.embeddings @ drift, dim=1)
    return cache


def _plain_mnrl_mining(model, cache):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    miner = NegativeMiner(
        cache,
        CORPUS,
        "corrected",
        num_negatives=2,
        query_positives=QUERY_POSITIVES,
        corrector=CorrectorNetwork(cache.dimension, depth=1),
    )
    corrector_trainer = CorrectorTrainer(miner.corrector, lr=1e-2, steps=5, buffer=64)
    loss = MinedNegativesLoss(model, MultipleNegativesRankingLoss(model), miner, corrector_trainer)
    return loss, negative_mining_callbacks(miner, corrector_trainer) + [LogStatisticsCallback(loss)]


def test_user_script_wraps_multiple_negatives_ranking_loss(model, tmp_path: Path) -> None:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    cache = _drifted_cache(model)
    drifted = cache.embeddings.clone()
    loss, callbacks = _plain_mnrl_mining(model, cache)
    assert loss.get_config_dict()["negatives"] == "corrected" and "scale" in loss.get_config_dict()
    assert loss.citation.startswith(MultipleNegativesRankingLoss(model).citation) and "2409.01890" in loss.citation
    trainer = _user_script(model, loss, callbacks, tmp_path / "run", 16, save_strategy="steps", save_steps=8)
    statistics = loss.miner.statistics
    assert statistics.counts["negatives"] > 0 and statistics.counts["refresh"] == 0
    history = statistics.history
    late = history[-4:]
    stale = sum(h["stale_error"] for h in late) / len(late)
    corrected = sum(h["corrected_error"] for h in late) / len(late)
    assert history[0]["corrected_error"] == pytest.approx(history[0]["stale_error"])  # h starts as the identity
    assert corrected < 0.5 * stale, (stale, corrected)
    assert any("mining_corrected_error" in row for row in trainer.state.log_history)

    # resume from step 8 with a freshly built (undrifted) cache: the saved one comes back, nothing is re-embedded
    resumed_loss, resumed_callbacks = _plain_mnrl_mining(
        model, StaleEmbeddingCache.build(model, CORPUS, show_progress_bar=False)
    )
    _user_script(
        model, resumed_loss, resumed_callbacks, tmp_path / "run", 16, resume=str(tmp_path / "run" / "checkpoint-8")
    )
    resumed = resumed_loss.miner
    assert torch.equal(resumed.cache.embeddings.float(), drifted) and resumed.statistics.counts["refresh"] == 0
    assert [h["step"] for h in resumed.statistics.history] == [h["step"] for h in history]
    assert resumed.statistics.history[:8] == history[:8]


def test_user_script_wraps_daft_alignment_loss(model, tmp_path: Path) -> None:
    from st_daft.losses.alignment import DAFTAlignmentLoss

    freeze_route(model, DOCUMENT_ROUTE)
    document_before = [p.clone() for p in get_route(model, DOCUMENT_ROUTE).parameters()]
    query_before = [p.clone() for p in get_route(model, QUERY_ROUTE).parameters()]
    cache = StaleEmbeddingCache.build(model, CORPUS, batch_size=8, show_progress_bar=False)
    miner = NegativeMiner(cache, CORPUS, "stale", num_negatives=3, query_positives=QUERY_POSITIVES)
    loss = MinedNegativesLoss(model, DAFTAlignmentLoss(model, document_cache=cache, cache_negatives=False), miner)
    trainer = _user_script(
        model, loss, [*negative_mining_callbacks(miner), LogStatisticsCallback(loss)], tmp_path, 3, learning_rate=1e-2
    )
    assert miner.exact and miner.statistics.counts["negatives"] > 0
    assert all(torch.equal(a, b) for a, b in zip(document_before, get_route(model, DOCUMENT_ROUTE).parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(query_before, get_route(model, QUERY_ROUTE).parameters()))
    assert all(np.isfinite(row["loss"]) for row in trainer.state.log_history if "loss" in row)
    assert "2211.04942" in loss.citation and "2409.01890" not in loss.citation


def test_user_script_wraps_collapse_safe_loss_and_keeps_its_components(model, cache, tmp_path: Path) -> None:
    mining = _mining(cache, "stale")
    loss = MinedNegativesLoss(model, CollapseSafeContrastiveLoss(model), mining.miner)
    callbacks = [*negative_mining_callbacks(mining.miner), LogStatisticsCallback(loss)]
    trainer = _user_script(model, loss, callbacks, tmp_path, 2)
    logged = [row for row in trainer.state.log_history if "loss" in row][-1]
    assert {"contrastive", "collapse_guard", "batch_query_mean_cosine", "mining_encoded_negatives"} <= set(logged)
    assert logged["mining_encoded_negatives"] > 0
    with pytest.raises(TypeError, match="compute_loss_from_embeddings"):
        MinedNegativesLoss(model, torch.nn.Linear(2, 2), mining.miner)


# ---------------------------------------------------------------------- checkpoints


def _snapshot(mining) -> dict:
    miner, trainer = mining.miner, mining.trainer
    return {
        "cache": miner.cache.embeddings.clone(),
        "fingerprint": miner.cache.fingerprint,
        "corrector": {k: v.clone() for k, v in miner.corrector.state_dict().items()},
        "optimizer": {
            key: {field: value.clone() for field, value in state.items()}
            for key, state in trainer.optimizer.state_dict()["state"].items()
        },
        "state": json.loads(json.dumps(miner.statistics.state_dict())),
        "refresh": mining.refresh.state_dict() if mining.refresh else None,
        "step": miner.step,
    }


def test_resume_restores_cache_corrector_and_optimizer_exactly(model, cache, tmp_path: Path) -> None:
    mining = _mining(cache, "corrected+refresh:1", corrector_buffer=16)  # refreshed cache: saved beside checkpoints
    _train(model, mining, tmp_path / "run", max_steps=2, save_steps=2)
    saved = _snapshot(mining)
    checkpoint = tmp_path / "run" / "checkpoint-2" / CHECKPOINT_FOLDER
    assert (tmp_path / "run" / CACHE_FOLDER / mining.miner.cache.fingerprint).is_dir()
    assert not list(checkpoint.parent.glob("*.tmp"))
    assert json.loads((checkpoint / STATE_FILE).read_text())["cache"]["folder"].startswith("..")  # relative

    fresh_cache = StaleEmbeddingCache.build(model, CORPUS, batch_size=8, show_progress_bar=False)
    restored = _mining(fresh_cache, "corrected+refresh:1", corrector_buffer=16)
    callback = NegativeMiningStateCallback(restored.miner, restored.trainer, restored.refresh)
    args, state = SimpleNamespace(output_dir=str(tmp_path / "run")), SimpleNamespace(global_step=2)
    callback.on_train_begin(args, state, SimpleNamespace(), model=model)
    again = _snapshot(restored)
    assert torch.equal(saved["cache"], again["cache"]) and saved["fingerprint"] == again["fingerprint"]
    assert all(torch.equal(saved["corrector"][k], again["corrector"][k]) for k in saved["corrector"])
    assert saved["optimizer"].keys() == again["optimizer"].keys() and saved["optimizer"]
    for key, fields in saved["optimizer"].items():
        assert all(torch.equal(value, again["optimizer"][key][field]) for field, value in fields.items())
    assert saved["state"] == again["state"] and saved["refresh"] == again["refresh"] and saved["step"] == again["step"]
    assert torch.equal(mining.trainer._buffer_fresh, restored.trainer._buffer_fresh)
    assert len(restored.trainer._buffer_rows) > 0

    # a real resume continues from there without re-embedding what was restored
    cache_again = StaleEmbeddingCache.build(model, CORPUS, show_progress_bar=False)
    restored_run = _mining(cache_again, "corrected+refresh:1", corrector_buffer=16)
    _train(model, restored_run, tmp_path / "run", max_steps=3, resume=str(tmp_path / "run" / "checkpoint-2"))
    assert restored_run.miner.statistics.counts["loss_documents"] == 3 * 4
    # only the refresh due at step 2
    assert restored_run.miner.statistics.num_refreshes == saved["state"]["num_refreshes"] + 1


def test_a_resumed_run_resumes_again_after_rotation_and_a_move(model, cache, tmp_path: Path) -> None:
    """A checkpoint written after a resume must not point into a checkpoint that rotation deletes."""
    _train(model, _mining(cache, "corrected"), tmp_path / "run", max_steps=2, save_steps=2)

    def again():
        return _mining(StaleEmbeddingCache.build(model, CORPUS, show_progress_bar=False), "corrected")

    resumed = again()
    _train(model, resumed, tmp_path / "run", max_steps=4, save_steps=2, resume=str(tmp_path / "run" / "checkpoint-2"))
    shutil.rmtree(tmp_path / "run" / "checkpoint-2")  # what rotation with save_total_limit=1 does
    (tmp_path / "run").rename(tmp_path / "moved")
    restored = again()
    callback = NegativeMiningStateCallback(restored.miner, restored.trainer)
    callback.on_train_begin(
        SimpleNamespace(output_dir=str(tmp_path / "moved")), SimpleNamespace(global_step=4), None, model=model
    )
    assert restored.miner.statistics.state_dict() == resumed.miner.statistics.state_dict()
    assert torch.equal(restored.miner.cache.embeddings, resumed.miner.cache.embeddings)


def test_unchanged_cache_is_saved_once_beside_the_checkpoints_not_copied_into_each(model, tmp_path: Path) -> None:
    cache = StaleEmbeddingCache.build(model, CORPUS, batch_size=8, show_progress_bar=False)
    mining = _mining(cache, "stale")
    first = save_negative_mining_state(tmp_path / "run" / "checkpoint-1" / CHECKPOINT_FOLDER, mining.miner)
    second = save_negative_mining_state(tmp_path / "run" / "checkpoint-2" / CHECKPOINT_FOLDER, mining.miner)
    assert (first / STATE_FILE).is_file() and not (first / "cache").exists() and not (second / "cache").exists()
    assert [p.name for p in (tmp_path / "run" / CACHE_FOLDER).iterdir()] == [cache.fingerprint]
    restored = _miner(StaleEmbeddingCache.build(model, CORPUS, show_progress_bar=False), "stale")
    load_negative_mining_state(second, restored)
    assert torch.equal(restored.cache.embeddings, cache.embeddings)


def test_a_cache_already_on_disk_is_referred_to_not_copied(model, tmp_path: Path) -> None:
    on_disk = StaleEmbeddingCache.build(model, CORPUS, batch_size=8, show_progress_bar=False, folder=tmp_path / "c")
    state = save_negative_mining_state(tmp_path / "run" / "checkpoint-1" / CHECKPOINT_FOLDER, _miner(on_disk, "stale"))
    assert not (tmp_path / "run" / CACHE_FOLDER).exists(), "nothing copied beside the checkpoints"
    restored = _miner(StaleEmbeddingCache.load(tmp_path / "c"), "stale")
    load_negative_mining_state(state, restored)
    assert restored.cache.folder == (tmp_path / "c").resolve()
    assert torch.equal(restored.cache.embeddings, on_disk.embeddings)


def test_mismatched_states_and_caches_are_refused(model, cache, tmp_path: Path) -> None:
    folder = save_negative_mining_state(tmp_path / "run" / "checkpoint-1" / CHECKPOINT_FOLDER, _miner(cache, "stale"))
    with pytest.raises(ValueError, match="saved with negatives 'stale'"):
        load_negative_mining_state(folder, _miner(cache, "corrected"))
    other = StaleEmbeddingCache.build(model, dict(list(CORPUS.items())[:5]), show_progress_bar=False)
    with pytest.raises(CacheMismatchError, match="size"):
        load_negative_mining_state(folder, _miner(other, "stale", query_positives={}, num_negatives=2))
    cache.save(tmp_path / "cache")
    with pytest.raises(CacheMismatchError, match="fingerprint"):
        StaleEmbeddingCache.load(tmp_path / "cache", expected_fingerprint="0" * 32)
    with pytest.raises(CacheMismatchError, match="dimension"):
        StaleEmbeddingCache.load(tmp_path / "cache", expected_dimension=cache.dimension + 1)
    with pytest.raises(CacheMismatchError, match="not in the corpus"):
        NegativeMiner(cache, {"d-cell": "x"}, "stale")


def test_truncated_state_files_are_named(model, cache, tmp_path: Path) -> None:
    mining = _mining(cache, "corrected")
    checkpoint = tmp_path / "run" / "checkpoint-1" / CHECKPOINT_FOLDER
    folder = save_negative_mining_state(checkpoint, mining.miner, mining.trainer)
    state_file = folder / STATE_FILE
    state_file.write_text(state_file.read_text()[:40])
    with pytest.raises(ValueError, match=re.escape(f"{state_file}: negative-mining state is corrupt or truncated")):
        load_negative_mining_state(folder, _mining(cache, "corrected").miner)
    embeddings = tmp_path / "run" / CACHE_FOLDER / cache.fingerprint / "embeddings.npy"
    embeddings.write_bytes(embeddings.read_bytes()[:100])
    with pytest.raises(CacheMismatchError, match=re.escape(f"{embeddings}: cache file is truncated or corrupt")):
        StaleEmbeddingCache.load(embeddings.parent)


# ---------------------------------------------------------------------- cache storage and indexes


def test_build_into_memmap_folder_matches_in_memory(model, cache, tmp_path: Path) -> None:
    mapped = StaleEmbeddingCache.build(
        model, CORPUS, batch_size=8, show_progress_bar=False, folder=tmp_path / "m", chunk_size=5
    )
    assert isinstance(np.load(tmp_path / "m" / "embeddings.npy", mmap_mode="r"), np.memmap)
    assert mapped.folder == tmp_path / "m" and mapped.fingerprint == route_fingerprint(model)
    assert torch.allclose(mapped.embeddings, cache.embeddings, atol=1e-6)
    half = StaleEmbeddingCache.build(model, CORPUS, dtype=torch.float16, show_progress_bar=False, folder=tmp_path / "h")
    assert half.embeddings.dtype == torch.float16 and half.float32().dtype == torch.float32
    assert StaleEmbeddingCache.load(tmp_path / "h", expected_size=len(CORPUS)).dimension == cache.dimension
    for kind in ("flat", "ivf", "hnsw"):
        index = mapped.build_index(kind, nlist=2)
        _, rows = index.search(cache.float32()[:2].numpy(), 1)
        assert rows[:, 0].tolist() == [0, 1]
    with pytest.raises(ValueError, match="unknown index kind"):
        mapped.build_index("lsh")


def test_query_side_and_two_step_modes_match_exact_corrected_search(cache, model) -> None:
    linear = CorrectorNetwork(cache.dimension, depth=1)
    torch.nn.init.normal_(linear.mlp[-1].weight, std=0.2)
    torch.nn.init.normal_(linear.mlp[-1].bias, std=0.2)
    query_side = _miner(cache, "corrected", num_negatives=3, corrector=linear, index="query-side")
    queries = torch.nn.functional.normalize(torch.randn(4, cache.dimension, generator=torch.Generator().manual_seed(0)))
    positives = torch.tensor([0, 1, 2, 3])
    rows = query_side.mine(queries, positives)
    # the ranking of q . h(e), unnormalised: the stale index searched with q + W^T q, never rebuilt
    with torch.no_grad():
        scores = queries @ linear(cache.float32()).T
    scores[:, positives] = -torch.inf
    assert torch.equal(rows, scores.topk(3, dim=1).indices)
    with pytest.raises(ValueError, match="linear corrector"):
        _miner(cache, "corrected", index="query-side")  # the default 2-layer corrector

    mlp = CorrectorNetwork(cache.dimension, hidden=16)
    torch.nn.init.normal_(mlp.mlp[-1].weight, std=0.3)
    two_step = _miner(cache, "corrected", num_negatives=3, corrector=mlp, index="two-step", shortlist=len(CORPUS))
    exact = _miner(cache, "corrected", num_negatives=3, corrector=mlp, index="exact")
    assert torch.equal(two_step.mine(queries, positives), exact.mine(queries, positives))


def test_corrected_matrix_in_chunks_into_a_float16_memmap(cache, tmp_path: Path) -> None:
    from st_daft.embeddings.index import build_faiss_index, corrected_matrix, exact_search

    corrector = CorrectorNetwork(cache.dimension, hidden=16)
    torch.nn.init.normal_(corrector.mlp[-1].weight, std=0.3)
    in_memory = corrected_matrix(cache.embeddings, corrector, chunk_size=5)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(corrector(cache.embeddings), dim=1)
    torch.testing.assert_close(in_memory, expected)
    mapped = corrected_matrix(cache.embeddings.half(), corrector, chunk_size=5, path=tmp_path / "corrected.npy")
    assert mapped.dtype == np.float16 and isinstance(np.load(tmp_path / "corrected.npy", mmap_mode="r"), np.memmap)
    np.testing.assert_allclose(mapped.astype(np.float32), expected.numpy(), atol=5e-3)
    scores, rows = exact_search(mapped, expected[:3], 2, chunk_size=4)
    assert rows[:, 0].tolist() == [0, 1, 2]
    for kind in ("flat", "ivf", "hnsw"):
        index = build_faiss_index(mapped, kind, nlist=2, storage="float16", chunk_size=5)
        assert index.ntotal == len(cache) and index.search(expected[:2].numpy(), 1)[1][:, 0].tolist() == [0, 1]
    import faiss

    half_flat = build_faiss_index(mapped, "flat", storage="float16")
    assert isinstance(half_flat, faiss.IndexScalarQuantizer), "float16 storage is honoured by a flat index too"
    exact_rows = exact_search(mapped, expected, 5)[1]
    assert np.array_equal(half_flat.search(expected.numpy(), 5)[1], exact_rows.numpy())


def test_index_streams_the_corrected_cache_and_reuses_trained_cells(cache) -> None:
    import faiss

    from st_daft.embeddings.index import build_faiss_index, corrected_matrix

    corrector = CorrectorNetwork(cache.dimension, hidden=16)
    torch.nn.init.normal_(corrector.mlp[-1].weight, std=0.3)
    expected = corrected_matrix(cache.embeddings, corrector)

    def transform(rows: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(corrector(rows), dim=1)

    streamed = build_faiss_index(cache.embeddings, "flat", transform=transform, chunk_size=3)
    np.testing.assert_allclose(streamed.reconstruct_n(0, len(cache)), expected.numpy(), atol=1e-6)
    stale_ivf = build_faiss_index(cache.embeddings, "ivf", nlist=2, nprobe=2, chunk_size=4)
    rebuilt = build_faiss_index(cache.embeddings, "ivf", transform=transform, like=stale_ivf, nprobe=2, chunk_size=4)
    # same cells as the stale index (no k-means), the corrected rows, and the stale index itself untouched
    cells = faiss.vector_to_array(faiss.downcast_index(rebuilt.quantizer).codes)
    assert np.array_equal(cells, faiss.vector_to_array(faiss.downcast_index(stale_ivf.quantizer).codes))
    assert rebuilt.ntotal == stale_ivf.ntotal == len(cache) and rebuilt.nprobe == 2
    assert rebuilt.search(expected[:3].numpy(), 1)[1][:, 0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="dimension"):
        build_faiss_index(torch.zeros(4, cache.dimension + 1), "ivf", like=stale_ivf)


def test_correcting_miner_with_an_index_matches_exact_mining(cache) -> None:
    corrector = CorrectorNetwork(cache.dimension, hidden=16)
    torch.nn.init.normal_(corrector.mlp[-1].weight, std=0.3)
    queries = torch.nn.functional.normalize(torch.randn(4, cache.dimension, generator=torch.Generator().manual_seed(0)))
    positives = torch.tensor([0, 1, 2, 3])
    flat = _miner(cache, "corrected", num_negatives=3, corrector=corrector, index="flat")
    exact = _miner(cache, "corrected", num_negatives=3, corrector=corrector, index="exact")
    assert torch.equal(flat.mine(queries, positives), exact.mine(queries, positives))
    assert flat._matrix is None  # the corrected cache streamed into the index, no copy kept


def test_a_float16_cache_gets_a_float16_index_unless_asked_otherwise(cache) -> None:
    import faiss

    half = StaleEmbeddingCache(cache.ids, cache.embeddings.half(), cache.keys, cache.fingerprint)
    queries = torch.nn.functional.normalize(torch.randn(4, cache.dimension, generator=torch.Generator().manual_seed(0)))
    positives = torch.tensor([0, 1, 2, 3])
    exact = _miner(half, "stale", num_negatives=3, index="exact").mine(queries, positives)
    for cached, options, index_type in [
        (half, {}, faiss.IndexScalarQuantizer),
        (half, {"storage": "float32"}, faiss.IndexFlatIP),
        (cache, {}, faiss.IndexFlatIP),
    ]:
        miner = _miner(cached, "stale", num_negatives=3, index="flat", index_options=options)
        rows = miner.mine(queries, positives)
        assert isinstance(miner._index, index_type), (cached.embeddings.dtype, options)
        if cached is half:
            assert torch.equal(rows, exact), "the same negatives as exact scores over the float16 cache"
    ivf = _miner(half, "stale", num_negatives=3, index="ivf", index_options={"nlist": 2, "nprobe": 2})
    ivf.mine(queries, positives)
    assert isinstance(ivf._index, faiss.IndexIVFScalarQuantizer)
    assert isinstance(half.build_index("hnsw"), faiss.IndexHNSWSQ), "the cache's own build_index: the same rule"
    assert isinstance(cache.build_index(), faiss.IndexFlatIP)


def test_refresh_follows_the_route(model, cache) -> None:
    get_route(model, DOCUMENT_ROUTE)[0].auto_model.embeddings.word_embeddings.weight.data.mul_(1.5)
    assert not cache.is_current(model)
    cache.refresh(model, [CORPUS[i] for i in cache.ids])
    assert cache.is_current(model) and cache.folder is None
    with pytest.raises(CacheMismatchError, match="texts"):
        cache.refresh(model, ["only one"])


def test_a_cache_on_disk_is_refreshed_on_disk(model, tmp_path: Path) -> None:
    """refresh:N over a memory-mapped cache writes the re-embedded corpus into a new cache folder and maps it (no
    copy of the corpus in memory); a cache it replaced stays while a checkpoint refers to it, then is pruned."""
    built = tmp_path / "corpus-cache"
    cache = StaleEmbeddingCache.build(model, CORPUS, dtype=torch.float16, folder=built, show_progress_bar=False)
    mining = _mining(cache, "corrected+refresh:2")
    run = tmp_path / "run"
    _train(model, mining, run, max_steps=5, save_steps=1)  # refreshed before steps 3 and 5
    miner = mining.miner
    assert miner.statistics.num_refreshes == 2 and miner.cache.embeddings.dtype == torch.float16

    def referred(step: int) -> str:
        return json.loads((run / f"checkpoint-{step}" / CHECKPOINT_FOLDER / STATE_FILE).read_text())["cache"]

    assert referred(2)["folder"].endswith("corpus-cache"), "saved before the first refresh: the built cache"
    second_refresh = referred(5)["fingerprint"]
    assert miner.cache.folder == run / CACHE_FOLDER / second_refresh
    assert isinstance(np.load(miner.cache.folder / "embeddings.npy", mmap_mode="r"), np.memmap)
    # the refresh before step 5 re-embedded with the weights step 4 left, i.e. checkpoint-4's model
    at_step_4 = SentenceTransformer(str(run / "checkpoint-4"))
    expected = at_step_4.encode_document([CORPUS[i] for i in miner.cache.ids], convert_to_tensor=True)
    torch.testing.assert_close(miner.cache.embeddings.float(), expected, atol=2e-3, rtol=2e-3)
    assert cache_is_current(at_step_4, second_refresh)

    first_refresh = referred(3)["fingerprint"]
    assert (run / CACHE_FOLDER / first_refresh).is_dir() and (built / "cache_metadata.json").is_file()
    for step in (1, 2, 3, 4):  # as checkpoint rotation would
        shutil.rmtree(run / f"checkpoint-{step}")
    prune_caches(run, keep=miner.cache.fingerprint)
    assert {folder.name for folder in (run / CACHE_FOLDER).iterdir()} == {second_refresh}
    assert (built / "cache_metadata.json").is_file(), "the cache the run was given is never pruned"


# ---------------------------------------------------------------------- recipe and CLI


def test_recipe_finetunes_with_corrected_negatives(tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path):
    from st_daft import AlignStage, DAFTConfig, FinetuneStage, load_beir, train_daft

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    budget = {"max_steps": 2, "batch_size": 4, "eval_steps": 2, "warmup_ratio": 0.0, "logging_steps": 1}
    config = DAFTConfig(
        stages=[
            AlignStage(**budget),
            FinetuneStage(**budget, learning_rate=1e-3, negatives="corrected", num_negatives=2),
        ],
        validation_fraction=0.2,
        num_validation_texts=16,
    )
    summary = train_daft(model, load_beir(tiny_beir_dir, "train"), tmp_path / "run", config)
    logged = [row for row in summary.stages[1].log_history if "loss" in row]
    assert logged and logged[-1]["mining_encoded_negatives"] > 0 and "mining_corrected_error" in logged[-1]
    assert (tmp_path / "run" / "stage-2-finetune" / "checkpoint-2" / CHECKPOINT_FOLDER / STATE_FILE).is_file()
    SentenceTransformer(str(tmp_path / "run"), device="cpu")  # a plain model: no corrector inside


def test_malformed_strategy_is_refused_by_config_and_cli(capsys) -> None:
    from st_daft import FinetuneStage
    from st_daft.cli import main

    with pytest.raises(ValueError, match="unknown negatives strategy"):
        FinetuneStage(negatives="refresh:often")
    with pytest.raises(SystemExit):
        main(["train", "--data", "x", "--output", "y", "--negatives", "corrected+refresh"])
    assert "unknown negatives strategy" in capsys.readouterr().err


@pytest.mark.parametrize(
    "index, options",
    [("ivf", {"nlist": 2, "nprobe": 2, "storage": "float16"}), ("query-side", {}), ("two-step", {"shortlist": 6})],
)
def test_recipe_mines_through_the_index_it_is_given(
    index: str, options: dict, tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path, monkeypatch
) -> None:
    from st_daft import AlignStage, DAFTConfig, FinetuneStage, load_beir, train_daft
    from st_daft.embeddings import cache as cache_module

    built: list[tuple[str, dict]] = []
    real_build = cache_module.build_faiss_index

    def recording(embeddings, kind="flat", **kwargs):
        built.append((kind, {key: kwargs[key] for key in ("nlist", "nprobe", "storage") if key in kwargs}))
        return real_build(embeddings, kind, **kwargs)

    monkeypatch.setattr(cache_module, "build_faiss_index", recording)  # the miner builds through the cache
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    budget = {"max_steps": 2, "batch_size": 4, "eval_steps": 2, "warmup_ratio": 0.0, "logging_steps": 1}
    finetune = FinetuneStage(  # the MLP corrector of mse, so that query-side's linear one shows
        **budget,
        negatives="corrected",
        num_negatives=2,
        mining_index=index,
        mining_index_options=options,
        corrector_loss="mse",
    )
    config = DAFTConfig(stages=[AlignStage(**budget), finetune], validation_fraction=0.2, num_validation_texts=16)
    summary = train_daft(model, load_beir(tiny_beir_dir, "train"), tmp_path / "run", config)
    logged = [row for row in summary.stages[1].log_history if "loss" in row]
    assert logged and logged[-1]["mining_encoded_negatives"] > 0
    # The index asked for: IVF with its options over the corrected cache; a stale flat index for the query-side modes.
    index_options = {key: value for key, value in options.items() if key != "shortlist"}
    expected = ("ivf", index_options) if index == "ivf" else ("flat", {"storage": "float32"})  # a float32 cache
    assert built and all(call == expected for call in built)
    corrector = tmp_path / "run" / "stage-2-finetune" / "checkpoint-2" / CHECKPOINT_FOLDER / "corrector"
    depth = json.loads((corrector / "corrector_config.json").read_text())["depth"]
    assert depth == (1 if index == "query-side" else 2), "query-side: a linear corrector"


def test_mining_index_settings_are_refused_before_training(capsys) -> None:
    from st_daft import FinetuneStage
    from st_daft.cli import main

    with pytest.raises(ValueError, match="unknown mining_index .*'ivfpq'"):
        FinetuneStage(negatives="corrected", mining_index="ivfpq")
    with pytest.raises(ValueError, match="nlist=0.*positive integer"):
        FinetuneStage(negatives="corrected", mining_index="ivf", mining_index_options={"nlist": 0})
    with pytest.raises(ValueError, match="storage='int4'.*float32"):
        FinetuneStage(negatives="corrected", mining_index="ivf", mining_index_options={"storage": "int4"})
    with pytest.raises(ValueError, match="apply to mined negatives, not to --negatives in-batch"):
        FinetuneStage(mining_index="ivf")
    for option in ("nprob=3", "nlist", "base=ivfpq"):
        with pytest.raises(SystemExit):
            main(["train", "--data", "x", "--output", "y", "--mining-index-option", option])
        assert "argument --mining-index-option" in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["kl", "ridge"])
def test_recipe_trains_the_corrector_with_the_objective_it_is_given(
    objective: str, tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path
) -> None:
    from st_daft import AlignStage, DAFTConfig, FinetuneStage, load_beir, train_daft

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    budget = {"max_steps": 2, "batch_size": 4, "eval_steps": 2, "warmup_ratio": 0.0, "logging_steps": 1}
    finetune = FinetuneStage(
        **budget, negatives="corrected", num_negatives=2, corrector_loss=objective, corrector_warmup=1
    )
    config = DAFTConfig(stages=[AlignStage(**budget), finetune], validation_fraction=0.2, num_validation_texts=16)
    summary = train_daft(model, load_beir(tiny_beir_dir, "train"), tmp_path / "run", config)
    logged = [row for row in summary.stages[1].log_history if "loss" in row]
    assert logged and "mining_corrected_error" in logged[-1]
    corrector = tmp_path / "run" / "stage-2-finetune" / "checkpoint-2" / CHECKPOINT_FOLDER / "corrector"
    depth = json.loads((corrector / "corrector_config.json").read_text())["depth"]
    assert depth == (1 if objective == "ridge" else 2), "ridge: a linear corrector"
    queries = torch.load(corrector / "corrector_trainer.pt", weights_only=True)["queries"]
    assert (len(queries) > 0) == (objective == "kl"), "the KL objective records the step's queries"


def test_corrector_settings_are_refused_by_name() -> None:
    from st_daft import FinetuneStage

    with pytest.raises(ValueError, match=r"unknown corrector_loss \(--corrector-loss\) 'kl-div'"):
        FinetuneStage(negatives="corrected", corrector_loss="kl-div")
    with pytest.raises(ValueError, match=r"corrector_warmup \(--corrector-warmup\) must be >= 0"):
        FinetuneStage(negatives="corrected", corrector_warmup=-1)
    with pytest.raises(ValueError, match=r"corrector_steps \(--corrector-steps\) must be >= 1"):
        FinetuneStage(negatives="corrected", corrector_steps=0)
    with pytest.raises(ValueError, match=r"'ridge' fits its map on the replay buffer: corrector_buffer"):
        FinetuneStage(negatives="corrected", corrector_buffer=0)
    assert FinetuneStage(negatives="corrected", corrector_loss="mse", corrector_buffer=0).corrector_buffer == 0
