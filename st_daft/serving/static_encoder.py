"""Serving a static query route without torch: export it as a model2vec ``StaticModel`` folder.

A static query route is ``StaticEmbedding`` (a mean over token rows), possibly followed by linear ``Dense``
projections, then ``Normalize``. Its serving floor is: tokenize, gather rows, mean, normalise. sentence-transformers'
``encode`` adds a fixed cost to every call (it walks the model's modules and parameters, sets up progress bars and
switches the model to eval mode), which at batch size 1 costs several times the work itself.
model2vec's ``StaticModel.encode`` does just the floor's work in numpy, so the route is written out in its format:

- each ``Dense`` (identity activation: an affine map) is folded into the table. Mean pooling is linear and the mean
  of a bag of rows each shifted by the same bias is shifted by that bias, so ``mean(T[ids]) @ W.T + b ==
  mean(T[ids] @ W.T + b)``: the folded table gives the same vectors with no projection left to run;
- ``Normalize`` after the Router becomes model2vec's ``normalize`` setting;
- the route tokenizer's truncation becomes model2vec's ``max_length`` (a static route built from MiniLM's
  tokenizer truncates at 128 tokens, although ``StaticEmbedding.max_seq_length`` says infinite); none stays none;
- ``dtype`` ``float16`` halves the table; ``int8`` quarters it, with one scale per row stored as model2vec's per-token
  ``weights`` (a single scale for the whole table, model2vec's own ``quantize_to="int8"``, leaves the rows of
  frequent tokens, which a Zipf-weighted table keeps short, only a few quantisation levels).

The vectors equal the full model's ``encode_query`` vectors, with three differences that follow from model2vec's
own encoding and are kept rather than patched: model2vec drops unknown tokens (``[UNK]``) before the mean, where
``StaticEmbedding`` averages the ``[UNK]`` row in; a text with no known token (also the empty text) gets the zero
vector, where a route with a ``Dense`` bias gets the normalised bias; and with a ``max_length``, model2vec first cuts
each text to ``max_length`` times its vocabulary's median token length in characters, which can drop tokens of a
text longer than that before the token limit is reached (very long queries only).

Load the folder with ``model2vec.StaticModel.from_pretrained(path)``, no torch and no st_daft needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

# torch and sentence-transformers are imported by the export functions only: a query service that imports
# StaticQueryEncoder loads numpy, tokenizers and model2vec, nothing more.
if TYPE_CHECKING:
    from model2vec import StaticModel
    from sentence_transformers import SentenceTransformer
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["SERVING_DTYPES", "StaticQueryEncoder", "export_static_model", "static_route_table"]

QUERY_ROUTE = "query"  # st_daft.models.asymmetric.QUERY_ROUTE, repeated here so that serving does not import torch
SERVING_DTYPES = ("float32", "float16", "int8")


def _is_affine(module: nn.Module) -> bool:
    from sentence_transformers.sentence_transformer.modules import Dense
    from torch import nn

    return (
        isinstance(module, Dense)
        and isinstance(module.activation_function, nn.Identity)
        and module.module_input_name == module.module_output_name == "sentence_embedding"
    )


def static_route_table(
    model: SentenceTransformer, route: str = QUERY_ROUTE, chunk_rows: int = 65536
) -> tuple[np.ndarray, Tokenizer, bool]:
    """One route of an asymmetric model as a single token table: ``(table, tokenizer, normalize)``.

    The route must be a ``StaticEmbedding`` followed only by ``Dense`` layers with an identity activation (folded
    into the table, ``chunk_rows`` rows at a time), and the model may have only ``Normalize`` after its Router.

    Raises:
        ValueError: for a model without a Router, an unknown route, a route that is not static (e.g. a transformer),
            a non-linear ``Dense``, modules other than ``Normalize`` after the Router, a prompt, or ``truncate_dim``
            (each of them would change the vectors in a way a model2vec model cannot reproduce).
    """
    import torch
    from sentence_transformers.sentence_transformer.modules import Normalize, Router, StaticEmbedding

    from st_daft.models.asymmetric import route_prompt

    modules = list(model.children())
    routers = [index for index, module in enumerate(modules) if isinstance(module, Router)]
    if not routers:
        raise ValueError("cannot export a route from a model without a Router (a symmetric model)")
    router = modules[routers[0]]
    if route not in router.sub_modules:
        raise ValueError(f"no route {route!r} to export; the model has routes {list(router.sub_modules)}")
    route_modules = list(router.sub_modules[route])
    names = [type(module).__name__ for module in route_modules]
    if not route_modules or not isinstance(route_modules[0], StaticEmbedding):
        raise ValueError(
            f"format model2vec needs a static route (StaticEmbedding, then linear Dense layers); the {route} route is "
            f"{names}: export it with format sentence-transformers instead"
        )
    if not all(_is_affine(module) for module in route_modules[1:]):
        raise ValueError(
            f"format model2vec folds the layers after StaticEmbedding into its table, which only works for Dense "
            f"layers with an identity activation; the {route} route is {names}"
        )
    others = [type(module).__name__ for module in modules[: routers[0]] + modules[routers[0] + 1 :]]
    if any(name != "Normalize" for name in others):
        raise ValueError(f"format model2vec supports only Normalize around the Router, found {others}")
    if route_prompt(model, route):
        raise ValueError(
            f"the {route} route has the prompt {route_prompt(model, route)!r}, which a model2vec model cannot prepend"
        )
    if model.truncate_dim is not None:
        raise ValueError(
            f"the model truncates its vectors to {model.truncate_dim} dimensions after normalising them; a model2vec "
            "model normalises last, so its vectors would differ: unset truncate_dim to export"
        )

    static = route_modules[0]
    weight = static.embedding.weight
    chunks = []
    with torch.no_grad():
        for start in range(0, weight.shape[0], chunk_rows):
            features = {"sentence_embedding": weight[start : start + chunk_rows].float()}
            for dense in route_modules[1:]:
                features = dense(features)
            chunks.append(features["sentence_embedding"].cpu().numpy())
    table = np.ascontiguousarray(np.concatenate(chunks).astype(np.float32))
    tokenizer = Tokenizer.from_str(static.tokenizer.to_str())
    return table, tokenizer, any(isinstance(module, Normalize) for module in modules)


def _truncation_length(tokenizer: Tokenizer) -> int | None:
    """The token count the route's tokenizer truncates to, if any (a static route built from MiniLM's tokenizer
    inherits its 128)."""
    truncation = tokenizer.truncation
    return int(truncation["max_length"]) if truncation else None


def _int8_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantisation with one scale per row: ``table ~ codes * scales[:, None]``."""
    scales = np.abs(table).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    codes = np.clip(np.rint(table / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales.astype(np.float32)


def export_static_model(
    model: SentenceTransformer,
    output_path: str | Path | None = None,
    route: str = QUERY_ROUTE,
    dtype: str = "float32",
    config: dict[str, Any] | None = None,
) -> StaticModel:
    """Export a static route of an asymmetric model as a model2vec ``StaticModel`` (see the module docs).

    Args:
        model: an asymmetric model whose ``route`` is static (``StaticEmbedding`` [+ linear ``Dense``]).
        output_path: if given, the model is saved there (``StaticModel.save_pretrained``); it loads with
            ``model2vec.StaticModel.from_pretrained(output_path)``.
        route: the route to export, ``"query"`` (default).
        dtype: the table's storage type: ``"float32"`` (default), ``"float16"`` or ``"int8"`` (one scale per row).
        config: more entries for the folder's ``config.json`` (an index records the document route it pairs with).

    Returns:
        The ``StaticModel``; its ``encode`` gives the full model's ``encode_query`` vectors (float16 for a float16
        table), up to the unknown-token and empty-text cases in the module docs.
    """
    from model2vec import StaticModel

    if dtype not in SERVING_DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(SERVING_DTYPES)}")
    table, tokenizer, normalize = static_route_table(model, route)
    weights = None
    if dtype == "float16":
        table = table.astype(np.float16)
    elif dtype == "int8":
        table, weights = _int8_rows(table)
    card = model.model_card_data
    name = card.model_name if card.model_name and card.model_name != type(model).__name__ else None
    static_model = StaticModel(
        vectors=table,
        tokenizer=tokenizer,
        config={"st_daft_route": route, **(config or {})},
        normalize=normalize,
        base_model_name=name,
        language=card.language or None,
        weights=weights,
        max_length=_truncation_length(tokenizer),
    )
    if output_path is not None:
        title = f"{route.capitalize()} route of {name or 'an asymmetric (st-daft) model'}"
        static_model.save_pretrained(str(output_path), model_name=title)
        logger.info("%s route saved to %s as a model2vec model (%s table)", route, output_path, dtype)
    return static_model


class StaticQueryEncoder:
    """A static query route served at its floor: tokenize, gather rows, mean, normalise, in numpy, no torch.

    model2vec's ``StaticModel.encode`` does this work, plus a fixed cost on every call (splitting into batches, a
    progress bar, setting and resetting the tokenizer's truncation) that at batch size 1 is as large as the work
    itself (docs/results/serving.md). This encoder loads the same folder
    with model2vec (``StaticModel.from_pretrained``) and encodes with exactly its arithmetic (unknown tokens dropped,
    its character and token truncation, per-token weights, normalisation), set up once instead of per call; its
    vectors equal ``StaticModel.encode``'s (tested).

    Example::

        from st_daft.serving import StaticQueryEncoder  # imports numpy, tokenizers and model2vec only

        encoder = StaticQueryEncoder("model-query-m2v")  # a folder from `st-daft export --format model2vec`
        vector = encoder.encode("how do I sort a dict by value?")  # (dim,) float32, unit length

    Args:
        model: a model2vec ``StaticModel``, or the folder (or Hub id) to load one from.
    """

    def __init__(self, model: StaticModel | str | Path) -> None:
        from model2vec import StaticModel

        if not isinstance(model, StaticModel):
            model = StaticModel.from_pretrained(str(model))
        self.model = model
        self.tokenizer = Tokenizer.from_str(model.tokenizer.to_str())  # a private copy: its settings are fixed
        self.tokenizer.no_padding()
        if model.max_length is None:
            self.tokenizer.no_truncation()
            self.max_characters = None
        else:
            self.tokenizer.enable_truncation(model.max_length)
            self.max_characters = model.max_length * model.median_token_length
        self.table = model.embedding
        self.token_mapping = model.token_mapping
        self.weights = model.weights
        self.unknown_id = model.unk_token_id
        self.normalize = model.normalize
        self.dimension = model.dim
        self.dtype = np.dtype(np.float32) if self.table.dtype == np.int8 else self.table.dtype

    @classmethod
    def from_model(
        cls, model: SentenceTransformer, route: str = QUERY_ROUTE, dtype: str = "float32"
    ) -> StaticQueryEncoder:
        """The encoder of a static route of an asymmetric model, in memory (:func:`export_static_model`)."""
        return cls(export_static_model(model, route=route, dtype=dtype))

    def _rows(self, ids: list[int]) -> np.ndarray:
        rows = self.table[ids if self.token_mapping is None else self.token_mapping[ids]]
        return rows if self.weights is None else rows * self.weights[ids][:, None]

    def encode(self, texts: str | Sequence[str]) -> np.ndarray:
        """The route's vectors of ``texts``: ``(dim,)`` for one string, ``(len(texts), dim)`` for a list. A text with
        no known token gets the zero vector (as with model2vec)."""
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        if self.max_characters is not None:
            batch = [text[: self.max_characters] for text in batch]
        vectors = np.zeros((len(batch), self.dimension), dtype=self.dtype)
        for row, encoding in enumerate(self.tokenizer.encode_batch_fast(batch, add_special_tokens=False)):
            ids = encoding.ids
            if self.unknown_id is not None:
                ids = [token for token in ids if token != self.unknown_id]
            if ids:
                vectors[row] = self._rows(ids).mean(axis=0)
        if self.normalize:
            as_float32 = vectors.astype(np.float32, copy=False)
            vectors = (as_float32 / (np.linalg.norm(as_float32, axis=1, keepdims=True) + 1e-32)).astype(self.dtype)
        return vectors[0] if single else vectors

    __call__ = encode

    def __repr__(self) -> str:
        return f"StaticQueryEncoder(vocabulary={len(self.table)}, dimension={self.dimension}, dtype={self.dtype})"
