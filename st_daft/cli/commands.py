"""``st-daft evaluate``, ``st-daft export`` and ``st-daft soup``: their options and runs."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from st_daft.cli.errors import hub_message
from st_daft.cli.options import _DOCUMENT_STORE_HELP, _OVERWRITE_HELP
from st_daft.training.stages.settings import non_negative_float
from st_daft.utils.output import check_writable_folder, claim_output, claim_output_file, write_output_file

logger = logging.getLogger("st_daft")


def _add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate models on BEIR folders or MTEB tasks through MTEB; a table per score, a row per model",
    )
    evaluate.add_argument("model", nargs="+", help="model folder(s) or Hub id(s)")
    evaluate.add_argument(
        "--data",
        required=True,
        action="append",
        help="BEIR folder, or a named MTEB retrieval task; repeat for several collections (one column each)",
    )
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument(
        "--baseline",
        action="append",
        default=[],
        choices=["bm25"],
        help="add a baseline row on the same collections: bm25 (bm25s, stemmed; pip install 'st-daft[bm25]')",
    )
    evaluate.add_argument(
        "--fuse-bm25",
        action="store_true",
        help="add a row per model fusing its scores with BM25's: similarity + --fusion-weight x BM25 / the query's "
        "best BM25 score (bm25 extra)",
    )
    evaluate.add_argument(
        "--fusion-weight",
        type=non_negative_float,
        default=None,
        metavar="W",
        help="BM25's weight in --fuse-bm25 rows (default 0.15, st_daft.evaluation.hybrid.DEFAULT_FUSION_WEIGHT)",
    )
    evaluate.add_argument("--output", default=None, help="write every score of every model and collection to JSON")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an --output file st-daft wrote before")
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
    export.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)


def _add_soup_parser(commands: argparse._SubParsersAction) -> None:
    soup = commands.add_parser(
        "soup",
        help="average the static query tables of several runs of one recipe (other seeds) into one model",
    )
    soup.add_argument("runs", nargs="+", help="trained model folders (two or more; same collection and recipe)")
    soup.add_argument("--output", required=True, help="folder for the soup (a new or empty one)")
    soup.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)


def run_soup(args: argparse.Namespace) -> int:
    from st_daft.models.asymmetric import QUERY_ROUTE, check_model_source, get_route
    from st_daft.training.soup import save_soup, soup_static_routes

    if len(args.runs) < 2:
        raise ValueError(f"a soup needs two or more runs, got {len(args.runs)}: {' '.join(args.runs)}")
    reads = [("a run averaged", run) for run in args.runs]
    folder = claim_output(args.output, "soup", args.argv, overwrite=args.overwrite, reads=reads)
    for run in args.runs:
        check_model_source(run)
    soup = soup_static_routes(args.runs)
    with folder.writing():
        save_soup(soup, args.runs, folder.path)
    rows, dimension = get_route(soup, QUERY_ROUTE)[0].embedding.weight.shape
    print(f"soup of {len(args.runs)} static query tables ({rows:,} x {dimension}) saved to {Path(args.output)}")
    return 0


#: Options that change what one stage does: given for a stage the run does not train, they are refused.
def run_evaluate(args: argparse.Namespace) -> int:
    from st_daft.evaluation.mteb import evaluate_collections
    from st_daft.evaluation.tables import format_table

    if args.fusion_weight is not None and not args.fuse_bm25:
        print("st-daft evaluate: error: --fusion-weight applies to --fuse-bm25 only", file=sys.stderr)
        return 2
    models: list = list(args.model)
    labels = list(args.model)
    fuse_bm25 = None
    option = "--baseline"
    try:
        from st_daft.evaluation.baselines import BM25Search, make_baseline

        for name in dict.fromkeys(args.baseline):
            baseline = make_baseline(name)
            models.append(baseline)
            labels.append(baseline.name)
        if args.fuse_bm25:
            from st_daft.evaluation.hybrid import DEFAULT_FUSION_WEIGHT

            option = "--fuse-bm25"
            BM25Search()  # the bm25 extra, checked before any collection or model is read
            fuse_bm25 = DEFAULT_FUSION_WEIGHT if args.fusion_weight is None else args.fusion_weight
    except ImportError as error:
        print(f"st-daft evaluate: error: {option}: {error}", file=sys.stderr)
        return 2
    marker = None
    if args.output:
        marker = claim_output_file(args.output, "evaluate", args.argv, overwrite=args.overwrite)
    if args.document_store:
        check_writable_folder(args.document_store, "--document-store")
    from st_daft.models.asymmetric import check_model_source

    for model in args.model:
        check_model_source(model)
    try:
        comparison = evaluate_collections(
            models,
            args.data,
            split=args.split,
            labels=labels,
            batch_size=args.batch_size,
            document_store=args.document_store,
            fuse_bm25=fuse_bm25,
        )
    except OSError as error:  # a Hub id that is not there, or not reachable
        raise ValueError(hub_message(error, [("", model) for model in args.model])) from None
    if marker is not None:
        write_output_file(args.output, comparison, marker)
    for metric in ("ndcg_at_10", "recall_at_100"):
        print()
        print(format_table(comparison, metric))
    if args.output:
        print(f"\nscores written to {Path(args.output)}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from sentence_transformers import SentenceTransformer

    from st_daft.models.asymmetric import check_model_source, count_parameters, export_route

    if args.dtype is not None and args.format != "model2vec":
        raise ValueError(f"--dtype {args.dtype} applies to --format model2vec only")
    reads = [("the model exported", args.model)]
    folder = claim_output(args.output, "export", args.argv, overwrite=args.overwrite, option="OUTPUT", reads=reads)
    check_model_source(args.model)
    try:
        model = SentenceTransformer(args.model)
    except OSError as error:  # a Hub id that is not there, or not reachable
        raise ValueError(hub_message(error, [("", args.model)])) from None
    if args.format == "model2vec":
        from st_daft.serving import export_static_model

        # a route that is not static is refused before anything is written
        export_static_model(model, route=args.route, dtype=args.dtype or "float32")
        with folder.writing():
            static_model = export_static_model(model, folder.path, route=args.route, dtype=args.dtype or "float32")
        rows, dimension = static_model.embedding.shape
        print(
            f"{args.route} route: {rows:,} x {dimension} {static_model.embedding_dtype} table "
            f"(full model: {count_parameters(model):,} parameters)"
        )
        print(f"model2vec model saved to {Path(args.output)}")
        return 0
    exported = export_route(model, args.route)  # a missing route is refused before anything is written
    with folder.writing():
        exported.save(str(folder.path))
    print(f"{args.route} route: {count_parameters(exported):,} parameters (full model: {count_parameters(model):,})")
    print(f"model saved to {Path(args.output)}")
    return 0
