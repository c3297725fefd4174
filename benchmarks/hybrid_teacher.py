"""How good a teacher is the document route's ranking fused with BM25's? nDCG@10 of cosine + w * BM25 / best BM25.

The corpus stage's lexical teacher (``CorpusStage(lexical_weight=w)``) distils this fusion for texts cut from the
corpus. This script scores the fusion itself on a collection's real queries: all-MiniLM-L6-v2's cosine (corpus read
from a document store when given), bm25s with English stopwords and the Snowball stemmer (as ``st-daft evaluate
--baseline bm25``), and the fusion at several ``w``, over all documents and over BM25's top ``k`` only.

Example::

    python benchmarks/hybrid_teacher.py ../shared/data/scifact --split test --document-store ../notes/store

Results go to ``benchmarks/results/tenth_session/hybrid_teacher_<name>_<split>.json``.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

from st_daft import DocumentEmbeddingStore, load_beir
from st_daft.evaluation.baselines import BM25Search
from st_daft.models.asymmetric import default_document_encoder

RESULTS = Path(__file__).parent / "results" / "tenth_session"


def ndcg_at_10(scores: np.ndarray, query_ids: list[str], qrels: dict, document_ids: list[str]) -> float:
    values = []
    for row, query_id in enumerate(query_ids):
        ranked = np.argsort(-scores[row])[:10]
        judged = qrels[query_id]
        gain = sum(judged.get(document_ids[d], 0) / np.log2(rank + 2) for rank, d in enumerate(ranked))
        ideal = sum(v / np.log2(rank + 2) for rank, v in enumerate(sorted(judged.values(), reverse=True)[:10]))
        values.append(gain / ideal if ideal else 0.0)
    return float(np.mean(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="a BEIR folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--weights", default="0.1,0.2,0.3,0.5")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--document-store", default=None)
    args = parser.parse_args()
    data = load_beir(args.data, split=args.split, empty_texts="warn")
    document_ids = list(data.corpus)
    documents = [data.corpus[d] for d in document_ids]
    query_ids = list(data.queries)
    queries = [data.queries[q] for q in query_ids]
    model = SentenceTransformer(default_document_encoder())
    if args.document_store:
        corpus = DocumentEmbeddingStore(args.document_store).encode_document(model, documents)
    else:
        corpus = model.encode_document(documents, convert_to_numpy=True)
    dense = model.encode_query(queries, convert_to_numpy=True) @ corpus.T
    rows, scores = BM25Search().fit(documents).top_k(queries, len(documents))
    bm25 = np.zeros_like(dense)
    np.put_along_axis(bm25, rows, scores, axis=1)
    scaled = bm25 / np.maximum(bm25.max(axis=1, keepdims=True), 1e-12)
    top = np.zeros_like(scaled)
    np.put_along_axis(top, rows[:, : args.top_k], np.take_along_axis(scaled, rows[:, : args.top_k], 1), axis=1)
    result = {"dense": ndcg_at_10(dense, query_ids, data.qrels, document_ids)}
    result["bm25"] = ndcg_at_10(bm25, query_ids, data.qrels, document_ids)
    for weight in (float(w) for w in args.weights.split(",")):
        result[f"fused w={weight:g}"] = ndcg_at_10(dense + weight * scaled, query_ids, data.qrels, document_ids)
        fused_top = ndcg_at_10(dense + weight * top, query_ids, data.qrels, document_ids)
        result[f"fused w={weight:g}, BM25 top {args.top_k}"] = fused_top
    for name, value in result.items():
        print(f"{name}: {value:.4f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"date": str(date.today()), "data": args.data, "split": args.split, "ndcg_at_10": result}
    (RESULTS / f"hybrid_teacher_{Path(args.data).name}_{args.split}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
