"""Adapt a static query route to a corpus with no queries at all, then score it on the corpus's queries.

Question: Which corpus-stage settings adapt a static route best to a corpus with no queries (each knob on its own)?
Command: ``python benchmarks/corpus_only.py --corpus ../shared/data/scifact --split train --document-store
    runs/store --name dev-base``
Results: benchmarks/results/experiments/pseudo_query_term/
Page: docs/results/experiments.md


Composes the library's label-free pieces by hand (no ``train_daft``), so each knob of the corpus stage can be
varied on its own:

1. ``build_asymmetric_model(query_encoder="static")``: MiniLM's input embeddings as the query table, MiniLM as
   the document route;
2. the vocabulary stage, ``initialize_static_route`` (every token distilled through the document route);
3. the corpus stage: texts cut from the corpus (``alignment_examples``), their document-route targets
   (``alignment_dataset``), ``LabelFreeAlignmentLoss`` trained with ``SentenceTransformerTrainer`` while the
   document route is frozen (``router_mapping={"text": "query"}``), early-stopped on the 1-NN KL estimate over
   leading sentences of held-out-style corpus documents (no queries are read);
4. ``evaluate_retrieval`` on the collection's queries (``--split test``; ``--split train`` on SciFact is the dev
   signal used to choose settings).

Example (today's composition, then with the text -> source-document term)::

    python benchmarks/corpus_only.py --corpus ../shared/data/python-faq --document-store runs/store
    python benchmarks/corpus_only.py --corpus ../shared/data/scifact --split train --document-weight 1 \\
        --document-store runs/store

Results go to ``benchmarks/results/experiments/pseudo_query_term/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator, SequentialEvaluator
from transformers import EarlyStoppingCallback

from st_daft import build_asymmetric_model, freeze_route, get_route, load_beir, unfreeze_route
from st_daft.callbacks.collapse import CollapseStopCallback
from st_daft.data import RetrievalData
from st_daft.embeddings.store import DocumentEmbeddingStore
from st_daft.evaluation.collapse import CollapseEvaluator
from st_daft.evaluation.mteb import evaluate_retrieval
from st_daft.label_free.corpus_texts import (
    TEXT_KINDS,
    alignment_dataset,
    alignment_examples,
    document_embeddings,
    pseudo_query_dataset,
)
from st_daft.label_free.vocabulary import corpus_token_weights, initialize_static_route, reweight_static_route
from st_daft.losses.label_free import LabelFreeAlignmentLoss
from st_daft.models.asymmetric import DOCUMENT_ROUTE, QUERY_ROUTE

logger = logging.getLogger("corpus_only")
RESULTS = Path(__file__).parent / "results" / "experiments" / "pseudo_query_term"
KL_NAME = "alignment"
PSEUDO_NAME = "pseudo"
PSEUDO_METRIC = f"eval_{PSEUDO_NAME}_cosine_ndcg@10"


def kl_texts(corpus: dict[str, str], count: int, seed: int) -> list[str]:
    """Leading sentences (at most 48 words) of ``count`` random documents: the KL criterion's texts, no queries."""
    rng = random.Random(seed)
    texts = []
    for doc_id in rng.sample(sorted(corpus), min(count, len(corpus))):
        first_sentence = re.split(r"(?<=[.!?])\s", corpus[doc_id], maxsplit=1)[0]
        texts.append(" ".join(first_sentence.split()[:48]))
    return texts


def pseudo_queries(corpus: dict[str, str], count: int, seed: int) -> dict[str, tuple[str, str]]:
    """``count`` random 4-10-word spans, one per random document: ``{query id: (span, source document id)}``.

    The label-free proxy of retrieval quality: can the route find the document a span was cut from?
    """
    rng = random.Random(seed)
    queries = {}
    for doc_id in rng.sample(sorted(corpus), min(count, len(corpus))):
        words = corpus[doc_id].split()
        length = rng.randint(4, 10)
        if len(words) > length:
            start = rng.randrange(len(words) - length)
            queries[f"pq-{doc_id}"] = (" ".join(words[start : start + length]), doc_id)
    return queries


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, help="BEIR folder (only corpus.jsonl is trained on)")
    parser.add_argument("--split", default="test", help="qrels split to score on (SciFact dev: train)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--text-seed", type=int, default=0, help="seed of the text cutting (spans, shuffles)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--max-texts", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--kinds", default=",".join(TEXT_KINDS), help=f"comma-separated, of {list(TEXT_KINDS)}")
    parser.add_argument("--span-words", default="3,12", help="min,max words of a span")
    parser.add_argument("--spans-per-document", type=int, default=3)
    parser.add_argument("--passage-words", type=int, default=64)
    parser.add_argument("--regression", default="cosine", choices=["cosine", "mse"])
    parser.add_argument("--contrastive-weight", type=float, default=1.0, help="in-batch InfoNCE on text targets")
    parser.add_argument("--scale", type=float, default=20.0)
    parser.add_argument(
        "--document-weight", type=float, default=0.0, help="text -> source-document InfoNCE over the corpus (0: off)"
    )
    parser.add_argument("--document-scale", type=float, default=None)
    parser.add_argument(
        "--targets",
        default="text",
        choices=["text", "document"],
        help="regression targets: the document route's embedding of each text (encodes every text once), or of "
        "its source document (pseudo-query -> document pairs; nothing to encode beyond the corpus)",
    )
    parser.add_argument("--eval-steps", type=int, default=250, help="KL evaluation / checkpoint interval")
    parser.add_argument("--kl-patience", type=int, default=3, help="0: no early stopping")
    parser.add_argument("--no-best", action="store_true", help="keep the last step, not the lowest-KL checkpoint")
    parser.add_argument("--no-vocabulary", action="store_true", help="skip the vocabulary stage")
    parser.add_argument(
        "--token-weights",
        default="zipf",
        choices=["zipf", "idf", "none"],
        help="row norms of the distilled table: log(1 + token id) (model2vec), the corpus's BM25 IDF, or equal",
    )
    parser.add_argument(
        "--select",
        default="kl",
        choices=["kl", "pseudo"],
        help="checkpoint selection / early stopping: 1-NN KL, or nDCG@10 of held-out spans -> their documents",
    )
    parser.add_argument(
        "--num-pseudo-queries", type=int, default=0, help="held-out spans of the label-free proxy (0: no proxy)"
    )
    parser.add_argument("--num-kl-texts", type=int, default=500)
    parser.add_argument("--document-store", default=None)
    parser.add_argument("--document-encoder", default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--name", default=None, help="results file name (default: derived from the settings)")
    parser.add_argument("--work", default=None, help="checkpoint folder (default: a temporary folder)")
    return parser.parse_args()


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.corpus)
    data: RetrievalData = load_beir(folder, args.split)  # only its corpus and titles are trained on
    store = DocumentEmbeddingStore(args.document_store) if args.document_store else None
    timings: dict[str, float] = {}
    started = time.perf_counter()

    model = build_asymmetric_model(args.document_encoder, query_encoder="static", seed=args.seed)
    if not args.no_vocabulary:
        initialize_static_route(model, zipf_weighting=args.token_weights == "zipf", store=store)
        if args.token_weights == "idf":
            static = get_route(model, QUERY_ROUTE)[0]
            reweight_static_route(model, corpus_token_weights(static, data.corpus.values()))
    timings["vocabulary_s"] = time.perf_counter() - started

    freeze_route(model, DOCUMENT_ROUTE)
    span_words = tuple(int(part) for part in args.span_words.split(","))
    examples = alignment_examples(
        data.corpus,
        data.titles,
        kinds=args.kinds.split(","),
        max_texts=args.max_texts,
        span_words=span_words,
        passage_words=args.passage_words,
        seed=args.text_seed,
        spans_per_document=args.spans_per_document,
    )
    held_out = pseudo_queries(data.corpus, args.num_pseudo_queries, args.text_seed + 2)
    held_out_texts = {text for text, _ in held_out.values()}
    examples = [example for example in examples if example[0] not in held_out_texts]
    texts = [text for text, _ in examples]
    documents = None
    if args.targets == "document":
        ids, documents = document_embeddings(model, data.corpus, store=store)
        pairs = pseudo_query_dataset(examples, ids, documents)
    else:
        rows = None
        if args.document_weight > 0:
            ids, documents = document_embeddings(model, data.corpus, store=store)
            row_of = {doc_id: row for row, doc_id in enumerate(ids)}
            rows = [row_of[doc_id] for _, doc_id in examples]
        pairs = alignment_dataset(model, texts, store=store, document_rows=rows)
    timings["targets_s"] = time.perf_counter() - started - timings["vocabulary_s"]

    loss = LabelFreeAlignmentLoss(
        model,
        regression=args.regression,
        contrastive_weight=args.contrastive_weight,
        scale=args.scale,
        document_embeddings=documents,
        document_weight=args.document_weight,
        document_scale=args.document_scale,
    )
    evaluators: list[Any] = []
    if args.num_kl_texts:  # the KL criterion needs the document route's embeddings of its texts
        evaluators.append(CollapseEvaluator(kl_texts(data.corpus, args.num_kl_texts, args.text_seed + 1), name=KL_NAME))
    elif args.select == "kl":
        raise SystemExit("--select kl needs --num-kl-texts > 0")
    if args.num_pseudo_queries:  # re-encodes the whole corpus with the (frozen) document route at every evaluation
        evaluators.append(
            InformationRetrievalEvaluator(
                {qid: text for qid, (text, _) in held_out.items()},
                data.corpus,
                {qid: {doc_id} for qid, (_, doc_id) in held_out.items()},
                name=PSEUDO_NAME,
                batch_size=64,
                write_csv=False,
                show_progress_bar=False,
            )
        )
    elif args.select == "pseudo":
        raise SystemExit("--select pseudo needs --num-pseudo-queries > 0")
    evaluator = SequentialEvaluator(evaluators)
    callbacks: list[Any] = []
    if args.num_kl_texts:
        collapse = CollapseStopCallback(KL_NAME, stop_on_collapse=False)
        callbacks.append(collapse)
    if args.kl_patience:
        callbacks.append(EarlyStoppingCallback(args.kl_patience))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="corpus_only-"))
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(work),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup_ratio,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        eval_strategy="steps",
        save_strategy="steps",
        eval_steps=args.eval_steps,
        save_steps=args.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=not args.no_best,
        metric_for_best_model=f"eval_{KL_NAME}_knn_kl" if args.select == "kl" else PSEUDO_METRIC,
        greater_is_better=args.select != "kl",
        logging_steps=10,
        seed=args.seed,
        report_to="none",
        router_mapping={"text": QUERY_ROUTE},
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=pairs, loss=loss, evaluator=evaluator, callbacks=callbacks
    )
    train_started = time.perf_counter()
    trainer.train()
    timings["train_s"] = time.perf_counter() - train_started
    unfreeze_route(model, DOCUMENT_ROUTE)
    model.eval()

    evaluations = [row for row in trainer.state.log_history if PSEUDO_METRIC in row]
    scores = evaluate_retrieval(model, data, show_progress_bar=False, document_store=store)
    timings["total_s"] = time.perf_counter() - started
    return {
        "settings": vars(args),
        "collection": folder.name,
        "split": args.split,
        "num_texts": len(texts),
        "texts_by_kind_sample": texts[:8],
        "global_step": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_metric": trainer.state.best_metric,  # the KL or the proxy, as --select says
        "stopped_early": trainer.state.global_step < args.steps,
        "kl_history": [(row["step"], row.get(f"eval_{KL_NAME}_knn_kl")) for row in evaluations],
        "pseudo_ndcg_history": [(row["step"], row.get(PSEUDO_METRIC)) for row in evaluations],
        "ndcg_at_10": scores["ndcg_at_10"],
        "recall_at_100": scores.get("recall_at_100"),
        "mrr_at_10": scores.get("mrr_at_10"),
        "scores": scores,
        "timings": {key: round(value, 1) for key, value in timings.items()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args()
    name = args.name or f"{Path(args.corpus).name}-{args.split}-s{args.seed}"
    result = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(
        f"{name}: nDCG@10 {result['ndcg_at_10']:.4f} R@100 {result['recall_at_100']:.4f} "
        f"steps {result['global_step']} best {args.select} {result['best_metric']} ({result['timings']}) -> {path}"
    )


if __name__ == "__main__":
    main()
