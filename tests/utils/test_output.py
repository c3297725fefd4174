"""Output folders: st-daft writes only into a new or empty folder or one it marked as its own, and ``overwrite``
removes only what its marker lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from st_daft.utils.output import (
    MARKER_FILE,
    OutputError,
    OutputFolder,
    claim_output,
    claim_output_file,
    file_identity,
    identity_differences,
    write_output_file,
)


def _write(folder: OutputFolder, *names: str, planned: tuple[str, ...] = ()) -> None:
    with folder.writing(planned=planned) as path:
        for name in names:
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(name)


def test_a_new_or_empty_folder_is_claimed_and_marked(tmp_path: Path) -> None:
    new = claim_output(tmp_path / "new" / "deeper", "export", ["export", "m", "new"])
    assert not new.path.exists(), "claiming writes nothing"
    _write(new, "modules.json", "0_StaticEmbedding/model.safetensors")
    marker = json.loads((new.path / MARKER_FILE).read_text())
    assert marker["command"] == "export" and marker["arguments"] == ["export", "m", "new"]
    assert marker["entries"] == ["0_StaticEmbedding", "modules.json"] and marker["complete"] is True
    assert marker["st_daft"]

    (tmp_path / "empty").mkdir()
    _write(claim_output(tmp_path / "empty", "soup"), "modules.json")
    assert json.loads((tmp_path / "empty" / MARKER_FILE).read_text())["entries"] == ["modules.json"]


def test_a_folder_with_someone_elses_files_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    (folder / "stage-plans").mkdir(parents=True)
    (folder / "README.md").write_text("my notes")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=r"mine is not empty and st-daft did not write it \(it holds README.md"):
            claim_output(folder, "train", overwrite=overwrite)
    dataset = tmp_path / "data"
    (dataset / "qrels").mkdir(parents=True)
    (dataset / "corpus.jsonl").write_text("{}")
    with pytest.raises(OutputError, match=r"holds a dataset \(corpus.jsonl, qrels\)"):
        claim_output(dataset, "train", overwrite=True)
    assert (folder / "README.md").read_text() == "my notes" and (folder / "stage-plans").is_dir()


def test_overwrite_removes_only_what_the_marker_lists(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    _write(claim_output(folder, "train"), "README.md", "stage-1-align/checkpoint-2/x", "daft_summary.json")
    (folder / "stage-plans").mkdir()  # the user's, put there afterwards
    (folder / "notes.txt").write_text("mine")

    with pytest.raises(OutputError) as refused:
        claim_output(folder, "train")
    message = str(refused.value)
    assert "earlier `st-daft train` output (stage-1-align/checkpoint-2, daft_summary.json)" in message
    assert "--resume" in message and "--overwrite" in message

    again = claim_output(folder, "train", overwrite=True)
    (folder / "stage-1-align" / "checkpoint-2" / "x").write_text("still the earlier run's")
    _write(again, "README.md")
    assert sorted(entry.name for entry in folder.iterdir()) == [MARKER_FILE, "README.md", "notes.txt", "stage-plans"]
    assert (folder / "notes.txt").read_text() == "mine"
    assert json.loads((folder / MARKER_FILE).read_text())["entries"] == ["README.md"]


def test_planned_entries_are_listed_before_they_are_written_and_a_failure_lists_what_was(tmp_path: Path) -> None:
    folder = claim_output(tmp_path / "run", "train")
    with pytest.raises(KeyboardInterrupt):
        with folder.writing(planned=("stage-1-align",)):
            assert json.loads(folder.marker.read_text())["entries"] == ["stage-1-align"]
            (folder.path / "stage-1-align").mkdir()
            (folder.path / "corpus-cache").mkdir()
            raise KeyboardInterrupt
    marker = json.loads(folder.marker.read_text())
    assert marker["entries"] == ["corpus-cache", "stage-1-align"] and marker["complete"] is False


def test_remove_takes_only_listed_entries(tmp_path: Path) -> None:
    folder = claim_output(tmp_path / "run", "train")
    _write(folder, "stage-1-align/checkpoint-2/x", "modules.json")
    (folder.path / "stage-plans").mkdir()
    marked = OutputFolder.of(folder.path)
    assert marked is not None and marked.command == "train"
    assert marked.remove(["stage-1-align", "stage-plans", "stage-2-finetune"]) == ["stage-1-align"]
    assert (folder.path / "stage-plans").is_dir() and not (folder.path / "stage-1-align").exists()
    assert json.loads(folder.marker.read_text())["entries"] == ["modules.json"]
    assert OutputFolder.of(tmp_path) is None


def test_resume_and_overwrite_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="--resume and --overwrite together"):
        claim_output(tmp_path / "run", "train", resume=True, overwrite=True)


def test_an_output_that_is_holds_or_lies_inside_what_is_read_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    for output, where in ((model, "is"), (model / "sub" / "export", "is inside"), (tmp_path, "holds")):
        with pytest.raises(OutputError, match=f"{where} the model exported"):
            claim_output(output, "export", option="OUTPUT", reads=[("the model exported", model)])


def test_paths_that_cannot_be_made_are_named(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        claim_output(file, "train")
    with pytest.raises(OutputError, match=f"{file} is a file, so nothing can be made in it"):
        claim_output(file / "run", "train")


def test_an_unreadable_marker_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / MARKER_FILE).write_text('{"entries": [')
    with pytest.raises(OutputError, match=r"its marker .st-daft.json is unreadable"):
        claim_output(folder, "train", overwrite=True)


def test_resume_compares_what_was_trained(tmp_path: Path) -> None:
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"_id": "a", "text": "x"}\n')
    identity = {"seed": 0, "--data corpus.jsonl": file_identity(data), "align max_steps": 300}
    first = claim_output(tmp_path / "run", "train")
    first.check_resume(identity)
    _write(first, "modules.json")

    resumed = claim_output(tmp_path / "run", "train", resume=True)
    assert resumed.resuming and resumed.check_resume(dict(identity)) == []

    data.write_text('{"_id": "a", "text": "y"}\n')
    changed = {**identity, "--data corpus.jsonl": file_identity(data), "align max_steps": 600}
    with pytest.raises(OutputError) as refused:
        claim_output(tmp_path / "run", "train", resume=True).check_resume(changed)
    message = str(refused.value)
    assert "align max_steps 300 before, 600 now" in message
    assert "--data corpus.jsonl" in message and "has other content than the earlier run's" in message
    assert "--resume-anyway" in message
    anyway = claim_output(tmp_path / "run", "train", resume=True)
    assert len(anyway.check_resume(changed, anyway=True)) == 2


def test_identity_of_a_large_file_is_sampled(tmp_path: Path, monkeypatch) -> None:
    import st_daft.utils.output

    file = tmp_path / "big.bin"
    file.write_bytes(bytes(range(256)) * 64)
    monkeypatch.setattr(st_daft.utils.output, "FULL_HASH_BYTES", 1024)
    monkeypatch.setattr(st_daft.utils.output, "_SAMPLE_BYTES", 64)
    sampled = file_identity(file)
    assert sampled["sampled"] and sampled["size"] == 256 * 64
    content = bytearray(file.read_bytes())
    content[-1] ^= 1  # the last sample covers the end of the file
    file.write_bytes(bytes(content))
    assert identity_differences({"x": sampled}, {"x": file_identity(file)})


def test_one_file_outputs(tmp_path: Path) -> None:
    scores = tmp_path / "scores.json"
    marker = claim_output_file(scores, "evaluate", ["evaluate", "m"])
    write_output_file(scores, {"mean": {}}, marker)
    assert json.loads(scores.read_text())["st_daft"]["command"] == "evaluate"
    with pytest.raises(OutputError, match="earlier `st-daft evaluate` output; pass --overwrite"):
        claim_output_file(scores, "evaluate")
    claim_output_file(scores, "evaluate", overwrite=True)

    theirs = tmp_path / "theirs.json"
    theirs.write_text('{"mine": 1}')
    with pytest.raises(OutputError, match="st-daft did not write it"):
        claim_output_file(theirs, "evaluate", overwrite=True)
    with pytest.raises(OutputError, match="is a folder"):
        claim_output_file(tmp_path, "evaluate")
