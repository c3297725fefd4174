"""Shared fixtures: a tiny BERT document encoder and a tiny BEIR folder, both built locally in seconds."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TOPICS = {
    "cell": "cells divide by mitosis and the nucleus holds the chromosomes",
    "heart": "the heart pumps blood through arteries and veins to the body",
    "virus": "a virus infects host cells and copies its genome inside them",
    "python": "python lists are mutable sequences and tuples are immutable",
    "star": "stars fuse hydrogen into helium in their hot dense cores",
    "rain": "rain forms when water vapour condenses into droplets in clouds",
    "brain": "neurons in the brain signal with spikes across synapses",
    "bone": "bones store calcium and marrow makes new blood cells",
}
QUESTIONS = {
    "cell": "how do cells divide",
    "heart": "what pumps blood",
    "virus": "how does a virus copy its genome",
    "python": "are python tuples mutable",
    "star": "what do stars fuse",
    "rain": "how does rain form",
    "brain": "how do neurons signal",
    "bone": "where is calcium stored",
}


def _vocabulary() -> list[str]:
    words = set()
    for text in list(TOPICS.values()) + list(QUESTIONS.values()):
        words.update(text.split())
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = [f"##{c}" for c in string.ascii_lowercase]
    return list(dict.fromkeys(specials + sorted(words) + letters + pieces))  # unique, ids 0..n-1


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer, 32-d BERT with a WordPiece tokenizer over the fixtures' words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocabulary = {token: index for index, token in enumerate(_vocabulary())}
    tokenizer = BertTokenizerFast(vocab=vocabulary, do_lower_case=True)
    assert tokenizer.unk_token_id not in tokenizer("cells divide")["input_ids"]
    config = BertConfig(
        vocab_size=len(_vocabulary()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_document_model_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT as a saved sentence-transformers model (Transformer, mean Pooling, Normalize)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    transformer = Transformer(str(tiny_bert_dir), max_seq_length=64)
    model = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean"), Normalize()], device="cpu"
    )
    folder = tmp_path_factory.mktemp("tiny_st") / "model"
    model.save(str(folder))
    return folder


def slice_beir(
    source: Path, target: Path, documents: int, splits: tuple[str, ...], queries_per_split: int = 30
) -> Path:
    """A BEIR folder with the first ``queries_per_split`` judged queries of each split, every document they judge, and
    other documents up to ``documents``."""
    (target / "qrels").mkdir(parents=True)
    kept_queries: set[str] = set()
    kept_documents: set[str] = set()
    for split in splits:
        lines = (source / "qrels" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        rows = [line.split("\t") for line in lines[1:] if line.strip()]
        chosen = list(dict.fromkeys(row[0] for row in rows))[:queries_per_split]
        keep = [row for row in rows if row[0] in chosen]
        kept_queries.update(chosen)
        kept_documents.update(row[1] for row in keep)
        (target / "qrels" / f"{split}.tsv").write_text("\n".join([lines[0]] + ["\t".join(row) for row in keep]) + "\n")
    with (source / "corpus.jsonl").open(encoding="utf-8") as handle, (target / "corpus.jsonl").open("w") as out:
        for line in handle:
            doc_id = json.loads(line)["_id"]
            if doc_id in kept_documents or len(kept_documents) < documents:
                kept_documents.add(doc_id)
                out.write(line)
    with (source / "queries.jsonl").open(encoding="utf-8") as handle, (target / "queries.jsonl").open("w") as out:
        out.writelines(line for line in handle if json.loads(line)["_id"] in kept_queries)
    return target


def write_beir(folder: Path, corpus: dict, queries: dict, qrels: dict[str, dict[str, dict[str, int]]]) -> Path:
    """Write a BEIR folder: corpus {id: (title, text)}, queries {id: text}, qrels {split: {qid: {did: score}}}."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "corpus.jsonl").open("w") as handle:
        for doc_id, (title, text) in corpus.items():
            handle.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with (folder / "queries.jsonl").open("w") as handle:
        for query_id, text in queries.items():
            handle.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    (folder / "qrels").mkdir(exist_ok=True)
    for split, judged in qrels.items():
        lines = ["query-id\tcorpus-id\tscore"]
        lines += [f"{qid}\t{did}\t{score}" for qid, docs in judged.items() for did, score in docs.items()]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture()
def tiny_beir_dir(tmp_path: Path) -> Path:
    """Eight topical documents; train and test queries with one relevant document each."""
    corpus = {f"d-{topic}": (topic, text) for topic, text in TOPICS.items()}
    queries = {f"q-{topic}": question for topic, question in QUESTIONS.items()}
    topics = list(TOPICS)
    qrels = {
        "train": {f"q-{topic}": {f"d-{topic}": 1} for topic in topics[:6]},
        "test": {f"q-{topic}": {f"d-{topic}": 1} for topic in topics[6:] + topics[:2]},
    }
    return write_beir(tmp_path / "tiny-beir", corpus, queries, qrels)


@pytest.fixture(scope="session")
def scifact_dir() -> Path:
    folder = SHARED_DATA / "scifact"
    if not (folder / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact not found at {folder}")
    return folder
