"""Tests for st_daft.embeddings.store: document-route embeddings kept on disk and reused while the document route is
unchanged."""

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
from st_daft.embeddings.store import _read_shard, _VectorsInFile
from st_daft.label_free.vocabulary import distill_token_embeddings

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


def test_rows_across_many_shards_read_back_in_order(model, tmp_path: Path) -> None:
    texts = [f"text number {i}" for i in range(11)]

    def compute(missing: list[str]) -> np.ndarray:
        return np.array([[float(text.split()[-1]), 1.0, -1.0] for text in missing], dtype=np.float32)

    store = DocumentEmbeddingStore(tmp_path / "store", flush_every=3)
    first = store.embeddings(model, texts[:7], compute)
    assert len(list((tmp_path / "store").rglob("shard-*.npz"))) == 3, "7 new rows in shards of at most 3"
    shuffled = [texts[i] for i in (10, 2, 8, 2, 0, 9, 6, 7)]
    again = store.embeddings(model, shuffled, compute)
    assert (store.hits, store.misses, store.repeats) == (4, 11, 0), "a stored text asked twice is read twice"
    np.testing.assert_array_equal(first[:, 0], np.arange(7))
    np.testing.assert_array_equal(again[:, 0], [10, 2, 8, 2, 0, 9, 6, 7])
    reopened = DocumentEmbeddingStore(tmp_path / "store")
    np.testing.assert_array_equal(reopened.embeddings(model, texts[::-1], compute)[:, 0], np.arange(11)[::-1])
    assert reopened.misses == 0


def test_vectors_stay_in_their_shard_files(model, tmp_path: Path) -> None:
    store = DocumentEmbeddingStore(tmp_path / "store")
    expected = store.encode_document(model, TEXTS)
    (shard,) = (tmp_path / "store").rglob("shard-*.npz")
    keys, vectors = _read_shard(shard)
    assert isinstance(vectors, _VectorsInFile), "np.savez writes uncompressed members, which are read in place"
    with np.load(shard) as data:
        np.testing.assert_array_equal(vectors.take(np.arange(3)), data["vectors"])
        np.testing.assert_array_equal(vectors.take(np.array([0, 2])), data["vectors"][[0, 2]])
        assert keys.tobytes() == data["keys"].tobytes()
    # A compressed shard (written by hand or another tool) cannot be mapped: it is read into memory instead.
    with np.load(shard) as data:
        np.savez_compressed(shard, keys=data["keys"], vectors=data["vectors"])
    reopened = DocumentEmbeddingStore(tmp_path / "store")
    np.testing.assert_array_equal(reopened.encode_document(model, TEXTS), expected)
    assert reopened.misses == 0


def test_a_text_two_processes_both_stored_is_read_once(model, tmp_path: Path) -> None:
    def constant(value: float):
        return lambda texts: np.full((len(texts), 3), value, dtype=np.float32)

    # Two stores opened before either wrote: each encodes and stores the same text, as two processes may.
    first, second = DocumentEmbeddingStore(tmp_path / "store"), DocumentEmbeddingStore(tmp_path / "store")
    first.embeddings(model, ["shared", "a"], constant(1.0))
    second.embeddings(model, ["shared", "b"], constant(1.0))
    reopened = DocumentEmbeddingStore(tmp_path / "store")
    vectors = reopened.embeddings(model, ["b", "shared", "a"], constant(2.0))
    assert reopened.misses == 0 and reopened.hits == 3
    np.testing.assert_array_equal(vectors, np.ones((3, 3)))


def test_a_shard_of_the_wrong_shape_is_skipped(model, tmp_path: Path) -> None:
    store = DocumentEmbeddingStore(tmp_path / "store")
    store.encode_document(model, TEXTS[:2])
    folder = tmp_path / "store" / document_encoder_key(model)
    np.savez(folder / "shard-short.npz", keys=np.zeros((3, 16), dtype=np.uint8), vectors=np.zeros((2, 4), np.float32))
    reopened = DocumentEmbeddingStore(tmp_path / "store")
    np.testing.assert_allclose(reopened.encode_document(model, TEXTS[:2]), model.encode_document(TEXTS[:2]), atol=1e-6)
    assert reopened.misses == 0


def test_stored_rows_found_while_shards_are_added_one_by_one(monkeypatch) -> None:
    from st_daft.embeddings.store import KEY_DTYPE, _StoredRows

    monkeypatch.setattr(_StoredRows, "merge_at", 4)  # merge the recent rows into the others often
    rng = np.random.default_rng(0)
    all_keys = np.frombuffer(rng.bytes(16 * 60), dtype=KEY_DTYPE)
    rows = _StoredRows()
    for first in range(0, 60, 5):
        keys = all_keys[first : first + 5]
        rows.add([(keys, np.arange(first, first + 5, dtype=np.float32)[:, None].repeat(2, axis=1))])
        found = rows.find(all_keys)
        assert (found[: first + 5] >= 0).all() and (found[first + 5 :] == -1).all()
        np.testing.assert_array_equal(rows.gather(found[: first + 5])[:, 0], np.arange(first + 5))
    rows.add([(all_keys[:3], np.full((3, 2), -1.0, dtype=np.float32))])  # stored again: the first rows win
    np.testing.assert_array_equal(rows.gather(rows.find(all_keys[:3]))[:, 0], [0, 1, 2])
    # Keys that share their first 8 bytes are told apart by the other 8.
    twins = all_keys[:4].copy()
    twins["high"] = all_keys[0]["high"]
    twins["low"] = [1, 2, 3, 4]
    rows.add([(twins[:3], np.arange(100, 103, dtype=np.float32)[:, None].repeat(2, axis=1))])
    np.testing.assert_array_equal(rows.gather(rows.find(twins[:3]))[:, 0], [100, 101, 102])
    assert rows.find(twins[3:])[0] == -1 and rows.gather(rows.find(all_keys[:1]))[0, 0] == 0


def test_add_stores_rows_computed_elsewhere_without_reading_back(model, tmp_path: Path) -> None:
    store = DocumentEmbeddingStore(tmp_path / "store")
    vectors = model.encode_document(TEXTS, convert_to_numpy=True)
    row_of = {text: row for row, text in enumerate(TEXTS)}
    compute, calls = _counting(lambda missing: vectors[[row_of[text] for text in missing]])
    assert store.add(model, TEXTS, compute) is None
    store.add(model, TEXTS[:2], compute)
    assert calls == [3] and (store.misses, store.hits, store.repeats) == (3, 2, 1)
    reopened = DocumentEmbeddingStore(tmp_path / "store")
    np.testing.assert_array_equal(reopened.encode_document(model, TEXTS), vectors)
    assert reopened.misses == 0


def test_a_shard_cut_short_after_opening_names_the_file(model, tmp_path: Path) -> None:
    store = DocumentEmbeddingStore(tmp_path / "store")
    store.encode_document(model, TEXTS)
    (shard,) = (tmp_path / "store").rglob("shard-*.npz")
    reopened = DocumentEmbeddingStore(tmp_path / "store")
    reopened.encode_document(model, TEXTS[:1])  # opened: the keys are read, the vectors left in the file
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 200)
    with pytest.raises(OSError, match=f"shard {shard} is shorter"):
        reopened.encode_document(model, TEXTS[2:3])


def test_a_document_prompt_is_part_of_the_key(model, tiny_beir_dir: Path, tmp_path: Path) -> None:
    store = DocumentEmbeddingStore(tmp_path / "store")
    plain = store.encode_document(model, TEXTS[:2])
    model.prompts = {"document": "passage: "}  # encode_document now prepends it: other vectors, same route
    prompted = store.encode_document(model, TEXTS[:2])
    np.testing.assert_allclose(prompted, model.encode_document(TEXTS[:2]), atol=1e-6)
    assert store.misses == 4 and not np.allclose(plain, prompted)
    data = load_beir(tiny_beir_dir, "test")
    first = evaluate_retrieval(model, data, show_progress_bar=False, document_store=store)
    assert evaluate_retrieval(model, data, show_progress_bar=False)["ndcg_at_10"] == pytest.approx(first["ndcg_at_10"])
    model.prompts = {}
    misses = store.misses
    evaluate_retrieval(model, data, show_progress_bar=False, document_store=store)
    assert store.misses == misses + len(set(data.corpus.values())), "unprompted vectors are not the prompted ones"
