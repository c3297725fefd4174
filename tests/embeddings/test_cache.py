"""StaleEmbeddingCache: build, token-key lookups, fingerprint, save/load and its refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from st_daft import CacheMismatchError, StaleEmbeddingCache, build_asymmetric_model, get_route
from st_daft.models.fingerprint import route_fingerprint

CORPUS = {
    "a": "cells divide by mitosis",
    "b": "the heart pumps blood",
    "c": "rain forms in clouds",
    "d": "stars fuse hydrogen",
}


@pytest.fixture()
def model(tiny_document_model_dir: Path):
    return build_asymmetric_model(str(tiny_document_model_dir), "static")


def test_build_matches_encode_document(model) -> None:
    cache = StaleEmbeddingCache.build(model, CORPUS, show_progress_bar=False)
    assert len(cache) == 4 and cache.dimension == 32
    expected = model.encode_document(list(CORPUS.values()), convert_to_tensor=True)
    torch.testing.assert_close(cache.embeddings, expected, atol=1e-5, rtol=1e-5)
    assert cache.rows_for_ids(["c", "a"]).tolist() == [2, 0]
    # filled chunk by chunk into a float16 tensor, the rows in corpus order across chunks
    half = StaleEmbeddingCache.build(model, CORPUS, dtype=torch.float16, chunk_size=3, show_progress_bar=False)
    assert half.embeddings.dtype == torch.float16 and half.folder is None
    torch.testing.assert_close(half.embeddings.float(), expected, atol=2e-3, rtol=2e-3)
    with pytest.raises(KeyError, match="unknown corpus id"):
        cache.rows_for_ids(["zzz"])


def test_rows_for_features_finds_documents_in_a_padded_batch(model) -> None:
    cache = StaleEmbeddingCache.build(model, CORPUS, show_progress_bar=False)
    texts = [CORPUS["d"], "a text that is not in the corpus at all", CORPUS["b"]]
    features = model.preprocess(texts, task="document")
    assert cache.rows_for_features(features).tolist() == [3, -1, 1]


def test_fingerprint_follows_the_document_route_only(model) -> None:
    before = route_fingerprint(model)
    with torch.no_grad():
        get_route(model, "query")[0].embedding.weight.add_(1.0)
    assert route_fingerprint(model) == before
    with torch.no_grad():
        next(get_route(model, "document").parameters()).add_(1e-3)
    assert route_fingerprint(model) != before
    changed = route_fingerprint(model)
    get_route(model, "document")[0].max_seq_length = 8
    assert route_fingerprint(model) != changed, "truncation changes document embeddings: the cache must see it"


def test_save_load_round_trip_and_refusals(model, tmp_path: Path) -> None:
    cache = StaleEmbeddingCache.build(model, CORPUS, dtype=torch.float16, show_progress_bar=False)
    cache.save(tmp_path / "cache")
    loaded = StaleEmbeddingCache.load(
        tmp_path / "cache", expected_fingerprint=cache.fingerprint, expected_dimension=32, expected_size=4
    )
    assert loaded.ids == cache.ids and loaded.keys == cache.keys and loaded.embeddings.dtype == torch.float16
    assert torch.equal(loaded.embeddings, cache.embeddings)
    mapped = StaleEmbeddingCache.load(tmp_path / "cache", mmap=True)
    assert torch.equal(mapped.embeddings, cache.embeddings)

    with pytest.raises(CacheMismatchError, match="fingerprint .*the document route changed"):
        StaleEmbeddingCache.load(tmp_path / "cache", expected_fingerprint="0" * 32)
    with pytest.raises(CacheMismatchError, match="dimension 32 != expected 64"):
        StaleEmbeddingCache.load(tmp_path / "cache", expected_dimension=64)
    with pytest.raises(CacheMismatchError, match="size 4 != expected 5"):
        StaleEmbeddingCache.load(tmp_path / "cache", expected_size=5)
    with pytest.raises(CacheMismatchError, match="not an st-daft embedding cache"):
        StaleEmbeddingCache.load(tmp_path)


def test_empty_inputs_are_refused(model) -> None:
    with pytest.raises(ValueError, match="empty corpus"):
        StaleEmbeddingCache.build(model, {})
    with pytest.raises(ValueError, match="empty text"):
        StaleEmbeddingCache.build(model, {"a": "fine", "b": "   "})


def test_a_cache_on_disk_is_reused_only_for_the_same_route_and_corpus(model, tmp_path: Path, monkeypatch) -> None:
    from st_daft.embeddings import encode as cache_module

    folder = tmp_path / "cache"
    built = StaleEmbeddingCache.build(model, CORPUS, dtype=torch.float16, folder=folder, show_progress_bar=False)
    assert built.folder == folder and built.embeddings.dtype == torch.float16
    encoded: list[int] = []
    real_embed = cache_module.embed_sharded

    def counting(model, texts, *args, **kwargs):
        encoded.append(len(texts))
        return real_embed(model, texts, *args, **kwargs)

    monkeypatch.setattr(cache_module, "embed_sharded", counting)

    def build(corpus: dict[str, str], dtype: torch.dtype = torch.float16) -> StaleEmbeddingCache:
        return StaleEmbeddingCache.build(model, corpus, dtype=dtype, folder=folder, show_progress_bar=False, reuse=True)

    again = build(CORPUS)
    assert encoded == [] and torch.equal(again.embeddings, built.embeddings), "read back, not encoded again"
    changed = {**CORPUS, "c": "snow forms in clouds"}  # same ids, one text changed
    rebuilt = build(changed)
    assert encoded == [4], "another text: built again"
    expected = model.encode_document(list(changed.values()), convert_to_tensor=True)
    torch.testing.assert_close(rebuilt.embeddings.float(), expected, atol=2e-3, rtol=2e-3)
    build(changed, torch.float32)
    assert encoded == [4, 4], "another storage type: built again"
    with torch.no_grad():
        next(get_route(model, "document").parameters()).mul_(1.5)
    assert build(changed, torch.float32).fingerprint == route_fingerprint(model) and encoded == [4, 4, 4]
    (folder / "cache_metadata.json").write_text("{")  # a cache left half-written: built again, not an error
    build(changed, torch.float32)
    assert encoded == [4, 4, 4, 4] and not list(folder.glob("*.tmp*"))


def test_a_document_prompt_is_part_of_the_cache_identity(model, tmp_path: Path) -> None:
    """encode_document prepends the model's document prompt, so a cache built under one prompt holds other vectors
    than the model computes under another: it must be neither reused nor taken as current."""
    from st_daft.negatives.miner import NegativeMiner

    folder = tmp_path / "cache"
    plain = StaleEmbeddingCache.build(model, CORPUS, folder=folder, show_progress_bar=False)
    assert plain.fingerprint == route_fingerprint(model), "an unprompted cache keeps the fingerprint it always had"
    model.prompts = {"document": "passage: "}
    assert not plain.is_current(model)
    with pytest.raises(CacheMismatchError, match="another document encoder"):
        NegativeMiner(plain, CORPUS, strategy="stale", num_negatives=2).check_cache(model)
    prompted = StaleEmbeddingCache.build(model, CORPUS, folder=folder, show_progress_bar=False, reuse=True)
    expected = model.encode_document(list(CORPUS.values()), convert_to_tensor=True)
    torch.testing.assert_close(prompted.embeddings, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(prompted.embeddings, plain.embeddings), "rebuilt under the prompt, not read back"
    assert prompted.is_current(model) and prompted.fingerprint != plain.fingerprint
    model.prompts = {"document": "doc: "}
    assert not prompted.is_current(model), "another prompt, another identity"
    model.prompts = {}
    assert plain.is_current(model)
