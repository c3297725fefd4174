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
two processes can share a store (each writes its own shards). Only the keys are held in memory: the vectors stay in
the shards and are read as they are asked for, so a store of millions of rows costs the memory of its keys (24
bytes a row), not of its vectors.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

from st_daft.models.asymmetric import DOCUMENT_ROUTE, route_prompt
from st_daft.models.fingerprint import legacy_route_fingerprints, route_fingerprint
from st_daft.utils.io import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["DocumentEmbeddingStore", "document_encoder_key"]

# A text's key: its 16 digest bytes as two big-endian integers, so that keys sort and search as numbers.
KEY_DTYPE = np.dtype([("high", ">u8"), ("low", ">u8")])


def document_encoder_key(model: SentenceTransformer) -> str:
    """The store's namespace for ``model``: :func:`st_daft.models.fingerprint.route_fingerprint` of its document route
    (parameters, the modules after the ``Router``, truncation length). Equal keys mean equal document embeddings."""
    return route_fingerprint(model, DOCUMENT_ROUTE)


def document_prompt(model: SentenceTransformer, prompt: str | None = None) -> str | None:
    """The prompt ``model.encode_document(texts, prompt=prompt)`` prepends: ``prompt``, else the model's own document
    prompt (None for none). Part of a stored document row's key."""
    return prompt if prompt is not None else route_prompt(model, DOCUMENT_ROUTE) or None


def _text_key(text: str, kind: str, prompt: str | None) -> bytes:
    return hashlib.blake2b(f"{kind}\x00{prompt or ''}\x00{text}".encode(), digest_size=16).digest()


class _SortedKeys:
    """Keys in sorted order, as two native integer columns (searched as numbers), beside each one's location."""

    def __init__(
        self, high: np.ndarray | None = None, low: np.ndarray | None = None, locations: np.ndarray | None = None
    ) -> None:
        self.high = np.empty(0, dtype=np.uint64) if high is None else high
        self.low = np.empty(0, dtype=np.uint64) if low is None else low
        self.locations = np.empty(0, dtype=np.int64) if locations is None else locations

    def __len__(self) -> int:
        return len(self.locations)

    @classmethod
    def unsorted(cls, keys: np.ndarray, locations: np.ndarray) -> _SortedKeys:
        """``keys`` (of :data:`KEY_DTYPE`) and their locations, not yet sorted: only to be :meth:`merged`."""
        return cls(keys["high"].astype(np.uint64), keys["low"].astype(np.uint64), locations)

    def merged(self, others: Sequence[_SortedKeys]) -> _SortedKeys:
        """These keys and ``others``: a stable sort, so where a key repeats the first one held wins."""
        parts = [self, *others]
        high = np.concatenate([part.high for part in parts])
        low = np.concatenate([part.low for part in parts])
        locations = np.concatenate([part.locations for part in parts])
        order = np.lexsort((low, high))
        return _SortedKeys(high[order], low[order], locations[order])

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The location of each of ``keys``, -1 where it is not held."""
        locations = np.full(len(keys), -1, dtype=np.int64)
        if not len(self):
            return locations
        high, low = keys["high"].astype(np.uint64), keys["low"].astype(np.uint64)
        order = np.argsort(high)  # sorted needles search several times faster (each starts near the last)
        first, last = np.empty(len(keys), dtype=np.int64), np.empty(len(keys), dtype=np.int64)
        first[order] = np.searchsorted(self.high, high[order], "left")
        last[order] = np.searchsorted(self.high, high[order], "right")
        single = np.flatnonzero(last - first == 1)
        match = self.low[first[single]] == low[single]
        locations[single[match]] = self.locations[first[single[match]]]
        for i in np.flatnonzero(last - first > 1).tolist():  # keys that share their first 8 bytes (or repeat): rare
            same = np.flatnonzero(self.low[first[i] : last[i]] == low[i])
            if len(same):
                locations[i] = self.locations[first[i] + same[0]]
        return locations


class _StoredRows:
    """Every row stored under one encoder key, found by binary search and read from its shard file when asked for.

    Only the keys live in memory (16 bytes a row, sorted, beside an 8-byte location); the vectors stay in their
    shard files and a lookup reads just the rows it asks for. So a store of millions of rows opens in the memory of
    its keys, not of its vectors.
    """

    merge_at = 1 << 16  # the least count of recent rows merged into the rows as opened

    def __init__(self) -> None:
        self.shards: list[np.ndarray | _VectorsInFile] = []  # each shard's vectors, left in its file where it allows
        self.starts = np.zeros(1, dtype=np.int64)  # shard i holds rows starts[i]:starts[i + 1]
        # Two sorted levels of (key, location): the rows as opened, and the rows added since, merged into the first
        # once they are a quarter of it, so that adding shard after shard costs O(n log n) in all, not O(n) each.
        self._levels = [_SortedKeys(), _SortedKeys()]

    def add(self, shards: Sequence[tuple[np.ndarray, np.ndarray | _VectorsInFile]]) -> None:
        """Add shards, each its ``(n,)`` keys and ``(n, dim)`` vectors (a key already held keeps its first row)."""
        new = []
        for keys, vectors in shards:
            new.append(_SortedKeys.unsorted(keys, self.starts[-1] + np.arange(len(keys), dtype=np.int64)))
            self.shards.append(vectors)
            self.starts = np.append(self.starts, self.starts[-1] + len(keys))
        held, recent = self._levels
        if len(recent) + sum(map(len, new)) > max(self.merge_at, len(held) // 4):
            self._levels = [held.merged([recent, *new]), _SortedKeys()]
        else:
            self._levels = [held, recent.merged(new)]

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The location of each key, -1 where it is not stored."""
        held, recent = self._levels
        locations = held.find(keys)
        absent = locations < 0
        if absent.any():
            locations[absent] = recent.find(keys[absent])
        return locations

    def gather(self, locations: np.ndarray) -> np.ndarray:
        """``(len(locations), dim)`` float32 vectors, read shard by shard."""
        shard_of = np.searchsorted(self.starts, locations, side="right") - 1
        dimension = self.shards[int(shard_of[0])].shape[1]
        vectors = np.empty((len(locations), dimension), dtype=np.float32)
        for shard in np.unique(shard_of):
            selected = np.flatnonzero(shard_of == shard)
            rows = locations[selected] - self.starts[shard]
            order = np.argsort(rows)  # ascending reads from the file
            rows, source = rows[order], self.shards[shard]
            vectors[selected[order]] = source.take(rows) if isinstance(source, _VectorsInFile) else source[rows]
        return vectors


@dataclass(frozen=True)
class _VectorsInFile:
    """A shard's ``(rows, dimension)`` little-endian float32 vectors, left in its file at ``offset`` and read as asked.

    Plain reads, not a memory map: a map keeps a file descriptor open per shard (thousands for a large store) and
    its read-ahead pulls in far more of the file than a few scattered rows.
    """

    path: Path
    offset: int
    shape: tuple[int, int]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows`` (ascending); each run of consecutive rows is one read."""
        dimension = self.shape[1]
        row_bytes = 4 * dimension
        vectors = np.empty((len(rows), dimension), dtype="<f4")
        runs = np.flatnonzero(np.diff(rows) != 1) + 1
        with open(self.path, "rb", buffering=0) as handle:
            for first, last in zip([0, *runs.tolist()], [*runs.tolist(), len(rows)]):
                handle.seek(self.offset + int(rows[first]) * row_bytes)
                buffer, filled = memoryview(vectors[first:last]).cast("B"), 0
                while filled < len(buffer):  # a read may return less than asked
                    count = handle.readinto(buffer[filled:])
                    if not count:
                        raise OSError(f"document store shard {self.path} is shorter than its header says")
                    filled += count
        return vectors


def _vectors_in_file(path: Path, member: zipfile.ZipInfo) -> _VectorsInFile | None:
    """Where the array of ``member`` of an uncompressed ``.npz`` (as ``np.savez`` writes) lies in the file, or None
    where it cannot be read in place (compressed, or not C-ordered little-endian float32): then it is read into
    memory."""
    if member.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as handle:
        handle.seek(member.header_offset)
        header = handle.read(30)
        if header[:4] != b"PK\x03\x04":
            raise ValueError(f"no zip entry at {member.header_offset}")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        handle.seek(member.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
        offset = handle.tell()
    if fortran_order or dtype != np.dtype("<f4") or len(shape) != 2:
        return None
    return _VectorsInFile(path, offset, (int(shape[0]), int(shape[1])))


def _read_shard(path: Path) -> tuple[np.ndarray, np.ndarray | _VectorsInFile]:
    """A shard's ``(n,)`` keys (in memory) and ``(n, dim)`` float32 vectors (left in the file where it allows)."""
    with np.load(path) as data:
        keys = np.ascontiguousarray(data["keys"], dtype=np.uint8)
        vectors = _vectors_in_file(path, data.zip.getinfo("vectors.npy"))
        if vectors is None:
            vectors = data["vectors"]
            if vectors.ndim != 2 or vectors.dtype != np.float32:
                raise ValueError(f"vectors of shape {vectors.shape} and dtype {vectors.dtype}, not (n, dim) float32")
    if keys.ndim != 2 or keys.shape[1] != KEY_DTYPE.itemsize or vectors.shape[0] != len(keys):
        raise ValueError(f"keys of shape {keys.shape} and vectors of shape {vectors.shape}")
    return keys.view(KEY_DTYPE).reshape(-1), vectors


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
        self._rows: dict[str, _StoredRows] = {}  # encoder key -> its rows
        self.hits = 0  # texts read back from the store
        self.misses = 0  # texts encoded (each distinct new text once)
        self.repeats = 0  # texts that repeat another text of the same call: they share its row

    def _load(self, encoder_key: str, legacy_keys: Sequence[str] = ()) -> _StoredRows:
        """The rows stored under ``encoder_key``, and under the keys an earlier st-daft gave the same encoder (read,
        never moved: new rows go to ``encoder_key``'s folder)."""
        if encoder_key in self._rows:
            return self._rows[encoder_key]
        rows = _StoredRows()
        shards = []
        folders = [self.folder / key for key in (*legacy_keys, encoder_key)]
        legacy = [folder.name for folder in folders[:-1] if folder.is_dir()]
        if legacy:
            logger.info("document store: also reading %s, written under an earlier key for this encoder", legacy)
        for shard in sorted(shard for folder in folders for shard in folder.glob("shard-*.npz")):
            try:
                keys, vectors = _read_shard(shard)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
                logger.warning("document store: skipping unreadable shard %s (%s)", shard, error)
                continue
            if len(keys):
                shards.append((keys, vectors))
        rows.add(shards)
        self._rows[encoder_key] = rows
        return rows

    def _write_shard(self, encoder_key: str, keys: list[bytes], vectors: np.ndarray) -> Path:
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 16)

        def write(temporary: str) -> None:
            with open(temporary, "wb") as handle:
                np.savez(handle, keys=key_array, vectors=vectors)

        return atomic_write(self.folder / encoder_key / f"shard-{uuid.uuid4().hex}.npz", write)

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
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        rows, locations = self._store_missing(model, texts, compute, kind, prompt, encoder_key)
        return rows.gather(locations)

    def add(
        self,
        model: SentenceTransformer,
        texts: Sequence[str],
        compute: Callable[[list[str]], np.ndarray],
        kind: str = "document",
        prompt: str | None = None,
        encoder_key: str | None = None,
    ) -> None:
        """Store the embeddings of those ``texts`` the store lacks (computed by ``compute``), reading none back:
        :meth:`embeddings` without its result, for rows computed elsewhere (the same arguments)."""
        if texts:
            self._store_missing(model, texts, compute, kind, prompt, encoder_key)

    def _store_missing(
        self,
        model: SentenceTransformer,
        texts: Sequence[str],
        compute: Callable[[list[str]], np.ndarray],
        kind: str,
        prompt: str | None,
        encoder_key: str | None,
    ) -> tuple[_StoredRows, np.ndarray]:
        """Compute and store the texts not stored yet; the encoder's rows and where each text's vector is."""
        encoder_key = encoder_key or document_encoder_key(model)
        legacy_keys = () if encoder_key in self._rows else legacy_route_fingerprints(model, DOCUMENT_ROUTE)
        rows = self._load(encoder_key, legacy_keys)
        raw_keys = [_text_key(text, kind, prompt) for text in texts]
        keys = np.frombuffer(b"".join(raw_keys), dtype=KEY_DTYPE)
        locations = rows.find(keys)
        missing: dict[bytes, str] = {}  # each new text once, in order
        for position in np.flatnonzero(locations < 0).tolist():
            missing.setdefault(raw_keys[position], texts[position])
        stored = int((locations >= 0).sum())
        self.hits += stored
        self.misses += len(missing)
        self.repeats += len(keys) - stored - len(missing)
        missing_keys = list(missing)
        for start in range(0, len(missing_keys), self.flush_every):
            chunk = missing_keys[start : start + self.flush_every]
            vectors = np.asarray(compute([missing[key] for key in chunk]), dtype=np.float32)
            if vectors.ndim != 2 or vectors.shape[0] != len(chunk):
                raise ValueError(f"compute returned shape {vectors.shape} for {len(chunk)} texts")
            shard = self._write_shard(encoder_key, chunk, vectors)
            # Read back from the file just written, so new rows do not accumulate in memory either.
            rows.add([_read_shard(shard)])
        return rows, rows.find(keys) if missing else locations

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

        prompt = document_prompt(model)
        return self.embeddings(model, texts, compute, kind="document", prompt=prompt, encoder_key=encoder_key)

    def __repr__(self) -> str:
        counts = f"hits={self.hits}, misses={self.misses}, repeats={self.repeats}"
        return f"DocumentEmbeddingStore({str(self.folder)!r}, {counts})"
