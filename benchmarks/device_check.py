"""Device check: each recipe trained on a CUDA GPU beside the same run on the CPU.

Question: do st-daft's recipes train on a GPU as they do on the CPU (the static default; DAFT's ``align,finetune``
    with corrected stale-cache negatives, so the corpus cache, the corrector and mining run on the device; the
    static default in fp16 and bf16 mixed precision), and how long does each take?
Command: ``bash scripts/device_check.sh --data ../shared/data/scifact`` (on a machine with a CUDA GPU; under 8 minutes)
Results: benchmarks/results/device/device_check.json
Page: docs/results/scale.md

Every run trains on a sample of the training split (``--train-queries`` claims, their abstracts and distractors up
to ``--documents``) for ``--steps`` steps a stage, with the same seed, and is scored (nDCG@10, MTEB) on a sample of
the test split. A GPU run passes when its nDCG@10 is within ``--ndcg-tolerance`` of the CPU run of the same recipe
and its first logged training loss of each stage within ``--loss-tolerance`` (relative; float16 and bfloat16 runs
get twice both): the two devices sum in other orders, so the weights part after a few steps and a tolerance, not
equality, is what the check can hold them to. The exit status is 1 when a run fails or a check misses, 2 on bad
input, 0 otherwise. ``--cpu-only`` runs the CPU half alone (what the test suite runs on a tiny slice).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from st_daft import DAFTConfig, build_asymmetric_model, evaluate_retrieval, load_beir, train_daft  # noqa: E402
from st_daft.data import RetrievalData  # noqa: E402
from st_daft.models.card import negatives_from_log_history  # noqa: E402
from st_daft.training.stages import STAGE_TYPES  # noqa: E402

RESULT = Path(__file__).parent / "results" / "device" / "device_check.json"

#: The recipes checked: name -> (query encoder, stages, settings of the finetune stage, precisions on the GPU).
RECIPES: dict[str, tuple[str, list[str], dict, tuple[str, ...]]] = {
    "static-default": ("static", ["vocabulary", "corpus", "align"], {}, ("fp32", "fp16", "bf16")),
    "daft-corrected": ("static", ["align", "finetune"], {"negatives": "corrected", "num_negatives": 2}, ("fp32",)),
}


def samples(data: str, train_queries: int, test_queries: int, documents: int) -> tuple[RetrievalData, RetrievalData]:
    train = load_beir(data, "train")
    train = train.sample(train_queries, max(0, documents - train_queries), seed=0)
    test = load_beir(data, "test")
    return train, test.sample(test_queries, max(0, documents - test_queries), seed=0)


def stages_of(names: list[str], steps: int, finetune: dict) -> list:
    """The recipe's stages, each trained ``steps`` steps and logging every step (the first losses are compared)."""
    stages = []
    for name in names:
        kind = STAGE_TYPES[name]
        if name == "vocabulary":
            stages.append(kind(max_documents=200))
            continue
        budget = {"max_steps": steps, "eval_steps": steps, "logging_steps": 1, "batch_size": 16}
        stages.append(kind(**budget, **(finetune if name == "finetune" else {})))
    return stages


def first_losses(summary) -> dict[str, float]:
    """The first logged training loss of each stage that trained."""
    losses = {}
    for result in summary.stages:
        logged = [entry["loss"] for entry in result.log_history if "loss" in entry]
        if logged:
            losses[result.name] = float(logged[0])
    return losses


def run_one(recipe: str, device: str, precision: str, args, train: RetrievalData, test: RetrievalData) -> dict:
    query_encoder, names, finetune, _ = RECIPES[recipe]
    output = Path(args.work) / f"{recipe}-{device}-{precision}"
    record: dict = {"recipe": recipe, "device": device, "precision": precision, "stages": names}
    try:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model = build_asymmetric_model(args.document_encoder, query_encoder, device=device, seed=0)
        config = DAFTConfig(stages=stages_of(names, args.steps, finetune), device=device, precision=precision)
        summary = train_daft(model, train, output, config, overwrite=True)
        record["train_seconds"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        scores = evaluate_retrieval(SentenceTransformer(str(output), device=device), test, show_progress_bar=False)
        record["evaluate_seconds"] = round(time.perf_counter() - start, 2)
        record["ndcg_at_10"] = round(float(scores["ndcg_at_10"]), 5)
        record["first_losses"] = first_losses(summary)
        record["stage_seconds"] = {result.name: round(result.seconds, 2) for result in summary.stages}
        record["negatives"] = negatives_from_log_history(summary.stages[-1].log_history)
        if device == "cuda":
            record["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        record["ok"] = True
    except Exception as error:  # a failed run is reported, and the check goes on with the others
        record.update(ok=False, error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc(limit=8))
    print(json.dumps({key: value for key, value in record.items() if key != "traceback"}), flush=True)
    return record


def compare(gpu: dict, cpu: dict, args) -> list[str]:
    """What a GPU run misses against the CPU run of its recipe (empty when it is within the tolerances)."""
    if not (gpu["ok"] and cpu["ok"]):
        return [f"{gpu['recipe']} {gpu['precision']}: a run failed"]
    factor = 1.0 if gpu["precision"] == "fp32" else 2.0
    misses = []
    gap = abs(gpu["ndcg_at_10"] - cpu["ndcg_at_10"])
    if gap > args.ndcg_tolerance * factor:
        misses.append(f"{gpu['recipe']} {gpu['precision']}: nDCG@10 {gpu['ndcg_at_10']} vs CPU {cpu['ndcg_at_10']}")
    for stage, loss in cpu["first_losses"].items():
        other = gpu["first_losses"].get(stage)
        if other is None or abs(other - loss) > args.loss_tolerance * factor * max(abs(loss), 1e-6):
            misses.append(f"{gpu['recipe']} {gpu['precision']}: {stage} first loss {other} vs CPU {loss}")
    return misses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a BEIR folder with train and test splits (SciFact)")
    parser.add_argument("--work", required=True, help="a folder for the runs (outside the repository)")
    parser.add_argument("--output", default=str(RESULT), help="the JSON report")
    parser.add_argument("--document-encoder", default=None, help="default: all-MiniLM-L6-v2")
    parser.add_argument("--steps", type=int, default=40, help="training steps of each trained stage")
    parser.add_argument("--train-queries", type=int, default=200)
    parser.add_argument("--test-queries", type=int, default=100)
    parser.add_argument("--documents", type=int, default=1000, help="documents in each sample")
    parser.add_argument("--ndcg-tolerance", type=float, default=0.03, help="GPU vs CPU, absolute (fp32)")
    parser.add_argument("--loss-tolerance", type=float, default=0.02, help="GPU vs CPU first loss, relative (fp32)")
    parser.add_argument("--cpu-only", action="store_true", help="the CPU runs alone (no GPU needed)")
    args = parser.parse_args(argv)
    if not args.cpu_only and not torch.cuda.is_available():
        print("device check: torch sees no CUDA device; run it on a GPU machine, or pass --cpu-only", file=sys.stderr)
        return 2
    if not Path(args.data).is_dir():
        print(f"device check: --data {args.data} is not a BEIR folder", file=sys.stderr)
        return 2
    train, test = samples(args.data, args.train_queries, args.test_queries, args.documents)

    start = time.perf_counter()
    runs, misses = [], []
    for recipe, (_, _, _, precisions) in RECIPES.items():
        cpu = run_one(recipe, "cpu", "fp32", args, train, test)
        runs.append(cpu)
        if not cpu["ok"]:
            misses.append(f"{recipe} on the CPU: {cpu['error']}")
        if args.cpu_only:
            continue
        for precision in precisions:
            gpu = run_one(recipe, "cuda", precision, args, train, test)
            runs.append(gpu)
            misses.extend(compare(gpu, cpu, args))
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": "python benchmarks/device_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
        "settings": {
            key: getattr(args, key)
            for key in ("steps", "train_queries", "test_queries", "documents", "ndcg_tolerance", "loss_tolerance")
        },
        "cpu_only": args.cpu_only,
        "runs": runs,
        "misses": misses,
        "passed": not misses,
        "seconds": round(time.perf_counter() - start, 1),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"device check: {'passed' if not misses else 'FAILED'} in {report['seconds']} s; report {args.output}")
    for miss in misses:
        print(f"  {miss}")
    return 0 if not misses else 1


if __name__ == "__main__":
    sys.exit(main())
