"""Serve the query route alone and measure its latency.

A search service embeds documents once, offline, and queries one at a time. The query route of a trained static
model exports to a model2vec folder: a table lookup and a mean, no torch, the same vectors as encode_query.

    python examples/serve_query_route.py runs/example-static --queries ../shared/data/scifact/queries.jsonl [--quick]
"""

import argparse
import json
import statistics
import time

from model2vec import StaticModel
from sentence_transformers import SentenceTransformer

from st_daft import export_static_model
from st_daft.serving import StaticQueryEncoder

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", help="a trained asymmetric model with a static query route")
parser.add_argument("--queries", required=True, help="a queries.jsonl (BEIR) to time")
parser.add_argument("--output", default=None, help="where to write the exported route (default MODEL-queries)")
parser.add_argument("--quick", action="store_true", help="time 50 queries")
args = parser.parse_args()

output = args.output or f"{args.model.rstrip('/')}-queries"
full = SentenceTransformer(args.model)
export_static_model(full, output)  # model2vec folder: StaticModel.from_pretrained(output) anywhere, no torch
served = StaticModel.from_pretrained(output)
fast = StaticQueryEncoder(output)  # the same folder, model2vec's arithmetic without its per-call set-up

with open(args.queries, encoding="utf-8") as handle:
    queries = [json.loads(line)["text"] for line in handle if line.strip()][: 50 if args.quick else 1000]
difference = abs(served.encode(queries) - full.encode_query(queries)).max()
print(f"max |model2vec - encode_query| = {difference:.2e}")
print(f"max |StaticQueryEncoder - model2vec| = {abs(fast.encode(queries) - served.encode(queries)).max():.2e}")
for name, encode in (("model2vec StaticModel", served.encode), ("StaticQueryEncoder", fast.encode)):
    latencies = []
    for query in queries:
        started = time.perf_counter()
        encode([query])
        latencies.append((time.perf_counter() - started) * 1000)
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    rate = len(latencies) / (sum(latencies) / 1000)
    print(f"{name}, batch 1: p50 {statistics.median(latencies):.3f} ms, p99 {p99:.3f} ms, {rate:,.0f} queries/s")
