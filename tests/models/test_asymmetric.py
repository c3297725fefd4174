"""The asymmetric model wrapper: routes, query encoder specifications, freezing, save -> plain-ST load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Router, StaticEmbedding, Transformer

from st_daft import (
    build_asymmetric_model,
    count_parameters,
    freeze_route,
    frozen_route,
    get_route,
    get_router,
    route_parameter_pattern,
    unfreeze_route,
)

TEXTS = ["how do cells divide", "the heart pumps blood through arteries"]


def _model2vec_folder(tiny_bert_dir: Path, folder: Path, dim: int = 8) -> Path:
    from model2vec import StaticModel
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_bert_dir / "tokenizer.json"))
    vectors = np.random.default_rng(0).normal(size=(tokenizer.get_vocab_size(), dim)).astype(np.float32)
    StaticModel(vectors, tokenizer).save_pretrained(str(folder))
    return folder


def test_static_route_uses_document_input_embeddings(tiny_document_model_dir: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    router = get_router(model)
    assert isinstance(model[1], Normalize)
    query_modules = list(get_route(model, "query"))
    assert len(query_modules) == 1 and isinstance(query_modules[0], StaticEmbedding)
    document_transformer = get_route(model, "document")[0]
    assert isinstance(document_transformer, Transformer)
    word_embeddings = document_transformer.auto_model.get_input_embeddings().weight
    assert torch.equal(query_modules[0].embedding.weight, word_embeddings)
    # a copy, not shared storage: the routes must train independently
    assert query_modules[0].embedding.weight.data_ptr() != word_embeddings.data_ptr()
    assert set(router.sub_modules) == {"query", "document"}


def test_encode_query_and_document_take_different_routes(tiny_document_model_dir: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    queries = model.encode_query(TEXTS)
    documents = model.encode_document(TEXTS)
    assert queries.shape == documents.shape == (2, 32)
    assert not np.allclose(queries, documents)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    symmetric = SentenceTransformer(str(tiny_document_model_dir), device="cpu")
    np.testing.assert_allclose(documents, symmetric.encode(TEXTS), atol=1e-5)


@pytest.mark.parametrize("spec, dimension", [("tiny:1,16", 16), ("tiny:2,8", 8)])
def test_tiny_bert_query_route(tiny_document_model_dir: Path, spec: str, dimension: int) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), spec)
    query_modules = list(get_route(model, "query"))
    assert isinstance(query_modules[0], Transformer)
    config = query_modules[0].auto_model.config
    assert (config.num_hidden_layers, config.hidden_size) == tuple(int(x) for x in spec[5:].split(","))
    assert isinstance(query_modules[-1], Dense) and query_modules[-1].in_features == dimension
    assert query_modules[-1].out_features == 32
    assert model.encode_query(TEXTS).shape == (2, 32)


def test_model2vec_and_model_folder_query_routes(tiny_bert_dir: Path, tiny_document_model_dir: Path, tmp_path) -> None:
    folder = _model2vec_folder(tiny_bert_dir, tmp_path / "m2v")
    model = build_asymmetric_model(str(tiny_document_model_dir), str(folder))
    modules = list(get_route(model, "query"))
    assert isinstance(modules[0], StaticEmbedding) and modules[0].embedding_dim == 8
    assert isinstance(modules[1], Dense) and (modules[1].in_features, modules[1].out_features) == (8, 32)
    assert model.encode_query(TEXTS).shape == (2, 32)

    from_st = build_asymmetric_model(str(tiny_document_model_dir), str(tiny_document_model_dir))
    np.testing.assert_allclose(from_st.encode_query(TEXTS), from_st.encode_document(TEXTS), atol=1e-5)

    from_transformers = build_asymmetric_model(str(tiny_document_model_dir), str(tiny_bert_dir))
    assert isinstance(get_route(from_transformers, "query")[0], Transformer)


@pytest.mark.parametrize(
    "spec, message",
    [("tiny:2", "tiny:LAYERS,HIDDEN"), ("tiny:0,8", "at least 1 layer"), ("nonsense", "unknown query encoder")],
)
def test_bad_query_encoder_specs(tiny_document_model_dir: Path, spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_asymmetric_model(str(tiny_document_model_dir), spec)


def test_wrong_folder_is_refused(tiny_document_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="not a sentence-transformers, transformers or model2vec model folder"):
        build_asymmetric_model(str(tiny_document_model_dir), str(tmp_path))


def test_freeze_and_unfreeze_routes(tiny_document_model_dir: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "tiny:1,16")
    freeze_route(model, "document")
    assert not any(p.requires_grad for p in get_route(model, "document").parameters())
    assert all(p.requires_grad for p in get_route(model, "query").parameters())
    assert count_parameters(model, "document", trainable_only=True) == 0
    unfreeze_route(model, "document")
    assert all(p.requires_grad for p in get_route(model, "document").parameters())
    with frozen_route(model, "query"):
        assert not any(p.requires_grad for p in get_route(model, "query").parameters())
    assert all(p.requires_grad for p in get_route(model, "query").parameters())
    with pytest.raises(ValueError, match="no route 'passage'"):
        freeze_route(model, "passage")
    symmetric = SentenceTransformer(str(tiny_document_model_dir), device="cpu")
    with pytest.raises(ValueError, match="no Router"):
        freeze_route(symmetric, "document")


def test_route_parameter_pattern_matches_only_its_route(tiny_document_model_dir: Path) -> None:
    import re

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    names = [name for name, _ in model.named_parameters()]
    query_names = [name for name in names if re.search(route_parameter_pattern("query"), name)]
    assert query_names and all(".query." in name for name in query_names)
    assert len(query_names) == len(list(get_route(model, "query").parameters()))


def test_document_model_must_be_symmetric(tiny_document_model_dir: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    with pytest.raises(ValueError, match="already an asymmetric"):
        build_asymmetric_model(model, "static")


@pytest.mark.parametrize("spec", ["static", "tiny:1,16"])
def test_saved_model_loads_in_plain_sentence_transformers(tiny_document_model_dir: Path, tmp_path, spec) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), spec)
    model.save(str(tmp_path / "saved"))
    expected_query, expected_document = model.encode_query(TEXTS), model.encode_document(TEXTS)
    # A fresh interpreter that never imports st_daft and refuses remote code.
    script = f"""
import sys, numpy as np
from sentence_transformers import SentenceTransformer
model = SentenceTransformer({str(tmp_path / "saved")!r}, device="cpu", trust_remote_code=False)
assert "st_daft" not in sys.modules
np.save({str(tmp_path / "q.npy")!r}, model.encode_query({TEXTS!r}))
np.save({str(tmp_path / "d.npy")!r}, model.encode_document({TEXTS!r}))
print(type(model[0]).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("Router")
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), expected_query, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "d.npy"), expected_document, atol=1e-6)
    reloaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert isinstance(reloaded[0], Router)


def test_static_route_tokenizer_is_not_shared_with_the_document_route(tiny_document_model_dir: Path) -> None:
    """Padding set by a document batch must not leak into static query tokenisation (a shared Rust tokenizer)."""
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    static = get_route(model, "query")[0]
    before = static.preprocess(TEXTS)["input_ids"].tolist()
    model.encode_document(["a long document " * 10, "short"])
    assert static.preprocess(TEXTS)["input_ids"].tolist() == before
    assert 0 not in before  # no [PAD] ids in the flat token stream


def test_tokenlearn_query_encoder_was_removed_with_a_reason(tiny_document_model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"'tokenlearn' was removed.*docs/results/quality.md.*--query-encoder static"):
        build_asymmetric_model(str(tiny_document_model_dir), "tokenlearn")


def test_public_names_resolve_lazily() -> None:
    """``st_daft`` names its public API three times (type-checking imports, ``_MODULE_OF``, ``__all__``): the two
    run-time lists agree and every name resolves to an object of its module."""
    import importlib

    import st_daft

    assert sorted(st_daft.__all__, key=str.lower) == sorted(st_daft._MODULE_OF, key=str.lower)
    for name, module in st_daft._MODULE_OF.items():
        assert getattr(st_daft, name) is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        st_daft.nothing_here  # noqa: B018
