"""st_daft.label_free.token_statistics: contextual token statistics of the document route over the corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from st_daft import (
    DocumentEmbeddingStore,
    StaleEmbeddingCache,
    build_asymmetric_model,
    get_route,
)
from st_daft.label_free.vocabulary import (
    add_words_to_static_route,
)

CORPUS = {
    "a": "Cells divide by mitosis. The nucleus holds the chromosomes and the genome inside them.",
    "b": "The heart pumps blood. Arteries and veins carry blood to the body and back again.",
}


@pytest.fixture()
def model(tiny_document_model_dir: Path):
    torch.manual_seed(0)
    return build_asymmetric_model(str(tiny_document_model_dir), "tiny:1,16")


WORD_DOCUMENTS = [
    "Photosynthesis makes sugar in cells",
    "photosynthesis needs light, and sugar feeds cells",
    "light of stars; 123 123 zebra",
    "x-ray light",
]


def _direct_token_sums(model, documents: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Contextual output sums computed one document at a time, straight from the document route's Transformer."""
    transformer = get_route(model, "document")[0]
    special = set(transformer.tokenizer.all_special_ids)
    vocabulary_size = transformer.auto_model.get_input_embeddings().num_embeddings
    sums, counts = torch.zeros(vocabulary_size, 32), torch.zeros(vocabulary_size)
    transformer.eval()  # no dropout
    with torch.no_grad():
        for document in documents:
            features = model.preprocess([document], task="document")
            outputs = transformer(features)["token_embeddings"][0]
            for position, token in enumerate(features["input_ids"][0].tolist()):
                if token not in special:
                    sums[token] += outputs[position]
                    counts[token] += 1
    return sums, counts


def test_contextual_token_statistics_sum_each_token_s_outputs(
    tiny_document_model_dir: Path, tmp_path, monkeypatch
) -> None:
    from st_daft.label_free.token_statistics import contextual_token_statistics

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    documents = list(CORPUS.values()) + ["the heart of a cell", "blood"]
    sums, counts, embeddings = contextual_token_statistics(model, documents, batch_size=2, show_progress_bar=False)
    assert embeddings is None, "kept only when asked for"
    expected_sums, expected_counts = _direct_token_sums(model, documents)
    assert torch.equal(counts, expected_counts) and counts.sum() > 20
    torch.testing.assert_close(sums, expected_sums, atol=1e-5, rtol=1e-5)
    cls_id = get_route(model, "document")[0].tokenizer.cls_token_id
    assert counts[cls_id] == 0, "special tokens are left out: the static route has none"

    # Kept in a folder, keyed by the documents: read back, not computed again.
    kept = contextual_token_statistics(model, documents, show_progress_bar=False, cache_folder=tmp_path)
    files = list(tmp_path.glob("token-statistics-*.pt"))
    assert len(files) == 1
    from st_daft.label_free import token_statistics

    monkeypatch.setattr(
        token_statistics, "_contextual_token_sums", lambda *args: pytest.fail("statistics computed again")
    )
    again = contextual_token_statistics(model, documents, show_progress_bar=False, cache_folder=tmp_path)
    monkeypatch.undo()
    assert torch.equal(kept.sums, again.sums) and torch.equal(kept.counts, again.counts)
    contextual_token_statistics(model, documents[:2], show_progress_bar=False, cache_folder=tmp_path)
    assert len(list(tmp_path.glob("token-statistics-*.pt"))) == 2, "other documents, another file"


def test_contextual_pass_yields_the_corpus_cache(tiny_document_model_dir: Path, tmp_path: Path) -> None:
    from st_daft.label_free.token_statistics import contextual_token_statistics

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    corpus = {**CORPUS, "long": "the heart of a cell " * 20, "short": "blood"}
    documents = list(corpus.values())
    sums, counts, embeddings = contextual_token_statistics(
        model, documents, batch_size=2, show_progress_bar=False, return_document_embeddings=True
    )
    plain_sums, plain_counts, _ = contextual_token_statistics(model, documents, show_progress_bar=False)
    assert torch.equal(counts, plain_counts)
    torch.testing.assert_close(sums, plain_sums, atol=1e-5, rtol=1e-5)
    # The same pass's pooled outputs, in the documents' order (batches are length-sorted): encode_document's.
    encoded = model.encode_document(documents, convert_to_tensor=True)
    torch.testing.assert_close(embeddings, encoded, atol=1e-5, rtol=1e-5)

    store = DocumentEmbeddingStore(tmp_path / "store")
    cache = StaleEmbeddingCache.from_embeddings(model, corpus, embeddings, store=store)
    built = StaleEmbeddingCache.build(model, corpus, show_progress_bar=False, store=store)
    assert store.hits == len(corpus), "the store read back every row from_embeddings wrote"
    assert cache.ids == built.ids and cache.keys == built.keys and cache.fingerprint == built.fingerprint
    torch.testing.assert_close(cache.embeddings, built.embeddings)
    assert cache.is_current(model)
    with pytest.raises(ValueError, match="2 embeddings for a corpus of"):
        StaleEmbeddingCache.from_embeddings(model, corpus, embeddings[:2])
    # Read back from a statistics file, the pass did not run: no embeddings.
    contextual_token_statistics(model, documents, show_progress_bar=False, cache_folder=tmp_path)
    kept = contextual_token_statistics(
        model, documents, show_progress_bar=False, cache_folder=tmp_path, return_document_embeddings=True
    )
    assert kept.document_embeddings is None and torch.equal(kept.counts, counts)


def test_contextual_statistics_of_words_mean_their_pieces(tiny_document_model_dir: Path, tmp_path: Path) -> None:
    from st_daft.label_free.token_statistics import contextual_token_statistics, contextual_token_vectors

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    transformer = get_route(model, "document")[0]
    documents = WORD_DOCUMENTS + ["no such word here", "sugar sugar"]
    words = ["photosynthesis", "sugar", "absent"]
    sums, counts, _ = contextual_token_statistics(model, documents, batch_size=3, show_progress_bar=False, words=words)
    vocabulary_size = sums.shape[0] - len(words)
    plain_sums, plain_counts, _ = contextual_token_statistics(model, documents, show_progress_bar=False)
    assert torch.equal(counts[:vocabulary_size], plain_counts), "the token rows do not change"
    torch.testing.assert_close(sums[:vocabulary_size], plain_sums, atol=1e-5, rtol=1e-5)
    # Each occurrence adds the mean of the word's pieces' outputs, computed here one document at a time.
    expected = torch.zeros(len(words), sums.shape[1])
    transformer.eval()
    with torch.no_grad():
        for document in documents:
            features = model.preprocess([document], task="document")
            outputs = transformer(features)["token_embeddings"][0]
            pieces = transformer.tokenizer.convert_ids_to_tokens(features["input_ids"][0].tolist())
            for index, word in enumerate(words):
                word_pieces = transformer.tokenizer.tokenize(word)
                for start in range(len(pieces) - len(word_pieces) + 1):
                    following = pieces[start + len(word_pieces)] if start + len(word_pieces) < len(pieces) else ""
                    if pieces[start : start + len(word_pieces)] == word_pieces and not following.startswith("##"):
                        expected[index] += outputs[start : start + len(word_pieces)].mean(dim=0)
    assert counts[vocabulary_size:].tolist() == [2, 4, 0]
    torch.testing.assert_close(sums[vocabulary_size:], expected, atol=1e-5, rtol=1e-5)
    # The words' rows go to the static rows of those words once they are in the route's vocabulary.
    add_words_to_static_route(model, words[:2])
    vectors, row_counts = contextual_token_vectors(model, sums, counts, words=words)
    row = get_route(model, "query")[0].tokenizer.token_to_id("sugar")
    assert row_counts[row] == 4
    torch.testing.assert_close(vectors[row], expected[1] / 4)
    cached = contextual_token_statistics(model, documents, show_progress_bar=False, cache_folder=tmp_path, words=words)
    contextual_token_statistics(model, documents, show_progress_bar=False, cache_folder=tmp_path)
    assert torch.equal(cached.counts, counts) and len(list(tmp_path.glob("token-statistics-*.pt"))) == 2
