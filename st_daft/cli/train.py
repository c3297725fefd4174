"""``st-daft train``: its options, how they become a :class:`~st_daft.training.recipe.DAFTConfig` of stages, and the
run (data, model, recipe, model card).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from st_daft.cli.options import (
    _DOCUMENT_STORE_HELP,
    _OVERWRITE_HELP,
    _index_option,
    _negatives,
    _non_negative_float,
    _non_negative_int,
    _positive_float,
    _positive_int,
    _stages,
    _unit_float,
)

logger = logging.getLogger("st_daft")


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a query route (and the document route) with DAFT")
    data = train.add_argument_group("data")
    data.add_argument(
        "--data",
        default=None,
        help="BEIR folder or Hub dataset id (e.g. BeIR/scifact); a folder with only corpus.jsonl runs the label-free "
        "stages",
    )
    data.add_argument("--corpus", default=None, help="a corpus alone (JSONL or text file): label-free stages only")
    data.add_argument(
        "--unlabeled-queries",
        default=None,
        help="query texts without judgements (a query log, one a line or JSONL): added to the corpus stage's texts",
    )
    data.add_argument("--split", default="train", help="qrels split to train on (default: train)")
    data.add_argument("--dev-split", default=None, help="qrels split for validation (default: hold out queries)")
    train.add_argument("--output", required=True, help="folder for checkpoints and the final model")
    train.add_argument(
        "--query-encoder",
        default="static",
        help="static | tiny:L,H | symmetric (no Router: fine-tune the document model itself) | PATH",
    )
    train.add_argument("--document-encoder", default=None, help="document model (default: all-MiniLM-L6-v2)")
    train.add_argument(
        "--stages",
        type=_stages,
        default=None,
        help="comma-separated, in order: vocabulary (static routes: distil the whole vocabulary), corpus (label-free "
        "alignment on corpus text), align (DAFT stage 1), finetune (joint). Default by query encoder: static "
        "vocabulary,corpus,align; tiny:L,H corpus,align; others align,finetune (DAFT, the paper's recipe); a corpus "
        "without queries: the label-free stages",
    )
    budget = train.add_argument_group("budgets and learning rates")
    budget.add_argument(
        "--corpus-steps",
        type=_positive_int,
        default=None,
        help="corpus-stage steps (default: 900 beside labelled queries with the general texts, 600 without them, 1200 "
        "for a corpus alone)",
    )
    budget.add_argument(
        "--corpus-max-texts", type=_positive_int, default=None, help="texts cut from the corpus (default 20000)"
    )
    budget.add_argument("--corpus-lr", type=_positive_float, default=None, help="corpus-stage learning rate (1e-3)")
    budget.add_argument(
        "--corpus-document-weight",
        type=_non_negative_float,
        default=None,
        help="corpus stage: weight of the pseudo-query term, each cut text against the whole corpus with its "
        "source document as the positive (default: 1 for a corpus alone, 0 with labelled queries)",
    )
    budget.add_argument(
        "--corpus-pseudo-queries",
        type=_non_negative_int,
        default=None,
        help="corpus stage: more texts cut from the corpus, not encoded, each trained only as a pseudo-query for its "
        "source document (needs the pseudo-query term; default 0)",
    )
    budget.add_argument(
        "--corpus-ranking-weight",
        type=_non_negative_float,
        default=None,
        help="corpus stage: weight of a term distilling the document encoder's ranking of the whole corpus for each "
        "text (default 10; 0 turns it off)",
    )
    budget.add_argument(
        "--corpus-lexical-weight",
        type=_non_negative_float,
        default=None,
        help="corpus stage: fuse BM25 into that ranking's teacher: each text's 32 best documents by BM25 add W times "
        "their score (divided by the text's best) to the document encoder's cosine (needs the bm25 extra; default 0)",
    )
    budget.add_argument(
        "--corpus-teacher-neighbours",
        type=_non_negative_int,
        default=None,
        metavar="K",
        help="corpus stage, on a sample of the corpus (--corpus-sample-size): each text's K best documents by the "
        "document encoder, found once before training, are in every step's sample (default 16; 0: none)",
    )
    budget.add_argument(
        "--general-texts",
        type=_non_negative_int,
        default=None,
        help="corpus stage: how many of the general-domain English texts that ship with st-daft (WordNet "
        "definitions and examples, up to 20000) join its texts (default: 20000 for a static route beside labelled "
        "queries, else 0)",
    )
    budget.add_argument("--no-zipf", action="store_true", help="vocabulary stage without Zipf weighting")
    budget.add_argument(
        "--idf-weights",
        action="store_true",
        help="vocabulary stage: each token's weight in a query is its BM25 IDF over the corpus (row norms)",
    )
    budget.add_argument(
        "--corpus-words",
        type=_non_negative_int,
        default=None,
        help="vocabulary stage: give up to N of the corpus's words that the tokenizer splits into pieces their own "
        "whole-word rows in the static query route, words in most documents first (default: 20000 for a corpus "
        "alone, 0 beside labelled queries)",
    )
    budget.add_argument(
        "--min-word-documents",
        type=_positive_int,
        default=None,
        help="vocabulary stage: a corpus word gets its own row only if at least N documents hold it (default 2; 1 "
        "admits words a single document holds)",
    )
    budget.add_argument(
        "--contextual-vocabulary",
        choices=["auto", "on", "off"],
        default="auto",
        help="vocabulary stage: the corpus's tokens take their mean contextual vectors over the corpus (one pass of "
        "the document encoder over it); auto (default): on for a corpus alone, off beside labelled queries",
    )
    budget.add_argument("--max-steps", type=_positive_int, default=None, help="step budget of every stage")
    budget.add_argument("--align-steps", type=_positive_int, default=None, help="alignment steps (default 300)")
    budget.add_argument("--align-batch-size", type=_positive_int, default=None, help="alignment batch size (64)")
    budget.add_argument("--align-lr", type=_positive_float, default=None, help="alignment learning rate (1e-3)")
    budget.add_argument(
        "--align-select",
        choices=("auto", "kl", "validation"),
        default="auto",
        help="which alignment checkpoint is kept: validation (best validation nDCG@10, the full budget), kl "
        "(lowest 1-NN KL, early-stopped: DAFT's criterion) or auto (default): validation when the run has "
        "labelled queries",
    )
    budget.add_argument(
        "--align-interpolation",
        type=_unit_float,
        default=None,
        help="keep this share of the aligned query route and the rest of the route alignment started from, in every "
        "weight (WiSE-FT; 0-1; default 0.75 for a static route after the corpus stage when align is the last stage, "
        "else 1: the aligned route)",
    )
    budget.add_argument("--finetune-epochs", type=_positive_float, default=None, help="fine-tuning epochs (2)")
    budget.add_argument("--finetune-steps", type=_positive_int, default=None, help="fine-tuning steps (over epochs)")
    budget.add_argument("--batch-size", type=_positive_int, default=None, help="fine-tuning batch size (default 32)")
    budget.add_argument("--query-lr", type=_positive_float, default=None, help="fine-tuning query-route lr (1e-4)")
    budget.add_argument("--document-lr", type=_positive_float, default=None, help="fine-tuning document-route lr")
    budget.add_argument("--eval-steps", type=_positive_int, default=None, help="evaluate/save every N steps")
    budget.add_argument("--kl-patience", type=_non_negative_int, default=None, help="KL patience (0: off)")
    finetune = train.add_argument_group("fine-tuning")
    finetune.add_argument("--guard", choices=["variance", "uniformity", "none"], default=None, help="collapse guard")
    finetune.add_argument("--guard-weight", type=_non_negative_float, default=None, help="weight of the guard")
    finetune.add_argument(
        "--negatives",
        type=_negatives,
        default="in-batch",
        help="fine-tuning negatives: in-batch (default) | stale | corrected | refresh:N | corrected+refresh:N "
        "(mined from the document cache during training; N: steps between full re-embeddings)",
    )
    finetune.add_argument("--num-negatives", type=_positive_int, default=4, help="mined negatives per query (4)")
    finetune.add_argument(
        "--mining-index",
        choices=["auto", "exact", "flat", "ivf", "hnsw", "query-side", "two-step"],
        default="auto",
        help="how mined negatives are searched for: auto (default: exact up to 100,000 documents, else flat), or a "
        "faiss index over the corrected cache (flat, ivf, hnsw), or a stale index searched with corrected queries "
        "(query-side: a linear corrector; two-step: re-ranked by the corrector); ivf or two-step for millions",
    )
    finetune.add_argument(
        "--mining-index-option",
        type=_index_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the mining index, repeatable: nlist, nprobe, hnsw_m, ef_search, ef_construction, shortlist "
        "(integers), storage (float32|float16; default: --cache-dtype's), base (the stale index of query-side and "
        "two-step: flat|ivf|hnsw)",
    )
    finetune.add_argument("--no-stop-on-collapse", action="store_true", help="keep training when a route collapses")
    run = train.add_argument_group("run")
    run.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto", help="default: auto")
    run.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32", help="default: fp32")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--resume",
        action="store_true",
        help="resume each stage from its last complete checkpoint; refused when the run in --output was trained on "
        "other data or settings (each difference is named)",
    )
    run.add_argument(
        "--resume-anyway",
        action="store_true",
        help="with --resume: continue the run in --output with this command's data and settings, though they differ",
    )
    run.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    run.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep the per-stage checkpoint folders (and the corpus cache); a resumed run keeps them when the run "
        "it resumes did",
    )
    run.add_argument(
        "--cache-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="storage of the corpus cache of document embeddings (float16: half the memory; default float32)",
    )
    run.add_argument(
        "--cache-on-disk",
        action="store_true",
        help="keep the corpus cache memory-mapped in OUTPUT/corpus-cache instead of in each process's memory "
        "(one copy for all torchrun processes; a resumed run reads it back); for corpora of millions",
    )
    run.add_argument(
        "--corpus-sample-size",
        type=_non_negative_int,
        metavar="N",
        help="corpus documents each step of the corpus and align stages scores in its softmax over the corpus: N of "
        "them (the batch's own, the document route's best for its texts, uniform rows with the sampled softmax's "
        "correction) instead of all, and the cache is read where it is; default: all up to 65,536 documents, "
        "16,384 above; 0: all of them always",
    )
    run.add_argument(
        "--push-to-hub",
        metavar="ID",
        default=None,
        help="upload the trained model and its card to this Hub repository (sentence-transformers' push_to_hub)",
    )
    run.add_argument("--document-store", default=None, help=_DOCUMENT_STORE_HELP)


STAGE_SETTINGS = {
    "vocabulary": ("no_zipf", "idf_weights", "corpus_words", "min_word_documents", "contextual_vocabulary"),
    "corpus": (
        "corpus_document_weight", "corpus_pseudo_queries", "corpus_ranking_weight", "corpus_lexical_weight",
        "general_texts", "corpus_teacher_neighbours",
    ),
    "align": ("align_select", "align_interpolation"),
    "finetune": (
        "guard", "guard_weight", "negatives", "num_negatives", "mining_index", "mining_index_option",
        "no_stop_on_collapse",
    ),
}  # fmt: skip
#: One stage's budget: given for a stage the run does not train, it is only warned about (scripts pass one set).
STAGE_BUDGETS = {
    "corpus": ("corpus_steps", "corpus_max_texts", "corpus_lr"),
    "align": ("align_steps", "align_batch_size", "align_lr"),
    "finetune": ("finetune_epochs", "finetune_steps", "batch_size", "query_lr", "document_lr"),
}


def _train_defaults() -> dict[str, Any]:
    """Every ``st-daft train`` option's default, as argparse sets it."""
    parser = argparse.ArgumentParser()
    _add_train_parser(parser.add_subparsers(dest="command"))
    return vars(parser.parse_args(["train", "--output", "-", "--data", "-"]))


def _check_stage_options(args: argparse.Namespace, stages: tuple[str, ...]) -> None:
    """Refuse a stage's setting when the run does not train that stage (it would be silently ignored), and warn about
    a budget given for one."""
    from st_daft.training.recipe import STAGES

    defaults = _train_defaults()

    def given(table: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
        return [
            (stage, dest)
            for stage, dests in table.items()
            if stage not in stages
            for dest in dests
            if getattr(args, dest) != defaults[dest]
        ]

    def flag(dest: str) -> str:
        value = getattr(args, dest)
        if isinstance(value, bool):
            return f"--{dest.replace('_', '-')}"
        if isinstance(value, list):  # --mining-index-option KEY=VALUE, repeated
            value = " ".join(f"{key}={item}" for key, item in value)
        return f"--{dest.replace('_', '-')} {value}"

    run = ",".join(stages)
    for stage, dest in given(STAGE_BUDGETS):
        print(f"warning: {flag(dest)} is the {stage} stage's, not trained in this run (stages: {run})", file=sys.stderr)
    ignored = given(STAGE_SETTINGS)
    if ignored:
        stage, dest = ignored[0]
        more = f" (and {len(ignored) - 1} more)" if len(ignored) > 1 else ""
        suggestion = ",".join(name for name in STAGES if name in (*stages, stage))
        raise ValueError(
            f"{flag(dest)}{more} applies to the {stage} stage, which this run does not train (stages: {run}); "
            f"add the stage with --stages, e.g. --stages {suggestion}"
        )


def _config_from_args(args: argparse.Namespace, stages: tuple[str, ...]):
    from st_daft.training.recipe import DAFTConfig
    from st_daft.training.stages.align import AlignStage
    from st_daft.training.stages.corpus import CorpusStage
    from st_daft.training.stages.finetune import FinetuneStage
    from st_daft.training.stages.vocabulary import VocabularyStage

    def given(**values):
        return {key: value for key, value in values.items() if value is not None}

    # --max-steps and --eval-steps apply to every trained stage, over the stage's own flags.
    every = given(max_steps=args.max_steps, eval_steps=args.eval_steps)
    patience = {} if args.kl_patience is None else {"kl_patience": args.kl_patience or None}
    finetune_budget = given(epochs=args.finetune_epochs, max_steps=-1 if args.finetune_epochs else None)
    finetune_budget.update(given(max_steps=args.finetune_steps))
    builders = {
        "vocabulary": lambda: VocabularyStage(
            zipf_weighting=not args.no_zipf,
            idf_weighting=args.idf_weights,
            corpus_words=args.corpus_words,
            **given(min_word_documents=args.min_word_documents),
            contextual={"auto": None, "on": True, "off": False}[args.contextual_vocabulary],
        ),
        "corpus": lambda: CorpusStage(
            **{
                **given(
                    max_steps=args.corpus_steps,
                    learning_rate=args.corpus_lr,
                    max_texts=args.corpus_max_texts,
                    document_weight=args.corpus_document_weight,
                    pseudo_queries=args.corpus_pseudo_queries,
                    ranking_weight=args.corpus_ranking_weight,
                    lexical_weight=args.corpus_lexical_weight,
                    general_texts=args.general_texts,
                    corpus_sample_size=args.corpus_sample_size,
                    teacher_neighbours=args.corpus_teacher_neighbours,
                ),
                **every,
                **patience,
            }
        ),
        "align": lambda: AlignStage(
            **{
                **given(
                    max_steps=args.align_steps,
                    batch_size=args.align_batch_size,
                    learning_rate=args.align_lr,
                    interpolation=args.align_interpolation,
                    corpus_sample_size=args.corpus_sample_size,
                ),
                "selection": args.align_select,
                **every,
                **patience,
            }
        ),
        "finetune": lambda: FinetuneStage(
            **{
                **finetune_budget,
                **given(
                    batch_size=args.batch_size,
                    learning_rate=args.query_lr,
                    document_learning_rate=args.document_lr,
                    guard=args.guard,
                    guard_weight=args.guard_weight,
                ),
                **every,
                "negatives": args.negatives,
                "num_negatives": args.num_negatives,
                "mining_index": args.mining_index,
                "mining_index_options": dict(args.mining_index_option),
                "stop_on_collapse": not args.no_stop_on_collapse,
            }
        ),
    }
    return DAFTConfig(
        stages=[builders[name]() for name in stages],
        seed=args.seed,
        document_store=args.document_store,
        cache_dtype=args.cache_dtype,
        cache_on_disk=args.cache_on_disk,
        device=args.device,
        precision=args.precision,
    )


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse an --output that holds the inputs (they would be overwritten by the model's files)."""
    output = Path(args.output).resolve()
    if args.data and Path(args.data).exists() and Path(args.data).resolve() == output:
        raise ValueError(f"--output {args.output} is the --data folder: the model would be written over the dataset")
    for option, path in (("--corpus", args.corpus), ("--unlabeled-queries", args.unlabeled_queries)):
        if path and Path(path).resolve().parent == output:
            raise ValueError(f"--output {args.output} holds the {option} file {path}: choose another output folder")


def _load_training_data(args: argparse.Namespace):
    """A labelled collection (BEIR) or, for a corpus alone, (id -> text, id -> title); the validation collection;
    the unlabelled queries."""
    from st_daft.data import DataError, load_beir

    if bool(args.data) == bool(args.corpus):
        raise DataError("give --data (a BEIR folder or Hub id) or --corpus (a corpus file), one of the two")
    queries = None
    if args.unlabeled_queries:
        from st_daft.data import load_queries_file

        queries = load_queries_file(args.unlabeled_queries)
    folder = Path(args.data) if args.data else None
    corpus_only = (
        folder and folder.is_dir() and not any((folder / name).exists() for name in ("queries.jsonl", "qrels"))
    )
    if args.corpus or corpus_only:
        from st_daft.data import load_corpus

        corpus_file = Path(args.corpus) if args.corpus else folder / "corpus.jsonl"
        return (load_corpus(corpus_file), _corpus_titles(corpus_file)), None, queries
    validation = load_beir(args.data, split=args.dev_split) if args.dev_split else None
    return load_beir(args.data, split=args.split), validation, queries


def _corpus_titles(file: Path) -> dict[str, str]:
    """The titles of a JSON-lines corpus whose rows have ``_id`` (or ``id``) and ``title`` (a BEIR corpus.jsonl):
    the corpus stage cuts pseudo-queries from them. Empty for a text file."""
    import json

    titles: dict[str, str] = {}
    try:
        with file.open(encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line) if line.strip() else None
                doc_id = row.get("_id", row.get("id")) if isinstance(row, dict) else None
                if doc_id is not None and isinstance(row.get("title"), str):
                    titles[str(doc_id)] = row["title"]
    except (ValueError, UnicodeDecodeError):  # not JSON lines: a text corpus has no titles
        return {}
    return titles


def _check_train_options(args: argparse.Namespace) -> None:
    """What can be checked of ``st-daft train``'s options before any file is read or model loaded."""
    from st_daft.models.asymmetric import check_model_source, check_query_encoder
    from st_daft.training.stages.base import check_device
    from st_daft.utils.output import check_writable_folder

    if args.resume_anyway and not args.resume:
        raise ValueError("--resume-anyway applies to --resume only")
    check_device(None if args.device == "auto" else args.device, args.precision)
    check_query_encoder(args.query_encoder)
    if args.document_encoder:
        check_model_source(args.document_encoder, "--document-encoder")
    if args.document_store:
        check_writable_folder(args.document_store, "--document-store")
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as error:
            reason = str(error).splitlines()[0]
            raise ValueError(f"--push-to-hub {args.push_to_hub}: not a Hub repository id ({reason})") from None


def _run_inputs(args: argparse.Namespace, document_encoder: str) -> dict[str, object]:
    """What identifies a run's inputs for --resume: the encoders, and each data file's content (or the Hub id)."""
    from st_daft.utils.output import file_identity

    def local(spec: str) -> str:
        return str(Path(spec).resolve()) if Path(spec).exists() else spec

    inputs: dict[str, object] = {
        "--query-encoder": local(args.query_encoder),
        "--document-encoder": local(document_encoder),
        "--split": args.split,
        "--dev-split": args.dev_split,
    }
    files: list[tuple[str, Path]] = []
    if args.data and Path(args.data).is_dir():
        folder = Path(args.data)
        names = ["corpus.jsonl", "queries.jsonl", f"qrels/{args.split}.tsv"]
        names += [f"qrels/{args.dev_split}.tsv"] if args.dev_split else []
        files += [(f"--data {name}", folder / name) for name in names]
    elif args.data:
        inputs["--data"] = args.data  # a Hub dataset
    for option, path in (("--corpus", args.corpus), ("--unlabeled-queries", args.unlabeled_queries)):
        if path:
            inner = "corpus.jsonl" if option == "--corpus" else "queries.jsonl"
            files.append((option, Path(path) / inner if Path(path).is_dir() else Path(path)))
    for label, path in files:
        if path.is_file():
            inputs[label] = file_identity(path)
    return inputs


def run_train(args: argparse.Namespace) -> int:
    from sentence_transformers import SentenceTransformer

    from st_daft.cli.errors import hub_message
    from st_daft.models.asymmetric import build_asymmetric_model, default_document_encoder
    from st_daft.training.recipe import checkpoint_entries, default_stages, run_identity, train_daft
    from st_daft.utils.distributed import init_distributed, is_main_process
    from st_daft.utils.output import claim_output

    _check_paths(args)
    # fail before loading anything: the output folder, then every option that names a device, model or path
    folder = claim_output(args.output, "train", args.argv, overwrite=args.overwrite, resume=args.resume)
    _check_train_options(args)
    train_data, validation_data, unlabeled_queries = _load_training_data(args)
    labelled = not isinstance(train_data, tuple)
    train_data, titles = (train_data, None) if labelled else train_data
    stages = args.stages or default_stages(args.query_encoder, labelled=labelled)
    _check_stage_options(args, stages)
    config = _config_from_args(args, stages)
    document_encoder = args.document_encoder or default_document_encoder()
    identity = run_identity(config, _run_inputs(args, document_encoder))
    for difference in folder.check_resume(identity, anyway=args.resume_anyway):
        print(f"warning: --resume-anyway: {difference}", file=sys.stderr)
    # checkpoints a run kept stay kept when it is resumed (unless --keep-checkpoints was given to neither)
    keep = args.keep_checkpoints or bool(folder.resuming and folder.previous.get("keep_checkpoints"))
    folder.record["keep_checkpoints"] = keep
    if not labelled:
        extra = f" and {len(unlabeled_queries)} unlabelled queries" if unlabeled_queries else ""
        print(f"corpus only ({len(train_data)} documents{extra}, no labelled queries): label-free stages")
    origin = "--stages" if args.stages else f"default for --query-encoder {args.query_encoder}"
    print(f"stages: {','.join(stages)} ({origin})", flush=True)
    device = None if args.device == "auto" else args.device
    try:
        if args.query_encoder == "symmetric":
            model = SentenceTransformer(document_encoder, device=device)
        else:
            model = build_asymmetric_model(document_encoder, args.query_encoder, device=device, seed=args.seed)
    except OSError as error:  # a Hub id that is not there, or not reachable
        raise ValueError(
            hub_message(error, [("--document-encoder", document_encoder), ("--query-encoder", args.query_encoder)])
        ) from None
    # under torchrun: join the process group before the corpus is embedded (sharded), and after the model is built,
    # since transformers' save_pretrained writes nothing outside rank 0 once a group exists
    init_distributed()
    summary = train_daft(
        model,
        train_data,
        args.output,
        config,
        validation_data=validation_data,
        resume_from_checkpoint=args.resume,
        unlabeled_queries=unlabeled_queries,
        overwrite=args.overwrite,
        titles=titles,
        output=folder,
    )
    if not keep and is_main_process():
        folder.remove(checkpoint_entries(config))
    for stage in summary.stages:
        print(stage.describe())
    print(f"model saved to {args.output}")
    if args.push_to_hub and is_main_process():
        from st_daft.models.card import push_to_hub

        print(f"pushed to the Hub: {push_to_hub(model, args.push_to_hub)}")
    return 0
