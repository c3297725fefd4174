"""Is the frozen document index what keeps a corpus-only static route below BM25 on SciFact? Five checks.

A static route scores a document by ``q . D(d)`` with ``D`` all-MiniLM-L6-v2's fixed embedding, and ``q`` a linear
function of the query's tokens. Each check scores SciFact's test and training claims (nDCG@10, MTEB's metric code):

- ``projection``: the best *linear* image of BM25 in the index. Each query's BM25 score vector over the corpus
  (divided by its best, centred) is fitted by ridge regression onto the document embeddings, ``s ~ D w``; ``D w`` is
  what a query vector ``w`` can express of BM25 in this index at best (in least squares). Scored alone and added to a
  route's own scores at several weights.
- ``chunks``: documents longer than the document route's 256 tokens (71% of SciFact's) embedded in overlapping
  windows of 254 word pieces; the document is scored by the windows' normalised mean (one vector, as now), their
  best window (MaxP, Dai and Callan 2019) or both.
- ``free-documents``: every document's vector made a free parameter and trained against the fixed route on texts cut
  from the corpus (the corpus stage's pseudo-queries: InfoNCE to the source document and/or KL to the BM25-fused
  teacher, anchored to the start by an L2 term): how far adapting the document side alone on such texts gets.
- ``document-layers``: the same texts and losses, but the document *encoder* trained (its top ``--layers``
  transformer layers; the layers below are run once and their outputs kept), as GPL does with generated queries. The
  other documents' rows of each step's softmax come from a stale cache of their embeddings, refreshed as each batch
  is encoded; every document is re-embedded after each epoch.
- ``route-on-documents``: each document's vector becomes ``D(d) + a R(d)``, with ``R`` the route itself applied to
  the document's text (its normalised mean of table rows), for several ``a``, with and without renormalising: one
  dense index of the same size whose extra part matches a query's words against the document's own words through
  the route's table (a lexical signal that needs no BM25 index). The query side is unchanged.

Example::

    python benchmarks/frozen_index_limits.py R --data ../shared/data/scifact --document-store S --check projection

Results go to ``benchmarks/results/twelfth_session/frozen_index_<check>.json`` (``document-layers``:
``fourteenth_session``).
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores
from sentence_transformers import SentenceTransformer

from st_daft import DocumentEmbeddingStore, RetrievalData, load_beir
from st_daft.evaluation.baselines import BM25Search
from st_daft.label_free.corpus_texts import alignment_examples, lexical_ranking_columns
from st_daft.models.asymmetric import default_document_encoder

RESULTS = Path(__file__).parent / "results"
SESSION = {"document-layers": "fourteenth_session", "route-on-documents": "seventeenth_session"}


def top_100_run(scores: np.ndarray | torch.Tensor, data: RetrievalData, document_ids: list[str]) -> dict:
    """The run (query id -> {document id: score}, 100 best) of a (queries, documents) score matrix."""
    values, rows = torch.as_tensor(np.asarray(scores, dtype=np.float32)).topk(100, dim=1)
    return {
        query_id: {document_ids[r]: float(v) for r, v in zip(rs.tolist(), vs.tolist())}
        for query_id, rs, vs in zip(data.queries, rows, values)
    }


def ndcg_at_10(scores: np.ndarray | torch.Tensor, data: RetrievalData, document_ids: list[str]) -> float:
    run = top_100_run(scores, data, document_ids)
    return round(calculate_retrieval_scores(run, data.qrels, [10]).ndcg["NDCG@10"], 4)


def query_vectors(model: SentenceTransformer, data: RetrievalData) -> np.ndarray:
    return np.asarray(model.encode_query(list(data.queries.values()), normalize_embeddings=True), dtype=np.float32)


def per_query_ndcg(scores: np.ndarray, data: RetrievalData, document_ids: list[str]) -> np.ndarray:
    import pytrec_eval

    run = top_100_run(scores, data, document_ids)
    judged = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10"}).evaluate(run)
    return np.array([judged.get(query_id, {}).get("ndcg_cut_10", 0.0) for query_id in data.queries])


def corpus_vectors(encoder: SentenceTransformer, texts: list[str], store: DocumentEmbeddingStore | None) -> np.ndarray:
    """The documents' embeddings as float32, from ``store`` when given (computed once and kept there)."""
    if store is not None:
        return np.asarray(store.encode_document(encoder, texts, show_progress_bar=True), dtype=np.float32)
    return np.asarray(encoder.encode_document(texts, show_progress_bar=True), dtype=np.float32)


def bm25_scores(bm25: BM25Search, data: RetrievalData, documents: int, depth: int, dtype=np.float32) -> np.ndarray:
    """A (queries, documents) matrix of each query's BM25 scores over its best (``depth`` best; 0 elsewhere)."""
    rows, normalised = bm25.normalised_top_k(list(data.queries.values()), depth)
    scores = np.zeros((len(data.queries), documents), dtype=dtype)
    np.put_along_axis(scores, rows, normalised.astype(dtype), axis=1)
    return scores


def head_to_head(route: np.ndarray, lexical: np.ndarray, data: RetrievalData, ids: list[str]) -> dict:
    """Queries each ranker wins, the per-query oracle of the two, and the claims BM25 wins by most."""
    a, b = per_query_ndcg(route, data, ids), per_query_ndcg(lexical, data, ids)
    queries = list(data.queries.values())
    worst = np.argsort(a - b)[:8]
    return {
        "route wins": int((a > b + 1e-9).sum()),
        "bm25 wins": int((b > a + 1e-9).sum()),
        "oracle": round(float(np.maximum(a, b).mean()), 4),
        "bm25's largest wins": [queries[i] for i in worst],
    }


def projection(routes: dict, splits: dict, corpus: np.ndarray, texts: list[str], ids: list[str]) -> dict:
    bm25 = BM25Search().fit(texts)
    gram = corpus.T.astype(np.float64) @ corpus
    result: dict = {}
    for split, data in splits.items():
        lexical = bm25_scores(bm25, data, len(texts), len(texts), dtype=np.float64)
        result[split] = {"bm25": ndcg_at_10(lexical, data, ids)}
        for name, model in routes.items():
            result[split][f"{name} against bm25"] = head_to_head(
                query_vectors(model, data) @ corpus.T, lexical, data, ids
            )
        centred = lexical - lexical.mean(axis=1, keepdims=True)
        for ridge in (0.1, 1.0, 10.0):
            weights = np.linalg.solve(gram + ridge * np.eye(len(gram)), corpus.T @ centred.T)
            fitted = (corpus @ weights).T
            entry = {"projection alone": ndcg_at_10(fitted, data, ids)}
            for name, model in routes.items():
                dense = query_vectors(model, data) @ corpus.T
                for weight in (0.0, 0.25, 0.5, 1.0, 2.0):
                    entry[f"{name} + {weight:g} x projection"] = ndcg_at_10(dense + weight * fitted, data, ids)
            result[split][f"ridge {ridge:g}"] = entry
            print(split, ridge, entry, flush=True)
    return result


def route_on_documents(routes: dict, splits: dict, corpus: np.ndarray, texts: list[str], ids: list[str]) -> dict:
    result: dict = {}
    for name, model in routes.items():
        if name == "all-MiniLM-L6-v2":
            continue  # R would be D itself
        on_documents = model.encode_query(texts, batch_size=256, normalize_embeddings=True)
        for split, data in splits.items():
            queries = query_vectors(model, data)
            entry = {}
            for weight in (0.0, 0.1, 0.2, 0.3, 0.5, 1.0):
                documents = corpus + weight * on_documents
                entry[f"D + {weight:g} R"] = ndcg_at_10(queries @ documents.T, data, ids)
                documents /= np.linalg.norm(documents, axis=1, keepdims=True)
                entry[f"D + {weight:g} R, renormalised"] = ndcg_at_10(queries @ documents.T, data, ids)
            result.setdefault(split, {})[name] = entry
            print(split, name, entry, flush=True)
    return result


def chunks(routes: dict, splits: dict, corpus: np.ndarray, texts: list[str], ids: list[str], store, encoder) -> dict:
    tokenizer = encoder.tokenizer
    windows, owner = [], []
    for row, text in enumerate(texts):
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(pieces) <= 254:
            windows.append(text)
            owner.append(row)
            continue
        for start in range(0, len(pieces), 200):
            windows.append(tokenizer.decode(pieces[start : start + 254]))
            owner.append(row)
            if start + 254 >= len(pieces):
                break
    owner_rows = torch.tensor(owner)
    embedded = torch.from_numpy(np.asarray(store.encode_document(encoder, windows, show_progress_bar=True)))
    mean = F.normalize(torch.zeros(len(texts), embedded.shape[1]).index_add_(0, owner_rows, embedded), dim=1)
    result: dict = {"windows": len(windows), "documents over 254 pieces": int(np.sum(np.bincount(owner) > 1))}
    for split, data in splits.items():
        for name, model in routes.items():
            queries = torch.from_numpy(query_vectors(model, data))
            best = torch.full((len(queries), len(texts)), -2.0)
            best.scatter_reduce_(1, owner_rows.expand(len(queries), -1), queries @ embedded.T, reduce="amax")
            entry = {
                "first 256 tokens (now)": ndcg_at_10(queries @ torch.from_numpy(corpus).T, data, ids),
                "mean of windows": ndcg_at_10(queries @ mean.T, data, ids),
                "best window (MaxP)": ndcg_at_10(best, data, ids),
                "MaxP + mean": ndcg_at_10(best + queries @ mean.T, data, ids),
            }
            result[f"{split} {name}"] = entry
            print(split, name, entry, flush=True)
    return result


def fused_target(cut: torch.Tensor, start: torch.Tensor, lexical: torch.Tensor, lexical_weight: float) -> torch.Tensor:
    """The BM25-fused teacher's distribution over the corpus for a batch of cut texts: the route's scores against the
    starting document vectors plus ``lexical_weight`` x each text's BM25 top-k scores (``lexical_ranking_columns``)."""
    width = lexical.shape[1] // 2
    columns, scores = lexical[:, :width].long(), lexical[:, width:]
    with torch.no_grad():
        logits = cut @ start.T
        added = torch.zeros_like(logits).scatter_add_(1, columns.clamp(min=0), torch.where(columns >= 0, scores, 0.0))
        return torch.softmax(20.0 * (logits + lexical_weight * added), dim=1)


def free_documents(routes: dict, splits: dict, corpus: np.ndarray, data: RetrievalData, steps: int) -> dict:
    ids = list(data.corpus)
    texts = [data.corpus[d] for d in ids]
    row_of = {d: i for i, d in enumerate(ids)}
    examples = alignment_examples(data.corpus, data.titles, max_texts=80000, seed=0)
    sources = torch.tensor([row_of[d] for _, d in examples])
    lexical = lexical_ranking_columns(texts, [t for t, _ in examples], 32)
    start = torch.from_numpy(corpus)
    result: dict = {}
    for name, model in routes.items():
        cut = torch.from_numpy(np.asarray(model.encode_query([t for t, _ in examples], normalize_embeddings=True)))
        queries = {split: torch.from_numpy(query_vectors(model, part)) for split, part in splits.items()}
        for label, source_weight, lexical_weight in (("InfoNCE", 1.0, 0.0), ("KL to BM25-fused", 0.0, 1.0)):
            torch.manual_seed(0)
            documents = torch.nn.Parameter(start.clone())
            optimizer = torch.optim.Adam([documents], lr=1e-3 if source_weight else 3e-4)
            history = {0: {s: ndcg_at_10(q @ start.T, splits[s], ids) for s, q in queries.items()}}
            for step in range(1, steps + 1):
                batch = torch.randint(0, len(examples), (256,))
                logits = 20.0 * cut[batch] @ F.normalize(documents, dim=1).T
                loss = source_weight * F.cross_entropy(logits, sources[batch])
                if lexical_weight:
                    target = fused_target(cut[batch], start, lexical[batch], lexical_weight)
                    loss = loss + F.kl_div(torch.log_softmax(logits, 1), target, reduction="batchmean")
                loss = loss + ((documents - start) ** 2).sum(1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if step % 250 == 0:
                    trained = F.normalize(documents.detach(), dim=1)
                    history[step] = {s: ndcg_at_10(q @ trained.T, splits[s], ids) for s, q in queries.items()}
                    print(name, label, step, history[step], flush=True)
            result[f"{name}, {label}"] = history
    return result


def document_layers(
    routes: dict,
    splits: dict,
    corpus: np.ndarray,
    data: RetrievalData,
    encoder,
    layers: int,
    epochs: int,
    lr: float,
    source_weight: float = 1.0,
    lexical_weight: float = 1.0,
) -> dict:
    ids = list(data.corpus)
    texts = [data.corpus[d] for d in ids]
    row_of = {d: i for i, d in enumerate(ids)}
    examples = alignment_examples(data.corpus, data.titles, max_texts=80000, seed=0)
    lexical = lexical_ranking_columns(texts, [t for t, _ in examples], 32)
    examples_of: list[list[int]] = [[] for _ in ids]
    for index, (_, document_id) in enumerate(examples):
        examples_of[row_of[document_id]].append(index)
    with_examples = np.array([row for row, found in enumerate(examples_of) if found])
    bert = encoder[0].auto_model
    cut = len(bert.encoder.layer) - layers

    def run_layers(hidden: torch.Tensor, attention: torch.Tensor, chosen) -> torch.Tensor:
        mask = bert._create_attention_masks(attention, None, hidden, None, None)[0]
        for layer in chosen:
            hidden = layer(hidden, attention_mask=mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden

    # The frozen bottom layers run once; their outputs are kept unpadded in float16 (about 1 GB for SciFact).
    kept: list[torch.Tensor] = []
    bert.eval()
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            features = encoder.tokenize(texts[start : start + 64])
            attention = features["attention_mask"]
            hidden = bert.embeddings(input_ids=features["input_ids"], token_type_ids=features.get("token_type_ids"))
            hidden = run_layers(hidden, attention, bert.encoder.layer[:cut])
            kept += [h[: int(n)].half().clone() for h, n in zip(hidden, attention.sum(1))]

    def embed(rows) -> torch.Tensor:
        width = max(kept[r].shape[0] for r in rows)
        hidden = torch.zeros(len(rows), width, kept[0].shape[1])
        attention = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            hidden[i, : kept[r].shape[0]] = kept[r].float()
            attention[i, : kept[r].shape[0]] = 1
        hidden = run_layers(hidden, attention, bert.encoder.layer[cut:])
        pooled = (hidden * attention.unsqueeze(-1)).sum(1) / attention.sum(1, keepdim=True)
        return F.normalize(pooled, dim=1)

    def embed_all() -> torch.Tensor:
        bert.eval()
        order = np.argsort([k.shape[0] for k in kept])
        out = torch.zeros(len(kept), corpus.shape[1])
        with torch.no_grad():
            for start in range(0, len(order), 128):
                rows = order[start : start + 128]
                out[torch.from_numpy(rows)] = embed(rows)
        return out

    start_corpus = torch.from_numpy(corpus)
    initial = {key: value.clone() for key, value in bert.encoder.layer[cut:].state_dict().items()}
    steps = len(with_examples) // 64 * epochs

    def warmup_then_linear(step: int) -> float:
        return min(1.0, (step + 1) / (0.1 * steps)) * (steps - step) / steps

    result: dict = {"recomposed start, max abs difference": float((embed_all() - start_corpus).abs().max())}
    for name, model in routes.items():
        bert.encoder.layer[cut:].load_state_dict(initial)
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        cut_texts = torch.from_numpy(
            np.asarray(model.encode_query([t for t, _ in examples], normalize_embeddings=True))
        )
        queries = {split: torch.from_numpy(query_vectors(model, part)) for split, part in splits.items()}
        history = {0: {s: ndcg_at_10(q @ start_corpus.T, splits[s], ids) for s, q in queries.items()}}
        parameters = list(bert.encoder.layer[cut:].parameters())
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear)
        cache = start_corpus.clone()
        for epoch in range(1, epochs + 1):
            bert.train()
            order = rng.permutation(with_examples)
            for first in range(0, len(order) - 63, 64):
                rows = order[first : first + 64]
                chosen = np.array([rng.choice(examples_of[r]) for r in rows])
                fresh = embed(rows)
                documents = cache.clone()
                documents[torch.from_numpy(rows)] = fresh  # the batch's rows carry the gradient, the rest are stale
                logits = 20.0 * cut_texts[chosen] @ documents.T
                loss = source_weight * F.cross_entropy(logits, torch.from_numpy(rows))
                target = fused_target(cut_texts[chosen], start_corpus, lexical[chosen], lexical_weight)
                loss = loss + F.kl_div(torch.log_softmax(logits, 1), target, reduction="batchmean")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                cache[torch.from_numpy(rows)] = fresh.detach()
            trained = embed_all()
            history[epoch] = {s: ndcg_at_10(q @ trained.T, splits[s], ids) for s, q in queries.items()}
            moved = (trained - start_corpus).norm(dim=1).mean()
            history[epoch]["mean distance from the start"] = round(float(moved), 4)
            print(name, epoch, history[epoch], flush=True)
            cache = trained
        result[name] = history
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("routes", nargs="*", help="trained route folders (all-MiniLM-L6-v2 is always scored)")
    parser.add_argument("--data", required=True, help="a BEIR folder with test and train qrels")
    checks = ["projection", "chunks", "free-documents", "document-layers", "route-on-documents"]
    parser.add_argument("--check", choices=checks, required=True)
    parser.add_argument("--document-store", default=None)
    parser.add_argument("--steps", type=int, default=1000, help="free-documents: training steps")
    parser.add_argument("--layers", type=int, default=2, help="document-layers: top layers trained")
    parser.add_argument("--epochs", type=int, default=3, help="document-layers: epochs over the corpus")
    parser.add_argument("--lr", type=float, default=3e-5, help="document-layers: peak learning rate")
    parser.add_argument("--source-weight", type=float, default=1.0, help="document-layers: InfoNCE to the source")
    parser.add_argument("--lexical-weight", type=float, default=1.0, help="document-layers: BM25 in the teacher")
    parser.add_argument("--output", default=None, help="the results file (default: the check's name)")
    args = parser.parse_args()
    encoder = SentenceTransformer(default_document_encoder())
    splits = {split: load_beir(args.data, split=split, empty_texts="warn") for split in ("test", "train")}
    data = splits["test"]
    ids = list(data.corpus)
    texts = [data.corpus[d] for d in ids]
    store = DocumentEmbeddingStore(args.document_store) if args.document_store else None
    corpus = corpus_vectors(encoder, texts, store)
    routes = {"all-MiniLM-L6-v2": encoder} if args.check not in ("free-documents", "document-layers") else {}
    routes.update({Path(route).name: SentenceTransformer(route) for route in args.routes})
    if args.check == "projection":
        result = projection(routes, splits, corpus, texts, ids)
    elif args.check == "chunks":
        if store is None:
            parser.error("--check chunks needs --document-store (the windows' embeddings are kept there)")
        result = chunks(routes, splits, corpus, texts, ids, store, encoder)
    elif args.check == "route-on-documents":
        result = route_on_documents(routes, splits, corpus, texts, ids)
    elif args.check == "free-documents":
        result = free_documents(routes, splits, corpus, data, args.steps)
    else:
        weights = (args.source_weight, args.lexical_weight)
        result = document_layers(routes, splits, corpus, data, encoder, args.layers, args.epochs, args.lr, *weights)
        result["settings"] = {"layers": args.layers, "epochs": args.epochs, "lr": args.lr, "weights": weights}
    folder = RESULTS / SESSION.get(args.check, "twelfth_session")
    folder.mkdir(parents=True, exist_ok=True)
    record = {"date": str(date.today()), "data": args.data, "check": args.check, "routes": args.routes, **result}
    output = Path(args.output) if args.output else folder / f"frozen_index_{args.check}.json"
    output.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
