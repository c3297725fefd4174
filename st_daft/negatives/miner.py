"""Hard negatives from a (corrected) stale cache: which strategy, which rows, and when to re-embed the corpus.

- :func:`parse_negatives` / :class:`NegativeStrategy`: ``in-batch`` (no mining), ``stale`` (cache, no correction),
  ``corrected`` (Monath et al. 2024: score ``h(cache)``), ``refresh:N`` (re-embed the corpus every N steps,
  ANCE-style) and ``corrected+refresh:N``.
- :class:`NegativeMiner`: scores a batch's detached query embeddings against the (corrected) cache and returns, per
  query, the top rows that are no positive of the batch (the softmax shares every column) nor a known positive of
  the query, optionally outside a margin below the positive's score. It *reads* the corrector (to score
  ``normalize(h(cache))``) but never trains it (:class:`~st_daft.negatives.corrector.CorrectorTrainer` does).
- :class:`RefreshPolicy`: when a ``refresh:N`` strategy re-embeds the corpus.
- :class:`MiningStatistics`: documents encoded, staleness errors, positive rank and overhead, per step and per
  logging interval.

The forward pass of the mined documents and the corrector's observations happen in
:class:`~st_daft.losses.MinedNegativesLoss`; the per-step work and checkpoints in
:mod:`st_daft.callbacks.negative_mining`.

While the document route is frozen and the cache's fingerprint matches it, the cache is exact: the miner then scores
the raw cache and the corrector is neither applied nor trained.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from torch import Tensor

from st_daft.embeddings.cache import CacheMismatchError, StaleEmbeddingCache, token_keys
from st_daft.embeddings.index import corrected_matrix, query_side_queries
from st_daft.models.asymmetric import DOCUMENT_ROUTE, QUERY_ROUTE, has_route, route_or_model
from st_daft.models.fingerprint import encoding_fingerprint
from st_daft.negatives.corrector import CorrectorNetwork
from st_daft.negatives.strategy import INDEX_MODES, NegativeStrategy, check_num_negatives, parse_negatives

logger = logging.getLogger(__name__)


class MiningStatistics:
    """Accounting of negative mining: per-step averages (``history``), per-logging-interval averages, running counts.

    ``counts``: documents encoded by the loss's own columns (``loss_documents``), mined negatives encoded fresh
    (``negatives``) and corpus re-embeddings (``refresh``); ``seconds``: time spent mining, encoding negatives,
    training the corrector, refreshing, and in whole training steps (the overhead is their ratio).
    """

    def __init__(self) -> None:
        self.counts = {"loss_documents": 0, "negatives": 0, "refresh": 0}
        self.seconds = {"mining": 0.0, "negative_encoding": 0.0, "corrector": 0.0, "refresh": 0.0, "steps": 0.0}
        self.num_refreshes = 0
        self.history: list[dict[str, float]] = []
        self._step_sums: dict[str, float] = {}
        self._step_counts: dict[str, int] = {}
        self._log_sums: dict[str, float] = {}
        self._log_counts: dict[str, int] = {}
        self._log_seconds = {"mining": 0.0, "steps": 0.0}
        self._new_steps = 0

    @property
    def documents_encoded(self) -> int:
        return sum(self.counts.values())

    def add(self, name: str, total: float, count: int = 1) -> None:
        """Add ``total`` over ``count`` items to this step's average of ``name``."""
        self._step_sums[name] = self._step_sums.get(name, 0.0) + total
        self._step_counts[name] = self._step_counts.get(name, 0) + count

    def time(self, name: str, seconds: float, overhead: bool = True) -> None:
        self.seconds[name] += seconds
        if overhead and name != "mining":
            self.seconds["mining"] += seconds
        if overhead:
            self._log_seconds["mining"] += seconds

    def end_step(self, step: int, step_seconds: float = 0.0) -> dict[str, float]:
        """Close a training step: its averages join the history and the current logging interval."""
        self.seconds["steps"] += step_seconds
        self._log_seconds["steps"] += step_seconds
        entry: dict[str, float] = {"step": float(step)}
        for name, total in self._step_sums.items():
            entry[name] = total / max(1, self._step_counts[name])
        for name, value in entry.items():
            if name != "step":
                self._log_sums[name] = self._log_sums.get(name, 0.0) + value
                self._log_counts[name] = self._log_counts.get(name, 0) + 1
        self._step_sums, self._step_counts = {}, {}
        self._new_steps += 1
        if len(entry) > 1:
            self.history.append(entry)
        return entry

    def pop_logging_statistics(self) -> dict[str, float]:
        """``mining_*`` averages since the last call and the running counts; empty when no step closed since."""
        if not self._new_steps:
            return {}
        statistics = {
            f"mining_{name}": total / max(1, self._log_counts[name]) for name, total in self._log_sums.items()
        }
        statistics.update({f"mining_encoded_{name}": float(count) for name, count in self.counts.items()})
        statistics["mining_encoded_total"] = float(self.documents_encoded)
        statistics["mining_refreshes"] = float(self.num_refreshes)
        if self._log_seconds["steps"] > 0:
            statistics["mining_overhead"] = self._log_seconds["mining"] / self._log_seconds["steps"]
        self._log_sums, self._log_counts, self._new_steps = {}, {}, 0
        self._log_seconds = {"mining": 0.0, "steps": 0.0}
        return statistics

    def state_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "seconds": dict(self.seconds),
            "num_refreshes": self.num_refreshes,
            "history": [dict(entry) for entry in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counts = {key: int(value) for key, value in state["counts"].items()}
        self.seconds = {key: float(value) for key, value in state["seconds"].items()}
        self.num_refreshes = int(state["num_refreshes"])
        self.history = [dict(entry) for entry in state["history"]]


class NegativeMiner:
    """Scores the (corrected) cache and returns each query's admissible hard-negative rows.

    Args:
        cache: embeddings of the corpus from the document route; may be None for ``"in-batch"`` (counting only).
        corpus: document id -> text, for every id of the cache (the texts encoded fresh and re-embedded).
        strategy: see :func:`parse_negatives`.
        num_negatives: mined negatives per query (fewer when a query has fewer admissible candidates); must be
            below the corpus size.
        query_positives: query text -> ids of its relevant documents, all kept out of that query's negatives
            (the batch's own positives are always kept out).
        margin: also drop candidates whose score is above ``positive score - margin`` (likely false negatives).
        corrector: the corrector network whose ``normalize(h(cache))`` is scored for the correcting strategies;
            default a 2-layer :class:`~st_daft.negatives.corrector.CorrectorNetwork`. Train it with a
            :class:`~st_daft.negatives.corrector.CorrectorTrainer`.
        index: ``None`` (exact matmul up to ``exact_limit`` rows, else ``"flat"``), ``"exact"``, a faiss index kind
            (``"flat"``, ``"ivf"``, ``"hnsw"``: built over the (corrected) matrix and rebuilt every
            ``index_refresh_every`` steps while correcting), ``"query-side"`` (a stale faiss index searched with
            linearly corrected queries ``q + W^T q``, never rebuilt; needs a linear corrector, ranks by the
            unnormalised ``q . h(e)``) or ``"two-step"`` (a shortlist of ``shortlist`` rows from the stale index
            searched with the query-side correction of ``h``'s least-squares linear part, re-ranked exactly by
            ``q . normalize(h(stale[rows]))``).
        index_options: options of :func:`~st_daft.embeddings.index.build_faiss_index` (``nlist``, ``nprobe``,
            ``hnsw_m``,
            ``storage`` ...; ``storage`` defaults to the cache's type, so a float16 cache gets a float16 index) and,
            for the query-side modes, ``base`` (the stale index kind, default ``"flat"``).
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
        index: str | None = None,
        exact_limit: int = 100_000,
        index_refresh_every: int = 50,
        index_options: dict[str, Any] | None = None,
        shortlist: int = 256,
        encode_batch_size: int = 64,
    ) -> None:
        self.strategy = parse_negatives(strategy)
        if self.strategy.mine and (cache is None or corpus is None):
            raise ValueError(f"negatives strategy {self.strategy.spec!r} needs a cache and the corpus texts")
        if index not in (None, *INDEX_MODES):
            raise ValueError(f"unknown index {index!r}: choose None, {', '.join(map(repr, INDEX_MODES))}")
        self.cache = cache
        self.num_negatives = num_negatives
        self.margin = margin
        self.validate()
        self.index_kind = index or ("exact" if cache is None or len(cache) <= exact_limit else "flat")
        self.index_refresh_every = max(1, index_refresh_every)
        self.index_options = dict(index_options or {})
        self.shortlist = shortlist
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
        # Called with each batch's (detached, float32, CPU) query embeddings: the corrector's KL objective scores
        # the step's candidates for them (CorrectorTrainer.observe_queries).
        self.query_observer: Callable[[Tensor], None] | None = None
        self.exact = False  # the cache equals the current document route (frozen route, same fingerprint)
        if self.strategy.correct:
            self.corrector = corrector or CorrectorNetwork(cache.dimension)
            if self.corrector.dimension != cache.dimension:
                raise ValueError(f"corrector dimension {self.corrector.dimension} != cache dimension {cache.dimension}")
        if self.index_kind == "query-side" and self.correcting and not self.corrector.is_linear:
            raise ValueError("index='query-side' needs a linear corrector: CorrectorNetwork(dimension, depth=1)")
        self.statistics = MiningStatistics()
        self._matrix: Tensor | None = None
        self._matrix_version: Any = None
        self._index: Any = None
        self._index_version: Any = None
        self._index_step = -1
        self._linear_part: tuple[Any, Tensor] | None = None
        self.step = 0

    def validate(self) -> None:
        """Refuse settings that cannot mine what they ask for, before any training step."""
        if self.strategy.mine:
            check_num_negatives(self.num_negatives, len(self.cache))

    # ------------------------------------------------------------------ setup

    def bind(self, model: SentenceTransformer) -> None:
        """Map the token keys of the known queries to their positives' cache rows (needs the model's tokenizer)."""
        if self.cache is None or not self.query_positives:
            return
        queries = list(self.query_positives)
        task = QUERY_ROUTE if has_route(model, QUERY_ROUTE) else None
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

    def check_cache(self, model: SentenceTransformer) -> None:
        """Refuse, at the start of a run, a cache that another document encoder built (fingerprint or dimension)."""
        if self.cache is None:
            return
        dimension = model.get_embedding_dimension()
        if dimension is not None and dimension != self.cache.dimension:
            raise CacheMismatchError(
                f"the cache holds {self.cache.dimension}-d embeddings, the model's document route gives {dimension}-d"
            )
        if not self.cache.is_current(model):
            current = encoding_fingerprint(model, DOCUMENT_ROUTE)
            where = f" (saved in {self.cache.folder})" if self.cache.folder is not None else ""
            raise CacheMismatchError(
                f"the negative-mining cache{where} was built by another document encoder: fingerprint "
                f"{self.cache.fingerprint} != {current} of this model's document route (and prompt); rebuild it with "
                "StaleEmbeddingCache.build(model, corpus)"
            )

    def check_exact(self, model: SentenceTransformer) -> bool:
        """Whether the cache is exact for ``model``: the document route is frozen and has the cache's fingerprint."""
        if self.cache is None:
            self.exact = False
            return False
        module = route_or_model(model, DOCUMENT_ROUTE)
        trainable = any(parameter.requires_grad for parameter in module.parameters())
        self.exact = (not trainable) and self.cache.is_current(model)
        if not trainable and not self.exact:
            logger.warning("the document route is frozen but the cache was built from another one: it stays stale")
        return self.exact

    @property
    def correcting(self) -> bool:
        return self.corrector is not None and not self.exact

    # ------------------------------------------------------------------ scoring

    def _version(self) -> Any:
        return (id(self.cache.embeddings), self.corrector.version if self.correcting else None)

    def scoring_matrix(self) -> Tensor:
        """The matrix the queries are scored against: ``normalize(h(cache))`` when correcting, else the cache."""
        if self._matrix is None or self._matrix_version != self._version():
            if self.correcting:
                self._matrix = corrected_matrix(self.cache.embeddings, self.corrector)
            else:
                self._matrix = self.cache.float32()
            self._matrix_version = self._version()
        return self._matrix

    def row_vectors(self, rows: Tensor) -> Tensor:
        """Scoring vectors of some rows: ``normalize(h(stale))`` or the stale rows."""
        stale = self.cache.float32(rows)
        if not self.correcting:
            return stale
        with torch.no_grad():
            return self._correct_rows(stale).cpu()

    def _query_side(self) -> bool:
        return self.index_kind in ("query-side", "two-step")

    def _scoring_index(self) -> Any:
        """The faiss index searched: over the stale cache (query-side modes, never rebuilt) or over the scoring
        matrix (rebuilt every ``index_refresh_every`` steps while correcting, and after a refresh)."""
        options = {key: value for key, value in self.index_options.items() if key != "base"}
        if self._query_side():
            if self._index is None or self._index_version != id(self.cache.embeddings):
                kind = self.index_options.get("base", "flat")
                self._index = self.cache.build_index(kind, **options)
                self._index_version = id(self.cache.embeddings)
            return self._index
        due = self.correcting and self.step - self._index_step >= self.index_refresh_every
        same_cache = self._index is not None and self._index_version == id(self.cache.embeddings)
        if not same_cache or due:
            # The corrected rows stream into the index (no corrected copy of the cache is kept); a rebuild after a
            # corrector update re-uses the IVF cells trained on this cache, a refreshed cache trains new ones.
            self._index = self.cache.build_index(
                self.index_kind,
                transform=self._correct_rows if self.correcting else None,
                like=self._index if same_cache else None,
                **options,
            )
            self._index_version = id(self.cache.embeddings)
            self._index_step = self.step
        return self._index

    def _correct_rows(self, rows: Tensor) -> Tensor:
        """``normalize(h(rows))`` on the corrector's device."""
        parameter = next(self.corrector.parameters())
        return F.normalize(self.corrector(rows.to(parameter.device)), dim=1)

    def _corrected_queries(self, queries: Tensor) -> Tensor:
        """Query-side correction: the corrector's own ``W`` when linear, else its least-squares linear part."""
        if not self.correcting:
            return queries
        if self.corrector.is_linear:
            return query_side_queries(self.corrector, queries)
        if self._linear_part is None or self._linear_part[0] != self._version():
            self._linear_part = (self._version(), linear_part(self.corrector, self.cache))
        return queries + queries @ self._linear_part[1]

    @torch.no_grad()
    def mine(self, query_embeddings: Tensor, positive_rows: Tensor, query_keys: list[bytes] | None = None) -> Tensor:
        """Cache rows of the hard negatives of each query, shape ``(batch, k)`` (k may be below ``num_negatives``).

        Never returns a row in ``positive_rows`` (the batch's positives) nor a known positive of the query.
        """
        started = time.perf_counter()
        queries = query_embeddings.detach().to("cpu", torch.float32)
        if self.query_observer is not None:
            self.query_observer(queries)
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
            vectors = self.row_vectors(positive_rows[valid_positive])
            positive_scores[valid_positive] = (queries[valid_positive] * vectors).sum(dim=1)

        if self.index_kind == "exact":
            top_scores, top_rows = self._mine_exact(queries, excluded, positive_scores)
        else:
            top_scores, top_rows = self._mine_index(queries, excluded, positive_scores)
        k = top_rows.shape[1]
        if k > 0 and bool(valid_positive.any()):
            # 1 = the positive outscores every mined negative; k + 1 = every mined negative outscores it.
            rank = 1 + (top_scores[valid_positive] > positive_scores[valid_positive].unsqueeze(1)).sum(dim=1)
            self.statistics.add("positive_rank", rank.float().sum().item(), int(rank.numel()))
        self.statistics.time("mining", time.perf_counter() - started)
        return top_rows

    def _mine_exact(self, queries: Tensor, excluded: list[set[int]], positive_scores: Tensor) -> tuple[Tensor, Tensor]:
        scores = queries @ self.scoring_matrix().T
        for index, rows in enumerate(excluded):
            if rows:
                scores[index, list(rows)] = -torch.inf
        if self.margin is not None:
            limit = (positive_scores - self.margin).unsqueeze(1)
            scores[torch.isfinite(limit).expand_as(scores) & (scores > limit)] = -torch.inf
        k = min(self.num_negatives, int(torch.isfinite(scores).sum(dim=1).min()))
        return scores.topk(k, dim=1) if k > 0 else (scores[:, :0], scores[:, :0].long())

    def _mine_index(self, queries: Tensor, excluded: list[set[int]], positive_scores: Tensor) -> tuple[Tensor, Tensor]:
        extra = max(len(rows) for rows in excluded) if excluded else 0
        depth = self.num_negatives + extra + (4 * self.num_negatives if self.margin else 0)
        if self.index_kind == "two-step":
            depth = max(depth, self.shortlist)
        depth = min(len(self.cache), depth)
        search_queries = self._corrected_queries(queries) if self._query_side() else queries
        found_scores, found_rows = self._scoring_index().search(search_queries.numpy(), depth)
        found_scores, found_rows = torch.from_numpy(found_scores), torch.from_numpy(found_rows).long()
        if self.index_kind == "two-step":  # exact re-rank of the shortlist by q . normalize(h(stale[rows]))
            vectors = self.row_vectors(found_rows.clamp(min=0).flatten()).reshape(*found_rows.shape, -1)
            found_scores = torch.einsum("bd,bkd->bk", queries, vectors).masked_fill(found_rows < 0, -torch.inf)
            found_scores, order = found_scores.sort(dim=1, descending=True)
            found_rows = found_rows.gather(1, order)
        picked_rows, picked_scores = [], []
        for index in range(len(queries)):
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
        top_rows = torch.tensor([rows[:k] for rows in picked_rows], dtype=torch.long).reshape(len(queries), k)
        top_scores = torch.tensor([values[:k] for values in picked_scores]).reshape(len(queries), k)
        return top_scores, top_rows

    # ------------------------------------------------------------------ corpus refresh

    def refresh(self, model: SentenceTransformer, folder: str | Path | None = None) -> None:
        """Re-embed the whole corpus with the current document route (the expensive ANCE-style refresh), in memory,
        or into ``folder`` as an on-disk cache (see :meth:`StaleEmbeddingCache.refresh`)."""
        started = time.perf_counter()
        self.cache.refresh(model, self.texts, batch_size=self.encode_batch_size, folder=folder)
        self.statistics.time("refresh", time.perf_counter() - started, overhead=False)
        self.statistics.counts["refresh"] += len(self.cache)
        self.statistics.num_refreshes += 1
        self._matrix, self._index, self._linear_part = None, None, None
        where = "in memory" if folder is None else f"on disk in {folder}"
        logger.info("negative mining: corpus re-embedded (%d documents), %s", len(self.cache), where)

    def pop_logging_statistics(self) -> dict[str, float]:
        return self.statistics.pop_logging_statistics()

    def config(self) -> dict[str, Any]:
        return {
            "negatives": self.strategy.spec,
            "num_negatives": self.num_negatives,
            "margin": self.margin,
            "corrector": self.corrector.config() if self.corrector is not None else None,
            "index": self.index_kind,
        }


@torch.no_grad()
def linear_part(corrector: CorrectorNetwork, cache: StaleEmbeddingCache, sample: int = 16384, seed: int = 0) -> Tensor:
    """``A`` (``d x d``) with ``h(e) - e ~ e A`` in least squares over a sample of cache rows: the query-side
    correction ``q + q A^T`` of a non-linear corrector, good enough to shortlist candidates for an exact re-rank."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(cache), generator=generator)[: min(sample, len(cache))].sort().values
    stale = cache.float32(rows)
    parameter = next(corrector.parameters())
    residual = corrector(stale.to(parameter.device)).cpu() - stale
    ones = torch.ones(len(stale), 1)
    solution = torch.linalg.lstsq(torch.cat([stale, ones], dim=1), residual).solution  # bias absorbs the constant
    return solution[:-1].T
