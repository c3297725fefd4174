"""BEIR loading and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_beir

from st_daft import DataError, load_beir
from st_daft.data import join_title_text


def test_loads_a_beir_folder(tiny_beir_dir: Path) -> None:
    train = load_beir(tiny_beir_dir, "train")
    assert train.name == "tiny-beir" and train.split == "train"
    assert len(train.corpus) == 8 and len(train.queries) == 6
    assert train.corpus["d-cell"].startswith("cell cells divide")  # "{title} {text}"
    assert train.relevant_docs["q-cell"] == {"d-cell"}
    pairs = train.training_pairs()
    assert pairs.column_names == ["query", "positive"] and len(pairs) == 6
    assert pairs[0] == {"query": train.queries["q-cell"], "positive": train.corpus["d-cell"]}
    test = load_beir(tiny_beir_dir, "test")
    assert set(test.queries) == {"q-brain", "q-bone", "q-cell", "q-heart"}


def test_title_text_join_matches_beir() -> None:
    assert join_title_text("Title", "Text.") == "Title Text."
    assert join_title_text("", "Text.") == "Text."
    assert join_title_text(None, "Text.") == "Text."


def test_sample_keeps_relevant_documents(tiny_beir_dir: Path) -> None:
    data = load_beir(tiny_beir_dir, "train").sample(num_queries=2, num_distractors=1, seed=1)
    assert len(data.queries) == 2 and len(data.corpus) == 3
    assert all(doc in data.corpus for docs in data.relevant_docs.values() for doc in docs)


def test_missing_split_names_the_available_ones(tiny_beir_dir: Path) -> None:
    with pytest.raises(DataError, match=r"missing qrels file .*dev.tsv; splits available: \['test', 'train'\]"):
        load_beir(tiny_beir_dir, "dev")


def test_missing_corpus_file(tiny_beir_dir: Path) -> None:
    (tiny_beir_dir / "corpus.jsonl").unlink()
    with pytest.raises(DataError, match="missing file .*corpus.jsonl"):
        load_beir(tiny_beir_dir, "train")


def test_unknown_corpus_id_in_qrels(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "b", {"d1": ("", "text")}, {"q1": "query"}, {"test": {"q1": {"d9": 1}}})
    with pytest.raises(DataError, match=r"unknown corpus id\(s\) \['d9'\]"):
        load_beir(folder)


def test_unknown_query_id_in_qrels(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "b", {"d1": ("", "text")}, {"q1": "query"}, {"test": {"q7": {"d1": 1}}})
    with pytest.raises(DataError, match=r"query id\(s\) \['q7'\] not in queries.jsonl"):
        load_beir(folder)


def test_empty_texts_are_refused(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "a", {"d1": ("", "  ")}, {"q1": "query"}, {"test": {"q1": {"d1": 1}}})
    with pytest.raises(DataError, match="empty text"):
        load_beir(folder)
    folder = write_beir(tmp_path / "b", {"d1": ("", "text")}, {"q1": " "}, {"test": {"q1": {"d1": 1}}})
    with pytest.raises(DataError, match="query 'q1' has empty text"):
        load_beir(folder)


def test_malformed_files(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "a", {"d1": ("", "text")}, {"q1": "query"}, {"test": {"q1": {"d1": 1}}})
    (folder / "corpus.jsonl").write_text("this is not json\n")
    with pytest.raises(DataError, match="corpus.jsonl:1: not valid JSON"):
        load_beir(folder)
    (folder / "corpus.jsonl").write_text(json.dumps({"id": "d1", "text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"missing field\(s\) \['_id'\]"):
        load_beir(folder)
    write_beir(folder, {"d1": ("", "text")}, {"q1": "query"}, {})
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1 d1 1\n")
    with pytest.raises(DataError, match="expected 'query-id<TAB>corpus-id<TAB>score'"):
        load_beir(folder)


def test_a_file_or_missing_path_is_not_a_beir_folder(tmp_path: Path) -> None:
    file = tmp_path / "corpus.jsonl"
    file.write_text("{}")
    with pytest.raises(DataError, match="is a file; expected a BEIR folder"):
        load_beir(file)
    with pytest.raises(DataError, match="neither a local BEIR folder nor a Hub dataset id"):
        load_beir(str(tmp_path / "nowhere" / "deeper"))


def test_no_positive_judgements(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "a", {"d1": ("", "text")}, {"q1": "query"}, {"train": {"q1": {"d1": 0}}})
    with pytest.raises(DataError, match="no positive"):
        load_beir(folder, "train").training_pairs()
