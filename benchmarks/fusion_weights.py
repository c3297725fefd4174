"""nDCG@10 of routes fused with BM25 (``st_daft.HybridSearch``) at several BM25 weights, on several collections.

Question: At which BM25 weight does a route fused with BM25 score best, per collection?
Command: ``python benchmarks/fusion_weights.py RUN [RUN ...] --data ../shared/data/scifact --output
    benchmarks/results/fusion/fusion_weights_labelled.json``
Results: benchmarks/results/fusion/fusion_weights_*.json
Page: docs/results/fusion.md


``st-daft evaluate MODEL --fuse-bm25`` scores one weight (``--fusion-weight``, 0.15 by default); this script scores a
grid of them for each model and collection, with the same fusion (``HybridSearch.fused_scores``: similarity + w x
BM25 / the query's best BM25 score, BM25 over its 1,000 best documents) and MTEB's metric code (pytrec_eval), so its
figures at a weight equal ``st-daft evaluate``'s. Weight 0 is the model alone.

Example::

    python benchmarks/fusion_weights.py R1 R2 all-MiniLM-L6-v2 --data ../shared/data/scifact \\
        --data ../shared/data/python-faq --document-store S --output benchmarks/results/fusion/f.json
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores
from sentence_transformers import SentenceTransformer

from st_daft import DocumentEmbeddingStore, HybridSearch, load_beir, to_mteb_task
from st_daft.evaluation.baselines import mteb_query_texts
from st_daft.models.asymmetric import default_document_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model folders; 'all-MiniLM-L6-v2' for the document encoder")
    parser.add_argument("--data", action="append", required=True, help="BEIR folder (repeat)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--weights", default="0,0.05,0.1,0.15,0.2,0.3")
    parser.add_argument("--document-store", default=None)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    store = DocumentEmbeddingStore(args.document_store) if args.document_store else None
    results: dict[str, dict[str, dict[str, float]]] = {}
    for folder in args.data:
        data = load_beir(folder, split=args.split, empty_texts="warn")
        task = to_mteb_task(data)
        task.load_data()
        split = task.dataset["default"][args.split]
        where = {"task_metadata": task.metadata, "hf_split": args.split, "hf_subset": "default", "encode_kwargs": {}}
        query_ids, texts = mteb_query_texts(split["queries"])
        for name in args.models:
            path = default_document_encoder() if name == "all-MiniLM-L6-v2" else name
            search = HybridSearch(SentenceTransformer(path), document_store=store)
            search.index(split["corpus"], **where)
            document_ids = search.document_ids
            row: dict[str, float] = {}
            for weight in weights:
                search.weight = weight
                values, rows = search.fused_scores(texts).topk(100)
                run = {
                    query_id: {document_ids[r]: float(v) for r, v in zip(rs.tolist(), vs.tolist())}
                    for query_id, rs, vs in zip(query_ids, rows, values)
                }
                row[f"{weight:g}"] = calculate_retrieval_scores(run, data.qrels, [10]).ndcg["NDCG@10"]
            results.setdefault(name, {})[Path(folder).name] = row
            print(Path(folder).name, name, " ".join(f"w={w}: {v:.4f}" for w, v in row.items()), flush=True)
    record = {"date": str(date.today()), "split": args.split, "data": args.data, "ndcg_at_10": results}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
