"""Label-free alignment: the query route learns to reproduce the frozen document route's embedding of the same text."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from torch import Tensor, nn

from st_daft.citations import DAFT_CITATION
from st_daft.losses.corpus_sample import CorpusSample, resolve_sample_size, sample_corpus


class LabelFreeAlignmentLoss(nn.Module):
    def __init__(
        self,
        model: SentenceTransformer,
        regression: Literal["cosine", "mse"] = "cosine",
        contrastive_weight: float = 1.0,
        scale: float = 20.0,
        document_embeddings: Tensor | None = None,
        document_weight: float = 1.0,
        document_scale: float | None = None,
        ranking_weight: float = 0.0,
        lexical_weight: float = 0.0,
        corpus_sample_size: int | None = None,
        neighbour_columns: int = 0,
    ) -> None:
        """
        Distribution alignment without labelled queries. DAFT (Leonhardt, Jahnke & Anand 2022) aligns a light query
        encoder to a frozen document encoder with hundreds of thousands of labelled MS MARCO queries; most users have
        hundreds. Any text can serve instead: for a text ``t`` the target is the frozen document route's embedding
        ``D(t)``, and the query route ``Q`` learns ``Q(t) ~ D(t)`` over passages, sentences, spans and
        pseudo-queries cut from the user's own corpus (:func:`st_daft.label_free.corpus_texts.alignment_texts`). The
        targets are computed once (the route is frozen) and passed as the ``label`` column.

        The loss is a regression term (``1 - cos(Q(t), D(t))`` or MSE) plus, with ``contrastive_weight > 0``, an
        InfoNCE term in which each text's target must score higher than the other targets of the batch
        (:class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss` on the embeddings).
        Regression pulls each embedding onto its target; the contrastive term keeps neighbouring texts apart, which
        is what retrieval needs.

        The task itself is query -> document, and a text cut from a document is a label-free pseudo-query for it:
        with ``document_embeddings`` (the document route's embeddings of the whole corpus), each label carries one
        extra column, the row of the text's source document (:func:`st_daft.label_free.corpus_texts.alignment_dataset`
        with ``document_rows``), and a third term, weighted by ``document_weight``, is the InfoNCE of ``Q(t)``
        against every document of the corpus with its source as the positive (DAFT's alignment loss with all corpus
        documents as negatives, on pseudo-queries instead of labelled ones). Texts whose row is ``-1`` skip it.

        With ``ranking_weight > 0`` (and ``document_embeddings``), a fourth term distils the document route's
        *ranking* of the corpus for each text rather than its embedding: the KL divergence from the softmax of
        ``D(t)``'s scores against every corpus document to the softmax of ``Q(t)``'s, both at ``document_scale``
        (listwise distillation, as in RocketQAv2, Ren et al. 2021, over the whole corpus instead of a few
        candidates). A static route cannot reproduce ``D(t)`` exactly; this term spends its capacity on the
        directions that order this corpus's documents.

        With ``lexical_weight > 0`` the ranking term's teacher is the document route's scores fused with BM25's:
        each label also carries the text's best documents by BM25 and their scores divided by the text's best
        (:func:`st_daft.label_free.corpus_texts.lexical_ranking_columns`), and ``document_scale * lexical_weight`` times
        those scores is added to the teacher's logits (score fusion, as in hybrid retrieval; Kuzi et al. 2020,
        "Leveraging Semantic and Lexical Matching to Improve the Recall of Document Retrieval Systems"). Where
        queries share words with their documents the fused ranking beats both of its parts (docs/results/fusion.md),
        and a static route, which cannot run BM25 at query time,
        learns what it can of that ranking.

        Both corpus-wide terms score every corpus document up to 65,536 of them (as measured). Above that, or below
        ``corpus_sample_size``, each step scores a sample of the corpus instead
        (:func:`st_daft.losses.corpus_sample.sample_corpus`): the rows the batch's labels name (source documents,
        BM25's best, and the teacher's best, the last ``neighbour_columns`` label columns:
        :func:`st_daft.label_free.corpus_texts.with_teacher_neighbours`) and uniform rows of the rest, whose logits get
        the
        sampled softmax's importance correction. The corpus then stays where it is (a memory-mapped float16 cache
        stays on disk) and only the sample moves to the device.

        Args:
            model: an asymmetric model; the text column must be routed to ``"query"``.
            regression: ``"cosine"`` or ``"mse"``.
            contrastive_weight: weight of the in-batch InfoNCE term (0 disables it).
            scale: inverse temperature of the InfoNCE term.
            document_embeddings: ``(num_documents, dim)`` document-route embeddings of the corpus the texts come
                from (rows as in the labels' last column); None disables the text -> source-document term.
            document_weight: weight of the text -> source-document InfoNCE term.
            document_scale: its inverse temperature (default ``scale``), also the ranking term's.
            ranking_weight: weight of the listwise ranking-distillation term over the corpus (needs
                ``document_embeddings``; 0 disables it).
            lexical_weight: weight of the BM25 scores in the ranking term's teacher (needs ``ranking_weight > 0``
                and the lexical label columns; 0: the document route's ranking alone).
            corpus_sample_size: corpus rows each step scores: None for the whole corpus up to 65,536 documents and
                16,384 rows above, 0 for the whole corpus always, else that many rows.
            neighbour_columns: how many label columns, at the end, hold rows of the teacher's best documents for
                the text; a sampled step always scores them (0: none).

        Inputs:
            +--------+-------------------------------------------------------------------------------------+
            | Texts  | Labels                                                                              |
            +========+=====================================================================================+
            | text   | document-route embedding of the same text (+ the row of its source document, with  |
            |        | ``document_embeddings``; + its BM25 top-k rows and scores, with ``lexical_weight``; |
            |        | + the teacher's best rows, with ``neighbour_columns``)                              |
            +--------+-------------------------------------------------------------------------------------+
        """
        super().__init__()
        if regression not in ("cosine", "mse"):
            raise ValueError(f"regression must be 'cosine' or 'mse', got {regression!r}")
        if contrastive_weight < 0:
            raise ValueError("contrastive_weight must be non-negative")
        self.model = model
        self.regression = regression
        self.contrastive_weight = contrastive_weight
        if document_weight < 0:
            raise ValueError("document_weight must be non-negative")
        if ranking_weight < 0:
            raise ValueError("ranking_weight must be non-negative")
        if ranking_weight > 0 and document_embeddings is None:
            raise ValueError("ranking_weight > 0 needs document_embeddings (the corpus the texts are ranked against)")
        self.ranking_weight = ranking_weight
        if not lexical_weight >= 0:
            raise ValueError("lexical_weight must be non-negative")
        if lexical_weight > 0 and ranking_weight == 0:
            raise ValueError(
                "lexical_weight > 0 fuses BM25 into the ranking term's teacher: it needs ranking_weight > 0"
            )
        self.lexical_weight = lexical_weight
        self.ranking_loss = MultipleNegativesRankingLoss(model, scale=scale)
        self.document_weight = document_weight
        self.document_scale = scale if document_scale is None else document_scale
        if neighbour_columns < 0:
            raise ValueError("neighbour_columns must be non-negative")
        self.neighbour_columns = neighbour_columns
        self.corpus_sample_size = None
        self.num_documents = 0
        if document_embeddings is not None:
            if document_embeddings.ndim != 2 or len(document_embeddings) == 0:
                raise ValueError("document_embeddings must be a non-empty (num_documents, dim) matrix")
            self.num_documents = len(document_embeddings)
            self.corpus_sample_size = resolve_sample_size(self.num_documents, corpus_sample_size)
            if self.corpus_sample_size is None:
                # A buffer follows the model's device; not persistent: the loss is not saved with the model.
                self.register_buffer(
                    "document_embeddings",
                    torch.nn.functional.normalize(document_embeddings.detach().float(), dim=1),
                    persistent=False,
                )
            else:
                self.document_embeddings = None
                self.corpus = document_embeddings.detach()  # sampled each step where it is, in its own type
        else:
            self.document_embeddings = None
        self.uses_corpus = document_embeddings is not None

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> dict[str, Tensor]:
        sentence_features = list(sentence_features)
        if labels is None:
            raise ValueError("LabelFreeAlignmentLoss needs the document-route embeddings of the texts as labels")
        embeddings = self.model(sentence_features[0])["sentence_embedding"]
        # Rows stay float32 here (exact to 2**24 documents): a half-precision label would round them.
        raw = labels.to(embeddings.device, torch.float32)
        targets = raw
        source_rows, lexical, neighbours = None, None, None
        if self.uses_corpus:
            dimension = embeddings.shape[1]
            extra = targets.shape[1] - dimension - 1 - self.neighbour_columns if targets.ndim == 2 else -1
            # the teacher's best rows, last, only with neighbour_columns
            more, named = "", ""
            if self.neighbour_columns:
                more = f" + {self.neighbour_columns}"
                named = f", the teacher's best rows: neighbour_columns={self.neighbour_columns}"
            if self.lexical_weight > 0 and (extra < 2 or extra % 2):
                raise ValueError(
                    f"with lexical_weight, labels need {dimension + 1} + 2k{more} columns (the text's target "
                    f"embedding, its source document's row, its BM25 top-k rows and scores: lexical_ranking_columns"
                    f"{named}), got shape {tuple(targets.shape)}"
                )
            if self.lexical_weight == 0 and extra != 0:
                raise ValueError(
                    f"with document_embeddings, labels need {dimension + 1 + self.neighbour_columns} columns (the "
                    f"text's target embedding and its source document's row{named}), got shape {tuple(targets.shape)}"
                )
            source_rows = raw[:, dimension].round().long()
            if extra:
                lexical = raw[:, dimension + 1 : dimension + 1 + extra].split(extra // 2, dim=1)
            if self.neighbour_columns:
                neighbours = raw[:, dimension + 1 + extra :].round().long()
            targets = raw[:, :dimension]
        targets = targets.to(embeddings.dtype)
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
        use_document = source_rows is not None and self.document_weight > 0
        use_ranking = self.uses_corpus and self.ranking_weight > 0
        if use_document or use_ranking:
            if source_rows.max() >= self.num_documents:
                raise ValueError(
                    f"a label names document row {source_rows.max().item()} but there are only "
                    f"{self.num_documents} document embeddings"
                )
            sample = self._sample(embeddings.device, source_rows, lexical, neighbours)
            # One (batch x corpus) score matrix serves both corpus-wide terms: it is the costly part at scale.
            scores = self._corpus_scores(embeddings, sample)
            if use_document:
                parts["document"] = self.document_weight * self._document_term(scores, source_rows, sample)
            if use_ranking:
                parts["ranking"] = self.ranking_weight * self._ranking_term(scores, targets, lexical, sample)
        return parts

    def _sample(
        self,
        device: torch.device,
        source_rows: Tensor,
        lexical: tuple[Tensor, Tensor] | None,
        neighbours: Tensor | None,
    ) -> CorpusSample | None:
        """This step's sample of the corpus (None: the whole corpus): every row the labels name, then uniform rows,
        normalised once for both corpus-wide terms."""
        if self.corpus_sample_size is None:
            return None
        required = [source_rows.flatten()]
        if lexical is not None:
            required.append(lexical[0].round().long().flatten())
        if neighbours is not None:
            required.append(neighbours.flatten())
        sample = sample_corpus(self.corpus, torch.cat(required), self.corpus_sample_size, device)
        return sample._replace(embeddings=torch.nn.functional.normalize(sample.embeddings, dim=1))

    def _corpus_scores(self, embeddings: Tensor, sample: CorpusSample | None = None) -> Tensor:
        """Scaled cosine scores of each embedding against every corpus document (against the sample's rows, plus
        their log-weights, when sampled)."""
        if sample is None:
            documents = self.document_embeddings.to(embeddings.device, embeddings.dtype)
            return self.document_scale * torch.nn.functional.normalize(embeddings, dim=1) @ documents.T
        documents = sample.embeddings.to(embeddings.dtype)  # normalised by _sample
        scores = self.document_scale * torch.nn.functional.normalize(embeddings, dim=1) @ documents.T
        return scores + sample.log_weights.to(scores.dtype)

    def _ranking_term(
        self,
        scores: Tensor,
        targets: Tensor,
        lexical: tuple[Tensor, Tensor] | None = None,
        sample: CorpusSample | None = None,
    ) -> Tensor:
        """KL from the teacher's score distribution over the corpus (the document route's, fused with BM25's with
        ``lexical``) to the query route's (``scores``)."""
        student = torch.log_softmax(scores, dim=1)
        with torch.no_grad():
            teacher_scores = self._corpus_scores(targets, sample)
            if lexical is not None:
                rows, lexical_scores = lexical
                rows = rows.round().long()
                if sample is not None:
                    rows = sample.columns(rows)
                found = rows >= 0  # -1: no more documents share a term with the text
                bonus = torch.zeros_like(teacher_scores).scatter_add_(
                    1, rows.clamp_min(0), (lexical_scores * found).to(teacher_scores.dtype)
                )
                teacher_scores = teacher_scores + self.document_scale * self.lexical_weight * bonus
            teacher = torch.log_softmax(teacher_scores, dim=1)
        return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")

    def _document_term(self, scores: Tensor, source_rows: Tensor, sample: CorpusSample | None = None) -> Tensor:
        """InfoNCE of each text against the whole corpus (``scores``), its source document the positive."""
        if not (source_rows >= 0).any():
            return scores.sum() * 0.0  # keeps the graph when no text in the batch has a source
        if sample is not None:
            source_rows = sample.columns(source_rows.to(scores.device))
        return torch.nn.functional.cross_entropy(scores, source_rows, ignore_index=-1)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "regression": self.regression,
            "contrastive_weight": self.contrastive_weight,
            "scale": self.ranking_loss.scale,
            "document_weight": self.document_weight if self.uses_corpus else 0.0,
            "document_scale": self.document_scale,
            "ranking_weight": self.ranking_weight,
            "lexical_weight": self.lexical_weight,
            "corpus_sample_size": self.corpus_sample_size or 0,
        }

    @property
    def citation(self) -> str:
        return DAFT_CITATION
