"""A uniform soup of static query routes: the tables of several runs (other seeds) averaged into one table.

:func:`st_daft.soup_static_routes` (``st-daft soup``) builds the soup; this script saves it and scores the runs and
the soup with ``evaluate_collections`` in one go.

Example (the tenth session's check)::

    python benchmarks/soup_static_tables.py runs/pq-s0 runs/pq-s1 runs/pq-s2 --output runs/pq-soup \\
        --data ../shared/data/scifact --document-store ../notes/store

Results go to ``benchmarks/results/soup_static_tables/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

from st_daft import soup_static_routes
from st_daft.evaluation.mteb import evaluate_collections

RESULTS = Path(__file__).parent / "results" / "soup_static_tables"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="trained models (two or more)")
    parser.add_argument("--output", required=True, help="folder for the soup model (must not exist)")
    parser.add_argument("--data", action="append", required=True, help="a collection (repeatable)")
    parser.add_argument("--document-store", default=None)
    parser.add_argument("--name", default=None, help="result file name (default: the output folder's name)")
    args = parser.parse_args()
    soup_static_routes(args.runs, output_path=args.output)  # what `st-daft soup RUNS --output OUT` does
    labels = [*(Path(run).name for run in args.runs), "soup"]
    models = [*args.runs, args.output]
    result = evaluate_collections(
        models, args.data, labels=labels, document_store=args.document_store, show_progress_bar=False
    )
    scores = {label: {name: flat["ndcg_at_10"] for name, flat in result["scores"][label].items()} for label in labels}
    for label, score in scores.items():
        print(label, score, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.name or Path(args.output).name
    record = {"date": str(date.today()), "runs": args.runs, "output": args.output, "ndcg_at_10": scores}
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
