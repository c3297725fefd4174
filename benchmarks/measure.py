"""What the memory benchmarks share: this process's resident memory and its peak over a block, the result of a
measurement run in a fresh process (so that its memory is its own), the machine, and the report file."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def resident_mib() -> dict[str, float]:
    """``RssAnon`` and ``RssFile`` of this process, in MiB (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


class AnonymousPeak:
    """The peak ``RssAnon`` while the ``with`` block runs, polled from a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._done = interval, 0.0, threading.Event()

    def _poll(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, resident_mib()["RssAnon"])
            time.sleep(self.interval)

    def __enter__(self) -> AnonymousPeak:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, resident_mib()["RssAnon"])


def child_result(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``command`` (a benchmark's own child mode) and read the JSON object it prints last."""
    output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def machine() -> str:
    return f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}"


def write_report(path: Path | None, report: dict[str, Any], indent: int = 2) -> None:
    """Write ``report`` as JSON to ``path`` (its folder made first); nothing without a path."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=indent) + "\n")


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """The synthetic float16 cache's options (:func:`clustered_cache`): scratch folder, rows, dimension, clusters."""
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (outside the repository)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dimension", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=1000)


def clustered_cache(args: argparse.Namespace) -> Path:
    """``WORK/cache.npy``: a float16 memmap of ``--rows`` clustered unit vectors (``cache_scale.write_stale_cache``),
    written the first time only."""
    from cache_scale import write_stale_cache

    path = args.work / "cache.npy"
    args.work.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        write_stale_cache(path, args.rows, args.dimension, args.clusters, seed=0)
    return path


def settings_report(benchmark: str, args: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    """A report of ``results`` with the command line's settings (the child mode's hidden options left out), the
    machine and the date."""
    return {
        "benchmark": benchmark,
        "settings": {key: str(value) for key, value in vars(args).items() if not key.startswith("child")},
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "results": results,
    }
