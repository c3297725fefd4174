"""Document-route embeddings of many texts: :func:`embed_documents` in one process, :func:`embed_sharded` across a
process group (each rank embeds one contiguous shard and the shards are all-gathered), and the chunked writers the
corpus cache is filled with (one chunk's float32 rows in memory at a time, in memory or into an .npy memmap).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from torch import Tensor

from st_daft.utils.distributed import compute_sharded

if TYPE_CHECKING:
    from st_daft.embeddings.store import DocumentEmbeddingStore

logger = logging.getLogger(__name__)


def embed_documents(
    model: SentenceTransformer,
    texts: list[str],
    batch_size: int = 64,
    show_progress_bar: bool = False,
    store: DocumentEmbeddingStore | None = None,
) -> Tensor:
    """Document-route embeddings of ``texts`` (eval mode, no gradient) as a CPU float32 tensor.

    With a ``store``, texts it holds for this exact document route are read back and the others are stored.
    """
    was_training = model.training
    model.eval()
    try:
        if store is not None:
            return torch.from_numpy(store.encode_document(model, texts, batch_size, show_progress_bar))
        embeddings = model.encode_document(
            texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=show_progress_bar
        )
    finally:
        model.train(was_training)
    return embeddings.detach().to("cpu", torch.float32)


def embed_sharded(
    model: SentenceTransformer,
    texts: list[str],
    batch_size: int = 64,
    show_progress_bar: bool = False,
    store: DocumentEmbeddingStore | None = None,
) -> Tensor:
    """Document-route embeddings of ``texts`` (CPU float32, in order), computed once across the process group.

    In a process group each rank embeds one contiguous shard of ``texts`` and the shards are all-gathered, so every
    rank returns the full matrix for ``1/world_size`` of the work; in one process this is
    :func:`embed_documents`. A ``store`` is read by every rank and written by each for its own shard
    (stores take concurrent writers: every process writes its own shard files).
    """

    def embed(shard: list[str], show: bool) -> Tensor:
        return embed_documents(model, shard, batch_size, show_progress_bar=show, store=store)

    return compute_sharded(texts, embed, show_progress_bar, like=model.device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _embedded_chunks(
    model: SentenceTransformer,
    texts: list[str],
    batch_size: int,
    show_progress_bar: bool,
    chunk_size: int,
    store: DocumentEmbeddingStore | None,
) -> Iterator[tuple[int, Tensor]]:
    """``(start, float32 embeddings of texts[start : start + chunk_size])``, each chunk sharded across the process
    group: one chunk's float32 rows in memory at a time, not the whole corpus's."""
    for start in range(0, len(texts), chunk_size):
        yield start, embed_sharded(model, texts[start : start + chunk_size], batch_size, show_progress_bar, store)


def _embed_in_memory(
    model: SentenceTransformer,
    texts: list[str],
    batch_size: int,
    dtype: torch.dtype,
    show_progress_bar: bool,
    chunk_size: int = 8192,
    store: DocumentEmbeddingStore | None = None,
) -> Tensor:
    """Document-route embeddings of ``texts`` as one CPU tensor of ``dtype``, filled chunk by chunk (a float16 cache
    never exists as float32, nor as a list of batches beside its stack)."""
    output: Tensor | None = None
    for start, chunk in _embedded_chunks(model, texts, batch_size, show_progress_bar, chunk_size, store):
        if output is None:
            output = torch.empty(len(texts), chunk.shape[1], dtype=dtype)
        output[start : start + len(chunk)] = chunk
    return output


def _write_memmap(
    path: Path,
    model: SentenceTransformer,
    texts: list[str],
    batch_size: int,
    dtype: torch.dtype,
    show_progress_bar: bool,
    chunk_size: int,
    store: DocumentEmbeddingStore | None = None,
    write: bool = True,
) -> int:
    """Embed ``texts`` chunk by chunk into an .npy memmap at ``path`` (renamed into place when complete); with
    ``write=False`` (a process other than the main one) take part in the sharded encoding only. The dimension."""
    temporary = path.with_name(path.name + ".tmp.npy")
    numpy_dtype = np.float16 if dtype == torch.float16 else np.float32
    memmap, dimension = None, 0
    for start, chunk in _embedded_chunks(model, texts, batch_size, show_progress_bar, chunk_size, store):
        dimension = int(chunk.shape[1])
        if not write:
            continue
        if memmap is None:
            memmap = np.lib.format.open_memmap(temporary, mode="w+", dtype=numpy_dtype, shape=(len(texts), dimension))
        memmap[start : start + len(chunk)] = chunk.numpy().astype(numpy_dtype)
    if memmap is not None:
        memmap.flush()
        del memmap
        temporary.replace(path)
    return dimension
