"""Model cards that tell the whole story of an st-daft model, written by sentence-transformers' own card machinery.

sentence-transformers renders ``README.md`` on every ``model.save()`` from its card data
(:class:`~sentence_transformers.SentenceTransformerModelCardData`) through its Jinja template. st-daft extends that:

- :class:`DAFTModelCardData` subclasses the card data with st-daft's fields (the two encoders, every stage with its
  budget, learning rates, stop reason and collapse statistics, the negatives strategy and its counts, the MTEB
  results, the recipe) and points ``template_path`` at st-daft's card layout: sentence-transformers' card with
  st-daft's sections in their places, all Jinja files in ``st_daft/resources/model_card/``
  (:mod:`st_daft.models.card_template`), rendered by sentence-transformers' own ``generate_model_card``;
- :func:`attach_model_card` installs it on a model, carrying over what the model's card data already holds;
- :func:`record_stage`, :func:`record_negatives`, :func:`record_evaluation` and :func:`record_recipe` add what a run
  did, from plain dicts;
- :func:`push_to_hub` uploads with ``SentenceTransformer.push_to_hub``; :func:`write_model_card` rewrites the
  ``README.md`` of a saved model (e.g. after evaluating it).

Nothing here is saved inside the model but ``README.md``: a saved model still loads with plain
``SentenceTransformer(path)``. The card keeps a machine-readable copy of st-daft's records in an HTML comment, so
that :func:`attach_model_card` on a model loaded from such a folder picks the story up again.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from sentence_transformers import SentenceTransformer
from sentence_transformers.base.model_card import generate_model_card

from st_daft.models.card_data import (
    _RECORD_PATTERN,
    EVALUATION_COLUMNS,
    TRAINING_ARTEFACTS,
    DAFTModelCardData,
    _json_ready,
    _normalise_stage,
)

logger = logging.getLogger(__name__)


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
    """Record MTEB retrieval results: the dict :func:`st_daft.evaluation.mteb.evaluate_retrieval` returns (``task``,
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


def record_recipe(model: SentenceTransformer, recipe: dict[str, Any]) -> None:
    """Record the recipe that re-trains the model: the dict saved as ``daft_recipe.json`` beside it, shown in the
    card as that file with the ``st-daft train --recipe`` command that runs it. A later call replaces it."""
    if not isinstance(recipe, dict):
        raise ValueError(f"record_recipe: the recipe must be a dict, got {type(recipe).__name__}")
    _card(model).daft_recipe = _json_ready(recipe)


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
