"""The label-free stages in a recipe: vocabulary, corpus and align run by train_daft, their caches, store,
averages and resumes.
"""

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
    StaleEmbeddingCache,
    VocabularyStage,
    build_asymmetric_model,
    get_route,
    interpolate_route,
    load_beir,
    route_weights,
    train_daft,
)
from st_daft.label_free.vocabulary import (
    corpus_token_weights,
)
from st_daft.losses.label_free import LabelFreeAlignmentLoss
from st_daft.training.recipe import remove_checkpoints
from st_daft.training.stages.base import INTERPOLATION_START_FILE

CORPUS = {
    "a": "Cells divide by mitosis. The nucleus holds the chromosomes and the genome inside them.",
    "b": "The heart pumps blood. Arteries and veins carry blood to the body and back again.",
}


@pytest.fixture()
def model(tiny_document_model_dir: Path):
    torch.manual_seed(0)
    return build_asymmetric_model(str(tiny_document_model_dir), "tiny:1,16")


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
