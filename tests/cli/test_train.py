"""`st-daft train`: device and precision, option validation, output-folder safety, resume from the last complete
checkpoint, default stages by query encoder, and the corpus-only path."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from sentence_transformers import SentenceTransformer

import st_daft
from st_daft import AlignStage, DAFTConfig, FinetuneStage, build_asymmetric_model, default_stages, load_beir
from st_daft.cli import main
from st_daft.training.recipe import RECIPE_FILE, _context
from st_daft.training.stages.base import last_complete_checkpoint

PACKAGE = Path(st_daft.__file__).parent


def _train(tiny_document_model_dir: Path, data: Path, output: Path, *extra: str) -> int:
    return main(
        [
            "train",
            "--data", str(data),
            "--output", str(output),
            "--document-encoder", str(tiny_document_model_dir),
            "--max-steps", "2",
            "--eval-steps", "1",
            "--align-batch-size", "4",
            "--batch-size", "4",
            *extra,
        ]
    )  # fmt: skip


# ---------------------------------------------------------------------- any device


def test_nothing_in_the_package_forces_a_device() -> None:
    forcing = re.compile(r"use_cpu\s*=\s*True|device\s*=\s*[\"']cpu[\"']|device: str \| None = [\"']cpu[\"']")
    found = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if forcing.search(line)
    ]
    assert not found, found


def test_training_arguments_follow_the_device_and_precision(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path
) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    data = load_beir(tiny_beir_dir, "train")

    def arguments(stage, **shared):
        config = DAFTConfig(stages=[stage], validation_fraction=0.2, num_validation_texts=8, **shared)
        context = _context(model, data, tmp_path, config, None, None, None)
        return stage.resolved(context).prepare(context)

    default = arguments(AlignStage(max_steps=2))
    assert default.use_cpu is False and not default.fp16 and not default.bf16  # transformers picks the device
    assert arguments(FinetuneStage(max_steps=2), device="auto").use_cpu is False
    assert arguments(AlignStage(max_steps=2), device="cpu").use_cpu is True  # only when asked
    assert arguments(AlignStage(max_steps=2), device="cpu", precision="bf16").bf16 is True
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda"):
            arguments(AlignStage(max_steps=2), device="cuda")
    with pytest.raises(ValueError, match="unknown precision"):
        DAFTConfig(precision="fp8")
    with pytest.raises(ValueError, match="unknown device"):
        DAFTConfig(device="tpu")


def test_device_and_precision_flags(tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path, capsys):
    output = tmp_path / "model"
    assert _train(tiny_document_model_dir, tiny_beir_dir, output, "--stages", "align", "--device", "cpu") == 0
    assert (output / "modules.json").is_file()
    # _train's --batch-size is the finetune stage's budget: harmless here, but said.
    assert "warning: --batch-size 4 is the finetune stage's, not trained in this run (stages: align)" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["train", "--data", "x", "--output", "y", "--precision", "fp8"])
    assert "--precision" in capsys.readouterr().err


# ---------------------------------------------------------------------- options named before any step


@pytest.mark.parametrize(
    "option, value",
    [
        ("--max-steps", "-3"),
        ("--max-steps", "0"),
        ("--align-steps", "0"),
        ("--corpus-steps", "-1"),
        ("--finetune-epochs", "0"),
        ("--batch-size", "0"),
        ("--align-batch-size", "-4"),
        ("--query-lr", "0"),
        ("--align-lr", "-1e-3"),
        ("--document-lr", "-2e-5"),
        ("--corpus-lr", "0"),
        ("--corpus-document-weight", "-1"),
        ("--corpus-pseudo-queries", "-5"),
        ("--corpus-ranking-weight", "-2"),
        ("--num-negatives", "0"),
        ("--kl-patience", "-1"),
        ("--eval-steps", "0"),
        ("--stages", "align,pretrain"),
        ("--align-select", "ndcg"),
        ("--align-interpolation", "1.5"),
        ("--cache-dtype", "int8"),
        ("--corpus-sample-size", "-1"),
        ("--corpus-teacher-neighbours", "-1"),
    ],
)
def test_bad_options_are_named(option: str, value: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "o"), option, value])
    assert exited.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "stages, option, message",
    [
        (None, ["--negatives", "corrected"], "--negatives corrected applies to the finetune stage"),
        ("align", ["--mining-index-option", "nlist=8"], "--mining-index-option nlist=8 applies to the finetune"),
        ("align,finetune", ["--corpus-lexical-weight", "1"], "--corpus-lexical-weight 1.0 applies to the corpus"),
        ("corpus,align", ["--idf-weights"], "--idf-weights applies to the vocabulary stage"),
        ("finetune", ["--align-select", "kl", "--idf-weights"], "--idf-weights (and 1 more) applies to the vocab"),
    ],
)
def test_a_setting_for_a_stage_the_run_does_not_train_is_refused(
    stages, option: list[str], message: str, tiny_beir_dir: Path, tmp_path: Path, capsys
) -> None:
    staged = ["--stages", stages] if stages else []  # None: the static default, vocabulary,corpus,align
    argv = ["train", "--data", str(tiny_beir_dir), "--output", str(tmp_path / "o"), *staged, *option]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and "this run does not train" in error and "add the stage with --stages" in error
    assert not (tmp_path / "o").exists(), "refused before anything is written"


def test_stage_settings_are_checked_in_python() -> None:
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        AlignStage(max_steps=-3)
    with pytest.raises(ValueError, match="batch_size"):
        FinetuneStage(batch_size=0)
    with pytest.raises(ValueError, match="learning_rate"):
        AlignStage(learning_rate=0)
    with pytest.raises(ValueError, match="--num-negatives"):
        FinetuneStage(num_negatives=0)
    with pytest.raises(ValueError, match="once each"):
        DAFTConfig(stages=["align", "align"])
    with pytest.raises(ValueError, match="unknown cache_dtype 'bfloat16'"):
        DAFTConfig(cache_dtype="bfloat16")


def test_more_negatives_than_documents_is_refused_before_training(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "model"
    code = _train(
        tiny_document_model_dir, tiny_beir_dir, output, "--stages", "finetune", "--negatives", "stale",
        "--num-negatives", "1000",
    )  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err
    assert "--num-negatives" in error and "1000" in error and "8 documents" in error
    assert not output.exists(), "nothing trained, nothing written"


# ---------------------------------------------------------------------- the output folder


def test_a_previous_run_is_not_replaced_without_a_word(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "model"
    assert _train(tiny_document_model_dir, tiny_beir_dir, output, "--stages", "align", "--keep-checkpoints") == 0
    checkpoints = sorted(output.glob("stage-*/checkpoint-*"))
    assert checkpoints
    capsys.readouterr()

    assert _train(tiny_document_model_dir, tiny_beir_dir, output, "--stages", "align") == 2
    error = capsys.readouterr().err
    assert "--resume" in error and "--overwrite" in error and "checkpoint-" in error
    assert sorted(output.glob("stage-*/checkpoint-*")) == checkpoints, "the previous run's checkpoints are kept"

    # a finished run without checkpoints is a previous run too
    shutil.rmtree(output / "stage-1-align")
    assert _train(tiny_document_model_dir, tiny_beir_dir, output, "--stages", "align") == 2
    assert "daft_summary.json" in capsys.readouterr().err

    assert _train(tiny_document_model_dir, tiny_beir_dir, output, "--stages", "align", "--overwrite") == 0
    assert (output / "modules.json").is_file()


def test_the_data_folder_is_never_the_output(tiny_document_model_dir: Path, tiny_beir_dir: Path, capsys) -> None:
    readme = tiny_beir_dir / "README.md"
    readme.write_text("the dataset's own card")
    for extra in ((), ("--overwrite",)):
        assert _train(tiny_document_model_dir, tiny_beir_dir, tiny_beir_dir, "--stages", "align", *extra) == 2
        assert "--output" in capsys.readouterr().err
    assert readme.read_text() == "the dataset's own card" and not (tiny_beir_dir / "modules.json").exists()
    # nor any folder that holds a dataset's files
    other = tiny_beir_dir.parent / "elsewhere"
    shutil.copytree(tiny_beir_dir, other)
    assert _train(tiny_document_model_dir, tiny_beir_dir, other, "--stages", "align", "--overwrite") == 2
    assert "holds a dataset" in capsys.readouterr().err


def test_resume_skips_a_half_written_checkpoint(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path, caplog
) -> None:
    output = tmp_path / "model"
    assert _train(tiny_document_model_dir, tiny_beir_dir, output, "--stages", "align", "--keep-checkpoints") == 0
    stage_dir = output / "stage-1-align"
    complete = last_complete_checkpoint(stage_dir)
    assert complete and Path(complete).name == "checkpoint-2"
    # a kill while checkpoint-3 was written: some model files are there; optimizer, scheduler and trainer_state.json
    # (written last) are not
    half = stage_dir / "checkpoint-3"
    shutil.copytree(complete, half)
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "modules.json"):
        (half / name).unlink(missing_ok=True)
    with caplog.at_level("WARNING", logger="st_daft.training.stages"):
        assert last_complete_checkpoint(stage_dir) == complete
    assert "checkpoint-3" in caplog.text and "incomplete" in caplog.text
    assert last_complete_checkpoint(tmp_path / "nothing-here") is None

    # --resume continues from checkpoint-2 (budget reached: nothing more to train) instead of failing on the half one
    caplog.clear()
    with caplog.at_level("INFO"):
        code = _train(tiny_document_model_dir, tiny_beir_dir, output, "--stages", "align", "--resume")
    assert code == 0
    assert "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    summary = json.loads((output / "daft_summary.json").read_text())
    assert summary["stages"][0]["steps"] == 2


# ---------------------------------------------------------------------- recipes by query encoder


def test_default_stages_by_query_encoder() -> None:
    assert default_stages("static") == ("vocabulary", "corpus", "align")
    assert default_stages("tiny:2,128") == ("corpus", "align")
    assert default_stages("tokenlearn") == ("align", "finetune")
    assert default_stages("some/model") == ("align", "finetune")
    assert default_stages("symmetric") == ("finetune",)
    assert default_stages("static", labelled=False) == ("vocabulary", "corpus")
    assert default_stages("tiny:1,8", labelled=False) == ("corpus",)
    assert default_stages("some/model", labelled=False) == ("corpus",)


def test_the_chosen_stages_are_printed_and_recorded(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "model"
    assert (
        _train(
            tiny_document_model_dir,
            tiny_beir_dir,
            output,
            "--query-encoder",
            "tiny:1,8",
            "--align-select",
            "kl",
            "--align-interpolation",
            "0.5",
            "--corpus-sample-size",
            "3",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.startswith("stages: corpus,align (default for --query-encoder tiny:1,8)")
    recipe = json.loads((output / RECIPE_FILE).read_text())
    assert [stage["stage"] for stage in recipe["stages"]] == ["corpus", "align"] and recipe["labelled"] is True
    assert recipe["query_encoder"] == "tiny:1,8" and recipe["stages"][1]["selection"] == "kl"
    summary = json.loads((output / "daft_summary.json").read_text())
    assert [stage["name"] for stage in summary["stages"]] == ["corpus", "align"]
    assert [stage["stage"] for stage in summary["config"]["stages"]] == ["corpus", "align"]
    assert summary["config"]["stages"][1]["selection"] == "kl"
    assert summary["config"]["stages"][1]["interpolation"] == 0.5 == summary["stages"][1]["extra"]["interpolation"]
    # one option for both stages' softmax over the corpus; the corpus stage scored a sample of 3 of its 8 documents
    assert [stage["corpus_sample_size"] for stage in summary["config"]["stages"]] == [3, 3]
    assert summary["stages"][0]["extra"]["corpus_sample_size"] == 3
    SentenceTransformer(str(output))  # a plain model
    card = (output / "README.md").read_text()  # the stages among the model card's tags
    assert "- st-daft-stage-corpus" in card and "- st-daft-stage-align" in card


# ---------------------------------------------------------------------- a corpus and no queries


def _corpus_only(tiny_beir_dir: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(tiny_beir_dir / "corpus.jsonl", folder / "corpus.jsonl")
    return folder


def test_a_corpus_alone_runs_the_label_free_stages(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path, capsys
) -> None:
    data = _corpus_only(tiny_beir_dir, tmp_path / "corpus-only")
    queries = tmp_path / "log.txt"
    queries.write_text("how do cells divide\nwhat pumps blood\n\nwhat pumps blood\n")
    output = tmp_path / "model"
    code = _train(
        tiny_document_model_dir,
        data,
        output,
        "--corpus-max-texts",
        "10",
        "--corpus-pseudo-queries",
        "6",
        "--unlabeled-queries",
        str(queries),
        "--corpus-ranking-weight",
        "3",
        "--idf-weights",
        "--corpus-words",
        "7",
        "--min-word-documents",
        "3",
        "--corpus-lexical-weight",
        "0.5",
        "--general-texts",
        "3",
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "corpus only (8 documents and 2 unlabelled queries, no labelled queries): label-free stages" in printed
    assert "stages: vocabulary,corpus (default for --query-encoder static)" in printed
    summary = json.loads((output / "daft_summary.json").read_text())
    assert [stage["name"] for stage in summary["stages"]] == ["vocabulary", "corpus"]
    assert summary["stages"][0]["extra"]["contextual"], "a corpus alone: contextual token vectors by default"
    assert summary["stages"][0]["extra"]["idf"] and summary["config"]["stages"][0]["idf_weighting"]
    assert summary["config"]["stages"][1]["ranking_weight"] == 3.0
    assert summary["config"]["stages"][1]["lexical_weight"] == 0.5
    assert summary["stages"][1]["extra"]["num_general_texts"] == 3
    assert summary["config"]["stages"][0]["min_word_documents"] == 3
    assert summary["config"]["stages"][0]["corpus_words"] == 7  # the fixture's words are all whole tokens already
    assert summary["stages"][0]["extra"]["corpus_words"] == 0
    corpus_stage = summary["stages"][1]
    assert corpus_stage["steps"] == 2 and corpus_stage["extra"]["num_unlabeled_queries"] == 2
    assert corpus_stage["extra"]["num_texts"] == 10 and corpus_stage["extra"]["num_pseudo_queries"] == 6
    recipe = json.loads((output / RECIPE_FILE).read_text())
    assert [stage["stage"] for stage in recipe["stages"]] == ["vocabulary", "corpus"] and recipe["labelled"] is False

    # --corpus FILE: any text file, one document a line; stages that need labels are refused, naming --stages
    text_corpus = tmp_path / "docs.txt"
    rows = [json.loads(line) for line in (tiny_beir_dir / "corpus.jsonl").read_text().splitlines()]
    text_corpus.write_text("\n".join(row["text"] for row in rows) + "\n")
    common = ["train", "--corpus", str(text_corpus), "--document-encoder", str(tiny_document_model_dir)]
    assert main([*common, "--output", str(tmp_path / "refused"), "--stages", "corpus,align"]) == 2
    assert "--stages" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    unfused = ["--corpus-lexical-weight", "0.5", "--corpus-ranking-weight", "0"]
    assert main([*common, "--output", str(tmp_path / "refused"), *unfused]) == 2
    assert (
        "--corpus-lexical-weight" in capsys.readouterr().err and not (tmp_path / "refused" / "stage-0-corpus").exists()
    )
    tiny = ["--query-encoder", "tiny:1,8", "--max-steps", "1", "--eval-steps", "1"]
    code = main([*common, "--output", str(tmp_path / "text"), *tiny])
    assert code == 0
    assert "stages: corpus (default for --query-encoder tiny:1,8)" in capsys.readouterr().out


def test_data_or_corpus_one_of_the_two(tmp_path: Path, capsys) -> None:
    assert main(["train", "--output", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err
