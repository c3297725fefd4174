"""Exporting one route of an asymmetric model as a plain, Router-free model (query-only serving)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Router, StaticEmbedding, Transformer

from st_daft import build_asymmetric_model, count_parameters, export_route, get_route
from st_daft.cli import main

TEXTS = ["how do cells divide", "the heart pumps blood through arteries", "are python tuples mutable"]


def _encode_in_fresh_interpreter(folder: Path, output: Path) -> list[str]:
    """Load ``folder`` with plain sentence-transformers in a new interpreter that never imports st_daft, save its
    ``encode``, ``encode_query`` and ``encode_document`` vectors of TEXTS to ``output`` and return the module types."""
    script = f"""
import json, sys, numpy as np
from sentence_transformers import SentenceTransformer
model = SentenceTransformer({str(folder)!r}, device="cpu", trust_remote_code=False)
assert "st_daft" not in sys.modules
np.savez({str(output)!r}, encode=model.encode({TEXTS!r}), query=model.encode_query({TEXTS!r}),
         document=model.encode_document({TEXTS!r}))
print(json.dumps([type(module).__name__ for module in model]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spec", ["static", "tiny:1,16"])
def test_exported_query_route_gives_the_full_models_query_vectors(tiny_document_model_dir: Path, spec: str) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), spec)
    expected = model.encode_query(TEXTS)
    exported = export_route(model)
    assert not any(isinstance(module, Router) for module in exported.modules())
    assert isinstance(exported[-1], Normalize)
    assert [type(module) for module in list(exported)[:-1]] == [type(module) for module in get_route(model, "query")]
    np.testing.assert_allclose(exported.encode(TEXTS), expected, atol=1e-6)
    np.testing.assert_allclose(exported.encode_query(TEXTS), expected, atol=1e-6)
    np.testing.assert_allclose(exported.encode_document(TEXTS), expected, atol=1e-6)  # one route: every entry point
    for batch_size in (1, 2):
        np.testing.assert_allclose(exported.encode(TEXTS, batch_size=batch_size), expected, atol=1e-6)
    assert sum(p.numel() for p in exported.parameters()) == count_parameters(model, "query")
    assert exported.similarity_fn_name == model.similarity_fn_name
    if spec.startswith("tiny"):
        assert isinstance(exported[0], Transformer)
        assert exported.max_seq_length == get_route(model, "query")[0].max_seq_length == 64


def test_export_copies_the_modules_and_leaves_the_model_untouched(tiny_document_model_dir: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    before = model.encode_query(TEXTS)
    exported = export_route(model)
    assert isinstance(exported[0], StaticEmbedding)
    original = get_route(model, "query")[0]
    assert exported[0] is not original
    assert exported[0].embedding.weight.data_ptr() != original.embedding.weight.data_ptr()
    with torch.no_grad():
        exported[0].embedding.weight.add_(1.0)
    np.testing.assert_allclose(model.encode_query(TEXTS), before, atol=1e-6)
    assert isinstance(model[0], Router) and set(model[0].sub_modules) == {"query", "document"}


def test_exported_document_route_gives_the_full_models_document_vectors(tiny_document_model_dir: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    exported = export_route(model, "document")
    assert [type(module) for module in exported] == [*(type(m) for m in get_route(model, "document")), Normalize]
    expected = model.encode_document(TEXTS)
    np.testing.assert_allclose(exported.encode(TEXTS), expected, atol=1e-6)
    np.testing.assert_allclose(exported.encode_document(TEXTS), expected, atol=1e-6)
    symmetric = SentenceTransformer(str(tiny_document_model_dir), device="cpu")
    np.testing.assert_allclose(exported.encode(TEXTS), symmetric.encode(TEXTS), atol=1e-5)


def test_export_carries_prompts_truncation_and_similarity(tiny_document_model_dir: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    model.prompts = {"query": "how: ", "document": "the "}
    model.truncate_dim = 16
    model.similarity_fn_name = "dot"
    unprompted = model.encode_query(TEXTS, prompt="")
    for route, encode in (("query", model.encode_query), ("document", model.encode_document)):
        expected = encode(TEXTS)
        assert expected.shape == (3, 16)
        exported = export_route(model, route)
        assert (exported.truncate_dim, exported.similarity_fn_name) == (16, "dot")
        np.testing.assert_allclose(exported.encode(TEXTS), expected, atol=1e-6)
        np.testing.assert_allclose(exported.encode_query(TEXTS), expected, atol=1e-6)
        np.testing.assert_allclose(exported.encode_document(TEXTS), expected, atol=1e-6)
    assert not np.allclose(unprompted, model.encode_query(TEXTS))  # the prompt matters, and was carried over


def test_export_errors(tiny_document_model_dir: Path) -> None:
    symmetric = SentenceTransformer(str(tiny_document_model_dir), device="cpu")
    with pytest.raises(ValueError, match="without a Router"):
        export_route(symmetric)
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    with pytest.raises(ValueError, match=r"no route 'passage'.*\['query', 'document'\]"):
        export_route(model, "passage")


@pytest.mark.parametrize("route", ["query", "document"])
def test_saved_export_loads_in_plain_sentence_transformers(tiny_document_model_dir: Path, tmp_path, route) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    expected = model.encode_query(TEXTS) if route == "query" else model.encode_document(TEXTS)
    exported = export_route(model, route, output_path=tmp_path / "served")
    assert (tmp_path / "served" / "modules.json").is_file()
    assert exported.model_card_data.model_name == f"{route.capitalize()} route of an asymmetric (st-daft) model"
    types = _encode_in_fresh_interpreter(tmp_path / "served", tmp_path / "vectors.npz")
    assert "Router" not in types and types[-1] == "Normalize"
    assert types[0] == ("StaticEmbedding" if route == "query" else "Transformer")
    vectors = np.load(tmp_path / "vectors.npz")
    for name in ("encode", "query", "document"):
        np.testing.assert_allclose(vectors[name], expected, atol=1e-6)


def test_cli_export(tiny_document_model_dir: Path, tmp_path: Path, capsys) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "tiny:1,16")
    model.save(str(tmp_path / "full"))
    assert main(["export", str(tmp_path / "full"), str(tmp_path / "query-only")]) == 0
    output = capsys.readouterr().out
    assert f"query route: {count_parameters(model, 'query'):,} parameters" in output
    assert str(tmp_path / "query-only") in output
    served = SentenceTransformer(str(tmp_path / "query-only"), device="cpu")
    assert not isinstance(served[0], Router)
    np.testing.assert_allclose(served.encode(TEXTS), model.encode_query(TEXTS), atol=1e-6)

    assert main(["export", str(tmp_path / "full"), str(tmp_path / "docs"), "--route", "document"]) == 0
    assert "document route:" in capsys.readouterr().out
    served = SentenceTransformer(str(tmp_path / "docs"), device="cpu")
    np.testing.assert_allclose(served.encode(TEXTS), model.encode_document(TEXTS), atol=1e-6)

    assert main(["export", str(tmp_path / "full"), str(tmp_path / "x"), "--route", "passage"]) == 2
    error = capsys.readouterr().err
    assert "no route 'passage'" in error and "['query', 'document']" in error
    assert main(["export", str(tiny_document_model_dir), str(tmp_path / "y")]) == 2
    assert "without a Router" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- model2vec export: the static route as one table, served without torch ---------------------------------------

M2V_TEXTS = [*TEXTS, "cells " * 300, "how do ☃ cells divide"]  # a long text; an unknown character ([UNK])


def _static_dense_model(tiny_document_model_dir: Path, tmp_path: Path) -> SentenceTransformer:
    """A static route with a Dense projection: a 16-d model2vec table + Dense(16 -> 32) with a non-zero bias."""
    from model2vec import StaticModel
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_document_model_dir / "tokenizer.json"))
    vectors = np.random.default_rng(0).normal(size=(tokenizer.get_vocab_size(), 16)).astype(np.float32)
    StaticModel(vectors=vectors, tokenizer=tokenizer).save_pretrained(str(tmp_path / "narrow"))
    model = build_asymmetric_model(str(tiny_document_model_dir), str(tmp_path / "narrow"))
    dense = get_route(model, "query")[1]
    with torch.no_grad():
        dense.linear.bias.normal_()
    return model


@pytest.mark.parametrize("projected", [False, True])
def test_model2vec_export_gives_the_full_models_query_vectors(
    tiny_document_model_dir: Path, tmp_path: Path, projected: bool
) -> None:
    from model2vec import StaticModel

    from st_daft.serving import export_static_model

    if projected:
        model = _static_dense_model(tiny_document_model_dir, tmp_path)
        assert [type(module).__name__ for module in get_route(model, "query")] == ["StaticEmbedding", "Dense"]
    else:
        model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    exported = export_static_model(model, tmp_path / "m2v")
    loaded = StaticModel.from_pretrained(str(tmp_path / "m2v"))
    assert loaded.embedding.shape == (get_route(model, "query")[0].num_embeddings, 32)  # the Dense is folded in
    truncation = get_route(model, "query")[0].tokenizer.truncation  # a model2vec folder's tokenizer: 512
    assert loaded.normalize and loaded.max_length == (truncation["max_length"] if truncation else None)
    known = M2V_TEXTS[:-1]
    for static_model in (exported, loaded):
        np.testing.assert_allclose(static_model.encode(known), model.encode_query(known), atol=1e-5)
        np.testing.assert_allclose(static_model.encode(known[:1]), model.encode_query(known[:1]), atol=1e-5)

    # model2vec drops unknown tokens before the mean; StaticEmbedding averages the [UNK] row in.
    unknown = loaded.encode(["how do ☃ cells divide"])
    np.testing.assert_allclose(unknown, model.encode_query(["how do cells divide"]), atol=1e-5)
    assert not np.allclose(unknown, model.encode_query(["how do ☃ cells divide"]), atol=1e-3)
    # No known token (also the empty text): model2vec's zero vector; the route's is zero, or its normalised bias.
    empty = loaded.encode(["", "☃"])
    np.testing.assert_array_equal(empty, np.zeros_like(empty))
    if projected:
        bias = get_route(model, "query")[1].linear.bias.detach().numpy()
        np.testing.assert_allclose(model.encode_query([""])[0], bias / np.linalg.norm(bias), atol=1e-6)
    else:
        np.testing.assert_array_equal(model.encode_query([""]), np.zeros_like(empty[:1]))


def test_model2vec_export_keeps_the_route_tokenizers_truncation(tiny_document_model_dir: Path, tmp_path: Path) -> None:
    from model2vec import StaticModel

    from st_daft.serving import export_static_model

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    letters = [" ".join("abcdefghijklmnopqrstuvwxyz")]  # 26 one-letter tokens
    untruncated = model.encode_query(letters)
    get_route(model, "query")[0].tokenizer.enable_truncation(16)  # as a route built from MiniLM's tokenizer: 128
    expected = model.encode_query(letters)
    assert not np.allclose(expected, untruncated, atol=1e-3)
    export_static_model(model, tmp_path / "m2v")
    loaded = StaticModel.from_pretrained(str(tmp_path / "m2v"))
    assert loaded.max_length == 16
    np.testing.assert_allclose(loaded.encode(letters), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_model2vec_export_smaller_tables_stay_close(tiny_document_model_dir: Path, tmp_path: Path, dtype) -> None:
    from model2vec import StaticModel

    from st_daft.serving import export_static_model

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    export_static_model(model, tmp_path / "small", dtype=dtype)
    loaded = StaticModel.from_pretrained(str(tmp_path / "small"))
    assert loaded.embedding.dtype == np.dtype(dtype)
    vectors = loaded.encode(M2V_TEXTS[:-1]).astype(np.float32)
    expected = model.encode_query(M2V_TEXTS[:-1])
    cosines = (vectors * expected).sum(axis=1) / np.linalg.norm(vectors, axis=1)
    assert cosines.min() > 0.999
    size = (tmp_path / "small" / "model.safetensors").stat().st_size
    full = loaded.embedding.shape[0] * loaded.embedding.shape[1] * 4
    assert size < full * (0.55 if dtype == "float16" else 0.3)


def test_model2vec_export_loads_without_torch(tiny_document_model_dir: Path, tmp_path: Path) -> None:
    from st_daft.serving import export_static_model

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    export_static_model(model, tmp_path / "m2v")
    script = f"""
import sys, numpy as np
from model2vec import StaticModel
vectors = StaticModel.from_pretrained({str(tmp_path / "m2v")!r}).encode({TEXTS!r})
assert "torch" not in sys.modules and "st_daft" not in sys.modules and "sentence_transformers" not in sys.modules
np.save({str(tmp_path / "vectors.npy")!r}, vectors)
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    np.testing.assert_allclose(np.load(tmp_path / "vectors.npy"), model.encode_query(TEXTS), atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_static_query_encoder_gives_model2vecs_vectors(tiny_document_model_dir: Path, tmp_path: Path, dtype) -> None:
    from model2vec import StaticModel

    from st_daft.serving import StaticQueryEncoder, export_static_model

    model = _static_dense_model(tiny_document_model_dir, tmp_path)
    get_route(model, "query")[0].tokenizer.enable_truncation(16)  # token and character truncation both apply
    export_static_model(model, tmp_path / "m2v", dtype=dtype)
    loaded = StaticModel.from_pretrained(str(tmp_path / "m2v"))
    encoder = StaticQueryEncoder(tmp_path / "m2v")
    texts = [*M2V_TEXTS, "", "☃", " ".join("abcdefghijklmnopqrstuvwxyz")]
    vectors = encoder.encode(texts)
    assert vectors.dtype == loaded.encode(texts).dtype and vectors.shape == (len(texts), 32)
    np.testing.assert_allclose(vectors.astype(np.float32), loaded.encode(texts).astype(np.float32), atol=1e-3)
    for text in texts:  # batch size 1, as served; a single string gives one vector
        np.testing.assert_allclose(encoder(text).astype(np.float32), loaded.encode(text).astype(np.float32), atol=1e-3)
    np.testing.assert_array_equal(encoder.encode(["", "☃"]), 0)
    if dtype == "float32":
        np.testing.assert_allclose(vectors[: len(TEXTS)], model.encode_query(TEXTS), atol=1e-5)
        in_memory = StaticQueryEncoder.from_model(model)
        np.testing.assert_allclose(in_memory.encode(TEXTS), vectors[: len(TEXTS)], atol=1e-6)


def test_static_query_encoder_imports_without_torch(tiny_document_model_dir: Path, tmp_path: Path) -> None:
    from st_daft.serving import export_static_model

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    export_static_model(model, tmp_path / "m2v")
    script = f"""
import sys, numpy as np
from st_daft.serving import StaticQueryEncoder
vectors = StaticQueryEncoder({str(tmp_path / "m2v")!r}).encode({TEXTS!r})
heavy = [name for name in ("torch", "transformers", "sentence_transformers", "mteb") if name in sys.modules]
assert not heavy, heavy
np.save({str(tmp_path / "vectors.npy")!r}, vectors)
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    np.testing.assert_allclose(np.load(tmp_path / "vectors.npy"), model.encode_query(TEXTS), atol=1e-5)


def test_model2vec_export_errors(tiny_document_model_dir: Path, tmp_path: Path) -> None:
    from st_daft.serving import export_static_model

    tiny = build_asymmetric_model(str(tiny_document_model_dir), "tiny:1,16")
    with pytest.raises(ValueError, match=r"needs a static route.*format sentence-transformers"):
        export_static_model(tiny, tmp_path / "a")
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    with pytest.raises(ValueError, match="dtype 'int4'"):
        export_static_model(model, tmp_path / "b", dtype="int4")
    with pytest.raises(ValueError, match="needs a static route"):
        export_static_model(model, tmp_path / "c", route="document")
    model.prompts = {"query": "query: "}
    with pytest.raises(ValueError, match="prompt 'query: '"):
        export_static_model(model, tmp_path / "d")
    model.prompts = {}
    model.truncate_dim = 16
    with pytest.raises(ValueError, match="truncate_dim"):
        export_static_model(model, tmp_path / "e")
    with pytest.raises(ValueError, match="without a Router"):
        export_static_model(SentenceTransformer(str(tiny_document_model_dir), device="cpu"), tmp_path / "f")
    assert not any((tmp_path / name).exists() for name in "abcdef")


def test_cli_export_model2vec(tiny_document_model_dir: Path, tmp_path: Path, capsys) -> None:
    from model2vec import StaticModel

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    model.save(str(tmp_path / "full"))
    assert main(["export", str(tmp_path / "full"), str(tmp_path / "m2v"), "--format", "model2vec"]) == 0
    output = capsys.readouterr().out
    assert "float32 table" in output and "model2vec model saved to" in output
    np.testing.assert_allclose(
        StaticModel.from_pretrained(str(tmp_path / "m2v")).encode(TEXTS), model.encode_query(TEXTS), atol=1e-5
    )
    half = ["--format", "model2vec", "--dtype", "float16"]
    assert main(["export", str(tmp_path / "full"), str(tmp_path / "h"), *half]) == 0
    assert StaticModel.from_pretrained(str(tmp_path / "h")).embedding.dtype == np.float16
    capsys.readouterr()

    assert main(["export", str(tmp_path / "full"), str(tmp_path / "x"), "--dtype", "int8"]) == 2
    assert "--dtype int8 applies to --format model2vec only" in capsys.readouterr().err
    build_asymmetric_model(str(tiny_document_model_dir), "tiny:1,16").save(str(tmp_path / "tiny"))
    assert main(["export", str(tmp_path / "tiny"), str(tmp_path / "y"), "--format", "model2vec"]) == 2
    assert "needs a static route" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
