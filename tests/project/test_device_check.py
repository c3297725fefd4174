"""scripts/device_check.sh: its CPU half trains every recipe of the check on a tiny collection and writes the JSON
report; without a CUDA device and without --cpu-only it refuses in one line (exit status 2)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "device_check.sh"


def _check(*arguments: str | Path, work: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "WORK": str(work), "PYTHONPATH": str(ROOT)}
    command = ["bash", str(SCRIPT), *map(str, arguments)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, check=False)


def test_the_cpu_half_trains_each_recipe_and_writes_its_report(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path
) -> None:
    report_path = tmp_path / "report.json"
    options = ["--data", tiny_beir_dir, "--document-encoder", tiny_document_model_dir, "--output", report_path]
    sizes = ["--steps", "2", "--train-queries", "6", "--test-queries", "4", "--documents", "8"]
    completed = _check(*options, *sizes, "--cpu-only", work=tmp_path / "work")
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["cpu_only"] and report["misses"] == []
    runs = {run["recipe"]: run for run in report["runs"]}
    assert set(runs) == {"static-default", "daft-corrected"}
    for run in runs.values():
        assert run["ok"] and run["device"] == "cpu" and 0.0 <= run["ndcg_at_10"] <= 1.0
        assert run["train_seconds"] > 0 and run["first_losses"]
    assert set(runs["static-default"]["first_losses"]) == {"corpus", "align"}
    negatives = runs["daft-corrected"]["negatives"]
    assert negatives["strategy"] == "corrected" and negatives["documents_encoded"]["total"] > 0
    assert "device check: passed" in completed.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_without_a_gpu_it_asks_for_one_or_cpu_only(tiny_beir_dir: Path, tmp_path: Path) -> None:
    completed = _check("--data", tiny_beir_dir, "--output", tmp_path / "r.json", work=tmp_path / "work")
    assert completed.returncode == 2 and not (tmp_path / "r.json").exists()
    assert (
        completed.stderr.strip()
        == "device check: torch sees no CUDA device; run it on a GPU machine, or pass --cpu-only"
    )
