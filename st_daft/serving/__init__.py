"""Serving queries from a CPU without torch: the exported static query route and its encoder
(:mod:`st_daft.serving.static_encoder`). Importing this package loads numpy, tokenizers and model2vec only."""

from st_daft.serving.static_encoder import SERVING_DTYPES, StaticQueryEncoder, export_static_model, static_route_table

__all__ = ["SERVING_DTYPES", "StaticQueryEncoder", "export_static_model", "static_route_table"]
