"""Tests for st_daft.evaluation: MTEB retrieval evaluation of local collections through the query/document routes."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch

from st_daft.data import DataError, RetrievalData, load_beir
from st_daft.evaluation import evaluate_retrieval, to_mteb_task

REQUIRED_KEYS = ("ndcg_at_10", "recall_at_100", "mrr_at_10", "map_at_10", "recall_at_10")
RANKING_PREFIXES = ("ndcg_at_", "map_at_", "recall_at_", "precision_at_", "mrr_at_", "hit_rate_at_")


@pytest.fixture()
def symmetric_model(tiny_document_model_dir: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_document_model_dir), device="cpu")


def _router_model(tiny_bert_dir: Path, query_route: str = "static", document_route: str = "bert"):
    """A Router model whose routes are each the tiny BERT (``"bert"``) or one random StaticEmbedding (``"static"``).

    The StaticEmbedding (a mean of random token vectors over the tiny BERT's tokenizer) keeps distinct texts apart.
    A route named the same way on both sides is the very same module instance.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Normalize,
        Pooling,
        Router,
        StaticEmbedding,
        Transformer,
    )
    from transformers import AutoTokenizer

    transformer = Transformer(str(tiny_bert_dir), max_seq_length=64)
    torch.manual_seed(0)
    routes = {
        "bert": [transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
        "static": [StaticEmbedding(AutoTokenizer.from_pretrained(str(tiny_bert_dir)), embedding_dim=32)],
    }
    router = Router.for_query_document(query_modules=routes[query_route], document_modules=routes[document_route])
    return SentenceTransformer(modules=[router, Normalize()], device="cpu")


def test_local_task_metadata_and_data(tiny_beir_dir: Path) -> None:
    data = load_beir(tiny_beir_dir, "test")
    task = to_mteb_task(data)

    assert task.metadata.name == "BEIR-local-tiny-beir"
    assert task.metadata.type == "Retrieval"
    assert task.metadata.eval_splits == ["test"]
    assert task.metadata.main_score == "ndcg_at_10"
    assert not task.data_loaded
    task.load_data()
    split_data = task.dataset["default"]["test"]
    assert sorted(split_data["corpus"]["id"]) == sorted(data.corpus)
    assert dict(zip(split_data["corpus"]["id"], split_data["corpus"]["text"], strict=True)) == data.corpus
    assert dict(zip(split_data["queries"]["id"], split_data["queries"]["text"], strict=True)) == data.queries
    assert split_data["relevant_docs"] == data.qrels
    # Unloading (as mteb.evaluate does after a run) keeps the class-level metadata usable.
    task.unload_data()
    assert task.metadata.name == "BEIR-local-tiny-beir"


def test_scores_and_json_output(tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "nested" / "dir" / "results.json"
    results = evaluate_retrieval(
        tiny_document_model_dir, tiny_beir_dir, split="test", output_path=output, show_progress_bar=False
    )

    assert results["task"] == "BEIR-local-tiny-beir"
    assert results["split"] == "test"
    assert results["num_queries"] == 4
    assert results["num_documents"] == 8
    for key in REQUIRED_KEYS:
        assert 0.0 <= results[key] <= 1.0, key
    for key, value in results.items():
        if key.startswith(RANKING_PREFIXES):
            assert 0.0 <= value <= 1.0, key
    assert results["main_score"] == results["ndcg_at_10"]
    assert json.loads(output.read_text()) == results


def test_queries_use_query_route_and_documents_document_route(
    tiny_bert_dir: Path, tiny_beir_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = load_beir(tiny_beir_dir, "test")
    model = _router_model(tiny_bert_dir, query_route="static", document_route="bert")
    router = model[0]
    static_embedding = router.sub_modules["query"][0]
    transformer = router.sub_modules["document"][0]

    # Rows that pass through each route's first module, and texts given to each encode method.
    rows: Counter[str] = Counter()
    static_embedding.register_forward_hook(lambda m, i, out: rows.update(query=len(out["sentence_embedding"])))
    transformer.register_forward_hook(lambda m, i, out: rows.update(document=len(out["token_embeddings"])))
    texts: dict[str, list[str]] = {"query": [], "document": []}
    for route in texts:
        encode = getattr(model, f"encode_{route}")

        def spy(inputs, *args, _route=route, _encode=encode, **kwargs):
            texts[_route].extend(inputs)
            return _encode(inputs, *args, **kwargs)

        monkeypatch.setattr(model, f"encode_{route}", spy)

    results = evaluate_retrieval(model, data, show_progress_bar=False)

    assert sorted(texts["query"]) == sorted(data.queries.values())
    assert sorted(texts["document"]) == sorted(data.corpus.values())
    assert rows == {"query": len(data.queries), "document": len(data.corpus)}
    assert 0.0 <= results["ndcg_at_10"] <= 1.0


def test_router_with_identical_routes_matches_symmetric_model(
    tiny_bert_dir: Path, tiny_beir_dir: Path, symmetric_model
) -> None:
    data = load_beir(tiny_beir_dir, "test")
    model = _router_model(tiny_bert_dir, query_route="bert", document_route="bert")
    routed = evaluate_retrieval(model, data, show_progress_bar=False)
    plain = evaluate_retrieval(symmetric_model, data, show_progress_bar=False)
    assert routed["ndcg_at_10"] == pytest.approx(plain["ndcg_at_10"])
    assert routed["mrr_at_10"] == pytest.approx(plain["mrr_at_10"])


def test_perfect_ranking_scores_one(tiny_bert_dir: Path, tiny_beir_dir: Path) -> None:
    corpus = load_beir(tiny_beir_dir, "test").corpus
    # Each query is the text of its only relevant document, and both routes are the same StaticEmbedding.
    model = _router_model(tiny_bert_dir, query_route="static", document_route="static")
    data = RetrievalData(
        corpus=corpus,
        queries={f"q{doc_id}": text for doc_id, text in corpus.items()},
        qrels={f"q{doc_id}": {doc_id: 1} for doc_id in corpus},
        name="identity",
    )
    results = evaluate_retrieval(model, data, show_progress_bar=False)
    assert results["ndcg_at_10"] == 1.0
    assert results["mrr_at_10"] == 1.0
    assert results["recall_at_100"] == 1.0


def test_no_network_and_no_result_cache(symmetric_model, tiny_beir_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mteb.cache import ResultCache

    def forbidden(*args, **kwargs):
        raise AssertionError("evaluation must not touch the network or MTEB's result cache")

    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setattr(ResultCache, "load_task_result", forbidden)
    monkeypatch.setattr(ResultCache, "save_to_cache", forbidden)
    results = evaluate_retrieval(symmetric_model, tiny_beir_dir, show_progress_bar=False)
    assert results["num_queries"] == 4


def test_missing_split_raises_data_error(symmetric_model, tiny_beir_dir: Path) -> None:
    with pytest.raises(DataError, match="splits available"):
        evaluate_retrieval(symmetric_model, tiny_beir_dir, split="dev", show_progress_bar=False)


def test_split_must_match_retrieval_data(symmetric_model, tiny_beir_dir: Path) -> None:
    data = load_beir(tiny_beir_dir, "train")
    with pytest.raises(DataError, match="'train' split"):
        evaluate_retrieval(symmetric_model, data, split="test", show_progress_bar=False)


def test_unknown_task_name_raises_data_error(symmetric_model) -> None:
    with pytest.raises(DataError, match="Did you mean: 'SciFact'"):
        evaluate_retrieval(symmetric_model, "Scifact", show_progress_bar=False)
