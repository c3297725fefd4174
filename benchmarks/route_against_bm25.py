"""Is a route's nDCG@10 difference from BM25 beyond the noise of the claims? A paired bootstrap per split.

Question: Is a route's difference from BM25 beyond the noise of the claims?
Command: ``python benchmarks/route_against_bm25.py RUN [RUN ...] --data ../shared/data/scifact --output
    benchmarks/results/experiments/route_against_bm25/route_against_bm25.json``
Results: benchmarks/results/experiments/route_against_bm25/
Page: docs/results/experiments.md


For each route and split (SciFact test and training claims), every claim's nDCG@10 under the route and under BM25
(bm25s, Snowball stemmer, as ``st-daft evaluate --baseline bm25``); the mean difference, a 95% interval from 10,000
paired bootstrap resamples of the claims, and how many claims each wins. Both splits pooled too (1,109 claims).

    python benchmarks/route_against_bm25.py RUN [RUN ...] --data ../shared/data/scifact --document-store S \
        --output benchmarks/results/experiments/route_against_bm25/route_against_bm25.json [--feedback]
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from st_daft import DocumentEmbeddingStore, RetrievalData, load_beir
from st_daft.evaluation.baselines import BM25Search
from st_daft.models.asymmetric import default_document_encoder


def top_100_run(scores: np.ndarray | torch.Tensor, data: RetrievalData, document_ids: list[str]) -> dict:
    """The run (query id -> {document id: score}, 100 best) of a (queries, documents) score matrix."""
    values, rows = torch.as_tensor(np.asarray(scores, dtype=np.float32)).topk(100, dim=1)
    return {
        query_id: {document_ids[r]: float(v) for r, v in zip(rs.tolist(), vs.tolist())}
        for query_id, rs, vs in zip(data.queries, rows, values)
    }


def query_vectors(model: SentenceTransformer, data: RetrievalData) -> np.ndarray:
    return np.asarray(model.encode_query(list(data.queries.values()), normalize_embeddings=True), dtype=np.float32)


def per_query_ndcg(scores: np.ndarray, data: RetrievalData, document_ids: list[str]) -> np.ndarray:
    import pytrec_eval

    run = top_100_run(scores, data, document_ids)
    judged = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10"}).evaluate(run)
    return np.array([judged.get(query_id, {}).get("ndcg_cut_10", 0.0) for query_id in data.queries])


def corpus_vectors(encoder: SentenceTransformer, texts: list[str], store: DocumentEmbeddingStore | None) -> np.ndarray:
    """The documents' embeddings as float32, from ``store`` when given (computed once and kept there)."""
    if store is not None:
        return np.asarray(store.encode_document(encoder, texts, show_progress_bar=True), dtype=np.float32)
    return np.asarray(encoder.encode_document(texts, show_progress_bar=True), dtype=np.float32)


def bm25_scores(bm25: BM25Search, data: RetrievalData, documents: int, depth: int, dtype=np.float32) -> np.ndarray:
    """A (queries, documents) matrix of each query's BM25 scores over its best (``depth`` best; 0 elsewhere)."""
    rows, normalised = bm25.normalised_top_k(list(data.queries.values()), depth)
    scores = np.zeros((len(data.queries), documents), dtype=dtype)
    np.put_along_axis(scores, rows, normalised.astype(dtype), axis=1)
    return scores


def paired_difference(route: np.ndarray, lexical: np.ndarray, resamples: int = 10_000) -> dict:
    """Mean of route - lexical over the claims, a 95% paired bootstrap interval, and wins."""
    difference = route - lexical
    draws = np.random.default_rng(0).integers(0, len(difference), size=(resamples, len(difference)))
    means = difference[draws].mean(axis=1)
    return {
        "claims": len(difference),
        "route": round(float(route.mean()), 4),
        "bm25": round(float(lexical.mean()), 4),
        "difference": round(float(difference.mean()), 4),
        "95% interval": [round(float(v), 4) for v in np.percentile(means, [2.5, 97.5])],
        "route wins": int((difference > 1e-9).sum()),
        "bm25 wins": int((difference < -1e-9).sum()),
    }


def feedback_grid(queries: np.ndarray, corpus: np.ndarray, data: RetrievalData, ids: list[str]) -> dict:
    """nDCG@10 of Rocchio feedback for k best documents and weight beta (``k0`` is the route as it is)."""
    scores = queries @ corpus.T
    grid = {"k0": round(float(per_query_ndcg(scores, data, ids).mean()), 4)}
    best = np.argsort(-scores, axis=1)
    for k in (1, 3, 5, 10):
        centroid = corpus[best[:, :k]].mean(axis=1)
        for beta in (0.25, 0.5, 1.0):
            moved = queries + beta * centroid
            moved /= np.linalg.norm(moved, axis=1, keepdims=True)
            grid[f"k{k} beta{beta:g}"] = round(float(per_query_ndcg(moved @ corpus.T, data, ids).mean()), 4)
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("routes", nargs="+", help="trained route folders")
    parser.add_argument("--data", required=True, help="a BEIR folder with test and train qrels")
    parser.add_argument("--document-store", default=None)
    parser.add_argument("--output", required=True, help="JSON file for the figures")
    parser.add_argument("--feedback", action="store_true", help="also score Rocchio pseudo-relevance feedback")
    args = parser.parse_args()
    encoder = SentenceTransformer(default_document_encoder())
    splits = {split: load_beir(args.data, split=split, empty_texts="warn") for split in ("test", "train")}
    ids = list(splits["test"].corpus)
    texts = [splits["test"].corpus[d] for d in ids]
    store = DocumentEmbeddingStore(args.document_store) if args.document_store else None
    corpus = corpus_vectors(encoder, texts, store)
    bm25 = BM25Search().fit(texts)
    lexical_per_query = {
        split: per_query_ndcg(bm25_scores(bm25, data, len(texts), 1000), data, ids) for split, data in splits.items()
    }
    result: dict = {}
    for route in args.routes:
        model = SentenceTransformer(route)
        vectors = {split: query_vectors(model, data) for split, data in splits.items()}
        route_per_query = {
            split: per_query_ndcg(vectors[split] @ corpus.T, data, ids) for split, data in splits.items()
        }
        entry = {split: paired_difference(route_per_query[split], lexical_per_query[split]) for split in splits}
        if args.feedback:
            entry["feedback"] = {
                split: feedback_grid(vectors[split], corpus, data, ids) for split, data in splits.items()
            }
        entry["both"] = paired_difference(
            np.concatenate(list(route_per_query.values())), np.concatenate(list(lexical_per_query.values()))
        )
        result[route] = entry
        print(route, json.dumps(entry), flush=True)
    record = {"date": str(date.today()), "data": args.data, "resamples": 10_000, **result}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
