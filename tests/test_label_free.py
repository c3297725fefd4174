"""Label-free alignment: corpus texts, the regression + contrastive loss, vocabulary distillation, recipe stages."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from st_daft import (
    QUERY_ROUTE,
    AlignStage,
    CorpusStage,
    DAFTConfig,
    DocumentEmbeddingStore,
    StaleEmbeddingCache,
    VocabularyStage,
    build_asymmetric_model,
    get_route,
    interpolate_route,
    load_beir,
    route_weights,
    train_daft,
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
from st_daft.label_free.vocabulary import (
    add_words_to_static_route,
    corpus_token_weights,
    corpus_words,
    distill_token_embeddings,
    initialize_static_route,
    reweight_static_route,
    vocabulary_texts,
)
from st_daft.losses.label_free import LabelFreeAlignmentLoss
from st_daft.training.recipe import remove_checkpoints
from st_daft.training.stages.base import INTERPOLATION_START_FILE

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


def test_recipe_runs_the_label_free_stages(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path, monkeypatch
) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    # The vocabulary stage's pass over the whole corpus is the corpus cache too: nothing encodes it again.
    monkeypatch.setattr(StaleEmbeddingCache, "build", lambda *args, **kwargs: pytest.fail("corpus encoded again"))
    corpus = CorpusStage(
        max_steps=4, batch_size=8, eval_steps=2, warmup_ratio=0.0, logging_steps=1, max_texts=40, document_weight=1
    )
    config = DAFTConfig(
        stages=[
            VocabularyStage(contextual=True),
            corpus,
            AlignStage(max_steps=2, batch_size=4, eval_steps=2, warmup_ratio=0.0),
        ],
        validation_fraction=0.2,
        num_validation_texts=16,
    )
    summary = train_daft(model, load_beir(tiny_beir_dir, "train"), tmp_path / "run", config)
    assert [stage.name for stage in summary.stages] == ["vocabulary", "corpus", "align"]
    assert all("alignment_knn_kl" in stage.final_metrics for stage in summary.stages), "every stage's KL"
    vocabulary = summary.stages[0]
    assert vocabulary.extra["contextual_tokens"] > 0 and vocabulary.extra["contextual_documents"] == 8
    assert "of them from contextual vectors over 8 documents" in vocabulary.describe()
    assert list((tmp_path / "run" / "stage-vocabulary").glob("token-statistics-*.pt")), "kept for --resume"
    corpus_stage = summary.stages[1]
    assert corpus_stage.steps == 4 and 0 < corpus_stage.extra["num_texts"] <= 40
    logged = {key for row in corpus_stage.log_history for key in row}
    assert {"regression", "contrastive", "document", "eval_alignment_knn_kl"} <= logged
    # A stage's time is the whole stage (its targets encoded, its corpus cached), the trainer's a part of it.
    assert 0 < corpus_stage.training_seconds <= corpus_stage.seconds
    assert f"{corpus_stage.training_seconds:.0f} s of them training" in corpus_stage.describe()
    monkeypatch.undo()

    tiny = build_asymmetric_model(str(tiny_document_model_dir), "tiny:1,8")
    config = DAFTConfig(stages=["vocabulary", corpus], validation_fraction=0.2, num_validation_texts=16)
    summary = train_daft(tiny, load_beir(tiny_beir_dir, "train"), tmp_path / "tiny", config)
    assert [stage.name for stage in summary.stages] == ["corpus"], "vocabulary is skipped for tiny routes"


def test_align_stage_keeps_a_weight_space_average_of_its_start_and_end(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path
) -> None:
    data = load_beir(tiny_beir_dir, "train")
    tables, starts, metrics = {}, {}, {}
    for interpolation in (1.0, 0.25, 0.0):
        model = build_asymmetric_model(str(tiny_document_model_dir), "static")
        starts[interpolation] = get_route(model, QUERY_ROUTE)[0].embedding.weight.detach().clone()
        align = AlignStage(max_steps=2, batch_size=4, eval_steps=2, warmup_ratio=0.0, interpolation=interpolation)
        config = DAFTConfig(stages=[align], validation_fraction=0.2, num_validation_texts=16)
        summary = train_daft(model, data, tmp_path / str(interpolation), config)
        assert summary.stages[0].extra["interpolation"] == interpolation
        metrics[interpolation] = summary.stages[0].final_metrics["alignment_knn_kl"]
        tables[interpolation] = get_route(model, QUERY_ROUTE)[0].embedding.weight.detach().clone()
        # What is saved is the average, and it loads in plain sentence-transformers.
        saved = SentenceTransformer(str(tmp_path / str(interpolation)))
        torch.testing.assert_close(get_route(saved, QUERY_ROUTE)[0].embedding.weight, tables[interpolation])
    start = starts[1.0]
    assert torch.equal(starts[0.25], start) and torch.equal(starts[0.0], start), "the same start each time"
    assert not torch.allclose(tables[1.0], start), "alignment moved the route"
    assert torch.equal(tables[0.0], start), "interpolation 0 keeps the start"
    torch.testing.assert_close(tables[0.25], 0.25 * tables[1.0] + 0.75 * start)
    # The statistics reported are the kept route's: the same checkpoint was kept each time, the routes differ.
    assert len({metrics[1.0], metrics[0.25], metrics[0.0]}) == 3


def test_a_resumed_run_keeps_the_same_average(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path, caplog
) -> None:
    data = load_beir(tiny_beir_dir, "train")
    budget = {"batch_size": 4, "eval_steps": 2, "warmup_ratio": 0.0}

    def config() -> DAFTConfig:
        # The corpus stage stops early (no KL decrease counts): resumed, it trains on to its next evaluation, so the
        # route it hands the align stage is not the one the first run had.
        corpus = CorpusStage(
            max_steps=40, max_texts=40, general_texts=0, kl_patience=1, kl_min_delta=1e6, learning_rate=0.1, **budget
        )
        stages = [VocabularyStage(), corpus, AlignStage(max_steps=4, **budget)]
        # The corpus cache on disk, in float16: a resumed run reads it back.
        return DAFTConfig(
            stages=stages, validation_fraction=0.2, num_validation_texts=16, cache_on_disk=True, cache_dtype="float16"
        )

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    summary = train_daft(model, data, tmp_path / "run", config())
    assert summary.stages[-1].extra["interpolation"] == 0.75, "the default after the corpus stage"
    assert summary.stages[1].steps < 40, "the corpus stage stopped early"
    first = get_route(model, QUERY_ROUTE)[0].embedding.weight.detach().clone()
    # As after a crash past the align stage's last checkpoint: each stage resumes from its own checkpoints, and the
    # start the align stage saved is read back, so the same average is kept.
    assert (tmp_path / "run" / AlignStage.folder / INTERPOLATION_START_FILE).exists()
    (kept,) = (tmp_path / "run" / "corpus-cache").glob("*/embeddings.npy")
    assert np.load(kept, mmap_mode="r").dtype == np.float16, "the vocabulary pass's cache, written to disk"
    again = build_asymmetric_model(str(tiny_document_model_dir), "static")
    with caplog.at_level(logging.INFO, logger="st_daft.embeddings.cache"):
        train_daft(again, data, tmp_path / "run", config(), resume_from_checkpoint=True)
    assert f"documents read back from {kept.parent}" in caplog.text and "(memory-mapped)" not in caplog.text
    torch.testing.assert_close(get_route(again, QUERY_ROUTE)[0].embedding.weight, first, rtol=0, atol=0)
    remove_checkpoints(tmp_path / "run")
    assert not (tmp_path / "run" / "corpus-cache").exists() and (tmp_path / "run" / "modules.json").exists()


def test_interpolate_route_checks_its_start(tiny_document_model_dir: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    start = route_weights(model, QUERY_ROUTE)
    table = get_route(model, QUERY_ROUTE)[0].embedding.weight
    with torch.no_grad():
        table.add_(1.0)
    interpolate_route(model, QUERY_ROUTE, start, 0.5)
    torch.testing.assert_close(table.detach(), start[0]["embedding.weight"] + 0.5)
    with pytest.raises(ValueError, match="the query route has 1 modules, the start weights 2"):
        interpolate_route(model, QUERY_ROUTE, start * 2, 0.5)
    start[0]["embedding.weight"] = start[0]["embedding.weight"][:3]
    with pytest.raises(ValueError, match="has shape .* its start .*not the same route"):
        interpolate_route(model, QUERY_ROUTE, start, 0.5)


def test_corpus_stage_pseudo_query_term_shares_the_align_stages_cache(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path, monkeypatch
) -> None:
    from st_daft.embeddings import cache as cache_module
    from st_daft.losses.label_free import LabelFreeAlignmentLoss

    builds, losses = [], []
    original_build = cache_module.StaleEmbeddingCache.build.__func__
    original_init = LabelFreeAlignmentLoss.__init__

    def counting_build(cls, *args, **kwargs):
        builds.append(1)
        return original_build(cls, *args, **kwargs)

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        losses.append(self)

    monkeypatch.setattr(cache_module.StaleEmbeddingCache, "build", classmethod(counting_build))
    monkeypatch.setattr(LabelFreeAlignmentLoss, "__init__", recording_init)
    data = load_beir(tiny_beir_dir, "train")
    budget = {"max_steps": 1, "batch_size": 8, "eval_steps": 1, "warmup_ratio": 0.0}

    def run(name: str, corpus_stage: CorpusStage, train_data) -> None:
        stages = [corpus_stage] if isinstance(train_data, dict) else [corpus_stage, AlignStage(**budget)]
        config = DAFTConfig(stages=stages, validation_fraction=0.2, num_validation_texts=16)
        model = build_asymmetric_model(str(tiny_document_model_dir), "static")
        train_daft(model, train_data, tmp_path / name, config, titles=data.titles if name == "alone" else None)

    run("on", CorpusStage(max_texts=40, document_weight=1, **budget), data)
    assert len(builds) == 1, "the corpus is embedded once, for both stages"
    assert losses[-1].document_embeddings.shape == (len(data.corpus), 32)
    assert losses[-1].get_config_dict()["document_weight"] == 1
    run("labelled", CorpusStage(max_texts=40, **budget), data)  # default beside labelled queries: off
    # the ranking term (on by default) still scores the corpus: the same cache, embedded once for both stages
    assert losses[-1].get_config_dict()["document_weight"] == 0 and len(builds) == 2
    assert losses[-1].get_config_dict()["ranking_weight"] == 10.0
    run("neither", CorpusStage(max_texts=40, ranking_weight=0, **budget), data)
    assert losses[-1].document_embeddings is None and len(builds) == 3, "only the align stage embeds the corpus"
    run("alone", CorpusStage(max_texts=40, **budget), dict(data.corpus))  # default for a corpus alone: on
    assert losses[-1].document_embeddings is not None
    summary = json.loads((tmp_path / "alone" / "daft_summary.json").read_text())
    assert summary["stages"][0]["extra"]["document_weight"] == 1.0
    with pytest.raises(ValueError, match="document_weight"):
        CorpusStage(document_weight=-1)
    with pytest.raises(ValueError, match="ranking_weight"):
        CorpusStage(ranking_weight=-1)


def test_run_dependent_defaults_resolve_in_one_place(tiny_document_model_dir: Path) -> None:
    from types import SimpleNamespace

    static = build_asymmetric_model(str(tiny_document_model_dir), "static")
    alone = SimpleNamespace(train_data=None, validation_data=None, model=static, run_stages=())
    labelled = SimpleNamespace(train_data=object(), validation_data=object(), model=static, run_stages=())
    assert CorpusStage().resolved(alone).max_steps == 1200
    assert CorpusStage().resolved(labelled).max_steps == 900, "beside labels with the general texts (twice the texts)"
    assert CorpusStage(general_texts=0).resolved(labelled).max_steps == 600
    assert CorpusStage(max_steps=7).resolved(alone).max_steps == 7, "a budget given is kept"
    assert CorpusStage().resolved(alone).document_weight == 1.0
    assert CorpusStage().resolved(labelled).document_weight == 0.0
    assert CorpusStage(document_weight=0.5).resolved(alone).document_weight == 0.5, "a weight given is kept"
    assert VocabularyStage().resolved(alone).contextual is True
    assert VocabularyStage().resolved(labelled).contextual is False
    assert VocabularyStage(contextual=True).resolved(labelled).contextual is True
    assert VocabularyStage().resolved(alone).corpus_words == 20000
    assert VocabularyStage().resolved(labelled).corpus_words == 0
    assert VocabularyStage(corpus_words=5).resolved(labelled).corpus_words == 5, "a count given is kept"
    # A route that cannot take whole-word rows gets none by default, and a count asked for is refused before a step.
    tiny = SimpleNamespace(
        train_data=None, validation_data=None, model=build_asymmetric_model(str(tiny_document_model_dir), "tiny:1,32")
    )
    assert VocabularyStage().resolved(tiny).corpus_words == 0
    # General texts: beside labelled queries for a static route (measured), not for a corpus alone or other routes.
    assert CorpusStage().resolved(labelled).general_texts == 20000
    assert CorpusStage().resolved(alone).general_texts == 0
    tiny_labelled = SimpleNamespace(train_data=object(), validation_data=object(), model=tiny.model, run_stages=())
    assert CorpusStage().resolved(tiny_labelled).general_texts == 0
    assert CorpusStage().resolved(tiny_labelled).max_steps == 600
    assert CorpusStage(general_texts=30).resolved(alone).general_texts == 30, "a count given is kept"
    with pytest.raises(ValueError, match="general_texts must be between 0 and 20000"):
        CorpusStage(general_texts=20001)
    VocabularyStage().resolved(alone).check(alone)
    with pytest.raises(ValueError, match=r"corpus_words \(--corpus-words\) cannot be used: the query route does not"):
        VocabularyStage(corpus_words=5).check(tiny)
    assert AlignStage().resolved(labelled).selection == "validation"
    assert AlignStage().resolved(alone).selection == "kl"
    assert AlignStage(selection="kl").resolved(labelled).selection == "kl"
    # WiSE-FT: a static route after the corpus stage keeps 0.75 of the aligned route (measured); an untrained start
    # (DAFT's own align, finetune) and other routes keep the aligned route.
    assert AlignStage().resolved(labelled).interpolation == 1.0
    labelled.run_stages = tiny_labelled.run_stages = ("vocabulary", "corpus", "align")
    assert AlignStage().resolved(labelled).interpolation == 0.75
    assert AlignStage().resolved(tiny_labelled).interpolation == 1.0
    labelled.run_stages = ("vocabulary", "corpus", "align", "finetune")
    assert AlignStage().resolved(labelled).interpolation == 1.0, "a finetune after it: not measured"
    labelled.run_stages = ("vocabulary", "align")
    assert AlignStage().resolved(labelled).interpolation == 1.0, "no corpus stage before it"
    assert AlignStage(interpolation=0.5).resolved(labelled).interpolation == 0.5, "a weight given is kept"
    with pytest.raises(ValueError, match=r"interpolation \(--align-interpolation\) must be between 0 and 1"):
        AlignStage(interpolation=1.5)
    with pytest.raises(RuntimeError, match="interpolation is left to the run"):
        AlignStage(selection="kl").run(labelled, None)
    # A stage used without resolving says so instead of guessing.
    with pytest.raises(RuntimeError, match="selection is left to the run"):
        AlignStage().selects_by_validation(labelled)
    with pytest.raises(RuntimeError, match="document_weight is left to the run"):
        CorpusStage().run(alone, None)
    with pytest.raises(RuntimeError, match="general_texts is left to the run"):
        CorpusStage(document_weight=1.0).run(alone, None)
    with pytest.raises(RuntimeError, match="corpus_words is left to the run"):
        VocabularyStage(contextual=False).run(alone, None)
    with pytest.raises(RuntimeError, match="max_steps is left to the run"):
        CorpusStage().prepare(SimpleNamespace(output_dir=Path("unused"), validation_data=None))
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        CorpusStage(max_steps=0)


def test_corpus_stage_pseudo_queries_need_no_encoding(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path, monkeypatch, caplog
) -> None:
    from st_daft.training.stages import corpus as stages_module

    encoded, datasets = [], []
    original_dataset = stages_module.alignment_dataset
    original_pseudo = stages_module.pseudo_query_dataset

    def recording_dataset(model, texts, **kwargs):
        encoded.append(list(texts))
        return original_dataset(model, texts, **kwargs)

    def recording_pseudo(examples, ids, embeddings, **kwargs):
        rows = original_pseudo(examples, ids, embeddings, **kwargs)
        datasets.append((examples, ids, embeddings, rows))
        return rows

    monkeypatch.setattr(stages_module, "alignment_dataset", recording_dataset)
    monkeypatch.setattr(stages_module, "pseudo_query_dataset", recording_pseudo)
    data = load_beir(tiny_beir_dir, "train")
    budget = {"max_steps": 1, "batch_size": 8, "eval_steps": 1, "warmup_ratio": 0.0}

    def config() -> DAFTConfig:
        stage = CorpusStage(max_texts=10, pseudo_queries=15, **budget)
        return DAFTConfig(stages=[stage], validation_fraction=0.2, num_validation_texts=16)

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    summary = train_daft(model, dict(data.corpus), tmp_path / "alone", config())
    extra = summary.stages[0].extra
    assert extra["num_texts"] == 10 and len(encoded[-1]) == 10, "only max_texts texts are encoded"
    examples, ids, embeddings, rows = datasets[-1]
    assert extra["num_pseudo_queries"] == len(examples) == len(rows) > 0
    assert not {text for text, _ in examples} & set(encoded[-1]), "the extra texts are other texts"
    text, doc_id = examples[0]
    label = torch.tensor(rows[0]["label"])
    assert label[-1].item() == ids.index(doc_id), "the source document's row"
    assert torch.allclose(label[:-1], embeddings[ids.index(doc_id)].float(), atol=1e-6), "its embedding the target"

    # beside labelled queries the pseudo-query term is off, so the extra texts are not cut (and the user is told)
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    with caplog.at_level("WARNING", logger="st_daft.training.stages"):
        summary = train_daft(model, data, tmp_path / "labelled", config())
    assert summary.stages[0].extra["num_pseudo_queries"] == 0 and "pseudo_queries=15 ignored" in caplog.text
    # more than the corpus can give: the texts there are, and a warning that says how many
    stage = CorpusStage(max_texts=10, pseudo_queries=100_000, **budget)
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    with caplog.at_level("WARNING", logger="st_daft.training.stages"):
        summary = train_daft(model, dict(data.corpus), tmp_path / "more", DAFTConfig(stages=[stage]))
    given = summary.stages[0].extra["num_pseudo_queries"]
    assert 0 < given < 100_000 and f"100000 pseudo-queries asked for, the corpus has {given} texts" in caplog.text
    with pytest.raises(ValueError, match="pseudo_queries"):
        CorpusStage(pseudo_queries=-1)


def test_recipe_reuses_the_document_store(tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path) -> None:
    config = DAFTConfig(
        stages=[
            "vocabulary",
            CorpusStage(max_steps=1, batch_size=8, eval_steps=1, warmup_ratio=0.0, max_texts=40),
            AlignStage(max_steps=1, batch_size=4, eval_steps=1, warmup_ratio=0.0),
        ],
        validation_fraction=0.2,
        num_validation_texts=16,
        document_store=str(tmp_path / "store"),
    )
    data = load_beir(tiny_beir_dir, "train")
    first = build_asymmetric_model(str(tiny_document_model_dir), "static")
    summary = train_daft(first, data, tmp_path / "first", config)
    assert summary.stages[0].extra["contextual"] is False, "beside labelled queries: one-token vectors by default"
    shards = sorted((tmp_path / "store").rglob("shard-*.npz"))
    # Vocabulary vectors are one kind of row; alignment targets and the corpus cache share "document" rows.
    stored_keys = {key.tobytes() for shard in shards for key in np.load(shard)["keys"]}
    assert len(shards) >= 2 and len(stored_keys) > 100
    second = build_asymmetric_model(str(tiny_document_model_dir), "static", seed=1)
    train_daft(second, data, tmp_path / "second", config)
    assert sorted((tmp_path / "store").rglob("shard-*.npz")) == shards, "a second run encodes nothing new"


def test_vocabulary_texts_drop_word_boundary_markers() -> None:
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocabulary = {"[UNK]": 0, "\u2581python": 1, "\u0120string": 2, "##ing": 3, "\u2581": 4, "plain": 5}
    static = StaticEmbedding(Tokenizer(WordLevel(vocabulary, unk_token="[UNK]")), embedding_dim=4)
    assert vocabulary_texts(static) == ["[UNK]", "python", "string", "ing", "\u2581", "plain"]


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


def test_corpus_and_align_stages_sample_a_large_corpus(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path, monkeypatch
) -> None:
    from st_daft.losses.alignment import DAFTAlignmentLoss

    recorded = []
    for loss_class in (LabelFreeAlignmentLoss, DAFTAlignmentLoss):
        original_init = loss_class.__init__

        def recording_init(self, *args, _original=original_init, **kwargs):
            _original(self, *args, **kwargs)
            recorded.append(self)

        monkeypatch.setattr(loss_class, "__init__", recording_init)
    data = load_beir(tiny_beir_dir, "train")
    budget = {"max_steps": 2, "batch_size": 4, "eval_steps": 1, "warmup_ratio": 0.0}
    stages = [
        CorpusStage(
            max_texts=30, pseudo_queries=6, document_weight=1, corpus_sample_size=3, teacher_neighbours=2, **budget
        ),
        AlignStage(corpus_sample_size=3, **budget),
    ]
    config = DAFTConfig(stages=stages, cache_on_disk=True, cache_dtype="float16", num_validation_texts=16)
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    train_daft(model, data, tmp_path / "sampled", config)
    corpus_loss, align_loss = recorded
    assert corpus_loss.corpus_sample_size == 3 and corpus_loss.neighbour_columns == 2
    # the cache is read where it is: the float16 memory map, not a float32 copy on the loss
    assert corpus_loss.document_embeddings is None and corpus_loss.corpus.dtype == torch.float16
    assert align_loss.negative_sample_size == 3
    summary = json.loads((tmp_path / "sampled" / "daft_summary.json").read_text())
    assert summary["stages"][0]["extra"]["corpus_sample_size"] == 3 and summary["stages"][0]["steps"] == 2
    assert summary["config"]["stages"][1]["corpus_sample_size"] == 3
    with pytest.raises(ValueError, match=r"corpus_sample_size \(--corpus-sample-size\)"):
        CorpusStage(corpus_sample_size=-1)
    with pytest.raises(ValueError, match="teacher_neighbours"):
        CorpusStage(teacher_neighbours=-1)


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


def test_vocabulary_stage_idf_weighting_sets_row_norms_to_the_corpus_idf(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path
) -> None:
    data = load_beir(tiny_beir_dir, "train")
    config = DAFTConfig(stages=[VocabularyStage(idf_weighting=True)], validation_fraction=0.2, num_validation_texts=8)
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    summary = train_daft(model, data.corpus, tmp_path / "run", config, titles=data.titles)
    assert summary.stages[0].extra["idf"] is True
    static = get_route(model, "query")[0]
    weights = corpus_token_weights(static, data.corpus.values())
    norms = static.embedding.weight.detach().norm(dim=1)
    used = norms > 0
    ratio = norms[used] / weights[used]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4), "every row's norm is its IDF, scaled"
    vocabulary = static.tokenizer.get_vocab()
    common, rare = (norms[vocabulary[token]].item() for token in ("the", "mitosis"))
    assert common < rare


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
    from sentence_transformers import SentenceTransformer

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


def test_vocabulary_stage_adds_corpus_words(tiny_document_model_dir: Path, tmp_path: Path) -> None:
    corpus = {f"w{i}": text for i, text in enumerate(WORD_DOCUMENTS)} | {f"c{i}": t for i, t in CORPUS.items()}
    config = DAFTConfig(stages=[VocabularyStage(corpus_words=2)], validation_fraction=0.2, num_validation_texts=4)
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    summary = train_daft(model, corpus, tmp_path / "run", config)
    assert summary.stages[0].extra["corpus_words"] == 2
    tokens = get_route(model, "query")[0].tokenizer.encode("light photosynthesis sugar", add_special_tokens=False)
    assert tokens.tokens[:2] == ["light", "photosynthesis"] and tokens.tokens[2] != "sugar"
    with pytest.raises(ValueError, match="corpus_words"):
        VocabularyStage(corpus_words=-1)


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


def test_corpus_stage_lexical_teacher(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path, monkeypatch
) -> None:
    from st_daft.losses.label_free import LabelFreeAlignmentLoss as Loss

    losses = []
    original_init = Loss.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        losses.append(self)

    monkeypatch.setattr(Loss, "__init__", recording_init)
    corpus = dict(load_beir(tiny_beir_dir, "train").corpus)
    budget = {"max_steps": 2, "batch_size": 8, "eval_steps": 1, "warmup_ratio": 0.0}
    stage = CorpusStage(max_texts=20, pseudo_queries=10, lexical_weight=0.3, lexical_top_k=3, **budget)
    config = DAFTConfig(stages=[stage], num_validation_texts=16)
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    train_daft(model, corpus, tmp_path / "lexical", config)
    assert losses[-1].get_config_dict()["lexical_weight"] == 0.3
    summary = json.loads((tmp_path / "lexical" / "daft_summary.json").read_text())
    assert summary["config"]["stages"][0]["lexical_weight"] == 0.3 and summary["stages"][0]["steps"] == 2

    refused = DAFTConfig(stages=[CorpusStage(ranking_weight=0, lexical_weight=0.3, **budget)])
    with pytest.raises(ValueError, match="--corpus-lexical-weight"):
        train_daft(build_asymmetric_model(str(tiny_document_model_dir), "static"), corpus, tmp_path / "no", refused)
    assert not (tmp_path / "no" / "stage-0-corpus").exists(), "refused before any step"
    with pytest.raises(ValueError, match="lexical_top_k"):
        CorpusStage(lexical_top_k=0)


def test_general_texts_ship_with_the_package() -> None:
    from st_daft import general_texts

    texts = general_texts()
    assert len(texts) == 20000 and all(text.strip() == text and text for text in texts)
    assert len(set(texts)) == 19999, "one example sentence belongs to two synsets; the corpus stage drops repeats"
    assert general_texts(5) == texts[:5] and general_texts(0) == []
    assert sum(":" in text for text in texts) > 5000, "definitions ('lemma: definition') and example sentences"
    with pytest.raises(ValueError, match="between 0 and 20000"):
        general_texts(20001)


def test_corpus_stage_adds_general_texts_as_targets(tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path):
    from st_daft import general_texts

    data = load_beir(tiny_beir_dir, "train")
    budget = {"max_steps": 1, "batch_size": 8, "eval_steps": 1, "warmup_ratio": 0.0}
    stage = CorpusStage(max_texts=20, general_texts=6, **budget)
    config = DAFTConfig(stages=[stage], num_validation_texts=16)
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    train_daft(model, dict(data.corpus), tmp_path / "general", config, unlabeled_queries=general_texts(2))
    summary = json.loads((tmp_path / "general" / "daft_summary.json").read_text())
    extra = summary["stages"][0]["extra"]
    assert extra["num_general_texts"] == 6 and extra["num_unlabeled_queries"] == 2
    assert summary["config"]["stages"][0]["general_texts"] == 6
