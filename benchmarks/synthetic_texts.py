"""The synthetic text files of the eighth session's runs (docs/benchmarks.md), passed as ``--unlabeled-queries``.

- ``vocabulary``: 20,000 texts of 3-12 whole words drawn from the query tokenizer's vocabulary with probability
  proportional to ``1 / (rank + 50)`` (WordPiece ids follow frequency): general word combinations.
- ``questions``: 10,000 sentences and spans cut from a BEIR ``corpus.jsonl``'s texts (first 12 words) put in
  question templates.

Usage::

    python benchmarks/synthetic_texts.py vocabulary --output random_texts.txt
    python benchmarks/synthetic_texts.py questions --corpus ../shared/data/python-faq/corpus.jsonl --output q.txt
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

TEMPLATES = [
    "how do i {}?", "why {}?", "what is {}?", "how to {}", "can i {}?",
    "how can i {}?", "what does {} mean?", "{}?", "is there {}?", "when should i {}?",
]  # fmt: skip


def vocabulary_texts(count: int, seed: int = 0) -> list[str]:
    from st_daft import build_asymmetric_model
    from st_daft.models.asymmetric import get_route

    tokenizer = get_route(build_asymmetric_model(query_encoder="static"), "query")[0].tokenizer
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    words = [word for word, _ in vocabulary if re.fullmatch(r"[a-z]{2,}", word)]
    rng = random.Random(seed)
    weights = [1 / (rank + 50) for rank in range(len(words))]
    return [" ".join(rng.choices(words, weights, k=rng.randint(3, 12))) for _ in range(count)]


def question_texts(corpus_file: str, count: int, seed: int = 0) -> list[str]:
    from st_daft.label_free.corpus_texts import alignment_examples

    with open(corpus_file, encoding="utf-8") as handle:  # the documents' text, without titles
        corpus = {row["_id"]: row["text"] for row in map(json.loads, handle) if row}
    examples = alignment_examples(corpus, kinds=("sentences", "spans"), max_texts=60000, seed=7)
    rng = random.Random(seed)
    rng.shuffle(examples)
    texts = []
    for text, _ in examples[:count]:
        words = " ".join(text.rstrip(".!?").split()[:12])
        texts.append(rng.choice(TEMPLATES).format(words[:1].lower() + words[1:]))
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["vocabulary", "questions"])
    parser.add_argument("--corpus", help="corpus file (questions)")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    if args.kind == "vocabulary":
        texts = vocabulary_texts(args.count or 20000)
    else:
        if not args.corpus:
            parser.error("questions need --corpus")
        texts = question_texts(args.corpus, args.count or 10000)
    Path(args.output).write_text("\n".join(texts) + "\n")


if __name__ == "__main__":
    main()
