"""docs/errors.md against the code: every message in its tables is produced here from the input its row names and
compared with the row (``...`` in the table stands for any text), and every row has its input here, so the table
cannot drift from what st-daft prints."""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from st_daft.data import DataError, load_beir, load_corpus, load_queries_file
from tests.conftest import write_beir

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
CODE_SPAN = re.compile(r"``\s?(.+?)\s?``|`([^`]+)`")


def _rows() -> dict[str, list[str]]:
    """input -> the messages of its row (``a`` / ``b``: two messages), for every table row of docs/errors.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if not line.startswith("| ") or len(cells) != 2 or cells == ["input", "message"]:
            continue
        rows[cells[0]] = [double or single for double, single in CODE_SPAN.findall(cells[1])]
    return rows


ROWS = _rows()


# ---------------------------------------------------------------------------------------------------- inputs


def _beir(**changes: bytes | None) -> Path:
    """A small BEIR folder ``data`` (in the working folder), each named file replaced (None: removed)."""
    folder = write_beir(
        Path("data"),
        {"d1": ("", "first text"), "d2": ("", "second text")},
        {"q1": "a query", "q2": "another query"},
        {"test": {"q1": {"d1": 1}, "q2": {"d2": 1}}},
    )
    for name, content in changes.items():
        path = folder / name.replace("__", "/").replace("_jsonl", ".jsonl").replace("_tsv", ".tsv")
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content)
    return folder


def _raised(call: Callable[[], object]) -> str:
    try:
        call()
    except (DataError, ValueError, ImportError) as error:
        return str(error)
    raise AssertionError("nothing was raised")


def _beir_error(split: str = "test", empty_texts: str = "error", **changes: bytes | None) -> str:
    folder = _beir(**changes)
    return _raised(lambda: load_beir(folder, split, empty_texts=empty_texts))


def _rows_of(*rows: dict) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def _logged(caplog, call: Callable[[], object]) -> str:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        call()
    return caplog.records[-1].getMessage()


def _cli_error(capsys, argv: list[str]) -> str:
    from st_daft.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exited:
        code = exited.code
    assert code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    return line.split(": error: ", 1)[1]


def _train_error(capsys, *options: str) -> str:
    """The refusal of ``st-daft train`` over a valid labelled folder with these options."""
    write_beir(Path("data"), {"d1": ("", "a b"), "d2": ("", "c d")}, {"q1": "a"}, {"train": {"q1": {"d1": 1}}})
    return _cli_error(capsys, ["train", "--data", "data", "--output", "out", *options])


def _recipe_file(edit: Callable[[dict], object]) -> str:
    from st_daft import DAFTConfig

    recipe = DAFTConfig(stages=["corpus", "align"]).to_dict()
    edit(recipe)
    Path("recipe.json").write_text(json.dumps(recipe))
    return "recipe.json"


def _earlier_run() -> Path:
    from st_daft.utils.output import claim_output

    folder = claim_output("out", "train")
    with folder.writing():
        (folder.path / "stage-1-align" / "checkpoint-2").mkdir(parents=True)
        (folder.path / "daft_summary.json").write_text("{}")
    return folder.path


def _resume_differences() -> str:
    from st_daft.utils.output import claim_output, file_identity

    corpus = _beir() / "corpus.jsonl"
    identity = {"--data corpus.jsonl": file_identity(corpus), "align stage max_steps": 4}
    first = claim_output("out", "train")
    first.check_resume(identity)
    with first.writing():
        pass
    corpus.write_text(corpus.read_text() + json.dumps({"_id": "d3", "text": "more"}) + "\n")
    again = {"--data corpus.jsonl": file_identity(corpus), "align stage max_steps": 6}
    return _raised(lambda: claim_output("out", "train", resume=True).check_resume(again))


def _cut_weights(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": torch.zeros(64)}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    return path


def _truncated_checkpoint() -> str:
    from st_daft.training.stages import check_checkpoint

    checkpoint = Path("out/stage-1-align/checkpoint-4")
    _cut_weights(checkpoint / "model.safetensors")
    return _raised(lambda: check_checkpoint(checkpoint))


def _cut_model() -> str:
    from st_daft.models.asymmetric import check_model_source

    Path("model").mkdir()
    Path("model/modules.json").write_text("[]")
    _cut_weights(Path("model/0_StaticEmbedding/model.safetensors"))
    return _raised(lambda: check_model_source("model"))


def _index(fingerprint: str = "route-a", bm25: bool = False) -> Path:
    """A two-document index folder ``index`` written by hand (as ``st-daft index`` lays it out, without a model)."""
    import faiss
    from model2vec import StaticModel
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = Path("index")
    (folder / "documents").mkdir(parents=True)
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "cells": 1, "divide": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    vectors = np.eye(3, 4, dtype=np.float32)
    config = {"st_daft_document_fingerprint": fingerprint}
    StaticModel(vectors, tokenizer, config=config, normalize=True).save_pretrained(str(folder / "query"))
    embeddings = np.eye(2, 4, dtype=np.float16)
    np.save(folder / "documents" / "embeddings.npy", embeddings)
    (folder / "ids.json").write_text('["d1", "d2"]')
    index = faiss.IndexFlatIP(4)
    index.add(embeddings.astype(np.float32))
    faiss.write_index(index, str(folder / "faiss.index"))
    files = {"query_route": "query", "embeddings": "documents/embeddings.npy", "ids": "ids.json"}
    manifest = {"format": "st-daft-search-index", "format_version": 1, "documents": 2, "dimension": 4}
    manifest.update(document_fingerprint="route-a", files={**files, "faiss": "faiss.index", "bm25": None})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _index_error(change: Callable[[Path], object]) -> str:
    from st_daft.serving import Searcher

    folder = _index()
    change(folder)
    return _raised(lambda: Searcher.load(folder).search("cells divide", fuse_bm25=True))


def _other_route(folder: Path) -> None:
    import shutil

    shutil.move(str(folder), "first")
    _index(fingerprint="route-b")
    shutil.rmtree(Path("first") / "query")
    shutil.move("index/query", "first/query")
    shutil.rmtree("index")
    shutil.move("first", "index")


def _hub_model_offline(monkeypatch) -> str:
    from st_daft.cli.errors import hub_message

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    error = OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    return hub_message(error, [("--document-encoder", "org/model")])


def _interrupted() -> str:
    from st_daft.cli.errors import interrupted_message

    checkpoint = Path("out/stage-1-align/checkpoint-2")
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    return interrupted_message(argparse.Namespace(command="train", output="out"))


def _zero_vector_warning() -> str:
    from st_daft.evaluation.collapse import warn_zero_query_vectors

    vectors = np.ones((300, 4), dtype=np.float32)
    vectors[0] = 0
    texts = ["\u200b", *(f"query {i}" for i in range(299))]
    with pytest.warns(UserWarning) as caught:
        warn_zero_query_vectors(vectors, inputs=[{"text": texts}])
    return str(caught[0].message)


def _no_bm25(monkeypatch, capsys, option: str) -> str:
    monkeypatch.setitem(sys.modules, "bm25s", None)
    _beir()
    return _cli_error(capsys, ["evaluate", "model", "--data", "data", option])


def _claim(*args, **kwargs) -> str:
    from st_daft.utils.output import claim_output

    return _raised(lambda: claim_output(*args, **kwargs))


def _users_folder(dataset: bool = False) -> str:
    if dataset:
        write_beir(Path("out"), {"d1": ("", "x")}, {"q1": "y"}, {"test": {"q1": {"d1": 1}}})
    else:
        (Path("out") / "stage-plans").mkdir(parents=True)
        Path("out/README.md").write_text("mine")
    return _claim("out", "train", overwrite=True)


def _evaluate_over_a_users_file() -> str:
    from st_daft.utils.output import claim_output_file

    Path("scores.json").write_text('{"mine": 1}')
    return _raised(lambda: claim_output_file("scores.json", "evaluate"))


def _model_source(source: str, option: str = "") -> str:
    from st_daft.models.asymmetric import check_model_source

    return _raised(lambda: check_model_source(source, option))


#: docs/errors.md's input -> what produces its message(s), in the working folder (a fresh temporary one)
PRODUCE: dict[str, Callable[..., list[str]]] = {
    "`corpus.jsonl` missing": lambda **_: [_beir_error(corpus_jsonl=None)],
    "`corpus.jsonl.gz` instead of `corpus.jsonl`": lambda **_: [
        (_beir(corpus_jsonl=None), Path("data/corpus.jsonl.gz").write_bytes(b""), _raised(lambda: load_beir("data")))[2]
    ],
    "a compressed or binary file named `corpus.jsonl`": lambda **_: [_beir_error(corpus_jsonl=gzip.compress(b"{}"))],
    "`--split dev` without `qrels/dev.tsv`": lambda **_: [_beir_error(split="dev")],
    "`--data` a file": lambda **_: [(_beir(), _raised(lambda: load_beir("data/corpus.jsonl")))[1]],
    "`--data` a path that does not exist (never sent to the Hub)": lambda **_: [_raised(lambda: load_beir("x/y/z"))],
    "`--data BeIR/scifact` offline": lambda monkeypatch, **_: [
        (
            monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True),
            _raised(lambda: load_beir("BeIR/scifact")),
        )[1]
    ],
    "a folder with only `qrels/`": lambda **_: [_beir_error(corpus_jsonl=None, queries_jsonl=None)],
    "`corpus.jsonl` a folder": lambda **_: [
        (_beir(corpus_jsonl=None), Path("data/corpus.jsonl").mkdir(), _raised(lambda: load_beir("data")))[2]
    ],
    "a line that is not JSON": lambda **_: [_beir_error(corpus_jsonl=b"this is not json\n")],
    "a raw tab inside a string": lambda **_: [_beir_error(corpus_jsonl=b'{"_id": "d1", "text": "a\tb"}\n')],
    "a line that is not an object": lambda **_: [_beir_error(corpus_jsonl=b"[1, 2]\n")],
    "a missing field": lambda **_: [_beir_error(corpus_jsonl=_rows_of({"text": "x"}))],
    "`text` not a string": lambda **_: [_beir_error(corpus_jsonl=_rows_of({"_id": "d1", "text": None}))],
    "`title` not a string": lambda **_: [_beir_error(corpus_jsonl=_rows_of({"_id": "d1", "title": 3, "text": "x"}))],
    "`_id` not a string or integer": lambda **_: [_beir_error(corpus_jsonl=_rows_of({"_id": 1.5, "text": "x"}))],
    "duplicate corpus `_id`": lambda **_: [
        _beir_error(
            corpus_jsonl=_rows_of({"_id": "d1", "text": "x"}, {"_id": "d2", "text": "y"}, {"_id": "d1", "text": "z"})
        )
    ],
    "duplicate query `_id`": lambda **_: [
        _beir_error(
            queries_jsonl=_rows_of({"_id": "q1", "text": "x"}, {"_id": "q2", "text": "y"}, {"_id": "q1", "text": "z"})
        )
    ],
    "empty `queries.jsonl` (or `corpus.jsonl`)": lambda **_: [_beir_error(queries_jsonl=b"")],
    "qrels with only a header": lambda **_: [_beir_error(qrels__test_tsv=b"query-id\tcorpus-id\tscore\n")],
    "qrels separated by spaces": lambda **_: [_beir_error(qrels__test_tsv=b"query-id\tcorpus-id\tscore\nq1 d1 1\n")],
    "qrels with 4 columns (TREC)": lambda **_: [_beir_error(qrels__test_tsv=b"q1\tQ0\td1\t1\n")],
    "a score that is not a number": lambda **_: [_beir_error(qrels__test_tsv=b"q1\td1\tyes\n")],
    "the same pair judged twice, differently": lambda **_: [_beir_error(qrels__test_tsv=b"q1\td1\t1\nq1\td1\t0\n")],
    "qrels name an unknown query": lambda **_: [_beir_error(qrels__test_tsv=b"q7\td1\t1\n")],
    "qrels name an unknown document": lambda **_: [_beir_error(qrels__test_tsv=b"q1\td9\t1\n")],
    "empty document, training": lambda **_: [
        _beir_error(corpus_jsonl=_rows_of({"_id": "d1", "text": "x"}, {"_id": "d2", "text": " "}))
    ],
    "empty document, evaluation (warning)": lambda caplog, **_: [
        (
            _beir(corpus_jsonl=_rows_of({"_id": "d1", "text": "x"}, {"_id": "d2", "text": ""})),
            _logged(caplog, lambda: load_beir("data", empty_texts="warn")),
        )[1]
    ],
    "empty judged query, training": lambda **_: [
        _beir_error(queries_jsonl=_rows_of({"_id": "q1", "text": "x"}, {"_id": "q2", "text": ""}))
    ],
    "a query the query route maps to the zero vector (no known token, e.g. only a zero-width space), evaluation "
    "(warning)": lambda **_: [_zero_vector_warning()],
    "a query with no relevant document (warning)": lambda caplog, **_: [
        (_beir(qrels__test_tsv=b"q1\td1\t1\nq2\td2\t0\n"), _logged(caplog, lambda: load_beir("data")))[1]
    ],
    "no relevant document at all, training": lambda **_: [_beir_error(qrels__test_tsv=b"q1\td1\t0\n")],
    "`--baseline bm25` without the extra": lambda monkeypatch, capsys, **_: [
        _no_bm25(monkeypatch, capsys, "--baseline=bm25")
    ],
    "`--fuse-bm25` without the extra": lambda monkeypatch, capsys, **_: [_no_bm25(monkeypatch, capsys, "--fuse-bm25")],
    "`--fusion-weight -1` (or `inf`)": lambda capsys, **_: [
        _cli_error(capsys, ["evaluate", "model", "--data", "data", "--fuse-bm25", "--fusion-weight", "-1"])
    ],
    "`--fusion-weight` without `--fuse-bm25`": lambda capsys, **_: [
        _cli_error(capsys, ["evaluate", "model", "--data", "data", "--fusion-weight", "0.2"])
    ],
    "`HybridSearch(model, weight=nan)`": lambda **_: [
        _raised(lambda: __import__("st_daft.evaluation.hybrid", fromlist=["x"]).HybridSearch(None, weight=float("nan")))
    ],
    # a corpus alone and a query log
    "empty file": lambda **_: [
        (Path("c.jsonl").write_text(""), _raised(lambda: load_corpus("c.jsonl")))[1],
        (Path("log.txt").write_text(""), _raised(lambda: load_queries_file("log.txt")))[1],
    ],
    "a folder without `corpus.jsonl`": lambda **_: [
        (Path("folder").mkdir(), _raised(lambda: load_corpus("folder")))[1]
    ],
    "a path that does not exist": lambda **_: [_raised(lambda: load_corpus("c.jsonl"))],
    "no text field": lambda **_: [
        (Path("c.jsonl").write_bytes(_rows_of({"_id": "a", "contents": "x"})), _raised(lambda: load_corpus("c.jsonl")))[
            1
        ]
    ],
    "a line neither an object nor a string": lambda **_: [
        (Path("log.jsonl").write_text("[1]\n"), _raised(lambda: load_queries_file("log.jsonl")))[1]
    ],
    "duplicate id": lambda **_: [
        (
            Path("c.jsonl").write_bytes(_rows_of({"id": "a", "text": "x"}, {"id": "a", "text": "y"})),
            _raised(lambda: load_corpus("c.jsonl")),
        )[1]
    ],
    "empty document (warning)": lambda caplog, **_: [
        (
            Path("c.jsonl").write_bytes(_rows_of({"id": "a", "text": "x"}, {"id": "b", "text": ""})),
            _logged(caplog, lambda: load_corpus("c.jsonl")),
        )[1]
    ],
    # recipes and stage settings
    "`--set` a field the stage does not have": lambda capsys, **_: [_train_error(capsys, "--set", "align.max_stepz=3")],
    "`--set` a value of the wrong type": lambda capsys, **_: [_train_error(capsys, "--set", "align.max_steps=three")],
    "`--set` a stage the run does not train": lambda capsys, **_: [_train_error(capsys, "--set", "finetune.scale=30")],
    "`--set` without `=`": lambda capsys, **_: [_train_error(capsys, "--set", "align")],
    "`--recipe` a file with an unknown field": lambda capsys, **_: [
        _train_error(capsys, "--recipe", _recipe_file(lambda recipe: recipe["stages"][1].update(max_stepz=3)))
    ],
    "`--recipe` a file that is not JSON": lambda capsys, **_: [
        (Path("recipe.json").write_text("{"), _train_error(capsys, "--recipe", "recipe.json"))[1]
    ],
    # output folders, resumed runs, devices, models
    "`--output` a folder with a user's files (also with `--overwrite`)": lambda **_: [_users_folder()],
    "`--output` a folder that holds a dataset": lambda **_: [_users_folder(dataset=True)],
    "`--output` an earlier run, without `--resume` or `--overwrite`": lambda **_: [
        (_earlier_run(), _claim("out", "train"))[1]
    ],
    "`--resume` and `--overwrite`": lambda **_: [_claim("out", "train", resume=True, overwrite=True)],
    "`--resume` with other data or settings": lambda **_: [_resume_differences()],
    "`--resume-anyway` without `--resume`": lambda capsys, **_: [
        (_beir(), _cli_error(capsys, ["train", "--data", "data", "--output", "out", "--resume-anyway"]))[1]
    ],
    "`--resume` from a checkpoint whose weights are cut short": lambda **_: [_truncated_checkpoint()],
    "`--output` under a file": lambda **_: [(Path("plain").write_text("x"), _claim("plain/run", "train"))[1]],
    "`--output` where nothing can be written": lambda **_: [_claim("/proc/run", "train")],
    "`st-daft export MODEL MODEL/query`": lambda **_: [
        (
            Path("model").mkdir(),
            _claim("model/query", "export", option="OUTPUT", reads=[("the model exported", "model")]),
        )[1]
    ],
    "`evaluate --output` a file st-daft did not write": lambda **_: [_evaluate_over_a_users_file()],
    "a model path that does not exist (never sent to the Hub)": lambda **_: [
        (Path("out").mkdir(), _model_source("out/does-not-exist"))[1]
    ],
    "a model folder that holds no model": lambda **_: [(_beir(), _model_source("data", "--document-encoder"))[1]],
    "a model whose weights are cut short": lambda **_: [_cut_model()],
    "a Hub model id offline": lambda monkeypatch, **_: [_hub_model_offline(monkeypatch)],
    "`--query-encoder tiny:0,32`": lambda **_: [
        _raised(lambda: __import__("st_daft.models.asymmetric", fromlist=["x"]).check_query_encoder("tiny:0,32"))
    ],
    "`--device cuda` without a CUDA device": lambda **_: [
        _raised(lambda: __import__("st_daft.training.stages", fromlist=["x"]).check_device("cuda"))
    ],
    "`--precision fp16` on the CPU": lambda **_: [
        _raised(lambda: __import__("st_daft.training.stages", fromlist=["x"]).check_device("cpu", "fp16"))
    ],
    "Ctrl-C during `st-daft train` (exit status 130)": lambda **_: [_interrupted()],
    "`Searcher.load` of a folder without `manifest.json`": lambda **_: [
        _index_error(lambda folder: (folder / "manifest.json").unlink())
    ],
    "an index whose `documents/embeddings.npy` is cut short": lambda **_: [
        _index_error(lambda folder: (folder / "documents/embeddings.npy").write_bytes(b"\x93NUMPY"))
    ],
    "an index whose query route was exported beside another document route": lambda **_: [_index_error(_other_route)],
    "`search(..., fuse_bm25=True)` on an index built without `--bm25`": lambda **_: [_index_error(lambda _: None)],
}


def _pattern(message: str) -> re.Pattern:
    return re.compile(".*?".join(re.escape(part) for part in message.split("...")), re.DOTALL)


def test_every_row_has_its_input_here_and_every_input_a_row() -> None:
    assert len(ROWS) >= 60
    assert sorted(set(ROWS) - set(PRODUCE)) == [], "rows of docs/errors.md without an input in this test"
    assert sorted(set(PRODUCE) - set(ROWS)) == [], "inputs here without a row in docs/errors.md"


@pytest.mark.parametrize("row", sorted(PRODUCE))
def test_the_table_says_what_the_code_prints(row: str, tmp_path: Path, monkeypatch, caplog, capsys) -> None:
    if row == "`--device cuda` without a CUDA device":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
    monkeypatch.chdir(tmp_path)
    produced = PRODUCE[row](monkeypatch=monkeypatch, caplog=caplog, capsys=capsys)
    documented = ROWS[row]
    assert len(produced) == len(documented), (documented, produced)
    for message, table in zip(produced, documented):
        assert _pattern(table).fullmatch(message), f"\ntable: {table}\ncode:  {message}"
