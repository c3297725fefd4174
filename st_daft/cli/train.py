"""``st-daft train``: its options, how they become a :class:`~st_daft.training.recipe.DAFTConfig` of stages, and the
run (data, model, recipe, model card).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from st_daft.cli.options import _DOCUMENT_STORE_HELP, _OVERWRITE_HELP, _stages
from st_daft.cli.stage_options import add_stage_options, check_stage_flags, config_from_args
from st_daft.training.stages.settings import non_negative_int, positive_int

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
        default=None,
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
    every = train.add_argument_group("every trained stage")
    every.add_argument("--max-steps", type=positive_int, default=None, help="step budget of every stage")
    every.add_argument("--eval-steps", type=positive_int, default=None, help="evaluate/save every N steps")
    every.add_argument("--kl-patience", type=non_negative_int, default=None, help="KL patience (0: off)")
    add_stage_options(train)
    run = train.add_argument_group("run")
    run.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto", help="default: auto")
    run.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp32")
    run.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
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
        default=None,
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
        type=non_negative_int,
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


def _apply_recipe(args: argparse.Namespace):
    """The recipe of ``--recipe`` (None without it); the run-wide options not given on the command line take its
    values (encoders, seed, precision, cache type), then their defaults."""
    from st_daft.training.recipe import DAFTConfig
    from st_daft.training.stages.settings import SettingError

    recipe = None
    if args.recipe:
        try:
            recipe = DAFTConfig.load_recipe(args.recipe)
        except SettingError as error:
            raise ValueError(f"--recipe {error}") from None
    defaults = {
        "query_encoder": "static",
        "document_encoder": None,
        "seed": 0,
        "precision": "fp32",
        "cache_dtype": "float32",
    }
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, getattr(recipe, name) if recipe is not None else default)
    return recipe


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
    recipe = _apply_recipe(args)
    _check_train_options(args)
    train_data, validation_data, unlabeled_queries = _load_training_data(args)
    labelled = not isinstance(train_data, tuple)
    train_data, titles = (train_data, None) if labelled else train_data
    stages = args.stages or (recipe.stage_names if recipe else default_stages(args.query_encoder, labelled=labelled))
    check_stage_flags(args, stages)
    document_encoder = args.document_encoder = args.document_encoder or default_document_encoder()
    config = config_from_args(args, stages, recipe)
    identity = run_identity(config, _run_inputs(args, document_encoder))
    for difference in folder.check_resume(identity, anyway=args.resume_anyway):
        print(f"warning: --resume-anyway: {difference}", file=sys.stderr)
    # checkpoints a run kept stay kept when it is resumed (unless --keep-checkpoints was given to neither)
    keep = args.keep_checkpoints or bool(folder.resuming and folder.previous.get("keep_checkpoints"))
    folder.record["keep_checkpoints"] = keep
    if not labelled:
        extra = f" and {len(unlabeled_queries)} unlabelled queries" if unlabeled_queries else ""
        print(f"corpus only ({len(train_data)} documents{extra}, no labelled queries): label-free stages")
    origin = (
        "--stages"
        if args.stages
        else (f"--recipe {args.recipe}" if recipe else f"default for --query-encoder {args.query_encoder}")
    )
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
