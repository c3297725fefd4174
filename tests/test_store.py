"""Tests for st_daft.store: document-route embeddings kept on disk and reused while the document route is unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from st_daft import (
    DocumentEmbeddingStore,
    StaleEmbeddingCache,
    alignment_dataset,
    build_asymmetric_model,
    document_encoder_key,
    evaluate_retrieval,
    get_route,
    load_beir,
)
from st_daft.vocabulary import distill_token_embeddings

TEXTS = ["the cell divides", "protein folding in yeast", "a vaccine trial", "the cell divides"]


@pytest.fixture()
def model(tiny_document_model_dir: Path):
    return build_asymmetric_model(str(tiny_document_model_dir), "static")


def _counting(compute):
    calls: list[int] = []

    def wrapped(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return compute(texts)

    return wrapped, calls


def test_key_follows_the_document_route_only(model) -> None:
    key = document_encoder_key(model)
    assert key == document_encoder_key(model)
    with torch.no_grad():
        get_route(model, "query")[0].embedding.weight.add_(1.0)
    assert document_encoder_key(model) == key, "the query route does not shape document embeddings"
    with torch.no_grad():
        next(get_route(model, "document").parameters()).add_(0.01)
    assert document_encoder_key(model) != key
    changed = document_encoder_key(model)
    get_route(model, "document")[0].max_seq_length = 8
    assert document_encoder_key(model) != changed, "truncation changes document embeddings"


def test_reads_back_what_it_stored_across_instances(model, tmp_path: Path) -> None:
    expected = model.encode_document(TEXTS, convert_to_numpy=True)
    store = DocumentEmbeddingStore(tmp_path / "store")
    first = store.encode_document(model, TEXTS)
    np.testing.assert_allclose(first, expected, atol=1e-6)
    assert (store.hits, store.misses, store.repeats) == (0, 3, 1), "the repeated text is encoded once"

    reopened = DocumentEmbeddingStore(tmp_path / "store")
    compute, calls = _counting(lambda texts: model.encode_document(texts, convert_to_numpy=True))
    again = reopened.embeddings(model, TEXTS + ["a new text"], compute)
    assert calls == [1], "only the unseen text is encoded"
    np.testing.assert_allclose(again[: len(TEXTS)], expected, atol=1e-6)


def test_a_changed_document_route_does_not_read_stale_vectors(model, tmp_path: Path) -> None:
    store = DocumentEmbeddingStore(tmp_path / "store")
    before = store.encode_document(model, TEXTS)
    with torch.no_grad():
        next(get_route(model, "document").parameters()).mul_(1.5)
    after = store.encode_document(model, TEXTS)
    np.testing.assert_allclose(after, model.encode_document(TEXTS, convert_to_numpy=True), atol=1e-6)
    assert not np.allclose(before, after)
    assert store.misses == 6


def test_kind_and_prompt_are_part_of_the_key(model, tmp_path: Path) -> None:
    store = DocumentEmbeddingStore(tmp_path / "store")
    store.embeddings(model, ["x"], lambda texts: np.zeros((len(texts), 3)), kind="document")
    vocabulary = store.embeddings(model, ["x"], lambda texts: np.ones((len(texts), 3)), kind="vocabulary")
    prompted = store.embeddings(model, ["x"], lambda texts: np.full((len(texts), 3), 2.0), prompt="passage: ")
    assert vocabulary[0, 0] == 1.0 and prompted[0, 0] == 2.0


def test_unreadable_shard_is_skipped_and_half_written_files_ignored(model, tmp_path: Path) -> None:
    store = DocumentEmbeddingStore(tmp_path / "store")
    store.encode_document(model, TEXTS[:2])
    folder = tmp_path / "store" / document_encoder_key(model)
    (folder / "shard-broken.npz").write_bytes(b"not a zip file")
    (folder / ".shard-interrupted.tmp").write_bytes(b"partial")
    reopened = DocumentEmbeddingStore(tmp_path / "store")
    reopened.encode_document(model, TEXTS[:2])
    assert reopened.misses == 0


def test_store_refuses_a_file_as_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "a-file"
    path.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        DocumentEmbeddingStore(path)


def test_cache_targets_and_vocabulary_through_the_store_are_exact(model, tmp_path: Path) -> None:
    corpus = {f"d{i}": text for i, text in enumerate(TEXTS[:3])}
    store = DocumentEmbeddingStore(tmp_path / "store")
    direct = StaleEmbeddingCache.build(model, corpus, show_progress_bar=False)
    stored = StaleEmbeddingCache.build(model, corpus, show_progress_bar=False, store=store)
    reread = StaleEmbeddingCache.build(model, corpus, show_progress_bar=False, store=store)
    torch.testing.assert_close(stored.embeddings, direct.embeddings)
    torch.testing.assert_close(reread.embeddings, direct.embeddings)
    assert store.hits == 3 and reread.fingerprint == direct.fingerprint

    targets = alignment_dataset(model, TEXTS[:3], show_progress_bar=False, store=store)["label"]
    np.testing.assert_allclose(np.array(targets), direct.embeddings.numpy(), atol=1e-6)

    tokens = ["cell", "protein", "", "yeast"]
    plain = distill_token_embeddings(model, tokens, show_progress_bar=False)
    twice = [distill_token_embeddings(model, tokens, show_progress_bar=False, store=store) for _ in range(2)]
    torch.testing.assert_close(twice[0], plain)
    torch.testing.assert_close(twice[1], plain)


def test_evaluation_through_the_store_scores_the_same(model, tiny_beir_dir: Path, tmp_path: Path) -> None:
    data = load_beir(tiny_beir_dir, "test")
    plain = evaluate_retrieval(model, data, show_progress_bar=False)
    store = DocumentEmbeddingStore(tmp_path / "store")
    first = evaluate_retrieval(model, data, show_progress_bar=False, document_store=store)
    assert store.misses == len(set(data.corpus.values())) and store.hits == 0
    reopened = DocumentEmbeddingStore(tmp_path / "store")
    second = evaluate_retrieval(model, data, show_progress_bar=False, document_store=reopened)
    assert reopened.misses == 0 and reopened.hits == len(data.corpus), "the second evaluation encodes no document"
    for key in ("ndcg_at_10", "recall_at_100", "mrr_at_10"):
        assert first[key] == pytest.approx(plain[key]) and second[key] == pytest.approx(plain[key])
    assert "encode_document" not in vars(model), "the model is left as it was"
    with torch.no_grad():
        for parameter in get_route(model, "document").parameters():
            parameter.mul_(0.5)
    evaluate_retrieval(model, data, show_progress_bar=False, document_store=reopened)
    assert reopened.misses == len(set(data.corpus.values())), "a changed document route is encoded afresh"
