"""Every Python snippet of README.md and of the Python API guide runs, on the tiny offline model and data (paths and
budgets substituted)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments

from st_daft import build_asymmetric_model, export_route, export_static_model, load_beir

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PYTHON_GUIDE = ROOT / "docs" / "guide" / "python.md"


def _snippets(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


SNIPPETS = _snippets(README) + _snippets(PYTHON_GUIDE)


def _substitute(code: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in code, f"README snippet changed: {old!r} not found; update tests/project/test_readme.py"
        code = code.replace(old, new)
    return code


@pytest.fixture()
def inputs(tiny_document_model_dir: Path, tiny_beir_dir: Path) -> dict:
    data = load_beir(tiny_beir_dir, "train")
    return {
        "model": build_asymmetric_model(str(tiny_document_model_dir), "static"),
        "corpus": data.corpus,
        "positives": {data.queries[q]: list(judged) for q, judged in data.qrels.items()},
        "pairs": Dataset.from_list(list(data.training_pairs())),
        "validation_texts": list(data.queries.values()) + list(data.corpus.values()),
    }


def _snippet(word: str) -> str:
    found = [snippet for snippet in SNIPPETS if word in snippet]
    assert len(found) == 1, f"expected one README snippet with {word!r}, found {len(found)}"
    return found[0]


def test_readme_has_the_snippets_this_file_runs() -> None:
    assert len(_snippets(README)) == 1
    assert len(_snippets(PYTHON_GUIDE)) == 4


def test_readme_is_short_and_starts_with_install_and_code() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= 10_000
    first_lines = "\n".join(text.splitlines()[:80])
    assert "pip install st-daft" in first_lines
    assert "```python\nfrom sentence_transformers import SentenceTransformer\nfrom st_daft import" in first_lines


def test_quickstart_snippet(tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path) -> None:
    code = _substitute(
        _snippet("model.encode_query(["),
        {
            'build_asymmetric_model(query_encoder="static")': (
                f'build_asymmetric_model({str(tiny_document_model_dir)!r}, "static")'
            ),
            '"../shared/data/scifact"': repr(str(tiny_beir_dir)),
            '"runs/static"': repr(str(tmp_path / "static")),
            '"train"), ': (
                '"train"), config=DAFTConfig(stages=[VocabularyStage(), CorpusStage(max_steps=4, eval_steps=2, '
                "batch_size=8), AlignStage(max_steps=4, eval_steps=2, batch_size=4)], validation_fraction=0.2, "
                "num_validation_texts=16), output_dir="
            ),
        },
    )
    namespace: dict = {}
    exec("from st_daft import AlignStage, CorpusStage, DAFTConfig, VocabularyStage\n" + code, namespace)
    assert (tmp_path / "static" / "daft_summary.json").is_file()
    assert namespace["queries"].shape == (1, 32) and namespace["documents"].shape == (1, 32)
    assert namespace["model"].similarity(namespace["queries"], namespace["documents"]).shape == (1, 1)


def test_mining_snippet(inputs: dict, tmp_path: Path) -> None:
    inputs["args"] = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "mined"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        router_mapping={"query": "query", "positive": "document"},
        report_to="none",
        save_strategy="no",
    )
    exec(_snippet("NegativeMiner(cache"), inputs)
    assert inputs["trainer"].state.global_step == 3
    assert inputs["miner"].statistics.counts["negatives"] > 0


def test_python_snippet(tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path) -> None:
    code = _substitute(
        _snippet("train_daft(model"),
        {
            'build_asymmetric_model(query_encoder="static")': (
                f'build_asymmetric_model({str(tiny_document_model_dir)!r}, "static")'
            ),
            '"../shared/data/scifact"': repr(str(tiny_beir_dir)),
            '"runs/static"': repr(str(tmp_path / "static")),
            'DAFTConfig(stages=["vocabulary", "corpus", "align"])': (
                "DAFTConfig(stages=[VocabularyStage(), CorpusStage(max_steps=4, eval_steps=2, batch_size=8), "
                "AlignStage(max_steps=4, eval_steps=2, batch_size=4)], "
                "validation_fraction=0.2, num_validation_texts=16)"
            ),
        },
    )
    namespace: dict = {}
    exec("from st_daft import AlignStage, CorpusStage, VocabularyStage\n" + code, namespace)
    assert [stage.name for stage in namespace["summary"].stages] == ["vocabulary", "corpus", "align"]
    assert SentenceTransformer(str(tmp_path / "static")).encode_query(["how do cells divide"]).shape[1] == 32


def test_own_trainer_snippet(inputs: dict, tmp_path: Path) -> None:
    code = _substitute(
        _snippet("CollapseStopCallback(evaluator_name"),
        {
            'output_dir="out"': f"output_dir={str(tmp_path / 'out')!r}, max_steps=4",
            "eval_steps=50, save_steps=50": "eval_steps=2, save_steps=2",
        },
    )
    exec(code, inputs)
    assert inputs["trainer"].state.global_step == 4
    assert inputs["trainer"].state.best_metric is not None  # the KL criterion was evaluated and the best kept


def test_serving_snippet(inputs: dict, tmp_path: Path) -> None:
    export_route(inputs["model"], "query", output_path=str(tmp_path / "static-queries"))
    export_static_model(inputs["model"], str(tmp_path / "static-m2v"))
    code = _substitute(
        _snippet("StaticModel.from_pretrained"),
        {
            '"runs/static-m2v"': repr(str(tmp_path / "static-m2v")),
            '"runs/static-queries"': repr(str(tmp_path / "static-queries")),
        },
    )
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["vectors"].shape == (1, 32)
