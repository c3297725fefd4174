"""DAFT with a static query encoder on a BEIR folder, then an MTEB evaluation of the result.

A static embedding table (the query route) beside all-MiniLM-L6-v2 (the document route). The recipe runs the
label-free stages that measured best for a static route (vocabulary, corpus), then DAFT's alignment: the document
route stays frozen and the query route learns to land in its space, early-stopped on the 1-NN KL estimate.

    python examples/daft_static_beir.py --data ../shared/data/scifact --output runs/example-static
    python examples/daft_static_beir.py --data ../shared/data/scifact --output runs/example-static --quick
"""

import argparse

from st_daft import AlignStage, CorpusStage, DAFTConfig, VocabularyStage, build_asymmetric_model, load_beir, train_daft
from st_daft.evaluation.mteb import evaluate_retrieval

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", required=True, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/{train,test}.tsv")
parser.add_argument("--output", required=True, help="folder for the trained model")
parser.add_argument("--document-store", default=None, help="reuse document embeddings across runs (a folder)")
parser.add_argument("--quick", action="store_true", help="a few steps of alignment only: a smoke run")
args = parser.parse_args()

model = build_asymmetric_model(query_encoder="static")  # Router(query=static table, document=MiniLM) + Normalize
if args.quick:
    stages = [AlignStage(max_steps=6, eval_steps=3, batch_size=16)]
else:
    # The static route's recipe (docs/results/quality.md): learning rate 1e-3 for the table in every stage.
    stages = [VocabularyStage(), CorpusStage(max_steps=600, max_texts=20000), AlignStage(learning_rate=1e-3)]
config = DAFTConfig(stages=stages, document_store=args.document_store, num_validation_texts=64 if args.quick else 500)
summary = train_daft(model, load_beir(args.data, "train"), args.output, config, overwrite=True)
for stage in summary.stages:
    print(stage.describe())

scores = evaluate_retrieval(args.output, args.data, split="test", document_store=args.document_store)
print(f"test nDCG@10: {scores['ndcg_at_10']:.3f}")
