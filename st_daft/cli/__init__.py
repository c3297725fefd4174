"""The ``st-daft`` command: ``st-daft train``, ``evaluate``, ``export`` and ``soup``; ``main`` runs one."""

from __future__ import annotations

import argparse
import logging
import sys

from st_daft.cli.commands import (
    _add_evaluate_parser,
    _add_export_parser,
    _add_soup_parser,
    run_evaluate,
    run_export,
    run_soup,
)
from st_daft.cli.train import _add_train_parser, run_train

logger = logging.getLogger("st_daft")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="st-daft", description="Train and evaluate fast asymmetric retrievers.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(commands)
    _add_evaluate_parser(commands)
    _add_export_parser(commands)
    _add_soup_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    from st_daft.data import DataError

    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "export":
            return run_export(args)
        if args.command == "soup":
            return run_soup(args)
        return run_evaluate(args)
    except (DataError, FileNotFoundError, ValueError) as error:
        print(f"st-daft {args.command}: error: {error}", file=sys.stderr)
        return 2
