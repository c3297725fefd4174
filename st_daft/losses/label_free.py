"""Label-free alignment: the query route learns to reproduce the frozen document route's embedding of the same text."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from torch import Tensor, nn

from st_daft.losses.alignment import DAFT_CITATION


class LabelFreeAlignmentLoss(nn.Module):
    def __init__(
        self,
        model: SentenceTransformer,
        regression: Literal["cosine", "mse"] = "cosine",
        contrastive_weight: float = 1.0,
        scale: float = 20.0,
    ) -> None:
        """
        Distribution alignment without labelled queries. DAFT (Leonhardt, Jahnke & Anand 2022) aligns a light query
        encoder to a frozen document encoder with hundreds of thousands of labelled MS MARCO queries; most users have
        hundreds. Any text can serve instead: for a text ``t`` the target is the frozen document route's embedding
        ``D(t)``, and the query route ``Q`` learns ``Q(t) ~ D(t)`` over passages, sentences, spans and
        pseudo-queries cut from the user's own corpus (:func:`st_daft.corpus_alignment.alignment_texts`). The
        targets are computed once (the route is frozen) and passed as the ``label`` column.

        The loss is a regression term (``1 - cos(Q(t), D(t))`` or MSE) plus, with ``contrastive_weight > 0``, an
        InfoNCE term in which each text's target must score higher than the other targets of the batch
        (:class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss` on the embeddings).
        Regression pulls each embedding onto its target; the contrastive term keeps neighbouring texts apart, which
        is what retrieval needs.

        Args:
            model: an asymmetric model; the text column must be routed to ``"query"``.
            regression: ``"cosine"`` or ``"mse"``.
            contrastive_weight: weight of the in-batch InfoNCE term (0 disables it).
            scale: inverse temperature of the InfoNCE term.

        Inputs:
            +--------+--------------------------------------------+
            | Texts  | Labels                                     |
            +========+============================================+
            | text   | document-route embedding of the same text  |
            +--------+--------------------------------------------+
        """
        super().__init__()
        if regression not in ("cosine", "mse"):
            raise ValueError(f"regression must be 'cosine' or 'mse', got {regression!r}")
        if contrastive_weight < 0:
            raise ValueError("contrastive_weight must be non-negative")
        self.model = model
        self.regression = regression
        self.contrastive_weight = contrastive_weight
        self.ranking_loss = MultipleNegativesRankingLoss(model, scale=scale)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> dict[str, Tensor]:
        sentence_features = list(sentence_features)
        if labels is None:
            raise ValueError("LabelFreeAlignmentLoss needs the document-route embeddings of the texts as labels")
        embeddings = self.model(sentence_features[0])["sentence_embedding"]
        targets = labels.to(embeddings.device, embeddings.dtype)
        if targets.shape != embeddings.shape:
            raise ValueError(
                f"label embeddings of shape {tuple(targets.shape)} do not match the query route's "
                f"{tuple(embeddings.shape)} (dimension mismatch)"
            )
        if self.regression == "cosine":
            regression = (1 - torch.nn.functional.cosine_similarity(embeddings, targets, dim=1)).mean()
        else:
            regression = torch.nn.functional.mse_loss(embeddings, targets)
        parts = {"regression": regression}
        if self.contrastive_weight > 0:
            contrastive = self.ranking_loss.compute_loss_from_embeddings([embeddings, targets], None)
            parts["contrastive"] = self.contrastive_weight * contrastive
        return parts

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "regression": self.regression,
            "contrastive_weight": self.contrastive_weight,
            "scale": self.ranking_loss.scale,
        }

    @property
    def citation(self) -> str:
        return DAFT_CITATION
