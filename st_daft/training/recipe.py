"""The recipe: a list of stages (:mod:`st_daft.training.stages`) run in order on one model by :func:`train_daft`.

DAFT itself (Leonhardt, Jahnke & Anand 2022) is ``align`` then ``finetune``; ``finetune`` alone is the plain
(non-DAFT) baseline; ``vocabulary`` and ``corpus`` are label-free stages that run before them, and the only ones a
corpus without queries allows. :func:`default_stages` gives the stages that measured best for a query encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from sentence_transformers import SentenceTransformer

from st_daft.data import RetrievalData, hub_failure, looks_like_local_path
from st_daft.embeddings.store import DocumentEmbeddingStore
from st_daft.models.asymmetric import QUERY_ROUTE, has_route
from st_daft.models.card import (
    attach_model_card,
    negatives_from_log_history,
    record_negatives,
    record_recipe,
    record_stage,
)
from st_daft.models.card_data import STAGE_DESCRIPTIONS
from st_daft.training.stages import STAGE_TYPES
from st_daft.training.stages.base import (
    DEVICES,
    PRECISIONS,
    Stage,
    StageContext,
    StageResult,
    TrainedStage,
    check_checkpoint,
    last_complete_checkpoint,
)
from st_daft.training.stages.finetune import FinetuneStage
from st_daft.training.stages.settings import SettingError, stage_from_dict, stage_to_dict
from st_daft.utils.distributed import is_main_process
from st_daft.utils.io import atomic_write_json
from st_daft.utils.output import OutputFolder, claim_output, package_version

logger = logging.getLogger(__name__)

__all__ = [
    "DAFTConfig",
    "TrainingSummary",
    "train_daft",
    "default_stages",
    "split_validation",
    "validation_texts",
    "run_identity",
    "data_identity",
    "checkpoint_entries",
    "remove_checkpoints",
    "STAGES",
    "RECIPE_FILE",
]

STAGES = tuple(STAGE_TYPES)
LABEL_FREE_STAGES = tuple(name for name, kind in STAGE_TYPES.items() if not kind.needs_labels)
#: Written beside the saved model: the stages that trained it (no custom class inside the model itself).
RECIPE_FILE = "daft_recipe.json"
#: With ``cache_on_disk``: the corpus caches, one sub-folder per document route (its fingerprint).
CORPUS_CACHE_FOLDER = "corpus-cache"
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def default_stages(query_encoder: str, labelled: bool = True) -> tuple[str, ...]:
    """The stages that measured best for a query encoder spec (docs/results/quality.md), label-free ones only when
    there are no labelled queries.

    ``static``: vocabulary, corpus, align; ``tiny:L,H``: corpus, align; a symmetric model: finetune; any other
    encoder: DAFT's align, finetune.
    """
    if query_encoder == "static":
        stages: tuple[str, ...] = ("vocabulary", "corpus", "align")
    elif query_encoder.startswith("tiny:"):
        stages = ("corpus", "align")
    elif query_encoder == "symmetric":
        stages = ("finetune",)
    else:
        stages = ("align", "finetune")
    if not labelled:
        stages = tuple(stage for stage in stages if stage in LABEL_FREE_STAGES) or ("corpus",)
    return stages


@dataclass
class DAFTConfig:
    """The stages to run, and the settings they share.

    Args:
        stages: stage objects (:class:`~st_daft.training.stages.vocabulary.VocabularyStage`,
            :class:`~st_daft.training.stages.corpus.CorpusStage`,
            :class:`~st_daft.training.stages.align.AlignStage`,
            :class:`~st_daft.training.stages.finetune.FinetuneStage`, each with its own budget and
            loss settings) or stage names for their defaults, in that order. ``("align", "finetune")`` is DAFT,
            ``("finetune",)`` the plain baseline.
        validation_fraction: share of training queries held out for validation when the data has no dev split.
        num_validation_texts: held-out texts for the KL criterion.
        validation_corpus_size: documents the validation retrieval runs over (the validation queries' judged
            documents plus random others); None for the whole corpus. Each evaluation re-encodes them.
        document_store: folder of a :class:`~st_daft.embeddings.store.DocumentEmbeddingStore`. What the frozen document
            route
            embeds (vocabulary, label-free targets, the corpus cache) is kept there, keyed by the route, and later
            runs with the same document encoder read it back instead of encoding it again.
        cache_dtype: ``"float32"`` or ``"float16"`` (half the memory, vectors to about 1e-3): how the corpus cache
            of document embeddings is stored (the corpus and align stages' targets and negatives, fine-tuning's mined
            negatives).
        cache_on_disk: keep the corpus cache in ``OUTPUT/corpus-cache/<document route>/`` as a memory-mapped file
            instead of in each process's memory: one copy in the page cache for all ``torchrun`` processes, written
            by the main one, and read back instead of encoded again by a resumed run. For corpora of millions.
        device: ``"cpu"``, ``"cuda"`` or ``"mps"``; None lets transformers pick (CUDA, MPS, else CPU).
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (the trainer's mixed precision).
        seed: random seed.
        query_encoder: the query encoder spec the model was built from (``st-daft train``'s ``--query-encoder``),
            recorded in the recipe; :func:`train_daft` trains the model it is given and does not read it.
        document_encoder: the document encoder the model was built from (``--document-encoder``), recorded alike.
    """

    stages: list[Stage | str] = field(default_factory=lambda: ["align", "finetune"])
    validation_fraction: float = 0.1
    num_validation_texts: int = 500
    validation_corpus_size: int | None = 2000
    document_store: str | None = None
    cache_dtype: str = "float32"
    cache_on_disk: bool = False
    device: str | None = None
    precision: str = "fp32"
    seed: int = 0
    query_encoder: str | None = None
    document_encoder: str | None = None

    def __post_init__(self) -> None:
        unknown = [stage for stage in self.stages if isinstance(stage, str) and stage not in STAGE_TYPES]
        if unknown or not self.stages:
            raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
        self.stages = [STAGE_TYPES[stage]() if isinstance(stage, str) else stage for stage in self.stages]
        names = [stage.name for stage in self.stages]
        if names != sorted(names, key=STAGES.index) or len(set(names)) != len(names):
            raise ValueError(f"stages run once each, in the order {list(STAGES)}, got {names}")
        if self.device not in (None, "auto", *DEVICES):
            raise ValueError(f"unknown device {self.device!r}; choose from {['auto', *DEVICES]}")
        self.device = None if self.device == "auto" else self.device
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {list(PRECISIONS)}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"unknown cache_dtype {self.cache_dtype!r}; choose from {list(CACHE_DTYPES)}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)

    def stage(self, name: str) -> Stage | None:
        return next((stage for stage in self.stages if stage.name == name), None)

    def settings(self) -> dict[str, Any]:
        shared = {key: value for key, value in vars(self).items() if key != "stages"}
        return {"stages": [stage.settings() for stage in self.stages], **shared}

    def to_dict(self) -> dict[str, Any]:
        """The recipe as data (what ``daft_recipe.json`` holds): every stage's every setting, the encoders, the
        seed and the shared settings, and the st-daft version that wrote it. :meth:`from_dict` reads it back."""
        shared = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "stages"}
        return {
            "st_daft_version": package_version(),
            **shared,
            "stages": [stage_to_dict(stage) for stage in self.stages],
        }

    @classmethod
    def from_dict(cls, recipe: dict[str, Any], source: str = "recipe") -> DAFTConfig:
        """The config a :meth:`to_dict` dict describes; an unknown stage or field, or a value of the wrong type,
        is refused naming it (``source`` names the file in the message)."""
        if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list):
            raise SettingError(f"{source}: not an st-daft recipe (a JSON object with a 'stages' list)")
        known = {item.name for item in fields(cls)}
        ignored = {"st_daft_version", "labelled"}
        unknown = sorted(set(recipe) - known - ignored)
        if unknown:
            raise SettingError(
                f"{source}: unknown setting(s) {', '.join(unknown)}; a recipe has {', '.join(sorted(known))}"
            )
        try:
            stages = [stage_from_dict(record, STAGE_TYPES) for record in recipe["stages"]]
            shared = {key: value for key, value in recipe.items() if key in known and key != "stages"}
            return cls(stages=stages, **shared)
        except (SettingError, ValueError, TypeError) as error:
            raise SettingError(f"{source}: {error}") from None

    @classmethod
    def load_recipe(cls, path: str | Path) -> DAFTConfig:
        """The config saved in a ``daft_recipe.json``, a model folder holding one, or a Hub model id (the file is
        downloaded from the model's repository)."""
        path = Path(path)
        if path.is_dir():
            path = path / RECIPE_FILE
        elif not path.exists() and not looks_like_local_path(str(path)):
            path = _download_recipe(str(path))
        try:
            recipe = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingError(f"{path}: no such recipe file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SettingError(f"{path}: not a JSON recipe ({error})") from None
        return cls.from_dict(recipe, source=str(path))


def _download_recipe(repo_id: str) -> Path:
    try:
        return Path(hf_hub_download(repo_id, RECIPE_FILE))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        raise SettingError(f"{repo_id}: no {RECIPE_FILE} on the Hub or in its cache: {hub_failure(error)}") from None


@dataclass
class TrainingSummary:
    """What :func:`train_daft` returns (and writes to ``daft_summary.json``)."""

    stages: list[StageResult]
    config: dict[str, Any]
    num_train_pairs: int = 0

    def to_dict(self) -> dict[str, Any]:
        stages = [asdict(result) for result in self.stages]
        return {"config": self.config, "num_train_pairs": self.num_train_pairs, "stages": stages}


def split_validation(data: RetrievalData, fraction: float, seed: int = 0) -> tuple[RetrievalData, RetrievalData | None]:
    """Hold out ``fraction`` of the queries (at least one) as a validation collection over the same corpus."""
    if fraction <= 0:
        return data, None
    query_ids = sorted(data.qrels)
    random.Random(seed).shuffle(query_ids)
    held_out = set(query_ids[: max(1, int(len(query_ids) * fraction))])
    if len(held_out) == len(query_ids):
        raise ValueError(f"cannot hold out {fraction:.0%} of only {len(query_ids)} queries and still train")

    def subset(ids: list[str], split: str) -> RetrievalData:
        return RetrievalData(
            corpus=data.corpus,
            queries={qid: data.queries[qid] for qid in ids},
            qrels={qid: data.qrels[qid] for qid in ids},
            name=data.name,
            split=split,
            titles=data.titles,
        )

    # In qrels order, never a set's: set order follows PYTHONHASHSEED and would reorder the training pairs.
    train_ids = [qid for qid in data.qrels if qid not in held_out]
    return subset(train_ids, data.split), subset([qid for qid in data.qrels if qid in held_out], "validation")


def validation_texts(data: RetrievalData | dict[str, str], count: int, seed: int = 0) -> list[str]:
    """Texts for the KL criterion: the held-out queries (of a :class:`RetrievalData`) plus the leading sentences of
    random corpus documents (a bare corpus, id -> text, gives sentences only)."""
    corpus = data if isinstance(data, dict) else data.corpus
    texts = [] if isinstance(data, dict) else list(data.queries.values())
    documents = random.Random(seed).sample(sorted(corpus), min(len(corpus), max(0, count - len(texts))))
    for doc_id in documents:
        first_sentence = re.split(r"(?<=[.!?])\s", corpus[doc_id], maxsplit=1)[0]
        texts.append(" ".join(first_sentence.split()[:48]))
    return texts[:count]


def _json_value(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists), so a recorded identity compares with a new one."""
    return json.loads(json.dumps(value, default=str))


def run_identity(config: DAFTConfig, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run trains, as :meth:`~st_daft.utils.output.OutputFolder.check_resume` compares it: its stages and every
    stage setting (budgets, learning rates, losses), the seed and the shared settings that change what is trained,
    and ``inputs`` (the data's identity, the encoders: label -> value)."""
    identity: dict[str, Any] = {"stages": ",".join(config.stage_names), "seed": config.seed}
    for stage in config.stages:
        for key, value in stage.settings().items():
            if key != "stage":
                identity[f"{stage.name} stage {key}"] = _json_value(value)
    for key in ("validation_fraction", "num_validation_texts", "validation_corpus_size", "cache_dtype"):
        identity[key] = getattr(config, key)
    return {**identity, **_json_value(inputs or {})}


def data_identity(
    train_data: RetrievalData | dict[str, str],
    validation_data: RetrievalData | None = None,
    unlabeled_queries: list[str] | None = None,
) -> dict[str, Any]:
    """The identity of data given in memory (the Python API): a SHA-256 of its texts and judgements."""
    digest = hashlib.sha256()
    for data in (train_data, validation_data):
        if isinstance(data, RetrievalData):
            content: Any = [data.corpus, data.queries, data.qrels]
        else:
            content = data
        digest.update(json.dumps(content, sort_keys=True).encode())
    digest.update(json.dumps(unlabeled_queries or []).encode())
    return {"training data": {"path": "(in memory)", "sha256": digest.hexdigest()}}


def checkpoint_entries(config: DAFTConfig) -> list[str]:
    """The entries of a run's folder that are its checkpoints, not its model: each stage's folder, the corpus
    cache."""
    folders = [getattr(stage, "folder", "") for stage in config.stages]
    return [*(folder for folder in folders if folder), CORPUS_CACHE_FOLDER]


def train_daft(
    model: SentenceTransformer,
    train_data: RetrievalData | dict[str, str],
    output_dir: str | Path,
    config: DAFTConfig | None = None,
    validation_data: RetrievalData | None = None,
    resume_from_checkpoint: bool = False,
    unlabeled_queries: list[str] | None = None,
    overwrite: bool = False,
    titles: dict[str, str] | None = None,
    *,
    output: OutputFolder | None = None,
    resume_anyway: bool = False,
) -> TrainingSummary:
    """Train ``model`` with the stages of ``config`` and save it to ``output_dir``.

    Args:
        model: an asymmetric model (:func:`~st_daft.build_asymmetric_model`); a symmetric one is allowed for the
            ``finetune`` stage alone (the symmetric baseline).
        train_data: the training collection (its qrels give (query, positive) pairs, its corpus the negatives), or
            a bare corpus (document id -> text) for the label-free stages alone.
        output_dir: where each stage keeps its checkpoints (``stage-1-align`` ...) and where the final model is
            saved (loadable with ``SentenceTransformer(output_dir)``), with ``daft_summary.json`` and
            ``daft_recipe.json`` (the stages that trained it).
        config: the stages and shared settings.
        validation_data: held-out queries over the same corpus; by default ``config.validation_fraction`` of the
            training queries.
        resume_from_checkpoint: resume each stage from its last complete checkpoint when one exists. The run must
            be the one that wrote ``output_dir`` (same data, stages, settings and seed), or it is refused naming
            each difference (unless ``resume_anyway``).
        unlabeled_queries: query texts without judgements, added to the corpus stage's texts.
        overwrite: replace a previous run in ``output_dir``: only what st-daft wrote there is removed (see
            :mod:`st_daft.utils.output`); a folder holding anything else is refused.
        titles: document id -> title of a bare corpus (the corpus stage cuts pseudo-queries from titles).
        output: the folder as a caller claimed it (:func:`~st_daft.utils.output.claim_output`, e.g. the
            ``st-daft train`` command, which records its arguments); by default claimed here.
        resume_anyway: resume a run whose recorded data or settings differ from these.

    Returns:
        A :class:`TrainingSummary`: one :class:`~st_daft.training.stages.base.StageResult` per stage that ran.
    """
    config = config or DAFTConfig()
    output_dir = Path(output_dir)
    if output is None:
        output = claim_output(
            output_dir, "train_daft", overwrite=overwrite, resume=resume_from_checkpoint, option="output_dir"
        )
    if "run" not in output.record:
        identity = run_identity(config, data_identity(train_data, validation_data, unlabeled_queries))
        output.check_resume(identity, anyway=resume_anyway, flag="resume_anyway=True")
    context = _context(model, train_data, output_dir, config, validation_data, unlabeled_queries, titles)
    context.resume = output.resuming
    stages = _runnable_stages(config, context)
    arguments = [stage.prepare(context) for stage in stages]  # a bad device or precision fails before any step
    if context.resume:  # a checkpoint whose weights are cut short is named before anything trains
        for stage, args in zip(stages, arguments):
            if args is not None:
                checkpoint = last_complete_checkpoint(args.output_dir, stage.checkpoint_files())
                if checkpoint:
                    check_checkpoint(checkpoint)
    logger.info("stages: %s", ", ".join(stage.name for stage in stages))
    with output.writing(planned=checkpoint_entries(config)):
        return _train_stages(model, output_dir, config, context, stages, arguments)


def _train_stages(
    model: SentenceTransformer,
    output_dir: Path,
    config: DAFTConfig,
    context: StageContext,
    stages: list[Stage],
    arguments: list[Any],
) -> TrainingSummary:
    attach_model_card(model)  # before training: each stage's trainer fills the same card data
    results = []
    for stage, args in zip(stages, arguments):
        started = time.perf_counter()
        result = stage.run(context, args)
        # The whole stage, not only its trainer: encoding a corpus stage's targets can take longer than training.
        result.seconds = round(time.perf_counter() - started, 1)
        results.append(result)
        _record_on_card(model, stage, result, context)
    pairs = len(context.train_data.training_pairs()) if context.train_data is not None else 0
    summary = TrainingSummary(results, config.settings(), pairs)
    recipe = {**config.to_dict(), "labelled": context.train_data is not None}
    record_recipe(model, recipe)
    model.model_card_data.add_tags(["st-daft", *(f"st-daft-stage-{result.name}" for result in results)])
    if is_main_process():  # under torchrun every process trained the same model: one writes it
        model.save(str(output_dir))
        atomic_write_json(output_dir / RECIPE_FILE, recipe)
        atomic_write_json(output_dir / "daft_summary.json", summary.to_dict())
    for result in results:
        logger.info(result.describe())
    return summary


def _record_on_card(model: SentenceTransformer, stage: Stage, result: StageResult, context: StageContext) -> None:
    """The stage's budget, learning rates, stop reason and final statistics (and its negatives) on the model card."""

    record: dict[str, Any] = {
        "name": result.name,
        "steps": result.steps or None,
        "stopped_reason": result.stopped_reason,
        "collapsed": result.collapsed,
        "final_metrics": result.final_metrics,
    }
    interpolation = result.extra.get("interpolation", 1.0)
    if interpolation < 1:
        record["description"] = (
            f"{STAGE_DESCRIPTIONS[stage.name]}; the route saved is {interpolation:g} x that checkpoint's query route "
            f"+ {1 - interpolation:g} x the route the stage started from (a weight-space average, WiSE-FT)"
        )
    if isinstance(stage, TrainedStage):
        record["budget"] = stage.max_steps if stage.max_steps > 0 else f"{stage.epochs:g} epochs"
        if isinstance(stage, FinetuneStage):
            routes = {"query": stage.learning_rate, "document": stage.document_learning_rate}
            record["learning_rates"] = routes if context.asymmetric else {"all": stage.document_learning_rate}
        else:
            record["learning_rates"] = {"query": stage.learning_rate, "document": "frozen"}
    record_stage(model, record)
    if isinstance(stage, FinetuneStage):
        stats = negatives_from_log_history(result.log_history, stage.negatives) or {"strategy": stage.negatives}
        stats["num_negatives"] = stage.num_negatives if stage.mines() else None
        if context.cache is not None and stage.mines():
            stats["corpus_size"] = len(context.cache)
        record_negatives(model, {key: value for key, value in stats.items() if value is not None})


def _context(
    model: SentenceTransformer,
    train_data: RetrievalData | dict[str, str],
    output_dir: Path,
    config: DAFTConfig,
    validation_data: RetrievalData | None,
    unlabeled_queries: list[str] | None,
    titles: dict[str, str] | None,
) -> StageContext:
    labelled = isinstance(train_data, RetrievalData)
    if labelled and validation_data is None:
        train_data, validation_data = split_validation(train_data, config.validation_fraction, config.seed)
    corpus = train_data.corpus if labelled else dict(train_data)
    if not corpus:
        raise ValueError("the corpus is empty")
    kl_texts = validation_texts(validation_data or train_data, config.num_validation_texts, config.seed)
    return StageContext(
        model=model,
        output_dir=output_dir,
        corpus=corpus,
        kl_texts=kl_texts,
        train_data=train_data if labelled else None,
        validation_data=validation_data,
        titles=train_data.titles if labelled else dict(titles or {}),
        unlabeled_queries=[query for query in unlabeled_queries or [] if query.strip()],
        store=DocumentEmbeddingStore(config.document_store) if config.document_store else None,
        cache_dtype=CACHE_DTYPES[config.cache_dtype],
        cache_folder=output_dir / CORPUS_CACHE_FOLDER if config.cache_on_disk else None,
        seed=config.seed,
        device=config.device,
        precision=config.precision,
        validation_corpus_size=config.validation_corpus_size,
    )


def _runnable_stages(config: DAFTConfig, context: StageContext) -> list[Stage]:
    """The stages of ``config`` that apply to this model and data; a stage that cannot run is an error before any
    step, except the vocabulary stage on a non-static route, which is skipped with a warning."""
    asymmetric = has_route(context.model, QUERY_ROUTE)
    needs_router = [stage.name for stage in config.stages if stage.needs_router]
    if not asymmetric and needs_router:
        raise ValueError(
            f"stage(s) {needs_router} need an asymmetric (Router) model; build one with build_asymmetric_model"
        )
    needs_labels = [stage.name for stage in config.stages if stage.needs_labels]
    if context.train_data is None and needs_labels:
        raise ValueError(
            f"stage(s) {needs_labels} (--stages) need labelled queries (queries.jsonl and qrels); with a corpus alone "
            f"only {list(LABEL_FREE_STAGES)} can run"
        )
    applicable = []
    for stage in config.stages:
        skipped = stage.applies_to(context.model)
        if skipped:
            logger.warning("%s stage skipped: %s", stage.name, skipped)
            continue
        applicable.append(stage)
    if not applicable:
        raise ValueError(f"none of the stages {list(config.stage_names)} applies to this model")
    context.run_stages = tuple(stage.name for stage in applicable)  # a stage's default may depend on the others
    stages = []
    for stage in applicable:
        stage = stage.resolved(context)
        stage.check(context)
        stages.append(stage)
    return stages


def remove_checkpoints(output_dir: str | Path) -> list[str]:
    """Delete the per-stage checkpoint folders of a run and its on-disk corpus cache (the final model stays): only
    those the folder's marker lists as written by st-daft (a user's ``stage-plans/`` stays). Returns their names."""
    folder = OutputFolder.of(output_dir)
    if folder is None:
        logger.warning("%s has no st-daft marker: no checkpoint folder is removed", output_dir)
        return []
    names = {*(getattr(kind, "folder", "") for kind in STAGE_TYPES.values()), CORPUS_CACHE_FOLDER} - {""}
    return folder.remove(names)
