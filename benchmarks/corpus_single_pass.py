"""The corpus read once or twice by the document route in a corpus-only static run: time and equality.

Usage::

    python benchmarks/corpus_single_pass.py --data ../shared/data/python-faq \
        --output benchmarks/results/sixteenth_session/corpus_single_pass_python_faq.json

A corpus-only static run reads its corpus with the document route for the vocabulary stage's contextual token
statistics, then the corpus stage needs the corpus cache (every document's embedding). Both arms run here in one
process on the same model, in three rounds (one pass, two passes, one pass again; the one-pass figure is the mean of
its two rounds), with the vocabulary stage's defaults for a corpus alone (batch 32, the corpus words it would add):

- ``two passes`` (st-daft up to 547394a): the statistics pass, then ``StaleEmbeddingCache.build``;
- ``one pass``: the statistics pass keeping its pooled outputs
  (``contextual_token_statistics(..., return_document_embeddings=True)``), then
  ``StaleEmbeddingCache.from_embeddings``.

Recorded: each arm's seconds, their ratio, the largest absolute difference between the two caches' embeddings and
between the two arms' token statistics. No document store: both arms encode.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from st_daft import StaleEmbeddingCache, build_asymmetric_model, get_route, load_beir
from st_daft.label_free.token_statistics import contextual_token_statistics
from st_daft.label_free.vocabulary import corpus_words
from st_daft.models.asymmetric import QUERY_ROUTE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a BEIR folder (its corpus.jsonl is read)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--words", type=int, default=20000, help="corpus words, as the vocabulary stage adds")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    corpus = load_beir(args.data, args.split, empty_texts="warn").corpus
    documents = list(corpus.values())
    model = build_asymmetric_model(query_encoder="static")
    static = get_route(model, QUERY_ROUTE)[0]
    words = corpus_words(static.tokenizer, documents, args.words, 2) if args.words else []

    def one_pass() -> tuple[float, torch.Tensor, torch.Tensor, StaleEmbeddingCache]:
        start = time.perf_counter()
        sums, counts, embeddings = contextual_token_statistics(
            model, documents, words=words, return_document_embeddings=True
        )
        cache = StaleEmbeddingCache.from_embeddings(model, corpus, embeddings)
        return time.perf_counter() - start, sums, counts, cache

    # One pass, two passes, one pass again: a slower first (or last) round weighs on both arms alike.
    first, sums, counts, one_cache = one_pass()
    start = time.perf_counter()
    two_sums, two_counts, _ = contextual_token_statistics(model, documents, words=words)
    statistics_pass = time.perf_counter() - start
    two_cache = StaleEmbeddingCache.build(model, corpus)
    two_passes = time.perf_counter() - start
    last, *_ = one_pass()
    one_pass_seconds = (first + last) / 2

    assert one_cache.ids == two_cache.ids and one_cache.keys == two_cache.keys
    results = {
        "data": str(args.data),
        "documents": len(documents),
        "corpus_words": len(words),
        "seconds": {
            "one pass (first round)": round(first, 1),
            "two passes": round(two_passes, 1),
            "two passes: the statistics pass": round(statistics_pass, 1),
            "two passes: StaleEmbeddingCache.build": round(two_passes - statistics_pass, 1),
            "one pass (third round)": round(last, 1),
        },
        "one_pass_over_two_passes": round(one_pass_seconds / two_passes, 3),
        "cache_max_abs_diff": float((one_cache.embeddings - two_cache.embeddings).abs().max()),
        "statistics_max_abs_diff": float((sums - two_sums).abs().max()),
        "counts_equal": bool(torch.equal(counts, two_counts)),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    print(json.dumps(results, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
