"""kill -9 at several moments of ``st-daft train --negatives corrected``, then ``--resume``: the run must end in the
state of an uninterrupted one (model weights, and so the optimizer/scheduler states that produced them; the mining
cache, the corrector's weights and the miner's counts in the last checkpoint), within float tolerance.

Each scenario launches the tiny command in a subprocess, polls the output folder for its moment and sends SIGKILL
the instant it comes, then runs the same command with ``--resume`` (once per kill). The runs take about 20-40 s each
on 2 cores, so the file is marked slow (about 4-6 minutes in all on an idle 2-core machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from st_daft.embeddings.cache import StaleEmbeddingCache
from tests.conftest import QUESTIONS, TOPICS, write_beir
from tests.training_runs import assert_same_weights, cli, finish, model_weights, start, tiny_train_args

pytestmark = pytest.mark.slow

FINETUNE_STEPS = 8
FINETUNE = Path("stage-2-finetune")
ALIGN = Path("stage-1-align")
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = {f"d-{topic}": (topic, text) for topic, text in TOPICS.items()}
    queries = {f"q-{topic}": question for topic, question in QUESTIONS.items()}
    topics = list(TOPICS)
    qrels = {"train": {f"q-{topic}": {f"d-{topic}": 1} for topic in topics[:6]}}
    return write_beir(tmp_path_factory.mktemp("kill") / "beir", corpus, queries, qrels)


def _args(document_model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return tiny_train_args(
        document_model,
        data,
        output,
        "--query-encoder",
        "tiny:1,32",
        "--stages",
        "align,finetune",
        "--align-steps",
        "4",
        "--finetune-steps",
        str(FINETUNE_STEPS),
        "--negatives",
        "corrected",
        "--num-negatives",
        "2",
        "--keep-checkpoints",
        *extra,
    )


@pytest.fixture(scope="module")
def reference(tiny_document_model_dir: Path, beir_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    output = tmp_path_factory.mktemp("reference") / "run"
    log = output.with_suffix(".log")
    finish(start(cli(_args(tiny_document_model_dir, beir_dir, output)), log), log)
    return output


def _exists(relative: str) -> Callable[[Path], bool]:
    return lambda output: (output / relative).exists()


# (name, the moments to kill at, one per interrupted attempt)
SCENARIOS = {
    # mid-alignment, right after a checkpoint is complete
    "align-after-checkpoint": [_exists(f"{ALIGN}/checkpoint-2/trainer_state.json")],
    # the instant checkpoint-2 of fine-tuning appears: the folder is being written
    "finetune-while-writing-checkpoint": [_exists(f"{FINETUNE}/checkpoint-2")],
    # after the trainer's state is written, before the miner's state (written in on_save) is
    "finetune-before-miner-state": [_exists(f"{FINETUNE}/checkpoint-4/trainer_state.json")],
    # twice: a complete checkpoint, resume, then again after two checkpoints written by the resumed run (those
    # reference the cache of the checkpoint resumed from, which rotation deletes)
    "finetune-twice": [
        _exists(f"{FINETUNE}/checkpoint-2/negative_mining/miner_state.json"),
        _exists(f"{FINETUNE}/checkpoint-6/negative_mining/miner_state.json"),
    ],
}
NEEDS_OTHER_BRANCHES: dict[str, str] = {}  # every scenario passes since the recipe and mining reshaping


def _kill_when(process: subprocess.Popen, output: Path, moment: Callable[[Path], bool], log: Path) -> None:
    deadline = time.monotonic() + 600
    while not moment(output):
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the kill moment:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the kill moment never came")
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def _miner_state(checkpoint: Path) -> tuple[dict, torch.Tensor, dict[str, torch.Tensor]]:
    folder = checkpoint / "negative_mining"
    state = json.loads((folder / "miner_state.json").read_text())
    cache = StaleEmbeddingCache.load((folder / state["cache"]["folder"]).resolve())  # relative to the checkpoint
    corrector = torch.load(folder / "corrector" / "corrector.pt", weights_only=True)["state_dict"]
    return state["statistics"], cache.float32(), corrector


def _params(scenarios: dict) -> list:
    params = []
    for name in scenarios:
        reason = NEEDS_OTHER_BRANCHES.get(name)
        marks = [pytest.mark.xfail(reason=reason, strict=False)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("scenario", _params(SCENARIOS))
def test_kill_and_resume_ends_like_an_uninterrupted_run(
    scenario: str, reference: Path, tiny_document_model_dir: Path, beir_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "run"
    args = _args(tiny_document_model_dir, beir_dir, output)
    for attempt, moment in enumerate(SCENARIOS[scenario]):
        log = tmp_path / f"attempt-{attempt}.log"
        process = start(cli(args + (["--resume"] if attempt else [])), log)
        _kill_when(process, output, moment, log)
    log = tmp_path / "resume.log"
    finish(start(cli(args + ["--resume"]), log), log)

    assert_same_weights(model_weights(output), model_weights(reference), **TOLERANCE)
    last = f"checkpoint-{FINETUNE_STEPS}"
    checkpoint_weights = model_weights(output / FINETUNE / last)
    assert_same_weights(checkpoint_weights, model_weights(reference / FINETUNE / last), **TOLERANCE)
    state, cache, corrector = _miner_state(output / FINETUNE / last)
    expected_state, expected_cache, expected_corrector = _miner_state(reference / FINETUNE / last)
    assert state["counts"] == expected_state["counts"]
    assert len(state["history"]) == len(expected_state["history"])
    torch.testing.assert_close(cache, expected_cache, **TOLERANCE)
    assert_same_weights(corrector, expected_corrector, **TOLERANCE)
    # every checkpoint stands alone: resumable after rotation deletes older ones, and movable
    assert not (output / FINETUNE / last / "negative_mining" / "cache_reference.json").exists()
