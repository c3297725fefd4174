"""Nothing a user had is lost, and every failure is one sentence: each writer keeps a user's files, a resume checks
what it resumes, and the failures that once ended in a traceback are one ``st-daft <command>: error:`` line."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from st_daft.cli import main
from st_daft.utils.output import MARKER_FILE
from tests.training_runs import cli, start

ALIGN = "stage-1-align"


def _train(document_model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--output", str(output), "--document-encoder", str(document_model),
        "--stages", "align", "--max-steps", "4", "--eval-steps", "2", "--align-batch-size", "4", "--device", "cpu",
        *extra,
    ]  # fmt: skip


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1, lines
    return lines[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture()
def kept_run(tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path) -> Path:
    """A finished tiny align run that kept its checkpoints."""
    output = tmp_path / "run"
    assert main(_train(tiny_document_model_dir, tiny_beir_dir, output, "--keep-checkpoints")) == 0
    return output


# ---------------------------------------------------------------------------------------------------- data kept


def test_train_into_a_users_folder_is_refused_with_or_without_overwrite(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "mine"
    (folder / "stage-plans").mkdir(parents=True)
    (folder / "stage-plans" / "plan.txt").write_text("week 1")
    (folder / "README.md").write_text("my notes")
    before = _tree(folder)
    for extra in ((), ("--overwrite",)):
        assert main(_train(tiny_document_model_dir, tiny_beir_dir, folder, *extra)) == 2
        assert "is not empty and st-daft did not write it (it holds README.md, stage-plans)" in _error(capsys)
    assert _tree(folder) == before


def test_a_users_files_beside_a_run_survive_its_overwrite_and_checkpoint_removal(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, kept_run: Path, capsys
) -> None:
    (kept_run / "stage-plans").mkdir()
    (kept_run / "stage-plans" / "plan.txt").write_text("week 1")
    (kept_run / "notes.txt").write_text("mine")
    assert sorted(kept_run.glob(f"{ALIGN}/checkpoint-*"))
    capsys.readouterr()
    # --overwrite, without --keep-checkpoints: the earlier run's entries go, its checkpoints afterwards too
    assert main(_train(tiny_document_model_dir, tiny_beir_dir, kept_run, "--overwrite")) == 0
    assert (kept_run / "stage-plans" / "plan.txt").read_text() == "week 1"
    assert (kept_run / "notes.txt").read_text() == "mine"
    assert not (kept_run / ALIGN).exists() and (kept_run / "modules.json").is_file()
    marker = json.loads((kept_run / MARKER_FILE).read_text())
    assert marker["command"] == "train" and marker["complete"] is True
    assert "stage-plans" not in marker["entries"] and "notes.txt" not in marker["entries"]
    assert "README.md" in marker["entries"] and marker["arguments"][0] == "train"


def test_export_never_writes_over_its_source_or_a_users_folder(kept_run: Path, tmp_path: Path, capsys) -> None:
    source = _tree(kept_run)
    for output in (kept_run, kept_run / "query"):
        assert main(["export", str(kept_run), str(output)]) == 2
        assert "the model exported" in _error(capsys)
    assert _tree(kept_run) == source, "the source model is untouched"

    users = tmp_path / "served"
    users.mkdir()
    (users / "README.md").write_text("how we serve")
    for extra in ((), ("--overwrite",)):
        assert main(["export", str(kept_run), str(users), *extra]) == 2
        assert "st-daft did not write it" in _error(capsys)
    assert (users / "README.md").read_text() == "how we serve"

    exported = tmp_path / "query"
    assert main(["export", str(kept_run), str(exported)]) == 0
    assert main(["export", str(kept_run), str(exported)]) == 2
    error = _error(capsys)
    assert "holds an earlier `st-daft export` output (" in error and "; pass --overwrite to replace it" in error
    assert main(["export", str(kept_run), str(exported), "--overwrite"]) == 0


# ---------------------------------------------------------------------------------------------------- resume


def test_resume_checks_what_it_resumes(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, kept_run: Path, tmp_path: Path, capsys
) -> None:
    checkpoints = sorted(path.name for path in kept_run.glob(f"{ALIGN}/checkpoint-*"))
    weights = _tree(kept_run)
    other = tmp_path / "other-data"
    shutil.copytree(tiny_beir_dir, other)
    with (other / "corpus.jsonl").open("a") as handle:
        handle.write(json.dumps({"_id": "d-new", "title": "", "text": "a new document"}) + "\n")
    cases = [
        (["--data", str(other)], ["--data corpus.jsonl", "has other content than the earlier run's"]),
        (["--max-steps", "6"], ["align stage max_steps 4 before, 6 now"]),
        (["--seed", "3"], ["seed 0 before, 3 now"]),
        (["--query-encoder", "tiny:1,16"], ["--query-encoder static before, tiny:1,16 now"]),
        (["--stages", "align,finetune"], ["stages align before, align,finetune now"]),
    ]
    for change, named in cases:
        argv = _train(tiny_document_model_dir, tiny_beir_dir, kept_run, "--resume")
        for option, value in zip(change[::2], change[1::2]):
            at = argv.index(option) if option in argv else None
            argv = [*argv[:at], option, value, *argv[at + 2 :]] if at is not None else [*argv, option, value]
        assert main(argv) == 2, change
        error = _error(capsys)
        assert "--resume:" in error and "was trained by another run" in error and "--resume-anyway" in error
        assert all(name in error for name in named), (named, error)
    assert _tree(kept_run) == weights, "a refused resume changes nothing"

    assert main([*_train(tiny_document_model_dir, tiny_beir_dir, kept_run), "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite together" in _error(capsys)

    # the same run resumes, and the checkpoints it kept stay kept though this command does not say so
    assert main(_train(tiny_document_model_dir, tiny_beir_dir, kept_run, "--resume")) == 0
    assert sorted(path.name for path in kept_run.glob(f"{ALIGN}/checkpoint-*")) == checkpoints

    # --resume-anyway continues with the new settings, warning about each difference
    capsys.readouterr()
    assert (
        main(_train(tiny_document_model_dir, tiny_beir_dir, kept_run, "--resume", "--resume-anyway", "--seed", "3"))
        == 0
    )
    assert "warning: --resume-anyway: seed 0 before, 3 now" in capsys.readouterr().err
    assert json.loads((kept_run / MARKER_FILE).read_text())["run"]["seed"] == 3


def test_a_truncated_checkpoint_is_named_before_anything_trains(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, kept_run: Path, capsys
) -> None:
    last = sorted(kept_run.glob(f"{ALIGN}/checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))[-1]
    weights = (
        last / "model.safetensors" if (last / "model.safetensors").exists() else sorted(last.rglob("*.safetensors"))[0]
    )
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(_train(tiny_document_model_dir, tiny_beir_dir, kept_run, "--resume")) == 2
    error = _error(capsys)
    assert str(weights) in error and "is truncated or not a safetensors file" in error and f"delete {last}" in error


# ---------------------------------------------------------------------------------------------------- one sentence


def _no_model_loads(monkeypatch) -> None:
    import sentence_transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sentence_transformers.SentenceTransformer, "__init__", refuse)


def test_device_and_precision_are_checked_before_any_model_loads(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import torch

    _no_model_loads(monkeypatch)
    if not torch.cuda.is_available():
        assert main(_train(tiny_document_model_dir, tiny_beir_dir, tmp_path / "o", "--device", "cuda")) == 2
        assert "--device cuda: torch sees no CUDA device on this machine; use --device cpu" in _error(capsys)
    assert main(_train(tiny_document_model_dir, tiny_beir_dir, tmp_path / "o", "--precision", "fp16")) == 2
    assert "--precision fp16: float16 mixed precision trains on a GPU" in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_local_paths_that_do_not_exist_are_never_sent_to_the_hub(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    _no_model_loads(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    run = str(tiny_document_model_dir)
    for argv in (
        ["evaluate", "out/does-not-exist", "--data", str(tiny_beir_dir)],
        ["soup", run, "out/does-not-exist", "--output", "out/soup"],
        ["export", "out/does-not-exist", "out/query"],
    ):
        assert main(argv) == 2
        assert "out/does-not-exist does not exist; give a sentence-transformers model folder" in _error(capsys)
    assert not any((tmp_path / "out").iterdir())


def test_misleading_messages_now_name_the_real_problem(tiny_beir_dir: Path, tmp_path: Path, capsys) -> None:
    only_qrels = tmp_path / "only-qrels"
    shutil.copytree(tiny_beir_dir / "qrels", only_qrels / "qrels")
    assert main(["train", "--data", str(only_qrels), "--output", str(tmp_path / "o")]) == 2
    assert "missing files corpus.jsonl, queries.jsonl in" in _error(capsys)

    (tiny_beir_dir / "corpus.jsonl").write_text('{"_id": "d1", "text": "a\tb"}\n')
    assert main(["train", "--data", str(tiny_beir_dir), "--output", str(tmp_path / "o")]) == 2
    assert "corpus.jsonl:1: not valid JSON (Invalid control character at column 25)" in _error(capsys)


def test_ctrl_c_is_one_line_naming_the_last_checkpoint(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path
) -> None:
    output, log = tmp_path / "run", tmp_path / "run.log"
    argv = _train(tiny_document_model_dir, tiny_beir_dir, output, "--max-steps", "400", "--eval-steps", "2")
    process = start(cli(argv), log)
    deadline = time.monotonic() + 300
    while not (output / ALIGN / "checkpoint-2" / "trainer_state.json").exists():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    interrupted = [line for line in text.splitlines() if "st-daft train: interrupted" in line]
    assert len(interrupted) == 1 and f"{output / ALIGN}/checkpoint-" in interrupted[0]
    assert "run the same command with --resume" in interrupted[0]
    assert json.loads((output / MARKER_FILE).read_text())["complete"] is False
