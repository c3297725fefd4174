"""Do mined negatives buy retrieval quality, and do corrected ones buy it at a fraction of the encoding?

Question: in a training where full re-embedding (``refresh:N``) beats in-batch negatives, does ``corrected`` come
    within noise of ``refresh:N`` with far fewer document texts encoded, and does ``stale`` fall below ``corrected``?
Command: ``python benchmarks/corrector_quality.py --data ../shared/data/scifact --work runs/corrector-quality``
    (sized for a GPU: 5 strategies x 5 seeds x 600 steps of all-MiniLM-L6-v2 on the whole corpus)
Results: benchmarks/results/corrector/quality.json
Page: docs/results/corrector.md

Each run is ``st-daft train --query-encoder symmetric --stages finetune --negatives STRATEGY`` with the same budget
and seed for every strategy: the document model itself fine-tuned, so no alignment stage has fitted the training
queries first (where one has, no strategy moved SciFact beyond noise). Every run is scored on the test split (nDCG@10,
MTEB); per strategy the report holds the per-seed scores, the document texts encoded during training (the loss's
positives, the mined negatives encoded fresh, and every re-embedding; the cache built before the first step is not
counted), and paired t-tests over the seeds: ``refresh:N`` against ``in-batch``, ``corrected`` against
``refresh:N`` and ``stale`` against ``corrected``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from scipy.stats import ttest_rel  # noqa: E402

from st_daft import evaluate_retrieval  # noqa: E402
from st_daft.cli import main as st_daft  # noqa: E402
from st_daft.models.card import negatives_from_log_history  # noqa: E402

RESULT = Path(__file__).parent / "results" / "corrector" / "quality.json"


def train(args: argparse.Namespace, strategy: str, seed: int) -> Path:
    output = Path(args.work) / f"{strategy.replace(':', '-')}-s{seed}"
    argv = [
        "train", "--data", args.data, "--output", str(output), "--query-encoder", args.query_encoder,
        "--stages", "finetune", "--negatives", strategy, "--finetune-steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--document-lr", str(args.document_lr),
        "--query-lr", str(args.document_lr), "--seed", str(seed), "--eval-steps", str(args.steps),
        # the miner's running counts are logged; a logging step on the last step makes them the run's totals
        "--set", f"finetune.logging_steps={math.gcd(args.steps, 25)}",
    ]  # fmt: skip
    if strategy != "in-batch":
        argv += ["--num-negatives", str(args.num_negatives)]
    if args.document_encoder:
        argv += ["--document-encoder", args.document_encoder]
    if (output / "daft_summary.json").is_file():
        return output  # measured before: the protocol resumes where it stopped
    if st_daft(argv) != 0:
        raise SystemExit(f"corrector quality: st-daft train failed for {strategy}, seed {seed}")
    return output


def texts_encoded(run: Path, args: argparse.Namespace) -> int:
    """Document texts the run encoded during training (the initial cache excluded)."""
    (stage,) = json.loads((run / "daft_summary.json").read_text())["stages"]
    negatives = negatives_from_log_history(stage["log_history"])
    if negatives and negatives.get("documents_encoded", {}).get("total") is not None:
        return int(negatives["documents_encoded"]["total"])
    return stage["steps"] * args.batch_size  # in-batch: the positives of each batch


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Paired t-test over seeds of ``a`` against ``b``."""
    test = ttest_rel(a, b)
    return {"mean_difference": fmean(x - y for x, y in zip(a, b)), "t": float(test.statistic), "p": float(test.pvalue)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a BEIR folder with train and test splits (SciFact)")
    parser.add_argument("--work", required=True, help="a folder for the runs (outside the repository)")
    parser.add_argument("--output", default=str(RESULT))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--refresh", type=int, default=50, help="N of refresh:N")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-negatives", type=int, default=4)
    parser.add_argument("--document-lr", type=float, default=2e-5)
    parser.add_argument("--query-encoder", default="symmetric")
    parser.add_argument("--document-encoder", default=None, help="default: all-MiniLM-L6-v2")
    args = parser.parse_args(argv)
    refresh = f"refresh:{args.refresh}"
    strategies = ["in-batch", "stale", "corrected", refresh, f"corrected+refresh:{4 * args.refresh}"]

    started = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}"
    scores: dict[str, list[float]] = {strategy: [] for strategy in strategies}
    encoded: dict[str, list[int]] = {strategy: [] for strategy in strategies}
    for seed in args.seeds:
        for strategy in strategies:
            run = train(args, strategy, seed)
            ndcg = float(evaluate_retrieval(str(run), args.data, split="test", show_progress_bar=False)["ndcg_at_10"])
            scores[strategy].append(ndcg)
            encoded[strategy].append(texts_encoded(run, args))
            print(json.dumps({"strategy": strategy, "seed": seed, "ndcg_at_10": ndcg, "texts": encoded[strategy][-1]}))
    report = {
        "question": "mined negatives against in-batch; corrected against full re-embedding, with texts encoded",
        "command": "python benchmarks/corrector_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"),
        "date": f"{started} to {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "settings": {key: value for key, value in vars(args).items() if key not in ("data", "work", "output")},
        "seeds": args.seeds,
        "ndcg_at_10": scores,
        "mean_ndcg_at_10": {strategy: fmean(values) for strategy, values in scores.items()},
        "texts_encoded": {strategy: fmean(values) for strategy, values in encoded.items()},
    }
    if len(args.seeds) >= 2:
        report["paired_tests"] = {
            f"{refresh} vs in-batch": paired(scores[refresh], scores["in-batch"]),
            f"corrected vs {refresh}": paired(scores["corrected"], scores[refresh]),
            "stale vs corrected": paired(scores["stale"], scores["corrected"]),
        }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"corrector quality: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
