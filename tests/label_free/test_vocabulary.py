"""st_daft.label_free.vocabulary: a static route's table distilled from the document route, weighted and
extended with corpus words.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from st_daft import (
    VocabularyStage,
    build_asymmetric_model,
    get_route,
)
from st_daft.label_free.vocabulary import (
    add_words_to_static_route,
    corpus_token_weights,
    corpus_words,
    distill_token_embeddings,
    initialize_static_route,
    reweight_static_route,
    vocabulary_texts,
)

CORPUS = {
    "a": "Cells divide by mitosis. The nucleus holds the chromosomes and the genome inside them.",
    "b": "The heart pumps blood. Arteries and veins carry blood to the body and back again.",
}


@pytest.fixture()
def model(tiny_document_model_dir: Path):
    torch.manual_seed(0)
    return build_asymmetric_model(str(tiny_document_model_dir), "tiny:1,16")


def test_vocabulary_initialisation_of_a_static_route(tiny_document_model_dir: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    static = get_route(model, "query")[0]
    texts = vocabulary_texts(static)
    assert len(texts) == static.num_embeddings and "cells" in texts
    info = initialize_static_route(model, zipf_weighting=True, show_progress_bar=False, keep_scale=False)
    assert info["tokens"] == len(texts) and info["fit_cosine"] == pytest.approx(1.0, abs=1e-5)
    index = texts.index("heart")
    distilled = distill_token_embeddings(model, texts, show_progress_bar=False)
    used = torch.tensor([bool(text.strip()) for text in texts])
    expected = distilled[index] - distilled[used].mean(dim=0)  # centred
    row = static.embedding.weight[index].detach()
    assert torch.nn.functional.cosine_similarity(row, expected, dim=0) > 0.9999
    assert row.norm().item() == pytest.approx(np.log1p(index + 1), rel=1e-4)  # Zipf weight log(1 + rank)


def test_vocabulary_initialisation_keeps_the_table_scale(tiny_document_model_dir: Path) -> None:
    rescaled, raw = (build_asymmetric_model(str(tiny_document_model_dir), "static") for _ in range(2))
    old_norm = get_route(rescaled, "query")[0].embedding.weight.detach().norm(dim=1).mean().item()
    initialize_static_route(rescaled, show_progress_bar=False)
    initialize_static_route(raw, show_progress_bar=False, keep_scale=False)
    texts = vocabulary_texts(get_route(raw, "query")[0])
    used = torch.tensor([bool(text.strip()) for text in texts])
    new_norms = get_route(rescaled, "query")[0].embedding.weight.detach().norm(dim=1)
    assert new_norms[used].mean().item() == pytest.approx(old_norm, rel=1e-4)
    queries = ["heart cells divide", "a protein"]
    # Mean pooling and normalisation ignore the global scale: the route computes the same function.
    np.testing.assert_allclose(rescaled.encode_query(queries), raw.encode_query(queries), atol=1e-5)


def test_vocabulary_initialisation_fits_a_projection(tiny_bert_dir: Path, tiny_document_model_dir: Path, tmp_path):
    from model2vec import StaticModel
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_bert_dir / "tokenizer.json"))
    vectors = np.random.default_rng(0).normal(size=(tokenizer.get_vocab_size(), 24)).astype(np.float32)
    StaticModel(vectors, tokenizer).save_pretrained(str(tmp_path / "m2v"))
    model = build_asymmetric_model(str(tiny_document_model_dir), str(tmp_path / "m2v"))
    table_before = get_route(model, "query")[0].embedding.weight.detach().clone()
    texts = vocabulary_texts(get_route(model, "query")[0])
    targets = torch.nn.functional.normalize(distill_token_embeddings(model, texts, show_progress_bar=False), dim=1)

    def fit() -> float:
        with torch.no_grad():
            projected = get_route(model, "query")[1]({"sentence_embedding": table_before.clone()})
        return torch.nn.functional.cosine_similarity(projected["sentence_embedding"], targets).mean().item()

    before = fit()
    info = initialize_static_route(model, center=False, show_progress_bar=False)
    assert torch.equal(get_route(model, "query")[0].embedding.weight, table_before), "the 24-d table is kept"
    assert fit() == pytest.approx(info["fit_cosine"], abs=1e-4) and fit() > before + 0.3


def test_vocabulary_initialisation_needs_a_static_route(model) -> None:
    with pytest.raises(ValueError, match="needs a static query route"):
        initialize_static_route(model, show_progress_bar=False)


def test_vocabulary_texts_drop_word_boundary_markers() -> None:
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocabulary = {"[UNK]": 0, "\u2581python": 1, "\u0120string": 2, "##ing": 3, "\u2581": 4, "plain": 5}
    static = StaticEmbedding(Tokenizer(WordLevel(vocabulary, unk_token="[UNK]")), embedding_dim=4)
    assert vocabulary_texts(static) == ["[UNK]", "python", "string", "ing", "\u2581", "plain"]


def test_corpus_token_weights_give_rare_tokens_larger_norms(tiny_document_model_dir: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    static = get_route(model, "query")[0]
    documents = ["the heart pumps blood", "the cells divide", "the heart and the cells"]
    weights = corpus_token_weights(static, documents)
    vocabulary = static.tokenizer.get_vocab()
    the, heart, pumps = (weights[vocabulary[token]].item() for token in ("the", "heart", "pumps"))
    assert the < heart < pumps  # in 3, 2 and 1 of the 3 documents
    assert pumps == pytest.approx(np.log1p(2.5 / 1.5), rel=1e-5)  # BM25's IDF
    queries = ["heart cells divide", "blood"]
    before_norm = static.embedding.weight.detach().norm(dim=1).mean().item()
    directions = torch.nn.functional.normalize(static.embedding.weight.detach().clone(), dim=1)
    reweight_static_route(model, weights)
    table = static.embedding.weight.detach()
    assert table.norm(dim=1).mean().item() == pytest.approx(before_norm, rel=1e-4), "keeps the table's scale"
    used = directions.norm(dim=1) > 0  # rows that are all zero (padding) stay zero
    ratio = table.norm(dim=1)[used] / weights[used]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4), "norms proportional to the weights"
    assert torch.allclose(torch.nn.functional.normalize(table, dim=1), directions, atol=1e-5), "directions kept"
    assert model.encode_query(queries).shape[0] == 2
    with pytest.raises(ValueError, match="one weight per table row"):
        reweight_static_route(model, weights[:3])


WORD_DOCUMENTS = [
    "Photosynthesis makes sugar in cells",
    "photosynthesis needs light, and sugar feeds cells",
    "light of stars; 123 123 zebra",
    "x-ray light",
]


def test_corpus_words_are_split_words_in_several_documents(tiny_document_model_dir: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    tokenizer = get_route(model, "query")[0].tokenizer
    assert len(tokenizer.encode("photosynthesis", add_special_tokens=False).ids) > 1
    # light: 3 documents; photosynthesis, sugar: 2 (first seen in that order); cells/stars/of: whole tokens already;
    # 123: no letter; zebra, ray: one document each.
    assert corpus_words(tokenizer, WORD_DOCUMENTS, max_words=10) == ["light", "photosynthesis", "sugar"]
    assert corpus_words(tokenizer, WORD_DOCUMENTS, max_words=1) == ["light"]
    assert corpus_words(tokenizer, WORD_DOCUMENTS, max_words=10, min_document_frequency=3) == ["light"]
    assert "zebra" in corpus_words(tokenizer, WORD_DOCUMENTS, max_words=10, min_document_frequency=1)
    with pytest.raises(ValueError, match="min_document_frequency"):
        corpus_words(tokenizer, WORD_DOCUMENTS, max_words=10, min_document_frequency=0)


def test_added_words_get_their_own_rows_and_survive_saving(tiny_document_model_dir: Path, tmp_path: Path) -> None:

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    static = get_route(model, "query")[0]
    rows_before, table_before = static.num_embeddings, static.embedding.weight.detach().clone()
    unchanged = ["how do cells divide", "what pumps blood"]
    before = model.encode_query(unchanged, convert_to_tensor=True)
    assert add_words_to_static_route(model, ["photosynthesis", "sugar", "cells", "sugar"]) == 2  # cells: known
    static = get_route(model, "query")[0]
    assert static.num_embeddings == rows_before + 2 == static.embedding.weight.shape[0]
    assert static.tokenizer.encode("Photosynthesis sugars", add_special_tokens=False).tokens[:2] == [
        "photosynthesis",
        "sugar",
    ]
    assert torch.equal(static.embedding.weight.detach()[:rows_before], table_before), "old rows kept"
    assert torch.allclose(model.encode_query(unchanged, convert_to_tensor=True), before), "old texts unchanged"
    assert get_route(model, "document")[0].tokenizer.tokenize("photosynthesis") != ["photosynthesis"]
    initialize_static_route(model, show_progress_bar=False)
    new_row = static.embedding.weight.detach()[static.tokenizer.token_to_id("photosynthesis")]
    assert new_row.norm() > 0, "the vocabulary initialisation sets the new rows"
    model.save(str(tmp_path / "saved"))
    loaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    texts = ["photosynthesis needs sugar", "cells divide"]
    assert torch.allclose(
        model.encode_query(texts, convert_to_tensor=True), loaded.encode_query(texts, convert_to_tensor=True)
    )


def test_vocabulary_initialisation_from_contextual_vectors(tiny_document_model_dir: Path) -> None:
    from st_daft.label_free.token_statistics import contextual_token_statistics

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    one_token = build_asymmetric_model(str(tiny_document_model_dir), "static")
    documents = list(CORPUS.values())
    statistics = contextual_token_statistics(model, documents, show_progress_bar=False)
    sums, counts = statistics.sums, statistics.counts
    info = initialize_static_route(model, show_progress_bar=False, contextual=statistics, keep_scale=False)
    initialize_static_route(one_token, show_progress_bar=False, keep_scale=False)
    assert info["contextual_tokens"] == (counts > 0).sum().item() > 10
    static = get_route(model, "query")[0]
    texts = vocabulary_texts(static)
    heart, absent = texts.index("heart"), texts.index("stars")
    assert counts[heart] > 0 and counts[absent] == 0
    occurrence_mean = sums.sum(dim=0) / counts.sum()
    expected = sums[heart] / counts[heart] - occurrence_mean  # the centred mean contextual vector
    row = static.embedding.weight[heart].detach()
    assert torch.nn.functional.cosine_similarity(row, expected, dim=0) > 0.9999
    assert row.norm().item() == pytest.approx(np.log1p(heart + 1), rel=1e-4), "Zipf-weighted like the others"
    one_token_table = get_route(one_token, "query")[0].embedding.weight.detach()
    assert torch.equal(static.embedding.weight[absent].detach(), one_token_table[absent]), "absent: one-token vector"


def test_contextual_vectors_need_a_mean_pooled_document_route(tiny_document_model_dir: Path, caplog) -> None:
    from sentence_transformers.sentence_transformer.modules import Pooling

    from st_daft.label_free.token_statistics import contextual_token_statistics, mean_pooled_transformer

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    assert mean_pooled_transformer(model) is None
    get_route(model, "document")[1] = Pooling(32, "cls")
    assert "'cls'" in mean_pooled_transformer(model)
    with pytest.raises(ValueError, match="mean-pooled document route"):
        contextual_token_statistics(model, ["a text"], show_progress_bar=False)
    with pytest.raises(ValueError, match="max_documents"):
        VocabularyStage(max_documents=0)
