"""benchmarks/corrector_quality.py run end to end on a tiny collection: every strategy trains through ``st-daft train``
and is scored, texts encoded are counted, the paired tests are in the report; and the static setting's model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_protocol_reports_every_strategy_with_its_encodings(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path: Path
) -> None:
    spec = importlib.util.spec_from_file_location("corrector_quality", ROOT / "benchmarks" / "corrector_quality.py")
    protocol = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(protocol)
    output = tmp_path / "quality.json"
    argv = [
        "--data", str(tiny_beir_dir), "--work", str(tmp_path / "work"), "--output", str(output),
        "--document-encoder", str(tiny_document_model_dir), "--seeds", "0", "1", "--steps", "4",
        "--batch-size", "2", "--num-negatives", "1", "--refresh", "1", "2", "--setting", "minilm",
    ]  # fmt: skip
    assert protocol.main(argv) == 0
    report = json.loads(output.read_text())
    strategies = ["in-batch", "stale", "corrected", "refresh:1", "refresh:2", "corrected+refresh:4"]
    assert list(report["ndcg_at_10"]) == strategies and report["seeds"] == [0, 1]
    assert all(len(scores) == 2 and all(0 <= s <= 1 for s in scores) for scores in report["ndcg_at_10"].values())
    texts = report["texts_encoded"]
    assert texts["in-batch"] == 4 * 2, "in-batch encodes each batch's positives"
    assert texts["stale"] > texts["in-batch"], "mined negatives are encoded fresh"
    assert texts["refresh:1"] > texts["refresh:2"] > texts["corrected"], "every refresh re-embeds the corpus"
    assert report["texts_encoded_vs_corrected"]["refresh:1"] == texts["refresh:1"] / texts["corrected"]
    assert report["settings"]["steps"] == 4 and report["settings"]["document_lr"] == 2e-5, "flags over the setting"
    assert set(report["paired_tests"]) == {
        "refresh:1 vs in-batch", "refresh:2 vs in-batch", "corrected vs refresh:1", "corrected vs refresh:2",
        "stale vs corrected",
    }  # fmt: skip
    assert report["texts_encoded_per_seed"]["stale"] and len(report["texts_encoded_per_seed"]["stale"]) == 2

    # one more refresh value: what the report holds is taken from it, only the new strategy trains
    report["ndcg_at_10"]["stale"] = [0.125, 0.25]
    output.write_text(json.dumps(report))
    assert protocol.main([*argv[:-5], "--refresh", "1", "2", "3", "--setting", "minilm"]) == 0
    resumed = json.loads(output.read_text())
    assert resumed["ndcg_at_10"]["stale"] == [0.125, 0.25], "a strategy measured before is not rerun"
    assert list(resumed["ndcg_at_10"]) == [*strategies[:5], "refresh:3", strategies[5]]
    assert resumed["texts_encoded"]["refresh:3"] > texts["corrected"], "refresh:3 re-embedded the corpus"
    assert (tmp_path / "work" / "refresh-3-s0" / "daft_summary.json").is_file()
    assert "corrected vs refresh:3" in resumed["paired_tests"]


def test_the_static_setting_fine_tunes_the_packaged_static_model(tmp_path: Path) -> None:
    pytest.importorskip("static_model", reason="the static setting needs tokenlearn-static-model")
    from sentence_transformers import SentenceTransformer

    spec = importlib.util.spec_from_file_location("corrector_quality", ROOT / "benchmarks" / "corrector_quality.py")
    protocol = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(protocol)
    folder = protocol.static_document_model(tmp_path)
    model = SentenceTransformer(folder)
    vectors = model.encode(["a claim about cells", "an abstract about cells"], convert_to_tensor=True)
    assert vectors.shape == (2, model.get_sentence_embedding_dimension())
    assert type(model[0]).__name__ == "StaticEmbedding" and len(model) == 1, "a plain static model, no head"
    assert protocol.static_document_model(tmp_path) == folder, "built once, then reused"
