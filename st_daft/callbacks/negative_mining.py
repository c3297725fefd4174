"""Trainer callbacks that drive negative mining from a corrected stale cache, each holding one job.

- :class:`MiningStepCallback`: at the end of each optimiser step, updates the corrector on the step's observations
  and closes the step's statistics.
- :class:`CorpusRefreshCallback`: re-embeds the corpus when a ``refresh:N`` strategy is due (the corrector restarts
  from the identity); a cache on disk is re-embedded into ``negative_mining_cache/{fingerprint}``, not into memory.
- :class:`NegativeMiningStateCallback`: refuses a cache from another encoder when a run starts, restores the miner,
  corrector and cache when it resumes (nothing re-embedded), and saves them with every checkpoint.

Checkpoint layout (everything relative to the run folder, so a run can be moved and resumed again)::

    {output_dir}/negative_mining_cache/{fingerprint}/   the cache, once per state of the document route
    {output_dir}/checkpoint-N/negative_mining/          small per-checkpoint state, written atomically:
        miner_state.json                              statistics, refresh step, which cache (relative path)
        corrector/                                    weights, optimizer state, replay buffer

Rotation deletes checkpoints, never ``negative_mining_cache``; caches no remaining checkpoint refers to are pruned.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sentence_transformers import SentenceTransformer
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from st_daft.embeddings.cache import METADATA_FILE, CacheMismatchError, StaleEmbeddingCache
from st_daft.losses.mined_negatives import MinedNegativesLoss
from st_daft.models.fingerprint import encoding_fingerprint
from st_daft.negatives.corrector import CorrectorNetwork, CorrectorTrainer
from st_daft.negatives.miner import NegativeMiner
from st_daft.negatives.strategy import RefreshPolicy, parse_negatives
from st_daft.utils.distributed import broadcast_parameters
from st_daft.utils.io import atomic_folder, atomic_write_json, read_json

logger = logging.getLogger(__name__)

__all__ = [
    "MiningStepCallback",
    "CorpusRefreshCallback",
    "NegativeMiningStateCallback",
    "negative_mining_callbacks",
    "save_negative_mining_state",
    "load_negative_mining_state",
    "CHECKPOINT_FOLDER",
    "CACHE_FOLDER",
    "STATE_FILE",
]

CHECKPOINT_FOLDER = "negative_mining"
CACHE_FOLDER = "negative_mining_cache"
STATE_FILE = "miner_state.json"
STATE_FORMAT_VERSION = 2


class MiningStepCallback(TrainerCallback):
    """Closes each optimiser step of negative mining: a corrector update on the fresh embeddings the step observed
    (skipped while the cache is exact), then the step's statistics (errors, positive rank, corrector loss, time)."""

    def __init__(self, miner: NegativeMiner, corrector_trainer: CorrectorTrainer | None = None) -> None:
        self.miner = miner
        self.corrector_trainer = corrector_trainer
        self._step_started: float | None = None

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self._step_started = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        statistics = self.miner.statistics
        if self.corrector_trainer is not None:
            started = time.perf_counter()
            if self.miner.correcting:
                loss = self.corrector_trainer.step(self.miner.cache)
                if loss is not None:
                    statistics.add("corrector_loss", loss)
            else:
                self.corrector_trainer.discard()
            statistics.time("corrector", time.perf_counter() - started)
        seconds = time.perf_counter() - self._step_started if self._step_started is not None else 0.0
        statistics.end_step(state.global_step, seconds)
        self.miner.step = state.global_step
        self._step_started = None


class CorpusRefreshCallback(TrainerCallback):
    """Re-embeds the corpus with the current document route when ``refresh`` is due (``refresh:N``), before the
    step; the corrector then restarts from the identity, since the fresh cache has no drift yet."""

    def __init__(
        self, miner: NegativeMiner, refresh: RefreshPolicy, corrector_trainer: CorrectorTrainer | None = None
    ) -> None:
        self.miner = miner
        self.refresh = refresh
        self.corrector_trainer = corrector_trainer

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if model is None or not self.refresh.due(state.global_step):
            return
        folder = None
        if self.miner.cache.folder is not None:
            # A cache on disk is refreshed on disk (a corpus larger than memory stays out of it), beside the caches
            # checkpoints refer to: the one it replaces stays until no checkpoint needs it (prune_caches).
            folder = Path(args.output_dir) / CACHE_FOLDER / encoding_fingerprint(model)
        self.miner.refresh(model, folder=folder)
        self.refresh.last_step = state.global_step
        if self.corrector_trainer is not None:
            self.corrector_trainer.reset()
        elif self.miner.corrector is not None:
            self.miner.corrector.reset_parameters()


class NegativeMiningStateCallback(TrainerCallback):
    """The miner's state across a run.

    - ``on_train_begin``: on a fresh start, refuses a cache another document encoder built; on a resume, restores
      cache, corrector, its optimizer and buffer, refresh step and statistics from
      ``{output_dir}/checkpoint-{step}/negative_mining`` (nothing is re-embedded); then checks whether the cache is
      exact (frozen document route with the cache's fingerprint: then nothing is corrected).
    - ``on_save``: writes that state into the checkpoint (main process only), see :func:`save_negative_mining_state`.
    """

    def __init__(
        self,
        miner: NegativeMiner,
        corrector_trainer: CorrectorTrainer | None = None,
        refresh: RefreshPolicy | None = None,
    ) -> None:
        self.miner = miner
        self.corrector_trainer = corrector_trainer
        self.refresh = refresh

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if self.miner.cache is None:
            return
        if state.global_step > 0:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_FOLDER
            if (folder / STATE_FILE).is_file():
                load_negative_mining_state(folder, self.miner, self.corrector_trainer, self.refresh)
                logger.info("negative miner restored from %s (no re-embedding)", folder)
            else:
                logger.warning(
                    "resuming at step %d without a saved miner state: the cache may be stale", state.global_step
                )
        elif model is not None:
            self.miner.check_cache(model)
        if model is not None:
            self.miner.check_exact(model)
        if self.miner.corrector is not None:
            broadcast_parameters(self.miner.corrector)  # every process starts from process 0's corrector

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if not getattr(state, "is_world_process_zero", True) or self.miner.cache is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_FOLDER
        save_negative_mining_state(folder, self.miner, self.corrector_trainer, self.refresh)
        prune_caches(Path(args.output_dir), keep=self.miner.cache.fingerprint)


def negative_mining_callbacks(
    miner: NegativeMiner, corrector_trainer: CorrectorTrainer | None = None, refresh: RefreshPolicy | None = None
) -> list[TrainerCallback]:
    """The callbacks a mining run needs, in the order they must run (state, refresh, step)."""
    callbacks: list[TrainerCallback] = [NegativeMiningStateCallback(miner, corrector_trainer, refresh)]
    if refresh is not None and refresh.every:
        callbacks.append(CorpusRefreshCallback(miner, refresh, corrector_trainer))
    callbacks.append(MiningStepCallback(miner, corrector_trainer))
    return callbacks


def save_negative_mining_state(
    folder: str | os.PathLike,
    miner: NegativeMiner,
    corrector_trainer: CorrectorTrainer | None = None,
    refresh: RefreshPolicy | None = None,
    cache_root: str | os.PathLike | None = None,
) -> Path:
    """Write the miner's state into ``folder`` (atomically, as a whole) and its cache into
    ``cache_root/{fingerprint}`` (default ``folder/../../negative_mining_cache``, beside the checkpoints) unless
    that cache is already there, or is a cache saved on disk as it is (``--cache-on-disk``): then that folder is
    referred to and nothing is copied. ``folder`` refers to the cache by a relative path."""
    folder = Path(folder)
    cache = miner.cache
    if cache.folder is not None and (cache.folder / METADATA_FILE).is_file():
        cache_folder = cache.folder  # already on disk as it is (a memory-mapped cache): referred to, not copied
    else:
        cache_root = Path(cache_root) if cache_root is not None else folder.parent.parent / CACHE_FOLDER
        cache_folder = cache_root / cache.fingerprint
        if not (cache_folder / METADATA_FILE).is_file():
            with atomic_folder(cache_folder) as temporary:
                cache.save(temporary)
    state = {
        "format_version": STATE_FORMAT_VERSION,
        "strategy": miner.strategy.spec,
        "num_negatives": miner.num_negatives,
        "step": miner.step,
        "cache": {
            "folder": os.path.relpath(cache_folder, folder),
            "fingerprint": cache.fingerprint,
            "size": len(cache),
            "dimension": cache.dimension,
        },
        "statistics": miner.statistics.state_dict(),
        "refresh": refresh.state_dict() if refresh is not None else None,
    }
    with atomic_folder(folder) as temporary:
        if corrector_trainer is not None:
            corrector_trainer.save(temporary / "corrector")
        elif miner.corrector is not None:
            miner.corrector.save(temporary / "corrector")
        atomic_write_json(temporary / STATE_FILE, state)
    return folder


def load_negative_mining_state(
    folder: str | os.PathLike,
    miner: NegativeMiner,
    corrector_trainer: CorrectorTrainer | None = None,
    refresh: RefreshPolicy | None = None,
) -> None:
    """Restore what :func:`save_negative_mining_state` wrote, refusing a state of another strategy or corpus and
    naming the file that is missing, truncated or corrupt."""
    folder = Path(folder)
    state = read_json(folder / STATE_FILE, "negative-mining state")
    if state.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(f"{folder / STATE_FILE}: state format {state.get('format_version')}, expected 2")
    if state["strategy"] != miner.strategy.spec:
        raise ValueError(f"{folder}: saved with negatives {state['strategy']!r}, this run uses {miner.strategy.spec!r}")
    reference = state["cache"]
    cache_folder = (folder / reference["folder"]).resolve()
    if not cache_folder.is_dir():
        raise CacheMismatchError(f"{folder / STATE_FILE}: its cache {cache_folder} is missing")
    cache = StaleEmbeddingCache.load(
        cache_folder,
        expected_fingerprint=reference["fingerprint"],
        expected_dimension=miner.cache.dimension,
        expected_size=len(miner.cache),
        mmap=True,
    )
    if cache.ids != miner.cache.ids:
        raise CacheMismatchError(f"{cache_folder}: the saved cache holds other documents than this run's corpus")
    miner.cache = cache
    if miner.corrector is not None:
        if corrector_trainer is not None:
            corrector_trainer.load(folder / "corrector")
        else:
            miner.corrector.load_into(folder / "corrector")
    miner.statistics.load_state_dict(state["statistics"])
    miner.step = int(state["step"])
    if refresh is not None and state.get("refresh"):
        refresh.load_state_dict(state["refresh"])


def prune_caches(output_dir: Path, keep: str) -> None:
    """Delete the run's saved caches that no remaining checkpoint refers to (rotation removed their checkpoints)."""
    root = output_dir / CACHE_FOLDER
    if not root.is_dir():
        return
    referenced = {keep}
    for state_file in output_dir.glob(f"checkpoint-*/{CHECKPOINT_FOLDER}/{STATE_FILE}"):
        try:
            referenced.add(read_json(state_file)["cache"]["fingerprint"])
        except (ValueError, KeyError, TypeError):
            return  # an unreadable state: keep every cache rather than risk deleting the one it needs
    for cache_folder in root.iterdir():
        if cache_folder.is_dir() and cache_folder.name not in referenced:
            shutil.rmtree(cache_folder, ignore_errors=True)


def build_negative_mining(
    model: SentenceTransformer,
    loss: nn.Module,
    cache: StaleEmbeddingCache | None,
    corpus: Mapping[str, str],
    strategy: str = "corrected",
    num_negatives: int = 4,
    query_positives: Mapping[str, Iterable[str]] | None = None,
    margin: float | None = None,
    corrector: CorrectorNetwork | None = None,
    corrector_lr: float = 1e-3,
    corrector_steps: int = 1,
    corrector_buffer: int = 0,
    drift_loss: str = "mse",
    corrector_loss: str | None = None,
    corrector_warmup: int = 0,
    index: str | None = None,
    index_options: dict[str, Any] | None = None,
    shortlist: int = 256,
    encode_batch_size: int = 64,
) -> tuple[nn.Module, list[Any]]:
    """``loss`` with negatives mined by ``strategy`` (see :func:`~st_daft.negatives.strategy.parse_negatives`), and the
    trainer
    callbacks that drive the mining. ``"in-batch"`` returns ``loss`` unchanged and no callbacks.

    The loss's statistics (wrapped and ``mining_*``) reach the trainer's logs through
    :class:`~st_daft.callbacks.LogStatisticsCallback` (or any callback that pops the loss's statistics).
    """
    parsed = parse_negatives(strategy)
    if not parsed.mine:
        return loss, []
    miner = NegativeMiner(
        cache,
        corpus,
        parsed,
        num_negatives=num_negatives,
        query_positives=query_positives,
        margin=margin,
        corrector=corrector,
        index=index,
        index_options=index_options,
        shortlist=shortlist,
        encode_batch_size=encode_batch_size,
    )
    trainer = None
    if miner.corrector is not None:
        trainer = CorrectorTrainer(
            miner.corrector,
            lr=corrector_lr,
            steps=corrector_steps,
            buffer=corrector_buffer,
            drift_loss=drift_loss,
            loss=corrector_loss,
            warmup=corrector_warmup,
        )
        miner.query_observer = trainer.observe_queries
    refresh = RefreshPolicy(parsed.refresh_every) if parsed.refresh_every else None
    mined = MinedNegativesLoss(model, loss, miner, trainer)
    return mined, negative_mining_callbacks(miner, trainer, refresh)
