"""The corpus and align stages' softmax over a million-document corpus: the whole corpus against a sample of it.

Question: What do the corpus and align stages' corpus-wide softmaxes cost at a million documents, whole against sampled?
Command: ``python benchmarks/corpus_sample_scale.py --work runs/corpus-sample --output
    benchmarks/results/scale/corpus_sample_scale_1m.json``
Results: benchmarks/results/scale/corpus_sample_scale_1m.json
Page: docs/results/scale.md


A float16 cache of ``--rows`` clustered unit vectors (``cache_scale.write_stale_cache``) is written once as a memmap,
as ``--cache-on-disk --cache-dtype float16`` keeps it. Then, each in a fresh process so that its memory is its own:

- ``corpus``: :class:`~st_daft.losses.LabelFreeAlignmentLoss` with the pseudo-query and ranking terms (the corpus
  stage's defaults for a corpus alone) given the mapped cache, over the whole corpus (``corpus_sample_size=0``: the
  loss holds it as a float32 buffer) or sampled (``--sample`` rows a step, the texts' ``--neighbours`` best documents
  by the teacher among them);
- ``align``: :class:`~st_daft.losses.DAFTAlignmentLoss`'s cache negatives, every cached row or ``--sample`` of them.

The query route is a 384-d static table over 30,522 tokens (MiniLM's vocabulary), a batch ``--batch`` texts of 16
random tokens whose targets are perturbed cache rows. Each reports the loss's set-up seconds and the anonymous
memory it holds, seconds per step (forward and backward, after one warm step) and the peak anonymous memory during
the steps. ``corpus`` also times the teacher-neighbour search (``with_teacher_neighbours``, exact, chunked over the
memmap) for ``--neighbour-texts`` texts.

    python benchmarks/corpus_sample_scale.py --work runs/corpus-sample --output benchmarks/results/S.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (  # noqa: E402
    AnonymousPeak,
    add_cache_arguments,
    child_result,
    clustered_cache,
    resident_mib,
    settings_report,
    write_report,
)

VOCABULARY, TOKENS = 30522, 16


def child(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset

    from st_daft.embeddings.cache import StaleEmbeddingCache
    from st_daft.label_free.corpus_texts import with_teacher_neighbours
    from st_daft.losses.alignment import DAFTAlignmentLoss
    from st_daft.losses.label_free import LabelFreeAlignmentLoss

    class StaticRoute(torch.nn.Module):
        """A static query route: the mean of its tokens' rows."""

        def __init__(self, dimension: int) -> None:
            super().__init__()
            self.table = torch.nn.EmbeddingBag(VOCABULARY, dimension, mode="mean")

        def forward(self, features: dict) -> dict:
            return {"sentence_embedding": self.table(features["input_ids"])}

    torch.manual_seed(0)
    corpus = torch.from_numpy(np.load(args.work / "cache.npy", mmap_mode="c"))
    rows, dimension = corpus.shape
    route = StaticRoute(dimension)
    optimizer = torch.optim.Adam(route.parameters(), lr=1e-3)
    sample_size = 0 if args.child_mode == "whole" else args.sample
    batches = []
    for _ in range(args.steps + 1):
        sources = torch.randint(rows, (args.batch,))
        targets = torch.nn.functional.normalize(
            corpus[sources].float() + 0.05 * torch.randn(args.batch, dimension), dim=1
        )
        batches.append(({"input_ids": torch.randint(VOCABULARY, (args.batch, TOKENS))}, sources, targets))
    result = {"loss": args.child_loss, "mode": args.child_mode, "rows": rows, "sample": sample_size}
    before = resident_mib()["RssAnon"]
    started = time.perf_counter()
    if args.child_loss == "corpus":
        neighbours = args.neighbours if sample_size else 0
        loss = LabelFreeAlignmentLoss(
            route,
            document_embeddings=corpus,
            document_weight=1.0,
            ranking_weight=10.0,
            corpus_sample_size=sample_size,
            neighbour_columns=neighbours,
        )
    else:
        cache = StaleEmbeddingCache([str(row) for row in range(rows)], corpus, [bytes(16)] * rows, "synthetic")
        cache.is_current = lambda model: True  # the synthetic cache has no document route to check against
        loss = DAFTAlignmentLoss(route, document_cache=cache, negative_sample_size=sample_size)
    result["setup_seconds"] = round(time.perf_counter() - started, 2)
    result["setup_memory_mib"] = round(resident_mib()["RssAnon"] - before, 1)

    labels = []
    if args.child_loss == "corpus":
        for _, sources, targets in batches:
            label = torch.cat([targets, sources[:, None].float()], dim=1)
            if neighbours:
                dataset = Dataset.from_dict({"text": [""] * len(label), "label": label.tolist()})
                label = torch.tensor(with_teacher_neighbours(dataset, corpus, neighbours)["label"])
            labels.append(label)
        if neighbours:
            texts = Dataset.from_dict(
                {"text": [""] * args.neighbour_texts, "label": corpus[: args.neighbour_texts].float().tolist()}
            )
            started = time.perf_counter()
            with_teacher_neighbours(texts, corpus, neighbours)
            result["neighbour_search_seconds"] = round(time.perf_counter() - started, 2)
            result["neighbour_texts"] = args.neighbour_texts

    def step(index: int) -> None:
        features, sources, targets = batches[index]
        if args.child_loss == "corpus":
            value = sum(loss([features], labels[index]).values())
        elif sample_size:
            value = loss._sampled_loss([route(features)["sentence_embedding"], targets], sources)
        else:  # DAFTAlignmentLoss.forward's whole-cache path, the batch's documents being cache rows
            keep = torch.ones(rows, dtype=torch.bool)
            keep[sources] = False
            negatives = cache.embeddings[keep].to(torch.float32)
            value = loss.ranking_loss.compute_loss_from_embeddings(
                [route(features)["sentence_embedding"], targets, negatives], None
            )
        optimizer.zero_grad()
        value.backward()
        optimizer.step()

    step(0)  # warm
    with AnonymousPeak() as peak:
        started = time.perf_counter()
        for index in range(1, args.steps + 1):
            step(index)
        result["seconds_per_step"] = round((time.perf_counter() - started) / args.steps, 3)
    result["step_peak_memory_mib"] = round(peak.peak - before, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cache_arguments(parser)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sample", type=int, default=16384)
    parser.add_argument("--neighbours", type=int, default=16)
    parser.add_argument("--neighbour-texts", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--child-loss", help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_loss:
        print(json.dumps(child(args)))
        return
    clustered_cache(args)
    results = []
    for loss in ("corpus", "align"):
        for mode in ("whole", "sampled"):
            command = [sys.executable, __file__, *sys.argv[1:], "--child-loss", loss, "--child-mode", mode]
            results.append(child_result(command))
            print(results[-1], flush=True)
    report = settings_report("corpus_sample_scale", args, results)
    write_report(args.output, report)


if __name__ == "__main__":
    main()
