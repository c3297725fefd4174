"""One identity for a route: a digest of everything that shapes the embeddings that route produces.

The corpus cache, the document store, the losses and the miner all ask the same question, "are these vectors still
what this route would compute?", and answer it with :func:`route_fingerprint`. It covers

- the route's parameters and buffers (the whole model for a symmetric model),
- the modules after the ``Router`` (e.g. ``Normalize``, a ``Dense``), by type and state,
- the route's truncation length (``max_seq_length``), which changes document embeddings without changing a weight.

Equal fingerprints mean equal embeddings; a fine-tuned route, a new ``Normalize`` or a shorter truncation each give
another fingerprint, so no stale vector is ever read as current.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.router import Router

from st_daft.model import DOCUMENT_ROUTE, has_route, route_or_model

__all__ = ["route_fingerprint", "hash_module_state"]


def hash_module_state(digest: Any, module: torch.nn.Module) -> None:
    """Feed a module's parameters and buffers (names and bytes, in name order) into a hashlib ``digest``."""
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())


def route_fingerprint(model: SentenceTransformer, route: str = DOCUMENT_ROUTE) -> str:
    """A 32-hex-digit digest of ``route``'s parameters, the modules after the ``Router`` and its ``max_seq_length``.

    For a model without a ``Router`` the whole model is the route. (The digest of the route's own state is hashed
    into the outer one: that is how st-daft 0.1's document store keyed its folders, so stores written then are read.)
    """
    route_state = hashlib.blake2b(digest_size=16)
    module = route_or_model(model, route)
    hash_module_state(route_state, module)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(route_state.hexdigest().encode())
    for after_router in model:
        if isinstance(after_router, Router):
            continue
        digest.update(type(after_router).__qualname__.encode())
        hash_module_state(digest, after_router)
    max_seq_length = getattr(module[0], "max_seq_length", None) if has_route(model, route) else model.max_seq_length
    digest.update(f"max_seq_length={max_seq_length}".encode())
    return digest.hexdigest()
