"""Vocabulary-level initialisation of static query routes from the document route.

A static query route trained on a few hundred queries only moves the tokens those queries contain; every other
token keeps whatever vector it started with, so the route fails on queries unlike its training ones. Distilling the
whole vocabulary first (the idea behind model2vec, Tulkens & van Dongen 2024) gives every token a start inside the
document encoder's space: each token of the query tokenizer's vocabulary is embedded, as a one-token text, by the
frozen document route, and the static table is set to those vectors, optionally weighted so that frequent tokens
count less in the mean (model2vec's Zipf weighting, ``log(1 + rank)``, with tokenizer ids as the rank proxy).

model2vec's own ``distill`` needs its ``distill`` extra, which pins ``transformers<5.4``; sentence-transformers 6
needs a newer transformers, so the few lines it takes live here instead.

For a static route whose table is narrower than the document space (a narrow model2vec folder as query encoder +
``Dense``), the table is kept and the projection is fitted instead: the ``Dense`` weights become the
ridge-regression map from the token vectors to their distilled document-space vectors. (For the 64-d
tokenlearn model this fit reached a mean cosine of only 0.205, and the route 0.363 SciFact nDCG@10 after the
corpus and align stages; the ``tokenlearn`` query encoder was removed for it.)

A token embedded alone is a poor stand-in for the same token inside a sentence. When the document route mean-pools
its token outputs (all-MiniLM-L6-v2 does), a document's embedding *is* the mean of its contextual token vectors, so
the static table closest to the document route on a given corpus holds, for every token, the mean of that token's
contextual output vectors over the corpus (the "aggregated" static embeddings of Bommasani, Davis & Cardie, ACL
2020, https://aclanthology.org/2020.acl-main.431, here in the document encoder's own output space).
:func:`contextual_token_statistics` collects those sums in one pass of the document route over (a sample of) the
corpus, and :func:`initialize_static_route` uses them for every token the corpus contains, the one-token vectors for
the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Pooling, StaticEmbedding
from sentence_transformers.util import batch_to_device
from tokenizers import Tokenizer
from torch import Tensor
from tqdm.auto import tqdm

from st_daft.distributed import (
    all_reduce_sum,
    compute_sharded,
    get_rank,
    get_world_size,
    is_main_process,
    local_shard,
)
from st_daft.io import atomic_torch_save
from st_daft.model import DOCUMENT_ROUTE, QUERY_ROUTE, get_route
from st_daft.store import DocumentEmbeddingStore, document_encoder_key

logger = logging.getLogger(__name__)

__all__ = [
    "TokenStatistics",
    "add_words_to_static_route",
    "contextual_token_statistics",
    "contextual_token_vectors",
    "corpus_token_weights",
    "corpus_words",
    "corpus_words_unsupported",
    "distill_token_embeddings",
    "initialize_static_route",
    "mean_pooled_transformer",
    "reweight_static_route",
    "vocabulary_texts",
]


def vocabulary_texts(static: StaticEmbedding) -> list[str]:
    """One text per row of the static table: its token without word-boundary markers (WordPiece ``##``,
    SentencePiece ``▁``, byte-level BPE ``Ġ``); ``""`` for rows no token uses."""
    vocabulary = static.tokenizer.get_vocab()
    texts = [""] * static.num_embeddings
    for token, index in vocabulary.items():
        if index >= len(texts):
            raise ValueError(
                f"token {token!r} has id {index} but the static table has only {static.num_embeddings} rows"
            )
        texts[index] = _surface_form(token)
    return texts


# Word-boundary markers of subword vocabularies: SentencePiece "▁" and byte-level BPE "Ġ" start a word; WordPiece
# "##" continues one. The document tokenizer would read them as characters (MiniLM's: [UNK]), so they are removed.
_WORD_START_MARKERS = ("\u2581", "\u0120")


def _surface_form(token: str) -> str:
    """The text a vocabulary token stands for, without its tokenizer's word-boundary marker."""
    if token.startswith("##") and len(token) > 2:
        return token[2:]
    if token.startswith(_WORD_START_MARKERS) and len(token) > 1:
        return token[1:]
    return token


@torch.no_grad()
def distill_token_embeddings(
    model: SentenceTransformer,
    texts: list[str],
    batch_size: int = 1024,
    show_progress_bar: bool = True,
    store: DocumentEmbeddingStore | None = None,
) -> Tensor:
    """Embed each text (a vocabulary token) with the document route, before normalisation.

    Returns ``(len(texts), dim)`` float32 embeddings; empty texts get a zero vector. With a ``store``, vectors an
    earlier run distilled through the same document route are read back. Under ``torchrun`` each process distils
    ``1/world_size`` of the texts and every process gets all the rows.
    """

    def distill(shard: list[str], show: bool) -> Tensor:
        if store is None:
            return _distill_token_embeddings(model, shard, batch_size, show)
        vectors = store.embeddings(
            model,
            shard,
            lambda missing: _distill_token_embeddings(model, missing, batch_size, show).numpy(),
            kind="vocabulary",
        )
        return torch.from_numpy(vectors)

    return compute_sharded(texts, distill, show_progress_bar, like=model.device)


def _distill_token_embeddings(
    model: SentenceTransformer, texts: list[str], batch_size: int, show_progress_bar: bool
) -> Tensor:
    document_route = get_route(model, DOCUMENT_ROUTE)
    outputs: list[Tensor] = []
    inputs = [text if text.strip() else "[UNK]" for text in texts]
    batches = _document_batches(model, document_route, inputs, batch_size, "Distilling vocabulary", show_progress_bar)
    for features in batches:
        for module in document_route:
            features = module(features)
        outputs.append(features["sentence_embedding"].float().cpu())
    embeddings = torch.cat(outputs)
    empty = torch.tensor([not text.strip() for text in texts])
    embeddings[empty] = 0.0
    return embeddings


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


def _zipf_weights(count: int) -> Tensor:
    # Tokenizer ids roughly follow frequency for WordPiece/BPE vocabularies; log(1 + rank) as in model2vec.
    return torch.log1p(torch.arange(count, dtype=torch.float32) + 1.0)


def initialize_static_route(
    model: SentenceTransformer,
    zipf_weighting: bool = True,
    center: bool = True,
    ridge: float = 1e-2,
    max_fit_tokens: int = 30000,
    batch_size: int = 1024,
    show_progress_bar: bool = True,
    seed: int = 0,
    store: DocumentEmbeddingStore | None = None,
    keep_scale: bool = True,
    contextual: TokenStatistics | tuple[Tensor, Tensor] | None = None,
    contextual_words: Sequence[str] = (),
) -> dict[str, float]:
    """Initialise the model's static query route from document-route embeddings of its whole vocabulary.

    - A table as wide as the document space is replaced by the distilled vectors, centred (the mean token vector,
      a direction every one-token text shares, removed: without it every mean of tokens points the same way),
      normalised and Zipf-weighted; with ``keep_scale`` it is then rescaled to the old table's mean row norm (the
      route's outputs do not change, but the learning rates that suit the old table keep suiting it).
    - A narrower table followed by a ``Dense`` projection keeps its vectors; the projection is fitted by ridge
      regression onto the distilled vectors of a random sample of ``max_fit_tokens`` tokens (a 65-parameter-wide
      regression needs no more, and distilling a 270k-token vocabulary would take many minutes).
    - With ``contextual`` (:func:`contextual_token_statistics` over a corpus, or its ``(sums, counts)``), every token
      the corpus contains gets its mean contextual vector instead of its one-token vector, centred on the mean of
      all token occurrences (the direction every contextual vector shares) and normalised like the others;
      ``contextual_words`` are the ``words`` the statistics were collected with.

    Returns:
        ``{"tokens": vocabulary size, "fit_cosine": mean cosine between the route's token vectors and the
        distilled ones after initialisation, "contextual_tokens": rows set from contextual vectors}``.
    """
    query_route = list(get_route(model, QUERY_ROUTE))
    static = query_route[0]
    if not isinstance(static, StaticEmbedding):
        raise ValueError(
            f"vocabulary initialisation needs a static query route, found {type(static).__name__}; "
            "use it with --query-encoder static or a model2vec folder"
        )
    texts = vocabulary_texts(static)
    weight = static.embedding.weight
    projection = query_route[1] if len(query_route) > 1 and isinstance(query_route[1], Dense) else None
    rows = torch.arange(len(texts))
    if projection is not None and len(texts) > max_fit_tokens:
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(len(texts), generator=generator)[:max_fit_tokens].sort().values
    targets = distill_token_embeddings(
        model, [texts[i] for i in rows], batch_size=batch_size, show_progress_bar=show_progress_bar, store=store
    )
    used = torch.tensor([bool(texts[i].strip()) for i in rows.tolist()])
    if center:
        targets[used] -= targets[used].mean(dim=0)
    targets = torch.nn.functional.normalize(targets, dim=1)
    contextual_rows = 0
    if contextual is not None:
        vectors, counts = contextual_token_vectors(model, contextual[0], contextual[1], words=contextual_words)
        vectors, counts = vectors[rows], counts[rows]
        seen = counts > 0
        if seen.any():
            occurrence_mean = (vectors[seen] * counts[seen, None]).sum(dim=0) / counts[seen].sum()
            targets[seen] = torch.nn.functional.normalize(vectors[seen] - occurrence_mean, dim=1)
            used |= seen
        contextual_rows = int(seen.sum())
    if weight.shape[1] == targets.shape[1] and projection is None:
        scaled = targets * (_zipf_weights(len(texts))[:, None] if zipf_weighting else 1.0)
        if keep_scale:
            # Mean pooling then normalisation ignore a global scale, so this leaves every output unchanged; it keeps
            # Adam's fixed-size steps as large, relative to the vectors, as they were on the original table.
            old_norm, new_norm = weight.detach().float().norm(dim=1).mean(), scaled[used].norm(dim=1).mean()
            if old_norm > 0 and new_norm > 0:
                scaled = scaled * (old_norm / new_norm).item()
        with torch.no_grad():
            weight.copy_(scaled.to(weight.dtype))
        fitted = targets
    elif projection is not None and projection.out_features == targets.shape[1]:
        fitted = _fit_projection(weight.detach().float().cpu()[rows], targets, projection, ridge)
    else:
        raise ValueError(
            f"static table of width {weight.shape[1]} needs a Dense projection to the document dimension "
            f"{targets.shape[1]}"
        )
    fit_cosine = torch.nn.functional.cosine_similarity(fitted[used], targets[used], dim=1).mean().item()
    logger.info(
        "vocabulary initialisation: %d tokens (%d from contextual vectors), mean cosine to the targets %.3f",
        len(rows),
        contextual_rows,
        fit_cosine,
    )
    return {"tokens": float(len(rows)), "fit_cosine": fit_cosine, "contextual_tokens": float(contextual_rows)}


def _fit_projection(tokens: Tensor, targets: Tensor, projection: Dense, ridge: float) -> Tensor:
    """Ridge regression ``[tokens, 1] @ W ~ targets``; writes W into the Dense layer, returns the fit."""
    inputs = torch.cat([tokens, torch.ones(tokens.shape[0], 1)], dim=1).double()
    gram = inputs.T @ inputs
    # The penalty is relative to the features' own scale (their mean squared value), so a table stored at any scale
    # (model2vec tables with folded weights are small) gets the same shrinkage; the bias is not penalised.
    features = tokens.shape[1]
    penalty = ridge * torch.diagonal(gram)[:features].mean()
    gram[:features, :features] += penalty * torch.eye(features, dtype=gram.dtype)
    solution = torch.linalg.solve(gram, inputs.T @ targets.double())
    with torch.no_grad():
        projection.linear.weight.copy_(solution[:-1].T.float())
        if projection.linear.bias is not None:
            projection.linear.bias.copy_(solution[-1].float())
    return (inputs @ solution).float()


def corpus_token_weights(static: StaticEmbedding, documents: Iterable[str], batch_size: int = 1024) -> Tensor:
    """BM25's inverse document frequency of every row of a static table over ``documents``.

    ``log(1 + (N - df + 0.5) / (df + 0.5))`` with ``df`` the number of documents whose tokens (the static route's
    own tokenizer) include the row's token; a token no document uses gets the largest weight, ``log(1 + 2N + 1)``.
    """
    documents = list(documents)
    if not documents:
        raise ValueError("corpus_token_weights needs at least one document")
    frequency = torch.zeros(static.num_embeddings, dtype=torch.float64)
    for start in range(0, len(documents), batch_size):
        for encoding in static.tokenizer.encode_batch(documents[start : start + batch_size], add_special_tokens=False):
            frequency[torch.tensor(sorted(set(encoding.ids)), dtype=torch.long)] += 1
    count = len(documents)
    return torch.log1p((count - frequency + 0.5) / (frequency + 0.5)).float()


def reweight_static_route(model: SentenceTransformer, weights: Tensor, keep_scale: bool = True) -> None:
    """Give every row of the static query table the norm ``weights[row]``, keeping its direction.

    A static route mean-pools its token vectors, so a row's norm is that token's weight in every query: with
    :func:`corpus_token_weights` rare words of the corpus count more than common ones, as in BM25 (an alternative to
    the Zipf weighting of :func:`initialize_static_route`, which uses tokenizer ids as a frequency proxy). With
    ``keep_scale`` the table is then rescaled to its previous mean row norm (same outputs; see
    :func:`initialize_static_route`).
    """
    static = get_route(model, QUERY_ROUTE)[0]
    if not isinstance(static, StaticEmbedding):
        raise ValueError(f"token weights need a static query route, found {type(static).__name__}")
    weight = static.embedding.weight
    if weights.shape != (weight.shape[0],):
        raise ValueError(f"expected one weight per table row ({weight.shape[0]}), got shape {tuple(weights.shape)}")
    with torch.no_grad():
        table = weight.detach().float()
        norms = table.norm(dim=1, keepdim=True)
        used = norms.squeeze(1) > 0
        scaled = torch.where(norms > 0, table / norms.clamp_min(1e-12), table) * weights.float()[:, None]
        if keep_scale and used.any():
            new_norm = scaled[used].norm(dim=1).mean()
            if new_norm > 0:
                scaled = scaled * (norms.squeeze(1)[used].mean() / new_norm)
        weight.copy_(scaled.to(weight.dtype))


def corpus_words(
    tokenizer: Tokenizer, documents: Iterable[str], max_words: int, min_document_frequency: int = 2
) -> list[str]:
    """The corpus's most widespread words that ``tokenizer`` splits into several tokens, most documents first.

    Words are what the tokenizer's own normaliser and pre-tokeniser make of the text (lower-cased, split at spaces and
    punctuation for BERT's); a word counts once per document. Words without a letter are skipped (numbers and
    symbols carry little meaning alone), as are words in fewer than ``min_document_frequency`` documents (a word a
    single document holds cannot be learnt from the rest of the corpus). Ties keep first-seen order.
    """
    if max_words < 0 or min_document_frequency < 1:
        raise ValueError(
            f"corpus_words needs max_words >= 0 and min_document_frequency >= 1, got {max_words} and "
            f"{min_document_frequency}"
        )
    vocabulary = tokenizer.get_vocab()
    normalizer, pre_tokenizer = tokenizer.normalizer, tokenizer.pre_tokenizer
    frequency: Counter[str] = Counter()
    for document in documents:
        text = normalizer.normalize_str(document) if normalizer is not None else document
        words = [word for word, _ in pre_tokenizer.pre_tokenize_str(text)] if pre_tokenizer else text.split()
        frequency.update(dict.fromkeys(words).keys())  # once per document, in first-seen order
    candidates = [
        (word, count)
        for word, count in frequency.items()
        if count >= min_document_frequency and word not in vocabulary and any(ch.isalpha() for ch in word)
    ]
    candidates.sort(key=lambda pair: -pair[1])
    return [word for word, _ in candidates[:max_words]]


def corpus_words_unsupported(model: SentenceTransformer) -> str | None:
    """Why :func:`add_words_to_static_route` cannot extend ``model``'s query route; ``None`` when it can (a
    ``StaticEmbedding`` as wide as the route's output, nothing after it, and a WordPiece tokenizer)."""
    route = list(get_route(model, QUERY_ROUTE))
    if not route or not isinstance(route[0], StaticEmbedding):
        return "the query route does not start with a StaticEmbedding"
    if len(route) > 1:
        # A narrow table behind a projection keeps its rows in the vocabulary stage: new rows would stay zero.
        return f"the static table is followed by {[type(module).__name__ for module in route[1:]]}"
    kind = json.loads(route[0].tokenizer.to_str()).get("model", {}).get("type")
    if kind != "WordPiece":
        return f"the query tokenizer is {kind}, not WordPiece (as all-MiniLM-L6-v2's)"
    return None


def add_words_to_static_route(model: SentenceTransformer, words: Sequence[str]) -> int:
    """Give each of ``words`` its own row in the static query route: a whole-word token in the route's tokenizer.

    A static route means its token rows, so a word the tokenizer splits into pieces (``hypoxia`` -> ``h ##yp ##ox
    ##ia``) is the mean of the pieces' rows, which other words share: the route cannot tell the word from its pieces'
    other uses, where BM25 matches it exactly. With its own row the word gets a vector of its own (model2vec's
    vocabulary extension; Tulkens & van Dongen 2024). The words are appended to the WordPiece vocabulary, whose
    longest-match-first rule then picks the whole word; only the query route's tokenizer changes, the document
    route reads text as before. New rows start at zero (:func:`initialize_static_route` sets them).

    The route's ``EmbeddingBag`` is replaced by a larger one, so call this before an optimizer holds the table's
    parameter (the vocabulary stage does, before any trainer is built); an optimizer built earlier would keep
    updating the old table.

    Returns:
        The number of rows added (words already in the vocabulary are skipped).
    """
    reason = corpus_words_unsupported(model)
    if reason is not None:
        raise ValueError(f"corpus words cannot be added: {reason}")
    static = get_route(model, QUERY_ROUTE)[0]
    state = json.loads(static.tokenizer.to_str())
    vocabulary: dict[str, int] = state["model"]["vocab"]
    taken = set(vocabulary) | {token["content"] for token in state.get("added_tokens", [])}
    next_id = max([*vocabulary.values(), *(t["id"] for t in state.get("added_tokens", []))], default=-1) + 1
    new_words = [word for word in dict.fromkeys(words) if word and word not in taken]
    if next_id != static.num_embeddings:
        raise ValueError(
            f"the query tokenizer's ids end at {next_id - 1} but the static table has {static.num_embeddings} rows"
        )
    for offset, word in enumerate(new_words):
        vocabulary[word] = next_id + offset
    tokenizer = Tokenizer.from_str(json.dumps(state))
    tokenizer.no_padding()
    old = static.embedding
    table = torch.zeros(old.num_embeddings + len(new_words), old.embedding_dim, dtype=old.weight.dtype)
    table[: old.num_embeddings] = old.weight.detach().cpu()
    embedding = torch.nn.EmbeddingBag.from_pretrained(table, freeze=False, mode=old.mode)
    static.embedding = embedding.to(old.weight.device)
    static.num_embeddings = static.embedding.num_embeddings
    static.tokenizer = tokenizer
    return len(new_words)
