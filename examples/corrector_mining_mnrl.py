"""Corrector-network hard negatives inside a plain SentenceTransformerTrainer, no st-daft recipe.

MultipleNegativesRankingLoss gets negatives mined during training from a cache of the corpus's document embeddings.
The cache goes stale as the model trains; a corrector network h(e) = e + MLP(e), trained online on the documents
each step encodes anyway, maps stale embeddings to current ones, and negatives are mined from h(cache)
(Monath et al., ICML 2024).

    python examples/corrector_mining_mnrl.py --data ../shared/data/scifact --output runs/example-mined [--quick]
"""

import argparse

from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from st_daft import StaleEmbeddingCache, build_negative_mining, default_document_encoder, load_beir
from st_daft.callbacks.statistics import LogStatisticsCallback

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", required=True, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/train.tsv")
parser.add_argument("--output", required=True, help="folder for checkpoints and the trained model")
parser.add_argument("--quick", action="store_true", help="a few steps: a smoke run")
args = parser.parse_args()

data = load_beir(args.data, "train")
model = SentenceTransformer(default_document_encoder())  # all-MiniLM-L6-v2, fine-tuned symmetrically
cache = StaleEmbeddingCache.build(model, data.corpus)  # embedded once; never re-embedded by "corrected"
positives = {data.queries[qid]: [did for did, s in judged.items() if s > 0] for qid, judged in data.qrels.items()}
loss, mining_callbacks = build_negative_mining(
    model,
    MultipleNegativesRankingLoss(model),
    cache,
    data.corpus,
    "corrected",
    num_negatives=4,
    query_positives=positives,
)
args_ = SentenceTransformerTrainingArguments(
    output_dir=args.output,
    max_steps=4 if args.quick else -1,
    num_train_epochs=1,
    per_device_train_batch_size=8 if args.quick else 32,
    learning_rate=2e-5,
    logging_steps=1 if args.quick else 10,
    save_steps=2 if args.quick else 100,
    report_to="none",
)
trainer = SentenceTransformerTrainer(
    model=model,
    args=args_,
    train_dataset=data.training_pairs(),
    loss=loss,
    callbacks=[*mining_callbacks, LogStatisticsCallback(loss)],  # corrector steps, checkpoints, mining_* logs
)
trainer.train()
model.save(args.output)
statistics = loss.miner.statistics
print(f"documents encoded: {statistics.counts}, last step: {statistics.history[-1]}")
