"""Sentence-level ceiling of a narrow static table + projection (why the ``tokenlearn`` query encoder was removed).

For each static table (the 64-d ``tokenlearn-static-model`` table and the 384-d table of MiniLM's input embeddings),
an affine map is fitted by ridge regression from the table's mean-pooled vectors of SciFact document titles and train
claims to MiniLM's embeddings of the same texts; reported: the mean cosine of the mapped vectors to MiniLM's on the
fitted texts and on the 300 held-out test claims. Usage::

    python benchmarks/tokenlearn_ceiling.py --data ../shared/data/scifact
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from st_daft import build_asymmetric_model, get_route, load_beir


@torch.no_grad()
def mean_vectors(model: SentenceTransformer, texts: list[str]) -> np.ndarray:
    static = get_route(model, "query")[0]
    return static(static.preprocess(texts))["sentence_embedding"].numpy().astype(np.float64)


def fit(inputs: np.ndarray, targets: np.ndarray, ridge: float) -> np.ndarray:
    augmented = np.hstack([inputs, np.ones((len(inputs), 1))])
    gram = augmented.T @ augmented
    features = inputs.shape[1]
    gram[:features, :features] += ridge * np.mean(np.diag(gram)[:features]) * np.eye(features)
    return np.linalg.solve(gram, augmented.T @ targets)


def mean_cosine(weights: np.ndarray, inputs: np.ndarray, targets: np.ndarray) -> float:
    mapped = np.hstack([inputs, np.ones((len(inputs), 1))]) @ weights
    return float(((mapped / np.linalg.norm(mapped, axis=1, keepdims=True)) * targets).sum(axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/scifact")
    parser.add_argument("--output", default="benchmarks/results/tokenlearn_ceiling.json")
    args = parser.parse_args()
    import static_model  # the tokenlearn-static-model package

    test, train = load_beir(args.data, "test"), load_beir(args.data, "train")
    fit_texts = [title for title in test.titles.values() if title.strip()] + list(train.queries.values())
    test_texts = list(test.queries.values())
    tokenlearn = build_asymmetric_model(query_encoder=str(Path(static_model.__file__).parent / "model"))
    static = build_asymmetric_model(query_encoder="static")
    started = time.perf_counter()
    targets = tokenlearn.encode_document(fit_texts + test_texts, batch_size=64).astype(np.float64)
    print(f"MiniLM targets: {len(targets)} texts, {time.perf_counter() - started:.0f} s", flush=True)
    fit_targets, test_targets = targets[: len(fit_texts)], targets[len(fit_texts) :]
    results: dict[str, object] = {"fit_texts": len(fit_texts), "test_texts": len(test_texts)}
    for name, model in (("tokenlearn 64-d", tokenlearn), ("static 384-d (MiniLM input embeddings)", static)):
        fit_inputs, test_inputs = mean_vectors(model, fit_texts), mean_vectors(model, test_texts)
        for ridge in (1e-3, 1e-2, 1e-1):
            weights = fit(fit_inputs, fit_targets, ridge)
            results[f"{name}, ridge {ridge}: fit cosine / held-out test-claim cosine"] = (
                round(mean_cosine(weights, fit_inputs, fit_targets), 3),
                round(mean_cosine(weights, test_inputs, test_targets), 3),
            )
    print(json.dumps(results, indent=1))
    Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
