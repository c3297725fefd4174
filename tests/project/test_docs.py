"""docs/griffe_rst.py: the reST constructs of st-daft's docstrings become Markdown before mkdocstrings renders them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("griffe")

EXTENSION = Path(__file__).resolve().parents[2] / "docs" / "griffe_rst.py"


@pytest.fixture(scope="module")
def rst_to_markdown():
    spec = importlib.util.spec_from_file_location("griffe_rst", EXTENSION)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.rst_to_markdown


def test_roles_become_code_spans(rst_to_markdown) -> None:
    text = (
        "Uses :class:`~st_daft.embeddings.cache.StaleEmbeddingCache`, :func:`load_beir` and :meth:`~a.B.save`; "
        ":math:`x_i`."
    )
    assert rst_to_markdown(text) == "Uses `StaleEmbeddingCache`, `load_beir` and `save`; `x_i`."
    assert rst_to_markdown(":mod:`st_daft.negatives.miner`") == "`st_daft.negatives.miner`"


def test_literal_block_markers(rst_to_markdown) -> None:
    text = "Example::\n\n    model = build()\n\nExample:\n    ::\n\n        x = 1\n"
    assert rst_to_markdown(text) == "Example:\n\n    model = build()\n\nExample:\n\n        x = 1"


def test_math_block_becomes_fenced_code(rst_to_markdown) -> None:
    text = "Estimate:\n\n.. math::\n\n    D = a + b\n\nwhere a is one."
    assert rst_to_markdown(text) == "Estimate:\n\n```\nD = a + b\n```\n\nwhere a is one."
