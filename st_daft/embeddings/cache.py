"""A cache of document-route embeddings of a corpus, addressable by the tokenised features losses receive.

The cache embeds a corpus once with the document route (batched, no gradient, progress bar) and keeps

- the corpus ids and the embeddings (float32 or float16),
- a *token key* per document: a digest of the token ids the document route sees for it, so that a loss, which only
  receives tokenised ``sentence_features``, can tell which corpus rows a batch holds (its positives, to use the
  cached embedding or to keep them out of the negatives),
- a fingerprint of the route's parameters at build time.

While the document route is frozen (DAFT's alignment stage) the cache is exact. Once the route trains, the cached
embeddings go stale; :mod:`st_daft.negatives.corrector` maps them towards the current route.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from torch import Tensor

from st_daft.embeddings.index import build_faiss_index
from st_daft.models.asymmetric import DOCUMENT_ROUTE, route_prompt
from st_daft.models.fingerprint import encoding_fingerprint, fingerprint_matches
from st_daft.utils.distributed import all_reduce_sum, barrier, get_world_size, is_main_process
from st_daft.utils.io import atomic_save_npy, atomic_write_json, read_json

if TYPE_CHECKING:
    from st_daft.embeddings.store import DocumentEmbeddingStore

from st_daft.embeddings.encode import _dtype_name, _embed_in_memory, _write_memmap

logger = logging.getLogger(__name__)


CACHE_FORMAT_VERSION = 1
METADATA_FILE = "cache_metadata.json"
EMBEDDINGS_FILE = "embeddings.npy"
KEYS_FILE = "token_keys.npy"


class CacheMismatchError(ValueError):
    """The cache on disk does not belong to this model, corpus or configuration."""


def cache_is_current(model: SentenceTransformer, fingerprint: str) -> bool:
    """Whether a cache recorded under ``fingerprint`` holds what ``model.encode_document`` computes now: the same
    document route (see :func:`~st_daft.models.fingerprint.fingerprint_matches`) under the same document prompt."""
    return fingerprint_matches(model, fingerprint, DOCUMENT_ROUTE, prompt=route_prompt(model, DOCUMENT_ROUTE))


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
        fingerprint: :func:`~st_daft.models.fingerprint.encoding_fingerprint` of the document route the embeddings came
            from (its parameters, and its prompt if it has one).
    """

    def __init__(self, ids: list[str], embeddings: Tensor, keys: list[bytes], fingerprint: str) -> None:
        if len(ids) != embeddings.shape[0] or len(ids) != len(keys):
            raise ValueError(f"{len(ids)} ids, {embeddings.shape[0]} embeddings and {len(keys)} keys: must be equal")
        self._init_fields(ids, embeddings, keys, fingerprint)

    def _init_fields(self, ids: list[str], embeddings: Tensor, keys: list[bytes], fingerprint: str) -> None:
        self.ids = list(ids)
        self.embeddings = embeddings
        self.keys = list(keys)
        self.fingerprint = fingerprint
        self.folder: Path | None = None  # set while the embeddings are exactly those saved in this folder
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
        folder: str | Path | None = None,
        chunk_size: int = 8192,
        store: DocumentEmbeddingStore | None = None,
        reuse: bool = False,
    ) -> StaleEmbeddingCache:
        """Embed ``corpus`` (id -> text) once with the model's document route.

        With ``folder`` the embeddings are written chunk by chunk into an on-disk ``.npy`` memmap there (with the
        keys and metadata, i.e. a saved cache) and the returned cache reads them memory-mapped, so a corpus larger
        than memory can be cached. Under ``torchrun`` every process encodes its shard of each chunk and the main
        process alone writes; the others then map the same file. ``dtype=torch.float16`` halves the size either
        way. With ``reuse``, a complete cache already in ``folder`` of this document route over this corpus (same
        ids and texts) is loaded instead of built again, e.g. by a resumed run. With a
        :class:`~st_daft.embeddings.store.DocumentEmbeddingStore`, documents it already holds for this document route
        are read
        from it instead of being encoded again.
        """
        ids, texts, keys = _corpus_keys(model, corpus)
        fingerprint = encoding_fingerprint(model)
        if folder is not None and reuse:
            kept = _reusable(Path(folder), fingerprint, ids, keys, dtype)
            # Every process must take the same branch (building all-gathers): reuse only if all of them can.
            (usable,) = all_reduce_sum(torch.tensor([float(kept is not None)]))
            if usable.item() == get_world_size():
                logger.info("corpus cache: %d documents read back from %s", len(ids), folder)
                return kept
        where = "" if folder is None else f", into {folder} (memory-mapped)"
        logger.info("corpus cache: the document route's embeddings of %d documents%s", len(texts), where)
        if folder is None:
            embeddings = _embed_in_memory(model, texts, batch_size, dtype, show_progress_bar, chunk_size, store)
            return cls(ids, embeddings, keys, fingerprint)
        cache = cls.__new__(cls)
        cache._init_fields(ids, torch.empty(0, 0), keys, fingerprint)
        folder = Path(folder)
        cache.embeddings = cache._embed_into(
            folder, model, texts, batch_size, dtype, show_progress_bar, chunk_size, store
        )
        cache.folder = folder
        return cache

    def _embed_into(
        self,
        folder: Path,
        model: SentenceTransformer,
        texts: list[str],
        batch_size: int,
        dtype: torch.dtype,
        show_progress_bar: bool,
        chunk_size: int = 8192,
        store: DocumentEmbeddingStore | None = None,
        fingerprint: str | None = None,
    ) -> Tensor:
        """Embed ``texts`` (one per row) into ``folder`` as a saved cache with this cache's ids and keys (and
        ``fingerprint``, default its own), and return the embeddings memory-mapped: every process encodes its shard
        of each chunk, the main process alone writes."""
        writer = is_main_process()
        barrier()  # no process is still reading a cache this one is about to replace
        if writer:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / METADATA_FILE).unlink(missing_ok=True)  # the folder is not a valid cache until it is complete
        dimension = _write_memmap(
            folder / EMBEDDINGS_FILE, model, texts, batch_size, dtype, show_progress_bar, chunk_size, store, writer
        )
        if writer:
            self._write_keys_and_metadata(folder, _dtype_name(dtype), len(self), dimension, fingerprint)
        barrier()  # the file is complete before any process maps it
        return _mapped_embeddings(folder / EMBEDDINGS_FILE, (len(self), dimension))

    @classmethod
    def from_embeddings(
        cls,
        model: SentenceTransformer,
        corpus: dict[str, str],
        embeddings: Tensor,
        dtype: torch.dtype = torch.float32,
        store: DocumentEmbeddingStore | None = None,
    ) -> StaleEmbeddingCache:
        """The cache :meth:`build` would make, from ``embeddings`` (one row per document, in ``corpus``' order) that
        the document route as it is now already computed, e.g. in the vocabulary stage's pass over the corpus.
        With a ``store``, the rows it lacks are written to it, as :meth:`build` would have."""
        ids, texts, keys = _corpus_keys(model, corpus)
        if embeddings.shape[0] != len(ids):
            raise ValueError(f"{embeddings.shape[0]} embeddings for a corpus of {len(ids)} documents")
        embeddings = embeddings.to("cpu", torch.float32)
        if store is not None:
            row_of_text = {text: row for row, text in enumerate(texts)}
            store.add(model, texts, lambda missing: embeddings[[row_of_text[text] for text in missing]].numpy())
        logger.info("corpus cache: the document route's embeddings of %d documents, from an earlier pass", len(ids))
        return cls(ids, embeddings.to(dtype), keys, encoding_fingerprint(model))

    def refresh(
        self,
        model: SentenceTransformer,
        texts: list[str],
        batch_size: int = 64,
        show_progress_bar: bool = False,
        folder: str | Path | None = None,
    ) -> None:
        """Re-embed every row (``texts`` in row order) with the model's current document route.

        This is the expensive full-corpus re-embedding (the ANCE-style refresh); the fingerprint follows the route.
        Without ``folder`` the new embeddings are held in memory. With ``folder`` they are written there as an
        on-disk cache (as :meth:`build` writes one: the main process alone writes) and mapped, so a corpus larger
        than memory can be refreshed; the cache saved in the folder it was read from, if any, is left as it is.
        """
        if len(texts) != len(self):
            raise CacheMismatchError(f"refresh got {len(texts)} texts for a cache of {len(self)} rows")
        fingerprint, dtype = encoding_fingerprint(model), self.embeddings.dtype
        if folder is None:
            embeddings = _embed_in_memory(model, texts, batch_size, dtype, show_progress_bar)
        else:
            folder = Path(folder)
            embeddings = self._embed_into(
                folder, model, texts, batch_size, dtype, show_progress_bar, fingerprint=fingerprint
            )
        if embeddings.shape[1] != self.dimension:
            raise CacheMismatchError(
                f"the model embeds in {embeddings.shape[1]} dimensions, the cache has {self.dimension}"
            )
        self.embeddings, self.fingerprint = embeddings, fingerprint
        self.folder = folder  # None: no longer what is on disk

    def float32(self, rows: Tensor | None = None, chunk_size: int = 65536) -> Tensor:
        """The embeddings (or some rows) as a float32 tensor, converted chunk by chunk from float16 or a memmap."""
        if rows is not None:
            return self.embeddings[rows].to(torch.float32)
        if self.embeddings.dtype == torch.float32:
            return self.embeddings
        return torch.cat([chunk.to(torch.float32) for chunk in self.embeddings.split(chunk_size)])

    def build_index(self, kind: str = "flat", embeddings: Tensor | None = None, **options: Any) -> Any:
        """A faiss inner-product index over the cache (or over ``embeddings``, e.g. corrected ones), see
        :func:`st_daft.embeddings.index.build_faiss_index` (filled chunk by chunk: no float32 copy of a float16 cache).

        The index stores vectors in the cache's type unless ``storage`` says otherwise: a float16 cache gets a
        float16 index, half the memory of a float32 one, no slower, with the same neighbours
        (``benchmarks/index_storage.py``)."""
        options.setdefault("storage", "float16" if self.embeddings.dtype == torch.float16 else "float32")
        return build_faiss_index(self.embeddings if embeddings is None else embeddings, kind, **options)

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
        """True when the model's document route still has the parameters (and the prompt) the cache was built with."""
        return cache_is_current(model, self.fingerprint)

    def save(self, folder: str | Path) -> None:
        """Write the cache to ``folder`` (metadata JSON, embeddings and keys as .npy), atomically per file.

        The metadata is removed first and written last, so an interrupted save leaves no folder that loads.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.folder is not None and self.folder.resolve() == folder.resolve():
            return  # a memory-mapped cache saved in place is already there
        (folder / METADATA_FILE).unlink(missing_ok=True)
        atomic_save_npy(folder / EMBEDDINGS_FILE, self.embeddings.numpy())
        self._write_keys_and_metadata(folder, _dtype_name(self.embeddings.dtype), len(self), self.dimension)

    def _write_keys_and_metadata(
        self, folder: Path, dtype: str, size: int, dimension: int, fingerprint: str | None = None
    ) -> None:
        atomic_save_npy(folder / KEYS_FILE, np.frombuffer(b"".join(self.keys), dtype=np.uint8).reshape(-1, 16))
        metadata = {
            "format_version": CACHE_FORMAT_VERSION,
            "ids": self.ids,
            "fingerprint": fingerprint or self.fingerprint,
            "dimension": dimension,
            "size": size,
            "dtype": dtype,
        }
        atomic_write_json(folder / METADATA_FILE, metadata, indent=None)

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
        metadata = read_json(metadata_file, "cache metadata")
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
        tensor = _mapped_embeddings(folder / EMBEDDINGS_FILE, (metadata["size"], metadata["dimension"]), mmap)
        keys_array = _load_npy(folder / KEYS_FILE, mmap=False)
        keys = [row.tobytes() for row in keys_array]
        cache = cls(metadata["ids"], tensor, keys, metadata["fingerprint"])
        cache.folder = folder
        return cache


def _corpus_keys(model: SentenceTransformer, corpus: dict[str, str]) -> tuple[list[str], list[str], list[bytes]]:
    """``(ids, texts, token keys)`` of a corpus, refused when it is empty or holds an empty document."""
    if not corpus:
        raise ValueError("cannot build a cache over an empty corpus")
    ids = list(corpus)
    texts = [corpus[doc_id] for doc_id in ids]
    empty = [doc_id for doc_id, text in zip(ids, texts) if not text.strip()]
    if empty:
        raise ValueError(f"{len(empty)} corpus documents have empty text, e.g. {empty[:3]}")
    keys: list[bytes] = []
    for start in range(0, len(texts), 1024):
        keys.extend(token_keys(model.preprocess(texts[start : start + 1024], task=DOCUMENT_ROUTE)))
    return ids, texts, keys


def _reusable(
    folder: Path, fingerprint: str, ids: list[str], keys: list[bytes], dtype: torch.dtype
) -> StaleEmbeddingCache | None:
    """The cache saved in ``folder`` if it is complete and holds exactly these rows from this route, else None."""
    try:
        cache = StaleEmbeddingCache.load(folder, expected_fingerprint=fingerprint, expected_size=len(ids), mmap=True)
    except (ValueError, OSError) as error:  # CacheMismatchError, or a file that does not parse
        if (folder / METADATA_FILE).exists():
            logger.info("corpus cache in %s not reused: %s", folder, error)
        return None
    if cache.ids != ids or cache.keys != keys or cache.embeddings.dtype != dtype:
        logger.info("corpus cache in %s not reused: another corpus or storage type", folder)
        return None
    return cache


def _mapped_embeddings(path: Path, shape: tuple[int, int], mmap: bool = True) -> Tensor:
    """The embeddings file as a tensor (memory-mapped, copy-on-write, with ``mmap``), refused unless ``shape``."""
    embeddings = _load_npy(path, mmap)
    if embeddings.shape != shape:
        raise CacheMismatchError(
            f"{path}: embeddings shape {embeddings.shape} does not match its metadata ({shape[0]} x {shape[1]})"
        )
    with warnings.catch_warnings():  # a read-only memmap: torch warns that the tensor is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(embeddings)


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    """``np.load`` naming the file when it is missing, truncated or not an .npy array."""
    if not path.is_file():
        raise CacheMismatchError(f"{path}: cache file not found")
    try:
        return np.load(path, mmap_mode="c" if mmap else None)
    except (OSError, ValueError, EOFError) as error:
        raise CacheMismatchError(f"{path}: cache file is truncated or corrupt ({error}); rebuild the cache") from None
