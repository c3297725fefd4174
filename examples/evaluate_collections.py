"""MTEB evaluation of an asymmetric model over several collections, beside BM25 and fused with it, in one table.

Queries go through the query route, documents through the document route (encode_query / encode_document). The fused
row ranks by the model's cosine plus 0.15 x the query's BM25 scores over its best (st_daft.HybridSearch).

    python examples/evaluate_collections.py runs/example-static --data ../shared/data/scifact \
        --data ../shared/data/python-faq [--quick]
"""

import argparse

from sentence_transformers import SentenceTransformer

from st_daft import DocumentEmbeddingStore, HybridSearch
from st_daft.evaluation.baselines import BM25Search
from st_daft.evaluation.mteb import evaluate_collections
from st_daft.evaluation.tables import format_table

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", help="model folder or Hub id")
parser.add_argument("--data", action="append", required=True, help="a BEIR folder (repeat for several)")
parser.add_argument("--document-store", default=None, help="reuse document embeddings across runs (a folder)")
parser.add_argument("--quick", action="store_true", help="no BM25 rows (bm25s is an optional extra)")
args = parser.parse_args()

model = SentenceTransformer(args.model)
store = DocumentEmbeddingStore(args.document_store) if args.document_store else None
lexical = [] if args.quick else [BM25Search(), HybridSearch(model, document_store=store)]  # pip install "st-daft[bm25]"
labels = ["model"] if args.quick else ["model", "BM25", "model + BM25"]
comparison = evaluate_collections([model, *lexical], args.data, split="test", labels=labels, document_store=store)
print(format_table(comparison, metric="ndcg_at_10"))
