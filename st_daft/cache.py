"""A cache of document-route embeddings of a corpus, addressable by the tokenised features losses receive.

The cache embeds a corpus once with the document route (batched, no gradient, progress bar) and keeps

- the corpus ids and the embeddings (float32 or float16),
- a *token key* per document: a digest of the token ids the document route sees for it, so that a loss, which only
  receives tokenised ``sentence_features``, can tell which corpus rows a batch holds (its positives, to use the
  cached embedding or to keep them out of the negatives),
- a fingerprint of the route's parameters at build time.

While the document route is frozen (DAFT's alignment stage) the cache is exact. Once the route trains, the cached
embeddings go stale; :mod:`st_daft.corrector` maps them towards the current route.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from torch import Tensor

from st_daft.model import DOCUMENT_ROUTE, get_route

logger = logging.getLogger(__name__)

__all__ = ["StaleEmbeddingCache", "CacheMismatchError", "route_fingerprint", "token_keys"]

CACHE_FORMAT_VERSION = 1
METADATA_FILE = "cache_metadata.json"
EMBEDDINGS_FILE = "embeddings.npy"
KEYS_FILE = "token_keys.npy"


class CacheMismatchError(ValueError):
    """The cache on disk does not belong to this model, corpus or configuration."""


def route_fingerprint(model: SentenceTransformer, route: str = DOCUMENT_ROUTE) -> str:
    """A digest of a route's parameters and buffers: equal fingerprints mean equal document embeddings."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        module = get_route(model, route)
    except ValueError:  # a symmetric model: its only route
        module = model
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def token_keys(features: dict[str, Any]) -> list[bytes]:
    """One 16-byte digest per row of tokenised features: the row's token ids, padding removed."""
    input_ids = features["input_ids"]
    if "offsets" in features:  # StaticEmbedding: one flat stream of token ids plus row offsets
        offsets = features["offsets"].tolist() + [len(input_ids)]
        rows = [input_ids[start:end] for start, end in zip(offsets[:-1], offsets[1:])]
    else:
        mask = features.get("attention_mask")
        rows = [ids[m.bool()] for ids, m in zip(input_ids, mask)] if mask is not None else list(input_ids)
    return [hashlib.blake2b(row.to(torch.int64).cpu().numpy().tobytes(), digest_size=16).digest() for row in rows]


class StaleEmbeddingCache:
    """Document-route embeddings of a corpus, with token keys, a fingerprint and save/load.

    Args:
        ids: corpus ids, one per row.
        embeddings: ``(len(ids), dim)`` embeddings from the document route.
        keys: one token key per row (see :func:`token_keys`).
        fingerprint: :func:`route_fingerprint` of the route the embeddings came from.
    """

    def __init__(self, ids: list[str], embeddings: Tensor, keys: list[bytes], fingerprint: str) -> None:
        if len(ids) != embeddings.shape[0] or len(ids) != len(keys):
            raise ValueError(f"{len(ids)} ids, {embeddings.shape[0]} embeddings and {len(keys)} keys: must be equal")
        self.ids = list(ids)
        self.embeddings = embeddings
        self.keys = list(keys)
        self.fingerprint = fingerprint
        self.row_of_key: dict[bytes, int] = {}
        for row, key in enumerate(self.keys):
            self.row_of_key.setdefault(key, row)  # duplicate texts share the first row
        self.row_of_id = {doc_id: row for row, doc_id in enumerate(self.ids)}

    @classmethod
    def build(
        cls,
        model: SentenceTransformer,
        corpus: dict[str, str],
        batch_size: int = 64,
        dtype: torch.dtype = torch.float32,
        show_progress_bar: bool = True,
    ) -> StaleEmbeddingCache:
        """Embed ``corpus`` (id -> text) once with the model's document route."""
        if not corpus:
            raise ValueError("cannot build a cache over an empty corpus")
        ids = list(corpus)
        texts = [corpus[doc_id] for doc_id in ids]
        empty = [doc_id for doc_id, text in zip(ids, texts) if not text.strip()]
        if empty:
            raise ValueError(f"{len(empty)} corpus documents have empty text, e.g. {empty[:3]}")
        was_training = model.training
        model.eval()
        try:
            embeddings = model.encode_document(
                texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=show_progress_bar
            )
        finally:
            model.train(was_training)
        keys: list[bytes] = []
        for start in range(0, len(texts), 1024):
            keys.extend(token_keys(model.preprocess(texts[start : start + 1024], task=DOCUMENT_ROUTE)))
        return cls(ids, embeddings.detach().to("cpu", dtype), keys, route_fingerprint(model))

    @property
    def dimension(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def rows_for_features(self, features: dict[str, Any]) -> Tensor:
        """Cache rows of the documents in a batch of tokenised features; -1 where a text is not in the cache."""
        return torch.tensor([self.row_of_key.get(key, -1) for key in token_keys(features)], dtype=torch.long)

    def rows_for_ids(self, ids: list[str]) -> Tensor:
        unknown = [doc_id for doc_id in ids if doc_id not in self.row_of_id]
        if unknown:
            raise KeyError(f"unknown corpus id(s) {unknown[:3]}")
        return torch.tensor([self.row_of_id[doc_id] for doc_id in ids], dtype=torch.long)

    def is_current(self, model: SentenceTransformer) -> bool:
        """True when the model's document route still has the parameters the cache was built with."""
        return route_fingerprint(model) == self.fingerprint

    def save(self, folder: str | Path) -> None:
        """Write the cache to ``folder`` (metadata JSON, embeddings and keys as .npy), atomically per file."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_save_npy(folder / EMBEDDINGS_FILE, self.embeddings.numpy())
        _atomic_save_npy(folder / KEYS_FILE, np.frombuffer(b"".join(self.keys), dtype=np.uint8).reshape(-1, 16))
        metadata = {
            "format_version": CACHE_FORMAT_VERSION,
            "ids": self.ids,
            "fingerprint": self.fingerprint,
            "dimension": self.dimension,
            "size": len(self),
            "dtype": str(self.embeddings.dtype).replace("torch.", ""),
        }
        temporary = folder / (METADATA_FILE + ".tmp")
        temporary.write_text(json.dumps(metadata))
        temporary.replace(folder / METADATA_FILE)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        expected_fingerprint: str | None = None,
        expected_dimension: int | None = None,
        expected_size: int | None = None,
        mmap: bool = False,
    ) -> StaleEmbeddingCache:
        """Load a saved cache, refusing one whose fingerprint, dimension or size is not the expected one."""
        folder = Path(folder)
        metadata_file = folder / METADATA_FILE
        if not metadata_file.is_file():
            raise CacheMismatchError(f"{folder} is not an st-daft embedding cache (no {METADATA_FILE})")
        metadata = json.loads(metadata_file.read_text())
        if metadata.get("format_version") != CACHE_FORMAT_VERSION:
            raise CacheMismatchError(f"{folder}: cache format {metadata.get('format_version')}, expected 1")
        checks = (
            ("fingerprint", expected_fingerprint, "the document route changed since the cache was built"),
            ("dimension", expected_dimension, "the model's embedding dimension differs"),
            ("size", expected_size, "the corpus size differs"),
        )
        for key, expected, meaning in checks:
            if expected is not None and metadata[key] != expected:
                raise CacheMismatchError(
                    f"{folder}: cache {key} {metadata[key]!r} != expected {expected!r} ({meaning})"
                )
        embeddings = np.load(folder / EMBEDDINGS_FILE, mmap_mode="c" if mmap else None)
        if embeddings.shape != (metadata["size"], metadata["dimension"]):
            raise CacheMismatchError(f"{folder}: embeddings shape {embeddings.shape} does not match its metadata")
        keys_array = np.load(folder / KEYS_FILE)
        keys = [row.tobytes() for row in keys_array]
        return cls(metadata["ids"], torch.from_numpy(np.asarray(embeddings)), keys, metadata["fingerprint"])


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(path.name + ".tmp.npy")
    np.save(temporary, array)
    temporary.replace(path)
