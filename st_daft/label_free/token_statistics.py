"""Contextual token statistics of a corpus: for each token of the query tokenizer, the sum and count of the document
route's contextual output vectors over the corpus (the "aggregated" static embeddings of model2vec and tokenlearn),
computed once, sharded across a process group, and the documents' pooled embeddings beside them when asked.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling
from sentence_transformers.util import batch_to_device
from torch import Tensor
from tqdm.auto import tqdm

from st_daft.embeddings.store import document_encoder_key
from st_daft.models.asymmetric import DOCUMENT_ROUTE, QUERY_ROUTE, get_route
from st_daft.utils.distributed import (
    all_reduce_sum,
    compute_sharded,
    get_rank,
    get_world_size,
    is_main_process,
    local_shard,
)
from st_daft.utils.io import atomic_torch_save

logger = logging.getLogger(__name__)


_WORD_START_MARKERS = ("\u2581", "\u0120")


def _surface_form(token: str) -> str:
    """The text a vocabulary token stands for, without its tokenizer's word-boundary marker."""
    if token.startswith("##") and len(token) > 2:
        return token[2:]
    if token.startswith(_WORD_START_MARKERS) and len(token) > 1:
        return token[1:]
    return token


def mean_pooled_transformer(model: SentenceTransformer) -> str | None:
    """Why the document route's embedding is not a mean of its first module's token outputs; ``None`` when it is
    (a ``Transformer`` then mean ``Pooling``, nothing else before the ``Router``'s end)."""
    route = list(get_route(model, DOCUMENT_ROUTE))
    if len(route) != 2 or not isinstance(route[1], Pooling):
        return f"the document route is {[type(module).__name__ for module in route]}, not a Transformer and a Pooling"
    mode = route[1].get_config_dict().get("pooling_mode")
    if mode not in ("mean", ("mean",), ["mean"]):
        return f"the document route pools with {mode!r}, not 'mean'"
    return None


class TokenStatistics(NamedTuple):
    """What :func:`contextual_token_statistics` collects: per-row ``sums`` and ``counts`` of the document route's
    contextual token vectors, and the documents' embeddings when the pass was asked to keep them."""

    sums: Tensor
    counts: Tensor
    document_embeddings: Tensor | None = None


@torch.no_grad()
def contextual_token_statistics(
    model: SentenceTransformer,
    documents: Sequence[str],
    batch_size: int = 32,
    show_progress_bar: bool = True,
    cache_folder: str | Path | None = None,
    words: Sequence[str] = (),
    return_document_embeddings: bool = False,
) -> TokenStatistics:
    """Sum and count of the document route's contextual output vectors of every token over ``documents``.

    One pass of the document route's ``Transformer`` over the documents, truncated as the route truncates them;
    each non-special token's output vector is added to its token id's row. Under ``torchrun`` each process reads
    one shard of ``documents`` and the sums are all-reduced, so every process returns the same statistics.
    With a ``cache_folder`` the statistics are kept there, under a digest of the document route and the documents,
    and read back by a later call (a resumed run, another seed) instead of encoding the documents again.

    With ``words`` (whole words the document tokenizer splits into pieces, e.g. :func:`corpus_words`), every
    occurrence of a word also adds the mean of its pieces' output vectors to that word's row, appended after the
    vocabulary's rows in ``words``' order.

    With ``return_document_embeddings`` the same pass also yields each document's embedding by the whole document
    route (pooled, and through the modules after the ``Router``): what ``encode_document`` without a prompt returns,
    so a corpus cache need not encode the documents a second time.

    Returns:
        :class:`TokenStatistics`: ``sums``, ``(vocabulary size + len(words), dim)`` float32, and ``counts``,
        ``(vocabulary size + len(words),)`` float32, indexed by the document tokenizer's token ids, then by
        ``words``; with ``return_document_embeddings``, ``document_embeddings``, ``(len(documents), dim)`` float32
        in ``documents``' order (None otherwise, and when the statistics were read back from ``cache_folder``).
    """
    reason = mean_pooled_transformer(model)
    if reason is not None:
        raise ValueError(f"contextual token statistics need a mean-pooled document route: {reason}")
    cached = None
    if cache_folder is not None:
        digest = hashlib.blake2b(document_encoder_key(model).encode(), digest_size=16)
        for document in documents:
            digest.update(document.encode() + b"\x00")
        if words:
            digest.update(b"words\x00" + "\x00".join(words).encode())
        cached = Path(cache_folder) / f"token-statistics-{digest.hexdigest()}.pt"
        # Every process must take the same branch (the computation all-reduces): read back only if all see the file.
        (seen,) = all_reduce_sum(torch.tensor([float(cached.is_file())]))
        if seen.item() == get_world_size():
            statistics = torch.load(cached, map_location="cpu")
            logger.info("contextual token statistics read from %s", cached)
            return TokenStatistics(statistics["sums"], statistics["counts"])
    sums, counts, embeddings = _contextual_token_sums(
        model, documents, batch_size, show_progress_bar, words, keep_embeddings=return_document_embeddings
    )
    if cached is not None and is_main_process():
        atomic_torch_save({"sums": sums, "counts": counts}, cached)
    return TokenStatistics(sums, counts, embeddings)


def _contextual_token_sums(
    model: SentenceTransformer,
    documents: Sequence[str],
    batch_size: int,
    show_progress_bar: bool,
    words: Sequence[str] = (),
    keep_embeddings: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(sums, counts, document embeddings)``: the token statistics, all-reduced over the process group, and with
    ``keep_embeddings`` every document's embedding by the whole document route, all-gathered in ``documents``' order
    (else None: a sample of a large corpus is not held in memory for nothing)."""
    transformer = get_route(model, DOCUMENT_ROUTE)[0]
    tokenizer = transformer.tokenizer
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    vocabulary_size = max(len(tokenizer), transformer.auto_model.get_input_embeddings().num_embeddings)
    # Allocated before the pass: a process whose shard is empty (more processes than documents) still all-reduces.
    dimension = transformer.get_embedding_dimension()
    rows = vocabulary_size + len(words)
    sums = torch.zeros(rows, dimension, dtype=torch.float32, device=model.device)
    counts = torch.zeros(rows, dtype=torch.float32, device=model.device)
    word_rows = {word: vocabulary_size + index for index, word in enumerate(words)}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if word_rows else []

    def read_shard(shard: list[str], show: bool) -> Tensor:
        # Length-sorted batches pad little; the sums do not depend on the order, the embeddings are put back in it.
        order = sorted(range(len(shard)), key=lambda index: len(shard[index]))
        pooled = []
        texts = [shard[i] for i in order]
        for features in _document_batches(model, model, texts, batch_size, "Contextual token vectors", show):
            # The whole route: its Transformer's token outputs for the statistics, its pooled output for the cache.
            output = model(features, task=DOCUMENT_ROUTE)
            outputs = output["token_embeddings"].float()
            if keep_embeddings:
                pooled.append(output["sentence_embedding"].float().cpu())
            ids = features["input_ids"]
            keep = features["attention_mask"].bool() & ~torch.isin(ids, special.to(ids.device))
            sums.index_add_(0, ids[keep], outputs[keep])
            counts.index_add_(0, ids[keep], torch.ones_like(ids[keep], dtype=torch.float32))
            if word_rows:
                _add_word_means(sums, counts, outputs, ids, keep, pieces, word_rows)
        if not pooled:
            return torch.zeros(0, dimension)
        embeddings = torch.cat(pooled)
        embeddings[torch.tensor(order)] = embeddings.clone()
        return embeddings

    embeddings = None
    if keep_embeddings:
        embeddings = compute_sharded(list(documents), read_shard, show_progress_bar, like=model.device)
    elif shard := local_shard(list(documents)):  # the shard compute_sharded would read, nothing gathered
        read_shard(shard, show_progress_bar and get_rank() == 0)
    sums, counts = all_reduce_sum(sums, counts)
    return sums.cpu(), counts.cpu(), embeddings


def _add_word_means(
    sums: Tensor,
    counts: Tensor,
    outputs: Tensor,
    ids: Tensor,
    keep: Tensor,
    pieces: list[str],
    word_rows: dict[str, int],
) -> None:
    """Add, for every occurrence in the batch of a word of ``word_rows``, the mean of its pieces' output vectors to
    that word's row, in one ``index_add_`` per batch (no per-occurrence device work)."""
    positions, occurrences, targets = [], [], []
    for row, word_positions, word in _split_words(ids, keep, pieces):
        if word in word_rows:
            positions += [row * ids.shape[1] + position for position in word_positions]
            occurrences += [len(targets)] * len(word_positions)
            targets.append(word_rows[word])
    if not targets:
        return
    device = outputs.device
    flat = outputs.reshape(-1, outputs.shape[-1])[torch.tensor(positions, device=device)]
    occurrence = torch.tensor(occurrences, device=device)
    means = torch.zeros(len(targets), flat.shape[1], device=device).index_add_(0, occurrence, flat)
    means /= torch.bincount(occurrence, minlength=len(targets)).unsqueeze(1)
    target_rows = torch.tensor(targets, device=device)
    sums.index_add_(0, target_rows, means)
    counts.index_add_(0, target_rows, torch.ones(len(targets), device=device))


def _split_words(ids: Tensor, keep: Tensor, pieces: list[str]) -> Iterator[tuple[int, list[int], str]]:
    """``(row, positions, word)`` for every word of a batch that WordPiece split into several pieces: a word is a
    piece without ``##`` and the ``##`` pieces that follow it."""
    for row, (row_ids, row_keep) in enumerate(zip(ids.tolist(), keep.tolist())):
        positions: list[int] = []
        # A final left-out position closes the row's last word.
        for position, (token_id, kept) in enumerate(zip([*row_ids, 0], [*row_keep, False])):
            if kept and positions and pieces[token_id].startswith("##"):
                positions.append(position)
                continue
            if len(positions) > 1:
                yield row, positions, "".join(_surface_form(pieces[row_ids[p]]) for p in positions)
            positions = [position] if kept else []


def contextual_token_vectors(
    model: SentenceTransformer, sums: Tensor, counts: Tensor, words: Sequence[str] = ()
) -> tuple[Tensor, Tensor]:
    """The mean contextual vector of each row of the static query table, from :func:`contextual_token_statistics`.

    Document-tokenizer ids are matched to static rows by token string, so the static route may have its own
    tokenizer; the rows after the document vocabulary's are ``words``' (as passed to
    :func:`contextual_token_statistics`), matched to the static rows of those words. Returns ``(vectors, counts)``
    over the static table's rows (rows nothing matched: count 0, zero vector).
    """
    static = get_route(model, QUERY_ROUTE)[0]
    document_tokenizer = get_route(model, DOCUMENT_ROUTE)[0].tokenizer
    static_vocabulary = static.tokenizer.get_vocab()
    vocabulary_size = sums.shape[0] - len(words)
    seen = torch.nonzero(counts > 0).squeeze(1).tolist()  # ascending: the token rows, then the words'
    tokens = document_tokenizer.convert_ids_to_tokens([i for i in seen if i < vocabulary_size])
    tokens += [words[i - vocabulary_size] for i in seen if i >= vocabulary_size]
    pairs = [(i, static_vocabulary[token]) for i, token in zip(seen, tokens) if token in static_vocabulary]
    vectors = torch.zeros(static.num_embeddings, sums.shape[1])
    row_counts = torch.zeros(static.num_embeddings)
    if pairs:
        source, target = (torch.tensor(column, dtype=torch.long) for column in zip(*pairs))
        vectors.index_add_(0, target, sums[source].float())
        row_counts.index_add_(0, target, counts[source].float())
    used = row_counts > 0
    vectors[used] /= row_counts[used, None]
    return vectors, row_counts


def _document_batches(
    model: SentenceTransformer,
    module: torch.nn.Module,
    texts: Sequence[str],
    batch_size: int,
    description: str,
    show_progress_bar: bool,
) -> Iterator[dict[str, Any]]:
    """The document route's preprocessed batches of ``texts`` on the model's device, with ``module`` in eval mode
    (no dropout) while they are read and back in its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=description, disable=not show_progress_bar):
            features = model.preprocess(list(texts[start : start + batch_size]), task=DOCUMENT_ROUTE)
            yield batch_to_device(features, model.device)
    finally:
        module.train(was_training)
