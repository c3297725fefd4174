"""Tests for st_daft.evaluation.mteb: MTEB retrieval evaluation of local collections through the query/document
routes."""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from st_daft.data import DataError, RetrievalData, load_beir
from st_daft.evaluation.mteb import evaluate_retrieval, to_mteb_task

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


def test_document_store_goes_through_mteb_encoder_wrapper(
    tiny_bert_dir: Path, tiny_beir_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mteb.models import SentenceTransformerEncoderWrapper

    from st_daft.embeddings.store import DocumentEmbeddingStore
    from st_daft.evaluation.mteb import _wrap_model

    data = load_beir(tiny_beir_dir, "test")
    model = _router_model(tiny_bert_dir, query_route="static", document_route="bert")
    assert isinstance(_wrap_model(model), SentenceTransformerEncoderWrapper)
    plain = evaluate_retrieval(model, data, show_progress_bar=False)
    texts: dict[str, list[str]] = {"query": [], "document": []}
    for route in texts:
        encode = getattr(model, f"encode_{route}")

        def spy(inputs, *args, _route=route, _encode=encode, **kwargs):
            texts[_route].extend(inputs)
            return _encode(inputs, *args, **kwargs)

        monkeypatch.setattr(model, f"encode_{route}", spy)
    store = DocumentEmbeddingStore(tmp_path / "store")
    first = evaluate_retrieval(model, data, show_progress_bar=False, document_store=store)
    assert sorted(texts["query"]) == sorted(data.queries.values())
    assert sorted(texts["document"]) == sorted(data.corpus.values()), "an empty store encodes every document"
    texts["query"].clear(), texts["document"].clear()
    second = evaluate_retrieval(model, data, show_progress_bar=False, document_store=tmp_path / "store")
    assert sorted(texts["query"]) == sorted(data.queries.values()), "queries always take the query route"
    assert texts["document"] == [], "stored documents are read back, not encoded"
    assert first["ndcg_at_10"] == pytest.approx(plain["ndcg_at_10"]) == pytest.approx(second["ndcg_at_10"])


def _mteb_split(data: RetrievalData) -> tuple[Any, dict[str, Any]]:
    """``data`` as MTEB hands it to a search model: its split (``corpus``, ``queries``) and the keyword arguments."""
    task = to_mteb_task(data)
    task.load_data()
    where = {"task_metadata": task.metadata, "hf_split": data.split, "hf_subset": "default", "encode_kwargs": {}}
    return task.dataset["default"][data.split], where


def _search_run(model, data: RetrievalData, top_k: int = 10) -> dict[str, dict[str, float]]:
    """A search model's run on ``data``, called as MTEB calls it: ``index`` the corpus, ``search`` the queries."""
    split, where = _mteb_split(data)
    model.index(split["corpus"], **where)
    return model.search(split["queries"], top_k=top_k, **where)


def _ids_ranked(model, data: RetrievalData) -> dict[str, list[str]]:
    """A search model's ranking of ``data``'s corpus for each query, best first."""
    return {qid: sorted(docs, key=docs.get, reverse=True) for qid, docs in _search_run(model, data).items()}


def test_bm25_ranks_with_stemming_and_stopwords(tiny_beir_dir: Path) -> None:
    pytest.importorskip("bm25s")
    from st_daft.evaluation.baselines import BM25Search

    data = load_beir(tiny_beir_dir, "test")
    data = RetrievalData(
        corpus=data.corpus,
        queries={"q1": "the dividing of a cell", "q2": "pumping of the hearts", "q3": "zzz unknown words"},
        qrels={"q1": {"d-cell": 1}, "q2": {"d-heart": 1}, "q3": {"d-star": 1}},
    )
    ranked = _ids_ranked(BM25Search(), data)
    assert ranked["q1"][0] == "d-cell", "'dividing' and 'cell' match 'divide' and 'cells' through the stemmer"
    assert ranked["q2"][0] == "d-heart"
    assert set(ranked["q3"]) <= set(data.corpus), "a query with no known word still gets a (meaningless) ranking"


def test_bm25_is_scored_by_mteb_like_any_model(tiny_beir_dir: Path) -> None:
    pytest.importorskip("bm25s")
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores

    from st_daft.evaluation.baselines import BM25Search

    data = load_beir(tiny_beir_dir, "test")
    results = evaluate_retrieval(BM25Search(), data, show_progress_bar=False)
    assert results["model"] == "BM25" and results["num_documents"] == 8
    run = _search_run(BM25Search(), data, top_k=1000)
    direct = calculate_retrieval_scores(run, data.qrels, [10, 100])
    assert results["ndcg_at_10"] == pytest.approx(direct.ndcg["NDCG@10"])
    assert results["recall_at_100"] == pytest.approx(direct.recall["Recall@100"])


def test_empty_documents_are_named_and_evaluated(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = tiny_beir_dir / "corpus.jsonl"
    corpus.write_text(corpus.read_text() + json.dumps({"_id": "blank-1", "title": "", "text": " "}) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl: 1 corpus document\(s\) have empty text: 'blank-1' \(line 9\)"):
        load_beir(tiny_beir_dir, "train")  # training refuses them
    with caplog.at_level("WARNING", logger="st_daft.data"):
        dense = evaluate_retrieval(tiny_document_model_dir, tiny_beir_dir, show_progress_bar=False)
    assert "1 corpus document(s) have empty text; they are kept and evaluated: ['blank-1']" in caplog.text
    assert dense["num_documents"] == 9
    if importlib.util.find_spec("bm25s"):
        from st_daft.evaluation.baselines import BM25Search

        assert evaluate_retrieval(BM25Search(), tiny_beir_dir, show_progress_bar=False)["num_documents"] == 9


def test_queries_encoding_to_the_zero_vector_are_named(tiny_bert_dir: Path, tiny_beir_dir: Path) -> None:
    queries = tiny_beir_dir / "queries.jsonl"
    rows = [json.loads(line) for line in queries.read_text().splitlines()]
    rows[0]["text"] = "\u200b"  # a zero-width space: no token at all for the static route
    queries.write_text("".join(json.dumps(row) + "\n" for row in rows))
    named = re.escape(repr("\u200b"))
    with pytest.warns(UserWarning, match=rf"1 of \d+ queries encode to the zero vector .*e\.g\. {named}"):
        result = evaluate_retrieval(_router_model(tiny_bert_dir), tiny_beir_dir, split="test", show_progress_bar=False)
    assert 0 <= result["ndcg_at_10"] <= 1


def test_zero_query_vectors_are_counted() -> None:
    import numpy as np

    from st_daft.evaluation.collapse import warn_zero_query_vectors

    assert warn_zero_query_vectors(np.ones((3, 4))) == 0
    with pytest.warns(UserWarning, match="2 of 3 queries"):
        assert warn_zero_query_vectors(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])) == 2


def _second_collection(tmp_path: Path) -> Path:
    from tests.conftest import QUESTIONS, TOPICS, write_beir

    topics = list(TOPICS)[:5]
    return write_beir(
        tmp_path / "second",
        {f"x-{topic}": ("", TOPICS[topic]) for topic in topics},
        {f"y-{topic}": QUESTIONS[topic] for topic in topics},
        {"test": {f"y-{topic}": {f"x-{topic}": 1} for topic in topics}},
    )


def test_several_collections_and_bm25_in_one_table(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("bm25s")
    from st_daft.evaluation.baselines import BM25Search
    from st_daft.evaluation.mteb import evaluate_collections
    from st_daft.evaluation.tables import format_table

    second = _second_collection(tmp_path)
    output = tmp_path / "all.json"
    comparison = evaluate_collections(
        [tiny_document_model_dir, BM25Search()],
        [tiny_beir_dir, second],
        labels=["tiny", "BM25"],
        output_path=output,
        show_progress_bar=False,
    )
    assert comparison["collections"] == ["tiny-beir", "second"] and comparison["models"] == ["tiny", "BM25"]
    for label in ("tiny", "BM25"):
        alone = evaluate_retrieval(
            tiny_document_model_dir if label == "tiny" else BM25Search(), second, show_progress_bar=False
        )
        assert comparison["scores"][label]["second"]["ndcg_at_10"] == pytest.approx(alone["ndcg_at_10"])
        per = comparison["scores"][label]
        assert comparison["mean"][label]["ndcg_at_10"] == pytest.approx(
            (per["tiny-beir"]["ndcg_at_10"] + per["second"]["ndcg_at_10"]) / 2
        )
    assert json.loads(output.read_text()) == comparison
    table = format_table(comparison).splitlines()
    assert table[0] == "| nDCG@10 (test) | tiny-beir | second | mean |"
    bm25 = comparison["scores"]["BM25"]
    assert table[3] == (
        f"| BM25 | {bm25['tiny-beir']['ndcg_at_10']:.3f} | {bm25['second']['ndcg_at_10']:.3f} "
        f"| {comparison['mean']['BM25']['ndcg_at_10']:.3f} |"
    )


def test_cli_evaluate_table_and_errors(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from st_daft.cli import main

    second = _second_collection(tmp_path)
    output = tmp_path / "scores.json"
    arguments = ["evaluate", str(tiny_document_model_dir), "--data", str(tiny_beir_dir), "--data", str(second)]
    if importlib.util.find_spec("bm25s"):
        assert main([*arguments, "--baseline", "bm25", "--output", str(output)]) == 0
        printed = capsys.readouterr().out
        assert "| nDCG@10 (test) | tiny-beir | second | mean |" in printed and "| Recall@100 (test) |" in printed
        assert "\n| BM25 | " in printed and f"\n| {tiny_document_model_dir} | " in printed
        scores = json.loads(output.read_text())
        assert set(scores["scores"]) == {str(tiny_document_model_dir), "BM25"}

    # A bad second collection is named before the model is evaluated on the first.
    (second / "queries.jsonl").write_text("")
    assert main(arguments) == 2
    captured = capsys.readouterr()
    assert "queries.jsonl is empty" in captured.err and "nDCG@10" not in captured.out

    # Without the bm25 extra, --baseline bm25 says what to install.
    monkeypatch.setitem(sys.modules, "bm25s", None)
    assert main([*arguments[:4], "--baseline", "bm25"]) == 2
    assert 'pip install "st-daft[bm25]"' in capsys.readouterr().err


def _expected_fusion(model, data: RetrievalData, weight: float) -> dict[str, torch.Tensor]:
    """Cosine + weight x BM25 / the query's best BM25, computed directly over the whole corpus."""
    import numpy as np

    from st_daft.evaluation.baselines import BM25Search

    documents = list(data.corpus.values())
    corpus = torch.nn.functional.normalize(model.encode_document(documents, convert_to_tensor=True), dim=-1)
    queries = list(data.queries.values())
    dense = torch.nn.functional.normalize(model.encode_query(queries, convert_to_tensor=True), dim=-1) @ corpus.T
    rows, scores = BM25Search().fit(documents).top_k(queries, len(documents))
    lexical = np.zeros((len(queries), len(documents)), dtype=np.float32)
    np.put_along_axis(lexical, rows, scores / np.maximum(scores[:, :1], 1e-12), axis=1)
    fused = dense + weight * torch.from_numpy(lexical)
    return {query_id: fused[row] for row, query_id in enumerate(data.queries)}


def test_hybrid_search_fuses_similarity_and_bm25(symmetric_model, tiny_beir_dir: Path) -> None:
    pytest.importorskip("bm25s")
    from st_daft import HybridSearch

    data = load_beir(tiny_beir_dir, "test")
    expected = _expected_fusion(symmetric_model, data, 0.4)
    run = _search_run(HybridSearch(symmetric_model, weight=0.4), data, top_k=1000)
    document_ids = list(data.corpus)
    for query_id, ranked in run.items():
        assert len(ranked) == len(document_ids)
        for document_id, score in ranked.items():
            assert score == pytest.approx(float(expected[query_id][document_ids.index(document_id)]), abs=1e-5)
        assert list(ranked) == sorted(ranked, key=ranked.get, reverse=True), "best first"

    # depth=1: only each query's best BM25 document gets the lexical term, exactly the weight.
    shallow = _search_run(HybridSearch(symmetric_model, weight=0.4, depth=1), data, top_k=1000)
    dense = _expected_fusion(symmetric_model, data, 0.0)
    for query_id, ranked in shallow.items():
        lifted = {d: s - float(dense[query_id][document_ids.index(d)]) for d, s in ranked.items()}
        assert sorted(round(value, 4) for value in lifted.values()) == [0.0] * (len(document_ids) - 1) + [0.4]


def test_hybrid_search_weight_zero_is_the_dense_model(symmetric_model, tiny_beir_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("bm25s")
    from st_daft import DocumentEmbeddingStore, HybridSearch

    data = load_beir(tiny_beir_dir, "test")
    dense = evaluate_retrieval(symmetric_model, data, show_progress_bar=False)
    store = DocumentEmbeddingStore(tmp_path / "store")
    fused = evaluate_retrieval(HybridSearch(symmetric_model, weight=0.0, document_store=store), data)
    assert store.misses == len(data.corpus), "documents are encoded through the store"
    for key in ("ndcg_at_10", "recall_at_100", "mrr_at_10"):
        assert fused[key] == pytest.approx(dense[key])
    again = evaluate_retrieval(HybridSearch(symmetric_model, weight=0.0, document_store=store), data)
    assert store.hits == len(data.corpus) and again["ndcg_at_10"] == pytest.approx(dense["ndcg_at_10"])


def test_hybrid_search_reranks_only_the_given_documents(symmetric_model, tiny_beir_dir: Path) -> None:
    pytest.importorskip("bm25s")
    from st_daft import HybridSearch

    data = load_beir(tiny_beir_dir, "test")
    split, where = _mteb_split(data)
    search = HybridSearch(symmetric_model, weight=0.4)
    search.index(split["corpus"], **where)
    allowed = {query_id: list(data.corpus)[:3] for query_id in data.queries}
    run = search.search(split["queries"], top_k=10, top_ranked=allowed, **where)
    expected = _expected_fusion(symmetric_model, data, 0.4)
    for query_id, ranked in run.items():
        assert set(ranked) == set(allowed[query_id])
        for document_id, score in ranked.items():
            assert score == pytest.approx(float(expected[query_id][list(data.corpus).index(document_id)]), abs=1e-5)


def test_hybrid_search_refuses_bad_settings(symmetric_model) -> None:
    pytest.importorskip("bm25s")
    from st_daft import HybridSearch

    for weight in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"weight \(--fusion-weight\)"):
            HybridSearch(symmetric_model, weight=weight)
    with pytest.raises(ValueError, match="depth must be at least 1"):
        HybridSearch(symmetric_model, depth=0)
    symmetric_model.similarity_fn_name = "euclidean"
    with pytest.raises(ValueError, match="similarity must be one of"):
        HybridSearch(symmetric_model)


def test_cli_evaluate_fuse_bm25(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from st_daft.cli import main

    model = str(tiny_document_model_dir)
    arguments = ["evaluate", model, "--data", str(tiny_beir_dir)]
    if importlib.util.find_spec("bm25s"):
        output = tmp_path / "scores.json"
        store = tmp_path / "store"
        assert main([*arguments, "--fuse-bm25", "--document-store", str(store), "--output", str(output)]) == 0
        printed = capsys.readouterr().out
        assert f"\n| {model} + BM25 (0.15) | " in printed and f"\n| {model} | " in printed
        scores = json.loads(output.read_text())["scores"]
        assert set(scores) == {model, f"{model} + BM25 (0.15)"}
        assert main([*arguments, "--fuse-bm25", "--fusion-weight", "0.3"]) == 0
        assert f"\n| {model} + BM25 (0.3) | " in capsys.readouterr().out

    for weight in ("-1", "inf"):
        with pytest.raises(SystemExit) as exit_info:
            main([*arguments, "--fuse-bm25", "--fusion-weight", weight])
        assert exit_info.value.code == 2 and "--fusion-weight: must be a finite number" in capsys.readouterr().err
    # Every path is checked before any model is read: a missing model folder first, then each collection.
    missing = ["evaluate", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"), "--fuse-bm25"]
    if importlib.util.find_spec("bm25s"):
        assert main(missing) == 2
        assert "no-model does not exist" in capsys.readouterr().err
        assert main(["evaluate", model, "--data", str(tmp_path / "no-data"), "--fuse-bm25"]) == 2
        assert "no-data does not exist" in capsys.readouterr().err
    assert main([*arguments, "--fusion-weight", "0.3"]) == 2
    assert "--fusion-weight applies to --fuse-bm25 only" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "bm25s", None)
    assert main([*arguments, "--fuse-bm25"]) == 2
    error = capsys.readouterr().err
    assert "--fuse-bm25" in error and 'pip install "st-daft[bm25]"' in error


def test_hybrid_search_dot_similarity_chunks_and_unmatched_queries(symmetric_model, tiny_beir_dir: Path) -> None:
    pytest.importorskip("bm25s")
    from st_daft import HybridSearch

    data = load_beir(tiny_beir_dir, "test")
    data = RetrievalData(
        corpus=data.corpus,
        queries={**data.queries, "q-none": "zzz qqq"},  # no word any document has: similarity alone ranks it
        qrels={**data.qrels, "q-none": {next(iter(data.corpus)): 1}},
    )
    whole = _search_run(HybridSearch(symmetric_model, weight=0.4), data, top_k=1000)
    dense = _expected_fusion(symmetric_model, data, 0.0)["q-none"]
    document_ids = list(data.corpus)
    assert whole["q-none"] == pytest.approx({d: float(dense[document_ids.index(d)]) for d in whole["q-none"]})

    one_query_at_a_time = HybridSearch(symmetric_model, weight=0.4)
    one_query_at_a_time.max_scores_per_chunk = 1  # chunks of a single query
    chunked = _search_run(one_query_at_a_time, data, top_k=1000)
    assert chunked.keys() == whole.keys()
    assert all(chunked[query_id] == pytest.approx(whole[query_id]) for query_id in whole)

    symmetric_model.similarity_fn_name = "dot"
    raw = _search_run(HybridSearch(symmetric_model, weight=0.4), data, top_k=1000)
    corpus = symmetric_model.encode_document(list(data.corpus.values()), convert_to_tensor=True)
    queries = symmetric_model.encode_query(list(data.queries.values()), convert_to_tensor=True)
    lexical = _expected_fusion(symmetric_model, data, 0.4)
    cosine = _expected_fusion(symmetric_model, data, 0.0)
    for row, query_id in enumerate(data.queries):
        expected = queries[row] @ corpus.T + (lexical[query_id] - cosine[query_id])  # dot product + the same BM25 term
        for document_id, score in raw[query_id].items():
            assert score == pytest.approx(float(expected[document_ids.index(document_id)]), rel=1e-4, abs=1e-4)


def test_hybrid_search_reranking_ignores_repeated_candidates(symmetric_model, tiny_beir_dir: Path) -> None:
    pytest.importorskip("bm25s")
    from st_daft import HybridSearch

    data = load_beir(tiny_beir_dir, "test")
    split, where = _mteb_split(data)
    search = HybridSearch(symmetric_model)
    search.index(split["corpus"], **where)
    first = list(data.corpus)[0]
    run = search.search(split["queries"], top_k=10, top_ranked=dict.fromkeys(data.queries, [first] * 3), **where)
    assert all(list(ranked) == [first] for ranked in run.values())
    no_lists = search.search(split["queries"], top_k=3, top_ranked={}, **where)  # an empty mapping: plain search
    assert no_lists == search.search(split["queries"], top_k=3, **where) and all(len(r) == 3 for r in no_lists.values())


def test_fused_rows_share_the_loaded_model_and_the_store(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("bm25s")
    import sentence_transformers

    from st_daft import DocumentEmbeddingStore
    from st_daft.evaluation.mteb import evaluate_collections

    loads = []

    class CountedSentenceTransformer(sentence_transformers.SentenceTransformer):
        def __init__(self, *args, **kwargs) -> None:
            loads.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", CountedSentenceTransformer)
    store = DocumentEmbeddingStore(tmp_path / "store")
    comparison = evaluate_collections(
        [tiny_document_model_dir], [tiny_beir_dir], labels=["tiny"], document_store=store, fuse_bm25=0.2
    )
    assert comparison["models"] == ["tiny", "tiny + BM25 (0.2)"]
    assert len(loads) == 1, "the fused row uses the model loaded for the plain row"
    corpus_size = len(load_beir(tiny_beir_dir, "test").corpus)
    assert store.misses == corpus_size and store.hits == corpus_size, "encoded once, read back for the fused row"
    plain, fused = (comparison["scores"][label]["tiny-beir"]["ndcg_at_10"] for label in comparison["models"])
    assert 0 <= plain <= 1 and 0 <= fused <= 1
