"""Vocabulary initialisation of the static query route, with no training: SciFact and python-faq nDCG@10.

Usage::

    python benchmarks/vocabulary_init.py --shared ../shared/data --document-store runs/store
    python benchmarks/vocabulary_init.py --scifact-split train   # SciFact's training claims as dev

The document route is frozen (plain all-MiniLM-L6-v2), so both corpora are embedded once and every variant of the
static table is scored against those embeddings (what ``st-daft evaluate`` computes for a frozen document route).

Variants: MiniLM's input embeddings; one-token distillation (model2vec's, with and without centring and Zipf
weights); and contextual token vectors (the vocabulary stage's default), their statistics taken from each
collection's own corpus (what a corpus-only run does) or from SciFact's corpus (what a run trained on SciFact does,
scored on python-faq, a collection it never saw).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sentence_transformers.util import cos_sim

from st_daft import DocumentEmbeddingStore, RetrievalData, build_asymmetric_model, load_beir
from st_daft.label_free.token_statistics import contextual_token_statistics
from st_daft.label_free.vocabulary import initialize_static_route


def ndcg_at_10(query_embeddings: torch.Tensor, document_embeddings: torch.Tensor, data: RetrievalData) -> float:
    ids = list(data.corpus)
    scores = cos_sim(query_embeddings, document_embeddings)
    total = 0.0
    for row, query_id in enumerate(data.queries):
        relevant = data.relevant_docs[query_id]
        top = torch.topk(scores[row], 10).indices.tolist()
        dcg = sum(1 / np.log2(rank + 2) for rank, index in enumerate(top) if ids[index] in relevant)
        total += dcg / sum(1 / np.log2(rank + 2) for rank in range(min(10, len(relevant))))
    return round(total / len(data.queries), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--scifact-split", default="test", help="test, or train to use SciFact's claims as dev")
    parser.add_argument("--document-store", default=None, help="DocumentEmbeddingStore folder (and token statistics)")
    parser.add_argument("--output", default="benchmarks/results/vocabulary_init.json")
    args = parser.parse_args()
    splits = {"scifact": args.scifact_split, "python-faq": "test"}
    sets = {name: load_beir(Path(args.shared) / name, split, empty_texts="warn") for name, split in splits.items()}
    store = DocumentEmbeddingStore(args.document_store) if args.document_store else None
    model = build_asymmetric_model(query_encoder="static")

    def embed(texts: list[str]) -> torch.Tensor:
        if store is not None:
            return torch.from_numpy(store.encode_document(model, texts, show_progress_bar=True))
        return model.encode_document(texts, convert_to_tensor=True, show_progress_bar=True).cpu()

    documents = {name: embed(list(data.corpus.values())) for name, data in sets.items()}
    statistics = {
        name: contextual_token_statistics(
            model, list(data.corpus.values()), cache_folder=store.folder if store is not None else None
        )
        for name, data in sets.items()
    }

    def score(model, only: str | None = None) -> dict[str, float]:
        return {
            name: ndcg_at_10(
                model.encode_query(list(data.queries.values()), convert_to_tensor=True).cpu(), documents[name], data
            )
            for name, data in sets.items()
            if only in (None, name)
        }

    results = [{"table": "MiniLM input embeddings", **score(model)}]
    for center, zipf in [(False, True), (True, False), (True, True)]:
        model = build_asymmetric_model(query_encoder="static")
        initialize_static_route(model, zipf_weighting=zipf, center=center, store=store)
        results.append({"table": f"one-token, center={center}, zipf={zipf}", **score(model)})
        print(results[-1], flush=True)
    own: dict[str, float] = {}
    for name in sets:
        model = build_asymmetric_model(query_encoder="static")
        initialize_static_route(model, store=store, contextual=statistics[name])
        own.update(score(model, only=name))
    results.append({"table": "contextual, each collection's own corpus", **own})
    print(results[-1], flush=True)
    model = build_asymmetric_model(query_encoder="static")
    initialize_static_route(model, store=store, contextual=statistics["scifact"])
    results.append({"table": "contextual, SciFact's corpus", **score(model)})
    print(results[-1], flush=True)
    for row in results:
        row["scifact_split"] = args.scifact_split
    Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
