"""General-domain English texts that ship with st-daft, for the corpus stage beside a labelled collection.

A static query route trained on one collection's texts fits its rows to that collection's senses of each token
and loses some of the document encoder's general sense of the rest (python-faq's programming questions, for a
SciFact-trained route). Adding general texts to the corpus stage's regression targets keeps more of it: 20,000
WordNet texts beside SciFact's 20,000 cut texts, with the corpus stage's 900 steps (600 without them), lift
python-faq and leave SciFact where it was (docs/guide/label-free.md, "General texts").

The texts are WordNet 3.0's definitions (``"lemma, lemma: definition"``) and example sentences, 20,000 drawn with a
fixed seed (``scripts/build_general_texts.py``; WordNet's licence is in ``st_daft/resources/WORDNET_LICENSE``).
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib.resources import files

__all__ = ["general_texts", "GENERAL_TEXTS_AVAILABLE"]

GENERAL_TEXTS_AVAILABLE = 20000
"""How many texts ship with the package."""


@lru_cache(maxsize=1)
def _all_texts() -> tuple[str, ...]:
    raw = files("st_daft").joinpath("resources", "general_texts.txt.gz").read_bytes()
    return tuple(line for line in gzip.decompress(raw).decode().splitlines() if line)


def general_texts(max_texts: int | None = None) -> list[str]:
    """The first ``max_texts`` (all when None) of the packaged general-domain English texts, always in one order."""
    if max_texts is not None and not 0 <= max_texts <= GENERAL_TEXTS_AVAILABLE:
        raise ValueError(f"max_texts must be between 0 and {GENERAL_TEXTS_AVAILABLE}, got {max_texts}")
    if max_texts == 0:
        return []  # every corpus-alone run asks for none: no need to read the file
    texts = _all_texts()
    return list(texts if max_texts is None else texts[:max_texts])
