"""MTEB evaluation of an asymmetric model over several collections, beside BM25, in one table.

Queries go through the query route, documents through the document route (encode_query / encode_document).

    python examples/evaluate_collections.py runs/example-static --data ../shared/data/scifact \
        --data ../shared/data/python-faq [--quick]
"""

import argparse

from st_daft.baselines import BM25Search
from st_daft.evaluation import evaluate_collections, format_table

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", help="model folder or Hub id")
parser.add_argument("--data", action="append", required=True, help="a BEIR folder (repeat for several)")
parser.add_argument("--document-store", default=None, help="reuse document embeddings across runs (a folder)")
parser.add_argument("--quick", action="store_true", help="no BM25 row (bm25s is an optional extra)")
args = parser.parse_args()

models = [args.model] if args.quick else [args.model, BM25Search()]  # BM25: pip install "st-daft[bm25]"
labels = ["model"] if args.quick else ["model", "BM25"]
comparison = evaluate_collections(models, args.data, split="test", labels=labels, document_store=args.document_store)
print(format_table(comparison, metric="ndcg_at_10"))
