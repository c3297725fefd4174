"""Argument types of the ``st-daft`` command line: each refuses a bad value naming what it expected."""

from __future__ import annotations

import argparse
import logging
import math

logger = logging.getLogger("st_daft")


def _stages(value: str) -> tuple[str, ...]:
    from st_daft.training.recipe import STAGES

    stages = tuple(stage.strip() for stage in value.split(",") if stage.strip())
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown or not stages:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    return stages


def _negatives(value: str) -> str:
    from st_daft.negatives.strategy import parse_negatives

    try:
        return parse_negatives(value).spec
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _index_option(value: str) -> tuple[str, int | str]:
    """``KEY=VALUE`` of ``--mining-index-option``: the value an integer where it reads as one, checked by key."""
    from st_daft.training.stages.finetune import check_mining_index_option

    key, equals, text = value.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    option = (key, int(text)) if text.lstrip("-").isdigit() else (key, text)
    try:
        check_mining_index_option(*option)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return option


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not (number >= 0 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {value}")
    return number


def _unit_float(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return number


_OVERWRITE_HELP = (
    "replace what an earlier st-daft command wrote in the output folder: only the entries its .st-daft.json marker "
    "lists are removed (a folder holding anything else is refused)"
)
_DOCUMENT_STORE_HELP = (
    "folder of a document embedding store: document-route embeddings are kept there and reused by later runs "
    "with the same document encoder (e.g. a frozen one)"
)
