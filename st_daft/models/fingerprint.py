"""One identity for a route: a digest of everything that shapes the embeddings that route produces.

The corpus cache, the document store, the losses and the miner all ask the same question, "are these vectors still
what this route would compute?", and answer it with :func:`route_fingerprint`. It covers

- the route's parameters and buffers (for a symmetric model, every module but a trailing ``Normalize``),
- the modules after the ``Router`` (e.g. ``Normalize``, a ``Dense``), by type and state,
- the route's truncation length (``max_seq_length``), which changes document embeddings without changing a weight,
- with ``prompt`` (:func:`encoding_fingerprint`), the prompt ``encode_document`` / ``encode_query`` prepends.

Equal fingerprints mean equal embeddings; a fine-tuned route, a new ``Normalize`` or a shorter truncation each give
another fingerprint, so no stale vector is ever read as current.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.router import Router
from sentence_transformers.sentence_transformer.modules import Normalize
from torch import nn

from st_daft.models.asymmetric import DOCUMENT_ROUTE, get_route, has_route, route_prompt

__all__ = [
    "route_fingerprint",
    "encoding_fingerprint",
    "legacy_route_fingerprints",
    "fingerprint_matches",
    "hash_module_state",
]


def hash_module_state(digest: Any, module: torch.nn.Module) -> None:
    """Feed a module's parameters and buffers (names and bytes, in name order) into a hashlib ``digest``."""
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())


def route_fingerprint(model: SentenceTransformer, route: str = DOCUMENT_ROUTE, prompt: str | None = None) -> str:
    """A 32-hex-digit digest of ``route``'s parameters, the modules after the ``Router`` and its ``max_seq_length``
    (and of ``prompt`` when one is given: the text prepended to every input, which changes every embedding).

    For a model without a ``Router`` the whole model is the route, split as :func:`st_daft.build_asymmetric_model`
    splits a document encoder: its trailing ``Normalize`` modules count as the modules after the ``Router``, the rest
    as the route. So a plain model and the asymmetric model built on it (same weights, same truncation) get the same
    fingerprint, and a document store or cache filled by one serves the other. (The digest of the route's own state is
    hashed into the outer one: that is how st-daft 0.1's document store keyed its folders, so stores written then are
    read.)
    """
    if has_route(model, route):
        module = get_route(model, route)
        after_router = [module for module in model if not isinstance(module, Router)]
        max_seq_length = getattr(module[0], "max_seq_length", None)
    else:
        modules = list(model.children())
        after_router = []
        while modules and isinstance(modules[-1], Normalize):
            after_router.insert(0, modules.pop())
        module = nn.Sequential(*modules)  # the state names an asymmetric model's route has: "0.", "1.", ...
        max_seq_length = model.max_seq_length
    return _with_prompt(_fingerprint(module, after_router, max_seq_length), prompt)


def encoding_fingerprint(model: SentenceTransformer, route: str = DOCUMENT_ROUTE) -> str:
    """The fingerprint of what ``model.encode_document`` (``encode_query`` for the query route) returns when called
    without a prompt: :func:`route_fingerprint` with the model's own prompt for that route, if it has one. The
    corpus cache is keyed by it, so a cache built under one document prompt is never read as current under another.
    """
    return route_fingerprint(model, route, prompt=route_prompt(model, route))


def legacy_route_fingerprints(model: SentenceTransformer, route: str = DOCUMENT_ROUTE) -> tuple[str, ...]:
    """Fingerprints earlier st-daft versions gave ``route`` where :func:`route_fingerprint` now differs: for a model
    without a ``Router``, the whole model as the route and every module hashed again as if after a ``Router``. Stores
    and caches written under one of these are still read (:func:`fingerprint_matches`)."""
    if has_route(model, route):
        return ()
    return (_fingerprint(model, list(model), model.max_seq_length),)


def fingerprint_matches(
    model: SentenceTransformer, fingerprint: str, route: str = DOCUMENT_ROUTE, prompt: str | None = None
) -> bool:
    """Whether vectors recorded under ``fingerprint`` are what ``route`` of ``model`` computes now with ``prompt``
    (the current fingerprint, or a legacy one of the same route)."""
    legacy = {_with_prompt(old, prompt) for old in legacy_route_fingerprints(model, route)}
    return fingerprint == route_fingerprint(model, route, prompt) or fingerprint in legacy


def _with_prompt(fingerprint: str, prompt: str | None) -> str:
    """``fingerprint`` itself without a prompt (so unprompted fingerprints are those earlier versions wrote)."""
    if not prompt:
        return fingerprint
    return hashlib.blake2b(f"{fingerprint}\x00prompt\x00{prompt}".encode(), digest_size=16).hexdigest()


def _fingerprint(route: nn.Module, after_router: list[nn.Module], max_seq_length: int | None) -> str:
    route_state = hashlib.blake2b(digest_size=16)
    hash_module_state(route_state, route)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(route_state.hexdigest().encode())
    for module in after_router:
        digest.update(type(module).__qualname__.encode())
        hash_module_state(digest, module)
    digest.update(f"max_seq_length={max_seq_length}".encode())
    return digest.hexdigest()
