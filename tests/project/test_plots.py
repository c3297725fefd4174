"""benchmarks/plots.py: every plot function writes a PNG from small synthetic results files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

PLOTS_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "plots.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plots():
    spec = importlib.util.spec_from_file_location("benchmark_plots", PLOTS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _evaluation(stage: str, step: int, query_cosine: float, kl: float) -> dict:
    return {
        "stage": stage,
        "step": step,
        "eval_alignment_query_mean_cosine": query_cosine,
        "eval_alignment_document_mean_cosine": 0.1,
        "eval_alignment_knn_kl": kl,
    }


def _daft_result(name: str, encoder: str, stages: list[dict], trace: list[dict], scifact: float, faq: float) -> dict:
    return {
        "name": name,
        "setup": {"query_encoder": encoder, "stages": [stage["stage"] for stage in stages]},
        "stages": stages,
        "collapse_trace": trace,
        "scifact": {"ndcg_at_10": scifact},
        "python-faq": {"ndcg_at_10": faq},
    }


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    plain = _daft_result(
        "p",
        "tiny:1,32",
        [{"stage": "finetune", "global_step": 20, "collapsed": True}],
        [{"stage": "finetune", "step": 5, "batch_query_mean_cosine": 0.9}, _evaluation("finetune", 20, 0.97, 700.0)],
        0.0,
        0.0,
    )
    daft = _daft_result(
        "q",
        "tiny:1,32",
        [{"stage": "align", "global_step": 40}, {"stage": "finetune", "global_step": 20}],
        [
            _evaluation("align", 20, 0.3, 150.0),
            _evaluation("align", 40, 0.1, 60.0),
            _evaluation("finetune", 20, 0.08, 55),
        ],
        0.5,
        0.1,
    )
    _write(root / "quality" / "daft_p.json", plain)
    _write(root / "quality" / "daft_q.json", daft)
    _write(root / "quality" / "daft_m.json", _daft_result("m", "symmetric", [], [], 0.6, 0.7))
    _write(
        root / "serving" / "query_speed.json",
        {
            "models": {
                "p": {"batch_1": 500.0, "batch_32": 2000.0},
                "q": {"batch_1": 520.0, "batch_32": 2100.0},
                "q (query route only)": {"batch_1": 800.0, "batch_32": 2500.0},
                "m": {"batch_1": 100.0, "batch_32": 150.0},
                "not-in-results": {"batch_1": 1.0, "batch_32": 1.0},
            }
        },
    )
    _write(
        root / "quality" / "bm25_reference.json", {"scifact": {"ndcg_at_10": 0.65}, "python-faq": {"ndcg_at_10": 0.35}}
    )
    history = [{"step": float(step), "stale_error": 0.02 * step} for step in range(1, 6)]
    corrected_history = [{**row, "corrected_error": row["stale_error"] / 2} for row in history]
    _write(
        root / "corrector" / "result-corrected.json",
        {
            "strategy": "corrected",
            "config": {"corrector_steps": 1, "corrector_buffer": 256, "corrector_lr": 1e-3},
            "history": corrected_history,
            "shadow_cosine_step_errors": [0.01] * 10,
            "final_sample_stale_error": 0.1,
            "final_sample_corrected_error": 0.04,
            "documents_encoded_training": 300,
            "test_ndcg_at_10": 0.64,
        },
    )
    _write(
        root / "corrector" / "result-refresh-2.json",
        {"strategy": "refresh:2", "history": history, "documents_encoded_training": 3000, "test_ndcg_at_10": 0.65},
    )
    _write(root / "corrector" / "prepare.json", {"aligned_test_ndcg_at_10": 0.66})
    return root


def _assert_png(path: Path | None) -> None:
    assert path is not None and path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_collapse_plot(plots, results: Path, tmp_path: Path) -> None:
    _assert_png(plots.plot_collapse(results, tmp_path / "out" / "collapse.png", pairs={"tiny": ("p", "q")}))


def test_collapse_trace_counts_steps_across_stages(plots, results: Path) -> None:
    daft = json.loads((results / "quality" / "daft_q.json").read_text())
    # the fine-tuning evaluation at its step 20 comes after 40 alignment steps; batch statistics are left out
    assert [point["total_step"] for point in plots._evaluations(daft)] == [20, 40, 60]
    plain = json.loads((results / "quality" / "daft_p.json").read_text())
    assert [point["total_step"] for point in plots._evaluations(plain)] == [20]


def test_corrector_plots(plots, results: Path, tmp_path: Path) -> None:
    _assert_png(plots.plot_corrector_drift(results / "corrector", tmp_path / "drift.png"))
    _assert_png(plots.plot_corrector_cost(results / "corrector", tmp_path / "cost.png"))


def test_topk_agreement_plot(plots, tmp_path: Path) -> None:
    data = {
        "k": 10,
        "checkpoints": [
            {"step": 16, "stale_vs_fresh": 0.6, "corrected_vs_fresh": 0.8},
            {"step": 8, "stale_vs_fresh": 0.8, "corrected_vs_fresh": 0.9},
        ],
    }
    _write(tmp_path / "topk_agreement.json", data)
    _assert_png(plots.plot_topk_agreement(tmp_path / "topk_agreement.json", tmp_path / "topk.png"))


def test_topk_agreement_missing_file_is_skipped(plots, tmp_path: Path, capsys) -> None:
    assert plots.plot_topk_agreement(tmp_path / "missing.json", tmp_path / "topk.png") is None
    assert not (tmp_path / "topk.png").exists()
    assert "does not exist yet" in capsys.readouterr().out


def test_frontier_plot_and_points(plots, results: Path, tmp_path: Path) -> None:
    points = {point["name"]: point for point in plots._frontier_points(results)}
    assert set(points) == {"p", "q", "m"}  # speeds without a results file are left out
    assert points["q"]["queries_per_second"] == 800.0  # a Router model is served by its exported query route
    assert points["m"]["family"] == "MiniLM" and points["q"]["family"] == "tiny"
    _assert_png(plots.plot_frontier(results, tmp_path / "frontier.png"))


def test_pareto_front(plots) -> None:
    # (speed, quality): the slow good point and the fast medium point survive, the slow bad one does not
    assert sorted(plots._pareto([(100, 0.7), (5000, 0.5), (80, 0.2), (4000, 0.4)])) == [(100, 0.7), (5000, 0.5)]


def test_make_all_writes_every_available_plot(plots, results: Path, tmp_path: Path) -> None:
    written = plots.make_all(results, tmp_path / "docs")
    names = sorted(path.name for path in written)
    # no topk_agreement.json and no d/e/f-* runs in the synthetic folder: those two plots are skipped
    assert names == ["corrector_cost.png", "corrector_drift.png", "query_encoder_frontier.png"]
    for path in written:
        _assert_png(path)
