"""Where st-daft writes: only into a new or empty folder, or into one st-daft marked as its own.

Every command that writes a folder (``st-daft train``, ``export``, ``soup``, ``index``) claims it first with
:func:`claim_output`, before any model is loaded. The claim is refused, with a sentence naming the folder and what to
do, when the folder holds anything st-daft did not write, when it is (or holds, or lies inside) a folder the command
reads (the model being exported), or when it cannot be made. A folder st-daft wrote holds a small marker,
``.st-daft.json``: the command, its arguments, the package version and the entries the command wrote. A marked
folder is replaced only with ``overwrite`` (``--overwrite``), and then only the entries the marker lists are
removed: a user's own files put beside them stay. A training run's marker also records what was trained (the data's
content hashes, stages, budgets, encoders, seed); :meth:`OutputFolder.check_resume` compares it with a resumed run.

``evaluate --output`` writes one file: :func:`claim_output_file` allows a new file, or one st-daft wrote (it carries
an ``"st_daft"`` key), and :func:`write_output_file` writes it.

A writer's use::

    folder = claim_output(args.output, "index", argv, overwrite=args.overwrite)  # refused before anything loads
    ...
    with folder.writing():  # removes what an earlier run listed (overwrite), marks the folder, lists what was written
        save_into(folder.path)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from st_daft.utils.io import atomic_write_json

__all__ = [
    "MARKER_FILE",
    "OutputError",
    "OutputFolder",
    "claim_output",
    "claim_output_file",
    "check_writable_folder",
    "write_output_file",
    "file_identity",
    "identity_differences",
    "package_version",
]

MARKER_FILE = ".st-daft.json"
#: The key under which a file st-daft writes (``evaluate --output``) names its command and version.
FILE_MARKER_KEY = "st_daft"
#: Files above this size are identified by their size and a hash of evenly spaced samples, not read whole.
FULL_HASH_BYTES = 256 * 2**20
_SAMPLES, _SAMPLE_BYTES = 16, 2**20
_DATASET_ENTRIES = ("corpus.jsonl", "queries.jsonl", "qrels")
_MARKER_KEYS = ("st_daft", "command", "arguments", "written", "complete", "entries")


class OutputError(ValueError):
    """An output st-daft will not write to; the message names it and says what to do instead."""


def _main_process() -> bool:
    from st_daft.utils.distributed import is_main_process  # torch is imported only once something is written

    return is_main_process()


def _barrier() -> None:
    from st_daft.utils.distributed import barrier

    barrier()


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("st-daft")
    except PackageNotFoundError:  # pragma: no cover - a source tree without an install
        return "unknown"


def _listed(names: Sequence[str], shown: int = 3) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")  # pragma: no cover - the root always exists


def _writable(folder: Path) -> bool:
    """Whether a folder can be made in ``folder`` (tried: permissions, read-only file systems and ``/proc`` all
    say no), leaving nothing behind."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        probe = tempfile.mkdtemp(prefix=".st-daft-probe-", dir=folder)
    except OSError:
        return False
    os.rmdir(probe)
    return True


def _check_creatable(path: Path, option: str, named: Path | None = None) -> None:
    """Refuse a path that does not exist and cannot be made: one of its parents is a file, or not writable."""
    ancestor = _nearest_existing(path)
    named = named or path
    if not ancestor.is_dir():
        raise OutputError(f"{option} {named}: {ancestor} is a file, so nothing can be made in it; give another path")
    if not _writable(ancestor):
        raise OutputError(f"{option} {named}: {ancestor} is not writable; give a path in a folder you can write to")


def check_writable_folder(path: str | Path, option: str) -> None:
    """Refuse a folder a command writes into without owning it (a document store shared by runs) when it is a file
    or cannot be made, naming ``option``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file, not a folder; give a folder")
    if not path.exists():
        _check_creatable(path, option)


def _read_marker(marker: Path, option: str, path: Path) -> dict[str, Any]:
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        reason = getattr(error, "msg", None) or type(error).__name__
        raise OutputError(
            f"{option} {path}: its marker {marker.name} is unreadable ({reason}), so what st-daft wrote there is not "
            "known; remove the folder yourself or give another one"
        ) from None
    if not isinstance(content, dict) or not isinstance(content.get("entries"), list):
        raise OutputError(
            f"{option} {path}: its marker {marker.name} lists no entries, so what st-daft wrote there is not known; "
            "remove the folder yourself or give another one"
        )
    return content


def _describe_previous(path: Path, entries: Sequence[str]) -> str:
    """What an earlier run left: its checkpoints (``stage-1-align/checkpoint-4``) and summary, else its entries."""
    shown = sorted(
        str(checkpoint.relative_to(path))
        for entry in entries
        if entry.startswith("stage-")
        for checkpoint in (path / entry).glob("checkpoint-*")
    )
    shown += [name for name in ("daft_summary.json",) if name in entries and (path / name).exists()]
    return _listed(shown or sorted(entries))


@dataclass
class OutputFolder:
    """A claimed output folder (see the module docs): nothing is written until :meth:`writing`."""

    path: Path
    command: str
    arguments: list[str]
    option: str = "--output"
    overwrite: bool = False
    resume: bool = False
    #: the marker an earlier st-daft command left in the folder, or None
    previous: dict[str, Any] | None = None
    #: what the writer records in the marker beside its command and entries (a training run: ``run``, ...)
    record: dict[str, Any] = field(default_factory=dict)
    _foreign: set[str] = field(default_factory=set, repr=False)
    _entries: set[str] = field(default_factory=set, repr=False)
    _complete: bool = field(default=False, repr=False)

    @classmethod
    def of(cls, path: str | Path) -> OutputFolder | None:
        """The folder as st-daft marked it (to :meth:`remove` what it lists), or None for a folder without a
        marker."""
        path = Path(path)
        if not (path / MARKER_FILE).is_file():
            return None
        previous = _read_marker(path / MARKER_FILE, "folder", path)
        folder = cls(path, previous.get("command", "?"), previous.get("arguments", []), previous=previous)
        folder.record = {key: value for key, value in previous.items() if key not in _MARKER_KEYS}
        folder._entries = set(previous["entries"])
        folder._complete = bool(previous.get("complete"))
        return folder

    @property
    def marker(self) -> Path:
        return self.path / MARKER_FILE

    @property
    def resuming(self) -> bool:
        """Whether there is a run to resume: ``resume`` asked for, and the folder holds st-daft's earlier output."""
        return self.resume and self.previous is not None

    def check_resume(self, identity: dict[str, Any], anyway: bool = False, flag: str = "--resume-anyway") -> list[str]:
        """Record ``identity`` (a flat dict: label -> JSON value, see :func:`file_identity`) as what this run
        trains; when resuming, compare it with the earlier run's and refuse each difference unless ``anyway``.

        Returns:
            The differences (allowed with ``anyway``), one sentence each.
        """
        self.record["run"] = identity
        if not self.resuming:
            return []
        before = self.previous.get("run")
        if not isinstance(before, dict):
            differences = ["the earlier run recorded nothing of what it trained"]
        else:
            differences = identity_differences(before, identity)
        if differences and not anyway:
            raise OutputError(
                f"--resume: {self.path} was trained by another run: {'; '.join(differences)}; resume with the "
                f"earlier run's command (its arguments are in {self.marker}), pass {flag} to continue it with these "
                "settings, or give another --output"
            )
        return differences

    def _remove_entries(self, names: Iterable[str]) -> None:
        for name in names:
            entry = self.path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()

    def _present(self) -> set[str]:
        return {entry.name for entry in self.path.iterdir()} - {MARKER_FILE} if self.path.is_dir() else set()

    def _write_marker(self) -> None:
        if not _main_process():
            return
        atomic_write_json(
            self.marker,
            {
                "st_daft": package_version(),
                "command": self.command,
                "arguments": self.arguments,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "complete": self._complete,
                "entries": sorted(self._entries),
                **self.record,
            },
            indent=1,
        )

    @contextmanager
    def writing(self, planned: Iterable[str] = ()) -> Iterator[Path]:
        """Write into the folder: with ``overwrite``, first remove the entries an earlier command listed; mark the
        folder as st-daft's, listing ``planned`` (entries the command will write, so that a kill leaves them listed);
        yield the folder; then list every entry the command added, also when it fails."""
        earlier = set(self.previous.get("entries", [])) if self.previous else set()
        if _main_process():
            if self.previous is not None and self.overwrite:
                self._remove_entries(sorted(earlier))
                earlier = set()
            self.path.mkdir(parents=True, exist_ok=True)
        _barrier()
        self._foreign = self._present() - earlier
        self._entries = earlier | set(planned)
        self._complete = False
        self._write_marker()
        try:
            yield self.path
            self._complete = True
        finally:
            self._entries = (self._entries & self._present()) | (self._present() - self._foreign)
            self._write_marker()

    def update(self, **record: Any) -> None:
        """Record more in the marker (after :meth:`writing`)."""
        self.record.update(record)
        if self.marker.exists():
            self._write_marker()

    def remove(self, names: Iterable[str]) -> list[str]:
        """Remove the entries among ``names`` that this folder's marker lists (never another), and list them no
        more. Returns the names removed."""
        chosen = sorted(set(names) & self._entries)
        if _main_process():
            self._remove_entries(chosen)
        self._entries -= set(chosen)
        self._write_marker()
        return chosen


def claim_output(
    path: str | Path,
    command: str,
    arguments: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    option: str = "--output",
    reads: Sequence[tuple[str, str | Path]] = (),
) -> OutputFolder:
    """Check that ``command`` may write the folder ``path``, writing nothing (see the module docs).

    Args:
        path: the output folder.
        command: the command that writes it (``"train"``, ``"export"``, ...), recorded in the marker.
        arguments: the command's arguments, recorded in the marker.
        overwrite: replace what an earlier st-daft command wrote there (only the entries its marker lists).
        resume: continue what an earlier command wrote (``st-daft train --resume``); refused with ``overwrite``.
        option: how the user named the folder, for messages (``"--output"``, ``"OUTPUT"``).
        reads: ``(what, folder)`` pairs the command reads (``("the model exported", MODEL)``): an output that is,
            holds or lies inside one of them is refused.

    Raises:
        OutputError: the folder cannot or must not be written; the message says what to do.
    """
    path = Path(path)
    if resume and overwrite:
        raise OutputError(
            f"--resume and --overwrite together: --resume continues the run in {path}, --overwrite replaces it; "
            "give one of the two"
        )
    resolved = path.resolve()
    for what, source in reads:
        source_path = Path(source)
        if not source_path.exists():
            continue
        source_path = source_path.resolve()
        if _inside(resolved, source_path) or _inside(source_path, resolved):
            where = "is" if resolved == source_path else "is inside" if _inside(resolved, source_path) else "holds"
            raise OutputError(
                f"{option} {path} {where} {what} ({source}): writing there would change what is read; give a "
                "folder outside it"
            )
    claimed = OutputFolder(path, command, list(arguments or []), option, overwrite, resume)
    if not path.exists():
        _check_creatable(path, option)
        return claimed
    if not path.is_dir():
        raise OutputError(f"{option} {path} is a file, not a folder; give a new or empty folder")
    if not _writable(path):
        raise OutputError(f"{option} {path} is not writable; give a folder you can write to")
    entries = sorted(entry.name for entry in path.iterdir())
    if not entries:
        return claimed
    if MARKER_FILE not in entries:
        dataset = [name for name in _DATASET_ENTRIES if name in entries]
        holds = f"it holds a dataset ({', '.join(dataset)})" if dataset else f"it holds {_listed(entries)}"
        raise OutputError(
            f"{option} {path} is not empty and st-daft did not write it ({holds}); st-daft writes only into a new "
            "or empty folder, or one it wrote before: give another folder"
        )
    claimed.previous = _read_marker(path / MARKER_FILE, option, path)
    if resume or overwrite:
        return claimed
    earlier = claimed.previous.get("command", "?")
    resume_hint = " --resume to continue it or" if command == earlier == "train" else ""
    raise OutputError(
        f"{option} {path} holds an earlier `st-daft {earlier}` output "
        f"({_describe_previous(path, claimed.previous['entries'])}); pass{resume_hint} --overwrite to replace it "
        "(only what st-daft wrote there is removed), or give another folder"
    )


# ---------------------------------------------------------------------------------------------------- one file


def claim_output_file(
    path: str | Path, command: str, arguments: Sequence[str] | None = None, *, overwrite: bool = False,
    option: str = "--output",
) -> dict[str, Any]:  # fmt: skip
    """Check that ``command`` may write the JSON file ``path``: a new file, or one st-daft wrote (with
    ``overwrite``). Returns the marker :func:`write_output_file` adds to the content.

    Raises:
        OutputError: ``path`` is a folder, a file st-daft did not write, an earlier output without ``overwrite``,
            or cannot be made.
    """
    path = Path(path)
    marker = {"command": command, "arguments": list(arguments or []), "version": package_version()}
    if not path.exists():
        _check_creatable(path.parent, option, named=path)
        return marker
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give the path of a new JSON file")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        content = None
    if not (isinstance(content, dict) and isinstance(content.get(FILE_MARKER_KEY), dict)):
        raise OutputError(f"{option} {path} exists and st-daft did not write it; give the path of a new file")
    if not overwrite:
        raise OutputError(
            f"{option} {path} holds an earlier `st-daft {content[FILE_MARKER_KEY].get('command', '?')}` output; "
            "pass --overwrite to replace it, or give another path"
        )
    return marker


def write_output_file(path: str | Path, content: dict[str, Any], marker: dict[str, Any]) -> Path:
    """Write ``content`` with ``marker`` (from :func:`claim_output_file`) as JSON to ``path``, atomically."""
    return atomic_write_json(path, {**content, FILE_MARKER_KEY: marker})


# ---------------------------------------------------------------------------------------------------- identity


def file_identity(path: str | Path) -> dict[str, Any]:
    """What identifies a file's content: its size and SHA-256 (for a file above ``FULL_HASH_BYTES``, the SHA-256
    of its size and of evenly spaced samples), with its path."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
        else:
            digest.update(str(size).encode())
            for index in range(_SAMPLES):
                handle.seek((size - _SAMPLE_BYTES) * index // (_SAMPLES - 1))
                digest.update(handle.read(_SAMPLE_BYTES))
    return {"path": str(path.resolve()), "size": size, "sha256": digest.hexdigest(), "sampled": size > FULL_HASH_BYTES}


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def identity_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One sentence per label whose value differs between two identities (a file: by content, not path); labels
    only one of them has (the settings of a stage added or left out) are named together."""
    differences = []
    for label in sorted(set(before) & set(now)):
        old, new = before[label], now[label]
        if isinstance(old, dict) and isinstance(new, dict) and "sha256" in old and "sha256" in new:
            if old["sha256"] != new["sha256"] or old.get("size") != new.get("size"):
                moved = "" if old.get("path") == new.get("path") else f" (was {old.get('path')})"
                differences.append(f"{label} {new.get('path')} has other content than the earlier run's{moved}")
        elif old != new:
            differences.append(f"{label} {_shown(old)} before, {_shown(new)} now")
    for only, side in ((set(now) - set(before), "this command"), (set(before) - set(now), "the earlier run")):
        if only:
            differences.append(f"{len(only)} setting(s) only in {side} ({_listed(sorted(only))})")
    return differences
