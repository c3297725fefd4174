"""Helpers for tests that run ``st-daft train`` in subprocesses (determinism, kill -9 and resume, torchrun)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_train_args(document_encoder: Path, data: Path, output: Path, *extra: str) -> list[str]:
    """``st-daft train`` arguments for a tiny run: a few steps per stage, batches of 2, a checkpoint every 2 steps."""
    return [
        "train",
        "--data",
        str(data),
        "--output",
        str(output),
        "--document-encoder",
        str(document_encoder),
        "--align-batch-size",
        "2",
        "--batch-size",
        "2",
        "--eval-steps",
        "2",
        "--seed",
        "0",
        *extra,
    ]


def subprocess_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.update(overrides)
    # python -m from the repository root imports this checkout's st_daft, not an installed one
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "st_daft.cli", *args]


def start(command: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start a command in the repository root with its output in ``log``."""
    handle = log.open("w")
    return subprocess.Popen(command, cwd=REPO_ROOT, env=subprocess_env(**env), stdout=handle, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """Wait for ``process``; fail with the tail of its log when it did not exit with 0."""
    code = process.wait(timeout=timeout)
    if code != 0:
        raise AssertionError(f"{process.args} exited with {code}:\n{log.read_text()[-4000:]}")


def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the saved model in ``folder`` (not its checkpoints), keyed by module folder and name."""
    weights = {}
    for file in sorted(folder.glob("*/model.safetensors")):
        weights.update({f"{file.parent.name}/{name}": tensor for name, tensor in load_file(file).items()})
    if not weights:
        raise AssertionError(f"no model weights under {folder}")
    return weights


def assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], **tolerance: float) -> None:
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(
            first[name], second[name], msg=lambda message, name=name: f"{name}: {message}", **tolerance
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
