"""``st-daft train --recipe FILE`` and ``--set STAGE.FIELD=VALUE``: a saved recipe re-trains the same model, any stage
field can be set, and a bad field or value is refused naming it before any step; stage flags derived from fields."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import huggingface_hub.constants
import pytest

from st_daft import DAFTConfig
from st_daft.cli import main
from st_daft.training.recipe import RECIPE_FILE
from st_daft.training.stages import STAGE_TYPES
from st_daft.training.stages.settings import SettingError, flag_fields
from tests.training_runs import assert_same_weights, model_weights


def _train(document_model: Path, data: Path, output: Path, *extra: str) -> int:
    return main(
        [
            "train",
            "--data", str(data),
            "--output", str(output),
            "--document-encoder", str(document_model),
            "--query-encoder", "tiny:1,8",
            "--max-steps", "2",
            "--eval-steps", "1",
            "--align-batch-size", "4",
            *extra,
        ]
    )  # fmt: skip


def test_a_saved_recipe_trains_the_same_model(
    tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path, caplog
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    with caplog.at_level(logging.INFO):
        assert _train(tiny_document_model_dir, tiny_beir_dir, first, "--seed", "3", "--corpus-ranking-weight", "2") == 0
    assert not [record for record in caplog.records if "anchor" in record.getMessage()]
    recipe = json.loads((first / RECIPE_FILE).read_text())
    card = (first / "README.md").read_text()
    assert "#### Recipe" in card and '"ranking_weight": 2.0' in card and '"seed": 3' in card
    assert recipe["seed"] == 3 and recipe["document_encoder"] == str(tiny_document_model_dir)
    assert recipe["stages"][0]["ranking_weight"] == 2.0 and recipe["st_daft_version"]
    # the dict round-trips: every stage's every setting
    assert DAFTConfig.from_dict(recipe).to_dict() == {key: value for key, value in recipe.items() if key != "labelled"}

    argv = ["train", "--recipe", str(first / RECIPE_FILE), "--data", str(tiny_beir_dir), "--output", str(second)]
    assert main(argv) == 0
    assert_same_weights(model_weights(first), model_weights(second), atol=0.0, rtol=0.0)
    assert json.loads((second / RECIPE_FILE).read_text()) == recipe


def test_set_overrides_any_stage_field(tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path) -> None:
    output = tmp_path / "o"
    assert _train(tiny_document_model_dir, tiny_beir_dir, output, "--set", "align.max_steps=3") == 0
    summary = json.loads((output / "daft_summary.json").read_text())
    steps = {stage["name"]: stage["steps"] for stage in summary["stages"]}
    assert steps == {"corpus": 2, "align": 3}, "--set wins over --max-steps"
    recipe = json.loads((output / RECIPE_FILE).read_text())
    assert recipe["stages"][1]["max_steps"] == 3


@pytest.mark.parametrize(
    "setting, message",
    [
        ("align.max_stepz=3", "unknown setting align.max_stepz"),
        ("align.max_steps=three", "align.max_steps must be int, got 'three'"),
        ("align.max_steps=-5", "max_steps must be at least 1"),
        ("finetune.scale=30", "the finetune stage is not trained in this run"),
        ("pretrain.steps=3", "unknown stage 'pretrain'"),
        ("align", "expected STAGE.FIELD=VALUE"),
    ],
)
def test_a_bad_set_is_refused_naming_it(
    setting: str, message: str, tiny_document_model_dir: Path, tiny_beir_dir: Path, tmp_path, capsys
) -> None:
    assert _train(tiny_document_model_dir, tiny_beir_dir, tmp_path / "o", "--set", setting) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1, error
    assert not (tmp_path / "o" / "daft_summary.json").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda recipe: recipe["stages"][1].update(max_stepz=3), "unknown setting align.max_stepz"),
        (lambda recipe: recipe["stages"][1].update(max_steps="3"), "align.max_steps must be int, got '3'"),
        (lambda recipe: recipe.update(sead=1), "unknown setting(s) sead"),
        (lambda recipe: recipe["stages"].append({"stage": "pretrain"}), "unknown stage 'pretrain'"),
    ],
)
def test_a_bad_recipe_file_is_refused_naming_the_field(edit, message: str, tmp_path, tiny_beir_dir, capsys) -> None:
    recipe = DAFTConfig(stages=["corpus", "align"]).to_dict()
    edit(recipe)
    file = tmp_path / "recipe.json"
    file.write_text(json.dumps(recipe))
    argv = ["train", "--recipe", str(file), "--data", str(tiny_beir_dir), "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and str(file) in error, error
    with pytest.raises(SettingError, match="recipe.json"):
        DAFTConfig.load_recipe(file)


def test_every_stage_flag_is_declared_once_on_its_field() -> None:
    flags = [field.metadata["flag"] for stage in STAGE_TYPES.values() for field in flag_fields(stage)]
    assert len(flags) == len(set(flags)) and len(flags) >= 30
    assert all(field.metadata["help"] for stage in STAGE_TYPES.values() for field in flag_fields(stage))
    source = (Path(__file__).resolve().parents[2] / "st_daft" / "cli" / "train.py").read_text()
    assert not [flag for flag in flags if f'"{flag}"' in source], "stage flags are derived, not written in cli/train.py"


def test_a_hub_model_id_reads_the_recipe_from_its_repository(tmp_path, monkeypatch) -> None:
    """A Hub id resolves through huggingface_hub (here its offline cache, laid out as a download leaves it)."""
    recipe = DAFTConfig(stages=["corpus", "align"], seed=7).to_dict()
    snapshot = tmp_path / "hub" / "models--someone--static-route" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / RECIPE_FILE).write_text(json.dumps(recipe))
    (tmp_path / "hub" / "models--someone--static-route" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--static-route" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    assert DAFTConfig.load_recipe("someone/static-route").to_dict() == recipe
    with pytest.raises(SettingError, match="someone/other: no daft_recipe.json on the Hub"):
        DAFTConfig.load_recipe("someone/other")
