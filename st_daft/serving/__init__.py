"""Serving queries from a CPU without torch: the exported static query route and its encoder
(:mod:`st_daft.serving.static_encoder`), and the searcher over an index folder (:mod:`st_daft.serving.searcher`).
Importing this package loads numpy, tokenizers and model2vec only (the searcher adds faiss, and bm25s for fusion);
building an index (:mod:`st_daft.serving.build`, ``st-daft index``) needs torch and is imported on its own."""

from st_daft.serving.searcher import Searcher, SearchIndexError
from st_daft.serving.static_encoder import SERVING_DTYPES, StaticQueryEncoder, export_static_model, static_route_table

__all__ = [
    "SERVING_DTYPES",
    "Searcher",
    "SearchIndexError",
    "StaticQueryEncoder",
    "export_static_model",
    "static_route_table",
]
