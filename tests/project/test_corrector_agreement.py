"""benchmarks/corrector_agreement.py's ceilings: maps of the stale embedding fitted on the current route's embeddings,
on a tiny asymmetric model."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from st_daft.embeddings.encode import embed_documents
from st_daft.models.asymmetric import build_asymmetric_model

ROOT = Path(__file__).resolve().parents[2]


def _protocol():
    spec = importlib.util.spec_from_file_location("corrector_agreement", ROOT / "benchmarks" / "corrector_agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_ceilings_fit_the_current_route_and_dropout_changes_its_targets(tiny_document_model_dir: Path) -> None:
    protocol = _protocol()
    model = build_asymmetric_model(str(tiny_document_model_dir), "static", device="cpu")
    texts = [f"word{i % 7} word{i % 5} word{i % 3} sample {i}" for i in range(48)]
    fresh = embed_documents(model, texts)
    torch.manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(fresh.shape[1], fresh.shape[1]))[0]
    stale = F.normalize(fresh @ rotation, dim=1)  # a cache one linear map away from the route
    observed = torch.arange(0, 48, 2)

    model.eval()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    bounds = protocol.ceilings(model, SimpleNamespace(texts=texts), stale, fresh, observed, seed=0)
    assert not model.training, "the route is left in the mode it was in"
    assert torch.equal(torch.get_rng_state(), state), "measuring leaves the training's random state alone"

    assert set(bounds) == {"linear-all", "linear-observed", "linear-observed-dropout", "mlp-observed"}
    unseen = torch.arange(1, 48, 2)
    stale_error = (1 - F.cosine_similarity(stale[unseen], fresh[unseen])).mean()
    for name in ("linear-all", "mlp-observed"):
        error = (1 - F.cosine_similarity(bounds[name][unseen], fresh[unseen])).mean()
        assert error < 0.5 * stale_error, f"{name} recovers the map: {error:.4f} against stale {stale_error:.4f}"
    dropout = protocol.training_mode_embeddings(model, texts[:8])
    assert dropout.shape == (8, fresh.shape[1])
    assert torch.allclose(dropout.norm(dim=1), torch.ones(8), atol=1e-5)
    assert not torch.allclose(dropout, fresh[:8], atol=1e-4), "encoded with dropout on, unlike eval mode"
