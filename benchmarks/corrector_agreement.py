"""The corrector protocol: do corrected negatives match the ones a fresh corpus embedding would give?

Question: After document-route fine-tuning on SciFact, how close are the hard negatives mined from the stale cache and
    from the corrected cache (one corrector per objective) to those mined from a fresh embedding of the corpus, and how
    far off are the corrected embeddings of documents never observed in training?
Command: ``python benchmarks/corrector_agreement.py --data ../shared/data/scifact --work runs/corrector-agreement``
Results: benchmarks/results/corrector/agreement.json
Page: docs/results/corrector.md

One command. It builds the asymmetric model (static query route + all-MiniLM-L6-v2 document route), embeds a corpus
sample (every positive of a training claim plus random documents, ``--documents`` in all) into the document cache,
aligns the query route against it (document route frozen: the cache stays exact), then for each seed fine-tunes both
routes with mined negatives (strategy ``corrected``, document learning rate ``--document-lr``, high enough for the
stale cache's top-10 overlap with fresh mining to fall to 0.70 or below). Every objective's corrector is trained side
by side on exactly the same observations (the positives and mined negatives each step encodes anyway); the miner
mines with the ``--mine-with`` corrector. Every ``--every`` steps it embeds the whole sample afresh and records, for a
fixed set of training claims (their positives excluded), the top-10 overlap of stale and of each corrected cache with
fresh mining, and the error ``1 - cos`` on the documents the corrector has never observed.

Beside them, the ceilings of a corrector of the stale embedding: maps fitted at the moment of measurement on targets
no online corrector has, the documents' embeddings by the current route. ``linear-all``: a ridge map fitted on every
document of the sample (in-sample: how far any linear map of the stale vectors can go); ``linear-observed``: fitted
on the documents observed so far, the current route's embeddings of them in eval mode; ``linear-observed-dropout``:
the same with the documents encoded in training mode, as a step encodes them (dropout on); ``mlp-observed``: a
2-layer residual MLP fitted on the documents observed so far. Set against ``ridge-b1024``, which fits the same kind of
map on the encodings the steps made, they separate what the corrector lacks (capacity) from what its targets lack
(they are the route of earlier steps, encoded with dropout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from st_daft.data import load_beir  # noqa: E402
from st_daft.negatives.corrector import (  # noqa: E402
    CorrectorNetwork,
    CorrectorTrainer,
    drift_loss,
    ridge_fit,
    staleness_error,
)
from st_daft.training.stages.finetune import FinetuneStage  # noqa: E402

#: The objectives measured side by side: (name, CorrectorTrainer options, network depth).
OBJECTIVES: dict[str, tuple[dict, int]] = {
    "mse": ({"loss": "mse", "buffer": 1024, "steps": 4}, 2),
    "kl": ({"loss": "kl", "buffer": 1024, "steps": 4, "warmup": 10}, 2),
    "mse+kl": ({"loss": "mse+kl", "buffer": 1024, "steps": 4, "warmup": 10}, 2),
    "ridge": ({"loss": "ridge", "buffer": 4096}, 1),
    # does a shorter memory track the drift better? (the buffer's oldest targets are the route of many steps ago)
    "ridge-b1024": ({"loss": "ridge", "buffer": 1024}, 1),  # FinetuneStage's
    "ridge-b512": ({"loss": "ridge", "buffer": 512}, 1),
    "ridge-b256": ({"loss": "ridge", "buffer": 256}, 1),
}
RESULT = Path(__file__).parent / "results" / "corrector" / "agreement.json"


def _settings(options: dict) -> dict:
    return {
        "loss": options["loss"],
        "steps": options.get("steps", 1),
        "buffer": options.get("buffer", 0),
        "warmup": options.get("warmup", 0),
    }


def _stage_default() -> str:
    """The objective here that ``--negatives corrected`` trains: the fine-tuning stage's loss and schedule."""
    stage = FinetuneStage()
    wanted = _settings(
        {
            "loss": stage.corrector_loss,
            "steps": stage.corrector_steps,
            "buffer": stage.corrector_buffer,
            "warmup": stage.corrector_warmup,
        }
    )
    for name, (options, _) in OBJECTIVES.items():
        if _settings(options) == wanted:
            return name
    raise SystemExit(f"corrector agreement: no objective here is the fine-tuning stage's corrector {wanted}")


DEFAULT = _stage_default()


class SideBySideTrainers:
    """One :class:`CorrectorTrainer` per objective, all fed the same observations; the miner reads ``corrector``
    (the ``mine_with`` objective's network). Times each objective's updates, and which cache rows were observed."""

    def __init__(self, dimension: int, mine_with: str, seed: int) -> None:
        self.trainers: dict[str, CorrectorTrainer] = {}
        for name, (options, depth) in OBJECTIVES.items():
            torch.manual_seed(seed)
            self.trainers[name] = CorrectorTrainer(CorrectorNetwork(dimension, depth=depth), **options)
        self.corrector = self.trainers[mine_with].corrector
        self.mine_with = mine_with
        self.seconds = dict.fromkeys(OBJECTIVES, 0.0)
        self.observed: set[int] = set()
        self.latest: dict[int, torch.Tensor] = {}  # each observed row's latest fresh embedding (write-back)

    def observe(self, rows: torch.Tensor, fresh: torch.Tensor) -> None:
        for index, row in enumerate(rows.tolist()):
            if row >= 0:
                self.observed.add(int(row))
                self.latest[int(row)] = F.normalize(fresh[index].detach().float(), dim=0)
        for trainer in self.trainers.values():
            trainer.observe(rows, fresh)

    def observe_queries(self, queries: torch.Tensor) -> None:
        for trainer in self.trainers.values():
            trainer.observe_queries(queries)

    def step(self, cache):
        value = None
        for name, trainer in self.trainers.items():
            started = time.perf_counter()
            loss = trainer.step(cache)
            self.seconds[name] += time.perf_counter() - started
            value = loss if name == self.mine_with else value
        return value

    def discard(self) -> None:
        for trainer in self.trainers.values():
            trainer.discard()

    def reset(self) -> None:
        for trainer in self.trainers.values():
            trainer.reset()

    def config(self):
        return self.trainers[self.mine_with].config()


def prepare(args: argparse.Namespace, train) -> tuple[Path, dict]:
    """Corpus sample, its cache and the aligned model, built once per work folder (shared by every seed)."""
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
    info_file = work / "prepare.json"
    if info_file.is_file():
        return work, json.loads(info_file.read_text())
    work.mkdir(parents=True, exist_ok=True)
    positives = sorted({d for judged in train.qrels.values() for d, score in judged.items() if score > 0})
    others = sorted(set(train.corpus) - set(positives))
    generator = torch.Generator().manual_seed(0)
    extra = max(0, args.documents - len(positives))
    picked = [others[i] for i in torch.randperm(len(others), generator=generator)[:extra].tolist()]
    ids = sorted(positives + picked)
    torch.manual_seed(0)
    model = build_asymmetric_model(query_encoder="static", seed=0)
    get_route(model, DOCUMENT_ROUTE)[0].max_seq_length = args.max_seq_length
    freeze_route(model, DOCUMENT_ROUTE)
    started = time.perf_counter()
    cache = StaleEmbeddingCache.build(model, {d: train.corpus[d] for d in ids}, batch_size=64, show_progress_bar=False)
    build_seconds = time.perf_counter() - started
    cache.save(work / "cache")
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(work / "align-checkpoints"),
        max_steps=args.align_steps,
        per_device_train_batch_size=64,
        learning_rate=1e-3,
        warmup_steps=0.1,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        router_mapping={"query": QUERY_ROUTE, "positive": DOCUMENT_ROUTE},
        save_strategy="no",
        seed=0,
        report_to="none",
    )
    loss = DAFTAlignmentLoss(model, document_cache=cache)
    SentenceTransformerTrainer(model=model, args=training_args, train_dataset=train.training_pairs(), loss=loss).train()
    unfreeze_route(model, DOCUMENT_ROUTE)
    model.save(str(work / "aligned"))
    info = {"documents": ids, "positives": len(positives), "cache_build_seconds": build_seconds}
    info_file.write_text(json.dumps(info))
    return work, info


def fresh_embeddings(model, miner) -> torch.Tensor:
    from st_daft.embeddings.encode import embed_documents

    was_training = model.training
    model.eval()
    with torch.no_grad():
        fresh = embed_documents(model, miner.texts, batch_size=64, show_progress_bar=False).float()
    model.train(was_training)
    return fresh


def training_mode_embeddings(model, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Document-route embeddings with dropout on, as a training step encodes its positives and negatives."""
    from sentence_transformers.util import batch_to_device

    from st_daft.models.asymmetric import DOCUMENT_ROUTE

    was_training = model.training
    model.train()
    parts = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            features = batch_to_device(
                model.preprocess(texts[start : start + batch_size], task=DOCUMENT_ROUTE), model.device
            )
            parts.append(F.normalize(model(features)["sentence_embedding"].float(), dim=1).cpu())
    model.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0, 0)


def fitted_mlp(stale: torch.Tensor, fresh: torch.Tensor, seed: int, steps: int = 2000) -> CorrectorNetwork:
    """A 2-layer residual corrector fitted by Adam on ``(stale, fresh)`` pairs (MSE), to convergence."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    network = CorrectorNetwork(stale.shape[1], depth=2)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    with torch.enable_grad():  # measured inside no_grad
        for _ in range(steps):
            batch = torch.randint(len(stale), (256,), generator=generator)
            loss = drift_loss(network(stale[batch]), fresh[batch], "mse")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return network.eval()


def ceilings(model, miner, stale: torch.Tensor, fresh: torch.Tensor, observed: torch.Tensor, seed: int) -> dict:
    """Maps of the stale embedding fitted on the current route's embeddings, which no online corrector has.

    Measuring leaves the random state as it was (dropout and the MLP's initialisation draw from it), so the training
    measured continues as it would have without the ceilings.
    """
    with torch.random.fork_rng():
        dropout = training_mode_embeddings(model, [miner.texts[row] for row in observed.tolist()])
        maps = {}
        for name, rows, targets in (
            ("linear-all", torch.arange(len(stale)), fresh),
            ("linear-observed", observed, fresh[observed]),
            ("linear-observed-dropout", observed, dropout),
        ):
            matrix, bias = ridge_fit(stale[rows], targets)
            maps[name] = F.normalize(stale @ matrix + bias, dim=1)
        mlp = fitted_mlp(stale[observed], fresh[observed], seed)
        with torch.no_grad():
            maps["mlp-observed"] = F.normalize(mlp(stale), dim=1)
    return maps


def measure(
    model, miner, trainers: SideBySideTrainers, queries, mask, k: int, step: int, refreshed, seed: int = 0
) -> dict:
    """Top-``k`` overlap with fresh mining of stale and of every corrected cache, and unseen-document errors."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        query_vectors = F.normalize(model.encode_query(queries, convert_to_tensor=True, batch_size=64).float(), dim=1)
        fresh = fresh_embeddings(model, miner)
        stale = miner.cache.float32(torch.arange(len(miner.texts)))
        approximations = {"stale": stale}
        for name, trainer in trainers.trainers.items():
            approximations[name] = F.normalize(trainer.corrector(stale), dim=1)
        # write-back: the rows a step encoded keep their latest fresh embedding, the others their approximation
        rows = torch.tensor(sorted(trainers.latest), dtype=torch.long)
        latest = torch.stack([trainers.latest[int(row)] for row in rows]) if len(rows) else None
        for name in list(approximations):
            written = approximations[name].clone()
            if latest is not None:
                written[rows] = latest
            approximations[f"{name}+latest"] = written
        if refreshed is not None:
            approximations[f"refresh:{refreshed[0]}"] = refreshed[1]
        observed = torch.tensor(sorted(trainers.observed), dtype=torch.long)
        bounds = ceilings(model, miner, stale, fresh, observed, seed)
    model.train(was_training)
    truth = (query_vectors @ fresh.T).masked_fill(mask, -torch.inf).topk(k, dim=1).indices
    unseen = torch.tensor(sorted(set(range(len(stale))) - trainers.observed))
    point: dict = {"step": step, "unseen_documents": len(unseen), "top10_overlap": {}, "unseen_error": {}}
    point |= {"ceiling_top10_overlap": {}, "ceiling_unseen_error": {}}
    for prefix, matrices in (("", approximations), ("ceiling_", bounds)):
        for name, matrix in matrices.items():
            found = (query_vectors @ matrix.T).masked_fill(mask, -torch.inf).topk(k, dim=1).indices
            hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth))
            point[f"{prefix}top10_overlap"][name] = hits / (k * len(queries))
            point[f"{prefix}unseen_error"][name] = staleness_error(matrix[unseen], fresh[unseen]).mean().item()
    print(json.dumps(point), flush=True)
    return point


def run_seed(args: argparse.Namespace, train, work: Path, info: dict, seed: int) -> dict:
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Arguments
    from sentence_transformers.base.sampler import BatchSamplers
    from transformers import TrainerCallback

    from st_daft.callbacks.negative_mining import negative_mining_callbacks
    from st_daft.embeddings.cache import StaleEmbeddingCache
    from st_daft.losses.collapse_safe import CollapseSafeContrastiveLoss
    from st_daft.losses.mined_negatives import MinedNegativesLoss
    from st_daft.models.asymmetric import DOCUMENT_ROUTE, QUERY_ROUTE, route_parameter_pattern
    from st_daft.models.fingerprint import route_fingerprint
    from st_daft.negatives.miner import NegativeMiner
    from st_daft.negatives.strategy import parse_negatives

    torch.manual_seed(seed)
    model = SentenceTransformer(str(work / "aligned"))
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    cache = StaleEmbeddingCache.load(work / "cache", expected_fingerprint=route_fingerprint(model))
    corpus = {d: train.corpus[d] for d in info["documents"]}
    query_positives = {
        train.queries[qid]: [d for d, score in judged.items() if score > 0] for qid, judged in train.qrels.items()
    }
    trainers = SideBySideTrainers(cache.dimension, args.mine_with, seed)
    miner = NegativeMiner(
        cache,
        corpus,
        parse_negatives("corrected"),
        num_negatives=args.num_negatives,
        query_positives=query_positives,
        corrector=trainers.corrector,
        encode_batch_size=32,
    )
    miner.query_observer = trainers.observe_queries
    generator = torch.Generator().manual_seed(seed)
    judged = list(train.qrels)
    picked = [judged[i] for i in torch.randperm(len(judged), generator=generator)[: args.queries].tolist()]
    row_of = {doc_id: row for row, doc_id in enumerate(cache.ids)}
    mask = torch.zeros(len(picked), len(cache), dtype=torch.bool)
    for index, qid in enumerate(picked):
        mask[index, [row_of[d] for d, score in train.qrels[qid].items() if score > 0 and d in row_of]] = True
    queries = [train.queries[qid] for qid in picked]
    curve: list[dict] = []
    refreshed = [args.refresh_every, miner.cache.float32(torch.arange(len(miner.texts)))]  # refresh:N's cache

    class Agreement(TrainerCallback):
        def on_step_end(self, arguments, state, control, model=None, **kwargs):
            if args.refresh_every and state.global_step % args.refresh_every == 0:
                refreshed[1] = fresh_embeddings(model, miner)  # what refresh:N re-embeds at this step
            if state.global_step % args.every == 0 or state.global_step == state.max_steps:
                point = measure(
                    model,
                    miner,
                    trainers,
                    queries,
                    mask,
                    10,
                    state.global_step,
                    refreshed if args.refresh_every else None,
                    seed,
                )
                curve.append(point)

    loss = MinedNegativesLoss(model, CollapseSafeContrastiveLoss(model, scale=20.0, guard="variance"), miner, trainers)
    training_args = Arguments(
        output_dir=str(work / f"run-{seed}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.document_lr,
        learning_rate_mapping={route_parameter_pattern(QUERY_ROUTE): args.query_lr},
        warmup_steps=0.1,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        router_mapping={"query": QUERY_ROUTE, "positive": DOCUMENT_ROUTE},
        save_strategy="no",
        logging_steps=25,
        seed=seed,
        report_to="none",
    )
    callbacks = [*negative_mining_callbacks(miner, trainers), Agreement()]
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=train.training_pairs(), loss=loss, callbacks=callbacks
    )
    trainer.train()  # every training positive is in the sample by construction
    step_seconds = miner.statistics.seconds["steps"]
    return {
        "seed": seed,
        "curve": curve,
        "step_seconds": step_seconds / args.steps,
        "corrector_seconds_per_step": {name: s / args.steps for name, s in trainers.seconds.items()},
        "documents_observed": len(trainers.observed),
    }


def summarise(args: argparse.Namespace, runs: list[dict], info: dict, started: str) -> dict:
    final = [run["curve"][-1] for run in runs]
    names = list(final[0]["top10_overlap"])  # stale, each objective, and each with write-back (+latest)
    bounds = list(final[0]["ceiling_top10_overlap"])
    bound_errors = {name: mean(point["ceiling_unseen_error"][name] for point in final) for name in bounds}
    overlap = {name: mean(point["top10_overlap"][name] for point in final) for name in names}
    errors = {name: mean(point["unseen_error"][name] for point in final) for name in names}
    # what the miner reads at every step, not only at the end: the overlap averaged over the measured steps
    over_training = {
        name: [mean(point["top10_overlap"][name] for point in run["curve"] if point["step"] > 0) for run in runs]
        for name in names
    }
    default = args.default
    step_seconds = mean(run["step_seconds"] for run in runs)
    # The side-by-side run trains every objective each step; the overhead of one is its own update time over the
    # step time without the others' updates.
    others = {name: mean(run["corrector_seconds_per_step"][name] for run in runs) for name in OBJECTIVES}
    alone = step_seconds - sum(others.values())
    return {
        "question": "top-10 overlap with fresh mining of the stale and corrected caches; error on unseen documents",
        "command": "python benchmarks/corrector_agreement.py --data ../shared/data/scifact --work W "
        + " ".join(f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items() if key in SETTINGS),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU",
        "date": f"{started} to {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "settings": {key: getattr(args, key) for key in SETTINGS},
        "objectives": {name: {**options, "depth": depth} for name, (options, depth) in OBJECTIVES.items()},
        "documents": len(info["documents"]),
        "seeds": [run["seed"] for run in runs],
        "default_objective": default,
        "final_top10_overlap": {"stale": overlap["stale"], "corrected": overlap[default], **overlap},
        "final_unseen_error": errors,
        "unseen_error_ratio": errors[default] / errors["stale"],
        "unseen_error_ratio_per_objective": {name: errors[name] / errors["stale"] for name in OBJECTIVES},
        "per_seed_final": {name: [point["top10_overlap"][name] for point in final] for name in names},
        "mean_top10_overlap_over_training": {name: mean(values) for name, values in over_training.items()},
        "per_seed_over_training": over_training,
        "overhead": {
            "step_seconds_without_corrector": alone,
            "corrector_seconds_per_step": others,
            "fraction_of_step": {name: seconds / alone for name, seconds in others.items()},
        },
        "ceilings": {
            "final_top10_overlap": {name: mean(p["ceiling_top10_overlap"][name] for p in final) for name in bounds},
            "per_seed_final": {name: [p["ceiling_top10_overlap"][name] for p in final] for name in bounds},
            "final_unseen_error": bound_errors,
            "unseen_error_ratio": {name: error / errors["stale"] for name, error in bound_errors.items()},
        },
        "curves": runs,
    }


SETTINGS = (
    "steps",
    "batch_size",
    "num_negatives",
    "document_lr",
    "query_lr",
    "documents",
    "queries",
    "every",
    "refresh_every",
    "max_seq_length",
    "align_steps",
    "mine_with",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="SciFact BEIR folder")
    parser.add_argument("--work", required=True, help="work folder (outside the repository)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-negatives", type=int, default=2)
    parser.add_argument("--document-lr", type=float, default=2e-4)
    parser.add_argument("--query-lr", type=float, default=1e-3)
    parser.add_argument("--documents", type=int, default=1500, help="corpus sample: every positive plus random")
    parser.add_argument("--queries", type=int, default=200, help="training claims the overlap is measured for")
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument(
        "--refresh-every", type=int, default=40, help="N of the refresh:N cache measured beside (0: none)"
    )
    parser.add_argument("--max-seq-length", type=int, default=64, help="document route token budget")
    parser.add_argument("--align-steps", type=int, default=100)
    parser.add_argument("--mine-with", default="mse", choices=list(OBJECTIVES), help="the corrector the miner reads")
    parser.add_argument(
        "--default", default=DEFAULT, choices=list(OBJECTIVES), help="reported as 'corrected' (FinetuneStage's)"
    )
    parser.add_argument("--output", default=str(RESULT))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    started = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}"
    train = load_beir(args.data, split="train")
    work, info = prepare(args, train)
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(args, train, work, info, seed))
        # written after every seed, so that an interrupted protocol keeps what it measured
        Path(args.output).write_text(json.dumps(summarise(args, runs, info, started), indent=2) + "\n")
    print(json.dumps({k: v for k, v in summarise(args, runs, info, started).items() if k != "curves"}, indent=2))


if __name__ == "__main__":
    main()
