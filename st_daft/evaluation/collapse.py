"""Collapse diagnostics for asymmetric (query encoder, document encoder) retrievers.

Heterogeneous dual encoders trained with a plain contrastive loss tend to collapse: one route (usually the small
query encoder) maps every input to (almost) the same vector, the in-batch softmax turns uniform and training stalls.
DAFT (Leonhardt, Jahnke & Anand 2022, https://arxiv.org/abs/2211.04942) therefore first aligns the query encoder to
the frozen document encoder and early-stops that stage on a 1-nearest-neighbour estimate of the KL divergence between
the query-route and document-route embeddings of the same validation texts.

This module provides:

- pure metric functions on 2-D embedding arrays (:func:`knn_kl_divergence`, :func:`mean_pairwise_cosine`,
  :func:`per_dimension_std`, :func:`effective_rank`), combined by :func:`collapse_statistics` and judged by
  :func:`is_collapsed`;
- :class:`CollapseEvaluator`, a sentence-transformers evaluator that encodes validation texts with both routes of a
  model and returns those statistics (primary metric ``knn_kl``, lower is better).

The trainer callback that stops on collapse is :class:`st_daft.callbacks.CollapseStopCallback`; early stopping on the
KL estimate is transformers' ``EarlyStoppingCallback`` on ``metric_for_best_model="eval_{name}_knn_kl"``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator
from torch import Tensor

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_MEAN_COSINE",
    "DEFAULT_MIN_STD",
    "STATISTIC_NAMES",
    "knn_kl_divergence",
    "mean_pairwise_cosine",
    "per_dimension_std",
    "effective_rank",
    "collapse_statistics",
    "is_collapsed",
    "CollapseEvaluator",
]

EmbeddingsLike = Tensor | np.ndarray | Sequence[Sequence[float]] | Sequence[Tensor]

#: Default upper bound on the mean pairwise cosine similarity of a route's embeddings.
DEFAULT_MAX_MEAN_COSINE = 0.95
#: Default lower bound on the mean per-dimension standard deviation of a route's L2-normalised embeddings.
#: Unit vectors spread uniformly over the sphere in ``d`` dimensions have a per-dimension std of about
#: ``1 / sqrt(d)``: 0.177 for d=32, 0.036 for d=768, 0.016 for d=4096. More generally the per-dimension variances
#: of unit vectors sum to ``1 - ||mean||^2`` (roughly one minus the mean pairwise cosine), so an average std of
#: 1e-3 at d=768 corresponds to a mean cosine above ~0.999: far below any healthy model of practical size (even
#: strongly anisotropic ones), yet well above the spread of a constant vector plus numerical jitter. It is a
#: backstop that catches collapse even when ``max_mean_cosine`` is loosened or disabled.
DEFAULT_MIN_STD = 1e-3

# Bytes of float64 distances materialised per chunk of the neighbour search.
_DISTANCE_CHUNK_BYTES = 64 * 2**20
#: The statistics a :class:`CollapseEvaluator` returns (before its name prefix).
STATISTIC_NAMES = (
    "knn_kl",
    "paired_cosine",
    "query_mean_cosine",
    "query_std",
    "query_effective_rank",
    "document_mean_cosine",
    "document_std",
    "document_effective_rank",
)


def _to_float64_tensor(embeddings: EmbeddingsLike, name: str, min_rows: int = 2) -> Tensor:
    """Convert embeddings to a CPU float64 tensor of shape (n, dim) and validate it."""
    if isinstance(embeddings, Tensor):
        tensor = embeddings.detach().to("cpu", torch.float64)
    elif isinstance(embeddings, np.ndarray):
        tensor = torch.tensor(np.asarray(embeddings, dtype=np.float64))
    elif isinstance(embeddings, Sequence) and len(embeddings) > 0 and isinstance(embeddings[0], Tensor):
        tensor = torch.stack([row.detach().to("cpu", torch.float64) for row in embeddings])
    else:
        tensor = torch.as_tensor(np.asarray(embeddings, dtype=np.float64))
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of shape (n, dim), got shape {tuple(tensor.shape)}")
    if tensor.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {tensor.shape[0]}")
    if tensor.shape[1] < 1:
        raise ValueError(f"{name} has no dimensions: shape {tuple(tensor.shape)}")
    return tensor


def _normalize_rows(embeddings: Tensor) -> Tensor:
    """L2-normalise rows; all-zero rows stay zero (as in ``torch.nn.functional.normalize``)."""
    return torch.nn.functional.normalize(embeddings, p=2.0, dim=1, eps=1e-12)


def _kth_neighbour_distances(queries: Tensor, points: Tensor, k: int, exclude_self: bool) -> Tensor:
    """Euclidean distance from every query row to its k-th nearest row of ``points``.

    With ``exclude_self``, ``queries`` and ``points`` are the same matrix and each row's own index is skipped
    (by index, not by distance, so exact duplicates of a row still count as neighbours at distance 0).
    """
    chunk_size = max(1, _DISTANCE_CHUNK_BYTES // (8 * points.shape[0]))
    kth = torch.empty(queries.shape[0], dtype=torch.float64)
    for start in range(0, queries.shape[0], chunk_size):
        block = queries[start : start + chunk_size]
        distances = torch.cdist(block, points)
        if exclude_self:
            rows = torch.arange(block.shape[0])
            distances[rows, rows + start] = math.inf
        kth[start : start + block.shape[0]] = torch.topk(distances, k, dim=1, largest=False).values[:, -1]
    return kth


def knn_kl_divergence(p: EmbeddingsLike, q: EmbeddingsLike, k: int = 1, eps: float = 1e-10) -> float:
    r"""
    k-nearest-neighbour estimate of the Kullback-Leibler divergence KL(P || Q) from samples ``p ~ P`` and ``q ~ Q``
    (Wang, Kulkarni & Verdú 2009; Pérez-Cruz 2008):

    .. math::

        \hat D(P \| Q) = \frac{d}{n} \sum_{i=1}^{n} \log \frac{\nu_k(i)}{\rho_k(i)} + \log \frac{m}{n - 1}

    where :math:`\rho_k(i)` is the Euclidean distance from :math:`p_i` to its k-th nearest neighbour among the
    other rows of ``p``, :math:`\nu_k(i)` the distance from :math:`p_i` to its k-th nearest neighbour among the rows
    of ``q``, ``n = len(p)``, ``m = len(q)`` and ``d`` the dimension. DAFT early-stops its alignment stage on this
    estimate with ``k=1``, ``p`` the query-route and ``q`` the document-route embeddings of the same texts.

    The estimate is consistent for independent samples of continuous distributions but can be negative on finite
    samples. When ``p`` and ``q`` are embeddings of the *same* texts (as in DAFT), :math:`\nu_1(i)` is at most the
    distance between the two embeddings of text ``i``, so the estimate keeps falling as the routes align pairwise;
    for a model whose two routes are identical it is dominated by ``eps`` (see below) and meaningless.

    Distances are computed exactly in float64 with a chunked ``torch.cdist`` (memory ``O(chunk * m)``).

    Args:
        p: samples of P, shape (n, d), numpy array or torch tensor.
        q: samples of Q, shape (m, d).
        k: the neighbour rank, ``1 <= k < n`` and ``k <= m``.
        eps: zero distances (duplicate rows, or a ``p`` row identical to a ``q`` row) are clamped to ``eps`` so the
            estimate stays finite. A collapsed ``p`` (all rows equal) then yields a very large value
            (``d * log(nu / eps)``), signalling the divergence that a point mass truly has.

    Returns:
        The estimate in nats as a Python float; ``nan`` if the inputs contain non-finite values.

    Raises:
        ValueError: if an input is not 2-D, has fewer than 2 rows, the dimensions differ or ``k`` is out of range.
    """
    p_tensor = _to_float64_tensor(p, "p")
    q_tensor = _to_float64_tensor(q, "q")
    n, dim = p_tensor.shape
    m = q_tensor.shape[0]
    if q_tensor.shape[1] != dim:
        raise ValueError(f"p and q must have the same dimension, got p: {dim} and q: {q_tensor.shape[1]}")
    if not 1 <= k < n or k > m:
        raise ValueError(f"k must satisfy 1 <= k < len(p) and k <= len(q), got k={k}, len(p)={n}, len(q)={m}")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if not (torch.isfinite(p_tensor).all() and torch.isfinite(q_tensor).all()):
        return math.nan

    rho = _kth_neighbour_distances(p_tensor, p_tensor, k, exclude_self=True).clamp_min(eps)
    nu = _kth_neighbour_distances(p_tensor, q_tensor, k, exclude_self=False).clamp_min(eps)
    return float(dim * torch.log(nu / rho).mean() + math.log(m / (n - 1)))


def mean_pairwise_cosine(embeddings: EmbeddingsLike) -> float:
    """
    Mean cosine similarity over all distinct pairs of rows (``n * (n - 1)`` ordered pairs, self-pairs excluded).

    1.0 means every embedding points the same way (complete collapse), about 0.0 means directions are spread like
    independent random vectors. Pretrained sentence encoders are anisotropic and typically score 0.1-0.7. All-zero
    rows have cosine 0 with everything. Computed in ``O(n * dim)`` via the norm of the sum of the unit vectors.

    Args:
        embeddings: shape (n, dim) with ``n >= 2``, numpy array or torch tensor.

    Returns:
        The mean cosine as a Python float (``nan`` for non-finite input).
    """
    normalized = _normalize_rows(_to_float64_tensor(embeddings, "embeddings"))
    n = normalized.shape[0]
    total = normalized.sum(dim=0)
    self_similarity = (normalized * normalized).sum()
    return float(((total @ total) - self_similarity) / (n * (n - 1)))


def per_dimension_std(embeddings: EmbeddingsLike) -> float:
    """
    Mean over dimensions of the per-dimension standard deviation (unbiased, as ``torch.std``) of the L2-normalised
    embeddings.

    A collapsed route scores about 0. Unit vectors spread uniformly over the sphere in ``d`` dimensions score about
    ``1 / sqrt(d)``; since the per-dimension variances of unit vectors sum to ``1 - ||mean||^2``, the score is at most
    about ``sqrt((1 - mean_cosine) / d)``.

    Args:
        embeddings: shape (n, dim) with ``n >= 2``, numpy array or torch tensor.

    Returns:
        The mean standard deviation as a Python float (``nan`` for non-finite input).
    """
    normalized = _normalize_rows(_to_float64_tensor(embeddings, "embeddings"))
    return float(normalized.std(dim=0).mean())


def effective_rank(embeddings: EmbeddingsLike, center: bool = True) -> float:
    """
    Effective rank of Roy & Vetterli (2007): ``exp(H(s))``, with ``H`` the Shannon entropy of the singular values
    normalised to sum to 1, ``s_i = sigma_i / sum_j sigma_j``.

    With ``center=True`` (default) the rows are centred first, so the value counts the directions along which the
    embeddings *vary*: about ``min(n - 1, dim)`` for isotropic embeddings, about 1 when they vary along a single
    direction (dimensional collapse). The measure is scale-invariant: a constant vector plus tiny isotropic jitter
    has a high centred effective rank, which is why :func:`is_collapsed` judges complete collapse by the mean cosine
    and the per-dimension std instead. With ``center=False`` the shared mean direction counts as well, and a constant
    vector plus small jitter scores close to 1.

    Args:
        embeddings: shape (n, dim) with ``n >= 2``, numpy array or torch tensor.
        center: subtract the mean row before the singular value decomposition.

    Returns:
        The effective rank as a Python float, between 1 and ``min(n, dim)``; 0.0 for an all-zero (e.g. centred
        constant) matrix; ``nan`` for non-finite input.
    """
    matrix = _to_float64_tensor(embeddings, "embeddings")
    if not torch.isfinite(matrix).all():
        return math.nan
    scale = float(matrix.abs().max())
    if center:
        matrix = matrix - matrix.mean(dim=0, keepdim=True)
    singular_values = torch.linalg.svdvals(matrix)
    total = singular_values.sum()
    # An all-zero matrix (up to rounding of the centring) has no direction at all.
    if total <= 1e-12 * max(scale, 1e-300) * singular_values.numel():
        return 0.0
    distribution = singular_values / total
    distribution = distribution[distribution > 0]
    return float(torch.exp(-(distribution * torch.log(distribution)).sum()))


def collapse_statistics(
    query_embeddings: EmbeddingsLike, document_embeddings: EmbeddingsLike | None = None, k: int = 1
) -> dict[str, float]:
    """
    Collapse statistics of a query route and optionally of a document route.

    Args:
        query_embeddings: query-route embeddings, shape (n, dim).
        document_embeddings: document-route embeddings of the same ``n`` texts (row ``i`` of both from the same
            text), shape (n, dim), or None.
        k: neighbour rank of :func:`knn_kl_divergence`.

    Returns:
        ``query_mean_cosine``, ``query_std``, ``query_effective_rank`` (see :func:`mean_pairwise_cosine`,
        :func:`per_dimension_std`, :func:`effective_rank`); with documents also ``document_mean_cosine``,
        ``document_std``, ``document_effective_rank``, ``knn_kl`` (:func:`knn_kl_divergence` of KL(query || document))
        and ``paired_cosine`` (mean cosine between row ``i`` of the two routes).

    Raises:
        ValueError: if the inputs are not 2-D, have fewer than 2 rows, or the two routes differ in shape.
    """
    queries = _to_float64_tensor(query_embeddings, "query_embeddings")
    statistics = {
        "query_mean_cosine": mean_pairwise_cosine(queries),
        "query_std": per_dimension_std(queries),
        "query_effective_rank": effective_rank(queries),
    }
    if document_embeddings is None:
        return statistics

    documents = _to_float64_tensor(document_embeddings, "document_embeddings")
    if documents.shape != queries.shape:
        raise ValueError(
            "query_embeddings and document_embeddings must hold the embeddings of the same texts with the same "
            f"dimension, got shapes {tuple(queries.shape)} and {tuple(documents.shape)}"
        )
    statistics.update(
        {
            "document_mean_cosine": mean_pairwise_cosine(documents),
            "document_std": per_dimension_std(documents),
            "document_effective_rank": effective_rank(documents),
            "knn_kl": knn_kl_divergence(queries, documents, k=k),
            "paired_cosine": float((_normalize_rows(queries) * _normalize_rows(documents)).sum(dim=1).mean()),
        }
    )
    return statistics


def is_collapsed(
    statistics: dict[str, float],
    max_mean_cosine: float | None = DEFAULT_MAX_MEAN_COSINE,
    min_std: float | None = DEFAULT_MIN_STD,
) -> tuple[bool, str]:
    """
    Decide whether a route collapsed, from :func:`collapse_statistics`' output.

    Each route present in ``statistics`` (``query_*`` first, then ``document_*``) is collapsed if its mean pairwise
    cosine exceeds ``max_mean_cosine``, if its per-dimension std falls below ``min_std`` (see :data:`DEFAULT_MIN_STD`
    for the reasoning behind the default: about ``1 / sqrt(d)`` is the spread of uniformly spread unit vectors), or if
    either statistic is not finite (NaN embeddings, i.e. diverged training).

    Args:
        statistics: a dict with ``query_mean_cosine`` / ``query_std`` and/or ``document_mean_cosine`` /
            ``document_std``.
        max_mean_cosine: upper bound on the mean pairwise cosine; None disables the check.
        min_std: lower bound on the mean per-dimension std; None disables the check.

    Returns:
        ``(collapsed, reason)``; the reason names the route, the statistic, its value and the threshold, e.g.
        ``"the query route collapsed: mean cosine 0.9912 > 0.95 (max_mean_cosine)"``, and is ``""`` if nothing
        collapsed.

    Raises:
        ValueError: if ``statistics`` holds neither query nor document statistics.
    """
    routes = [
        route for route in ("query", "document") if f"{route}_mean_cosine" in statistics or f"{route}_std" in statistics
    ]
    if not routes:
        raise ValueError(
            "statistics must contain query_mean_cosine/query_std or document_mean_cosine/document_std, "
            f"got keys {sorted(statistics)}"
        )
    for route in routes:
        mean_cosine = statistics.get(f"{route}_mean_cosine")
        std = statistics.get(f"{route}_std")
        for label, value in (("mean cosine", mean_cosine), ("per-dimension std", std)):
            if value is not None and not math.isfinite(value):
                return True, f"the {route} route collapsed: {label} is {value} (non-finite embeddings)"
        if max_mean_cosine is not None and mean_cosine is not None and mean_cosine > max_mean_cosine:
            return True, (
                f"the {route} route collapsed: mean cosine {mean_cosine:.4f} > {max_mean_cosine:g} (max_mean_cosine)"
            )
        if min_std is not None and std is not None and std < min_std:
            return True, f"the {route} route collapsed: per-dimension std {std:.3g} < {min_std:g} (min_std)"
    return False, ""


class CollapseEvaluator(SentenceEvaluator):
    """
    Encodes validation texts with both routes of a model (``model.encode_query`` and ``model.encode_document``) and
    computes :func:`collapse_statistics`: the k-NN estimate of KL(query || document), the primary metric that DAFT's
    alignment stage early-stops on (lower is better), plus mean pairwise cosine, per-dimension std and effective rank
    of each route and the paired cosine between the two embeddings of each text.

    For a model without a :class:`~sentence_transformers.base.modules.Router` both routes are identical, the paired
    cosine is 1 and the KL estimate is meaningless (see :func:`knn_kl_divergence`).

    Args:
        texts: the validation texts, encoded by both routes (at least ``k + 1``).
        name: name of the evaluator, prefixed to the metric names.
        batch_size: batch size for encoding.
        show_progress_bar: show a progress bar while encoding.
        k: neighbour rank of the KL estimator.
        max_mean_cosine: threshold of :func:`is_collapsed`; a collapse is logged as a warning.
        min_std: threshold of :func:`is_collapsed`.
        write_csv: write the statistics to a CSV file in ``output_path``.

    Example:
        ::

            from st_daft.evaluation.collapse import CollapseEvaluator

            evaluator = CollapseEvaluator(texts=validation_queries, name="dev")
            results = evaluator(model)
            print(evaluator.primary_metric)
            # => "dev_knn_kl"
            print(results)
            # => {"dev_query_mean_cosine": 0.31, "dev_query_std": 0.029, "dev_query_effective_rank": 412.7,
            #     "dev_document_mean_cosine": 0.27, ..., "dev_knn_kl": 153.2, "dev_paired_cosine": 0.64}
    """

    def __init__(
        self,
        texts: list[str],
        name: str = "",
        batch_size: int = 32,
        show_progress_bar: bool = False,
        k: int = 1,
        max_mean_cosine: float | None = DEFAULT_MAX_MEAN_COSINE,
        min_std: float | None = DEFAULT_MIN_STD,
        write_csv: bool = True,
    ) -> None:
        super().__init__()
        texts = list(texts)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if len(texts) < k + 1:
            raise ValueError(f"CollapseEvaluator needs at least k + 1 = {k + 1} texts, got {len(texts)}")
        self.texts = texts
        self.name = name
        self.batch_size = batch_size
        self.show_progress_bar = show_progress_bar
        self.k = k
        self.max_mean_cosine = max_mean_cosine
        self.min_std = min_std
        self.write_csv = write_csv

        self.greater_is_better = False
        self.primary_metric = "knn_kl"
        self.csv_file = f"collapse_evaluation_{name}_results.csv" if name else "collapse_evaluation_results.csv"
        self.csv_headers = ["epoch", "steps", *STATISTIC_NAMES]

    def __call__(
        self, model: SentenceTransformer, output_path: str | None = None, epoch: int = -1, steps: int = -1
    ) -> dict[str, float]:
        if epoch != -1:
            if steps == -1:
                out_txt = f" after epoch {epoch}"
            else:
                out_txt = f" in epoch {epoch} after {steps} steps"
        else:
            out_txt = ""

        encode_kwargs = {
            "batch_size": self.batch_size,
            "show_progress_bar": self.show_progress_bar,
            "convert_to_numpy": True,
        }
        query_embeddings = model.encode_query(self.texts, **encode_kwargs)
        document_embeddings = model.encode_document(self.texts, **encode_kwargs)
        statistics = collapse_statistics(query_embeddings, document_embeddings, k=self.k)

        logger.info(f"Collapse evaluation of the model on the {self.name or 'validation'} texts{out_txt}:")
        logger.info(f"kNN KL(query || document) (k={self.k}): {statistics['knn_kl']:.4f}")
        logger.info(f"Paired cosine:           {statistics['paired_cosine']:.4f}")
        for route in ("query", "document"):
            logger.info(
                f"{route.capitalize():<8} mean cosine: {statistics[f'{route}_mean_cosine']:.4f}, "
                f"per-dim std: {statistics[f'{route}_std']:.4g}, "
                f"effective rank: {statistics[f'{route}_effective_rank']:.1f}"
            )
        collapsed, reason = is_collapsed(statistics, max_mean_cosine=self.max_mean_cosine, min_std=self.min_std)
        if collapsed:
            logger.warning(f"Collapse evaluation{out_txt}: {reason}")

        if output_path is not None and self.write_csv:
            os.makedirs(output_path, exist_ok=True)
            csv_path = os.path.join(output_path, self.csv_file)
            output_file_exists = os.path.isfile(csv_path)
            with open(csv_path, newline="", mode="a" if output_file_exists else "w", encoding="utf-8") as f:
                writer = csv.writer(f)
                if not output_file_exists:
                    writer.writerow(self.csv_headers)
                writer.writerow([epoch, steps, *(statistics[key] for key in STATISTIC_NAMES)])

        metrics = self.prefix_name_to_metrics(statistics, self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics

    def get_config_dict(self) -> dict[str, Any]:
        config_dict: dict[str, Any] = {}
        if self.k != 1:
            config_dict["k"] = self.k
        return config_dict


def warn_zero_query_vectors(embeddings: Any, inputs: Any = None, examples: int = 3) -> int:
    """Warn when some queries encode to the zero vector, and return how many do.

    A static query route maps a query none of whose tokens it knows (only punctuation, an unknown script) to the
    mean of no rows: the zero vector, which scores every document 0, so the ranking of that query is arbitrary.
    The warning names a few of them (``inputs``: the batches MTEB encodes, each with a ``"text"`` column).
    """
    vectors = np.asarray(embeddings.detach().cpu() if hasattr(embeddings, "detach") else embeddings)
    zero = np.flatnonzero(~np.any(vectors != 0, axis=1))
    if len(zero) == 0:
        return 0
    named = ""
    if inputs is not None:
        texts = [text for batch in inputs for text in batch.get("text", [])]
        if len(texts) == len(vectors):
            named = ", e.g. " + ", ".join(repr(texts[row][:60]) for row in zero[:examples])
    warnings.warn(
        f"{len(zero)} of {len(vectors)} queries encode to the zero vector with this query route{named}: they score "
        f"every document 0 and their ranking is arbitrary (a static route knows none of their tokens)",
        stacklevel=2,
    )
    return len(zero)
