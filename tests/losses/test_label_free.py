"""LabelFreeAlignmentLoss: regression and ranking terms towards the document route's embeddings, sampled corpora,
BM25 in the teacher.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from st_daft import (
    build_asymmetric_model,
    get_route,
)
from st_daft.label_free.corpus_texts import (
    alignment_dataset,
    alignment_texts,
    document_embeddings,
    lexical_ranking_columns,
    with_teacher_neighbours,
)
from st_daft.losses.label_free import LabelFreeAlignmentLoss

CORPUS = {
    "a": "Cells divide by mitosis. The nucleus holds the chromosomes and the genome inside them.",
    "b": "The heart pumps blood. Arteries and veins carry blood to the body and back again.",
}


TITLES = {"a": "cell division basics", "b": "the heart and blood"}


@pytest.fixture()
def model(tiny_document_model_dir: Path):
    torch.manual_seed(0)
    return build_asymmetric_model(str(tiny_document_model_dir), "tiny:1,16")


def test_label_free_loss_trains_only_the_query_route_towards_the_targets(model) -> None:
    texts = alignment_texts(CORPUS, TITLES, max_texts=8)
    targets = torch.tensor(alignment_dataset(model, texts, show_progress_bar=False)["label"])
    loss = LabelFreeAlignmentLoss(model, contrastive_weight=1.0)
    optimizer = torch.optim.Adam(get_route(model, "query").parameters(), lr=1e-2)
    document_before = [p.detach().clone() for p in get_route(model, "document").parameters()]
    model.train()

    def step() -> float:
        features = model.preprocess(texts, task="query")
        features["task"] = "query"
        parts = loss([features], targets)
        assert set(parts) == {"regression", "contrastive"}
        total = sum(parts.values())
        optimizer.zero_grad()
        total.backward()
        assert all(p.grad is None for p in get_route(model, "document").parameters())
        optimizer.step()
        return parts["regression"].item()

    first = step()
    for _ in range(30):
        last = step()
    assert last < first / 2, (first, last)
    assert all(torch.equal(a, b) for a, b in zip(document_before, get_route(model, "document").parameters()))


def test_label_free_loss_checks_its_inputs(model) -> None:
    features = model.preprocess(["a text"], task="query")
    features["task"] = "query"
    loss = LabelFreeAlignmentLoss(model)
    with pytest.raises(ValueError, match="dimension mismatch"):
        loss([features], torch.zeros(1, 7))
    with pytest.raises(ValueError, match="needs the document-route embeddings"):
        loss([features], None)
    with pytest.raises(ValueError, match="regression must be"):
        LabelFreeAlignmentLoss(model, regression="huber")


def _train_query_route(model, loss, texts, labels, term: str, steps: int) -> tuple[float, float]:
    """Adam steps on the query route with ``loss``, whose parts must be exactly the regression and ``term``; the
    value of ``term`` at the first and last step."""
    optimizer = torch.optim.Adam(get_route(model, "query").parameters(), lr=1e-2)
    model.train()
    values = []
    for _ in range(steps):
        parts = loss([model.preprocess(texts, task="query") | {"task": "query"}], labels)
        assert set(parts) == {"regression", term}
        optimizer.zero_grad()
        sum(parts.values()).backward()
        optimizer.step()
        values.append(parts[term].item())
    return values[0], values[-1]


def test_label_free_loss_ranks_each_text_s_source_document_first(model) -> None:
    corpus = {
        "a": "mitosis splits the cell nucleus",
        "b": "the heart pumps blood",
        "c": "python strings are immutable",
        "d": "rivers flow to the sea",
    }
    examples = [(text, doc_id) for doc_id, doc in corpus.items() for text in (doc, " ".join(doc.split()[-2:]))]
    texts = [text for text, _ in examples]
    ids, documents = document_embeddings(model, corpus, show_progress_bar=False)
    rows = [ids.index(doc_id) for _, doc_id in examples]
    labels = torch.tensor(alignment_dataset(model, texts, show_progress_bar=False, document_rows=rows)["label"])
    loss = LabelFreeAlignmentLoss(model, contrastive_weight=0.0, document_embeddings=documents, document_weight=1.0)
    assert loss.get_config_dict()["document_weight"] == 1.0
    first, last = _train_query_route(model, loss, texts, labels, "document", steps=61)
    assert last < first / 2, (first, last)
    scores = model.encode_query(texts, convert_to_tensor=True) @ documents.T.to(model.device)
    assert scores.argmax(dim=1).tolist() == rows

    with pytest.raises(ValueError, match="labels need"):
        loss([model.preprocess(texts, task="query") | {"task": "query"}], labels[:, :-1])
    with pytest.raises(ValueError, match="document_weight"):
        LabelFreeAlignmentLoss(model, document_weight=-1.0)


def test_label_free_loss_ranking_term_distils_the_document_route_s_ranking(model) -> None:
    corpus = {"a": "mitosis splits the cell nucleus", "b": "the heart pumps blood", "c": "rivers flow to the sea"}
    _, documents = document_embeddings(model, corpus, show_progress_bar=False)
    texts = ["the cell nucleus", "blood and the heart", "the sea", "rivers and cells"]
    rows = [0, 1, 2, -1]  # the last text has no source document; the ranking term still applies to it
    labels = torch.tensor(alignment_dataset(model, texts, show_progress_bar=False, document_rows=rows)["label"])
    loss = LabelFreeAlignmentLoss(
        model, contrastive_weight=0.0, document_embeddings=documents, document_weight=0.0, ranking_weight=2.0
    )
    assert loss.get_config_dict()["ranking_weight"] == 2.0
    targets = labels[:, :-1]
    # KL(teacher || student) over the corpus: zero when the query route gives the document route's embeddings.
    assert loss._ranking_term(loss._corpus_scores(targets * 3.0), targets).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn_like(targets)
    unit = torch.nn.functional.normalize
    normed = unit(documents.float(), dim=1)
    p = torch.softmax(20 * unit(targets, dim=1) @ normed.T, dim=1)
    q = torch.log_softmax(20 * unit(student, dim=1) @ normed.T, dim=1)
    expected = (p * (p.log() - q)).sum(dim=1).mean()
    assert loss._ranking_term(loss._corpus_scores(student), targets).item() == pytest.approx(expected.item(), rel=1e-4)

    # document_weight 0 leaves the pseudo-query term out (checked at every step)
    first, last = _train_query_route(model, loss, texts, labels, "ranking", steps=41)
    assert last < first / 2, (first, last)
    with pytest.raises(ValueError, match="needs document_embeddings"):
        LabelFreeAlignmentLoss(model, ranking_weight=1.0)
    with pytest.raises(ValueError, match="ranking_weight must be non-negative"):
        LabelFreeAlignmentLoss(model, document_embeddings=documents, ranking_weight=-1.0)


def test_label_free_loss_on_a_sample_of_the_corpus(model) -> None:
    """Sampled: the same terms as the whole corpus when the sample holds every document, an estimate of them when it
    does not, and the corpus is read where it is (no float32 copy)."""
    corpus = {"a": "mitosis splits the cell nucleus", "b": "the heart pumps blood", "c": "rivers flow to the sea"}
    _, documents = document_embeddings(model, corpus, show_progress_bar=False)
    texts = ["the cell nucleus", "blood and the heart", "the sea", "rivers and cells"]
    dataset = alignment_dataset(model, texts, show_progress_bar=False, document_rows=[0, 1, 2, -1])
    labels = torch.tensor(with_teacher_neighbours(dataset, documents, top_k=2)["label"])
    features = [model.preprocess(texts, task="query") | {"task": "query"}]
    terms = {"document_weight": 1.0, "ranking_weight": 2.0}
    whole = LabelFreeAlignmentLoss(model, document_embeddings=documents, neighbour_columns=2, **terms)
    sampled = LabelFreeAlignmentLoss(
        model, document_embeddings=documents.half(), corpus_sample_size=2, neighbour_columns=2, **terms
    )
    assert whole.corpus_sample_size is None and whole.document_embeddings is not None
    assert sampled.document_embeddings is None and sampled.corpus.dtype == torch.float16
    assert sampled.get_config_dict()["corpus_sample_size"] == 2
    model.eval()
    with torch.no_grad():
        expected, actual = whole(features, labels), sampled(features, labels)
    assert set(actual) == {"regression", "contrastive", "document", "ranking"}
    for name in expected:  # the sources name every document: the sample is the corpus (float16 rounding apart)
        assert actual[name].item() == pytest.approx(expected[name].item(), rel=1e-3, abs=1e-4), name
    with pytest.raises(ValueError, match="neighbour_columns=2"):
        sampled(features, labels[:, :-1])

    # A corpus of 3,003 documents, 600 scored a step: the average of the sampled terms is the whole corpus's.
    torch.manual_seed(0)
    filler = torch.nn.functional.normalize(torch.randn(3000, documents.shape[1]), dim=1)
    large = torch.cat([documents.float().cpu(), filler])
    dataset = alignment_dataset(model, texts, show_progress_bar=False, document_rows=[0, 1, 2, -1])
    labels = torch.tensor(with_teacher_neighbours(dataset, large, top_k=8)["label"])
    whole = LabelFreeAlignmentLoss(model, document_embeddings=large, neighbour_columns=8, **terms)
    sampled = LabelFreeAlignmentLoss(
        model, document_embeddings=large, corpus_sample_size=600, neighbour_columns=8, **terms
    )
    with torch.no_grad():
        expected = whole(features, labels)
        draws = [sampled(features, labels) for _ in range(100)]
    for name in ("document", "ranking"):
        mean = sum(draw[name].item() for draw in draws) / len(draws)
        assert mean == pytest.approx(expected[name].item(), rel=0.05), name


def test_label_free_loss_fuses_bm25_into_the_ranking_teacher(model) -> None:
    corpus = {"a": "mitosis splits the cell nucleus", "b": "the heart pumps blood", "c": "rivers flow to the sea"}
    ids, documents = document_embeddings(model, corpus, show_progress_bar=False)
    texts = ["the cell nucleus", "blood and the heart", "rivers and cells"]
    lexical = lexical_ranking_columns([corpus[doc_id] for doc_id in ids], texts, top_k=2)
    labels = torch.tensor(
        alignment_dataset(model, texts, show_progress_bar=False, document_rows=[0, 1, -1], lexical_columns=lexical)[
            "label"
        ]
    )
    assert labels.shape == (3, 32 + 1 + 4)
    dense = LabelFreeAlignmentLoss(model, document_embeddings=documents, ranking_weight=1.0)
    fused = LabelFreeAlignmentLoss(model, document_embeddings=documents, ranking_weight=1.0, lexical_weight=0.5)
    assert fused.get_config_dict()["lexical_weight"] == 0.5
    targets = labels[:, :32]
    rows, scores = lexical[:, :2], lexical[:, 2:]
    student = torch.randn_like(targets)
    unit = torch.nn.functional.normalize
    teacher_logits = 20 * unit(targets, dim=1) @ unit(documents.float(), dim=1).T
    for text in range(3):
        for row, score in zip(rows[text].tolist(), scores[text].tolist()):
            if row >= 0:
                teacher_logits[text, int(row)] += 20 * 0.5 * score
    p = torch.softmax(teacher_logits, dim=1)
    q = torch.log_softmax(20 * unit(student, dim=1) @ unit(documents.float(), dim=1).T, dim=1)
    expected = (p * (p.log() - q)).sum(dim=1).mean()
    actual = fused._ranking_term(fused._corpus_scores(student), targets, (rows, scores))
    assert actual.item() == pytest.approx(expected.item(), rel=1e-4)
    assert actual.item() != pytest.approx(dense._ranking_term(dense._corpus_scores(student), targets).item())

    parts = fused([model.preprocess(texts, task="query") | {"task": "query"}], labels)
    assert set(parts) == {"regression", "contrastive", "document", "ranking"}
    with pytest.raises(ValueError, match="2k columns"):
        fused([model.preprocess(texts, task="query") | {"task": "query"}], labels[:, :33])
    with pytest.raises(ValueError, match="labels need 33 columns"):
        dense([model.preprocess(texts, task="query") | {"task": "query"}], labels)
    with pytest.raises(ValueError, match="needs ranking_weight > 0"):
        LabelFreeAlignmentLoss(model, document_embeddings=documents, lexical_weight=0.5)
    with pytest.raises(ValueError, match="lexical_columns follow"):
        alignment_dataset(model, texts, show_progress_bar=False, lexical_columns=lexical)
