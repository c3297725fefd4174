"""BEIR loading and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from st_daft import DataError, load_beir
from st_daft.data import join_title_text
from tests.conftest import write_beir


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
    with pytest.raises(DataError, match="nowhere.deeper does not exist; give a local BEIR folder or a Hub dataset id"):
        load_beir(str(tmp_path / "nowhere" / "deeper"))


def test_no_positive_judgements(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "a", {"d1": ("", "text")}, {"q1": "query"}, {"train": {"q1": {"d1": 0}}})
    with pytest.raises(DataError, match="no positive"):
        load_beir(folder, "train").training_pairs()


def _tiny(tmp_path: Path, name: str = "a") -> Path:
    return write_beir(
        tmp_path / name,
        {"d1": ("", "first text"), "d2": ("T", "second text")},
        {"q1": "query one", "q2": "query two"},
        {"test": {"q1": {"d1": 1}, "q2": {"d2": 1}}},
    )


def _write_lines(path: Path, rows: list) -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def test_duplicate_ids_are_refused_with_their_lines(tmp_path: Path) -> None:
    folder = _tiny(tmp_path)
    rows = [{"_id": "d1", "text": "positive"}, {"_id": "d2", "text": "x"}, {"_id": "d1", "text": "replacement"}]
    _write_lines(folder / "corpus.jsonl", rows)
    with pytest.raises(DataError, match=r"corpus.jsonl: 1 duplicate _id\(s\): 'd1' \(lines 1 and 3\)"):
        load_beir(folder)
    _tiny(tmp_path)
    _write_lines(folder / "queries.jsonl", [{"_id": "q1", "text": "a"}, {"_id": "q2", "text": "b"}, {"_id": "q2"}])
    with pytest.raises(DataError, match=r"queries.jsonl:3: missing field\(s\) \['text'\]"):
        load_beir(folder)
    _write_lines(folder / "queries.jsonl", [{"_id": "q1", "text": "a"}, {"_id": "q2", "text": "b"}] * 2)
    with pytest.raises(DataError, match=r"queries.jsonl: 2 duplicate _id\(s\): 'q1' \(lines 1 and 3\), 'q2'"):
        load_beir(folder)


def test_empty_files_are_named(tmp_path: Path) -> None:
    folder = _tiny(tmp_path)
    (folder / "queries.jsonl").write_text("")
    with pytest.raises(DataError, match=r"queries.jsonl is empty: no rows"):
        load_beir(folder)
    _tiny(tmp_path)
    (folder / "corpus.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"corpus.jsonl is empty: no rows"):
        load_beir(folder)
    _tiny(tmp_path)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(DataError, match=r"test.tsv has no judgements"):
        load_beir(folder)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"_id": "d1", "text": 42}, r"corpus.jsonl:1: text must be a string, got 42 \(int\)"),
        ({"_id": "d1", "text": None}, r"corpus.jsonl:1: text must be a string, got null \(null\)"),
        ({"_id": "d1", "title": ["a"], "text": "x"}, r"corpus.jsonl:1: title must be a string, got \[\"a\"\] \(list\)"),
        ({"_id": 1.5, "text": "x"}, r"corpus.jsonl:1: _id must be a string \(or an integer\), got 1.5 \(float\)"),
        ({"_id": True, "text": "x"}, r"corpus.jsonl:1: _id must be a string \(or an integer\), got True \(bool\)"),
        (["d1", "x"], r"corpus.jsonl:1: expected a JSON object with fields \['_id', 'text'\], got list"),
    ],
)
def test_mistyped_fields_name_file_and_line(tmp_path: Path, row, message: str) -> None:
    folder = _tiny(tmp_path)
    _write_lines(folder / "corpus.jsonl", [row])
    with pytest.raises(DataError, match=message):
        load_beir(folder)


def test_integer_ids_are_read_as_strings_and_extra_fields_ignored(tmp_path: Path) -> None:
    folder = _tiny(tmp_path)
    rows = [{"_id": 1, "text": "one", "metadata": {"url": "u"}}, {"_id": 2, "text": "2"}]
    _write_lines(folder / "corpus.jsonl", rows)
    _write_lines(folder / "queries.jsonl", [{"_id": 7, "text": "query", "metadata": {}}])
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n7\t1\t1\t\n")  # a trailing tab is fine
    data = load_beir(folder)
    assert data.corpus == {"1": "one", "2": "2"} and data.qrels == {"7": {"1": 1}}


def test_qrels_columns_and_conflicts(tmp_path: Path) -> None:
    folder = _tiny(tmp_path)
    (folder / "qrels" / "test.tsv").write_text("q1\tQ0\td1\t1\n")
    with pytest.raises(DataError, match=r"test.tsv:1: expected 'query-id<TAB>corpus-id<TAB>score' .*got 4"):
        load_beir(folder)
    (folder / "qrels" / "test.tsv").write_text("q1\td1\t1\nq1\td1\t1\nq1\td1\t0\n")
    with pytest.raises(DataError, match=r"test.tsv:3: query 'q1' and document 'd1' judged 0 here and 1 on line 1"):
        load_beir(folder)
    (folder / "qrels" / "test.tsv").write_text("q1\td1\tyes\n")
    with pytest.raises(DataError, match=r"test.tsv:1: score 'yes' is not a number"):
        load_beir(folder)


def test_empty_texts_name_lines_for_training_and_warn_for_evaluation(tmp_path: Path, caplog) -> None:
    folder = write_beir(
        tmp_path / "a",
        {"d1": ("", "text"), "d2": ("", " "), "d3": ("", "")},
        {"q1": "query"},
        {"test": {"q1": {"d1": 1}}},
    )
    named = r"corpus.jsonl: 2 corpus document\(s\) have empty text: 'd2' \(line 2\), 'd3' \(line 3\)"
    with pytest.raises(DataError, match=named):
        load_beir(folder)
    with caplog.at_level("WARNING", logger="st_daft.data"):
        data = load_beir(folder, empty_texts="warn")
    assert data.corpus["d2"] == "" and len(data.corpus) == 3, "evaluation keeps every document"
    assert "2 corpus document(s) have empty text; they are kept and evaluated: ['d2', 'd3']" in caplog.text
    folder = write_beir(tmp_path / "b", {"d1": ("", "text")}, {"q1": "query", "q2": "  "}, {"test": {"q2": {"d1": 1}}})
    with pytest.raises(DataError, match=r"queries.jsonl:2: query 'q2' has empty text"):
        load_beir(folder)


def test_queries_without_a_positive_are_named(tmp_path: Path, caplog) -> None:
    folder = write_beir(
        tmp_path / "a",
        {"d1": ("", "t"), "d2": ("", "u")},
        {"q1": "a", "q2": "b"},
        {"test": {"q1": {"d1": 1}, "q2": {"d2": 0}}},
    )
    with caplog.at_level("WARNING", logger="st_daft.data"):
        data = load_beir(folder)
    assert "1 test quer(y/ies) have no relevant (score > 0) document" in caplog.text and "['q2']" in caplog.text
    assert len(data.training_pairs()) == 1


def test_compressed_or_misnamed_files_are_named(tmp_path: Path) -> None:
    import gzip

    folder = _tiny(tmp_path)
    corpus = folder / "corpus.jsonl"
    (folder / "corpus.jsonl.gz").write_bytes(gzip.compress(corpus.read_bytes()))
    corpus.unlink()
    with pytest.raises(DataError, match=r"missing file .*corpus.jsonl .*found \['corpus.jsonl.gz'\]"):
        load_beir(folder)
    corpus.write_bytes((folder / "corpus.jsonl.gz").read_bytes())
    with pytest.raises(DataError, match=r"corpus.jsonl:1: not UTF-8 text"):
        load_beir(folder)


def test_load_corpus_reads_every_accepted_layout(tmp_path: Path, tiny_beir_dir: Path) -> None:
    from st_daft import load_corpus

    beir = load_beir(tiny_beir_dir)
    assert load_corpus(tiny_beir_dir) == beir.corpus, "a BEIR folder: title and text joined as load_beir does"
    assert load_corpus(tiny_beir_dir / "corpus.jsonl") == beir.corpus
    generic = tmp_path / "docs.jsonl"
    _write_lines(generic, [{"id": 5, "body": "five"}, "", {"body": "no id", "title": "T"}, json.dumps("a string")])
    assert load_corpus(generic, text_field="body") == {"5": "five", "3": "T no id", "4": "a string"}
    text = tmp_path / "docs.txt"
    text.write_text("first document\n\n  second document  \n")
    assert load_corpus(text) == {"1": "first document", "3": "second document"}
    sniffed = tmp_path / "docs.data"  # no JSON suffix, but JSON objects inside
    _write_lines(sniffed, [{"_id": "a", "text": "alpha"}])
    assert load_corpus(sniffed) == {"a": "alpha"}


def test_load_corpus_errors_and_warnings(tmp_path: Path, caplog) -> None:
    from st_daft import load_corpus

    file = tmp_path / "c.jsonl"
    file.write_text("")
    with pytest.raises(DataError, match=r"c.jsonl holds no documents"):
        load_corpus(file)
    _write_lines(file, [{"_id": "a", "text": "x"}, {"_id": "a", "text": "y"}])
    with pytest.raises(DataError, match=r"c.jsonl: 1 duplicate id\(s\): 'a' \(lines 1 and 2\)"):
        load_corpus(file)
    _write_lines(file, [{"_id": "a", "contents": "x"}])
    with pytest.raises(DataError, match=r"c.jsonl:1: missing field 'text' \(fields: \['_id', 'contents'\]\)"):
        load_corpus(file)
    _write_lines(file, [{"_id": "a", "text": {"nested": 1}}])
    with pytest.raises(DataError, match=r"c.jsonl:1: text must be a string"):
        load_corpus(file)
    _write_lines(file, ["{not json"])
    with pytest.raises(DataError, match=r"c.jsonl:1: not valid JSON"):
        load_corpus(file)
    _write_lines(file, [{"_id": "a", "text": "x"}, {"_id": "b", "text": "  "}])
    with caplog.at_level("WARNING", logger="st_daft.data"):
        assert load_corpus(file) == {"a": "x"}
    assert "1 empty document(s) left out, on line(s) [2]" in caplog.text
    with pytest.raises(DataError, match=r"missing file .*corpus.jsonl"):
        load_corpus(tmp_path)
    with pytest.raises(DataError, match=r"nowhere.jsonl does not exist"):
        load_corpus(tmp_path / "nowhere.jsonl")


def test_load_queries_file(tmp_path: Path, tiny_beir_dir: Path) -> None:
    from st_daft import load_queries_file

    from_folder = load_queries_file(tiny_beir_dir)
    assert len(from_folder) == 8 and from_folder[0] == "how do cells divide"
    log = tmp_path / "log.txt"
    log.write_text("how do cells divide\n\nwhat pumps blood\nhow do cells divide\n")
    assert load_queries_file(log) == ["how do cells divide", "what pumps blood"]
    jsonl = tmp_path / "log.jsonl"
    _write_lines(jsonl, [{"query": "a"}, json.dumps("b"), {"query": ""}])
    assert load_queries_file(jsonl, text_field="query") == ["a", "b"]
    with pytest.raises(DataError, match=r"log.jsonl:1: missing field 'text'"):
        load_queries_file(jsonl)
    log.write_text("\n \n")
    with pytest.raises(DataError, match=r"log.txt holds no queries"):
        load_queries_file(log)


def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "a", {"d1": ("", "text")}, {"q1": "query"}, {"test": {"q1": {"d1": 1}}})
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        file = folder / name
        file.write_bytes(b"\xef\xbb\xbf" + file.read_bytes())
    data = load_beir(folder)
    assert data.qrels == {"q1": {"d1": 1}} and data.corpus == {"d1": "text"}


def test_the_reason_a_json_line_is_invalid_is_whole(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "a", {"d1": ("", "text")}, {"q1": "query"}, {"test": {"q1": {"d1": 1}}})
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "a\tb"}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:1: not valid JSON \(Invalid control character at column 25\)"):
        load_beir(folder)


def test_a_local_looking_path_is_never_sent_to_the_hub(tmp_path: Path, monkeypatch) -> None:
    import st_daft.data

    def hub(*args, **kwargs):
        raise AssertionError("sent to the Hub")

    monkeypatch.setattr(st_daft.data, "_load_beir_hub", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for source in ("out/does-not-exist", "./x", "a/b/c", "corpus.jsonl", str(tmp_path / "nowhere")):
        with pytest.raises(DataError, match="does not exist; give a local BEIR folder"):
            load_beir(source)


def test_an_unreachable_hub_dataset_is_one_sentence(monkeypatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="BeIR/scifact: not found here, and the Hugging Face Hub is not asked"):
        load_beir("BeIR/scifact")
