"""CorrectorNetwork: identity at start, learns synthetic drifts online, saves and loads with its optimizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from st_daft.corrector import CorrectorNetwork, drift_loss, staleness_error


def _unit(rows: int, dimension: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dimension, generator=generator), dim=1)


def _train_online(
    corrector: CorrectorNetwork, stale: torch.Tensor, fresh: torch.Tensor, steps: int, kind: str, lr: float = 3e-3
) -> None:
    """Online training as the miner does it: one optimizer step per batch of 64 observed documents."""
    optimizer = torch.optim.Adam(corrector.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        rows = torch.randint(0, len(stale), (64,), generator=generator)
        optimizer.zero_grad()
        drift_loss(corrector(stale[rows]), fresh[rows], kind).backward()
        optimizer.step()


def test_identity_at_start() -> None:
    corrector = CorrectorNetwork(16, hidden=32, depth=3)
    embeddings = torch.randn(5, 16)
    assert torch.equal(corrector(embeddings), embeddings)
    assert torch.equal(corrector.correct(embeddings.half()), embeddings.half().float())


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("drift", ["linear", "nonlinear"])
def test_learns_synthetic_drift_and_cuts_the_error(drift: str, kind: str) -> None:
    generator = torch.Generator().manual_seed(0)
    dimension = 32
    stale = _unit(1500, dimension, generator)
    if drift == "linear":
        transform = torch.eye(dimension) + 0.4 * torch.randn(dimension, dimension, generator=generator) / dimension**0.5
        fresh = F.normalize(stale @ transform, dim=1)
    else:
        mixing = torch.randn(dimension, dimension, generator=generator)
        fresh = F.normalize(stale + 0.4 * torch.tanh(2 * stale @ mixing), dim=1)
    train, held_out = slice(0, 1000), slice(1000, 1500)  # judged on documents it never saw
    corrector = CorrectorNetwork(dimension, hidden=64, depth=2 if drift == "nonlinear" else 1)
    before = staleness_error(stale[held_out], fresh[held_out]).mean().item()
    _train_online(corrector, stale[train], fresh[train], steps=400, kind=kind)
    with torch.no_grad():
        after = staleness_error(corrector(stale[held_out]), fresh[held_out]).mean().item()
    assert before > 0.02
    assert after < 0.25 * before, (before, after)


def test_drift_loss_values() -> None:
    a = F.normalize(torch.randn(4, 8), dim=1)
    assert drift_loss(a, a, "mse").item() == pytest.approx(0.0)
    assert drift_loss(a, a, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert drift_loss(a, -a, "mse").item() == pytest.approx(4.0, rel=1e-5)
    with pytest.raises(ValueError, match="unknown drift loss"):
        drift_loss(a, a, "l1")


def test_save_and_load_with_optimizer(tmp_path) -> None:
    corrector = CorrectorNetwork(8, hidden=16, depth=2)
    optimizer = torch.optim.Adam(corrector.parameters(), lr=1e-2)
    stale, fresh = torch.randn(32, 8), torch.randn(32, 8)
    for _ in range(3):
        optimizer.zero_grad()
        drift_loss(corrector(stale), fresh).backward()
        optimizer.step()
    corrector.save(tmp_path / "corrector", optimizer)
    assert not list((tmp_path / "corrector").glob("*.tmp"))

    restored = CorrectorNetwork(8, hidden=16, depth=2)
    restored_optimizer = torch.optim.Adam(restored.parameters(), lr=1e-2)
    restored.load_into(tmp_path / "corrector", restored_optimizer)
    for name, tensor in corrector.state_dict().items():
        assert torch.equal(tensor, restored.state_dict()[name])
    saved_state, loaded_state = optimizer.state_dict()["state"], restored_optimizer.state_dict()["state"]
    for key in saved_state:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved_state[key][field], loaded_state[key][field])
    assert torch.equal(CorrectorNetwork.load(tmp_path / "corrector")(stale), corrector(stale))
    with pytest.raises(ValueError, match="configuration"):
        CorrectorNetwork(8, hidden=32, depth=2).load_into(tmp_path / "corrector")


def test_reset_returns_to_identity() -> None:
    corrector = CorrectorNetwork(8)
    torch.nn.init.normal_(corrector.mlp[-1].weight)
    x = torch.randn(3, 8)
    assert not torch.equal(corrector(x), x)
    corrector.reset_parameters()
    assert torch.equal(corrector(x), x)
