"""``st-daft index`` (write an index folder) and ``st-daft search`` (query one)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _option(value: str) -> tuple[str, str]:
    key, equals, text = value.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, text


def _weight(value: str) -> float:
    number = float(value)
    if not (number >= 0 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {value}")
    return number


def add_index_parser(commands: argparse._SubParsersAction) -> None:
    index = commands.add_parser(
        "index",
        help="embed a corpus with a model's document route and write an index folder that `st-daft search` and "
        "st_daft.serving.Searcher serve without torch",
    )
    index.add_argument("model", help="asymmetric model folder or Hub id (its query route must be static)")
    index.add_argument("--data", required=True, help="BEIR folder or corpus file (JSON lines, or one text a line)")
    index.add_argument("--output", required=True, help="the index folder (new or empty)")
    index.add_argument(
        "--index",
        choices=["auto", "flat", "ivf", "hnsw"],
        default="auto",
        help="faiss index: auto (default) is flat (exact) below 100,000 documents, ivf above",
    )
    index.add_argument(
        "--index-option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="faiss setting, repeatable: nlist, nprobe, hnsw_m, ef_search, ef_construction, train_size, seed",
    )
    index.add_argument("--bm25", action="store_true", help="also index the corpus with BM25 for fused search")
    index.add_argument(
        "--fusion-weight", type=_weight, default=None, metavar="W", help="BM25's default weight in fused search (0.15)"
    )
    index.add_argument(
        "--query-dtype", choices=["float32", "float16", "int8"], default="float32", help="query route table type"
    )
    index.add_argument(
        "--embeddings-dtype",
        choices=["auto", "float16", "float32"],
        default="auto",
        help="document embeddings type: float16 (half the size), float32 (evaluate's exact scores) or auto (default: "
        "float32 below 100,000 documents, else float16)",
    )
    index.add_argument("--batch-size", type=int, default=64)
    index.add_argument(
        "--resume", action="store_true", help="finish an interrupted build in --output (reuses complete embeddings)"
    )
    index.add_argument(
        "--overwrite", action="store_true", help="replace an index st-daft wrote in --output (only what it wrote)"
    )


def add_search_parser(commands: argparse._SubParsersAction) -> None:
    search = commands.add_parser("search", help="print the best documents of queries from an index folder")
    search.add_argument("index", help="index folder written by `st-daft index`")
    search.add_argument("query", nargs="+", help="query text(s)")
    search.add_argument("-k", "--top-k", type=int, default=10, help="documents per query (10)")
    search.add_argument(
        "--fuse-bm25",
        nargs="?",
        type=_weight,
        const=-1.0,
        default=None,
        metavar="W",
        help="fuse with BM25 (the index's weight, or W); needs an index built with --bm25",
    )
    search.add_argument("--nprobe", type=int, default=None, help="IVF cells searched per query")
    search.add_argument("--json", action="store_true", help="print one JSON object per query")


def run_index(args: argparse.Namespace) -> int:
    from st_daft.evaluation.fusion import DEFAULT_FUSION_WEIGHT
    from st_daft.serving.build import build_search_index

    if args.fusion_weight is not None and not args.bm25:
        print("st-daft index: error: --fusion-weight applies to --bm25 only", file=sys.stderr)
        return 2
    try:
        output = build_search_index(
            args.model,
            args.data,
            args.output,
            index=args.index,
            index_options=dict(args.index_option),
            bm25=args.bm25,
            batch_size=args.batch_size,
            query_dtype=args.query_dtype,
            embeddings_dtype=args.embeddings_dtype,
            fusion_weight=DEFAULT_FUSION_WEIGHT if args.fusion_weight is None else args.fusion_weight,
            resume=args.resume,
            overwrite=args.overwrite,
            arguments=getattr(args, "argv", None),
        )
    except ImportError as error:
        print(f"st-daft index: error: --bm25: {error}", file=sys.stderr)
        return 2
    manifest = json.loads((Path(output) / "manifest.json").read_text(encoding="utf-8"))
    lexical = " + BM25" if manifest["files"].get("bm25") else ""
    print(
        f"index of {manifest['documents']:,} documents ({manifest['dimension']}-d, {manifest['index']['kind']}"
        f"{lexical}) written to {output}"
    )
    return 0


def run_search(args: argparse.Namespace) -> int:
    from st_daft.serving import Searcher

    if args.top_k < 1:
        print("st-daft search: error: -k must be at least 1", file=sys.stderr)
        return 2
    searcher = Searcher.load(args.index, nprobe=args.nprobe, bm25=args.fuse_bm25 is not None)
    fuse = None if args.fuse_bm25 is None else (True if args.fuse_bm25 < 0 else args.fuse_bm25)
    ids, scores = searcher.search(args.query, k=args.top_k, fuse_bm25=fuse)
    for query, query_ids, query_scores in zip(args.query, ids, scores):
        if args.json:
            hits = [{"id": doc, "score": round(float(score), 6)} for doc, score in zip(query_ids, query_scores)]
            print(json.dumps({"query": query, "hits": hits}, ensure_ascii=False))
            continue
        print(f"{query}")
        if not query_ids:
            print("  (no results)")
        for rank, (doc, score) in enumerate(zip(query_ids, query_scores), start=1):
            print(f"  {rank:>3}  {score:8.4f}  {doc}")
    return 0
