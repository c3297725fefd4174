"""Same seed, same command, same model: two ``st-daft train`` runs that differ only in PYTHONHASHSEED end equal.

String hashing is salted per process (PYTHONHASHSEED), so anything that iterates a set of ids or texts into
order-dependent work (the training pairs, the validation split, sampled texts) changes the run. The runs happen in
subprocesses because the salt is fixed when the interpreter starts.
"""

from __future__ import annotations

import json

import torch

from tests.training_runs import assert_same_weights, cli, finish, model_weights, start, tiny_train_args


def test_same_seed_same_model_whatever_the_hash_seed(tiny_document_model_dir, tiny_beir_dir, tmp_path) -> None:
    runs = {}
    for hash_seed in ("1", "2"):
        output = tmp_path / f"run-{hash_seed}"
        args = tiny_train_args(
            tiny_document_model_dir,
            tiny_beir_dir,
            output,
            "--query-encoder",
            "static",
            "--stages",
            "vocabulary,corpus,align,finetune",
            "--corpus-steps",
            "2",
            "--corpus-max-texts",
            "40",
            "--align-steps",
            "2",
            "--finetune-steps",
            "3",
            "--negatives",
            "corrected",
            "--num-negatives",
            "2",
        )
        log = tmp_path / f"run-{hash_seed}.log"
        runs[hash_seed] = (start(cli(args), log, PYTHONHASHSEED=hash_seed), log, output)
    for process, log, _ in runs.values():  # both at once: on 2 cores that halves the wait
        finish(process, log)
    (_, _, first), (_, _, second) = runs.values()
    assert_same_weights(model_weights(first), model_weights(second), rtol=0, atol=0)
    scores = [json.loads((output / "daft_summary.json").read_text()) for output in (first, second)]
    finals = [[stage["final_metrics"].get("alignment_knn_kl") for stage in summary["stages"]] for summary in scores]
    assert finals[0] == finals[1]
    assert torch.isfinite(torch.tensor([value for value in finals[0] if value is not None])).all()
