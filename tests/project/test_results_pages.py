"""The results pages and README.md say what benchmarks/results/ holds: benchmarks/report.py re-renders every generated
table, and a page whose tables differ from its results files fails here."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from st_daft.training.stages.finetune import FinetuneStage

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("benchmark_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_page_equals_its_results_files(report) -> None:
    stale = report.stale_pages()
    assert not stale, f"regenerate with `python benchmarks/report.py`: {stale}"


def test_check_fails_on_a_page_edited_by_hand(report, tmp_path: Path, monkeypatch) -> None:
    page = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    page.write_text(text.replace("| SciFact | **", "| SciFact | **9", 1), encoding="utf-8")
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(report, "PAGES", {"README.md": report.PAGES["README.md"]})
    assert report.main(["--check"]) == 1
    assert report.main([]) == 0 and report.main(["--check"]) == 0
    assert page.read_text(encoding="utf-8") == text


def test_readme_default_route_is_the_mean_of_its_seed_files(report) -> None:
    files = sorted((ROOT / "benchmarks" / "results" / "quality" / "default_seeds").glob("lab-wise*-s[0-9]-eval.json"))
    assert len(files) == 10
    scores = []
    for path in files:
        data = json.loads(path.read_text())
        scores.append(data["scores"][data["models"][0]]["scifact"]["ndcg_at_10"])
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| SciFact |"))
    assert re.search(rf"\*\*{sum(scores) / len(scores):.3f}\*\*", row)


def test_every_results_page_is_rendered_and_in_the_site(report) -> None:
    pages = {path.relative_to(ROOT).as_posix() for path in (ROOT / "docs" / "results").glob("*.md")}
    assert pages - set(report.PAGES) == {"docs/results/experiments.md"}  # written by hand: no table of one file
    navigation = (ROOT / "mkdocs.yml").read_text()
    for page in pages:
        assert page.removeprefix("docs/") in navigation, page


def test_the_corrector_default_is_the_objective_the_protocol_reports() -> None:
    """``--negatives corrected`` trains the objective, with the settings, that agreement.json reports as 'corrected'."""
    agreement = json.loads((RESULTS / "corrector" / "agreement.json").read_text())
    stage, default = FinetuneStage(), agreement["default_objective"]
    measured = agreement["objectives"][default]
    assert measured["loss"] == stage.corrector_loss and measured.get("buffer", 0) == stage.corrector_buffer
    assert measured.get("steps", 1) == stage.corrector_steps and measured.get("warmup", 0) == stage.corrector_warmup
    overlap = agreement["final_top10_overlap"]
    assert overlap["corrected"] == overlap[default] and len(agreement["seeds"]) >= 3
