"""Retrieval and KL at every alignment checkpoint: which checkpoint should the align stage keep?

Runs ``st-daft train`` (any of its flags after ``--``) with the align stage evaluating and saving a checkpoint every
``--every`` steps and keeping all of them (the training arguments are patched for that stage only: the library keeps
two), then scores every kept align checkpoint with ``st-daft evaluate`` on the given collections, beside the 1-NN KL
that the stage logged at that step.

Example (the sixth session's sweep; pass ``--align-select kl`` and ``--kl-patience 0`` so the stage runs its whole
budget)::

    python benchmarks/align_checkpoints.py --output runs/sweep --data ../shared/data/scifact \\
        --data ../shared/data/python-faq --document-store ../notes/store -- \\
        --data ../shared/data/scifact --seed 1 --align-steps 400 --kl-patience 0 --align-select kl

Results go to ``benchmarks/results/align_checkpoints/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import st_daft.training.stages as stages
from st_daft.cli import main as cli_main
from st_daft.evaluation.mteb import evaluate_collections

RESULTS = Path(__file__).parent / "results" / "align_checkpoints"


def keep_every_align_checkpoint(every: int) -> None:
    original = stages.training_arguments

    def patched(output_dir, stage, context, metric, greater_is_better, learning_rate=None, **overrides):
        if stage.name == "align":
            stage.eval_steps = every
        arguments = original(output_dir, stage, context, metric, greater_is_better, learning_rate, **overrides)
        if stage.name == "align":
            arguments.save_total_limit = None
        return arguments

    stages.training_arguments = patched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="the run's folder (its checkpoints are kept)")
    parser.add_argument("--data", action="append", required=True, help="collections to evaluate on (repeatable)")
    parser.add_argument("--document-store", default=None)
    parser.add_argument("--every", type=int, default=25, help="align steps between checkpoints")
    parser.add_argument("--name", default=None, help="results file name (default: the output folder's name)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then st-daft train's flags")
    args = parser.parse_args()
    train_args = [arg for arg in args.train_args if arg != "--"]
    store = ["--document-store", args.document_store] if args.document_store else []

    keep_every_align_checkpoint(args.every)
    cli_main(["train", "--output", args.output, "--keep-checkpoints", "--overwrite", *store, *train_args])

    folder = Path(args.output) / stages.AlignStage.folder
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[-1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    kl = {row["step"]: row[stages.KL_METRIC] for row in state["log_history"] if stages.KL_METRIC in row}
    steps = [int(checkpoint.name.split("-")[-1]) for checkpoint in checkpoints]
    comparison = evaluate_collections(
        [str(checkpoint) for checkpoint in checkpoints],
        args.data,
        labels=[f"step {step}" for step in steps],
        document_store=args.document_store,
    )
    rows = []
    for step in steps:
        scores = comparison["scores"][f"step {step}"]
        rows.append(
            {"step": step, "knn_kl": kl.get(step), "ndcg_at_10": {c: s["ndcg_at_10"] for c, s in scores.items()}}
        )
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"date": date.today().isoformat(), "train_args": train_args, "checkpoints": rows}
    path = RESULTS / f"{args.name or Path(args.output).name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"written {path}")


if __name__ == "__main__":
    main()
