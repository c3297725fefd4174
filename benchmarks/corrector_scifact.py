"""Corrector-adjusted stale-cache hard-negative mining on SciFact: strategy x (nDCG@10, texts encoded, wall time).

Question: Which negatives strategy buys what on SciFact: quality, texts encoded, wall time, cache staleness?
Command: ``python benchmarks/corrector_scifact.py prepare|run|report --data ../shared/data/scifact --work
    runs/corrector-bench``
Results: benchmarks/results/corrector/
Page: docs/results/corrector.md

Three sub-commands, all sharing one work folder (outside the repository; SciFact is read where it lies):

    python benchmarks/corrector_scifact.py prepare --data ../shared/data/scifact --work runs/corrector-bench
    python benchmarks/corrector_scifact.py run --strategy corrected --data ... --work ...
    python benchmarks/corrector_scifact.py report --work ... [--plot docs/corrector_drift.png]

``prepare`` builds the asymmetric model (static query route + all-MiniLM-L6-v2 document route), embeds the corpus
once into a :class:`~st_daft.StaleEmbeddingCache` and aligns the query route against it (DAFT stage 1, document route
frozen, so the cache is exact), then saves the aligned model and the cache. Every ``run`` starts from that model and
that cache: same model pair, same seed, same step budget; only the negatives strategy differs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from st_daft.data import load_beir  # noqa: E402
from st_daft.negatives.corrector import staleness_error  # noqa: E402


def prepare(args: argparse.Namespace) -> None:
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    from st_daft.embeddings.cache import StaleEmbeddingCache
    from st_daft.losses.alignment import DAFTAlignmentLoss
    from st_daft.models.asymmetric import (
        DOCUMENT_ROUTE,
        QUERY_ROUTE,
        build_asymmetric_model,
        freeze_route,
        get_route,
        unfreeze_route,
    )

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train = load_beir(args.data, split="train")
    torch.manual_seed(args.seed)
    model = build_asymmetric_model(query_encoder="static", seed=args.seed)
    get_route(model, DOCUMENT_ROUTE)[0].max_seq_length = args.max_seq_length
    freeze_route(model, DOCUMENT_ROUTE)
    started = time.perf_counter()
    cache = StaleEmbeddingCache.build(model, train.corpus, batch_size=32)
    build_seconds = time.perf_counter() - started
    cache.save(work / "cache")
    loss = DAFTAlignmentLoss(model, document_cache=cache)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(work / "align-checkpoints"),
        max_steps=args.align_steps,
        per_device_train_batch_size=64,
        learning_rate=1e-3,
        warmup_steps=0.1,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        router_mapping={"query": QUERY_ROUTE, "positive": DOCUMENT_ROUTE},
        save_strategy="no",
        logging_steps=50,
        seed=args.seed,
        report_to="none",
    )
    started = time.perf_counter()
    SentenceTransformerTrainer(model=model, args=training_args, train_dataset=train.training_pairs(), loss=loss).train()
    align_seconds = time.perf_counter() - started
    unfreeze_route(model, DOCUMENT_ROUTE)
    model.save(str(work / "aligned"))
    info = {
        "corpus_size": len(cache),
        "cache_build_seconds": build_seconds,
        "align_steps": args.align_steps,
        "align_seconds": align_seconds,
        "fingerprint": cache.fingerprint,
    }
    if args.evaluate:
        from st_daft.evaluation.mteb import evaluate_retrieval

        started = time.perf_counter()
        scores = evaluate_retrieval(model, load_beir(args.data, split="test"), batch_size=32, show_progress_bar=False)
        info["aligned_test_ndcg_at_10"] = scores["ndcg_at_10"]
        info["evaluation_seconds"] = time.perf_counter() - started
    (work / "prepare.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


class ShadowCorrectorTrainers:
    """A corrector trainer for the loss that also trains a second, shadow corrector with the other drift loss on
    exactly the same observations (never used to mine), to measure MSE against cosine in one run. It composes two
    public :class:`~st_daft.negatives.corrector.CorrectorTrainer` objects; the miner and the loss only see the first."""

    def __init__(self, primary, drift: str) -> None:
        from st_daft.negatives.corrector import CorrectorNetwork, CorrectorTrainer

        self.primary, self.drift = primary, drift
        shadow_network = CorrectorNetwork(**primary.corrector.config())
        self.shadow = CorrectorTrainer(
            shadow_network, lr=primary.lr, steps=primary.steps, buffer=primary.buffer, drift_loss=drift
        )
        self.corrector = primary.corrector
        self.errors: list[float] = []
        self._cache = None

    def bind(self, cache) -> None:
        self._cache = cache

    def observe(self, rows: torch.Tensor, fresh: torch.Tensor) -> None:
        known = rows >= 0
        if bool(known.any()):
            with torch.no_grad():
                corrected = self.shadow.corrector(self._cache.float32(rows[known].cpu()))
            self.errors.append(staleness_error(corrected, fresh.detach()[known].float().cpu()).mean().item())
        self.primary.observe(rows, fresh)
        self.shadow.observe(rows, fresh)

    def step(self, cache):
        self.shadow.step(cache)
        return self.primary.step(cache)

    def discard(self) -> None:
        self.primary.discard()
        self.shadow.discard()

    def reset(self) -> None:
        self.primary.reset()
        self.shadow.reset()

    def config(self):
        return self.primary.config()


class TopKAgreementCallback:
    """Every ``every`` steps (and at the end): which hard negatives would be mined from the stale cache, from the
    corrected cache ``normalize(h(stale))`` and from a fresh embedding of the whole corpus by the current document
    route, for a fixed sample of training queries (their positives excluded); records the top-``k`` overlap of the
    stale and the corrected negatives with the fresh ones. The fresh embedding is a full re-embedding of the corpus,
    which is what the corrector saves: this callback costs one per checkpoint."""

    def __init__(
        self,
        miner,
        queries: list[str],
        positives: list[list[int]],
        every: int,
        k: int = 10,
        rows: list[int] | None = None,
    ) -> None:
        self.miner, self.queries, self.every, self.k = miner, queries, every, k
        # the cache rows searched (all by default; a sample keeps every positive so that each can be excluded)
        self.rows = sorted(
            set(range(len(miner.cache))) if rows is None else set(rows) | {r for p in positives for r in p}
        )
        position = {row: index for index, row in enumerate(self.rows)}
        self.positives = [[position[row] for row in rows_of_query] for rows_of_query in positives]
        self.checkpoints: list[dict[str, float]] = []

    def measure(self, model, step: int) -> None:
        import torch.nn.functional as F

        from st_daft.embeddings.encode import embed_documents

        started = time.perf_counter()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            queries = F.normalize(
                model.encode_query(self.queries, convert_to_tensor=True, batch_size=64).float(), dim=1
            )
            texts = [self.miner.texts[row] for row in self.rows]
            fresh = embed_documents(model, texts, batch_size=64, show_progress_bar=False).float()
            stale = self.miner.cache.float32(torch.tensor(self.rows))
            corrected = F.normalize(self.miner.corrector(stale), dim=1) if self.miner.corrector is not None else None
        model.train(was_training)
        mask = torch.zeros(len(self.queries), len(stale), dtype=torch.bool)
        for row, positive_rows in enumerate(self.positives):
            mask[row, positive_rows] = True

        def overlap(matrix: torch.Tensor) -> float:
            scores = (queries @ matrix.T).masked_fill(mask, -torch.inf)
            truth = (queries @ fresh.T).masked_fill(mask, -torch.inf)
            found, expected = scores.topk(self.k, dim=1).indices, truth.topk(self.k, dim=1).indices
            hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, expected))
            return hits / (self.k * len(self.queries))

        point = {"step": step, "stale_vs_fresh": overlap(stale)}
        if corrected is not None:
            point["corrected_vs_fresh"] = overlap(corrected)
            point["corrected_error"] = staleness_error(corrected, fresh).mean().item()
        point["stale_error"] = staleness_error(stale, fresh).mean().item()
        point["seconds"] = time.perf_counter() - started
        self.checkpoints.append(point)
        print(json.dumps(point), flush=True)

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % outer.every == 0 or state.global_step == state.max_steps:
                    outer.measure(model, state.global_step)

        return _Callback()


def run(args: argparse.Namespace) -> None:
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import BatchSamplers

    from st_daft.callbacks.negative_mining import negative_mining_callbacks
    from st_daft.callbacks.statistics import LogStatisticsCallback
    from st_daft.embeddings.cache import StaleEmbeddingCache
    from st_daft.embeddings.encode import embed_documents
    from st_daft.evaluation.mteb import evaluate_retrieval
    from st_daft.losses.collapse_safe import CollapseSafeContrastiveLoss
    from st_daft.losses.mined_negatives import MinedNegativesLoss
    from st_daft.models.asymmetric import DOCUMENT_ROUTE, QUERY_ROUTE, route_parameter_pattern
    from st_daft.models.fingerprint import route_fingerprint
    from st_daft.negatives.corrector import CorrectorTrainer
    from st_daft.negatives.miner import NegativeMiner
    from st_daft.negatives.strategy import RefreshPolicy, parse_negatives

    work = Path(args.work)
    strategy = parse_negatives(args.strategy)
    train = load_beir(args.data, split="train")
    torch.manual_seed(args.seed)
    model = SentenceTransformer(str(work / "aligned"))
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    cache = None
    if strategy.mine:
        cache = StaleEmbeddingCache.load(work / "cache", expected_fingerprint=route_fingerprint(model))
    miner = NegativeMiner(
        cache,
        train.corpus,
        strategy,
        num_negatives=args.num_negatives,
        query_positives={
            train.queries[qid]: [did for did, score in judged.items() if score > 0]
            for qid, judged in train.qrels.items()
        },
        encode_batch_size=32,
    )
    corrector_trainer = shadow = None
    if miner.corrector is not None:
        primary = CorrectorTrainer(
            miner.corrector,
            lr=args.corrector_lr,
            steps=args.corrector_steps,
            buffer=args.corrector_buffer,
            drift_loss=args.drift_loss,
        )
        corrector_trainer = shadow = ShadowCorrectorTrainers(primary, "cosine" if args.drift_loss == "mse" else "mse")
        shadow.bind(cache)
    refresh = RefreshPolicy(strategy.refresh_every) if strategy.refresh_every else None
    loss = MinedNegativesLoss(
        model, CollapseSafeContrastiveLoss(model, scale=20.0, guard="variance"), miner, corrector_trainer
    )
    callbacks = [*negative_mining_callbacks(miner, corrector_trainer, refresh), LogStatisticsCallback(loss)]
    agreement = None
    if args.agreement_every and cache is not None:
        generator = torch.Generator().manual_seed(args.seed)
        judged = [qid for qid in train.qrels if any(score > 0 for score in train.qrels[qid].values())]
        picked = [judged[i] for i in torch.randperm(len(judged), generator=generator)[: args.agreement_queries]]
        row_of = {doc_id: row for row, doc_id in enumerate(cache.ids)}
        agreement = TopKAgreementCallback(
            miner,
            [train.queries[qid] for qid in picked],
            [[row_of[d] for d, score in train.qrels[qid].items() if score > 0 and d in row_of] for qid in picked],
            args.agreement_every,
            k=args.agreement_k,
            rows=torch.randperm(len(cache), generator=generator)[: args.agreement_documents].tolist()
            if args.agreement_documents
            else None,
        )
        callbacks.append(agreement.callback())
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(work / f"run-{args.strategy.replace(':', '-').replace('+', '-')}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.document_lr,
        learning_rate_mapping={route_parameter_pattern(QUERY_ROUTE): args.query_lr},
        warmup_steps=0.1,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        router_mapping={"query": QUERY_ROUTE, "positive": DOCUMENT_ROUTE},
        save_strategy="no",
        logging_steps=4,
        seed=args.seed,
        report_to="none",
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=train.training_pairs(), loss=loss, callbacks=callbacks
    )
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started

    statistics = miner.statistics
    result = {
        "strategy": strategy.spec,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "num_negatives": args.num_negatives,
        "document_lr": args.document_lr,
        "query_lr": args.query_lr,
        "train_seconds": train_seconds,
        "counts": dict(statistics.counts),
        "documents_encoded_training": statistics.documents_encoded,
        "num_refreshes": statistics.num_refreshes,
        "seconds": dict(statistics.seconds),
        "mining_overhead": statistics.seconds["mining"] / max(1e-9, statistics.seconds["steps"]),
        "history": statistics.history,
        "config": {**miner.config(), **(corrector_trainer.config() if corrector_trainer is not None else {})},
    }
    if cache is not None and args.sample_documents > 0:
        # End of training, eval mode (no dropout): how stale is the cache, how good is h, on documents drawn from
        # the whole corpus (most of them never encoded during training).
        generator = torch.Generator().manual_seed(args.seed)
        rows = torch.randperm(len(cache), generator=generator)[: args.sample_documents]
        started = time.perf_counter()
        fresh = embed_documents(model, [miner.texts[row] for row in rows.tolist()], batch_size=32)
        result["sample_embed_seconds"] = time.perf_counter() - started
        stale = miner.cache.float32(rows)
        result["final_sample_stale_error"] = staleness_error(stale, fresh).mean().item()
        if miner.corrector is not None:
            with torch.no_grad():
                result["final_sample_corrected_error"] = staleness_error(miner.corrector(stale), fresh).mean().item()
                result[f"final_sample_corrected_error_{shadow.drift}"] = (
                    staleness_error(shadow.shadow.corrector(stale), fresh).mean().item()
                )
            result[f"shadow_{shadow.drift}_step_errors"] = shadow.errors
    if not args.skip_evaluation:
        started = time.perf_counter()
        scores = evaluate_retrieval(model, load_beir(args.data, split="test"), batch_size=32, show_progress_bar=False)
        result["evaluation_seconds"] = time.perf_counter() - started
        result["test_ndcg_at_10"] = scores["ndcg_at_10"]
        result["test_recall_at_100"] = scores.get("recall_at_100")
    if agreement is not None:
        result["topk_agreement"] = {
            "k": agreement.k,
            "queries": len(agreement.queries),
            "checkpoints": agreement.checkpoints,
        }
        (work / "topk_agreement.json").write_text(json.dumps(result["topk_agreement"], indent=2))
    result["log_history"] = trainer.state.log_history
    name = strategy.spec.replace(":", "-").replace("+", "-") + args.tag
    (work / f"result-{name}.json").write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k not in ("history", "log_history") and not k.startswith("shadow")}
    print(json.dumps(summary, indent=2))


def report(args: argparse.Namespace) -> None:
    """Print the markdown table of every result in the work folder; plot the drift of the corrected run."""
    work = Path(args.work)
    results = []
    for path in sorted(work.glob("result-*.json")):
        result = json.loads(path.read_text())
        config = result["config"]
        result["label"] = result["strategy"]
        if config.get("corrector"):
            result["label"] += (
                f" (corrector: {config['corrector_steps']} step(s)/step, buffer {config['corrector_buffer']}, "
                f"lr {config['corrector_lr']:g})"
            )
        results.append(result)
    order = {"in-batch": 0, "stale": 1, "corrected": 2}
    results.sort(key=lambda result: (order.get(result["strategy"], 3), result["strategy"]))
    prepare_info = json.loads((work / "prepare.json").read_text()) if (work / "prepare.json").is_file() else {}
    corpus = prepare_info.get("corpus_size", 0)
    lines = [
        "| strategy | nDCG@10 (test) | texts encoded: loss | mined negatives | corpus refreshes | total | "
        "train wall time | mining overhead | stale err. (end) | corrected err. (end) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if "aligned_test_ndcg_at_10" in prepare_info:
        lines.append(
            f"| (aligned start, no fine-tuning) | {prepare_info['aligned_test_ndcg_at_10']:.4f} | | | | | | | | |"
        )
    for result in results:
        counts = result["counts"]
        total = sum(counts.values())
        corrected = result.get("final_sample_corrected_error")
        stale = result.get("final_sample_stale_error")
        ndcg = result.get("test_ndcg_at_10")
        lines.append(
            f"| {result['label']} | {ndcg:.4f} | {counts['loss_documents']:,} | {counts['negatives']:,} | "
            f"{counts['refresh']:,} ({result['num_refreshes']}x) | {total:,} | {result['train_seconds']:.0f} s | "
            f"{100 * result['mining_overhead']:.1f}% | "
            + (f"{stale:.4f}" if stale is not None else "")
            + " | "
            + (f"{corrected:.4f}" if corrected is not None else "")
            + " |"
            if ndcg is not None
            else f"| {result['label']} | (not evaluated) | | | | | | | | |"
        )
    print("\n".join(lines))
    if corpus:
        print(f"\ncorpus: {corpus:,} documents; the initial cache (one corpus embedding, shared) is not in the counts")
    corrected_runs = [result for result in results if result["strategy"] == "corrected"]
    if args.plot and corrected_runs:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        history = corrected_runs[0]["history"]
        steps = [entry["step"] for entry in history]
        figure, axis = plt.subplots(figsize=(7, 4))
        axis.plot(steps, [entry.get("stale_error") for entry in history], label="stale cache: 1 - cos(stale, fresh)")
        axis.plot(
            steps,
            [entry.get("corrected_error") for entry in history],
            label="corrected (MSE): 1 - cos(h(stale), fresh)",
        )
        shadow = next((key for key in corrected_runs[0] if key.startswith("shadow_")), None)
        if shadow and len(corrected_runs[0][shadow]) >= 2 * len(steps):
            errors = corrected_runs[0][shadow]  # two observations (positives, negatives) per step
            per_step = [(errors[2 * i] + errors[2 * i + 1]) / 2 for i in range(len(steps))]
            axis.plot(steps, per_step, ":", label=f"corrected ({shadow.split('_')[1]} drift loss, not used to mine)")
        for key, style in (("final_sample_stale_error", "o"), ("final_sample_corrected_error", "s")):
            if key in corrected_runs[0]:
                axis.plot([steps[-1]], [corrected_runs[0][key]], style, label=key.replace("_", " ") + " (eval mode)")
        axis.set_xlabel("training step")
        axis.set_ylabel("mean 1 - cosine to the fresh embedding")
        axis.set_title("SciFact fine-tuning: staleness of the document cache, raw vs corrected")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("prepare", "run", "report"):
        command = commands.add_parser(name)
        command.add_argument("--work", required=True, help="work folder (outside the repository)")
        if name != "report":
            command.add_argument("--data", required=True, help="SciFact BEIR folder")
            command.add_argument("--seed", type=int, default=0)
        if name == "prepare":
            command.add_argument("--align-steps", type=int, default=300)
            command.add_argument("--evaluate", action="store_true", help="also score the aligned model on test")
            command.add_argument("--max-seq-length", type=int, default=128, help="document route token budget")
        if name == "report":
            command.add_argument("--plot", default=None, help="write the drift plot of the corrected run here")
        if name == "run":
            command.add_argument("--strategy", required=True, help="in-batch | stale | corrected | refresh:N | ...")
            command.add_argument("--steps", type=int, default=32)
            command.add_argument("--batch-size", type=int, default=16)
            command.add_argument("--num-negatives", type=int, default=2)
            command.add_argument("--document-lr", type=float, default=1e-4)
            command.add_argument("--query-lr", type=float, default=1e-3)
            command.add_argument("--corrector-lr", type=float, default=1e-3)
            command.add_argument("--corrector-steps", type=int, default=4)
            command.add_argument("--corrector-buffer", type=int, default=1024)
            command.add_argument("--drift-loss", default="mse", choices=["mse", "cosine"])
            command.add_argument("--sample-documents", type=int, default=256, help="eval-mode error sample at the end")
            command.add_argument("--skip-evaluation", action="store_true", help="smoke runs: no test evaluation")
            command.add_argument("--tag", default="", help="suffix of the result file")
            command.add_argument(
                "--agreement-every", type=int, default=0, help="measure top-k agreement every N steps (0: never)"
            )
            command.add_argument("--agreement-queries", type=int, default=200)
            command.add_argument("--agreement-k", type=int, default=10)
            command.add_argument(
                "--agreement-documents", type=int, default=0, help="search a random sample of the corpus (0: all)"
            )
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if args.command == "prepare":
        prepare(args)
    elif args.command == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
