"""One route identity (st_daft.fingerprint) for cache, store, losses and miner."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sentence_transformers.base.modules.router import Router

from st_daft import build_asymmetric_model, get_route
from st_daft.fingerprint import hash_module_state, route_fingerprint


def _store_key_of_version_0_1(model) -> str:
    """How st-daft 0.1's DocumentEmbeddingStore keyed a document route (document_encoder_key), written out."""
    inner = hashlib.blake2b(digest_size=16)
    hash_module_state(inner, get_route(model, "document"))
    digest = hashlib.blake2b(digest_size=16)
    digest.update(inner.hexdigest().encode())
    for module in model:
        if not isinstance(module, Router):
            digest.update(type(module).__qualname__.encode())
            hash_module_state(digest, module)
    digest.update(f"max_seq_length={get_route(model, 'document')[0].max_seq_length}".encode())
    return digest.hexdigest()


def test_fingerprint_reads_stores_written_by_version_0_1(tiny_document_model_dir: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    assert route_fingerprint(model, "document") == _store_key_of_version_0_1(model)


def test_fingerprint_follows_parameters_truncation_and_modules_after_the_router(tiny_document_model_dir: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    before = route_fingerprint(model, "document")
    query_before = route_fingerprint(model, "query")
    assert before != query_before  # each route has its own identity

    document = get_route(model, "document")
    document[0].max_seq_length = document[0].max_seq_length // 2  # the cache used to miss this change
    shorter = route_fingerprint(model, "document")
    assert shorter != before

    parameter = next(document.parameters())
    with __import__("torch").no_grad():
        parameter.add_(1.0)
    assert route_fingerprint(model, "document") not in (before, shorter)
    assert route_fingerprint(model, "query") == query_before  # the other route is untouched
