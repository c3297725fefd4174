"""Atomic writes: every file st-daft keeps beside a model (caches, correctors, miner and callback state) is written
to a temporary name in the same folder and renamed into place, so a crash at any moment leaves either the previous
complete file or the new complete file, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "atomic_save_npy",
    "atomic_folder",
    "read_json",
    "check_safetensors",
]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``write(temporary_path)`` then rename the temporary file onto ``path`` (same folder, so the rename is
    atomic). The temporary file is removed if ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    try:
        write(temporary)
        _fsync_file(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda temporary: torch.save(obj, temporary))


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            np.save(handle, array)

    return atomic_write(path, write, suffix=".tmp.npy")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file, naming the file in the error when it is missing, truncated or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: {what} is corrupt or truncated ({error})") from None


def check_safetensors(path: str | os.PathLike) -> None:
    """Refuse a ``.safetensors`` file that is truncated or not one, naming it (safetensors' own error does not):
    the header must parse and the file must hold every byte its tensors' offsets name. Reads the header only."""
    path = Path(path)
    size = path.stat().st_size
    problem = None
    with path.open("rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length < 2 or 8 + length > size:
            problem = "no complete header"
        else:
            try:
                header = json.loads(handle.read(length).decode("utf-8"))
                ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                problem = "an unreadable header"
            else:
                if 8 + length + max(ends, default=0) > size:
                    problem = f"{size:,} bytes of the {8 + length + max(ends):,} its header names"
    if problem is not None:
        raise ValueError(f"{path} is truncated or not a safetensors file ({problem})")


@contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Write a whole folder atomically: yields a temporary sibling folder to fill; on success it replaces ``folder``
    (the previous version is kept as ``folder.old`` until the new one is in place). On failure ``folder`` is
    untouched and the temporary folder removed."""
    folder = Path(folder)
    temporary = folder.with_name(folder.name + ".tmp")
    previous = folder.with_name(folder.name + ".old")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    if folder.exists():
        folder.rename(previous)
    temporary.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)


def _fsync_file(path: str) -> None:
    try:
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    except OSError:  # some filesystems refuse fsync; the rename is still atomic
        pass
