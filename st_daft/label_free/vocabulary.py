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
tokenlearn model this fit stayed far from the distilled vectors, and the route far below the static table after the
corpus and align stages; the ``tokenlearn`` query encoder was removed for it: docs/results/experiments.md.)

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

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, StaticEmbedding
from tokenizers import Tokenizer
from torch import Tensor

from st_daft.embeddings.store import DocumentEmbeddingStore
from st_daft.label_free.token_statistics import (
    TokenStatistics,
    _document_batches,
    _surface_form,
    contextual_token_vectors,
)
from st_daft.models.asymmetric import DOCUMENT_ROUTE, QUERY_ROUTE, get_route
from st_daft.utils.distributed import (
    compute_sharded,
)

logger = logging.getLogger(__name__)


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
