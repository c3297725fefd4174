"""A BEIR folder of pseudo-labels: texts cut from a corpus as queries, each judged relevant to its source document.

No real query is used, so ``st-daft train --data OUT`` on it runs the labelled recipe (vocabulary, corpus, align kept
by validation on held-out pseudo-queries) on a corpus alone: the eleventh session's check of whether a separate
alignment on pseudo-queries beats the corpus stage's own pseudo-query term (it did not: docs/benchmarks.md).

Example::

    python benchmarks/pseudo_label_folder.py ../shared/data/scifact/corpus.jsonl runs/pseudo --texts 20000
    st-daft train --data runs/pseudo --output runs/ps --contextual-vocabulary on --corpus-words 20000 \\
        --general-texts 0
    st-daft evaluate runs/ps --data ../shared/data/scifact --split train

The corpus is linked, not copied, into the folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from st_daft.label_free.corpus_texts import TEXT_KINDS, alignment_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", help="a BEIR corpus.jsonl")
    parser.add_argument("output", help="the folder to write (must not exist)")
    parser.add_argument("--texts", type=int, default=20000, help="pseudo-queries to cut (default 20,000)")
    parser.add_argument("--kinds", default="sentences", help=f"comma-separated, of {', '.join(TEXT_KINDS)}")
    parser.add_argument("--seed", type=int, default=1000, help="cutting seed (other than the corpus stage's)")
    args = parser.parse_args()

    output = Path(args.output)
    if output.exists():
        raise SystemExit(f"{output} exists")
    rows = [json.loads(line) for line in Path(args.corpus).read_text().splitlines() if line.strip()]
    corpus = {row["_id"]: row["text"] for row in rows}
    titles = {row["_id"]: row.get("title", "") for row in rows}
    examples = alignment_examples(
        corpus, titles, kinds=tuple(args.kinds.split(",")), max_texts=args.texts, seed=args.seed
    )
    (output / "qrels").mkdir(parents=True)
    (output / "corpus.jsonl").symlink_to(Path(args.corpus).resolve())
    with open(output / "queries.jsonl", "w") as queries, open(output / "qrels" / "train.tsv", "w") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for number, (text, document) in enumerate(examples):
            queries.write(json.dumps({"_id": f"p{number}", "text": text}) + "\n")
            qrels.write(f"p{number}\t{document}\t1\n")
    print(f"{len(examples)} pseudo-queries written to {output}")


if __name__ == "__main__":
    main()
