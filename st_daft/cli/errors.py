"""How the ``st-daft`` command reports a failure: one line, ``st-daft <command>: error: <what>; <what to do>``,
exit status 2; Ctrl-C: one line saying where the last complete checkpoint is and how to go on, exit status 130."""

from __future__ import annotations

import argparse
from pathlib import Path

from st_daft.data import hub_failure
from st_daft.utils.output import MARKER_FILE

#: The exit status of a failure the command explains, and of an interrupted command (128 + SIGINT, as shells say).
FAILED, INTERRUPTED = 2, 130


def one_line(command: str, message: str) -> str:
    """``st-daft <command>: error: <message>``, the message on one line."""
    return f"st-daft {command}: error: {' '.join(message.split())}"


def hub_message(error: OSError, sources: list[tuple[str, str]]) -> str:
    """An OSError while loading models, in words: the Hub ids among ``(option, value)`` ``sources`` (those that are
    not local paths) could not be loaded."""
    remote = [f"{option} {value}".strip() for option, value in sources if value and not Path(value).exists()]
    if not remote:
        return os_message(error)
    return f"{', '.join(remote)}: {hub_failure(error)}; give a model folder, or a Hub id that exists"


def os_message(error: OSError) -> str:
    """A file that could not be read or written, in words."""
    where = f"{error.filename}: " if error.filename else ""
    reason = error.strerror or (str(error).splitlines() or [type(error).__name__])[0]
    return f"{where}{reason}; check the path and that there is room to write"


def interrupted_message(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves, in one line: where a training run's last complete checkpoint is, and how to go on."""
    prefix = f"st-daft {args.command}: interrupted"
    if args.command == "train":
        from st_daft.training.recipe import STAGES
        from st_daft.training.stages import STAGE_TYPES, last_complete_checkpoint

        for name in reversed(STAGES):
            checkpoint = last_complete_checkpoint(Path(args.output) / STAGE_TYPES[name].folder)
            if checkpoint:
                return (
                    f"{prefix}; the last complete checkpoint is {checkpoint}: run the same command with --resume to "
                    "continue from it"
                )
        return f"{prefix} before its first checkpoint; run the same command with --resume to start it again"
    if args.command == "evaluate":
        return f"{prefix}; nothing was written"
    return f"{prefix}; what it wrote is listed in {Path(args.output) / MARKER_FILE}: run it again with --overwrite"
