"""Hard negatives mined during training, added to any loss that scores precomputed embeddings."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.util import batch_to_device
from torch import Tensor, nn

from st_daft.citations import CORRECTOR_CITATION
from st_daft.embeddings.cache import token_keys
from st_daft.models.asymmetric import DOCUMENT_ROUTE, has_route, route_or_model
from st_daft.negatives.corrector import CorrectorTrainer, staleness_error
from st_daft.negatives.miner import NegativeMiner

__all__ = ["MinedNegativesLoss"]


class MinedNegativesLoss(nn.Module):
    def __init__(
        self,
        model: SentenceTransformer,
        loss: nn.Module,
        miner: NegativeMiner,
        corrector_trainer: CorrectorTrainer | None = None,
    ) -> None:
        """
        Adds hard negatives mined during training to ``loss``, the way ``MatryoshkaLoss`` adds dimensions to a loss.

        For each training batch the wrapped loss's columns are embedded, a
        :class:`~st_daft.negatives.miner.NegativeMiner`
        scores the detached query embeddings against the (corrected) stale cache of the corpus, the mined documents
        are encoded fresh by the document route (with gradient) and join the batch as extra document columns (every
        query sees every column, as in ``MultipleNegativesRankingLoss``), and the wrapped loss's
        ``compute_loss_from_embeddings`` scores them all. The fresh embeddings of the batch's positives and of the
        mined documents go to the ``corrector_trainer``, which learns from them how far the cache has drifted
        (Monath et al. 2024: corrector networks). Evaluation batches (no gradient) are not mined.

        Add the callbacks of :mod:`st_daft.callbacks.negative_mining` to the trainer (they step the corrector,
        refresh the corpus for ``refresh:N`` and checkpoint the miner), or use :func:`build_negative_mining`.

        Args:
            model: the SentenceTransformer (asymmetric with a ``"document"`` route, or symmetric).
            loss: any loss with ``compute_loss_from_embeddings(embeddings, labels)``: ``MultipleNegativesRankingLoss``,
                :class:`~st_daft.losses.CollapseSafeContrastiveLoss`; :class:`~st_daft.losses.DAFTAlignmentLoss`
                (frozen document route) is scored through its ranking loss, its document columns through its own
                ``embed_documents`` (exact cache lookups), the mined negatives taking the place of its cache
                negatives.
            miner: the miner; ``strategy="in-batch"`` makes this the wrapped loss (with document counting).
            corrector_trainer: trains ``miner.corrector`` on what each step encodes (correcting strategies).

        Example:
            ::

                cache = StaleEmbeddingCache.build(model, corpus)
                miner = NegativeMiner(cache, corpus, "corrected", num_negatives=4, query_positives=positives)
                corrector_trainer = CorrectorTrainer(miner.corrector)
                loss = MinedNegativesLoss(model, MultipleNegativesRankingLoss(model), miner, corrector_trainer)
                callbacks = negative_mining_callbacks(miner, corrector_trainer) + [LogStatisticsCallback(loss)]
        """
        super().__init__()
        self.model = model
        self.loss = loss
        self.miner = miner
        self.corrector_trainer = corrector_trainer
        self._score = _embedding_scorer(loss)
        miner.bind(model)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Any:
        sentence_features = list(sentence_features)
        embeddings = self.embed(sentence_features)
        if torch.is_grad_enabled():
            self.miner.statistics.counts["loss_documents"] += sum(len(embedding) for embedding in embeddings[1:])
            if self.miner.strategy.mine:
                embeddings = embeddings + self.mined_columns(sentence_features, embeddings)
        return self._score(embeddings, labels)

    def embed(self, sentence_features: list[dict[str, Tensor]]) -> list[Tensor]:
        """The batch's own columns: the wrapped loss's ``embed_documents`` for document columns when it has one."""
        embed_documents = getattr(self.loss, "embed_documents", None)
        if embed_documents is None:
            return embed_columns(self.model, sentence_features)
        queries = self.model(sentence_features[0])["sentence_embedding"]
        return [queries] + [embed_documents(features)[0] for features in sentence_features[1:]]

    def mined_columns(self, sentence_features: list[dict[str, Tensor]], embeddings: list[Tensor]) -> list[Tensor]:
        """Mine, encode the unique mined documents fresh, observe every fresh document; ``k`` columns ``(batch, d)``."""
        cache = self.miner.cache
        positive_rows = cache.rows_for_features(sentence_features[1])
        rows = self.miner.mine(embeddings[0], positive_rows, token_keys(sentence_features[0]))
        self.observe(positive_rows, embeddings[1])
        if rows.numel() == 0:
            return []
        unique, inverse = torch.unique(rows, return_inverse=True)
        started = time.perf_counter()
        fresh = self.encode_rows(unique)
        self.miner.statistics.time("negative_encoding", time.perf_counter() - started, overhead=False)
        self.miner.statistics.counts["negatives"] += int(unique.numel())
        self.observe(unique, fresh)
        return [fresh[inverse[:, column]] for column in range(rows.shape[1])]

    def encode_rows(self, rows: Tensor) -> Tensor:
        """Fresh document-route embeddings of cache rows (with gradient while the document route trains)."""
        texts = [self.miner.texts[row] for row in rows.tolist()]
        task = DOCUMENT_ROUTE if has_route(self.model, DOCUMENT_ROUTE) else None
        features = self.model.preprocess(texts, task=task) if task else self.model.preprocess(texts)
        features = batch_to_device(features, self.model.device)
        trainable = any(p.requires_grad for p in route_or_model(self.model, DOCUMENT_ROUTE).parameters())
        with torch.set_grad_enabled(trainable):
            return self.model(features)["sentence_embedding"]

    @torch.no_grad()
    def observe(self, rows: Tensor, fresh: Tensor) -> None:
        """Staleness of the cache on this batch's fresh embeddings (statistics), and the corrector's training data."""
        known = rows >= 0
        if not bool(known.any()):
            return
        rows, fresh = rows[known].cpu(), fresh.detach()[known.to(fresh.device)].to("cpu", torch.float32)
        stale = self.miner.cache.float32(rows)
        statistics = self.miner.statistics
        statistics.add("stale_error", staleness_error(stale, fresh).sum().item(), len(rows))
        corrector = self.miner.corrector
        if corrector is not None:
            corrected = corrector(stale.to(next(corrector.parameters()).device)).cpu()
            statistics.add("corrected_error", staleness_error(corrected, fresh).sum().item(), len(rows))
        if self.corrector_trainer is not None:
            self.corrector_trainer.observe(rows, fresh)

    def pop_logging_statistics(self) -> dict[str, float]:
        """The wrapped loss's statistics (if it keeps any) and the miner's ``mining_*`` statistics."""
        statistics = dict(getattr(self.loss, "pop_logging_statistics", dict)() or {})
        statistics.update(self.miner.pop_logging_statistics())
        return statistics

    def get_config_dict(self) -> dict[str, Any]:
        config = {**self.loss.get_config_dict(), **self.miner.config()}
        if self.corrector_trainer is not None:
            config.update(self.corrector_trainer.config())
        return config

    @property
    def citation(self) -> str:
        citation = getattr(self.loss, "citation", None) or ""
        return citation + (CORRECTOR_CITATION if self.miner.corrector is not None else "")


def _embedding_scorer(loss: nn.Module) -> Any:
    """The wrapped loss's ``compute_loss_from_embeddings`` (or its ranking loss's, for DAFTAlignmentLoss)."""
    for candidate in (loss, getattr(loss, "ranking_loss", None)):
        score = getattr(candidate, "compute_loss_from_embeddings", None)
        if callable(score):
            return score
    raise TypeError(
        f"MinedNegativesLoss wraps losses with compute_loss_from_embeddings(embeddings, labels); "
        f"{type(loss).__name__} has none"
    )
