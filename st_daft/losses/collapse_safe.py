"""DAFT stage 2: joint contrastive training with a guard against representation collapse."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from torch import Tensor, nn

from st_daft.citations import DAFT_CITATION

UNIFORMITY_CITATION = """
@inproceedings{wang2020understanding,
    title={Understanding Contrastive Representation Learning through Alignment and Uniformity on the Hypersphere},
    author={Tongzhou Wang and Phillip Isola},
    booktitle={International Conference on Machine Learning},
    year={2020},
    url={https://arxiv.org/abs/2005.10242},
}
"""

GuardName = Literal["variance", "uniformity", "none"]


def uniformity(embeddings: Tensor, t: float = 2.0) -> Tensor:
    """Wang & Isola's uniformity: log E[exp(-t ||x - y||^2)] over distinct pairs; 0 when collapsed, lower is spread."""
    squared_distances = torch.pdist(embeddings, p=2).pow(2)
    return squared_distances.mul(-t).exp().mean().clamp_min(1e-12).log()


def variance_hinge(embeddings: Tensor, floor: float) -> Tensor:
    """VICReg-style hinge: mean over dimensions of relu(floor - std); zero while every dimension varies enough."""
    std = torch.sqrt(embeddings.var(dim=0) + 1e-8)
    return torch.relu(floor - std).mean()


class CollapseSafeContrastiveLoss(nn.Module):
    def __init__(
        self,
        model: SentenceTransformer,
        scale: float = 20.0,
        guard: GuardName = "variance",
        guard_weight: float = 1.0,
        variance_floor: float | None = None,
        uniformity_t: float = 2.0,
        **ranking_loss_kwargs: Any,
    ) -> None:
        """
        Stage 2 of DAFT (Leonhardt, Jahnke & Anand 2022): both routes train jointly with InfoNCE
        (:class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss`, composed, so every
        option of it applies), plus a guard that keeps the embeddings from collapsing to a constant vector.

        A collapsed dual encoder minimises nothing useful yet can sit in a flat region of InfoNCE when one side
        outputs near-constant vectors: the softmax over in-batch documents becomes uniform and its gradient vanishes.
        The guard adds a penalty that grows as a route's embeddings lose their spread:

        - ``"variance"`` (default): the VICReg variance hinge (Bardes et al. 2022),
          ``mean_d relu(floor - std_d)`` over each route's L2-normalised batch embeddings. It is exactly zero while
          every dimension keeps a standard deviation above ``floor`` and so leaves healthy training untouched.
          ``floor`` defaults to ``0.5 / sqrt(dim)``: half the per-dimension spread of vectors spread uniformly on the
          sphere.
        - ``"uniformity"``: Wang & Isola's (2020) uniformity, ``log E exp(-t ||x - y||^2)``; always active, pushes
          embeddings apart everywhere.
        - ``"none"``: plain InfoNCE (the non-DAFT baseline when used without an alignment stage).

        The loss returns its parts as a dict (``contrastive``, ``collapse_guard``), which
        :class:`~sentence_transformers.SentenceTransformerTrainer` logs separately; batch collapse statistics (mean
        pairwise cosine and per-dimension std of each route) are averaged between logging steps and handed to
        :class:`~st_daft.callbacks.LogStatisticsCallback` through :meth:`pop_logging_statistics`.

        Args:
            model: an asymmetric model from :func:`st_daft.build_asymmetric_model`.
            scale: inverse temperature of the softmax.
            guard: ``"variance"``, ``"uniformity"`` or ``"none"``.
            guard_weight: weight of the guard term.
            variance_floor: per-dimension std floor of the variance guard; default ``0.5 / sqrt(dim)``.
            uniformity_t: the ``t`` of the uniformity guard.
            ranking_loss_kwargs: passed on to ``MultipleNegativesRankingLoss`` (``directions``, ``partition_mode`` ...).

        Requirements:
            1. (query, positive) pairs or (query, positive, negative_1, ..., negative_n) tuples
            2. ``router_mapping`` mapping the first column to ``"query"`` and the others to ``"document"``
        """
        super().__init__()
        if guard not in ("variance", "uniformity", "none"):
            raise ValueError(f"guard must be 'variance', 'uniformity' or 'none', got {guard!r}")
        if guard_weight < 0:
            raise ValueError("guard_weight must be non-negative")
        self.model = model
        self.guard = guard
        self.guard_weight = guard_weight
        self.variance_floor = variance_floor
        self.uniformity_t = uniformity_t
        self.ranking_loss = MultipleNegativesRankingLoss(model, scale=scale, **ranking_loss_kwargs)
        self._statistic_sums: dict[str, float] = {}
        self._statistic_count = 0

    def guard_term(self, embeddings: Tensor) -> Tensor:
        if embeddings.shape[0] < 2:  # no spread to measure in a batch of one (e.g. an epoch's last batch)
            return embeddings.new_zeros(())
        if self.guard == "variance":
            floor = self.variance_floor if self.variance_floor is not None else 0.5 / embeddings.shape[1] ** 0.5
            return variance_hinge(embeddings, floor)
        if self.guard == "uniformity":
            return uniformity(embeddings, self.uniformity_t)
        return embeddings.new_zeros(())

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        embeddings = embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> dict[str, Tensor]:
        """InfoNCE over (queries, positives, negative columns...) plus the guard, from embeddings already computed."""
        contrastive = self.ranking_loss.compute_loss_from_embeddings(embeddings, labels)
        queries, documents = embeddings[0], torch.cat(embeddings[1:])
        guard = (self.guard_term(queries) + self.guard_term(documents)) / 2
        if torch.is_grad_enabled():  # training batches only
            self._record_statistics(queries, documents)
        return {"contrastive": contrastive, "collapse_guard": self.guard_weight * guard}

    @torch.no_grad()
    def _record_statistics(self, queries: Tensor, documents: Tensor) -> None:
        for route, embeddings in (("query", queries), ("document", documents)):
            normalized = torch.nn.functional.normalize(embeddings.detach().float(), dim=1)
            count = normalized.shape[0]
            if count < 2:
                continue
            gram = normalized @ normalized.T
            mean_cosine = (gram.sum() - gram.diagonal().sum()) / (count * (count - 1))
            values = {f"{route}_mean_cosine": mean_cosine.item(), f"{route}_std": normalized.std(dim=0).mean().item()}
            for key, value in values.items():
                self._statistic_sums[key] = self._statistic_sums.get(key, 0.0) + value
        self._statistic_count += 1

    def pop_logging_statistics(self) -> dict[str, float]:
        """Batch collapse statistics averaged since the last call (for the trainer's logs)."""
        if not self._statistic_count:
            return {}
        averages = {f"batch_{key}": value / self._statistic_count for key, value in self._statistic_sums.items()}
        self._statistic_sums, self._statistic_count = {}, 0
        return averages

    def get_config_dict(self) -> dict[str, Any]:
        return {
            **self.ranking_loss.get_config_dict(),
            "guard": self.guard,
            "guard_weight": self.guard_weight,
            "variance_floor": self.variance_floor,
            "uniformity_t": self.uniformity_t,
        }

    @property
    def citation(self) -> str:
        return DAFT_CITATION + (UNIFORMITY_CITATION if self.guard == "uniformity" else "")
