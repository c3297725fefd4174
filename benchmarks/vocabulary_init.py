"""Vocabulary initialisation of the static query route, with no training: SciFact test and python-faq nDCG@10.

Usage::

    python benchmarks/vocabulary_init.py --shared ../shared/data

The document route is frozen (plain all-MiniLM-L6-v2), so both corpora are embedded once and every variant of the
static table is scored against those embeddings (what ``st-daft evaluate`` computes for a frozen document route).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sentence_transformers.util import cos_sim

from st_daft import RetrievalData, build_asymmetric_model, load_beir
from st_daft.vocabulary import initialize_static_route


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
    parser.add_argument("--output", default="benchmarks/results/vocabulary_init.json")
    args = parser.parse_args()
    sets = {name: load_beir(Path(args.shared) / name, "test") for name in ("scifact", "python-faq")}
    model = build_asymmetric_model(query_encoder="static")
    documents = {
        name: model.encode_document(list(data.corpus.values()), convert_to_tensor=True) for name, data in sets.items()
    }

    def score(model) -> dict[str, float]:
        return {
            name: ndcg_at_10(
                model.encode_query(list(data.queries.values()), convert_to_tensor=True), documents[name], data
            )
            for name, data in sets.items()
        }

    results = [{"table": "MiniLM input embeddings", **score(model)}]
    for center, zipf in [(False, True), (True, False), (True, True)]:
        model = build_asymmetric_model(query_encoder="static")
        initialize_static_route(model, zipf_weighting=zipf, center=center)
        results.append({"table": f"distilled, center={center}, zipf={zipf}", **score(model)})
        print(results[-1], flush=True)
    Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
