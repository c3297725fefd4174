"""Index folders (``st-daft index``, build_search_index) and the torch-free Searcher that serves them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from st_daft import HybridSearch, build_asymmetric_model, build_search_index, evaluate_retrieval, get_route
from st_daft.cli import main
from st_daft.evaluation.baselines import BM25Search
from st_daft.serving import Searcher, SearchIndexError
from st_daft.serving.build import SearcherRetrieval
from tests.conftest import slice_beir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def route(tiny_document_model_dir: Path):
    return build_asymmetric_model(str(tiny_document_model_dir), "static")


@pytest.fixture()
def index_dir(route, tiny_beir_dir: Path, tmp_path: Path) -> Path:
    return build_search_index(
        route, tiny_beir_dir, tmp_path / "index", bm25=True, embeddings_dtype="float16", show_progress_bar=False
    )


def _ndcg(model, data: Path) -> float:
    return evaluate_retrieval(model, data, split="test", show_progress_bar=False)["ndcg_at_10"]


def test_index_folder_holds_what_the_manifest_names(index_dir: Path) -> None:
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["documents"] == 8 and manifest["index"]["kind"] == "flat"
    for name in ("query_route", "embeddings", "ids", "faiss", "bm25"):
        assert (index_dir / manifest["files"][name]).exists(), name
    embeddings = np.load(index_dir / manifest["files"]["embeddings"], mmap_mode="r")
    assert embeddings.dtype == np.float16 and embeddings.shape == (8, manifest["dimension"])
    config = json.loads((index_dir / "query" / "config.json").read_text())
    assert config["st_daft_document_fingerprint"] == manifest["document_fingerprint"]


def test_searcher_ranks_as_evaluate_does(route, index_dir: Path, tiny_beir_dir: Path) -> None:
    searcher = Searcher.load(index_dir)
    dense, fused = _ndcg(route, tiny_beir_dir), _ndcg(HybridSearch(route), tiny_beir_dir)
    assert _ndcg(SearcherRetrieval(searcher), tiny_beir_dir) == pytest.approx(dense, abs=1e-4)
    assert _ndcg(SearcherRetrieval(searcher, fuse_bm25=True), tiny_beir_dir) == pytest.approx(fused, abs=1e-4)
    # The scores themselves: the route's cosine, and the fused score HybridSearch gives each document.
    query = "how do cells divide"
    ids, scores = searcher.search(query, k=8)
    vector = torch.nn.functional.normalize(torch.from_numpy(route.encode_query([query])), dim=1)
    hybrid = HybridSearch(route)
    hybrid.index(
        _mteb_corpus(tiny_beir_dir), task_metadata=None, hf_split="test", hf_subset="default", encode_kwargs={}
    )
    columns = {document_id: column for column, document_id in enumerate(hybrid.document_ids)}
    documents = hybrid._documents
    expected = (vector @ documents.T)[0].numpy()
    np.testing.assert_allclose(scores, [expected[columns[d]] for d in ids], atol=2e-3)  # float16 documents
    fused_ids, fused_scores = searcher.search(query, k=8, fuse_bm25=0.3)
    hybrid.weight = 0.3
    expected_fused = hybrid.fused_scores([query])[0].numpy()
    np.testing.assert_allclose(fused_scores, [expected_fused[columns[d]] for d in fused_ids], atol=2e-3)
    assert fused_ids == sorted(fused_ids, key=lambda d: -expected_fused[columns[d]])
    # float32 embeddings, what "auto" picks below the exact-search limit: evaluate's very scores.
    exact_dir = build_search_index(route, tiny_beir_dir, index_dir.parent / "float32", bm25=True)
    exact = Searcher.load(exact_dir)
    assert exact.embeddings.dtype == np.float32 and exact.manifest["index"]["storage"] == "float32"
    fused_ids, fused_scores = exact.search(query, k=8, fuse_bm25=0.3)
    np.testing.assert_allclose(fused_scores, [expected_fused[columns[d]] for d in fused_ids], atol=1e-6)


def _mteb_corpus(folder: Path) -> list[dict[str, str]]:
    from st_daft import load_beir

    return [{"id": doc, "text": text} for doc, text in load_beir(folder, "test").corpus.items()]


def test_an_ivf_index_serves_the_same_documents(route, tiny_beir_dir: Path, tmp_path: Path) -> None:
    folder = build_search_index(
        route,
        tiny_beir_dir,
        tmp_path / "ivf",
        index="ivf",
        index_options={"nlist": 2},
        embeddings_dtype="float16",
        show_progress_bar=False,
    )
    searcher = Searcher.load(folder)
    assert searcher.manifest["index"] == {"kind": "ivf", "storage": "float16", "options": {"nlist": 2, "nprobe": 64}}
    ids, scores = searcher.search(["how do cells divide", "what pumps blood"], k=3)
    exact = Searcher.load(build_search_index(route, tiny_beir_dir, tmp_path / "flat", show_progress_bar=False))
    assert ids == exact.search(["how do cells divide", "what pumps blood"], k=3)[0]  # nprobe covers every cell
    assert all(np.all(np.diff(row) <= 0) for row in scores)


def test_empty_and_unknown_queries_warn_and_fall_back_to_bm25(index_dir: Path) -> None:
    searcher = Searcher.load(index_dir)
    with pytest.warns(UserWarning, match="no token the query route knows"):
        ids, scores = searcher.search(["", "☃☃", "how do cells divide"], k=3)
    assert ids[0] == [] and ids[1] == [] and len(ids[2]) == 3 and len(scores[0]) == 0
    # A route that knows none of a query's tokens (every latin word has known pieces in this tiny vocabulary, so the
    # route's vectors are zeroed here) still gets BM25's ranking of the documents sharing a term, weighted.
    searcher.encode = lambda texts: np.zeros((len(texts), searcher.dimension), dtype=np.float32)
    with pytest.warns(UserWarning, match="BM25's ranking alone"):
        ids, scores = searcher.search(["cells divide", "☃"], k=3, fuse_bm25=True)
    rows, lexical = searcher.lexical.normalised_top_k(["cells divide"], 3)
    matching = [searcher.ids[row] for row, score in zip(rows[0], lexical[0]) if score > 0]
    assert ids[0] == matching and matching[0] == "d-cell"
    np.testing.assert_allclose(scores[0], 0.15 * lexical[0][: len(matching)], rtol=1e-6)
    assert ids[1] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Searcher.load(index_dir).search("how do cells divide", k=2)  # a known query: no warning


def test_searcher_refuses_bad_input_naming_the_file(
    tiny_document_model_dir: Path, index_dir: Path, tiny_beir_dir: Path, tmp_path: Path
) -> None:
    # Another document route: the same model with one document weight changed.
    other = build_asymmetric_model(str(tiny_document_model_dir), "static")
    with torch.no_grad():
        next(get_route(other, "document").parameters()).add_(0.01)
    other_dir = build_search_index(other, tiny_beir_dir, tmp_path / "other", show_progress_bar=False)
    with pytest.raises(SearchIndexError, match=r"config.json: this query route was exported beside document route"):
        Searcher.load(index_dir, query_route=other_dir / "query")
    mixed = tmp_path / "mixed"
    shutil.copytree(index_dir, mixed)
    shutil.rmtree(mixed / "documents")
    shutil.copytree(other_dir / "documents", mixed / "documents")
    with pytest.raises(SearchIndexError, match=r"cache_metadata.json: the document embeddings come from"):
        Searcher.load(mixed)

    for name in ("ids.json", "faiss.index", "manifest.json"):
        broken = tmp_path / f"without-{name}"
        shutil.copytree(index_dir, broken)
        (broken / name).unlink()
        with pytest.raises(SearchIndexError, match=rf"{name}.* not found"):
            Searcher.load(broken)
    truncated = tmp_path / "truncated"
    shutil.copytree(index_dir, truncated)
    embeddings = truncated / "documents" / "embeddings.npy"
    embeddings.write_bytes(embeddings.read_bytes()[:-100])
    with pytest.raises(SearchIndexError, match=r"embeddings.npy: document embeddings file is truncated"):
        Searcher.load(truncated)


def test_build_refuses_bad_input_before_embedding(route, tiny_document_model_dir, tiny_beir_dir, tmp_path) -> None:
    tiny = build_asymmetric_model(str(tiny_document_model_dir), "tiny:1,32")
    with pytest.raises(ValueError, match="static route"):
        build_search_index(tiny, tiny_beir_dir, tmp_path / "a", show_progress_bar=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="--index-option bogus"):
        build_search_index(route, tiny_beir_dir, tmp_path / "b", index_options={"bogus": 1})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and st-daft did not write it"):
        build_search_index(route, tiny_beir_dir, tmp_path / "full", show_progress_bar=False)
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"


def test_resumed_build_reads_the_embeddings_back(route, index_dir: Path, tiny_beir_dir: Path, monkeypatch) -> None:
    (index_dir / "manifest.json").unlink()  # an interrupted build: the embeddings are there, nothing after them

    def refuse(*args, **kwargs):
        raise AssertionError("the documents were embedded again")

    monkeypatch.setattr(type(route), "encode_document", refuse)
    build_search_index(
        route, tiny_beir_dir, index_dir, bm25=True, resume=True, embeddings_dtype="float16", show_progress_bar=False
    )
    assert Searcher.load(index_dir).search("how do cells divide", k=1)[0] != []


def test_bm25_index_round_trips(tmp_path: Path) -> None:
    texts = ["cells divide by mitosis", "the heart pumps blood", "stars fuse hydrogen"]
    bm25 = BM25Search().index_texts(["a", "b", "c"], texts)
    bm25.save(tmp_path / "bm25")
    loaded = BM25Search.load(tmp_path / "bm25", ["a", "b", "c"])
    for expected, found in zip(bm25.top_k(["pumping hearts", "cell"], 2), loaded.top_k(["pumping hearts", "cell"], 2)):
        np.testing.assert_array_equal(expected, found)
    with pytest.raises(ValueError, match="bm25_settings.json: the BM25 index has 3 documents"):
        BM25Search.load(tmp_path / "bm25", ["a"])


def test_searching_loads_no_torch(index_dir: Path) -> None:
    script = f"""
import sys
from st_daft.serving import Searcher
searcher = Searcher.load({str(index_dir)!r})
ids, scores = searcher.search(["how do cells divide", "what pumps blood"], k=3, fuse_bm25=True)
assert len(ids[0]) == 3, ids
heavy = [name for name in ("torch", "transformers", "mteb", "sentence_transformers") if name in sys.modules]
print(",".join(heavy) or "none")
"""
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "none"


def test_cli_index_and_search(route, tiny_beir_dir: Path, tmp_path: Path, capsys) -> None:
    route.save(str(tmp_path / "route"))
    output = tmp_path / "index"
    assert (
        main(["index", str(tmp_path / "route"), "--data", str(tiny_beir_dir), "--output", str(output), "--bm25"]) == 0
    )
    assert "index of 8 documents" in capsys.readouterr().out
    assert main(["search", str(output), "how do cells divide", "-k", "2", "--fuse-bm25", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = Searcher.load(output).search("how do cells divide", k=2, fuse_bm25=True)[0]
    assert [hit["id"] for hit in line["hits"]] == expected
    assert main(["index", str(tmp_path / "route"), "--data", str(tiny_beir_dir), "--output", str(output)]) == 2
    assert "holds an earlier `st-daft index` output" in capsys.readouterr().err
    assert (
        main(["index", str(tmp_path / "route"), "--data", str(tiny_beir_dir), "--output", str(output), "--overwrite"])
        == 0
    )
    assert json.loads((output / "manifest.json").read_text())["files"]["bm25"] is None  # rebuilt without --bm25
    other = tmp_path / "other"
    assert main(["index", str(tmp_path / "route"), "--data", str(tiny_beir_dir), "--output", str(other)]) == 0
    assert main(["search", str(other), "cells", "--fuse-bm25"]) == 2
    assert "without --bm25" in capsys.readouterr().err


def test_service_example_answers_over_http(index_dir: Path) -> None:
    pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    import importlib.util

    from starlette.testclient import TestClient

    spec = importlib.util.spec_from_file_location("serve_search", ROOT / "examples" / "serve_search.py")
    serve_search = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_search)
    searcher = Searcher.load(index_dir)
    client = TestClient(serve_search.create_app(searcher))
    response = client.get("/search", params={"q": "how do cells divide", "k": 3, "fuse": "1"})
    assert response.status_code == 200
    ids, scores = searcher.search("how do cells divide", k=3, fuse_bm25=True)
    assert [hit["id"] for hit in response.json()["hits"]] == ids
    np.testing.assert_allclose([hit["score"] for hit in response.json()["hits"]], scores, atol=1e-5)
    assert client.get("/health").json() == {"documents": 8, "bm25": True}
    for params, message in (({}, "missing query"), ({"q": "x", "k": "0"}, "between 1"), ({"q": "x", "k": "a"}, "k")):
        response = client.get("/search", params=params)
        assert response.status_code == 400 and message in response.json()["error"]
    with pytest.warns(UserWarning, match="no token"):
        assert client.get("/search", params={"q": ""}).json()["hits"] == []


@pytest.mark.slow
def test_searcher_reproduces_evaluate_on_a_scifact_slice(scifact_dir: Path, tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 documents (float16 in the index) and a static route: the same nDCG@10 as ``st-daft
    evaluate``, dense and fused, on 60 test claims over 300 abstracts."""

    from st_daft import default_document_encoder
    from st_daft.embeddings.store import DocumentEmbeddingStore

    data = slice_beir(scifact_dir, tmp_path / "slice", 300, ("test",), queries_per_split=60)
    route = build_asymmetric_model(default_document_encoder(), "static")
    store = DocumentEmbeddingStore(tmp_path / "store")  # the corpus is embedded once, for every row below
    index = build_search_index(route, data, tmp_path / "index", bm25=True, document_store=store)
    searcher = Searcher.load(index)

    def ndcg(model) -> float:
        return evaluate_retrieval(model, data, show_progress_bar=False, document_store=store)["ndcg_at_10"]

    assert ndcg(SearcherRetrieval(searcher)) == pytest.approx(ndcg(route), abs=1e-4)
    fused = ndcg(HybridSearch(route, document_store=store))
    assert ndcg(SearcherRetrieval(searcher, fuse_bm25=True)) == pytest.approx(fused, abs=1e-4)
