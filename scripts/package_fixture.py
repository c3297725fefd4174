"""Write a tiny document encoder and a tiny BEIR folder for scripts/package_check.sh (no download, seconds).

Usage: python scripts/package_fixture.py FOLDER   -> FOLDER/document-model, FOLDER/beir
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

TOPICS = {
    "cell": ("how do cells divide", "cells divide by mitosis and the nucleus holds the chromosomes"),
    "heart": ("what pumps blood", "the heart pumps blood through arteries and veins to the body"),
    "virus": ("how does a virus copy its genome", "a virus infects host cells and copies its genome inside them"),
    "star": ("what do stars fuse", "stars fuse hydrogen into helium in their hot dense cores"),
    "rain": ("how does rain form", "rain forms when water vapour condenses into droplets in clouds"),
    "bone": ("where is calcium stored", "bones store calcium and marrow makes new blood cells"),
}


def document_model(folder: Path) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({word for pair in TOPICS.values() for text in pair for word in text.split()})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocabulary = list(dict.fromkeys(specials + words + letters + [f"##{c}" for c in string.ascii_lowercase]))
    bert = folder / "bert"
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocabulary)}, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocabulary),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    transformer = Transformer(str(bert), max_seq_length=32)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), "mean"), Normalize()]
    model_folder = folder / "document-model"
    SentenceTransformer(modules=modules, device="cpu").save(str(model_folder))
    return model_folder


def beir(folder: Path) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with (folder / "corpus.jsonl").open("w") as handle:
        for topic, (_, text) in TOPICS.items():
            handle.write(json.dumps({"_id": f"d-{topic}", "title": topic, "text": text}) + "\n")
    with (folder / "queries.jsonl").open("w") as handle:
        for topic, (question, _) in TOPICS.items():
            handle.write(json.dumps({"_id": f"q-{topic}", "text": question}) + "\n")
    for split, topics in (("train", list(TOPICS)), ("test", list(TOPICS)[:3])):
        rows = ["query-id\tcorpus-id\tscore"] + [f"q-{topic}\td-{topic}\t1" for topic in topics]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return folder


if __name__ == "__main__":
    root = Path(sys.argv[1])
    print(document_model(root), beir(root / "beir"))
