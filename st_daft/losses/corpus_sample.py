"""A sample of the corpus in place of all of it, for the losses whose softmax runs over every corpus document.

:class:`~st_daft.losses.LabelFreeAlignmentLoss` (the corpus stage's pseudo-query and ranking terms) and
:class:`~st_daft.losses.DAFTAlignmentLoss` (the align stage's cache negatives) score each text of a batch against the
whole corpus. That is what measured best on corpora of thousands of documents, but at millions it needs the corpus as a
float32 matrix on every process's device (8.8M x 384: 13.5 GB) and a batch x corpus score matrix each step.

Above a size, each step scores ``sample_size`` corpus rows instead: every row the batch names (its positives, its
teacher's best documents) and a uniform sample of the others. Each uniform row stands for ``(N - |required|) / M``
documents, so ``log((N - |required|) / M)`` is added to its logit: the sampled softmax's importance correction (Bengio
& Senecal 2008; Jean et al. 2015, "On Using Very Large Target Vocabulary for Neural Machine Translation"), which makes
the softmax's denominator an unbiased estimate of the whole corpus's. The rows are gathered from the corpus matrix
where it is (a memory-mapped float16 cache stays on disk) and only the sample moves to the device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

# Up to this many documents the losses score the whole corpus, as measured (SciFact 5,183, python-faq 4,161 documents).
FULL_CORPUS_LIMIT = 65536
# Above it, the rows a step scores by default: a 128-text batch then scores a 128 x 16,384 matrix.
DEFAULT_SAMPLE_SIZE = 16384


def resolve_sample_size(num_documents: int, sample_size: int | None) -> int | None:
    """The rows a step scores: None for the whole corpus. ``sample_size``: None for the default (the whole corpus up
    to :data:`FULL_CORPUS_LIMIT` documents, else :data:`DEFAULT_SAMPLE_SIZE`), 0 for the whole corpus always, else
    that many rows (the whole corpus when it is no larger)."""
    if sample_size is None:
        return None if num_documents <= FULL_CORPUS_LIMIT else DEFAULT_SAMPLE_SIZE
    if sample_size < 0:
        raise ValueError(f"corpus sample size must be 0 (the whole corpus) or more, got {sample_size}")
    if sample_size == 0 or sample_size >= num_documents:
        return None
    return sample_size


class CorpusSample(NamedTuple):
    """The corpus rows one step scores (the required ones first, in ascending order), their float32 embeddings on
    the device, and the log-weight each row's logit gets (0 for a required row, ``log((N - |required| -
    |excluded|) / M)`` for one of the ``M`` uniform rows)."""

    rows: Tensor
    embeddings: Tensor
    log_weights: Tensor
    num_required: int

    def columns(self, rows: Tensor) -> Tensor:
        """The sample's columns of required ``rows`` (any shape); ``-1`` stays ``-1``."""
        required = self.rows[: self.num_required].to(rows.device)
        found = rows >= 0
        columns = torch.searchsorted(required, rows.clamp_min(0).contiguous())
        columns = columns.clamp_max(max(self.num_required - 1, 0))
        if bool((found & (required[columns] != rows)).any()):
            raise ValueError("a row asked for is not among the sample's required rows")
        return torch.where(found, columns, torch.full_like(columns, -1))


def sample_corpus(
    corpus: Tensor,
    required: Tensor | None,
    sample_size: int,
    device: torch.device | str,
    excluded: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> CorpusSample:
    """Every row in ``required`` and uniform rows of the others, ``sample_size`` in all (more when the required rows
    alone are more); rows in ``excluded`` are never drawn (e.g. the batch's own documents, already scored).
    Negative entries of both are ignored; None: no rows.

    ``corpus``: the ``(N, d)`` document embeddings, in memory or memory-mapped, of any float type. Uniform rows are
    drawn with replacement (O(sample_size), not O(N)); draws that hit a required or excluded row are dropped. Rows
    are read in ascending order, which a memory map reads fastest.
    """
    num_documents = len(corpus)
    required = _unique_rows(required, num_documents)
    excluded = _unique_rows(excluded, num_documents)
    excluded = excluded[~torch.isin(excluded, required)]
    drawn = torch.randint(num_documents, (max(sample_size - len(required), 0),), generator=generator)
    drawn = drawn[~torch.isin(drawn, required) & ~torch.isin(drawn, excluded)].sort().values
    rows = torch.cat([required, drawn])
    log_weights = torch.zeros(len(rows))
    if len(drawn):
        log_weights[len(required) :] = math.log((num_documents - len(required) - len(excluded)) / len(drawn))
    return CorpusSample(
        rows=rows,
        embeddings=_gather(corpus, rows).to(device, torch.float32),
        log_weights=log_weights.to(device),
        num_required=len(required),
    )


def _unique_rows(rows: Tensor | None, num_documents: int) -> Tensor:
    if rows is None:
        return torch.zeros(0, dtype=torch.long)
    rows = torch.unique(rows[rows >= 0].to("cpu", torch.long))  # sorted
    if len(rows) and int(rows[-1]) >= num_documents:
        raise ValueError(f"row {int(rows[-1])} asked for, the corpus has {num_documents} documents")
    return rows


def _gather(corpus: Tensor, rows: Tensor) -> Tensor:
    """``corpus[rows]`` for required rows then sorted drawn rows; the memory map is read in ascending order."""
    order = rows.argsort()
    gathered = corpus[rows[order]]
    return torch.empty_like(gathered).index_copy_(0, order, gathered)
