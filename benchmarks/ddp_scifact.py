"""2-process (torchrun, DDP) against 1-process training on SciFact, with the same global batch: final nDCG@10 on the
test split and training wall time.

Question: Do two processes (torchrun, DDP) end where one does, at the same global batch?
Command: ``python benchmarks/ddp_scifact.py --data ../shared/data/scifact --work runs/ddp-bench --output
    benchmarks/results/crash_safety/ddp_scifact.json``
Results: benchmarks/results/crash_safety/ddp_scifact.json
Page: docs/results/crash-safety.md

The budget is the DAFT alignment stage (static query route, MiniLM document route frozen; the corpus cache comes
from the document store, so neither run encodes the corpus), which is what fits this CPU machine; the commands are
the ordinary ``st-daft train`` / ``st-daft evaluate`` ones, so a GPU node runs the same with ``--nproc``, a larger
budget and ``--stages align,finetune``. On a 2-core machine two processes share the same two cores: the wall time
cannot improve, and this measures the overhead of DDP and the equality of the result, not a speed-up.

Usage::

    python benchmarks/ddp_scifact.py --data ../shared/data/scifact --work runs/ddp-bench \
        --document-store runs/store --steps 200 --global-batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run(command: list[str], log: Path) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{' '.join(command)} failed ({code}); see {log}")
    return time.perf_counter() - started


def _collection_scores(written: dict) -> dict:
    """The one collection's scores from ``st-daft evaluate --output`` (``{"scores": {model: {collection: ...}}}``)."""
    if "ndcg_at_10" in written:
        return written
    (collections,) = written["scores"].values()
    (scores,) = collections.values()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="SciFact BEIR folder")
    parser.add_argument("--work", required=True, help="folder for the two runs")
    parser.add_argument("--document-store", default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument(
        "--device", default=None, help="st-daft train --device (cpu on a CPU-only machine: see README, torchrun)"
    )
    parser.add_argument("--output", default="benchmarks/results/crash_safety/ddp_scifact.json")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = ["--document-store", args.document_store] if args.document_store else []
    results = {"steps": args.steps, "global_batch": args.global_batch, "runs": {}}
    for processes in (1, args.nproc):
        name = f"{processes}-process"
        output = work / name
        train = [
            "train", "--data", args.data, "--output", str(output), "--query-encoder", "static", "--stages", "align",
            "--align-steps", str(args.steps), "--align-batch-size", str(args.global_batch // processes),
            "--eval-steps", str(args.steps), "--seed", "0", *store,
        ]  # fmt: skip
        if args.device:
            train += ["--device", args.device]
        if processes == 1:
            command = [sys.executable, "-m", "st_daft.cli", *train]
        else:
            command = [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "st_daft.cli", *train,
            ]  # fmt: skip
        seconds = _run(command, work / f"{name}-train.log")
        scores_file = work / f"{name}-scores.json"
        evaluate = ["evaluate", str(output), "--data", args.data, "--split", "test", "--output", str(scores_file)]
        _run([sys.executable, "-m", "st_daft.cli", *evaluate, *store], work / f"{name}-evaluate.log")
        scores = _collection_scores(json.loads(scores_file.read_text()))
        summary = json.loads((output / "daft_summary.json").read_text())
        results["runs"][name] = {
            "processes": processes,
            "per_process_batch": args.global_batch // processes,
            "train_wall_seconds": round(seconds, 1),
            "ndcg_at_10": scores.get("ndcg_at_10"),
            "final_knn_kl": summary["stages"][-1]["final_metrics"].get("alignment_knn_kl"),
            "steps": summary["stages"][-1]["steps"],
        }
        print(name, results["runs"][name], flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.output}")


if __name__ == "__main__":
    main()
