"""Make docs/model_card_example.md: the README.md card st-daft writes, filled with the records of real benchmark runs.

No training happens here. The model is the real pair (static query route + the packaged all-MiniLM-L6-v2), built
as ``st-daft train --query-encoder static`` builds it, so architecture, parameter counts and lengths are the trained
model's; the stages, collapse statistics and MTEB results are those of the recipe run ``e`` in
benchmarks/results/quality/daft_e.json (DAFT: alignment then joint fine-tuning, in-batch negatives, SciFact train), recorded
with st_daft.models.card as the recipe records them. A second card takes the corrected-negatives run of
benchmarks/results/corrector/ (alignment, then fine-tuning with corrected stale-cache negatives) and its
"Training with st-daft" section is shown too. The usage snippet's similarity printout is switched off
(``generate_widget_examples=False``): this untrained copy's similarities would not be the trained model's.

    python docs/model_card_example.py --output /tmp/card-example \\
        --scifact ../shared/data/scifact --python-faq ../shared/data/python-faq
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))  # this checkout's st_daft, also when run as a script from docs/

from st_daft import DAFTConfig, build_asymmetric_model, load_beir  # noqa: E402
from st_daft.models.card import (  # noqa: E402
    attach_model_card,
    record_evaluation,
    record_negatives,
    record_recipe,
    record_stage,
)
from st_daft.training.stages import STAGE_TYPES  # noqa: E402

RESULTS = REPOSITORY / "benchmarks" / "results"


def collection_size(folder: str | None) -> dict[str, int]:
    if not folder:
        return {}
    data = load_beir(folder, "test")
    return {"num_queries": len(data.qrels), "num_documents": len(data.corpus)}


def recipe_of(config: dict) -> dict:
    """The run's recipe (``DAFTConfig.to_dict()``) from the settings a benchmark result records: each stage's own
    settings, and the settings shared by the stages where the stage has such a field."""
    stages = []
    for name in config["stages"]:
        fields = {field.name for field in dataclasses.fields(STAGE_TYPES[name])}
        settings = {**{key: value for key, value in config.items() if key in fields}, **config[name]}
        stages.append(STAGE_TYPES[name](**{key: value for key, value in settings.items() if key in fields}))
    shared = {field.name for field in dataclasses.fields(DAFTConfig)} - {"stages"}
    recipe = DAFTConfig(stages=stages, **{key: value for key, value in config.items() if key in shared})
    return {**recipe.to_dict(), "query_encoder": "static", "document_encoder": "sentence-transformers/all-MiniLM-L6-v2"}


def daft_run_records(sizes: dict[str, dict[str, int]]) -> tuple[list[dict], dict, list[dict], dict]:
    """Stages, negatives, evaluations and recipe of benchmarks/results/quality/daft_e.json, as record_* dicts."""
    run = json.loads((RESULTS / "quality" / "daft_e.json").read_text())
    config = run["daft_config"]
    stages = []
    for stage in run["stages"]:
        settings = config[stage["stage"]]
        budget = settings["max_steps"] if settings["max_steps"] > 0 else f"{settings['epochs']:g} epochs"
        rates = {"query": settings["learning_rate"], "document": "frozen"}
        if stage["stage"] == "finetune":
            rates["document"] = settings["document_learning_rate"]
        stages.append(
            {
                "name": stage["stage"],
                "steps": stage["global_step"],
                "budget": budget,
                "learning_rates": rates,
                "stopped_reason": stage["stopped_reason"],
                "collapsed": stage["collapsed"],
                "final_metrics": stage["final_metrics"],
            }
        )
    negatives = {"strategy": config["negatives"]}
    evaluations = [
        {"task": "SciFact", "split": "test", **sizes.get("scifact", {}), **run["scifact"]},
        {"task": "python-faq", "split": "test", **sizes.get("python-faq", {}), **run["python-faq"]},
    ]
    return stages, negatives, evaluations, recipe_of(config)


def corrector_run_records(sizes: dict[str, dict[str, int]]) -> tuple[list[dict], dict, list[dict], dict | None]:
    """Stages, negatives and evaluation of the corrected-negatives run in benchmarks/results/corrector/."""
    prepare = json.loads((RESULTS / "corrector" / "prepare.json").read_text())
    run = json.loads((RESULTS / "corrector" / "result-corrected.json").read_text())
    stages = [
        {
            "name": "align",
            "steps": prepare["align_steps"],
            "budget": prepare["align_steps"],
            "learning_rates": {"query": 1e-3, "document": "frozen"},  # benchmarks/corrector_scifact.py prepare
        },
        {
            "name": "finetune",
            "steps": run["steps"],
            "budget": run["steps"],
            "learning_rates": {"query": run["query_lr"], "document": run["document_lr"]},
        },
    ]
    negatives = {
        "strategy": run["strategy"],
        "num_negatives": run["num_negatives"],
        "corpus_size": prepare["corpus_size"],
        "documents_encoded": run["counts"],
        "refreshes": run["num_refreshes"],
        # measured at the end of training, in eval mode, on a sample of cache rows
        "stale_error": run["final_sample_stale_error"],
        "corrected_error": run["final_sample_corrected_error"],
    }
    evaluations = [
        {
            "task": "SciFact",
            "split": "test",
            **sizes.get("scifact", {}),
            "ndcg_at_10": run["test_ndcg_at_10"],
            "recall_at_100": run["test_recall_at_100"],
        }
    ]
    return stages, negatives, evaluations, None


def render(records: tuple[list[dict], dict, list[dict], dict | None], folder: Path) -> str:
    model = build_asymmetric_model(query_encoder="static")
    attach_model_card(model, language="en", generate_widget_examples=False)
    stages, negatives, evaluations, recipe = records
    if recipe is not None:
        record_recipe(model, recipe)
    for stage in stages:
        record_stage(model, stage)
    record_negatives(model, negatives)
    for scores in evaluations:
        record_evaluation(model, scores)
    model.save(str(folder))
    return (folder / "README.md").read_text(encoding="utf8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="where the example models are saved (outside the repo)")
    parser.add_argument("--scifact", help="BEIR SciFact folder, for the collections' sizes")
    parser.add_argument("--python-faq", help="BEIR python-faq folder, for the collections' sizes")
    parser.add_argument("--card", default=str(Path(__file__).with_name("model_card_example.md")))
    args = parser.parse_args()
    sizes = {"scifact": collection_size(args.scifact), "python-faq": collection_size(args.python_faq)}

    daft_card = render(daft_run_records(sizes), Path(args.output) / "daft-e")
    corrected_card = render(corrector_run_records(sizes), Path(args.output) / "corrected")
    # st-daft's part of "Training Details": up to sentence-transformers' next subsection (datasets, versions)
    training = corrected_card.split("### Training with st-daft", 1)[1].split("\n### ", 1)[0]
    evaluation = corrected_card.split("### Retrieval results (MTEB)", 1)[1].split("\n<!--", 1)[0]

    page = f"""# Example model card

The `README.md` that `model.save()` writes for a model trained with st-daft: sentence-transformers' own card
(`SentenceTransformerModelCardData`, its sections in its order) with st-daft's sections in their places, from
the Jinja files in `st_daft/resources/model_card/` (`st_daft.models.card`, `st_daft.models.card_template`). Made by
`python docs/model_card_example.py --output /tmp/card-example --scifact ../shared/data/scifact
--python-faq ../shared/data/python-faq`, without training: the model is the real static + all-MiniLM-L6-v2 pair,
and the stages, collapse statistics and MTEB results are recorded from the benchmark run `e`
(`benchmarks/results/quality/daft_e.json`: DAFT alignment then joint fine-tuning, in-batch negatives, SciFact train). The
similarity printout of the usage snippet is off, since this copy's weights are not the trained ones; a trained
model's card prints them. Its recipe is rebuilt from the settings the run recorded; a setting added since shows its
default.

## With `--negatives corrected`

A run that mines corrected stale-cache negatives also gets the corrector's counts and errors and the corrector
networks citation. Its "Training with st-daft" part of "Training Details" and its MTEB results (in "Evaluation"),
recorded from `benchmarks/results/corrector/`
(`prepare.json`, `result-corrected.json`; the errors are the eval-mode sample measured at the end of training):

````markdown
### Training with st-daft{training.rstrip()}

### Retrieval results (MTEB){evaluation.rstrip()}
````

## The card of run `e`, in full

````markdown
{daft_card.rstrip()}
````
"""
    Path(args.card).write_text(page, encoding="utf8")
    print(f"wrote {args.card}")


if __name__ == "__main__":
    main()
