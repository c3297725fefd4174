"""The ``st-daft`` command: ``st-daft train``, ``st-daft evaluate`` and ``st-daft export``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

logger = logging.getLogger("st_daft")


def _stages(value: str) -> tuple[str, ...]:
    from st_daft.recipe import STAGES

    stages = tuple(stage.strip() for stage in value.split(",") if stage.strip())
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown or not stages:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    return stages


def _negatives(value: str) -> str:
    from st_daft.mining import parse_negatives

    try:
        return parse_negatives(value).spec
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


_DOCUMENT_STORE_HELP = (
    "folder of a document embedding store: document-route embeddings are kept there and reused by later runs "
    "with the same document encoder (e.g. a frozen one)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="st-daft", description="Train and evaluate fast asymmetric retrievers.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(commands)
    _add_evaluate_parser(commands)
    _add_export_parser(commands)
    return parser


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a query route (and the document route) with DAFT")
    train.add_argument("--data", required=True, help="BEIR folder or Hub dataset id (e.g. BeIR/scifact)")
    train.add_argument("--output", required=True, help="folder for checkpoints and the final model")
    train.add_argument("--split", default="train", help="qrels split to train on (default: train)")
    train.add_argument("--dev-split", default=None, help="qrels split for validation (default: hold out queries)")
    train.add_argument(
        "--query-encoder",
        default="static",
        help="static | tiny:L,H | tokenlearn | symmetric (no Router: fine-tune the document model itself) | PATH",
    )
    train.add_argument("--document-encoder", default=None, help="document model (default: all-MiniLM-L6-v2)")
    train.add_argument(
        "--stages",
        type=_stages,
        default=("align", "finetune"),
        help="comma-separated, in order: vocabulary (static routes: distil the whole vocabulary), corpus (label-free "
        "alignment on corpus text), align (DAFT stage 1), finetune (joint); default align,finetune",
    )
    train.add_argument("--corpus-steps", type=int, default=None, help="corpus-alignment steps (default 1000)")
    train.add_argument("--corpus-max-texts", type=int, default=None, help="texts cut from the corpus (40000)")
    train.add_argument("--corpus-lr", type=float, default=None, help="corpus-alignment learning rate (1e-3)")
    train.add_argument("--no-zipf", action="store_true", help="vocabulary stage without Zipf weighting")
    train.add_argument("--max-steps", type=int, default=None, help="step budget of every stage (overrides the rest)")
    train.add_argument("--align-steps", type=int, default=None, help="alignment steps (default 300)")
    train.add_argument("--align-batch-size", type=int, default=None, help="alignment batch size (default 64)")
    train.add_argument("--align-lr", type=float, default=None, help="alignment learning rate (default 1e-3)")
    train.add_argument("--finetune-epochs", type=float, default=None, help="fine-tuning epochs (default 2)")
    train.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning steps (overrides epochs)")
    train.add_argument("--batch-size", type=int, default=None, help="fine-tuning batch size (default 32)")
    train.add_argument("--query-lr", type=float, default=None, help="fine-tuning query-route learning rate (1e-4)")
    train.add_argument("--document-lr", type=float, default=None, help="fine-tuning document-route learning rate")
    train.add_argument("--eval-steps", type=int, default=None, help="evaluate/save every N steps in every stage")
    train.add_argument("--guard", choices=["variance", "uniformity", "none"], default=None, help="collapse guard")
    train.add_argument("--guard-weight", type=float, default=None, help="weight of the collapse guard")
    train.add_argument("--kl-patience", type=int, default=None, help="alignment early-stopping patience (0: off)")
    train.add_argument(
        "--negatives",
        type=_negatives,
        default="in-batch",
        help="fine-tuning negatives: in-batch (default) | stale | corrected | refresh:N | corrected+refresh:N "
        "(mined from the document cache during training; N: steps between full re-embeddings)",
    )
    train.add_argument("--num-negatives", type=_positive_int, default=4, help="mined negatives per query (default 4)")
    train.add_argument("--no-stop-on-collapse", action="store_true", help="keep training when a route collapses")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="resume each stage from its last checkpoint")
    train.add_argument("--keep-checkpoints", action="store_true", help="keep the per-stage checkpoint folders")
    train.add_argument("--document-store", default=None, help=_DOCUMENT_STORE_HELP)


def _add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("evaluate", help="evaluate a model on a BEIR folder or MTEB task through MTEB")
    evaluate.add_argument("model", help="model folder or Hub id")
    evaluate.add_argument("--data", required=True, help="BEIR folder, or a named MTEB retrieval task")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--output", default=None, help="write the scores to this JSON file")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--document-store", default=None, help=_DOCUMENT_STORE_HELP)


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="save one route of an asymmetric model as a plain model (serve queries with the query route)"
    )
    export.add_argument("model", help="asymmetric model folder or Hub id")
    export.add_argument("output", help="folder for the exported model")
    export.add_argument("--route", default="query", help="route to export: query (default) or document")
    export.add_argument(
        "--format",
        choices=["sentence-transformers", "model2vec"],
        default="sentence-transformers",
        help="sentence-transformers (default): the route's modules + Normalize, loads with SentenceTransformer(path); "
        "model2vec: a static route folded into one table, loads with model2vec's StaticModel.from_pretrained(path) "
        "and serves without torch",
    )
    export.add_argument(
        "--dtype",
        choices=["float32", "float16", "int8"],
        default=None,
        help="table storage type of --format model2vec (default float32; int8 keeps one scale per row)",
    )


def _config_from_args(args: argparse.Namespace):
    from st_daft.recipe import DAFTConfig

    config = DAFTConfig(
        stages=args.stages,
        seed=args.seed,
        negatives=getattr(args, "negatives", "in-batch"),
        num_negatives=getattr(args, "num_negatives", 4),
        document_store=getattr(args, "document_store", None),
    )
    align, finetune, corpus = config.align, config.finetune, config.corpus
    if args.corpus_steps is not None:
        corpus = replace(corpus, max_steps=args.corpus_steps)
    if args.corpus_lr is not None:
        corpus = replace(corpus, learning_rate=args.corpus_lr)
    if args.corpus_max_texts is not None:
        config.corpus_max_texts = args.corpus_max_texts
    config.zipf_weighting = not args.no_zipf
    if args.align_steps is not None:
        align = replace(align, max_steps=args.align_steps)
    if args.align_batch_size is not None:
        align = replace(align, batch_size=args.align_batch_size)
    if args.align_lr is not None:
        align = replace(align, learning_rate=args.align_lr)
    if args.finetune_epochs is not None:
        finetune = replace(finetune, epochs=args.finetune_epochs, max_steps=-1)
    if args.finetune_steps is not None:
        finetune = replace(finetune, max_steps=args.finetune_steps)
    if args.batch_size is not None:
        finetune = replace(finetune, batch_size=args.batch_size)
    if args.query_lr is not None:
        finetune = replace(finetune, learning_rate=args.query_lr)
    if args.document_lr is not None:
        finetune = replace(finetune, document_learning_rate=args.document_lr)
    if args.max_steps is not None:
        align, finetune, corpus = (replace(stage, max_steps=args.max_steps) for stage in (align, finetune, corpus))
    if args.eval_steps is not None:
        align, finetune, corpus = (replace(stage, eval_steps=args.eval_steps) for stage in (align, finetune, corpus))
    config.align, config.finetune, config.corpus = align, finetune, corpus
    if args.guard is not None:
        config.guard = args.guard
    if args.guard_weight is not None:
        config.guard_weight = args.guard_weight
    if args.kl_patience is not None:
        config.kl_patience = args.kl_patience or None
    config.stop_on_collapse = not args.no_stop_on_collapse
    return config


def run_train(args: argparse.Namespace) -> int:
    from sentence_transformers import SentenceTransformer

    from st_daft.data import load_beir
    from st_daft.model import build_asymmetric_model, default_document_encoder
    from st_daft.recipe import remove_checkpoints, train_daft

    config = _config_from_args(args)
    train_data = load_beir(args.data, split=args.split)
    validation_data = load_beir(args.data, split=args.dev_split) if args.dev_split else None
    document_encoder = args.document_encoder or default_document_encoder()
    if args.query_encoder == "symmetric":
        model = SentenceTransformer(document_encoder, device="cpu")
    else:
        model = build_asymmetric_model(document_encoder, args.query_encoder, seed=args.seed)
    summary = train_daft(
        model, train_data, args.output, config, validation_data=validation_data, resume_from_checkpoint=args.resume
    )
    if not args.keep_checkpoints:
        remove_checkpoints(args.output)
    for stage in summary["stages"]:
        if "global_step" not in stage:
            print(f"stage {stage['stage']}: {stage.get('tokens', 0):.0f} tokens distilled")
            continue
        print(
            f"stage {stage['stage']}: {stage['global_step']} steps, "
            f"{stage['stopped_reason'] or 'budget reached'}; collapsed: {stage['collapsed']}"
        )
    print(f"model saved to {args.output}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from st_daft.evaluation import evaluate_retrieval

    scores = evaluate_retrieval(
        args.model,
        args.data,
        split=args.split,
        output_path=args.output,
        batch_size=args.batch_size,
        document_store=args.document_store,
    )
    print(json.dumps(scores, indent=2))
    if args.output:
        print(f"scores written to {Path(args.output)}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from sentence_transformers import SentenceTransformer

    from st_daft.model import count_parameters, export_route

    if args.dtype is not None and args.format != "model2vec":
        raise ValueError(f"--dtype {args.dtype} applies to --format model2vec only")
    model = SentenceTransformer(args.model, device="cpu")
    if args.format == "model2vec":
        from st_daft.serving import export_static_model

        static_model = export_static_model(model, args.output, route=args.route, dtype=args.dtype or "float32")
        rows, dimension = static_model.embedding.shape
        print(
            f"{args.route} route: {rows:,} x {dimension} {static_model.embedding_dtype} table "
            f"(full model: {count_parameters(model):,} parameters)"
        )
        print(f"model2vec model saved to {Path(args.output)}")
        return 0
    exported = export_route(model, args.route, output_path=args.output)
    print(f"{args.route} route: {count_parameters(exported):,} parameters (full model: {count_parameters(model):,})")
    print(f"model saved to {Path(args.output)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    from st_daft.data import DataError

    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "export":
            return run_export(args)
        return run_evaluate(args)
    except (DataError, FileNotFoundError, ValueError) as error:
        print(f"st-daft {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
