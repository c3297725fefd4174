"""A fuzz test of the command line: each command fed generated broken inputs (truncated, empty, wrong-encoding,
byte-order-marked and wrong-type files; paths that do not exist or cannot be written; conflicting flags and bad
values).

Every case must end with exit status 2 (0 where the input is fine), one ``st-daft <command>: error: ...`` line that
names the input, no traceback, and no file outside the case's output folder changed (the tree is hashed before and
after). The cases call ``st_daft.cli.main`` in this process and are built to fail before any model is loaded, so
the whole file takes seconds; a few run the real entry point in a subprocess to show it prints no traceback either.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from st_daft.cli import main
from tests.conftest import QUESTIONS, TOPICS, write_beir

# ---------------------------------------------------------------------------------------------------- the inputs


def _beir(folder: Path, splits: tuple[str, ...] = ("train", "test")) -> Path:
    corpus = {f"d-{topic}": (topic, text) for topic, text in TOPICS.items()}
    queries = {f"q-{topic}": question for topic, question in QUESTIONS.items()}
    qrels = {split: {f"q-{topic}": {f"d-{topic}": 1} for topic in TOPICS} for split in splits}
    return write_beir(folder, corpus, queries, qrels)


def _cut_mid_line(content: bytes) -> bytes:
    lines = content.splitlines(keepends=True)
    middle = len(lines) // 2
    return b"".join(lines[:middle]) + lines[middle][: max(1, len(lines[middle]) // 2)]


def _latin1(content: bytes) -> bytes:
    return content.replace(b"the", b"caf\xe9", 1) if b"the" in content else content.replace(b"q", b"\xe9q", 1)


#: Any file: what a broken copy holds (None: the file is fine, the case then fails on a later, named option).
BYTE_MUTATIONS: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda content: b"",
    "blank-lines": lambda content: b"\n  \n\n",
    "truncated": _cut_mid_line,
    "gzip": gzip.compress,
    "utf-16": lambda content: content.decode().encode("utf-16"),
    "latin-1": _latin1,
    "binary": lambda content: bytes(range(128, 256)) * 4,
    "nul-byte": lambda content: content.replace(b"\n", b"\x00\n", 2),
}
FINE_BYTE_MUTATIONS: dict[str, Callable[[bytes], bytes]] = {
    "bom": lambda content: b"\xef\xbb\xbf" + content,
    "crlf": lambda content: content.replace(b"\n", b"\r\n"),
}


def _tab_in_string(line: str) -> str:
    """A raw tab inside the row's last string value (the text): JSON allows none there."""
    at = line.rindex(" ")
    return line[:at] + "\t" + line[at + 1 :]


def _jsonl_rows(rows: list[object]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


#: A BEIR jsonl file: rows of the wrong shape or type.
JSONL_MUTATIONS: dict[str, Callable[[list[dict]], bytes]] = {
    "arrays": lambda rows: _jsonl_rows([list(row.values()) for row in rows]),
    "numbers": lambda rows: _jsonl_rows(list(range(len(rows)))),
    "nulls": lambda rows: b"null\n" * len(rows),
    "no-id": lambda rows: _jsonl_rows([{k: v for k, v in row.items() if k != "_id"} for row in rows]),
    "no-text": lambda rows: _jsonl_rows([{k: v for k, v in row.items() if k != "text"} for row in rows]),
    "float-id": lambda rows: _jsonl_rows([{**row, "_id": 1.5} for row in rows[:1]] + rows[1:]),
    "bool-id": lambda rows: _jsonl_rows([{**row, "_id": True} for row in rows[:1]] + rows[1:]),
    "null-text": lambda rows: _jsonl_rows([{**row, "text": None} for row in rows[:1]] + rows[1:]),
    "list-text": lambda rows: _jsonl_rows([{**row, "text": ["a"]} for row in rows[:1]] + rows[1:]),
    "duplicate-id": lambda rows: _jsonl_rows(rows + rows[:1]),
    "control-char": lambda rows: _tab_in_string(json.dumps(rows[0])).encode() + b"\n",
    "unclosed": lambda rows: json.dumps(rows[0])[:-1].encode() + b"\n",
    "two-per-line": lambda rows: (json.dumps(rows[0]) + json.dumps(rows[1]) + "\n").encode(),
    "empty-texts": lambda rows: _jsonl_rows([{**row, "text": "  ", "title": ""} for row in rows]),
}
CORPUS_MUTATIONS = {"int-title": lambda rows: _jsonl_rows([{**row, "title": 3} for row in rows])}
QRELS_MUTATIONS: dict[str, bytes] = {
    "header-only": b"query-id\tcorpus-id\tscore\n",
    "spaces": b"query-id corpus-id score\nq-cell d-cell 1\n",
    "four-columns": b"q-cell\tQ0\td-cell\t1\n",
    "two-columns": b"q-cell\td-cell\n",
    "word-score": b"q-cell\td-cell\tyes\n",
    "empty-ids": b"\t\t1\n",
    "unknown-query": b"q-nothing\td-cell\t1\n",
    "unknown-document": b"q-cell\td-nothing\t1\n",
    "judged-twice": b"q-cell\td-cell\t1\nq-cell\td-cell\t0\n",
    "only-zero-scores": b"q-cell\td-cell\t0\n",
}

# ---------------------------------------------------------------------------------------------------- the cases


@dataclass
class Case:
    """A command line to run in ``root`` (a fresh folder): ``build(root)`` makes its inputs and returns argv."""

    id: str
    build: Callable[[Path], list[str]]
    names: tuple[str, ...]  # what the error line must name (any of them)
    code: int = 2
    #: folders under ``root`` the command may write (its output); everything else is hashed before and after
    outputs: tuple[str, ...] = ("out",)


def _replace(path: Path, content: bytes | None) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if content is not None:
        path.write_bytes(content)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _file_mutations(jsonl: bool, corpus: bool) -> dict[str, tuple[Callable[[Path], None], bool]]:
    """name -> (what it does to a file, whether the file is still fine)."""

    def rewrite(transform: Callable[[Path], bytes]) -> Callable[[Path], None]:
        return lambda path: _replace(path, transform(path))

    mutations = {name: (rewrite(lambda path, m=m: m(path.read_bytes())), False) for name, m in BYTE_MUTATIONS.items()}
    mutations |= {
        name: (rewrite(lambda path, m=m: m(path.read_bytes())), True) for name, m in FINE_BYTE_MUTATIONS.items()
    }
    mutations["missing"] = (lambda path: _replace(path, None), False)
    mutations["a-folder"] = (lambda path: (_replace(path, None), path.mkdir()), False)
    mutations["symlink-loop"] = (lambda path: (_replace(path, None), path.symlink_to(path.name)), False)
    if jsonl:
        rows = {**JSONL_MUTATIONS, **(CORPUS_MUTATIONS if corpus else {})}
        mutations |= {name: (rewrite(lambda path, m=m: m(_rows(path))), False) for name, m in rows.items()}
    else:
        mutations |= {name: (rewrite(lambda path, c=c: c), False) for name, c in QRELS_MUTATIONS.items()}
    return mutations


#: What evaluation reads fine that training refuses: empty texts and queries without a relevant document (warnings)
FINE_IN_EVALUATION = {"empty-texts", "only-zero-scores"}


def _data_cases() -> list[Case]:
    """Each file of a BEIR folder broken each way, for ``train --data`` and ``evaluate --data``."""
    cases = []
    for command, split in (("train", "train"), ("evaluate", "test")):
        for relative in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
            mutations = _file_mutations(relative.endswith(".jsonl"), relative == "corpus.jsonl")
            for name, (mutate, fine) in mutations.items():
                if command == "evaluate" and (fine or name in FINE_IN_EVALUATION):
                    continue  # the evaluation would run: fine inputs are the training cases' (they fail later)

                def build(root: Path, command=command, relative=relative, mutate=mutate) -> list[str]:
                    data = _beir(root / "data")
                    mutate(data / relative)
                    if command == "train":
                        # a setting of a stage the run does not train: fine data fails there, before any model loads
                        return ["train", "--data", "data", "--output", "out", "--stages", "align", "--idf-weights"]
                    return ["evaluate", "model", "--data", "data", "--output", "out/scores.json"]

                named = ("--idf-weights",) if fine else (relative.split("/")[-1],)
                cases.append(Case(f"{command}-{relative}-{name}", build, named))
    return cases


#: JSON-line mutations a reader of its own kind reads fine (a corpus alone numbers rows without ids; a query log
#: keeps texts only, once each)
FINE_FOR = {"--corpus": {"no-id"}, "--unlabeled-queries": {"no-id", "float-id", "bool-id", "duplicate-id"}}


def _option_file_cases() -> list[Case]:
    """``--corpus FILE`` and ``--unlabeled-queries FILE`` given broken copies of a BEIR jsonl file."""
    cases = []
    for option, source in (("--corpus", "corpus.jsonl"), ("--unlabeled-queries", "queries.jsonl")):
        name = "c.jsonl" if option == "--corpus" else "log.jsonl"
        mutations: dict[str, tuple[Callable[[Path], bytes], bool]] = {}
        for label, mutation in BYTE_MUTATIONS.items():
            mutations[label] = (lambda path, mutation=mutation: mutation(path.read_bytes()), False)
        for label, mutation in FINE_BYTE_MUTATIONS.items():
            mutations[label] = (lambda path, mutation=mutation: mutation(path.read_bytes()), True)
        for label, mutation in {**JSONL_MUTATIONS, **(CORPUS_MUTATIONS if option == "--corpus" else {})}.items():
            mutations[label] = (lambda path, mutation=mutation: mutation(_rows(path)), label in FINE_FOR[option])
        for label, (mutate, fine) in mutations.items():

            def build(root: Path, mutate=mutate, option=option, source=source, name=name) -> list[str]:
                data = _beir(root / "data")
                _file(root, name, mutate(data / source))
                given = ["--corpus", str(root / name)] if option == "--corpus" else ["--data", str(data), option, name]
                return ["train", *given, "--output", str(root / "out"), "--stages", "align", "--idf-weights"]

            names = ("--idf-weights",) if fine else (name,)
            cases.append(Case(f"train-{option.lstrip('-')}-{label}", build, names))
    return cases


def _file(root: Path, name: str, content: bytes) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _weights(model: Path) -> Path:
    return sorted(model.rglob("model.safetensors"))[0]


#: What a case's folder holds before its command runs (``model`` is always there, a saved tiny static model).
SETUPS: dict[str, Callable[[Path], object]] = {
    "beir": lambda root: _beir(root / "data"),
    "only-qrels": lambda root: [(root / "data" / name).unlink() for name in ("corpus.jsonl", "queries.jsonl")],
    "out-folder": lambda root: (root / "out").mkdir(),
    "out-file": lambda root: _file(root, "out", b"x"),
    "user-out": lambda root: (_file(root, "out/README.md", b"my notes"), (root / "out" / "stage-plans").mkdir()),
    "dataset-out": lambda root: _beir(root / "out"),
    "plain-file": lambda root: _file(root, "plain", b"x"),
    "empty-folder": lambda root: (root / "folder").mkdir(),
    "c.jsonl": lambda root: _file(root, "c.jsonl", (root / "data" / "corpus.jsonl").read_bytes()),
    "gzip-log": lambda root: _file(root, "log.txt", gzip.compress(b"a query\n")),
    "empty-log": lambda root: _file(root, "log.jsonl", b""),
    "users-scores": lambda root: _file(root, "scores.json", b'{"mine": 1}'),
    "m.bin": lambda root: _file(root, "m.bin", b"x"),
    "truncated-weights": lambda root: _weights(root / "model").write_bytes(_weights(root / "model").read_bytes()[:99]),
    "garbage-weights": lambda root: _weights(root / "model").write_bytes(b"not a safetensors file" * 4),
    "cut-modules-json": lambda root: _file(root, "model/modules.json", (root / "model/modules.json").read_bytes()[:20]),
    "model-2": lambda root: shutil.copytree(root / "model", root / "model-2"),
}

#: (id, setups, argv with {r} for the case's folder, what the error names, folders the command may write)
PATH_CASES: list[tuple[str, str, str, tuple[str, ...], tuple[str, ...]]] = [
    ("train-data-missing", "beir", "train --data {r}/nowhere/deeper --output {r}/out", ("nowhere/deeper",), ()),
    ("train-data-local-looking", "beir", "train --data data/not-here --output {r}/out", ("data/not-here",), ()),
    ("train-data-a-file", "beir", "train --data {r}/data/corpus.jsonl --output {r}/out", ("corpus.jsonl",), ()),
    ("train-data-qrels-only", "beir only-qrels", "train --data {r}/data --output {r}/out", ("corpus.jsonl",), ()),
    (
        "train-data-and-corpus",
        "beir c.jsonl",
        "train --data {r}/data --corpus c.jsonl --output {r}/out",
        ("--corpus",),
        (),
    ),
    ("train-neither-data-nor-corpus", "", "train --output {r}/out", ("--data",), ()),
    ("train-split-missing", "beir", "train --data {r}/data --output {r}/out --split dev", ("dev.tsv",), ()),
    (
        "train-dev-split-missing",
        "beir",
        "train --data data --output out --dev-split validation",
        ("validation.tsv",),
        (),
    ),
    ("train-corpus-missing", "", "train --corpus {r}/c.jsonl --output {r}/out", ("c.jsonl",), ()),
    ("train-corpus-folder-without-corpus", "empty-folder", "train --corpus folder --output out", ("folder",), ()),
    ("train-unlabeled-missing", "beir", "train --data data --unlabeled-queries log.txt --output out", ("log.txt",), ()),
    (
        "train-unlabeled-gzip",
        "beir gzip-log",
        "train --data data --unlabeled-queries log.txt --output out",
        ("log.txt",),
        (),
    ),
    (
        "train-unlabeled-empty",
        "beir empty-log",
        "train --data data --unlabeled-queries log.jsonl --output out",
        ("log.jsonl",),
        (),
    ),
    ("train-output-a-file", "beir out-file", "train --data {r}/data --output {r}/out", ("case/out",), ()),
    (
        "train-output-under-a-file",
        "beir plain-file",
        "train --data {r}/data --output {r}/plain/run",
        ("case/plain",),
        (),
    ),
    ("train-output-in-proc", "beir", "train --data {r}/data --output /proc/st-daft-fuzz/run", ("/proc",), ()),
    ("train-output-a-users", "beir user-out", "train --data {r}/data --output {r}/out", ("case/out",), ()),
    (
        "train-output-a-users-overwrite",
        "beir user-out",
        "train --data data --output {r}/out --overwrite",
        ("case/out",),
        (),
    ),
    ("train-output-the-data", "beir", "train --data {r}/data --output {r}/data", ("--output",), ()),
    (
        "train-output-a-dataset",
        "beir dataset-out",
        "train --data {r}/data --output {r}/out --overwrite",
        ("dataset",),
        (),
    ),
    ("train-resume-overwrite", "beir", "train --data data --output out --resume --overwrite", ("--resume",), ("out",)),
    (
        "train-document-encoder-missing",
        "beir",
        "train --data data --output out --document-encoder {r}/doc",
        ("--document-encoder",),
        (),
    ),
    (
        "train-document-encoder-local",
        "beir",
        "train --data data --output out --document-encoder data/minilm",
        ("data/minilm",),
        (),
    ),
    (
        "train-document-encoder-a-file",
        "beir",
        "train --data data --output out --document-encoder data/corpus.jsonl",
        ("--document-encoder",),
        (),
    ),
    (
        "train-document-encoder-no-model",
        "beir",
        "train --data data --output out --document-encoder data/qrels",
        ("--document-encoder",),
        (),
    ),
    (
        "train-document-encoder-cut",
        "beir truncated-weights",
        "train --data data --output out --document-encoder model",
        ("model.safetensors",),
        (),
    ),
    (
        "train-query-encoder-missing",
        "beir",
        "train --data data --output out --query-encoder {r}/nothing",
        ("--query-encoder",),
        (),
    ),
    (
        "train-query-encoder-bad-tiny",
        "beir",
        "train --data data --output out --query-encoder tiny:x",
        ("--query-encoder",),
        (),
    ),
    (
        "train-query-encoder-tiny-zero",
        "beir",
        "train --data data --output out --query-encoder tiny:0,32",
        ("--query-encoder",),
        (),
    ),
    (
        "train-store-under-a-file",
        "beir",
        "train --data data --output out --document-store data/corpus.jsonl/s",
        ("--document-store",),
        (),
    ),
    ("train-device-mps", "beir", "train --data data --output out --device mps", ("--device mps",), ()),
    (
        "train-fp16-on-cpu",
        "beir",
        "train --data data --output out --device cpu --precision fp16",
        ("--precision fp16",),
        (),
    ),
    (
        "train-untrained-stage-setting",
        "beir",
        "train --data data --output out --stages align --negatives stale",
        ("--negatives",),
        (),
    ),
    ("train-push-to-hub-bad-id", "beir", "train --data data --output out --push-to-hub a/b/c!", ("--push-to-hub",), ()),
    (
        "evaluate-model-missing",
        "beir out-folder",
        "evaluate out/does-not-exist --data data",
        ("out/does-not-exist",),
        (),
    ),
    ("evaluate-model-absolute-missing", "beir", "evaluate {r}/m --data {r}/data", ("case/m",), ()),
    ("evaluate-model-a-file", "beir", "evaluate {r}/data/corpus.jsonl --data {r}/data", ("corpus.jsonl",), ()),
    ("evaluate-model-not-a-model", "beir", "evaluate {r}/data --data {r}/data", ("case/data",), ()),
    (
        "evaluate-model-truncated",
        "beir truncated-weights",
        "evaluate {r}/model --data data",
        ("model.safetensors",),
        (),
    ),
    ("evaluate-model-garbage", "beir garbage-weights", "evaluate {r}/model --data data", ("model.safetensors",), ()),
    ("evaluate-model-cut-modules", "beir cut-modules-json", "evaluate {r}/model --data data", ("modules.json",), ()),
    ("evaluate-data-missing", "", "evaluate {r}/model --data {r}/nowhere/deeper", ("nowhere",), ()),
    ("evaluate-second-data-missing", "beir", "evaluate model --data data --data {r}/other", ("other",), ()),
    ("evaluate-split-missing", "beir", "evaluate model --data data --split dev", ("dev.tsv",), ()),
    ("evaluate-output-a-folder", "beir out-folder", "evaluate model --data data --output {r}/out", ("case/out",), ()),
    (
        "evaluate-output-a-users",
        "beir users-scores",
        "evaluate model --data data --output {r}/scores.json --overwrite",
        ("scores.json",),
        (),
    ),
    (
        "evaluate-output-under-a-file",
        "beir",
        "evaluate model --data data --output {r}/data/corpus.jsonl/s.json",
        ("corpus.jsonl",),
        (),
    ),
    (
        "evaluate-fusion-weight-alone",
        "beir",
        "evaluate model --data data --fusion-weight 0.2",
        ("--fusion-weight",),
        (),
    ),
    (
        "evaluate-store-under-a-file",
        "beir",
        "evaluate model --data data --document-store data/corpus.jsonl/s",
        ("--document-store",),
        (),
    ),
    (
        "export-model-missing",
        "out-folder",
        "export out/does-not-exist {r}/exported",
        ("out/does-not-exist",),
        ("exported",),
    ),
    ("export-model-a-file", "m.bin", "export {r}/m.bin {r}/out", ("m.bin",), ("out",)),
    ("export-into-the-model", "", "export {r}/model {r}/model", ("case/model",), ()),
    ("export-inside-the-model", "", "export {r}/model {r}/model/query", ("case/model",), ()),
    ("export-around-the-model", "", "export {r}/model {r}", ("case/model",), ()),
    ("export-into-a-users", "user-out", "export {r}/model {r}/out", ("case/out",), ()),
    ("export-into-a-users-overwrite", "user-out", "export {r}/model {r}/out --overwrite", ("case/out",), ()),
    ("export-dtype-without-model2vec", "", "export {r}/model {r}/out --dtype int8", ("--dtype",), ("out",)),
    ("export-output-under-a-file", "", "export {r}/model {r}/model/modules.json/x", ("modules.json",), ()),
    ("export-truncated-weights", "truncated-weights", "export {r}/model {r}/out", ("model.safetensors",), ("out",)),
    ("export-route-unknown", "", "export {r}/model {r}/out --route passage", ("passage",), ("out",)),
    ("soup-one-run", "", "soup {r}/model --output {r}/out", ("two or more",), ("out",)),
    (
        "soup-run-missing",
        "out-folder",
        "soup {r}/model out/does-not-exist --output {r}/soup",
        ("out/does-not-exist",),
        ("soup",),
    ),
    ("soup-into-a-run", "", "soup {r}/model {r}/model --output {r}/model", ("case/model",), ()),
    ("soup-into-a-users", "user-out", "soup {r}/model {r}/model --output {r}/out", ("case/out",), ()),
    (
        "soup-truncated",
        "truncated-weights model-2",
        "soup model model-2 --output {r}/out",
        ("model.safetensors",),
        ("out",),
    ),
]


def _path_cases() -> list[Case]:
    def build(root: Path, setups: str, argv: str) -> list[str]:
        for setup in setups.split():
            SETUPS[setup](root)
        return argv.format(r=root).split()

    return [
        Case(name, lambda root, setups=setups, argv=argv: build(root, setups, argv), names, outputs=outputs)
        for name, setups, argv, names, outputs in PATH_CASES
    ]


#: (option, bad values): argparse names the option
BAD_VALUES = {
    "train": {
        "--max-steps": ["-3", "0", "x", "1.5"],
        "--align-steps": ["0", "ten"],
        "--corpus-steps": ["-1"],
        "--finetune-epochs": ["0", "nan", "-1"],
        "--batch-size": ["0", "two"],
        "--align-batch-size": ["-4"],
        "--query-lr": ["0", "lr"],
        "--align-lr": ["-1e-3"],
        "--document-lr": ["-2e-5"],
        "--corpus-lr": ["0"],
        "--corpus-document-weight": ["-1", "inf", "nan"],
        "--corpus-pseudo-queries": ["-5"],
        "--corpus-ranking-weight": ["-2", "inf"],
        "--corpus-lexical-weight": ["nan"],
        "--num-negatives": ["0"],
        "--kl-patience": ["-1"],
        "--eval-steps": ["0"],
        "--stages": ["align,pretrain", ",", ""],
        "--align-select": ["ndcg"],
        "--align-interpolation": ["1.5", "-0.1"],
        "--cache-dtype": ["int8"],
        "--corpus-sample-size": ["-1"],
        "--corpus-teacher-neighbours": ["-1"],
        "--negatives": ["hard", "refresh:0", "refresh:x"],
        "--mining-index": ["annoy"],
        "--mining-index-option": ["nlist", "color=red", "nlist=-1"],
        "--device": ["tpu"],
        "--precision": ["fp8"],
        "--seed": ["x"],
        "--guard": ["l2"],
        "--contextual-vocabulary": ["maybe"],
    },
    "evaluate": {"--batch-size": ["x"], "--baseline": ["bm26"], "--fusion-weight": ["-1", "inf"]},
    "export": {"--format": ["onnx"], "--dtype": ["int4"]},
}


def _bad_value_cases() -> list[Case]:
    cases = []
    for command, options in BAD_VALUES.items():
        for option, values in options.items():
            for value in values:
                if command == "train":

                    def build(root: Path, option=option, value=value) -> list[str]:
                        return ["train", "--data", str(root / "data"), "--output", str(root / "out"), option, value]
                elif command == "evaluate":

                    def build(root: Path, option=option, value=value) -> list[str]:
                        return ["evaluate", str(root / "m"), "--data", str(root / "d"), option, value]
                else:

                    def build(root: Path, option=option, value=value) -> list[str]:
                        return ["export", str(root / "m"), str(root / "out"), option, value]

                cases.append(Case(f"{command}-{option.lstrip('-')}={value or 'empty'}", build, (f"argument {option}",)))
    missing = {
        "train-no-output": ["train", "--data", "d"],
        "evaluate-no-data": ["evaluate", "m"],
        "export-no-output": ["export", "m"],
        "soup-no-output": ["soup", "a", "b"],
        "unknown-command": ["fit"],
        "train-unknown-option": ["train", "--data", "d", "--output", "o", "--epochs", "3"],
    }
    for name, argv in missing.items():
        cases.append(Case(name, lambda root, argv=argv: list(argv), ("required", "invalid choice", "unrecognized")))
    return cases


def _fine_cases() -> list[Case]:
    """Inputs that are fine: the command does its work (none trains: exports, a soup, an export over its own)."""

    def export_twice(root: Path) -> list[str]:
        assert main(["export", "model", "out"]) == 0
        (root / "out" / "my-notes.txt").write_text("mine")
        return ["export", "model", "out", "--overwrite"]

    def soup(root: Path) -> list[str]:
        shutil.copytree(root / "model", root / "model-2")
        return ["soup", "model", "model-2", "--output", "out"]

    def export_into_empty(root: Path) -> list[str]:
        (root / "out").mkdir()
        return ["export", "model", "out"]

    return [
        Case("export-new-folder", lambda root: ["export", "model", "out/query"], (), code=0),
        Case("export-empty-folder", export_into_empty, (), code=0),
        Case("export-overwrite-its-own", export_twice, (), code=0),
        Case("export-model2vec", lambda root: ["export", "model", "out", "--format", "model2vec"], (), code=0),
        Case("soup-two-runs", soup, (), code=0),
    ]


CASES = [*_data_cases(), *_option_file_cases(), *_path_cases(), *_bad_value_cases(), *_fine_cases()]

# ---------------------------------------------------------------------------------------------------- the checks


def _snapshot(root: Path, outputs: tuple[str, ...]) -> dict[str, str]:
    """Every file and link under ``root`` (outside ``outputs``), with a hash of its content."""
    kept = [root / name for name in outputs]
    snapshot = {}
    for path in sorted(root.rglob("*")):
        if any(path == output or output in path.parents for output in kept):
            continue
        if path.is_symlink():
            snapshot[str(path.relative_to(root))] = f"link:{os.readlink(path)}"
        elif path.is_file():
            snapshot[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            snapshot[str(path.relative_to(root))] = "folder"
    return snapshot


@pytest.fixture(scope="module")
def saved_model(tiny_document_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from st_daft import build_asymmetric_model

    folder = tmp_path_factory.mktemp("fuzz-model") / "model"
    build_asymmetric_model(str(tiny_document_model_dir), "static", device="cpu").save(str(folder))
    return folder


def test_the_cases_are_many_and_distinct() -> None:
    assert len(CASES) >= 300, len(CASES)
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_broken_input_is_one_sentence(case: Case, saved_model: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    root = tmp_path / "case"
    root.mkdir()
    shutil.copytree(saved_model, root / "model")
    monkeypatch.chdir(root)
    argv = case.build(root)
    before = _snapshot(root, case.outputs)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exited:  # argparse
        code = exited.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out, captured.err
    errors = [line for line in captured.err.splitlines() if ": error: " in line]
    assert code == case.code, f"exit {code}, stderr:\n{captured.err}"
    if case.code == 0:
        assert not errors, errors
    else:
        assert len(errors) == 1, captured.err
        assert re.match(r"st-daft( (train|evaluate|export|soup))?: error: ", errors[0]), errors[0]
        assert any(name in errors[0] for name in case.names), f"{errors[0]!r} names none of {case.names}"
    assert _snapshot(root, case.outputs) == before, "a file outside the output folder changed"


# ------------------------------------------------------------------------------------------- the real entry point


@pytest.mark.parametrize(
    "argv, named",
    [
        (["evaluate", "out/does-not-exist", "--data", "data"], "out/does-not-exist"),
        (["train", "--data", "BeIR/scifact", "--output", "run"], "BeIR/scifact"),
        (["train", "--data", "data", "--output", "run", "--device", "cuda"], "--device cuda"),
    ],
)
def test_the_entry_point_prints_one_sentence(argv: list[str], named: str, tmp_path: Path) -> None:
    from tests.training_runs import subprocess_env

    _beir(tmp_path / "data")
    (tmp_path / "out").mkdir()
    if "cuda" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
    result = subprocess.run(
        [sys.executable, "-m", "st_daft.cli", *argv], cwd=tmp_path, env=subprocess_env(), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and named in errors[0], result.stderr
    assert not (tmp_path / "run").exists()
