"""Render benchmarks/results/<topic>/*.json as the tables of the results pages (docs/results/) and of README.md.

Question: do the tables on the results pages and in the README say what the results files hold?
Command::

    python benchmarks/report.py            # rewrites every generated block (between marker comments)
    python benchmarks/report.py --check    # changes nothing; exits 1 naming each page that differs from its files

Results: benchmarks/results/<topic>/ (read only). Pages: README.md and docs/results/*.md;
tests/project/test_results_pages.py runs the check. Each block is a ``<!-- NAME:start -->`` /
``<!-- NAME:end -->`` pair; the text between them is generated, the prose around them is written by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# benchmarks/query_speed.py's key for a model's exported query route (st_daft.export_route), measured alone.
QUERY_ONLY_SUFFIX = " (query route only)"
COLLECTIONS = {"scifact": "SciFact", "python-faq": "python-faq"}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _load(relative: str) -> dict:
    return json.loads((RESULTS / relative).read_text(encoding="utf-8"))


def _files(pattern: str) -> list[Path]:
    """Files matching a glob under benchmarks/results, by seed (``-s0``, ``-s1`` ... ``-s10``) then by name."""

    def key(path: Path) -> tuple[int, str]:
        match = re.search(r"[-_]s(\d+)(?:[-_.]|$)", path.name)
        return (int(match.group(1)) if match else -1, path.name)

    return sorted(RESULTS.glob(pattern), key=key)


def _date(value: str) -> str:
    """An ISO timestamp of a results file as a reader reads it: 2026-11-23 07:02 UTC."""
    match = re.match(r"(\d{4}-\d{2}-\d{2})(?:T(\d{2}:\d{2}))?", value)
    if not match:
        return value
    return match.group(1) + (f" {match.group(2)} UTC" if match.group(2) else "")


def _source(*patterns: str) -> str:
    """The line under a table that names the files it was rendered from."""
    return "Rendered from " + ", ".join(f"`benchmarks/results/{pattern}`" for pattern in patterns) + "."


def _evaluation(path: Path, collection: str, model: str | None = None, score: str = "ndcg_at_10") -> float | None:
    """One score of an ``st-daft evaluate --output`` file: the first model's unless one is named."""
    data = json.loads(path.read_text(encoding="utf-8"))
    scores = data["scores"][model or data["models"][0]]
    return scores.get(collection, {}).get(score)


def _seed_scores(pattern: str, collection: str) -> list[float]:
    return [score for path in _files(pattern) if (score := _evaluation(path, collection)) is not None]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "|".join(["---"] + ["---:"] * (len(header) - 1))
    lines = ["| " + " | ".join(header) + " |", "|" + align + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- headline

# the default recipe (`st-daft train --data ../shared/data/scifact`), ten seeds
DEFAULT_SEEDS = "quality/default_seeds/lab-wise*-s[0-9]-eval.json"
# a corpus alone (`st-daft train --corpus CORPUS.jsonl`), per collection
CORPUS_ONLY_SEEDS = {
    "scifact": "corpus_only/sft-words-s*-eval.json",
    "python-faq": "corpus_only/pf-wordsctx-s*-eval.json",
}
FUSION_WEIGHT = "0.15"  # `st-daft evaluate --fuse-bm25`'s default --fusion-weight
FUSED = {"scifact": "fusion/fusion_weights_labelled.json", "python-faq": "fusion/fusion_weights_labelled.json"}
SERVING = {
    "scifact": "serving/query_speed_serving_7_idle.json",
    "python-faq": "serving/query_speed_serving_corpus_words.json",
}
SERVED_BY = "StaticQueryEncoder (float32)"


def _fused_mean(relative: str, collection: str, weight: str = FUSION_WEIGHT) -> float | None:
    per_model = _load(relative)["ndcg_at_10"]
    values = [scores[collection][weight] for name, scores in per_model.items() if "MiniLM" not in name]
    return _mean([value for value in values if value is not None])


def _minilm(collection: str) -> float:
    return _load("quality/daft_a.json")[collection]["ndcg_at_10"]


def _bm25(collection: str) -> float:
    return _load("quality/bm25_reference.json")[collection]["ndcg_at_10"]


def _speed_ratio(relative: str, encoder: str = SERVED_BY) -> float:
    return _load(relative)["encoders"][encoder]["batch_1"]["x_minilm"]


def headline_table() -> str:
    """README.md's table: each collection against each system, and the query route's batch-1 speed."""
    header = [
        "test nDCG@10",
        "default route",
        "corpus-only route",
        "default route + BM25",
        "BM25",
        "all-MiniLM-L6-v2",
        "queries/s at batch 1, x MiniLM",
    ]
    rows = []
    for collection, name in COLLECTIONS.items():
        default = _seed_scores(DEFAULT_SEEDS, collection)
        corpus_only = _seed_scores(CORPUS_ONLY_SEEDS[collection], collection)
        rows.append(
            [
                name,
                f"**{_fmt(_mean(default))}**",
                _fmt(_mean(corpus_only)),
                _fmt(_fused_mean(FUSED[collection], collection)),
                _fmt(_bm25(collection)),
                _fmt(_minilm(collection)),
                f"{_speed_ratio(SERVING[collection]):.0f}x",
            ]
        )
    seeds = len(_files(DEFAULT_SEEDS))
    corpus_seeds = " / ".join(str(len(_files(pattern))) for pattern in CORPUS_ONLY_SEEDS.values())
    note = (
        f"Means over seeds ({seeds} for the default route and its fusion, {corpus_seeds} for the corpus-only route); "
        f"fusion weight {FUSION_WEIGHT}; speed: the exported query route served by `StaticQueryEncoder`, one process, "
        "one query a call, against all-MiniLM-L6-v2's `encode` in the same run."
    )
    return _table(header, rows) + "\n\n" + note


# ------------------------------------------------------------------------------------------------------ quality

LABELS = {
    "a": "(a) all-MiniLM-L6-v2, symmetric, zero-shot",
    "b": "(b) all-MiniLM-L6-v2, symmetric, fine-tuned",
    "c": "(c) static + MiniLM, zero-shot",
    "d": "(d) static + MiniLM, plain joint fine-tuning",
    "e": "(e) static + MiniLM, DAFT",
    "l4-static-vca": "(e+) static + MiniLM, vocabulary + corpus + align",
    "f-plain": "(f) tiny:2,128 + MiniLM, plain joint fine-tuning",
    "f-daft": "(f) tiny:2,128 + MiniLM, DAFT",
}


def _speeds() -> dict:
    """benchmarks/query_speed.py's measurements per model name (empty before it has run)."""
    speed_file = RESULTS / "serving" / "query_speed.json"
    return json.loads(speed_file.read_text())["models"] if speed_file.is_file() else {}


def _result(name: str) -> dict | None:
    path = RESULTS / "quality" / f"daft_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def daft_table() -> str:
    speeds = _speeds()
    rows = [
        "| configuration | SciFact nDCG@10 | R@100 | MRR@10 | python-faq nDCG@10 | queries/s b=1 | queries/s b=32 "
        "| train s | collapsed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in LABELS.items():
        result = _result(name)
        if result is None:
            continue
        speed = speeds.get(name, {})
        collapsed = any(stage.get("collapsed") for stage in result.get("stages", []))
        rows.append(
            f"| {label} | {_fmt(result['scifact']['ndcg_at_10'])} | {_fmt(result['scifact']['recall_at_100'])} "
            f"| {_fmt(result['scifact']['mrr_at_10'])} | {_fmt(result['python-faq']['ndcg_at_10'])} "
            f"| {_fmt(speed.get('batch_1'), 0)} | {_fmt(speed.get('batch_32'), 0)} "
            f"| {_fmt(result['train_seconds'], 0)} | {'yes' if collapsed else 'no'} |"
        )
        served = speeds.get(name + QUERY_ONLY_SUFFIX)
        if served:  # the same query vectors, so the same scores: only the throughput is new
            rows.append(
                f"| ↳ {label.split(' ', 1)[0]} served by its query route alone (`st-daft export`) | same | same | same "
                f"| same | {_fmt(served.get('batch_1'), 0)} | {_fmt(served.get('batch_32'), 0)} | – | – |"
            )
    return "\n".join(rows) + "\n\n" + _source("quality/daft_*.json", "serving/query_speed.json")


def collapse_table() -> str:
    rows = [
        "| configuration | stage | step | query mean cos | query std | document std | 1-NN KL |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("d", "e", "f-plain", "f-daft"):
        result = _result(name)
        for row in (result or {}).get("collapse_trace", []):
            if "eval_alignment_knn_kl" not in row:
                continue
            rows.append(
                f"| {name} | {row['stage']} | {row['step']} | {_fmt(row.get('eval_alignment_query_mean_cosine'))} "
                f"| {_fmt(row.get('eval_alignment_query_std'), 4)} | {_fmt(row.get('eval_alignment_document_std'), 4)} "
                f"| {_fmt(row.get('eval_alignment_knn_kl'), 1)} |"
            )
    return "\n".join(rows) + "\n\n" + _source("quality/daft_{d,e,f-plain,f-daft}.json")


# which stage buys what, per query encoder (benchmarks/daft_scifact.py --config NAME)
LABEL_FREE_ROWS = {
    "static (MiniLM input embeddings)": [
        ("c", "untrained"),
        ("l4-static-v", "vocabulary"),
        ("l4-static-c", "corpus"),
        ("l4-static-vc", "vocabulary + corpus"),
        ("l4-static-a", "align (DAFT stage 1)"),
        ("l4-static-va", "vocabulary + align"),
        ("l4-static-vca", "vocabulary + corpus + align"),
        ("l4-static-vc-unscaled", "vocabulary (not rescaled) + corpus"),
        ("l4-static-va-unscaled", "vocabulary (not rescaled) + align"),
        ("l4-static-vca-unscaled", "vocabulary (not rescaled) + corpus + align"),
        ("l4-static-vca-long", "vocabulary + corpus (2,000 steps, 40k texts) + align"),
        ("e", "align + finetune (DAFT, (e))"),
        ("l4-static-vcaf", "vocabulary + corpus + align + finetune"),
    ],
    "tiny:2,128 (random 2-layer BERT)": [
        ("l4-tiny-a", "align (DAFT stage 1)"),
        ("l4-tiny-ca", "corpus + align"),
        ("f-plain", "finetune only (plain)"),
        ("f-daft", "align + finetune (DAFT)"),
    ],
    "tokenlearn (64-d static + Dense)": [
        ("l4-tokenlearn-v", "vocabulary (projection fit)"),
        ("l4-tokenlearn-a", "align (DAFT stage 1)"),
        ("l4-tokenlearn-vca", "vocabulary + corpus + align"),
    ],
    "all-MiniLM-L6-v2 (symmetric)": [("a", "zero-shot"), ("b", "fine-tuned")],
}


def _stage_kls(result: dict) -> str:
    parts = []
    for stage in result.get("stages", []):
        kl = (stage.get("final_metrics") or {}).get("alignment_knn_kl")
        if kl is not None:
            parts.append(f"{stage['stage']} {kl:.1f}")
    return ", ".join(parts) or "–"


def label_free_table() -> str:
    rows = [
        "| query encoder | stages | SciFact nDCG@10 | SciFact R@100 | python-faq nDCG@10 | python-faq R@100 "
        "| KL at the end of each stage | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for encoder, entries in LABEL_FREE_ROWS.items():
        for name, stages in entries:
            result = _result(name)
            if result is None:
                continue
            scifact, faq = result.get("scifact", {}), result.get("python-faq", {})
            rows.append(
                f"| {encoder} | {stages} | {_fmt(scifact.get('ndcg_at_10'))} | {_fmt(scifact.get('recall_at_100'))} "
                f"| {_fmt(faq.get('ndcg_at_10'))} | {_fmt(faq.get('recall_at_100'))} | {_stage_kls(result)} "
                f"| {_fmt(result.get('train_seconds'), 0)} |"
            )
    return "\n".join(rows) + "\n\n" + _source("quality/daft_*.json")


def default_seeds_table() -> str:
    files = _files(DEFAULT_SEEDS)
    rows = []
    for path in files:
        seed = re.search(r"-s(\d+)-", path.name).group(1)
        rows.append([seed] + [_fmt(_evaluation(path, collection)) for collection in COLLECTIONS])
    means = [_mean(_seed_scores(DEFAULT_SEEDS, collection)) for collection in COLLECTIONS]
    spreads = [statistics.stdev(_seed_scores(DEFAULT_SEEDS, collection)) for collection in COLLECTIONS]
    rows.append([f"**mean of {len(files)}**"] + [f"**{_fmt(mean)}**" for mean in means])
    rows.append(["standard deviation"] + [_fmt(spread) for spread in spreads])
    rows.append(["all-MiniLM-L6-v2"] + [_fmt(_minilm(collection)) for collection in COLLECTIONS])
    rows.append(["BM25"] + [_fmt(_bm25(collection)) for collection in COLLECTIONS])
    header = ["seed", "SciFact test nDCG@10", "python-faq nDCG@10 (never trained on)"]
    return _table(header, rows) + "\n\n" + _source(DEFAULT_SEEDS, "quality/daft_a.json", "quality/bm25_reference.json")


# -------------------------------------------------------------------------------------------------- corpus only

CORPUS_ONLY_ROWS = [
    ("python-faq", "the default", "corpus_only/pf-wordsctx-s*-eval.json"),
    ("SciFact", "the default", "corpus_only/sft-words-s*-eval.json"),
    ("SciFact", "`--corpus-pseudo-queries 60000 --corpus-steps 1800`", "corpus_only/sft-wordspq-s*-eval.json"),
]


def corpus_only_table() -> str:
    rows = []
    for name, recipe, pattern in CORPUS_ONLY_ROWS:
        collection = name.lower()
        scores = _seed_scores(pattern, collection)
        cells = [_fmt(score) for score in scores] + ["–"] * (5 - len(scores))
        rows.append(
            [name, recipe, *cells, f"**{_fmt(_mean(scores))}**", _fmt(_bm25(collection)), _fmt(_minilm(collection))]
        )
    header = ["collection", "recipe", "seed 0", "seed 1", "seed 2", "seed 3", "seed 4", "mean", "BM25", "MiniLM"]
    align = "---|---|" + "|".join(["---:"] * 8)
    return _table(header, rows, align) + "\n\n" + _source(*(pattern for _, _, pattern in CORPUS_ONLY_ROWS))


# ------------------------------------------------------------------------------------------------------- fusion

FUSION_ROWS = [
    ("default route, 10 seeds", "fusion/fusion_weights_labelled.json", ("scifact", "python-faq")),
    ("SciFact corpus-only route, 3 seeds", "fusion/fusion_weights_scifact_corpus_only_test.json", ("scifact",)),
    ("python-faq corpus-only route, 3 seeds", "fusion/fusion_weights_python_faq_corpus_only.json", ("python-faq",)),
]


def fusion_table() -> str:
    weights = ["0", "0.05", "0.1", "0.15", "0.2", "0.3"]
    rows = []
    for label, relative, collections in FUSION_ROWS:
        per_model = _load(relative)["ndcg_at_10"]
        # the default corpus-only routes only (the file also holds opt-in recipes' runs and a soup)
        models = {name: scores for name, scores in per_model.items() if "MiniLM" not in name and "lex" not in name}
        for collection in collections:
            cells = [_fmt(_mean([scores[collection][weight] for scores in models.values()])) for weight in weights]
            up = sum(scores[collection][FUSION_WEIGHT] > scores[collection]["0"] for scores in models.values())
            rows.append([label, COLLECTIONS[collection], *cells, f"{up} of {len(models)}"])
    header = ["route", "collection", *(f"w = {weight}" for weight in weights), f"seeds up at w = {FUSION_WEIGHT}"]
    align = "---|---|" + "|".join(["---:"] * (len(weights) + 1))
    bm25 = " · ".join(f"BM25 alone: {COLLECTIONS[c]} {_fmt(_bm25(c))}" for c in COLLECTIONS)
    return _table(header, rows, align) + "\n\n" + bm25 + "\n\n" + _source(*(r for _, r, _ in FUSION_ROWS))


# ---------------------------------------------------------------------------------------------------- corrector

CORRECTOR_RUNS = ["in-batch", "stale", "corrected", "corrected_light", "refresh-8"]


def corrector_table() -> str:
    prepare = _load("corrector/prepare.json")
    rows = [["(aligned start, no fine-tuning)", _fmt(prepare["aligned_test_ndcg_at_10"], 4)] + ["–"] * 6]
    for name in CORRECTOR_RUNS:
        result = _load(f"corrector/result-{name}.json")
        config = result.get("config", {})
        strategy = result["strategy"]
        if strategy == "corrected":
            strategy += f" ({config['corrector_steps']} update(s)/step, buffer {config['corrector_buffer']})"
        rows.append(
            [
                strategy,
                _fmt(result["test_ndcg_at_10"], 4),
                f"{result['documents_encoded_training']:,}",
                str(result["num_refreshes"]),
                f"{result['train_seconds']:.0f} s",
                f"{100 * result['mining_overhead']:.1f}%",
                _fmt(result.get("final_sample_stale_error"), 4),
                _fmt(result.get("final_sample_corrected_error"), 4),
            ]
        )
    header = [
        "negatives",
        "SciFact test nDCG@10",
        "texts encoded",
        "corpus re-embeddings",
        "train time",
        "mining overhead",
        "stale error (end)",
        "corrected error (end)",
    ]
    return _table(header, rows) + "\n\n" + _source("corrector/prepare.json", "corrector/result-*.json")


def agreement_table() -> str:
    data = _load("corrector/topk_agreement.json")
    rows = []
    for point in data["checkpoints"]:
        rows.append(
            [
                str(point["step"]),
                _fmt(point["stale_vs_fresh"]),
                _fmt(point["corrected_vs_fresh"]),
                _fmt(point.get("stale_error", 0.0)),
                _fmt(point.get("corrected_error", 0.0)),
            ]
        )
    k = data["k"]
    header = ["step", f"stale vs fresh (top-{k} overlap)", "corrected vs fresh", "stale error", "corrected error"]
    return _table(header, rows) + "\n\n" + _source("corrector/topk_agreement.json") + f" Date: {data['date']}."


def _objective_label(name: str, data: dict) -> str:
    base = name.removesuffix("+latest")
    if base == "stale":
        label = "stale cache"
    elif base.startswith("refresh:"):
        label = f"`{base}` (re-embedded every {base.split(':')[1]} steps)"
    else:
        options = data["objectives"][base]
        label = f"corrected, `{options['loss']}`"
        if options["loss"] == "ridge":
            label += f" over the last {options['buffer']:,} observations"
        label += " (default)" if base == data["default_objective"] else ""
    return label + (", write-back" if name != base else "")


def objectives_table() -> str:
    """The corrector protocol: final top-10 overlap with fresh mining, unseen-document error and time per objective."""
    data = _load("corrector/agreement.json")
    seeds = data["seeds"]
    fractions = data["overhead"]["fraction_of_step"]
    stale_error = data["final_unseen_error"]["stale"]
    rows = []
    for name, per_seed in data["per_seed_final"].items():
        error = data["final_unseen_error"][name]
        rows.append(
            [
                _objective_label(name, data),
                _fmt(_mean(data["per_seed_over_training"][name])),
                " / ".join(_fmt(value) for value in data["per_seed_over_training"][name]),
                _fmt(_mean(per_seed)),
                " / ".join(_fmt(value) for value in per_seed),
                _fmt(error),
                _fmt(error / stale_error, 2) + "x",
                f"{100 * fractions[name]:.1f}%" if name in fractions else "–",
            ]
        )
    header = [
        "cache scored",
        "top-10 overlap with fresh, mean over the steps measured",
        f"seeds {', '.join(map(str, seeds))}",
        f"at step {data['settings']['steps']}",
        "seeds",
        "error on unseen documents",
        "vs stale",
        "corrector time / step",
    ]
    curve_names = [
        "stale",
        *data["objectives"],
        *(name for name in data["per_seed_final"] if name.startswith("refresh:")),
    ]
    steps = [point["step"] for point in data["curves"][0]["curve"]]
    curve_rows = []
    for index, step in enumerate(steps):
        points = [run["curve"][index] for run in data["curves"]]
        curve_rows.append(
            [str(step), *(_fmt(_mean([point["top10_overlap"][name] for point in points])) for name in curve_names)]
        )
    curve = _table(["step", *(f"`{name}`" for name in curve_names)], curve_rows)
    when = f" {data['machine']}; {data['date']}."
    return _table(header, rows) + "\n\n" + curve + "\n\n" + _source("corrector/agreement.json") + when


#: what each ceiling of the corrector protocol fits, and on which targets
CEILINGS = {
    "linear-all": "linear map, every document's current embedding (in-sample)",
    "linear-observed": "linear map, the observed documents' current embeddings",
    "linear-observed-dropout": "linear map, the observed documents' current embeddings with dropout on",
    "mlp-observed": "2-layer MLP, the observed documents' current embeddings",
}


def ceilings_table() -> str:
    """The corrector protocol's ceilings: maps of the stale embedding fitted on the current route's embeddings."""
    data = _load("corrector/agreement.json")
    ceilings = data["ceilings"]
    stale_error = data["final_unseen_error"]["stale"]
    default = data["default_objective"]

    def row(label: str, per_seed: list[float], error: float) -> list[str]:
        overlap = " / ".join(_fmt(value) for value in per_seed)
        return [label, _fmt(_mean(per_seed)), overlap, _fmt(error), _fmt(error / stale_error, 2) + "x"]

    rows = [
        row("stale cache", data["per_seed_final"]["stale"], stale_error),
        row(
            f"{_objective_label(default, data)}: the steps' own encodings",
            data["per_seed_final"][default],
            data["final_unseen_error"][default],
        ),
        *(
            row(CEILINGS.get(name, name), per_seed, ceilings["final_unseen_error"][name])
            for name, per_seed in ceilings["per_seed_final"].items()
        ),
    ]
    steps = data["settings"]["steps"]
    header = [
        "map of the stale embedding, fitted on",
        f"top-10 overlap with fresh at step {steps}",
        f"seeds {', '.join(map(str, data['seeds']))}",
        "error on unseen documents",
        "vs stale",
    ]
    return _table(header, rows) + "\n\n" + _source("corrector/agreement.json") + f" {data['machine']}; {data['date']}."


def corrector_quality_table() -> str:
    """Retrieval quality of each negatives strategy over seeds, the texts it encoded, and the paired tests."""
    data = _load("corrector/quality.json")
    seeds = data["seeds"]
    rows = []
    for strategy, scores in data["ndcg_at_10"].items():
        rows.append(
            [
                f"`{strategy}`",
                _fmt(_mean(scores)),
                " / ".join(_fmt(score) for score in scores),
                f"{data['texts_encoded'][strategy]:,.0f}",
                _fmt(data["texts_encoded_vs_corrected"][strategy], 2) + "x",
            ]
        )
    seed_column = f"seeds {', '.join(map(str, seeds))}"
    header = ["negatives", "SciFact test nDCG@10", seed_column, "texts encoded", "vs corrected"]
    tests = [
        [name.replace(" vs ", " − "), f"{test['mean_difference']:+.3f}", f"{test['t']:.2f}", f"{test['p']:.3f}"]
        for name, test in data.get("paired_tests", {}).items()
    ]
    paired = _table(["paired over the seeds", "mean difference", "t", "p"], tests)
    when = f" {data['machine']}; {data['date']}."
    return _table(header, rows) + "\n\n" + paired + "\n\n" + _source("corrector/quality.json") + when


# ------------------------------------------------------------------------------------------------------ serving


def serving_table(relative: str) -> str:
    data = _load(relative)
    rows = []
    for encoder, timing in data["encoders"].items():
        one, many = timing["batch_1"], timing.get("batch_32", {})
        rows.append(
            [
                f"**{encoder}**" if encoder == SERVED_BY else encoder,
                _fmt(one["queries_per_s"], 0),
                _fmt(one["p50_ms"], 3),
                _fmt(one["p99_ms"], 3),
                _fmt(one.get("x_minilm"), 1),
                _fmt(one.get("x_floor"), 2),
                _fmt(many.get("queries_per_s"), 0),
            ]
        )
    header = ["encoder", "queries/s b=1", "p50 ms", "p99 ms", "x MiniLM", "x floor", "queries/s b=32"]
    machine = f"Machine: {data['machine']}; torch threads {data.get('torch_threads', '–')}; date {_date(data['date'])}."
    return _table(header, rows) + "\n\n" + machine + " " + _source(relative)


def serving_scifact_table() -> str:
    return serving_table(SERVING["scifact"])


def serving_faq_table() -> str:
    return serving_table(SERVING["python-faq"])


# ------------------------------------------------------------------------------------------------------- scale


def cache_scale_table() -> str:
    data = _load("scale/cache_scale_1m.json")
    rows = [
        [mode, _fmt(result["queries_per_second"], 0), _fmt(result["recall_at_k"]), f"{result['speedup_vs_exact']:.1f}x"]
        for mode, result in data["modes"].items()
    ]
    header = ["search over the corrected cache", "queries/s", f"recall@{data['config']['k']} vs exact", "vs exact"]
    rebuild = data["rebuild"]
    streamed = data["rebuild_streamed"]
    lines = (
        f"{data['config']['size']:,} x {data['config']['dimension']} float16 cache: stale error "
        f"{data['stale_error']:.4f}, linear corrector {data['corrector_linear']['corrected_error']:.1e}, 2-layer "
        f"corrector {data['corrector_mlp']['corrected_error']:.1e}. Corrector applied and IVF index rebuilt: "
        f"{rebuild['total_seconds']:.1f} s; streamed into the stale cells: "
        f"{streamed['apply_corrector_and_fill_ivf_seconds']:.1f} s; "
        f"peak resident memory {data['peak_rss_gib']:.1f} GiB."
    )
    hnsw = data.get("hnsw")
    if hnsw:
        lines += (
            f" The HNSW rows search {hnsw['rows']:,} rows and compare with the exact search over all of them; exact "
            f"search over the same {hnsw['rows']:,} rows serves {hnsw['exact_queries_per_second_on_same_rows']:,.0f} "
            f"queries/s (HNSW build {hnsw['build_seconds']:.0f} s)."
        )
    machine = f"Machine: {data['machine']}; date {_date(data['date'])}."
    return _table(header, rows) + "\n\n" + lines + "\n\n" + machine + " " + _source("scale/cache_scale_1m.json")


def store_table() -> str:
    rows = []
    names = ["store_scale_before", "store_scale_after", "store_scale_4m_before", "store_scale_4m_after"]
    for name in names:
        data = _load(f"scale/{name}.json")
        label = re.sub(r"^[0-9a-f]{7}: ", "", data["label"])
        for mode in ("sample", "corpus"):
            run = data[mode]
            rows.append(
                [
                    f"{data['rows']:,}",
                    label,
                    f"{run['rows_read']:,}",
                    f"{run['seconds']:.2f}",
                    f"{run['peak_anonymous_mib']:,.0f}",
                ]
            )
    header = ["rows in the store", "store", "rows read", "seconds", "peak anonymous memory MiB"]
    date = _load("scale/store_scale_after.json")["date"]
    return (
        _table(header, rows, "---:|---|---:|---:|---:")
        + f"\n\nDate {_date(date)}. "
        + _source("scale/store_scale_*.json")
    )


def refresh_table() -> str:
    data = _load("scale/refresh_memory.json")
    rows = []
    for run in data["results"]:
        where = "disk (`--cache-on-disk`)" if run["on_disk"] else "memory"
        code = "the current package" if run["code"] == "this tree" else "before streaming (a float32 copy)"
        rows.append(
            [
                where,
                code,
                f"{run['seconds']:.1f}",
                f"{run['peak_anon_mib_above_start']:,.0f}",
                f"{run['max_abs_error_vs_encode_document']:.1e}",
            ]
        )
    header = [
        "re-embedding written to",
        "code",
        "seconds",
        "peak memory above start MiB",
        "max diff to encode_document",
    ]
    machine = f"{data['rows']:,} x {data['dimension']} {data['dtype']}; machine {data['machine']}; "
    machine += f"date {_date(data['date'])}."
    return (
        _table(header, rows, "---|---|---:|---:|---:") + "\n\n" + machine + " " + _source("scale/refresh_memory.json")
    )


def index_storage_table() -> str:
    data = _load("scale/index_storage.json")
    rows = [
        [
            run["kind"],
            run["storage"],
            f"{run['rows']:,}",
            f"`{run['index_type']}`",
            f"{run['build_seconds']:.1f}",
            f"{run['memory_mib']:,.0f}",
            f"{run['search_ms']:.1f}",
            _fmt(run["overlap_at_20_with_exact"]),
        ]
        for run in data["results"]
    ]
    header = ["index", "storage", "rows", "faiss type", "build s", "memory MiB", "search ms", "top-20 overlap"]
    machine = f"Machine {data['machine']}; date {_date(data['date'])}."
    return (
        _table(header, rows, "---|---|---:|---|---:|---:|---:|---:")
        + "\n\n"
        + machine
        + " "
        + _source("scale/index_storage.json")
    )


def corpus_sample_table() -> str:
    data = _load("scale/corpus_sample_scale_1m.json")
    rows = [
        [
            run["loss"],
            "whole corpus" if run["mode"] == "whole" else f"{run['sample']:,}-row sample",
            f"{run['rows']:,}",
            f"{run['seconds_per_step']:.2f}",
            f"{run['step_peak_memory_mib']:,.0f}",
        ]
        for run in data["results"]
    ]
    header = ["stage loss", "scored each step", "corpus rows", "s per step", "step peak memory MiB"]
    machine = f"Machine {data['machine']}; date {_date(data['date'])}."
    return (
        _table(header, rows, "---|---|---:|---:|---:")
        + "\n\n"
        + machine
        + " "
        + _source("scale/corpus_sample_scale_1m.json")
    )


SAMPLE_QUALITY = [
    ("python-faq corpus only", "python-faq", "faq"),
    ("SciFact corpus only", "scifact", "sci"),
    ("SciFact labelled (the default)", "scifact", "lab"),
    ("SciFact labelled: python-faq", "python-faq", "lab"),
]


def corpus_sample_quality_table() -> str:
    rows = []
    for label, collection, prefix in SAMPLE_QUALITY:
        folder = "scale/corpus_sample_quality/"
        whole = _seed_scores(f"{folder}{prefix}_full_s0-eval.json", collection)
        sampled = _seed_scores(f"{folder}{prefix}_s2048_s*-eval.json", collection)
        tiny = _seed_scores(f"{folder}{prefix}_s512_k2_s0-eval.json", collection)
        rows.append(
            [
                label,
                _fmt(_mean(whole)),
                " / ".join(_fmt(score) for score in sampled),
                _fmt(sampled[0] - whole[0]) if whole and sampled else "–",
                _fmt(_mean(tiny)),
            ]
        )
    header = [
        "run",
        "whole corpus, seed 0",
        "2,048-row sample, seeds 0-2",
        "seed 0 difference",
        "512 rows, 2 neighbours",
    ]
    return _table(header, rows, "---|---:|---|---:|---:") + "\n\n" + _source("scale/corpus_sample_quality/*.json")


# ------------------------------------------------------------------------------------------------ crash safety


def ddp_table() -> str:
    data = _load("crash_safety/ddp_scifact.json")
    rows = [
        [
            name,
            str(run["per_process_batch"]),
            f"{run['train_wall_seconds']:.1f} s",
            _fmt(run["ndcg_at_10"], 4),
            f"{run['final_knn_kl']:.2f}",
        ]
        for name, run in data["runs"].items()
    ]
    header = ["run", "per-process batch", "training wall time", "SciFact test nDCG@10", "final 1-NN KL"]
    return (
        _table(header, rows)
        + f"\n\n{data['steps']} align steps, global batch {data['global_batch']}. "
        + _source("crash_safety/ddp_scifact.json")
    )


# ------------------------------------------------------------------------------------------------------- pages

# ------------------------------------------------------------------------------------------------------ search

SEARCH = "search/end_to_end.json"
#: the quality rows again, for the labelled default route (``st-daft train --data SCIFACT``)
SEARCH_DEFAULT_ROUTE = "search/end_to_end_default_route.json"
SEARCH_ROWS = {
    "static_exact": "static route, exact (flat)",
    "static_ann": "static route, ANN (IVF)",
    "minilm_exact": "all-MiniLM-L6-v2, same exact index",
    "bm25": "bm25s alone",
    "static_fused": "static route + BM25, fused",
    "minilm_fused": "all-MiniLM-L6-v2 + BM25, fused",
}


def search_equality_table() -> str:
    """The searcher's nDCG@10 against ``st-daft evaluate``'s, float16 and float32 index folders, for each route."""
    rows = []
    for route, path in (("labelled default", SEARCH_DEFAULT_ROUTE), ("vocabulary only", SEARCH)):
        data = _load(path)
        for collection, key in (("SciFact", "scifact"), ("python-faq", "python_faq")):
            scores = data[key]["ndcg_at_10"]
            for kind, evaluated, half, full in (
                ("dense", "evaluate_dense", "static_exact", "static_exact_float32"),
                ("fused with BM25 (0.15)", "evaluate_fused", "static_fused", "static_fused_float32"),
            ):
                rows.append(
                    [
                        route,
                        f"{collection}, {kind}",
                        _fmt(scores[evaluated], 5),
                        f"{_fmt(scores[half], 5)} ({scores[half] - scores[evaluated]:+.5f})",
                        f"{_fmt(scores[full], 5)} ({scores[full] - scores[evaluated]:+.5f})",
                    ]
                )
    header = ["route", "nDCG@10 (test)", "`st-daft evaluate`", "searcher, float16 index", "searcher, float32 index"]
    return _table(header, rows) + "\n\n" + _source(SEARCH_DEFAULT_ROUTE, SEARCH)


def search_speed_table() -> str:
    """A whole query on SciFact: batch-1 p50/p99, batch-32 queries/s, the time split, nDCG@10 on both collections."""
    data = _load(SEARCH)
    scifact, faq = data["scifact"], data["python_faq"]["ndcg_at_10"]
    rows = []
    for key, label in SEARCH_ROWS.items():
        row = scifact["rows"][key]
        split = ", ".join(
            f"{phase} {value:.2f}" for phase, value in row.get("batch_1_split_p50_ms", {}).items() if value
        )
        rows.append(
            [
                label,
                _fmt(row["batch_1"]["p50_ms"], 2),
                _fmt(row["batch_1"]["p99_ms"], 1),
                _fmt(row["batch_32_queries_per_s"], 0),
                split or "–",
                f"{_fmt(scifact['ndcg_at_10'][key], 4)} / {_fmt(faq[key], 4)}",
            ]
        )
    header = [
        "configuration",
        "b=1 p50 ms",
        "b=1 p99 ms",
        "b=32 queries/s",
        "b=1 split, p50 ms",
        "nDCG@10 SciFact / faq",
    ]
    ratios = (
        f"Static over MiniLM at batch 1 (p50): {scifact['static_vs_minilm_batch_1_p50']:.0f}x exact, "
        f"{scifact['static_ann_vs_minilm_batch_1_p50']:.0f}x ANN, {scifact['fused_vs_minilm_fused_batch_1_p50']:.1f}x "
        f"fused (against MiniLM fused); at batch 32 {scifact['static_vs_minilm_batch_32_qps']:.0f}x."
    )
    machine = f"Machine: {data['machine']}; torch threads {data['torch_threads']}; {scifact['num_queries']} queries."
    return _table(header, rows) + "\n\n" + ratios + " " + machine + " " + _source(SEARCH)


def search_fusion_table() -> str:
    """st-daft's fusion against mteb 2's RRF, DBSF and RSF over the same dense and BM25 runs (the default route)."""
    data = _load(SEARCH_DEFAULT_ROUTE)
    scifact, faq = data["scifact"]["ndcg_at_10"], data["python_faq"]["ndcg_at_10"]
    rows = [
        ["st-daft: `sim + 0.15 * BM25 / max BM25`", "–", f"{scifact['static_fused']:.4f} / {faq['static_fused']:.4f}"]
    ]
    for name, label in (("rrf", "RRF (k=60)"), ("dbsf", "DBSF"), ("rsf", "RSF (min-max)")):
        cells = [
            f"{scifact['mteb_fusions'][f'{name} ({weights})']:.4f} / {faq['mteb_fusions'][f'{name} ({weights})']:.4f}"
            for weights in ("equal", "1:0.15")
        ]
        rows.append([label, *cells])
    header = ["fusion (nDCG@10 SciFact / python-faq)", "equal weights (mteb's default)", "weights 1 : 0.15"]
    return _table(header, rows) + "\n\n" + _source(SEARCH_DEFAULT_ROUTE)


def search_scale_table() -> str:
    """The million-row index: load, memory, recall@10 and search time by nprobe."""
    data = _load(SEARCH)["synthetic"]
    load = data["load_fresh_process"]
    rows = [
        [
            nprobe,
            _fmt(result["recall_at_10"], 4),
            _fmt(result["search"]["p50_ms"], 2),
            _fmt(result["search"]["p99_ms"], 1),
        ]
        for nprobe, result in data["ivf_by_nprobe"].items()
    ]
    rows.append(
        [
            "exact (float16, in memory)",
            "1.0000",
            _fmt(data["exact_float16_search"]["p50_ms"], 2),
            _fmt(data["exact_float16_search"]["p99_ms"], 1),
        ]
    )
    header = ["IVF nprobe", "recall@10 vs exact", "search p50 ms", "search p99 ms"]
    summary = (
        f"{data['rows']:,} rows x {data['dimension']}; `Searcher.load` in a fresh process {load['load_s']:.1f} s, "
        f"{load['rss_anon_mib']:.0f} MiB anonymous memory (embeddings file {data['embeddings_file_mib']:,} MiB, faiss "
        f"file {data['faiss_file_mib']:,} MiB, both memory-mapped), heavy modules loaded: "
        f"{', '.join(load['heavy_modules']) or 'none'}; the route encodes a query in "
        f"{data['route_encode']['p50_ms']:.2f} ms (p50); {data['queries']} queries."
    )
    return _table(header, rows) + "\n\n" + summary + " " + _source(SEARCH)


def search_service_table() -> str:
    """examples/serve_search.py under uvicorn on the loopback address."""
    data = _load(SEARCH)["service"]
    rows = [
        [
            name.replace("clients_", "").replace("_fused", " (fused)"),
            _fmt(result["requests_per_s"], 0),
            _fmt(result["p50_ms"], 1),
            _fmt(result["p99_ms"], 1),
            str(result["requests"]),
        ]
        for name, result in data.items()
    ]
    header = ["clients", "requests/s", "p50 ms", "p99 ms", "requests"]
    return _table(header, rows) + "\n\n" + _source(SEARCH)


PAGES: dict[str, dict[str, Callable[[], str]]] = {
    "README.md": {"results-table": headline_table},
    "docs/index.md": {"results-table": headline_table},
    "docs/results/index.md": {"results-table": headline_table},
    "docs/results/quality.md": {
        "default-seeds": default_seeds_table,
        "daft-table": daft_table,
        "collapse-table": collapse_table,
        "labelfree-table": label_free_table,
    },
    "docs/results/corpus-only.md": {"corpus-only": corpus_only_table},
    "docs/results/fusion.md": {"fusion-weights": fusion_table},
    "docs/results/corrector.md": {
        "quality": corrector_quality_table,
        "corrector": corrector_table,
        "objectives": objectives_table,
        "ceilings": ceilings_table,
        "agreement": agreement_table,
    },
    "docs/results/serving.md": {"serving-scifact": serving_scifact_table, "serving-python-faq": serving_faq_table},
    "docs/results/scale.md": {
        "cache-scale": cache_scale_table,
        "corpus-sample": corpus_sample_table,
        "corpus-sample-quality": corpus_sample_quality_table,
        "store": store_table,
        "refresh": refresh_table,
        "index-storage": index_storage_table,
    },
    "docs/results/crash-safety.md": {"ddp": ddp_table},
    "docs/results/search.md": {
        "search-equality": search_equality_table,
        "search-speed": search_speed_table,
        "search-fusion": search_fusion_table,
        "search-scale": search_scale_table,
        "search-service": search_service_table,
    },
}


def replace_block(text: str, marker: str, content: str, page: str = "the page") -> str:
    pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page} has no <!-- {marker}:start --> ... <!-- {marker}:end --> block")
    return pattern.sub(lambda match: match.group(1) + content + "\n" + match.group(2), text)


def render(page: str) -> str:
    """The page as the results files say it should read."""
    path = ROOT / page
    text = path.read_text(encoding="utf-8")
    for marker, table in PAGES[page].items():
        text = replace_block(text, marker, table(), page)
    return text


def stale_pages() -> list[str]:
    """The pages whose generated blocks differ from what the results files give."""
    return [page for page in PAGES if render(page) != (ROOT / page).read_text(encoding="utf-8")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page differs")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for page in stale:
            print(f"{page} differs from benchmarks/results: run python benchmarks/report.py", file=sys.stderr)
        return 1 if stale else 0
    for page in PAGES:
        text = render(page)
        if text != (ROOT / page).read_text(encoding="utf-8"):
            (ROOT / page).write_text(text, encoding="utf-8")
            print(f"updated {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
