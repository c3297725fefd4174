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
