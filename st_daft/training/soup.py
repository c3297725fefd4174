"""Model soups of static query routes: the tables of several runs of one recipe averaged into one table.

Model soups (Wortsman et al., ICML 2022) average the weights of models fine-tuned from one start with different
seeds or settings; the soup often scores above each of them, at the serving cost of one model. A static query route's
weights are one table, and the runs of one st-daft recipe on one collection share its start (the vocabulary stage's
distillation), its vocabulary and, while the document route stays frozen (vocabulary, corpus, align), the document
route itself. Averaging the tables is then the whole soup. Every soup measured scored above the mean of its
runs, at one run's serving cost (the figures: docs/guide/label-free.md and docs/results/experiments.md).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import StaticEmbedding

from st_daft.models.asymmetric import DOCUMENT_ROUTE, QUERY_ROUTE, get_route
from st_daft.models.fingerprint import route_fingerprint

__all__ = ["soup_static_routes", "save_soup", "SOUP_FILE"]

SOUP_FILE = "daft_soup.json"
"""Written beside a saved soup: the runs it averages."""


def _static_table(model: SentenceTransformer, name: str) -> StaticEmbedding:
    route = list(get_route(model, QUERY_ROUTE))
    if len(route) != 1 or not isinstance(route[0], StaticEmbedding):
        raise ValueError(
            f"{name}: the query route is {[type(module).__name__ for module in route]}, not one StaticEmbedding; "
            "only static tables are averaged"
        )
    return route[0]


def _mean_row_norm(table: torch.Tensor) -> torch.Tensor:
    """Mean norm of the rows in use (an all-zero row, e.g. padding, says nothing of the table's scale)."""
    norms = table.norm(dim=1)
    return norms[norms > 0].mean()


def soup_static_routes(
    models: Sequence[SentenceTransformer | str | Path], output_path: str | Path | None = None
) -> SentenceTransformer:
    """A uniform soup of the static query routes of ``models`` (runs of one recipe on one collection, other seeds).

    Each table is divided by its mean row norm (so no run weighs more for its scale), the tables are averaged, and the
    average is scaled back to the first table's mean row norm. The soup is a copy of the first model with that table;
    saved to ``output_path`` when given (a new folder: an existing one is refused), with ``daft_soup.json`` naming
    the runs.

    Raises:
        ValueError: fewer than two models, a query route that is not one ``StaticEmbedding``, another query
            vocabulary (other corpus words) or table shape, or another document route (a fine-tuned one: its query
            table belongs to it) than the first model's.
    """
    if len(models) < 2:
        raise ValueError(f"a soup needs two or more models, got {len(models)}")
    if output_path is not None and Path(output_path).exists():
        raise ValueError(f"{output_path} exists; a soup is saved to a new folder")
    names = [f"model {i}" if isinstance(model, SentenceTransformer) else str(model) for i, model in enumerate(models)]
    loaded = [model if isinstance(model, SentenceTransformer) else SentenceTransformer(str(model)) for model in models]
    first = _static_table(loaded[0], names[0])
    vocabulary = first.tokenizer.get_vocab()
    document_route = route_fingerprint(loaded[0], DOCUMENT_ROUTE)
    tables = []
    for name, model in zip(names, loaded):
        table = _static_table(model, name)
        if table.tokenizer.get_vocab() != vocabulary or table.embedding.weight.shape != first.embedding.weight.shape:
            raise ValueError(f"{name} has another query vocabulary or table than {names[0]}: not runs of one recipe")
        if route_fingerprint(model, DOCUMENT_ROUTE) != document_route:
            raise ValueError(
                f"{name} has another document route than {names[0]}: a query table is trained against its own "
                "document route, so only runs with one (frozen) document route are averaged"
            )
        weight = table.embedding.weight.detach().float()
        tables.append(weight / _mean_row_norm(weight).clamp_min(1e-12))
    # A model passed in is left as it was; one loaded here is the soup's body.
    soup = copy.deepcopy(loaded[0]) if isinstance(models[0], SentenceTransformer) else loaded[0]
    target = _static_table(soup, names[0]).embedding.weight
    with torch.no_grad():
        scale = _mean_row_norm(target.float())
        target.copy_((torch.stack(tables).mean(dim=0) * scale).to(target.dtype))
    if output_path is not None:
        save_soup(soup, names, output_path)
    return soup


def save_soup(soup: SentenceTransformer, runs: Sequence[str], output_path: str | Path) -> None:
    """Save a soup to ``output_path`` with ``daft_soup.json`` naming the ``runs`` it averages."""
    soup.save(str(output_path))
    record = {"runs": list(runs), "method": "uniform soup of mean-row-norm-scaled static query tables"}
    (Path(output_path) / SOUP_FILE).write_text(json.dumps(record, indent=1) + "\n")
