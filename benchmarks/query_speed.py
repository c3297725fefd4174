"""Query-encoding speed, every measurement of a run in one process, one encoder after the other.

Question: How many queries a second does each way of serving a query route encode, against MiniLM and the floor?
Command: ``python benchmarks/query_speed.py --serving RUN --queries ../shared/data/scifact --output
    benchmarks/results/serving/query_speed_serving_7_idle.json``
Results: benchmarks/results/serving/
Page: docs/results/serving.md


Two modes.

**Models** (``python benchmarks/query_speed.py MODEL ...``): for each model, ``encode_query`` queries per second at
batch size 1 (one call per query) and 32 over the SciFact test claims, after a warm-up pass. For every asymmetric
(Router) model, its query route is also exported with :func:`st_daft.export_route` (in memory) and measured as
``"<name> (query route only)"``; its largest absolute difference to the full model's ``encode_query`` vectors over
the first 32 queries is recorded as ``max_abs_diff``. ``--no-export-query-route`` skips these rows. JSON:
``{"threads", "num_queries", "models": {name: {"batch_1", "batch_32"}}}`` (read by ``benchmarks/report.py``).

**Serving** (``python benchmarks/query_speed.py --serving [MODEL ...]``): a static query route served every way,
against all-MiniLM-L6-v2 and the floor::

    python benchmarks/query_speed.py --serving                 # the static route of build_asymmetric_model, in memory
    python benchmarks/query_speed.py --serving runs/static --output benchmarks/results/serving/serving_1.json

- ``floor``: what a static route needs and nothing else: the Rust tokenizer (``tokenizers``), numpy gather of the
  token rows, mean, normalise; on the route's table with every ``Dense`` folded in;
- ``all-MiniLM-L6-v2``: ``SentenceTransformer.encode`` of the document encoder alone (a symmetric service);
- ``full model encode_query``: the asymmetric Router model;
- ``sentence-transformers export``: ``st-daft export`` (``export_route``), loaded with ``SentenceTransformer(path)``;
- ``model2vec export (float32|float16|int8)``: ``st-daft export --format model2vec``, loaded with
  ``model2vec.StaticModel.from_pretrained(path)``;
- ``StaticQueryEncoder (float32|float16|int8)``: the same folders served by :class:`st_daft.serving.StaticQueryEncoder`
  (model2vec's arithmetic, without its per-call set-up).

Each MODEL must be an asymmetric model with a static query route (default: the untrained static route of
``build_asymmetric_model(query_encoder="static")``, whose speed is that of any trained one: same table, same
tokenizer). Timing runs in ``--rounds`` rounds; in each round every encoder gets ``--seconds`` seconds at batch size 1
(one call per query, each call timed: p50/p99 latency) and as long at batch size 32, so load from other processes
falls on all encoders alike. Queries/s at batch size 1 is one over the mean call latency. Ratios are against MiniLM and
the floor of the same run. Also recorded: each export's largest absolute difference to the full model's
``encode_query`` vectors and its mean/min cosine to them, and how many queries contain an unknown token (model2vec
drops those tokens, ``StaticEmbedding`` averages them in).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from model2vec import StaticModel
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Router
from tokenizers import Tokenizer

from st_daft import build_asymmetric_model, default_document_encoder, export_route, load_beir
from st_daft.serving import StaticQueryEncoder, export_static_model, static_route_table

QUERY_ONLY_SUFFIX = " (query route only)"


def throughput(model: SentenceTransformer, texts: list[str], batch_size: int, min_seconds: float = 3.0) -> float:
    """Queries per second of ``model.encode_query`` over ``texts`` in calls of ``batch_size`` (repeated)."""
    model.encode_query(texts[:batch_size], batch_size=batch_size)  # warm-up
    encoded, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds:
        for start in range(0, len(texts), batch_size):
            model.encode_query(texts[start : start + batch_size], batch_size=batch_size, show_progress_bar=False)
            encoded += len(texts[start : start + batch_size])
    return encoded / (time.perf_counter() - started)


def measure(model: SentenceTransformer, texts: list[str], min_seconds: float) -> dict[str, float]:
    model.eval()
    with torch.inference_mode():
        return {f"batch_{size}": round(throughput(model, texts, size, min_seconds), 1) for size in (1, 32)}


Encoder = Callable[[list[str]], np.ndarray]
FLOOR = "floor (tokenizers + numpy)"
MINILM = "all-MiniLM-L6-v2 encode"


class FloorEncoder:
    """Tokenize, gather, mean, normalise: the least work a static route needs per query."""

    def __init__(self, table: np.ndarray, tokenizer: Tokenizer) -> None:
        self.table = table
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def __call__(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        vectors = np.zeros((len(texts), self.table.shape[1]), dtype=np.float32)
        for row, encoding in enumerate(encodings):
            if encoding.ids:
                vectors[row] = self.table[encoding.ids].mean(axis=0)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def time_encoder(encode: Encoder, texts: list[str], seconds: float, stats: dict[str, list[float]]) -> None:
    """Add ``seconds`` of batch-1 calls (each timed) and of batch-32 calls to ``stats``."""
    started, index = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        text = [texts[index % len(texts)]]
        call = time.perf_counter()
        encode(text)
        stats["batch_1_latencies"].append(time.perf_counter() - call)
        index += 1
    started, encoded, index = time.perf_counter(), 0, 0
    while time.perf_counter() - started < seconds:
        batch = [texts[(index + offset) % len(texts)] for offset in range(32)]
        encode(batch)
        encoded, index = encoded + len(batch), index + 32
    stats["batch_32_seconds"].append(time.perf_counter() - started)
    stats["batch_32_queries"].append(encoded)


def summary(stats: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    latencies = np.array(stats["batch_1_latencies"])
    return {
        "batch_1": {
            "queries_per_s": round(len(latencies) / latencies.sum(), 1),
            "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 4),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 4),
            "calls": len(latencies),
        },
        "batch_32": {"queries_per_s": round(sum(stats["batch_32_queries"]) / sum(stats["batch_32_seconds"]), 1)},
    }


def agreement(vectors: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    vectors = vectors.astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(expected, axis=1)
    cosines = (vectors * expected).sum(axis=1) / np.maximum(norms, 1e-12)
    return {
        "max_abs_diff": float(np.abs(vectors - expected).max()),
        "mean_cosine": float(cosines.mean()),
        "min_cosine": float(cosines.min()),
    }


def serving_encoders(model: SentenceTransformer, folder: Path, prefix: str) -> dict[str, Encoder]:
    """The full model, its sentence-transformers export and its model2vec exports, loaded from disk as served."""
    export_route(model, output_path=folder / "st")
    exported = SentenceTransformer(str(folder / "st"), device="cpu")
    encoders: dict[str, Encoder] = {
        f"{prefix}full model encode_query": lambda texts: model.encode_query(texts, batch_size=32),
        f"{prefix}sentence-transformers export": lambda texts: exported.encode_query(texts, batch_size=32),
    }
    for dtype in ("float32", "float16", "int8"):
        export_static_model(model, folder / dtype, dtype=dtype)
        static_model = StaticModel.from_pretrained(str(folder / dtype))
        encoders[f"{prefix}model2vec export ({dtype})"] = static_model.encode
        encoders[f"{prefix}StaticQueryEncoder ({dtype})"] = StaticQueryEncoder(folder / dtype).encode
    return encoders


def serving(args: argparse.Namespace) -> None:
    """The --serving mode (see the module docs)."""
    texts = list(load_beir(args.queries, "test").queries.values())
    load_before = os.getloadavg()

    minilm = SentenceTransformer(default_document_encoder(), device="cpu")
    models = {Path(path).name: SentenceTransformer(path, device="cpu") for path in args.models}
    if not models:
        models["static (untrained, build_asymmetric_model)"] = build_asymmetric_model(query_encoder="static")
    encoders: dict[str, Encoder] = {MINILM: lambda batch: minilm.encode(batch, batch_size=32)}
    agreements: dict[str, dict[str, float]] = {}
    unknown_queries: dict[str, int] = {}
    folder = Path(tempfile.mkdtemp(prefix="query_speed_"))
    for index, (name, model) in enumerate(models.items()):
        model.eval()
        prefix = "" if len(models) == 1 else f"{name}: "
        table, tokenizer, _ = static_route_table(model)
        unk = tokenizer.token_to_id(str(tokenizer.model.unk_token)) if hasattr(tokenizer.model, "unk_token") else None
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        unknown_queries[name] = sum(unk in encoding.ids for encoding in encodings) if unk is not None else 0
        encoders[prefix + FLOOR] = FloorEncoder(table, tokenizer)
        served = serving_encoders(model, folder / str(index), prefix)
        encoders.update(served)
        expected = model.encode_query(texts)
        for encoder_name, encode in [(prefix + FLOOR, encoders[prefix + FLOOR]), *served.items()]:
            agreements[encoder_name] = agreement(encode(texts), expected)
        # model2vec's own int8 (one scale for the whole table), for comparison with the per-row scales used here.
        global_int8 = StaticModel.from_pretrained(str(folder / str(index) / "float32"), quantize_to="int8")
        agreements[prefix + "model2vec int8, one global scale (not timed)"] = agreement(
            global_int8.encode(texts), expected
        )

    stats = {name: {"batch_1_latencies": [], "batch_32_seconds": [], "batch_32_queries": []} for name in encoders}
    with torch.inference_mode():
        for encode in encoders.values():  # warm-up
            encode(texts[:32])
            encode(texts[:1])
        for round_index in range(args.rounds):
            for name, encode in encoders.items():
                time_encoder(encode, texts, args.seconds, stats[name])
            print(f"round {round_index + 1}/{args.rounds} done, load {os.getloadavg()[0]:.2f}", flush=True)

    results = {name: summary(stats[name]) for name in encoders}
    for name in results:
        if name in agreements:
            results[name]["agreement_with_encode_query"] = agreements[name]
        floor = next((key for key in results if key.endswith(FLOOR) and key[: -len(FLOOR)] in name), None)
        for batch in ("batch_1", "batch_32"):
            speed = results[name][batch]["queries_per_s"]
            results[name][batch]["x_minilm"] = round(speed / results[MINILM][batch]["queries_per_s"], 2)
            if floor is not None:
                results[name][batch]["x_floor"] = round(speed / results[floor][batch]["queries_per_s"], 3)
        # Median latencies: less sensitive than the mean to other processes' preemptions on a loaded machine.
        p50 = results[name]["batch_1"]["p50_ms"]
        results[name]["batch_1"]["x_minilm_p50"] = round(results[MINILM]["batch_1"]["p50_ms"] / p50, 1)
        if floor is not None:
            results[name]["batch_1"]["x_floor_p50"] = round(results[floor]["batch_1"]["p50_ms"] / p50, 3)
    untimed = {
        name: {"agreement_with_encode_query": values} for name, values in agreements.items() if name not in results
    }
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs)",
        "load_average_before": [round(value, 2) for value in load_before],
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "num_queries": len(texts),
        "queries_with_unknown_tokens": unknown_queries,
        "rounds": args.rounds,
        "seconds_per_round": args.seconds,
        "encoders": results,
        "not_timed": untimed,
    }
    print(
        f"{'encoder':40s} {'b1 q/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'xMiniLM':>8s} {'xfloor':>7s} "
        f"{'xMiniLM p50':>11s} {'xfloor p50':>10s} {'b32 q/s':>8s}"
    )
    for name, row in results.items():
        one = row["batch_1"]
        print(
            f"{name:40s} {one['queries_per_s']:8.1f} {one['p50_ms']:8.3f} {one['p99_ms']:8.3f} {one['x_minilm']:8.1f} "
            f"{one.get('x_floor', float('nan')):7.3f} {one['x_minilm_p50']:11.1f} "
            f"{one.get('x_floor_p50', float('nan')):10.3f} {row['batch_32']['queries_per_s']:8.1f}"
        )
    for name, values in agreements.items():
        print(f"{name}: vs encode_query " + ", ".join(f"{key} {value:.6g}" for key, value in values.items()))
    print(f"queries with an unknown token: {unknown_queries}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"written to {args.output}")


def models(args: argparse.Namespace) -> None:
    """The models mode (see the module docs)."""
    texts = list(load_beir(args.queries, "test").queries.values())
    results = {"threads": torch.get_num_threads(), "num_queries": len(texts), "models": {}}
    for path in args.models:
        name = Path(path).name
        model = SentenceTransformer(path, device="cpu")
        results["models"][name] = measure(model, texts, args.min_seconds)
        print(name, results["models"][name], flush=True)
        if args.export_query_route and any(isinstance(module, Router) for module in model.children()):
            served = export_route(model)
            sample = texts[:32]
            difference = np.abs(served.encode_query(sample) - model.encode_query(sample)).max()
            del model  # measure the query route alone, as it would be served
            speeds = {**measure(served, texts, args.min_seconds), "max_abs_diff": float(difference)}
            results["models"][name + QUERY_ONLY_SUFFIX] = speeds
            print(name + QUERY_ONLY_SUFFIX, speeds, flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "models", nargs="*", help="models (with --serving: asymmetric models with a static query route)"
    )
    parser.add_argument("--queries", default="../shared/data/scifact", help="BEIR folder whose test queries are used")
    parser.add_argument(
        "--output", default=None, help="JSON file (default benchmarks/results/serving/query_speed[_serving].json)"
    )
    parser.add_argument("--serving", action="store_true", help="serving mode: floor, MiniLM, full model and exports")
    parser.add_argument(
        "--export-query-route",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="models mode: also measure each asymmetric model's exported query route (default: on)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="models mode: time per model and batch size")
    parser.add_argument("--rounds", type=int, default=3, help="serving mode: rounds (encoders interleaved in each)")
    parser.add_argument("--seconds", type=float, default=2.0, help="serving mode: seconds per encoder, batch, round")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.output is None:
        args.output = f"benchmarks/results/serving/query_speed{'_serving' if args.serving else ''}.json"
    if args.serving:
        serving(args)
    elif not args.models:
        parser.error("give one or more models, or --serving")
    else:
        models(args)


if __name__ == "__main__":
    main()
