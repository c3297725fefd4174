"""Weight interpolation of a trained static query table with its starting table (WiSE-FT for a static route).

WiSE-FT (Wortsman et al., CVPR 2022) averages a fine-tuned model's weights with its starting weights and often
gains on data unlike the training data at little cost on the training data. For a static query route the weights
are one table: ``table = alpha * trained + (1 - alpha) * start`` (``st_daft.interpolate_route``, as the align stage
does it). This script loads a trained model and a model holding the starting table (``st-daft train --stages
vocabulary`` with the same data and seed), scores every alpha on the given collections with ``evaluate_collections``
and writes the figures.

Example (the seventh session's check)::

    st-daft train --data ../shared/data/scifact --stages vocabulary --output runs/vocab-s0 --seed 0
    python benchmarks/interpolate_static_table.py runs/static-s0 runs/vocab-s0 --alphas 1,0.7,0.5 \\
        --data ../shared/data/scifact --data ../shared/data/python-faq --document-store ../notes/store

The eleventh session's sweep, against the corpus stage's route instead (the default now interpolates so inside the
align stage, ``--align-interpolation``)::

    st-daft train --data ../shared/data/scifact --stages vocabulary,corpus --output runs/vc-s0 --seed 0
    st-daft train --data ../shared/data/scifact --align-interpolation 1 --output runs/static-s0 --seed 0
    python benchmarks/interpolate_static_table.py runs/static-s0 runs/vc-s0 --alphas 1,0.9,0.85,0.75,0.65,0.5 \\
        --data ../shared/data/scifact --data ../shared/data/python-faq --name align-start-s0

Results go to ``benchmarks/results/interpolate_static_table/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

from sentence_transformers import SentenceTransformer

from st_daft import QUERY_ROUTE, interpolate_route, route_weights
from st_daft.evaluation.mteb import evaluate_collections

RESULTS = Path(__file__).parent / "results" / "interpolate_static_table"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trained", help="the trained model")
    parser.add_argument("start", help="a model whose query table is the trained one's starting point")
    parser.add_argument("--alphas", default="1,0.85,0.7,0.5", help="comma-separated weights of the trained table")
    parser.add_argument("--data", action="append", required=True, help="a collection (repeatable)")
    parser.add_argument("--split", default=None, help="qrels split (default: test)")
    parser.add_argument("--document-store", default=None)
    parser.add_argument("--name", default=None, help="result file name (default: the trained model's folder name)")
    args = parser.parse_args()

    model = SentenceTransformer(args.trained, device="cpu")
    trained = route_weights(model, QUERY_ROUTE)
    start = route_weights(SentenceTransformer(args.start, device="cpu"), QUERY_ROUTE)
    scores = {}
    for alpha in (float(value) for value in args.alphas.split(",")):
        # What AlignStage(interpolation=alpha) keeps: back to the trained route (weight 0 keeps the "start" given,
        # here the trained weights), then the average with the starting route (shapes checked).
        interpolate_route(model, QUERY_ROUTE, trained, 0.0)
        interpolate_route(model, QUERY_ROUTE, start, alpha)
        label = f"alpha={alpha:g}"
        result = evaluate_collections(
            [model],
            args.data,
            args.split,
            labels=[label],
            document_store=args.document_store,
            show_progress_bar=False,
        )
        scores[label] = {name: flat["ndcg_at_10"] for name, flat in result["scores"][label].items()}
        print(label, scores[label], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.name or Path(args.trained).name
    record = {
        "date": str(date.today()),
        "trained": args.trained,
        "start": args.start,
        "split": args.split or "test",
        "ndcg_at_10": scores,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
