"""The ``st-daft`` command: ``st-daft train``, ``evaluate``, ``export``, ``soup``, ``index`` and ``search``; ``main``
runs one."""

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
from st_daft.cli.errors import FAILED, INTERRUPTED, interrupted_message, one_line, os_message
from st_daft.cli.search import add_index_parser, add_search_parser, run_index, run_search
from st_daft.cli.train import _add_train_parser, run_train

logger = logging.getLogger("st_daft")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="st-daft", description="Train and evaluate fast asymmetric retrievers.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(commands)
    _add_evaluate_parser(commands)
    _add_export_parser(commands)
    _add_soup_parser(commands)
    add_index_parser(commands)
    add_search_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``st-daft`` command; every failure it can explain is one line on stderr with exit status 2, Ctrl-C
    one line with 130 (:mod:`st_daft.cli.errors`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in the output folder's marker
    from safetensors import SafetensorError

    from st_daft.data import DataError

    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "export":
            return run_export(args)
        if args.command == "soup":
            return run_soup(args)
        if args.command == "index":
            return run_index(args)
        if args.command == "search":
            return run_search(args)
        return run_evaluate(args)
    except KeyboardInterrupt:
        print(f"\n{interrupted_message(args)}", file=sys.stderr)  # on its own line, after a progress bar's
        return INTERRUPTED
    except (DataError, FileNotFoundError, ValueError) as error:
        print(one_line(args.command, str(error)), file=sys.stderr)
    except SafetensorError as error:
        print(one_line(args.command, f"a weights file is truncated or not safetensors ({error})"), file=sys.stderr)
    except OSError as error:  # a file that cannot be read or written, a full disk
        print(one_line(args.command, os_message(error)), file=sys.stderr)
    return FAILED
