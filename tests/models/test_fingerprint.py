"""One route identity (st_daft.models.fingerprint) for cache, store, losses and miner."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sentence_transformers.base.modules.router import Router

from st_daft import build_asymmetric_model, get_route
from st_daft.models.fingerprint import hash_module_state, route_fingerprint


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


def _plain_model_key_before_0_3(model) -> str:
    """How earlier st-daft keyed a model without a Router: the whole model as the route, every module hashed again."""
    inner = hashlib.blake2b(digest_size=16)
    hash_module_state(inner, model)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(inner.hexdigest().encode())
    for module in model:
        digest.update(type(module).__qualname__.encode())
        hash_module_state(digest, module)
    digest.update(f"max_seq_length={model.max_seq_length}".encode())
    return digest.hexdigest()


def test_plain_model_and_its_asymmetric_model_share_one_document_fingerprint(tiny_document_model_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from st_daft import DocumentEmbeddingStore, document_encoder_key
    from st_daft.models.fingerprint import fingerprint_matches, legacy_route_fingerprints

    plain = SentenceTransformer(str(tiny_document_model_dir), device="cpu")
    asymmetric = build_asymmetric_model(str(tiny_document_model_dir), "static")
    key = route_fingerprint(plain, "document")
    assert key == route_fingerprint(asymmetric, "document") == document_encoder_key(plain)
    legacy = _plain_model_key_before_0_3(plain)
    assert legacy != key and legacy_route_fingerprints(plain) == (legacy,)
    assert legacy_route_fingerprints(asymmetric) == ()
    assert fingerprint_matches(plain, legacy) and fingerprint_matches(plain, key)
    assert not fingerprint_matches(asymmetric, legacy)  # a legacy key names the plain model only

    # Without its Normalize the plain model embeds differently: another fingerprint.
    unnormalised = SentenceTransformer(modules=list(plain.children())[:-1], device="cpu")
    assert route_fingerprint(unnormalised, "document") != key

    texts = ["the cell divides", "protein folding in yeast"]
    store_folder = tiny_document_model_dir.parent / "store-migration"
    written = DocumentEmbeddingStore(store_folder)
    written.encode_document(asymmetric, texts[:1])
    (store_folder / key).rename(store_folder / legacy)  # as an earlier version left it for the plain model

    store = DocumentEmbeddingStore(store_folder)
    vectors = store.encode_document(plain, texts)
    assert (store.hits, store.misses) == (1, 1), "the row written under the legacy key is read, not encoded again"
    assert len(list((store_folder / legacy).glob("shard-*.npz"))) == 1, "the legacy folder is left as it was"
    assert len(list((store_folder / key).glob("shard-*.npz"))) == 1, "new rows go under the current key"
    shared = DocumentEmbeddingStore(store_folder)
    shared.encode_document(asymmetric, texts[1:])
    assert (shared.hits, shared.misses) == (1, 0), "the asymmetric model reads the plain model's rows"
    assert vectors.shape == (2, plain.get_embedding_dimension())
