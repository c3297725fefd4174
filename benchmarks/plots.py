"""Re-create every plot in docs/ from the results JSON in benchmarks/results/.

Question: What do the results files look like as plots?
Command: ``python benchmarks/plots.py``
Results: reads benchmarks/results/{quality,serving,corrector}/, writes docs/*.png
Page: docs/results/ (every page with a plot)


Usage::

    python benchmarks/plots.py                                  # reads benchmarks/results, writes docs/*.png
    python benchmarks/plots.py --results R --output-dir D       # other folders (the tests use tmp paths)

Plots (one function each, callable on their own):

- ``collapse_over_steps.png`` (:func:`plot_collapse`): query-route mean pairwise cosine and the 1-NN KL estimate
  per evaluation, plain joint fine-tuning vs DAFT, for the tiny transformer and the static query route
  (``quality/daft_f-plain``, ``quality/daft_f-daft``, ``quality/daft_d``, ``quality/daft_e``: their ``collapse_trace``).
- ``corrector_drift.png`` (:func:`plot_corrector_drift`): staleness of the cached document embeddings vs the
  corrector's error over fine-tuning steps (``corrector/result-*.json``: ``history``).
- ``corrector_cost.png`` (:func:`plot_corrector_cost`): test nDCG@10 of each negatives strategy against the
  document texts it encoded during fine-tuning (``corrector/result-*.json``, ``corrector/prepare.json``).
- ``topk_agreement.png`` (:func:`plot_topk_agreement`): overlap of the top-k negatives mined from the stale and
  the corrected cache with those mined from fresh embeddings (``corrector/topk_agreement.json``; skipped with a
  notice while that file does not exist).
- ``query_encoder_frontier.png`` (:func:`plot_frontier`): queries/s at batch 1 against SciFact and python-faq
  nDCG@10 for every query encoder measured by ``benchmarks/query_speed.py`` (``serving/query_speed.json``,
  ``quality/daft_*.json``),
  BM25 as a reference line (``quality/bm25_reference.json``).

Nothing here holds a measured number: every figure comes from a results file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path("benchmarks/results")
DOCS = Path("docs")
# benchmarks/query_speed.py's key for a model's exported query route (st_daft.export_route), measured alone.
QUERY_ONLY_SUFFIX = " (query route only)"
DPI = 110

PLAIN_COLOR, DAFT_COLOR = "#d62728", "#1f77b4"
ENCODER_COLORS = {"static": "#1f77b4", "tiny": "#ff7f0e", "tokenlearn": "#9467bd", "MiniLM": "#2ca02c"}
ENCODER_MARKERS = {"static": "o", "tiny": "^", "tokenlearn": "D", "MiniLM": "s"}
# Short point labels for the configurations of benchmarks/daft_scifact.py; other names get one from their setup.
FRONTIER_LABELS = {
    "a": "MiniLM zero-shot",
    "b": "MiniLM fine-tuned",
    "c": "static untrained",
    "d": "static plain FT",
    "e": "static DAFT",
    "l4-static-vca": "static label-free+align",
    "f-plain": "tiny plain FT (collapsed)",
    "f-daft": "tiny DAFT",
    "l4-tiny-ca": "tiny corpus+align",
    "l4-tokenlearn-vca": "tokenlearn label-free+align",
}
STRATEGY_COLORS = {
    "in-batch": "#7f7f7f",
    "stale": "#d62728",
    "corrected": "#1f77b4",
    "refresh": "#2ca02c",
}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _save(figure: plt.Figure, output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=DPI)
    plt.close(figure)
    print(f"wrote {output}")
    return output


# -- (a) collapse statistics over steps ------------------------------------------------------------------------------


def _evaluations(result: dict) -> list[dict]:
    """The held-out evaluations of a run's collapse trace, with a step counted across stages."""
    offsets, offset, previous_stage = {}, 0, None
    for stage in result.get("stages", []):
        offsets[stage["stage"]] = offset
        offset += stage.get("global_step", 0)
    points = []
    for row in result.get("collapse_trace", []):
        if "eval_alignment_knn_kl" not in row:
            continue  # training-batch statistics: another population than the 500 held-out texts
        previous_stage = row["stage"]
        points.append({**row, "total_step": offsets.get(previous_stage, 0) + row["step"]})
    return points


def plot_collapse(results_dir: Path, output: Path, pairs: dict[str, tuple[str, str]] | None = None) -> Path | None:
    """Query mean cosine and 1-NN KL per evaluation, plain joint fine-tuning vs DAFT, one row per query encoder.

    ``pairs`` maps a row title to the (plain, DAFT) result names ``daft_<name>.json`` in ``results_dir``.
    """
    pairs = pairs or {"tiny:2,128 + MiniLM": ("f-plain", "f-daft"), "static + MiniLM": ("d", "e")}
    runs = {
        title: (
            _load(results_dir / "quality" / f"daft_{plain}.json"),
            _load(results_dir / "quality" / f"daft_{daft}.json"),
        )
        for title, (plain, daft) in pairs.items()
    }
    runs = {title: pair for title, pair in runs.items() if pair[0] or pair[1]}
    if not runs:
        print(f"skipped {output.name}: no daft_*.json collapse traces in {results_dir}")
        return None
    figure, axes = plt.subplots(len(runs), 2, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for row, (title, pair) in enumerate(runs.items()):
        cosine_axis, kl_axis = axes[row]
        align_end = 0
        for result, name, color in ((pair[0], "plain joint fine-tuning", PLAIN_COLOR), (pair[1], "DAFT", DAFT_COLOR)):
            if result is None:
                continue
            for stage in result.get("stages", []):
                if stage["stage"] != "finetune":
                    align_end = max(align_end, stage.get("global_step", 0))
            points = _evaluations(result)
            steps = [point["total_step"] for point in points]
            cosine_axis.plot(
                steps,
                [p["eval_alignment_query_mean_cosine"] for p in points],
                "-o",
                color=color,
                label=f"{name}: query",
            )
            cosine_axis.plot(
                steps,
                [p.get("eval_alignment_document_mean_cosine") for p in points],
                ":",
                marker=".",
                color=color,
                label=f"{name}: document",
            )
            kl_axis.plot(steps, [p["eval_alignment_knn_kl"] for p in points], "-o", color=color, label=name)
            for stage in result.get("stages", []):
                if stage.get("collapsed") and points:
                    kl_axis.annotate(
                        "collapse monitor\nstops training",
                        (points[-1]["total_step"], points[-1]["eval_alignment_knn_kl"]),
                        xytext=(12, -28),
                        textcoords="offset points",
                        fontsize=8,
                        color=color,
                        arrowprops={"arrowstyle": "->", "color": color},
                    )
        for axis in (cosine_axis, kl_axis):
            if align_end:
                axis.axvspan(0, align_end, color="#dddddd", alpha=0.5, lw=0)
                axis.text(
                    align_end / 2,
                    0.72,
                    "DAFT stage 1:\nalign (documents frozen)",
                    transform=axis.get_xaxis_transform(),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="#555555",
                )
                axis.text(
                    align_end + 2,
                    0.72,
                    "stage 2:\nfine-tune",
                    transform=axis.get_xaxis_transform(),
                    ha="left",
                    va="center",
                    fontsize=8,
                    color="#555555",
                )
            axis.set_xlabel("training step (DAFT: align steps, then fine-tuning steps)")
            axis.set_xlim(left=0)
            axis.grid(alpha=0.3)
        cosine_axis.axhline(0.95, color="black", lw=0.8, ls="--", label="collapse threshold (0.95)")
        cosine_axis.set_ylim(0, 1.05)
        cosine_axis.set_ylabel("mean pairwise cosine")
        cosine_axis.set_title(f"{title}: mean cosine of 500 held-out texts' embeddings", fontsize=10)
        cosine_axis.legend(fontsize=7, loc="center right")
        kl_axis.set_ylabel("1-NN KL(query route || document route)")
        kl_axis.set_title(f"{title}: 1-NN KL estimate, same 500 texts", fontsize=10)
        kl_axis.legend(fontsize=8, loc="center right")
        kl_axis.set_ylim(bottom=0)
    figure.suptitle("Plain joint fine-tuning vs DAFT on SciFact (validation statistics per evaluation)", fontsize=12)
    figure.tight_layout()
    return _save(figure, output)


# -- (b) staleness vs corrected error ---------------------------------------------------------------------------------


def _corrector_results(corrector_dir: Path) -> list[dict]:
    results = []
    for path in sorted(corrector_dir.glob("result-*.json")):
        result = json.loads(path.read_text())
        result["tag"] = path.stem.removeprefix("result-")
        results.append(result)
    return results


def _strategy_label(result: dict) -> str:
    config = result.get("config") or {}
    if result["strategy"] == "corrected" and "corrector_steps" in config:
        return (
            f"corrected ({config['corrector_steps']} corrector step(s)/step, buffer {config.get('corrector_buffer')}, "
            f"lr {config.get('corrector_lr')})"
        )
    return result["strategy"]


def _short_corrected_label(result: dict) -> str:
    config = result.get("config") or {}
    return (
        f"corrector {config.get('corrector_steps', '?')} update(s)/step, buffer {config.get('corrector_buffer', '?')}"
    )


def plot_corrector_drift(corrector_dir: Path, output: Path) -> Path | None:
    """Mean 1 - cos(cached, fresh) over fine-tuning steps: raw stale cache, corrected cache, refreshed cache."""
    results = _corrector_results(corrector_dir)
    with_history = [result for result in results if any("stale_error" in row for row in result.get("history", []))]
    if not with_history:
        print(f"skipped {output.name}: no corrector/result-*.json with a history in {corrector_dir}")
        return None
    figure, axis = plt.subplots(figsize=(9.5, 6.2))
    corrected_colors = iter(["#1f77b4", "#17becf", "#08306b"])
    for result in with_history:
        history = result["history"]
        steps = [row["step"] for row in history]
        strategy = result["strategy"]
        if strategy == "corrected":
            color = next(corrected_colors, "#1f77b4")
            label = _short_corrected_label(result)
            axis.plot(
                steps,
                [row.get("stale_error") for row in history],
                "--",
                color=color,
                lw=1,
                label=f"stale cache error (corrected run, {label})",
            )
            axis.plot(
                steps,
                [row.get("corrected_error") for row in history],
                "-",
                color=color,
                lw=2.2,
                label=f"corrected error h(e) ({label})",
            )
            shadow = next((key for key in result if key.startswith("shadow_") and key.endswith("_step_errors")), None)
            if shadow and len(result[shadow]) >= 2 * len(steps):
                errors = result[shadow]  # two observations (positives, then mined negatives) per step
                per_step = [(errors[2 * i] + errors[2 * i + 1]) / 2 for i in range(len(steps))]
                drift_loss = shadow.split("_")[1]
                axis.plot(
                    steps,
                    per_step,
                    ":",
                    color=color,
                    lw=1.5,
                    label=f"same data, {drift_loss} drift loss instead of MSE (shadow, not used to mine)",
                )
            for key, marker in (("final_sample_stale_error", "o"), ("final_sample_corrected_error", "s")):
                if key in result:
                    axis.plot(
                        [steps[-1] + 0.6],
                        [result[key]],
                        marker,
                        color=color,
                        ms=7,
                        mfc="white" if marker == "o" else color,
                    )
        elif strategy.startswith("refresh") or strategy == "stale":
            color = STRATEGY_COLORS["refresh" if strategy.startswith("refresh") else "stale"]
            axis.plot(
                steps,
                [row.get("stale_error") for row in history],
                "-",
                color=color,
                lw=1.2,
                label=f"cache error, {strategy} run (no corrector)",
            )
    axis.plot([], [], "o", color="black", mfc="white", label="at the end, eval mode, 256 random documents: stale")
    axis.plot([], [], "s", color="black", label="at the end, eval mode, 256 random documents: corrected")
    axis.set_xlabel("fine-tuning step")
    axis.set_ylabel("mean 1 - cos(cached row, fresh embedding)")
    axis.set_title(
        "SciFact fine-tuning: staleness of the document cache, raw vs corrected h(e) = e + MLP(e)", fontsize=10.5
    )
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    figure.tight_layout()
    return _save(figure, output)


# -- quality at a fraction of the document encodings ---------------------------------------------------------------


def plot_corrector_cost(corrector_dir: Path, output: Path) -> Path | None:
    """Test nDCG@10 per negatives strategy against the document texts encoded during fine-tuning."""
    results = [result for result in _corrector_results(corrector_dir) if result.get("test_ndcg_at_10") is not None]
    if not results:
        print(f"skipped {output.name}: no evaluated corrector/result-*.json in {corrector_dir}")
        return None
    prepare = _load(corrector_dir / "prepare.json") or {}
    figure, axis = plt.subplots(figsize=(8.5, 6.2))
    corrected_colors = iter(["#1f77b4", "#17becf", "#08306b"])  # the same order as in plot_corrector_drift
    for result in results:
        strategy = result["strategy"]
        if strategy == "corrected":
            color = next(corrected_colors, "#1f77b4")
        else:
            color = STRATEGY_COLORS["refresh" if strategy.startswith("refresh") else strategy]
        encoded = result["documents_encoded_training"]
        axis.errorbar(
            encoded,
            result["test_ndcg_at_10"],
            yerr=0.02,
            fmt="o",
            color=color,
            capsize=3,
            ms=7,
            label=f"{_strategy_label(result)}: {encoded:,} texts, nDCG@10 {result['test_ndcg_at_10']:.4f}",
        )
    if "aligned_test_ndcg_at_10" in prepare:
        axis.axhline(
            prepare["aligned_test_ndcg_at_10"],
            color="black",
            ls="--",
            lw=0.9,
            label=f"aligned start, no fine-tuning ({prepare['aligned_test_ndcg_at_10']:.3f})",
        )
    axis.set_xscale("log")
    axis.set_xlabel("document texts encoded during fine-tuning (log; the initial corpus cache is shared, not counted)")
    axis.set_ylabel("SciFact test nDCG@10")
    axis.set_title(
        "Negatives strategies: quality vs document encodings (32 steps, 1 seed;\n"
        "error bars: ±0.02, the rough sampling noise of 300 queries)",
        fontsize=10,
    )
    axis.grid(alpha=0.3, which="both")
    axis.set_xlim(200, 60000)
    axis.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    figure.tight_layout()
    return _save(figure, output)


# -- (c) top-k agreement of stale / corrected negatives with fresh ones ----------------------------------------------


def plot_topk_agreement(path: Path, output: Path) -> Path | None:
    """Mean top-k overlap of the negatives mined from the stale / corrected cache with those from fresh embeddings.

    Schema of ``path``: ``{"k": 10, "checkpoints": [{"step": int, "stale_vs_fresh": float,
    "corrected_vs_fresh": float}, ...]}`` (overlap fractions in [0, 1], mean over queries).
    """
    data = _load(path)
    if data is None:
        print(f"skipped {output.name}: {path} does not exist yet (measured by the top-k agreement benchmark)")
        return None
    checkpoints = sorted(data["checkpoints"], key=lambda point: point["step"])
    steps = [point["step"] for point in checkpoints]
    figure, axis = plt.subplots(figsize=(8, 4.5))
    axis.plot(
        steps,
        [p["stale_vs_fresh"] for p in checkpoints],
        "-o",
        color=STRATEGY_COLORS["stale"],
        label="stale cache vs fresh embeddings",
    )
    axis.plot(
        steps,
        [p["corrected_vs_fresh"] for p in checkpoints],
        "-s",
        color=STRATEGY_COLORS["corrected"],
        label="corrected cache h(e) vs fresh embeddings",
    )
    axis.axhline(
        1.0, color=STRATEGY_COLORS["refresh"], ls="--", lw=1, label="fresh (re-embedded corpus) = 1 by definition"
    )
    axis.set_ylim(0, 1.05)
    axis.set_xlabel("fine-tuning step")
    axis.set_ylabel(f"mean top-{data['k']} overlap with fresh negatives")
    axis.set_title(f"Which hard negatives get mined: top-{data['k']} agreement with a fresh corpus embedding")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    return _save(figure, output)


# -- (d) latency / quality frontier ---------------------------------------------------------------------------------


def _encoder_family(setup: dict) -> str:
    encoder = str(setup.get("query_encoder", ""))
    if encoder == "symmetric":
        return "MiniLM"
    if encoder.startswith("tiny"):
        return "tiny"
    return encoder if encoder in ENCODER_COLORS else "static"


def _frontier_points(results_dir: Path) -> list[dict]:
    speeds = (_load(results_dir / "serving" / "query_speed.json") or {}).get("models", {})
    points = []
    for name, speed in speeds.items():
        if name.endswith(QUERY_ONLY_SUFFIX):
            continue
        result = _load(results_dir / "quality" / f"daft_{name}.json")
        if result is None:
            continue
        served = speeds.get(name + QUERY_ONLY_SUFFIX)  # a Router model is served by its exported query route
        setup = result.get("setup", {})
        points.append(
            {
                "name": name,
                "label": FRONTIER_LABELS.get(name)
                or f"{setup.get('query_encoder', name)} {'+'.join(setup.get('stages', []))}",
                "family": _encoder_family(setup),
                "queries_per_second": (served or speed)["batch_1"],
                "scifact": (result.get("scifact") or {}).get("ndcg_at_10"),
                "python-faq": (result.get("python-faq") or {}).get("ndcg_at_10"),
            }
        )
    return points


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both speed and quality, fastest first."""
    front, best = [], -1.0
    for speed, quality in sorted(points, key=lambda point: (-point[0], -point[1])):
        if quality > best:
            front.append((speed, quality))
            best = quality
    return front


def _place_labels(axis: plt.Axes, points: list[tuple[float, float, str]]) -> None:
    """Label each point beside it, trying a few positions so that no label covers another label or a point."""
    figure = axis.figure
    renderer = figure.canvas.get_renderer()
    to_display = axis.transData.transform
    markers = [to_display((x, y)) for x, y, _ in points]
    taken = []  # display-space boxes of labels placed so far
    candidates = [
        (6, 4, "left"),
        (6, -12, "left"),
        (-8, 4, "right"),
        (-8, -12, "right"),
        (6, 16, "left"),
        (6, -24, "left"),
        (-8, 16, "right"),
        (-8, -24, "right"),
    ]
    for x, y, text in sorted(points, key=lambda point: -point[1]):
        annotation = None
        for dx, dy, align in candidates:
            if annotation is not None:
                annotation.remove()
            annotation = axis.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=9, ha=align)
            box = annotation.get_window_extent(renderer).expanded(1.04, 1.15)
            covers_label = any(box.overlaps(other) for other in taken)
            covers_point = any(box.contains(px, py) for px, py in markers)
            if not covers_label and not covers_point:
                break
        taken.append(annotation.get_window_extent(renderer))


def plot_frontier(results_dir: Path, output: Path) -> Path | None:
    """Queries/s at batch 1 (log) against SciFact and python-faq nDCG@10, one point per trained configuration."""
    points = _frontier_points(results_dir)
    if not points:
        print(f"skipped {output.name}: no query_speed.json with matching daft_*.json in {results_dir}")
        return None
    bm25 = _load(results_dir / "quality" / "bm25_reference.json") or {}
    datasets = [("scifact", "SciFact test (trained on SciFact train)"), ("python-faq", "python-faq (zero-shot)")]
    # one panel above the other, so that the figure reads at the width of a docs page
    figure, axes = plt.subplots(2, 1, figsize=(9, 11.5), sharex=True)
    for axis, (key, title) in zip(axes, datasets):
        scored = [point for point in points if point[key] is not None]
        axis.set_xscale("log")
        axis.set_xlim(50, 20000)
        axis.set_ylim(-0.03, 0.9)
        for family in ENCODER_COLORS:
            members = [point for point in scored if point["family"] == family]
            if not members:
                continue
            axis.scatter(
                [p["queries_per_second"] for p in members],
                [p[key] for p in members],
                s=55,
                color=ENCODER_COLORS[family],
                marker=ENCODER_MARKERS[family],
                label=f"{family} query route",
                zorder=3,
            )
        front = _pareto([(p["queries_per_second"], p[key]) for p in scored])
        if len(front) > 1:
            front = sorted(front)
            axis.step(
                [x for x, _ in front],
                [y for _, y in front],
                where="pre",
                color="#555555",
                lw=1,
                ls="-",
                alpha=0.6,
                label="frontier (no point faster and better)",
            )
        reference = (bm25.get(key) or {}).get("ndcg_at_10")
        if reference is not None:
            axis.axhline(reference, color="#8c564b", ls="--", lw=1.2, label="BM25 reference (speed not measured)")
            axis.text(55, reference + 0.01, f"BM25 {reference:.3f}", color="#8c564b", fontsize=8, va="bottom")
        axis.set_xlabel("queries/s at batch 1 (log; query route served alone, 2 CPU cores)", fontsize=11)
        axis.set_ylabel("nDCG@10", fontsize=11)
        axis.set_title(title, fontsize=12)
        axis.tick_params(labelsize=10)
        axis.grid(alpha=0.3, which="both")
    handles: dict = {}
    for axis in axes:  # one legend for both panels, below them
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.legend(
        handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 2), fontsize=10, frameon=False
    )
    figure.suptitle("Query encoders beside a MiniLM document route: speed vs quality", fontsize=13)
    figure.tight_layout(rect=(0, 0.09, 1, 1))
    for axis, (key, _) in zip(axes, datasets):  # after the layout, so that the overlap checks see final positions
        _place_labels(axis, [(p["queries_per_second"], p[key], p["label"]) for p in points if p[key] is not None])
    return _save(figure, output)


def make_all(results_dir: Path = RESULTS, output_dir: Path = DOCS) -> list[Path]:
    """Every plot this script knows, from ``results_dir`` into ``output_dir``; returns the files written."""
    corrector_dir = results_dir / "corrector"
    written = [
        plot_collapse(results_dir, output_dir / "collapse_over_steps.png"),
        plot_corrector_drift(corrector_dir, output_dir / "corrector_drift.png"),
        plot_corrector_cost(corrector_dir, output_dir / "corrector_cost.png"),
        plot_topk_agreement(corrector_dir / "topk_agreement.json", output_dir / "topk_agreement.png"),
        plot_frontier(results_dir, output_dir / "query_encoder_frontier.png"),
    ]
    return [path for path in written if path is not None]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--output-dir", type=Path, default=DOCS, help="where the PNGs go (default docs)")
    args = parser.parse_args(argv)
    make_all(args.results, args.output_dir)


if __name__ == "__main__":
    main()
