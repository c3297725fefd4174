"""Measuring a model: MTEB retrieval on local BEIR folders and Hub collections (:mod:`st_daft.evaluation.mteb`), the
BM25 baseline (:mod:`st_daft.evaluation.baselines`), dense + BM25 fusion (:mod:`st_daft.evaluation.hybrid`), the
in-training evaluator over a cached corpus (:mod:`st_daft.evaluation.retrieval_evaluator`), DAFT's collapse
diagnostics (:mod:`st_daft.evaluation.collapse`) and the printed tables (:mod:`st_daft.evaluation.mteb.tables`)."""

from st_daft.utils.deprecated_import import moved_name


def __getattr__(name: str) -> object:
    return moved_name(__name__, name)
