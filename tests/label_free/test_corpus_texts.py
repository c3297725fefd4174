"""st_daft.label_free.corpus_texts: the texts a corpus gives for label-free alignment, their datasets and teachers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from st_daft import (
    build_asymmetric_model,
)
from st_daft.label_free.corpus_texts import (
    alignment_dataset,
    alignment_examples,
    alignment_texts,
    document_embeddings,
    lexical_ranking_columns,
    pseudo_query_dataset,
    with_teacher_neighbours,
)
from st_daft.losses.label_free import LabelFreeAlignmentLoss

CORPUS = {
    "a": "Cells divide by mitosis. The nucleus holds the chromosomes and the genome inside them.",
    "b": "The heart pumps blood. Arteries and veins carry blood to the body and back again.",
}


TITLES = {"a": "cell division basics", "b": "the heart and blood"}


def test_alignment_texts_cover_every_kind_without_duplicates() -> None:
    texts = alignment_texts(CORPUS, TITLES, max_texts=1000, seed=0)
    assert len(texts) == len(set(texts))
    assert "cell division basics" in texts  # titles
    assert "Cells divide by mitosis." in texts  # sentences
    assert any(text.startswith("Cells divide by mitosis. The nucleus") for text in texts)  # passage openings
    assert len(alignment_texts(CORPUS, TITLES, max_texts=3)) == 3
    only_titles = alignment_texts(CORPUS, TITLES, kinds=["titles"])
    assert sorted(only_titles) == sorted(TITLES.values())


def test_alignment_texts_errors() -> None:
    with pytest.raises(ValueError, match="unknown text kind"):
        alignment_texts(CORPUS, kinds=["paragraphs"])
    with pytest.raises(ValueError, match="empty corpus"):
        alignment_texts({})
    with pytest.raises(ValueError, match="yields no alignment texts"):
        alignment_texts(CORPUS, titles=None, kinds=["titles"])


@pytest.fixture()
def model(tiny_document_model_dir: Path):
    torch.manual_seed(0)
    return build_asymmetric_model(str(tiny_document_model_dir), "tiny:1,16")


def test_alignment_dataset_targets_are_document_embeddings(model) -> None:
    texts = alignment_texts(CORPUS, TITLES, max_texts=6)
    dataset = alignment_dataset(model, texts, show_progress_bar=False)
    assert dataset.column_names == ["text", "label"] and len(dataset) == 6
    expected = model.encode_document(texts)
    np.testing.assert_allclose(np.array(dataset["label"]), expected, atol=1e-5)
    with pytest.raises(ValueError, match="no alignment texts"):
        alignment_dataset(model, [])


def test_alignment_examples_name_the_document_each_text_comes_from() -> None:
    examples = alignment_examples(CORPUS, TITLES, max_texts=1000, seed=0)
    assert [text for text, _ in examples] == alignment_texts(CORPUS, TITLES, max_texts=1000, seed=0)
    for text, doc_id in examples:
        assert text in CORPUS[doc_id] or text == TITLES[doc_id], (text, doc_id)
    spans = alignment_examples(CORPUS, kinds=["spans"], span_words=(2, 2), spans_per_document=5, seed=1)
    assert spans and all(len(text.split()) == 2 for text, _ in spans)
    with pytest.raises(ValueError, match="span_words"):
        alignment_examples(CORPUS, kinds=["spans"], span_words=(5, 2))


def test_alignment_dataset_appends_the_source_document_row(model) -> None:
    examples = alignment_examples(CORPUS, TITLES, max_texts=6)
    ids, documents = document_embeddings(model, CORPUS, show_progress_bar=False)
    assert ids == list(CORPUS) and documents.shape == (2, model.get_embedding_dimension())
    np.testing.assert_allclose(documents.numpy(), model.encode_document(list(CORPUS.values())), atol=1e-5)
    rows = [ids.index(doc_id) for _, doc_id in examples]
    dataset = alignment_dataset(model, [text for text, _ in examples], show_progress_bar=False, document_rows=rows)
    labels = np.array(dataset["label"])
    assert labels.shape == (6, documents.shape[1] + 1) and labels[:, -1].tolist() == rows
    with pytest.raises(ValueError, match="document_rows has 1 entries for 6 texts"):
        alignment_dataset(model, [text for text, _ in examples], show_progress_bar=False, document_rows=[0])


def test_teacher_neighbours_are_each_text_s_best_documents(model) -> None:
    corpus = {"a": "mitosis splits the cell nucleus", "b": "the heart pumps blood", "c": "rivers flow to the sea"}
    _, documents = document_embeddings(model, corpus, show_progress_bar=False)
    texts = ["the cell nucleus", "blood and the heart", "the sea"]
    dataset = alignment_dataset(model, texts, show_progress_bar=False, document_rows=[0, 1, -1])
    extended = with_teacher_neighbours(dataset, documents.half(), top_k=2, query_block=2)
    labels = torch.tensor(extended["label"])
    assert extended["text"] == texts and labels.shape == (3, 32 + 1 + 2)
    assert torch.equal(labels[:, :33], torch.tensor(dataset["label"]))
    unit = torch.nn.functional.normalize
    expected = (unit(labels[:, :32], dim=1) @ unit(documents.half().float(), dim=1).T).topk(2).indices
    assert labels[:, 33:].long().tolist() == expected.tolist()
    with pytest.raises(ValueError, match="top_k"):
        with_teacher_neighbours(dataset, documents, top_k=0)


def test_pseudo_query_dataset_targets_the_source_documents(model) -> None:
    examples = alignment_examples(CORPUS, TITLES, max_texts=10)
    ids, documents = document_embeddings(model, CORPUS, show_progress_bar=False)
    dataset = pseudo_query_dataset(examples, ids, documents)
    labels = torch.tensor(dataset["label"])
    rows = [ids.index(doc_id) for _, doc_id in examples]
    assert dataset["text"] == [text for text, _ in examples] and labels[:, -1].tolist() == rows
    assert torch.allclose(labels[:, :-1], documents[rows], atol=1e-6)
    loss = LabelFreeAlignmentLoss(model, document_embeddings=documents)
    features = model.preprocess(dataset["text"], task="query") | {"task": "query"}
    assert set(loss([features], labels)) == {"regression", "contrastive", "document"}
    with pytest.raises(ValueError, match="not among the 2 document ids"):
        pseudo_query_dataset([("a text", "zzz")], ids, documents)


def test_lexical_ranking_columns_rank_documents_by_bm25() -> None:
    documents = ["mitosis splits the cell nucleus", "the heart pumps blood", "blood cells and the heart muscle"]
    texts = ["heart blood", "nucleus of the cell", "the of and", "quantum chromodynamics"]
    columns = lexical_ranking_columns(documents, texts, top_k=4)
    assert columns.shape == (4, 8), "top_k rows, then top_k scores; past the 3 documents: row -1, score 0"
    rows, scores = columns[:, :4], columns[:, 4:]
    assert rows[0, :2].tolist() == [1.0, 2.0] and (rows[0, 2:] == -1).all()  # no heart or blood in document 0
    assert scores[0, 0] == 1.0 and 0 < scores[0, 1] < 1 and (scores[0, 2:] == 0).all()
    assert rows[1, 0] == 0 and scores[1, 0] == 1.0  # "cell" is stemmed: document 2's "cells" matches too
    assert rows[1, 1] == 2 and (rows[1, 2:] == -1).all()
    assert (rows[2:] == -1).all() and (scores[2:] == 0).all(), "stopwords only, or no shared word: no ranking"
    with pytest.raises(ValueError, match="top_k"):
        lexical_ranking_columns(documents, texts, top_k=0)
