"""Which negatives a run mines and when its cache is re-embedded: the strategy names of ``--negatives``
(``in-batch``, ``stale``, ``corrected``, ``refresh:N``, ``corrected+refresh:N``), their parsed form
:class:`NegativeStrategy`, and the :class:`RefreshPolicy` that re-embeds the whole corpus every N steps (the
baseline that corrector networks, Monath et al. 2024, replace).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


NEGATIVE_STRATEGIES = ("in-batch", "stale", "corrected", "refresh:N", "corrected+refresh:N")
INDEX_MODES = ("exact", "flat", "ivf", "hnsw", "query-side", "two-step")
_REFRESH = re.compile(r"^(corrected\+)?refresh:(\d+)$")


@dataclass(frozen=True)
class NegativeStrategy:
    """A parsed negatives strategy: whether to mine, whether to correct, how often to re-embed the corpus."""

    spec: str
    mine: bool
    correct: bool
    refresh_every: int | None = None


def parse_negatives(spec: str | NegativeStrategy) -> NegativeStrategy:
    """Parse ``in-batch | stale | corrected | refresh:N | corrected+refresh:N`` (N: steps between re-embeddings)."""
    if isinstance(spec, NegativeStrategy):
        return spec
    text = str(spec).strip().lower()
    if text == "in-batch":
        return NegativeStrategy(text, mine=False, correct=False)
    if text == "stale":
        return NegativeStrategy(text, mine=True, correct=False)
    if text == "corrected":
        return NegativeStrategy(text, mine=True, correct=True)
    match = _REFRESH.match(text)
    if match and int(match.group(2)) >= 1:
        return NegativeStrategy(text, mine=True, correct=bool(match.group(1)), refresh_every=int(match.group(2)))
    raise ValueError(
        f"unknown negatives strategy {spec!r}: expected one of {', '.join(NEGATIVE_STRATEGIES)} "
        "(N: a positive number of steps between full re-embeddings of the corpus, e.g. refresh:100)"
    )


def check_num_negatives(num_negatives: int, corpus_size: int) -> None:
    """Refuse a number of mined negatives per query that the corpus cannot supply (call it before any stage trains;
    :class:`NegativeMiner` calls it too)."""
    if num_negatives < 1:
        raise ValueError(f"num_negatives (--num-negatives) must be at least 1, got {num_negatives}")
    if num_negatives >= corpus_size:
        raise ValueError(
            f"num_negatives (--num-negatives) is {num_negatives} but the corpus has only {corpus_size} documents: "
            f"at most {corpus_size - 1} negatives can be mined per query (one is its positive)"
        )


@dataclass
class RefreshPolicy:
    """Re-embed the corpus every ``every`` completed steps (``refresh:N``); ``None`` never."""

    every: int | None = None
    last_step: int = 0

    def due(self, step: int) -> bool:
        return bool(self.every) and step > 0 and step % self.every == 0 and step != self.last_step

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "last_step": self.last_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_step = int(state["last_step"])
