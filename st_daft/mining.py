"""In-training hard-negative mining from a stale embedding cache, optionally corrected by a corrector network.

Three pieces, composed around sentence-transformers' trainer:

- :class:`NegativeMiner` owns the :class:`~st_daft.cache.StaleEmbeddingCache`, the corpus texts, the optional
  :class:`~st_daft.corrector.CorrectorNetwork` with its own optimizer, and the accounting. Given a batch's detached
  query embeddings and its positives' cache rows it scores the queries against ``h(cache)`` (an exact matmul for
  small corpora, a faiss index over the corrected matrix rebuilt every ``index_refresh_every`` steps for large ones),
  takes the top ``num_negatives`` rows that are no known positive of the query (nor any positive of the batch, since
  the softmax shares every column), optionally drops candidates within ``margin`` of the positive's score, and
  encodes just those documents fresh with the current document route.
- :class:`MinedNegativesLoss`, a :class:`~st_daft.losses.CollapseSafeContrastiveLoss` (same InfoNCE through
  ``MultipleNegativesRankingLoss.compute_loss_from_embeddings``, same collapse guard) that appends the mined negatives
  as extra document columns and hands the fresh embeddings of every document it encoded (positives and negatives)
  to the miner.
- :class:`NegativeMiningCallback`, a ``transformers.TrainerCallback`` that trains the corrector on those fresh
  embeddings at the end of each optimiser step (drift loss between ``h(stale[rows])`` and the detached fresh
  embeddings), re-embeds the corpus every N steps for the ``refresh:N`` strategies, merges the accounting into the
  trainer's logs, and saves/restores cache, corrector and corrector optimizer in every checkpoint.

Strategies (:func:`parse_negatives`): ``in-batch`` (no mining), ``stale`` (cache, no correction), ``corrected``
(Monath et al. 2024), ``refresh:N`` (re-embed the corpus every N steps, ANCE-style) and ``corrected+refresh:N``.

While the document route is frozen and the cache's fingerprint matches it, the cache is exact: the miner then scores
the raw cache and neither trains nor applies the corrector.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.util import batch_to_device
from torch import Tensor
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from st_daft.cache import CacheMismatchError, StaleEmbeddingCache, token_keys
from st_daft.corrector import CORRECTOR_CITATION, CorrectorNetwork, atomic_write_text, drift_loss, staleness_error
from st_daft.distributed import all_reduce_gradients, broadcast_parameters
from st_daft.losses.collapse_safe import CollapseSafeContrastiveLoss
from st_daft.model import DOCUMENT_ROUTE, QUERY_ROUTE, get_route

logger = logging.getLogger(__name__)

__all__ = [
    "NegativeStrategy",
    "parse_negatives",
    "NegativeMiner",
    "MinedNegativesLoss",
    "NegativeMiningCallback",
    "NEGATIVE_STRATEGIES",
]

NEGATIVE_STRATEGIES = ("in-batch", "stale", "corrected", "refresh:N", "corrected+refresh:N")
CHECKPOINT_FOLDER = "negative_mining"
STATE_FILE = "miner_state.json"
CACHE_REFERENCE_FILE = "cache_reference.json"
_REFRESH = re.compile(r"^(corrected\+)?refresh:(\d+)$")


@dataclass(frozen=True)
class NegativeStrategy:
    """A parsed negatives strategy: whether to mine, whether to correct, how often to re-embed the corpus."""

    spec: str
    mine: bool
    correct: bool
    refresh_every: int | None = None


def parse_negatives(spec: str | NegativeStrategy) -> NegativeStrategy:
    """Parse ``in-batch | stale | corrected | refresh:N | corrected+refresh:N`` (N: steps between re-embeddings)."""
    if isinstance(spec, NegativeStrategy):
        return spec
    text = str(spec).strip().lower()
    if text == "in-batch":
        return NegativeStrategy(text, mine=False, correct=False)
    if text == "stale":
        return NegativeStrategy(text, mine=True, correct=False)
    if text == "corrected":
        return NegativeStrategy(text, mine=True, correct=True)
    match = _REFRESH.match(text)
    if match and int(match.group(2)) >= 1:
        return NegativeStrategy(text, mine=True, correct=bool(match.group(1)), refresh_every=int(match.group(2)))
    raise ValueError(
        f"unknown negatives strategy {spec!r}: expected one of {', '.join(NEGATIVE_STRATEGIES)} "
        "(N: a positive number of steps between full re-embeddings of the corpus, e.g. refresh:100)"
    )


class NegativeMiner:
    """Mines hard negatives from a (corrected) stale cache and keeps the corrector and the accounting.

    Args:
        cache: embeddings of the corpus from the document route; may be None for ``"in-batch"`` (counting only).
        corpus: document id -> text, for every id of the cache (the texts encoded fresh and re-embedded).
        strategy: see :func:`parse_negatives`.
        num_negatives: mined negatives per query (fewer when a query has fewer admissible candidates).
        query_positives: query text -> ids of its relevant documents, all kept out of that query's negatives
            (the batch's own positives are always kept out).
        margin: also drop candidates whose score is above ``positive score - margin`` (likely false negatives).
        corrector: the corrector network; default a :class:`CorrectorNetwork` of ``corrector_depth`` layers of
            width ``corrector_hidden`` for the correcting strategies.
        corrector_lr: learning rate of the corrector's own Adam optimizer.
        corrector_steps: optimizer steps on each training step's fresh embeddings.
        corrector_buffer: also train on up to this many of the most recent earlier observations (0: only the
            current step's), a replay buffer that steadies the corrector when steps encode few documents.
        drift_loss: ``"mse"`` or ``"cosine"`` (see :func:`~st_daft.corrector.drift_loss`).
        index: ``None`` (exact matmul up to ``exact_limit`` rows, else ``"flat"``), ``"exact"``, or a faiss index
            kind: ``"flat"`` (``IndexFlatIP``), ``"ivf"`` or ``"hnsw"``; a faiss index is built over the (corrected)
            matrix and rebuilt every ``index_refresh_every`` steps.
        index_options: options of :func:`~st_daft.cache.build_faiss_index` (``nlist``, ``nprobe``, ``hnsw_m`` ...).
        encode_batch_size: batch size of full-corpus re-embeddings (``refresh:N``).
    """

    def __init__(
        self,
        cache: StaleEmbeddingCache | None,
        corpus: Mapping[str, str] | None = None,
        strategy: str | NegativeStrategy = "corrected",
        num_negatives: int = 4,
        query_positives: Mapping[str, Iterable[str]] | None = None,
        margin: float | None = None,
        corrector: CorrectorNetwork | None = None,
        corrector_hidden: int | None = None,
        corrector_depth: int = 2,
        corrector_lr: float = 1e-3,
        corrector_steps: int = 1,
        corrector_buffer: int = 0,
        drift_loss: str = "mse",
        index: str | None = None,
        exact_limit: int = 100_000,
        index_refresh_every: int = 50,
        index_options: dict[str, Any] | None = None,
        encode_batch_size: int = 64,
    ) -> None:
        self.strategy = parse_negatives(strategy)
        if self.strategy.mine and (cache is None or corpus is None):
            raise ValueError(f"negatives strategy {self.strategy.spec!r} needs a cache and the corpus texts")
        if num_negatives < 1 and self.strategy.mine:
            raise ValueError(f"num_negatives must be at least 1, got {num_negatives}")
        if drift_loss not in ("mse", "cosine"):
            raise ValueError(f"unknown drift loss {drift_loss!r}: choose 'mse' or 'cosine'")
        if index not in (None, "exact", "flat", "ivf", "hnsw"):
            raise ValueError(f"unknown index {index!r}: choose None, 'exact', 'flat', 'ivf' or 'hnsw'")
        self.cache = cache
        self.num_negatives = num_negatives
        self.margin = margin
        self.drift_loss = drift_loss
        self.corrector_steps = corrector_steps
        self.corrector_buffer = corrector_buffer
        self._buffer_rows = torch.zeros(0, dtype=torch.long)
        self._buffer_fresh = torch.zeros(0, cache.dimension if cache is not None else 0)
        self.index_kind = index or ("exact" if cache is None or len(cache) <= exact_limit else "flat")
        self.index_refresh_every = max(1, index_refresh_every)
        self.index_options = dict(index_options or {})
        self.encode_batch_size = encode_batch_size
        self.texts: list[str] = []
        if cache is not None and corpus is not None:
            missing = [doc_id for doc_id in cache.ids if doc_id not in corpus]
            if missing:
                raise CacheMismatchError(f"{len(missing)} cache ids are not in the corpus, e.g. {missing[:3]}")
            self.texts = [corpus[doc_id] for doc_id in cache.ids]
        self.query_positives = {query: list(ids) for query, ids in (query_positives or {}).items()}
        self._rows_of_query_key: dict[bytes, set[int]] = {}

        self.corrector: CorrectorNetwork | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.corrector_lr = corrector_lr
        if self.strategy.correct:
            self.corrector = corrector or CorrectorNetwork(
                cache.dimension, hidden=corrector_hidden, depth=corrector_depth
            )
            if self.corrector.dimension != cache.dimension:
                raise ValueError(f"corrector dimension {self.corrector.dimension} != cache dimension {cache.dimension}")
            self.optimizer = torch.optim.Adam(self.corrector.parameters(), lr=corrector_lr)

        self.exact = False  # the cache equals the current document route (frozen route, same fingerprint)
        self.counts = {"loss_documents": 0, "negatives": 0, "refresh": 0}
        self.seconds = {"mining": 0.0, "negative_encoding": 0.0, "corrector": 0.0, "refresh": 0.0, "steps": 0.0}
        self.num_refreshes = 0
        self.last_refresh_step = 0
        self.history: list[dict[str, float]] = []
        self._pending_rows: list[Tensor] = []
        self._pending_fresh: list[Tensor] = []
        self._step_sums: dict[str, float] = {}
        self._step_counts: dict[str, int] = {}
        self._log_sums: dict[str, float] = {}
        self._log_counts: dict[str, int] = {}
        self._log_seconds = {"mining": 0.0, "steps": 0.0}
        self._matrix: Tensor | None = None
        self._matrix_version = -1
        self._corrector_version = 0
        self._index: Any = None
        self._index_step = -1
        self._step = 0

    # ------------------------------------------------------------------ setup

    def bind(self, model: SentenceTransformer) -> None:
        """Map the token keys of the known queries to their positives' cache rows (needs the model's tokenizer)."""
        if self.cache is None or not self.query_positives:
            return
        queries = list(self.query_positives)
        task = QUERY_ROUTE if _has_route(model, QUERY_ROUTE) else None
        self._rows_of_query_key = {}
        for start in range(0, len(queries), 1024):
            chunk = queries[start : start + 1024]
            features = model.preprocess(chunk, task=task) if task else model.preprocess(chunk)
            for query, key in zip(chunk, token_keys(features)):
                rows = {
                    self.cache.row_of_id[doc_id]
                    for doc_id in self.query_positives[query]
                    if doc_id in self.cache.row_of_id
                }
                self._rows_of_query_key.setdefault(key, set()).update(rows)

    def check_exact(self, model: SentenceTransformer) -> bool:
        """Whether the cache is exact for ``model``: the document route is frozen and has the cache's fingerprint."""
        if self.cache is None:
            self.exact = False
            return False
        module = get_route(model, DOCUMENT_ROUTE) if _has_route(model, DOCUMENT_ROUTE) else model
        trainable = any(parameter.requires_grad for parameter in module.parameters())
        self.exact = (not trainable) and self.cache.is_current(model)
        if not trainable and not self.exact:
            logger.warning("the document route is frozen but the cache was built from another one: it stays stale")
        return self.exact

    @property
    def correcting(self) -> bool:
        return self.corrector is not None and not self.exact

    # ------------------------------------------------------------------ scoring

    def scoring_matrix(self) -> Tensor:
        """The matrix the queries are scored against: ``normalize(h(cache))`` when correcting, else the cache."""
        version = self._corrector_version if self.correcting else -2
        if self._matrix is None or self._matrix_version != version:
            if self.correcting:
                self._matrix = F.normalize(self.corrector.correct(self.cache.embeddings), dim=1)
            else:
                self._matrix = self.cache.float32()
            self._matrix_version = version
        return self._matrix

    def _scoring_index(self) -> Any:
        stale = self._index is None or (self.correcting and self._step - self._index_step >= self.index_refresh_every)
        if stale:
            matrix = self.scoring_matrix() if self.correcting else None
            self._index = self.cache.build_index(self.index_kind, embeddings=matrix, **self.index_options)
            self._index_step = self._step
        return self._index

    def _row_vectors(self, rows: Tensor) -> Tensor:
        """Scoring vectors of some rows: ``normalize(h(stale))`` or the stale rows."""
        stale = self.cache.float32(rows)
        if not self.correcting:
            return stale
        with torch.no_grad():
            return F.normalize(self.corrector(stale.to(next(self.corrector.parameters()).device)).cpu(), dim=1)

    @torch.no_grad()
    def mine(self, query_embeddings: Tensor, positive_rows: Tensor, query_keys: list[bytes] | None = None) -> Tensor:
        """Cache rows of the hard negatives of each query, shape ``(batch, k)`` (k may be below ``num_negatives``).

        Never returns a row in ``positive_rows`` (the batch's positives) nor a known positive of the query.
        """
        started = time.perf_counter()
        queries = query_embeddings.detach().to("cpu", torch.float32)
        batch = queries.shape[0]
        batch_rows = {int(row) for row in positive_rows.tolist() if row >= 0}
        excluded = []
        for index in range(batch):
            rows = set(batch_rows)
            if query_keys is not None:
                rows |= self._rows_of_query_key.get(query_keys[index], set())
            excluded.append(rows)
        valid_positive = positive_rows >= 0
        positive_scores = torch.full((batch,), float("nan"))
        if bool(valid_positive.any()):
            vectors = self._row_vectors(positive_rows[valid_positive])
            positive_scores[valid_positive] = (queries[valid_positive] * vectors).sum(dim=1)

        if self.index_kind == "exact":
            scores = queries @ self.scoring_matrix().T
            for index, rows in enumerate(excluded):
                if rows:
                    scores[index, list(rows)] = -torch.inf
            if self.margin is not None:
                limit = (positive_scores - self.margin).unsqueeze(1)
                scores[torch.isfinite(limit).expand_as(scores) & (scores > limit)] = -torch.inf
            available = int(torch.isfinite(scores).sum(dim=1).min())
            k = min(self.num_negatives, available)
            top_scores, top_rows = scores.topk(k, dim=1) if k > 0 else (scores[:, :0], scores[:, :0].long())
        else:
            extra = max(len(rows) for rows in excluded) if excluded else 0
            depth = min(len(self.cache), self.num_negatives + extra + (4 * self.num_negatives if self.margin else 0))
            found_scores, found_rows = self._scoring_index().search(queries.numpy(), depth)
            picked_rows, picked_scores = [], []
            for index in range(batch):
                rows, values = [], []
                for row, score in zip(found_rows[index].tolist(), found_scores[index].tolist()):
                    if row < 0 or row in excluded[index]:
                        continue
                    if self.margin is not None and score > float(positive_scores[index]) - self.margin:
                        continue
                    rows.append(row)
                    values.append(score)
                picked_rows.append(rows[: self.num_negatives])
                picked_scores.append(values[: self.num_negatives])
            k = min(len(rows) for rows in picked_rows)
            top_rows = torch.tensor([rows[:k] for rows in picked_rows], dtype=torch.long).reshape(batch, k)
            top_scores = torch.tensor([values[:k] for values in picked_scores]).reshape(batch, k)

        if k > 0 and bool(valid_positive.any()):
            # 1 = the positive outscores every mined negative; k + 1 = every mined negative outscores it.
            rank = 1 + (top_scores[valid_positive] > positive_scores[valid_positive].unsqueeze(1)).sum(dim=1)
            self._add_step("positive_rank", rank.float().sum().item(), int(rank.numel()))
        self.seconds["mining"] += time.perf_counter() - started
        self._log_seconds["mining"] += time.perf_counter() - started
        return top_rows

    # ------------------------------------------------------------------ encoding and observation

    def encode_rows(self, model: SentenceTransformer, rows: Tensor) -> Tensor:
        """Fresh document-route embeddings (with gradient) of cache rows: tokenise, then forward through ``model``."""
        texts = [self.texts[row] for row in rows.tolist()]
        task = DOCUMENT_ROUTE if _has_route(model, DOCUMENT_ROUTE) else None
        features = model.preprocess(texts, task=task) if task else model.preprocess(texts)
        features = batch_to_device(features, model.device)
        return model(features)["sentence_embedding"]

    def mine_and_encode(
        self,
        model: SentenceTransformer,
        query_features: dict[str, Any],
        query_embeddings: Tensor,
        positive_features: dict[str, Any],
        positive_embeddings: Tensor,
    ) -> list[Tensor]:
        """Mine, encode the unique mined documents fresh, observe every fresh document; ``k`` columns ``(batch, d)``."""
        positive_rows = self.cache.rows_for_features(positive_features)
        rows = self.mine(query_embeddings, positive_rows, token_keys(query_features))
        self.observe(positive_rows, positive_embeddings)
        if rows.numel() == 0:
            return []
        unique, inverse = torch.unique(rows, return_inverse=True)
        started = time.perf_counter()
        fresh = self.encode_rows(model, unique)
        self.seconds["negative_encoding"] += time.perf_counter() - started
        self.counts["negatives"] += int(unique.numel())
        self.observe(unique, fresh)
        return [fresh[inverse[:, column]] for column in range(rows.shape[1])]

    def count_loss_documents(self, count: int) -> None:
        """Count the document texts the loss's own columns encoded (positives and given negatives)."""
        self.counts["loss_documents"] += int(count)

    @torch.no_grad()
    def observe(self, rows: Tensor, fresh: Tensor) -> None:
        """Record fresh embeddings of cache rows (-1 rows are ignored): errors now, corrector targets at step end."""
        if self.cache is None:
            return
        known = rows >= 0
        if not bool(known.any()):
            return
        rows, fresh = rows[known].cpu(), fresh.detach()[known.to(fresh.device)].to("cpu", torch.float32)
        stale = self.cache.float32(rows)
        self._add_step("stale_error", staleness_error(stale, fresh).sum().item(), len(rows))
        if self.corrector is not None:
            corrected = self.corrector(stale.to(next(self.corrector.parameters()).device)).cpu()
            self._add_step("corrected_error", staleness_error(corrected, fresh).sum().item(), len(rows))
        self._pending_rows.append(rows)
        self._pending_fresh.append(fresh)

    def _add_step(self, name: str, total: float, count: int) -> None:
        self._step_sums[name] = self._step_sums.get(name, 0.0) + total
        self._step_counts[name] = self._step_counts.get(name, 0) + count

    # ------------------------------------------------------------------ per-step work (called by the callback)

    def train_corrector(self) -> float | None:
        """Drift-loss updates of the corrector on the fresh embeddings observed since the last call."""
        if not self.correcting or not self._pending_rows:
            return None
        rows, fresh = torch.cat(self._pending_rows), torch.cat(self._pending_fresh)
        if self.corrector_buffer > 0:
            rows = torch.cat([self._buffer_rows, rows])[-(self.corrector_buffer + len(rows)) :]
            fresh = torch.cat([self._buffer_fresh, fresh])[-len(rows) :]
            self._buffer_rows, self._buffer_fresh = rows[-self.corrector_buffer :], fresh[-self.corrector_buffer :]
        device = next(self.corrector.parameters()).device
        stale, fresh = self.cache.float32(rows).to(device), fresh.to(device)
        was_training = self.corrector.training
        self.corrector.train()
        value = 0.0
        with torch.enable_grad():
            for _ in range(self.corrector_steps):
                self.optimizer.zero_grad(set_to_none=True)
                loss = drift_loss(self.corrector(stale), fresh, self.drift_loss)
                loss.backward()
                all_reduce_gradients(self.corrector)  # one corrector across ranks: average its gradients
                self.optimizer.step()
                value = float(loss.detach())
        self.corrector.train(was_training)
        self._corrector_version += 1
        return value

    def end_step(self, step: int, step_seconds: float = 0.0) -> dict[str, float]:
        """Train the corrector on this step's fresh embeddings and close the step's accounting."""
        started = time.perf_counter()
        corrector_loss = self.train_corrector()
        corrector_seconds = time.perf_counter() - started
        self.seconds["corrector"] += corrector_seconds
        self.seconds["mining"] += corrector_seconds
        self.seconds["steps"] += step_seconds
        self._log_seconds["mining"] += corrector_seconds
        self._log_seconds["steps"] += step_seconds
        self._pending_rows, self._pending_fresh = [], []
        entry: dict[str, float] = {"step": float(step)}
        for name, total in self._step_sums.items():
            entry[name] = total / max(1, self._step_counts[name])
        if corrector_loss is not None:
            entry["corrector_loss"] = corrector_loss
        for name, value in entry.items():
            if name != "step":
                self._log_sums[name] = self._log_sums.get(name, 0.0) + value
                self._log_counts[name] = self._log_counts.get(name, 0) + 1
        self._step_sums, self._step_counts = {}, {}
        self._step = step
        if len(entry) > 1:
            self.history.append(entry)
        return entry

    def maybe_refresh(self, model: SentenceTransformer, step: int) -> bool:
        """Re-embed the corpus when a ``refresh:N`` strategy is due (every N completed steps)."""
        every = self.strategy.refresh_every
        if not every or step <= 0 or step % every or step == self.last_refresh_step:
            return False
        self.refresh(model, step)
        return True

    def refresh(self, model: SentenceTransformer, step: int | None = None) -> None:
        """Re-embed the whole corpus with the current document route; the corrector restarts from the identity."""
        started = time.perf_counter()
        self.cache.refresh(model, self.texts, batch_size=self.encode_batch_size)
        self.seconds["refresh"] += time.perf_counter() - started
        self.counts["refresh"] += len(self.cache)
        self.num_refreshes += 1
        self.last_refresh_step = self._step if step is None else step
        if self.corrector is not None:
            self.corrector.reset_parameters()
            self.optimizer.state.clear()
            self._buffer_rows, self._buffer_fresh = self._buffer_rows[:0], self._buffer_fresh[:0]
            self._corrector_version += 1
        self._matrix, self._index = None, None
        logger.info("negative mining: corpus re-embedded (%d documents) at step %s", len(self.cache), step)

    # ------------------------------------------------------------------ logging

    @property
    def documents_encoded(self) -> int:
        return sum(self.counts.values())

    def pop_logging_statistics(self) -> dict[str, float]:
        """Averages since the last call (errors, corrector loss, positive rank, overhead) and the running counts."""
        statistics = {
            f"mining_{name}": total / max(1, self._log_counts[name]) for name, total in self._log_sums.items()
        }
        statistics.update({f"mining_encoded_{name}": float(count) for name, count in self.counts.items()})
        statistics["mining_encoded_total"] = float(self.documents_encoded)
        statistics["mining_refreshes"] = float(self.num_refreshes)
        if self._log_seconds["steps"] > 0:
            statistics["mining_overhead"] = self._log_seconds["mining"] / self._log_seconds["steps"]
        self._log_sums, self._log_counts = {}, {}
        self._log_seconds = {"mining": 0.0, "steps": 0.0}
        return statistics

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.spec,
            "num_negatives": self.num_negatives,
            "counts": dict(self.counts),
            "seconds": dict(self.seconds),
            "num_refreshes": self.num_refreshes,
            "last_refresh_step": self.last_refresh_step,
            "step": self._step,
            "history": [dict(entry) for entry in self.history],
        }

    def save_state(self, folder: str | os.PathLike) -> Path:
        """Write cache (or a reference to its unchanged on-disk folder), corrector, its optimizer and the accounting.

        Everything is written into a temporary sibling folder that then replaces ``folder``, so an interrupted save
        never leaves a half-written state where a complete one was.
        """
        folder = Path(folder)
        temporary = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        if self.cache is not None:
            if self.cache.folder is not None:
                reference = {
                    "folder": str(self.cache.folder.resolve()),
                    "fingerprint": self.cache.fingerprint,
                    "size": len(self.cache),
                    "dimension": self.cache.dimension,
                }
                atomic_write_text(temporary / CACHE_REFERENCE_FILE, json.dumps(reference, indent=2))
            else:
                self.cache.save(temporary / "cache")
        if self.corrector is not None:
            self.corrector.save(temporary / "corrector", self.optimizer)
            torch.save({"rows": self._buffer_rows, "fresh": self._buffer_fresh}, temporary / "corrector" / "buffer.pt")
        atomic_write_text(temporary / STATE_FILE, json.dumps(self.state_dict(), indent=2))
        previous = folder.with_name(folder.name + ".old")
        shutil.rmtree(previous, ignore_errors=True)
        if folder.exists():
            folder.rename(previous)
        temporary.rename(folder)
        shutil.rmtree(previous, ignore_errors=True)
        return folder

    def load_state(self, folder: str | os.PathLike) -> None:
        """Restore what :meth:`save_state` wrote, refusing a state of another strategy, corpus or dimension."""
        folder = Path(folder)
        state = json.loads((folder / STATE_FILE).read_text())
        if state["strategy"] != self.strategy.spec:
            raise ValueError(
                f"{folder}: saved with negatives {state['strategy']!r}, this run uses {self.strategy.spec!r}"
            )
        if self.cache is not None:
            expected = {"expected_dimension": self.cache.dimension, "expected_size": len(self.cache)}
            reference_file = folder / CACHE_REFERENCE_FILE
            if reference_file.is_file():
                reference = json.loads(reference_file.read_text())
                cache = StaleEmbeddingCache.load(
                    reference["folder"], expected_fingerprint=reference["fingerprint"], mmap=True, **expected
                )
            else:
                cache = StaleEmbeddingCache.load(folder / "cache", **expected)
            if cache.ids != self.cache.ids:
                raise CacheMismatchError(f"{folder}: the saved cache holds other documents than this run's corpus")
            self.cache = cache
        if self.corrector is not None:
            self.corrector.load_into(folder / "corrector", self.optimizer)
            if (folder / "corrector" / "buffer.pt").is_file():
                buffer = torch.load(folder / "corrector" / "buffer.pt", weights_only=True)
                self._buffer_rows, self._buffer_fresh = buffer["rows"], buffer["fresh"]
        self.counts = {key: int(value) for key, value in state["counts"].items()}
        self.seconds = {key: float(value) for key, value in state["seconds"].items()}
        self.num_refreshes = int(state["num_refreshes"])
        self.last_refresh_step = int(state["last_refresh_step"])
        self._step = int(state["step"])
        self.history = [dict(entry) for entry in state["history"]]
        self._matrix, self._index = None, None
        self._corrector_version += 1

    def config(self) -> dict[str, Any]:
        return {
            "negatives": self.strategy.spec,
            "num_negatives": self.num_negatives,
            "margin": self.margin,
            "drift_loss": self.drift_loss,
            "corrector": self.corrector.config() if self.corrector is not None else None,
            "corrector_lr": self.corrector_lr,
            "corrector_steps": self.corrector_steps,
            "corrector_buffer": self.corrector_buffer,
            "index": self.index_kind,
        }


class MinedNegativesLoss(CollapseSafeContrastiveLoss):
    def __init__(self, model: SentenceTransformer, miner: NegativeMiner, **kwargs: Any) -> None:
        """
        :class:`~st_daft.losses.CollapseSafeContrastiveLoss` (InfoNCE + collapse guard) with negatives mined during
        training by a :class:`NegativeMiner`: for each training batch the miner scores the detached query embeddings
        against the (corrected) cache, and the fresh embeddings of the mined documents join the softmax as extra
        document columns (every query sees every column, as in ``MultipleNegativesRankingLoss``). The fresh
        embeddings of the batch's positives and mined negatives go to the miner, which trains its corrector on them.
        Evaluation batches (no gradient) are not mined.

        Add a :class:`NegativeMiningCallback` with the same miner to the trainer: it trains the corrector, refreshes
        the corpus for ``refresh:N``, logs the accounting and checkpoints the miner.

        Args:
            model: an asymmetric model (or a symmetric one).
            miner: the miner; ``strategy="in-batch"`` makes this the plain loss (with document counting).
            kwargs: passed on to :class:`~st_daft.losses.CollapseSafeContrastiveLoss` (``scale``, ``guard`` ...).
        """
        super().__init__(model, **kwargs)
        self.miner = miner
        miner.bind(model)

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        sentence_features = list(sentence_features)
        embeddings = embed_columns(self.model, sentence_features)
        if torch.is_grad_enabled():
            self.miner.count_loss_documents(sum(len(embedding) for embedding in embeddings[1:]))
            if self.miner.strategy.mine:
                embeddings = embeddings + self.miner.mine_and_encode(
                    self.model, sentence_features[0], embeddings[0], sentence_features[1], embeddings[1]
                )
        return self.compute_loss_from_embeddings(embeddings, labels)

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), **self.miner.config()}

    @property
    def citation(self) -> str:
        return super().citation + (CORRECTOR_CITATION if self.miner.corrector is not None else "")


class NegativeMiningCallback(TrainerCallback):
    """Drives a :class:`NegativeMiner` through training.

    - ``on_train_begin``: restores the miner from ``{output_dir}/checkpoint-{global_step}/negative_mining`` when the
      run resumes (cache, corrector, corrector optimizer, counts; nothing is re-embedded), and checks whether the
      cache is exact (frozen document route with the cache's fingerprint: then nothing is corrected);
    - ``on_step_begin``: re-embeds the corpus when a ``refresh:N`` strategy is due;
    - ``on_step_end``: trains the corrector on the step's fresh embeddings and closes the step's accounting;
    - ``on_log``: merges the miner's statistics (``mining_*``) into ``logs`` and ``state.log_history[-1]``;
    - ``on_save``: writes the miner's state into the checkpoint folder.

    Insert it first among the callbacks (``trainer.callback_handler.callbacks.insert(0, callback)``) for the merged
    statistics to reach reporting integrations as well.
    """

    def __init__(self, miner: NegativeMiner) -> None:
        self.miner = miner
        self._step_started: float | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if state.global_step > 0:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_FOLDER
            if (folder / STATE_FILE).is_file():
                self.miner.load_state(folder)
                logger.info("negative miner restored from %s (no re-embedding)", folder)
            elif self.miner.strategy.mine:
                logger.warning(
                    "resuming at step %d without a saved miner state: the cache may be stale", state.global_step
                )
        if model is not None and self.miner.cache is not None:
            self.miner.check_exact(model)
        if self.miner.corrector is not None:
            broadcast_parameters(self.miner.corrector)  # every rank starts from rank 0's corrector

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if model is not None and self.miner.cache is not None:
            self.miner.maybe_refresh(model, state.global_step)
        self._step_started = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        seconds = time.perf_counter() - self._step_started if self._step_started is not None else 0.0
        self.miner.end_step(state.global_step, seconds)
        self._step_started = None

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        if logs is None or "loss" not in logs:
            return
        statistics = self.miner.pop_logging_statistics()
        logs.update(statistics)
        if state.log_history:
            state.log_history[-1].update(statistics)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if not getattr(state, "is_world_process_zero", True):
            return
        self.miner.save_state(Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_FOLDER)


def _has_route(model: SentenceTransformer, route: str) -> bool:
    try:
        get_route(model, route)
    except ValueError:
        return False
    return True
