"""Both losses: where gradients flow, what the cache changes, the collapse guard, config and citation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sentence_transformers.util import cos_sim

from st_daft import StaleEmbeddingCache, build_asymmetric_model, freeze_route, get_route
from st_daft.losses.alignment import DAFTAlignmentLoss
from st_daft.losses.collapse_safe import CollapseSafeContrastiveLoss, uniformity, variance_hinge

QUERIES = ["how do cells divide", "what pumps blood", "how does rain form", "where is calcium stored"]
DOCUMENTS = {
    "cell": "cells divide by mitosis and the nucleus holds the chromosomes",
    "heart": "the heart pumps blood through arteries and veins to the body",
    "rain": "rain forms when water vapour condenses into droplets in clouds",
    "bone": "bones store calcium and marrow makes new blood cells",
    "star": "stars fuse hydrogen into helium in their hot dense cores",
    "brain": "neurons in the brain signal with spikes across synapses",
}


def _features(model, texts: list[str], task: str) -> dict:
    features = model.preprocess(texts, task=task)
    features["task"] = task
    return features


def _batch(model) -> list[dict]:
    positives = [DOCUMENTS[key] for key in ("cell", "heart", "rain", "bone")]
    return [_features(model, QUERIES, "query"), _features(model, positives, "document")]


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.grad is not None and p.grad.abs().sum() > 0]


@pytest.fixture()
def static_model(tiny_document_model_dir: Path):
    torch.manual_seed(0)
    return build_asymmetric_model(str(tiny_document_model_dir), "static")


@pytest.mark.parametrize("spec", ["static", "tiny:1,16"])
def test_alignment_loss_moves_only_the_query_route(tiny_document_model_dir: Path, spec: str) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), spec)
    model.train()
    loss = DAFTAlignmentLoss(model)
    value = loss(_batch(model), None)
    value.backward()
    assert torch.isfinite(value) and value > 0
    assert _grads(get_route(model, "query")), "the query route must receive gradients"
    assert not _grads(get_route(model, "document")), "the document route must stay frozen"


def test_alignment_loss_with_cache_uses_every_corpus_document(static_model) -> None:
    freeze_route(static_model, "document")
    cache = StaleEmbeddingCache.build(static_model, DOCUMENTS, show_progress_bar=False)
    static_model.train()
    batch = _batch(static_model)
    positive_rows = cache.rows_for_features(batch[1])
    assert positive_rows.tolist() == [0, 1, 2, 3]

    cached = DAFTAlignmentLoss(static_model, document_cache=cache, cache_negatives=True)(batch, None)
    in_batch = DAFTAlignmentLoss(static_model, document_cache=cache, cache_negatives=False)(batch, None)

    # Reference: full softmax over the whole corpus, each query's positive being its own row.
    static_model.eval()
    with torch.no_grad():
        queries = static_model(_features(static_model, QUERIES, "query"))["sentence_embedding"]
    scores = 20.0 * cos_sim(queries, cache.embeddings)
    expected = torch.nn.functional.cross_entropy(scores, positive_rows)
    assert cached.item() == pytest.approx(expected.item(), rel=1e-4)
    assert cached.item() > in_batch.item()  # two more negatives (star, brain) can only raise the loss


def test_alignment_loss_samples_the_negatives_of_a_large_cache(static_model) -> None:
    """Above a size the cache's negatives are a uniform sample with the sampled softmax's weights: on average the
    whole cache's loss, each step reading only the sample."""
    freeze_route(static_model, "document")
    words = ["cells", "blood", "rain", "calcium", "stars", "neurons", "rivers", "stone", "light", "salt"]
    filler = {f"f{i}": f"{words[i % 10]} and {words[i // 10 % 10]} in note {i}" for i in range(1500)}
    cache = StaleEmbeddingCache.build(static_model, DOCUMENTS | filler, show_progress_bar=False)
    batch = _batch(static_model)
    whole = DAFTAlignmentLoss(static_model, document_cache=cache, negative_sample_size=0)
    sampled = DAFTAlignmentLoss(static_model, document_cache=cache, negative_sample_size=300)
    assert whole.negative_sample_size is None and sampled.get_config_dict()["negative_sample_size"] == 300
    static_model.eval()
    with torch.no_grad():
        expected = whole(batch, None).item()
        draws = [sampled(batch, None).item() for _ in range(100)]
    assert sum(draws) / len(draws) == pytest.approx(expected, rel=0.03)
    assert DAFTAlignmentLoss(static_model, document_cache=cache, negative_sample_size=2000).negative_sample_size is None
    static_model.train()
    value = sampled(batch, None)
    value.backward()
    assert _grads(get_route(static_model, "query")) and not _grads(get_route(static_model, "document"))


def test_alignment_loss_refuses_a_stale_cache(static_model) -> None:
    cache = StaleEmbeddingCache.build(static_model, DOCUMENTS, show_progress_bar=False)
    with torch.no_grad():
        get_route(static_model, "document")[0].auto_model.get_input_embeddings().weight.add_(0.1)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        DAFTAlignmentLoss(static_model, document_cache=cache)


def test_alignment_loss_document_side_ignores_dropout(tiny_document_model_dir: Path) -> None:
    model = build_asymmetric_model(str(tiny_document_model_dir), "static")
    model.train()
    loss = DAFTAlignmentLoss(model)
    batch = _batch(model)
    first, _ = loss.embed_documents(batch[1])
    second, _ = loss.embed_documents(batch[1])
    assert torch.equal(first, second)
    assert get_route(model, "document").training, "the route's training flag is restored"


def test_collapse_safe_loss_trains_both_routes_and_reports(static_model) -> None:
    static_model.train()
    loss = CollapseSafeContrastiveLoss(static_model, guard="variance")
    parts = loss(_batch(static_model), None)
    assert set(parts) == {"contrastive", "collapse_guard"}
    sum(parts.values()).backward()
    assert _grads(get_route(static_model, "query")) and _grads(get_route(static_model, "document"))
    statistics = loss.pop_logging_statistics()
    assert set(statistics) == {
        "batch_query_mean_cosine",
        "batch_query_std",
        "batch_document_mean_cosine",
        "batch_document_std",
    }
    assert all(-1.0 <= value <= 1.0 for value in statistics.values())
    assert loss.pop_logging_statistics() == {}, "statistics are averaged since the last call, then reset"


def test_guards_penalise_collapse_and_spare_healthy_embeddings() -> None:
    torch.manual_seed(0)
    healthy = torch.nn.functional.normalize(torch.randn(64, 32), dim=1)
    collapsed = torch.nn.functional.normalize(torch.randn(1, 32) + 0.001 * torch.randn(64, 32), dim=1)
    floor = 0.5 / 32**0.5
    assert variance_hinge(healthy, floor).item() == 0.0
    assert variance_hinge(collapsed, floor).item() > 0.05
    assert uniformity(collapsed).item() > -0.01  # log E exp(-2 * ~0) ~ 0
    assert uniformity(healthy).item() < -3.0


def test_guard_gradient_pushes_a_collapsed_batch_apart() -> None:
    torch.manual_seed(0)
    raw = (torch.randn(1, 16) + 0.01 * torch.randn(32, 16)).requires_grad_()
    optimizer = torch.optim.Adam([raw], lr=0.05)
    before = variance_hinge(torch.nn.functional.normalize(raw, dim=1), 0.1).item()
    for _ in range(50):
        optimizer.zero_grad()
        variance_hinge(torch.nn.functional.normalize(raw, dim=1), 0.1).backward()
        optimizer.step()
    after = variance_hinge(torch.nn.functional.normalize(raw, dim=1), 0.1).item()
    assert after < before / 2


def test_unknown_guard_is_refused(static_model) -> None:
    with pytest.raises(ValueError, match="guard must be"):
        CollapseSafeContrastiveLoss(static_model, guard="entropy")


def test_config_and_citation_for_the_model_card(static_model) -> None:
    alignment = DAFTAlignmentLoss(static_model)
    safe = CollapseSafeContrastiveLoss(static_model, guard="uniformity", guard_weight=0.5)
    assert alignment.get_config_dict()["scale"] == 20.0
    assert alignment.get_config_dict()["frozen_route"] == "document"
    assert safe.get_config_dict()["guard"] == "uniformity" and safe.get_config_dict()["guard_weight"] == 0.5
    assert "2211.04942" in alignment.citation and "2211.04942" in safe.citation
    assert "Isola" in safe.citation


def test_guard_is_finite_on_a_batch_of_one(static_model) -> None:
    """An epoch's last batch can hold one pair; a NaN guard there would poison every parameter."""
    static_model.train()
    loss = CollapseSafeContrastiveLoss(static_model, guard="variance")
    features = [_features(static_model, QUERIES[:1], "query"), _features(static_model, [DOCUMENTS["cell"]], "document")]
    parts = loss(features, None)
    assert all(torch.isfinite(value) for value in parts.values())
    assert parts["collapse_guard"].item() == 0.0
