"""DAFT on SciFact: train each configuration, evaluate it through MTEB on SciFact test and python-faq.

Question: What does each recipe and stage score on SciFact test and python-faq, and how long does it train?
Command: ``python benchmarks/daft_scifact.py --config e --shared ../shared/data --work runs/bench``
Results: benchmarks/results/quality/daft_<name>.json
Page: docs/results/quality.md


Usage (one configuration per call, results appended to a JSON file per configuration)::

    python benchmarks/daft_scifact.py --config e --shared ../shared/data --work runs/bench

Configurations:
    a   all-MiniLM-L6-v2, symmetric, zero-shot
    b   all-MiniLM-L6-v2, symmetric, fine-tuned on SciFact train (plain InfoNCE)
    c   static query route + MiniLM document route, zero-shot
    d   static + MiniLM, plain joint contrastive fine-tuning (no alignment stage, no guard)
    e   static + MiniLM, DAFT (alignment, then fine-tuning with the collapse guard)
    f-plain  tiny:2,128 + MiniLM, plain joint contrastive fine-tuning
    f-daft   tiny:2,128 + MiniLM, DAFT
Extra flags (``--stages``, ``--query-encoder`` ...) override a configuration for ablations.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sentence_transformers import SentenceTransformer

from st_daft import (
    AlignStage,
    CorpusStage,
    DAFTConfig,
    FinetuneStage,
    VocabularyStage,
    build_asymmetric_model,
    default_document_encoder,
    load_beir,
    train_daft,
)
from st_daft.evaluation.mteb import evaluate_retrieval

CONFIGS: dict[str, dict] = {
    "a": {"query_encoder": "symmetric", "stages": ()},
    "b": {"query_encoder": "symmetric", "stages": ("finetune",), "guard": "none"},
    "c": {"query_encoder": "static", "stages": ()},
    "d": {"query_encoder": "static", "stages": ("finetune",), "guard": "none"},
    "e": {"query_encoder": "static", "stages": ("align", "finetune"), "guard": "variance"},
    "f-plain": {"query_encoder": "tiny:2,128", "stages": ("finetune",), "guard": "none"},
    "f-daft": {"query_encoder": "tiny:2,128", "stages": ("align", "finetune"), "guard": "variance"},
}


def _stage_name(stage: dict) -> str:
    return stage.get("name") or stage["stage"]  # "stage" in summaries written before the stages were objects


def _collapse_trace(summary: dict) -> list[dict]:
    """Per logged step: the evaluator's collapse statistics and the loss's batch statistics."""
    trace = []
    for stage in summary.get("stages", []):
        for row in stage.get("log_history", []):  # the vocabulary stage logs nothing
            keep = {k: v for k, v in row.items() if "mean_cosine" in k or k.endswith("_std") or "knn_kl" in k}
            if keep:
                trace.append({"stage": _stage_name(stage), "step": row.get("step"), **keep})
    return trace


def _stage_results(summary: dict) -> list[dict]:
    """The stages as benchmarks/report.py reads them (a ``stage`` key), without their log history."""
    return [
        {"stage": _stage_name(stage), **{k: v for k, v in stage.items() if k not in ("log_history", "name")}}
        for stage in summary["stages"]
    ]


def _stages(setup: dict, args: argparse.Namespace) -> list:
    """The stage objects of a configuration, with the command line's overrides."""

    def given(**values):
        return {key: value for key, value in values.items() if value is not None}

    finetune = given(
        epochs=args.finetune_epochs,
        max_steps=args.finetune_steps,
        learning_rate=args.query_lr,
        document_learning_rate=args.document_lr,
        guard_weight=args.guard_weight,
    )
    if setup["query_encoder"] == "symmetric":
        # One learning rate for the one encoder: the document rate.
        finetune["learning_rate"] = finetune.get("document_learning_rate", FinetuneStage.document_learning_rate)
    builders = {
        "vocabulary": lambda: VocabularyStage(),
        "corpus": lambda: CorpusStage(**given(max_steps=args.corpus_steps, max_texts=args.corpus_max_texts)),
        "align": lambda: AlignStage(**given(max_steps=args.align_steps, learning_rate=args.align_lr)),
        "finetune": lambda: FinetuneStage(guard=setup.get("guard", "variance"), **finetune),
    }
    return [builders[name]() for name in setup["stages"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, choices=sorted(CONFIGS))
    parser.add_argument("--shared", default="../shared/data", help="folder holding scifact/ and python-faq/")
    parser.add_argument("--work", default="runs/bench", help="where trained models go")
    parser.add_argument("--results", default="benchmarks/results/quality", help="where the JSON results go")
    parser.add_argument("--name", default=None, help="result name (default: the configuration)")
    parser.add_argument("--query-encoder", default=None)
    parser.add_argument("--stages", default=None, help="comma-separated, overrides the configuration")
    parser.add_argument("--guard", default=None)
    parser.add_argument("--guard-weight", type=float, default=None)
    parser.add_argument("--align-steps", type=int, default=None)
    parser.add_argument("--corpus-steps", type=int, default=None)
    parser.add_argument("--corpus-max-texts", type=int, default=None)
    parser.add_argument("--align-lr", type=float, default=None)
    parser.add_argument("--finetune-epochs", type=float, default=None)
    parser.add_argument("--query-lr", type=float, default=None)
    parser.add_argument("--document-lr", type=float, default=None)
    parser.add_argument("--document-store", default=None, help="DocumentEmbeddingStore folder (reused across runs)")
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--evaluate-only", action="store_true", help="evaluate the model already trained in --work/NAME, no training"
    )
    parser.add_argument("--datasets", default="scifact,python-faq", help="comma-separated collections to evaluate")
    args = parser.parse_args()

    setup = dict(CONFIGS[args.config])
    if args.query_encoder:
        setup["query_encoder"] = args.query_encoder
    if args.stages is not None:
        setup["stages"] = tuple(s for s in args.stages.split(",") if s)
    if args.guard:
        setup["guard"] = args.guard
    name = args.name or args.config
    shared = Path(args.shared)
    output = Path(args.work) / name

    document_encoder = default_document_encoder()
    if setup["query_encoder"] == "symmetric":
        model = SentenceTransformer(document_encoder)
    else:
        model = build_asymmetric_model(document_encoder, setup["query_encoder"], seed=args.seed)

    result: dict = {
        "name": name,
        "config": args.config,
        "setup": {k: list(v) if isinstance(v, tuple) else v for k, v in setup.items()},
    }
    started = time.perf_counter()
    if args.evaluate_only:
        summary_file = output / "daft_summary.json"
        if not summary_file.is_file() and setup["stages"]:
            raise SystemExit(f"--evaluate-only: no trained model with a daft_summary.json in {output}")
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"stages": []}
        result["train_seconds"] = None
        result["stages"] = _stage_results(summary)
        result["collapse_trace"] = _collapse_trace(summary)
        result["daft_config"] = summary.get("config")
    elif setup["stages"]:
        config = DAFTConfig(stages=_stages(setup, args), seed=args.seed, document_store=args.document_store)
        summary = train_daft(model, load_beir(shared / "scifact", "train"), output, config, overwrite=True).to_dict()
        result["train_seconds"] = round(time.perf_counter() - started, 1)
        result["stages"] = _stage_results(summary)
        result["collapse_trace"] = _collapse_trace(summary)
        result["daft_config"] = summary["config"]
    else:
        model.save(str(output))
        result["train_seconds"] = 0.0

    for dataset in args.datasets.split(","):
        scores = evaluate_retrieval(
            str(output), shared / dataset, split="test", show_progress_bar=False, document_store=args.document_store
        )
        result[dataset] = {k: scores[k] for k in ("ndcg_at_10", "recall_at_100", "mrr_at_10") if k in scores}
        print(f"{name} {dataset}: nDCG@10 {scores['ndcg_at_10']:.4f}", flush=True)
    result["model_path"] = str(output)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"daft_{name}.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
