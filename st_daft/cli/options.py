"""Argument types of the ``st-daft`` command line: each refuses a bad value naming what it expected (the numeric
ones, shared with the stage settings' flags, are in :mod:`st_daft.training.stages.settings`), and shared help texts."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger("st_daft")


def _stages(value: str) -> tuple[str, ...]:
    from st_daft.training.recipe import STAGES

    stages = tuple(stage.strip() for stage in value.split(",") if stage.strip())
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown or not stages:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    return stages


_OVERWRITE_HELP = (
    "replace what an earlier st-daft command wrote in the output folder: only the entries its .st-daft.json marker "
    "lists are removed (a folder holding anything else is refused)"
)
_DOCUMENT_STORE_HELP = (
    "folder of a document embedding store: document-route embeddings are kept there and reused by later runs "
    "with the same document encoder (e.g. a frozen one)"
)
