"""A persistent store of document-route embeddings, shared by every run that uses the same document encoder.

A frozen document route embeds the same texts again and again: the corpus for the alignment cache, the label-free
alignment targets, the vocabulary, and the evaluation corpora, once per query route tried. The store keeps each
embedding on disk under a key made of

- :func:`document_encoder_key`: a digest of the document route's parameters, the modules after the ``Router``
  (e.g. ``Normalize``) and the route's truncation length, so a fine-tuned document route never reads another
  route's vectors, and
- a digest of the text (and of the prompt and the kind of embedding, e.g. ``"document"`` or ``"vocabulary"``).

Only texts the store has not seen are encoded. New rows are written in shards (``.npz`` files written to a temporary
name and renamed), so a crash loses at most the unflushed rows and never leaves a file that loads half-written;
two processes can share a store (each writes its own shards).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

from st_daft.fingerprint import legacy_route_fingerprints, route_fingerprint
from st_daft.io import atomic_write
from st_daft.model import DOCUMENT_ROUTE

logger = logging.getLogger(__name__)

__all__ = ["DocumentEmbeddingStore", "document_encoder_key"]


def document_encoder_key(model: SentenceTransformer) -> str:
    """The store's namespace for ``model``: :func:`st_daft.fingerprint.route_fingerprint` of its document route
    (parameters, the modules after the ``Router``, truncation length). Equal keys mean equal document embeddings."""
    return route_fingerprint(model, DOCUMENT_ROUTE)


def _text_key(text: str, kind: str, prompt: str | None) -> bytes:
    return hashlib.blake2b(f"{kind}\x00{prompt or ''}\x00{text}".encode(), digest_size=16).digest()


class DocumentEmbeddingStore:
    """Document-route embeddings of texts on disk, reused across runs that share a document encoder.

    Args:
        folder: where the store lives; one sub-folder per :func:`document_encoder_key`.
        flush_every: write a shard once this many new rows are pending (and always at the end of each call).

    Example::

        store = DocumentEmbeddingStore("runs/document-store")
        vectors = store.encode_document(model, corpus_texts)  # encodes once; later runs read them back
    """

    def __init__(self, folder: str | Path, flush_every: int = 8192) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"document store {self.folder} exists and is not a folder")
        self.flush_every = flush_every
        self._rows: dict[str, dict[bytes, np.ndarray]] = {}  # encoder key -> text key -> vector
        self.hits = 0  # texts read back from the store
        self.misses = 0  # texts encoded (each distinct new text once)
        self.repeats = 0  # texts that repeat another text of the same call: they share its row

    def _load(self, encoder_key: str, legacy_keys: Sequence[str] = ()) -> dict[bytes, np.ndarray]:
        """The rows stored under ``encoder_key``, and under the keys an earlier st-daft gave the same encoder (read,
        never moved: new rows go to ``encoder_key``'s folder)."""
        if encoder_key in self._rows:
            return self._rows[encoder_key]
        rows: dict[bytes, np.ndarray] = {}
        folders = [self.folder / key for key in (*legacy_keys, encoder_key)]
        legacy = [folder.name for folder in folders[:-1] if folder.is_dir()]
        if legacy:
            logger.info("document store: also reading %s, written under an earlier key for this encoder", legacy)
        for shard in sorted(shard for folder in folders for shard in folder.glob("shard-*.npz")):
            try:
                with np.load(shard) as data:
                    keys, vectors = data["keys"], data["vectors"]
            except (OSError, ValueError, KeyError) as error:
                logger.warning("document store: skipping unreadable shard %s (%s)", shard, error)
                continue
            for key, vector in zip(keys, vectors):
                rows[key.tobytes()] = vector
        self._rows[encoder_key] = rows
        return rows

    def _write_shard(self, encoder_key: str, keys: list[bytes], vectors: np.ndarray) -> None:
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 16)

        def write(temporary: str) -> None:
            with open(temporary, "wb") as handle:
                np.savez(handle, keys=key_array, vectors=vectors)

        atomic_write(self.folder / encoder_key / f"shard-{uuid.uuid4().hex}.npz", write)

    def embeddings(
        self,
        model: SentenceTransformer,
        texts: Sequence[str],
        compute: Callable[[list[str]], np.ndarray],
        kind: str = "document",
        prompt: str | None = None,
        encoder_key: str | None = None,
    ) -> np.ndarray:
        """``(len(texts), dim)`` float32 embeddings: stored rows read back, the others computed and stored.

        Args:
            model: the model whose document route ``compute`` runs (its :func:`document_encoder_key` is the
                namespace).
            texts: the texts.
            compute: embeds a list of texts (only those not stored), returning a ``(n, dim)`` array.
            kind: what ``compute`` returns, e.g. ``"document"`` (``encode_document``) or ``"vocabulary"``.
            prompt: the prompt ``compute`` uses, if any (part of the key).
            encoder_key: a precomputed :func:`document_encoder_key` of ``model`` (it hashes all parameters).
        """
        encoder_key = encoder_key or document_encoder_key(model)
        legacy_keys = () if encoder_key in self._rows else legacy_route_fingerprints(model, DOCUMENT_ROUTE)
        rows = self._load(encoder_key, legacy_keys)
        keys = [_text_key(text, kind, prompt) for text in texts]
        missing: dict[bytes, str] = {}
        stored = 0
        for key, text in zip(keys, texts):
            if key in rows:
                stored += 1
            elif key not in missing:
                missing[key] = text
        self.hits += stored
        self.misses += len(missing)
        self.repeats += len(keys) - stored - len(missing)
        if missing:
            missing_keys = list(missing)
            for start in range(0, len(missing_keys), self.flush_every):
                chunk = missing_keys[start : start + self.flush_every]
                vectors = np.asarray(compute([missing[key] for key in chunk]), dtype=np.float32)
                if vectors.ndim != 2 or vectors.shape[0] != len(chunk):
                    raise ValueError(f"compute returned shape {vectors.shape} for {len(chunk)} texts")
                self._write_shard(encoder_key, chunk, vectors)
                rows.update(zip(chunk, vectors))
        if not keys:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([rows[key] for key in keys])

    def encode_document(
        self,
        model: SentenceTransformer,
        texts: Sequence[str],
        batch_size: int = 64,
        show_progress_bar: bool = False,
        encoder_key: str | None = None,
    ) -> np.ndarray:
        """``model.encode_document(texts)`` as float32, read from the store where possible."""

        def compute(missing: list[str]) -> np.ndarray:
            return model.encode_document(
                missing, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=show_progress_bar
            )

        return self.embeddings(model, texts, compute, kind="document", encoder_key=encoder_key)

    def __repr__(self) -> str:
        counts = f"hits={self.hits}, misses={self.misses}, repeats={self.repeats}"
        return f"DocumentEmbeddingStore({str(self.folder)!r}, {counts})"
