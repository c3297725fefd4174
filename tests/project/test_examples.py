"""Every script in examples/ runs in its --quick form on a small slice of SciFact (real all-MiniLM-L6-v2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import slice_beir

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.skipif(
    not (SHARED_DATA / "scifact").is_dir() or not (SHARED_DATA / "python-faq").is_dir(),
    reason="needs ../shared/data/scifact and python-faq",
)


@pytest.fixture(scope="module")
def scifact_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return slice_beir(SHARED_DATA / "scifact", tmp_path_factory.mktemp("scifact"), 300, ("train", "test"))


@pytest.fixture(scope="module")
def faq_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return slice_beir(SHARED_DATA / "python-faq", tmp_path_factory.mktemp("faq"), 300, ("test",))


def _run(script: str, *arguments: str | Path) -> str:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, arguments), "--quick"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout


@pytest.fixture(scope="module")
def trained_static(scifact_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "static"
    printed = _run("daft_static_beir.py", "--data", scifact_slice, "--output", output)
    assert "stage align: 6 steps" in printed
    score = float(printed.split("test nDCG@10:")[1].split()[0])
    assert 0.0 < score <= 1.0
    return output


def test_daft_static_beir(trained_static: Path) -> None:
    assert (trained_static / "modules.json").is_file() and (trained_static / "daft_summary.json").is_file()
    readme = (trained_static / "README.md").read_text()
    assert "2211.04942" in readme and "| `align` |" in readme


def test_corrector_mining_mnrl(scifact_slice: Path, tmp_path: Path) -> None:
    printed = _run("corrector_mining_mnrl.py", "--data", scifact_slice, "--output", tmp_path / "mined")
    counts = json.loads(printed.split("documents encoded: ")[1].split(", last step")[0].replace("'", '"'))
    assert counts["negatives"] > 0 and counts["refresh"] == 0  # mined from the corrected cache, never re-embedded
    assert "corrected_error" in printed
    assert (tmp_path / "mined" / "checkpoint-4" / "negative_mining").is_dir()


def test_evaluate_collections(trained_static: Path, scifact_slice: Path, faq_slice: Path) -> None:
    printed = _run("evaluate_collections.py", trained_static, "--data", scifact_slice, "--data", faq_slice)
    header, _, row = printed.strip().splitlines()[-3:]
    assert scifact_slice.name in header and faq_slice.name in header and "mean" in header
    cells = [float(cell) for cell in row.strip("|").split("|")[1:]]
    assert len(cells) == 3 and cells[2] == pytest.approx((cells[0] + cells[1]) / 2, abs=1e-3)


def test_serve_query_route(trained_static: Path, tmp_path: Path) -> None:
    printed = _run(
        "serve_query_route.py",
        trained_static,
        "--queries",
        SHARED_DATA / "scifact" / "queries.jsonl",
        "--output",
        tmp_path / "served",
    )
    difference = float(printed.split("max |model2vec - encode_query| = ")[1].split()[0])
    assert difference < 1e-5
    assert float(printed.split("max |StaticQueryEncoder - model2vec| = ")[1].split()[0]) < 1e-6
    assert "StaticQueryEncoder, batch 1" in printed and "model2vec StaticModel, batch 1" in printed
    assert "queries/s" in printed and (tmp_path / "served" / "config.json").is_file()
