"""Build ``st_daft/resources/general_texts.txt.gz``: general-domain English texts from WordNet 3.0.

The corpus stage adds these texts beside a labelled collection's own (``CorpusStage(general_texts=...)``), so that
a static query route trained on one collection keeps working on text unlike it. Each WordNet synset gives its
definition (``"lemma, lemma: definition"``) and each of its example sentences of three words or more; the texts are
shuffled with a fixed seed and the first ``--max-texts`` are kept.

WordNet 3.0 (Princeton University) is distributed under a licence that allows copying and redistribution with its
notice, kept beside the file (``st_daft/resources/WORDNET_LICENSE``). Its data files come with Debian's
``wordnet-base`` package (``/usr/share/wordnet``) or from wordnet.princeton.edu.

Usage::

    python scripts/build_general_texts.py /usr/share/wordnet --max-texts 20000
"""

from __future__ import annotations

import argparse
import gzip
import random
import re
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent.parent / "st_daft" / "resources" / "general_texts.txt.gz"


def wordnet_texts(folder: Path) -> list[str]:
    texts = []
    for part_of_speech in ("noun", "verb", "adj", "adv"):
        for line in (folder / f"data.{part_of_speech}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):  # the licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            lemma_count = int(fields[3], 16)
            lemmas = [re.sub(r"\(.*?\)", "", fields[4 + 2 * i].replace("_", " ")) for i in range(lemma_count)]
            parts = [part.strip() for part in gloss.strip().split(";") if part.strip()]
            definitions = [part for part in parts if not part.startswith('"')]
            examples = [part.strip('"').strip() for part in parts if part.startswith('"')]
            if definitions:
                texts.append(f"{', '.join(lemmas[:3])}: {'; '.join(definitions)}")
            texts.extend(example for example in examples if len(example.split()) >= 3)
    return [" ".join(text.split()) for text in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wordnet", type=Path, help="folder with WordNet 3.0's data.noun, data.verb, ...")
    parser.add_argument("--max-texts", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    texts = wordnet_texts(args.wordnet)
    random.Random(args.seed).shuffle(texts)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(args.output, "wb", mtime=0) as handle:  # mtime 0: the same bytes on every build
        handle.write(("\n".join(texts[: args.max_texts]) + "\n").encode())
    print(f"{min(len(texts), args.max_texts)} of {len(texts)} texts -> {args.output}")


if __name__ == "__main__":
    main()
