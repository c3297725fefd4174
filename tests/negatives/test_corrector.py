"""CorrectorNetwork: identity at start, learns synthetic drifts online, saves and loads with its optimizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from st_daft.embeddings.cache import StaleEmbeddingCache
from st_daft.negatives.corrector import (
    CorrectorFileError,
    CorrectorNetwork,
    CorrectorTrainer,
    candidate_kl,
    drift_loss,
    ridge_fit,
    staleness_error,
)


def _unit(rows: int, dimension: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dimension, generator=generator), dim=1)


def _cache(stale: torch.Tensor) -> StaleEmbeddingCache:
    return StaleEmbeddingCache([str(i) for i in range(len(stale))], stale, [bytes(16)] * len(stale), "synthetic")


def _train_online(
    corrector: CorrectorNetwork, stale: torch.Tensor, fresh: torch.Tensor, steps: int, kind: str, lr: float = 3e-3
) -> CorrectorTrainer:
    """Online training as in a mining run: a CorrectorTrainer observes 64 documents a step, then steps once."""
    trainer = CorrectorTrainer(corrector, lr=lr, drift_loss=kind)
    cache = _cache(stale)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        rows = torch.randint(0, len(stale), (64,), generator=generator)
        trainer.observe(rows, fresh[rows])
        assert trainer.step(cache) is not None
    return trainer


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
    corrector = CorrectorNetwork(dimension, hidden=64, depth=2 if drift == "nonlinear" else 1)
    before = staleness_error(stale[1000:], fresh[1000:]).mean().item()  # judged on documents it never saw
    _train_online(corrector, stale[:1000], fresh[:1000], steps=400, kind=kind)
    held_out = slice(1000, 1500)
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


def test_trainer_observes_steps_and_resets() -> None:
    generator = torch.Generator().manual_seed(0)
    stale = _unit(200, 8, generator)
    fresh = F.normalize(stale + 0.3 * _unit(200, 8, generator), dim=1)
    corrector = CorrectorNetwork(8, hidden=16)
    trainer = CorrectorTrainer(corrector, lr=1e-2, steps=2, buffer=32)
    cache = _cache(stale)
    assert trainer.step(cache) is None, "nothing observed, nothing to learn"
    rows = torch.tensor([0, 1, -1, 3])  # -1: a text that is not in the cache
    trainer.observe(rows, fresh[rows.clamp(min=0)])
    assert trainer.pending == 3
    version = corrector.version
    assert trainer.step(cache) > 0 and trainer.pending == 0 and corrector.version > version
    assert len(trainer._buffer_rows) == 3 and not torch.equal(corrector(stale), stale)
    trainer.observe(torch.tensor([5]), fresh[5:6])
    trainer.discard()
    assert trainer.pending == 0
    trainer.reset()
    assert torch.equal(corrector(stale), stale) and not trainer.optimizer.state and len(trainer._buffer_rows) == 0
    with pytest.raises(ValueError, match="unknown drift loss"):
        CorrectorTrainer(corrector, drift_loss="l1")


def test_trainer_save_load_round_trip_and_damaged_files_are_named(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    stale, fresh = _unit(64, 8, generator), _unit(64, 8, generator)
    trainer = CorrectorTrainer(CorrectorNetwork(8, hidden=16), buffer=16)
    for start in range(0, 64, 16):
        rows = torch.arange(start, start + 16)
        trainer.observe(rows, fresh[rows])
        trainer.step(_cache(stale))
    trainer.save(tmp_path / "corrector")
    restored = CorrectorTrainer(CorrectorNetwork(8, hidden=16), buffer=16)
    restored.load(tmp_path / "corrector")
    assert torch.equal(restored.corrector(stale), trainer.corrector(stale))
    assert torch.equal(restored._buffer_fresh, trainer._buffer_fresh)
    assert restored.optimizer.state_dict()["state"].keys() == trainer.optimizer.state_dict()["state"].keys()

    weights = tmp_path / "corrector" / "corrector.pt"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CorrectorFileError, match=f"{weights}: corrector file is truncated or corrupt"):
        CorrectorTrainer(CorrectorNetwork(8, hidden=16)).load(tmp_path / "corrector")
    config = tmp_path / "corrector" / "corrector_config.json"
    config.write_text("{")
    with pytest.raises(CorrectorFileError, match=f"{config}: corrector configuration is corrupt"):
        CorrectorNetwork.load(tmp_path / "corrector")


def _linear_drift(rows: int, dimension: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit stale embeddings, their fresh images under one random near-identity linear map, and unit queries."""
    generator = torch.Generator().manual_seed(seed)
    stale = _unit(rows, dimension, generator)
    drift = torch.eye(dimension) + 0.6 * torch.randn(dimension, dimension, generator=generator) / dimension**0.5
    fresh = F.normalize(stale @ drift, dim=1)
    queries = F.normalize(fresh[:64] + 0.3 * _unit(64, dimension, generator), dim=1)
    return stale, fresh, queries


def _top10_overlap(queries: torch.Tensor, approximate: torch.Tensor, fresh: torch.Tensor) -> float:
    found = (queries @ F.normalize(approximate, dim=1).T).topk(10, dim=1).indices
    expected = (queries @ fresh.T).topk(10, dim=1).indices
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, expected)) / (10 * len(queries))


@pytest.mark.parametrize("objective", ["mse", "kl", "mse+kl", "ridge"])
def test_each_objective_cuts_the_error_on_unseen_rows_and_raises_the_overlap(objective: str) -> None:
    stale, fresh, queries = _linear_drift(1200, 16)
    seen, unseen = torch.arange(600), torch.arange(600, 1200)
    torch.manual_seed(0)
    corrector = CorrectorNetwork(16, depth=1)
    trainer = CorrectorTrainer(corrector, lr=1e-2, buffer=512, loss=objective, warmup=5)
    cache, generator = _cache(stale), torch.Generator().manual_seed(2)
    for _ in range(150):
        rows = seen[torch.randint(0, len(seen), (32,), generator=generator)]
        trainer.observe_queries(queries[torch.randint(0, len(queries), (8,), generator=generator)])
        trainer.observe(rows, fresh[rows])
        assert trainer.step(cache) is not None
    with torch.no_grad():
        corrected = corrector(stale)
    stale_error = staleness_error(stale[unseen], fresh[unseen]).mean()
    corrected_error = staleness_error(corrected[unseen], fresh[unseen]).mean()
    assert corrected_error < 0.5 * stale_error, (objective, float(corrected_error), float(stale_error))
    overlap_stale = _top10_overlap(queries, stale[unseen], fresh[unseen])
    overlap_corrected = _top10_overlap(queries, corrected[unseen], fresh[unseen])
    assert overlap_corrected > overlap_stale + 0.05, (objective, overlap_corrected, overlap_stale)


def test_ridge_recovers_an_exact_linear_drift_in_one_fit() -> None:
    generator = torch.Generator().manual_seed(3)
    stale = torch.randn(400, 8, generator=generator)
    matrix, bias = torch.eye(8) + 0.3 * torch.randn(8, 8, generator=generator), torch.randn(8, generator=generator)
    fitted_matrix, fitted_bias = ridge_fit(stale, stale @ matrix + bias, ridge=0.0)
    assert torch.allclose(fitted_matrix, matrix, atol=1e-4) and torch.allclose(fitted_bias, bias, atol=1e-4)
    shrunk, _ = ridge_fit(stale[:4], (stale @ matrix + bias)[:4], ridge=1e6)
    assert torch.allclose(shrunk, torch.eye(8), atol=1e-3)  # few rows, heavy shrinkage: close to the identity


def test_kl_warms_up_with_mse_and_is_zero_when_scores_agree() -> None:
    stale, fresh, queries = _linear_drift(80, 8)
    assert float(candidate_kl(queries, fresh * 3.0, fresh)) == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert float(candidate_kl(queries, stale, fresh)) > 0
    corrector = CorrectorNetwork(8, depth=1)
    trainer = CorrectorTrainer(corrector, buffer=16, loss="kl", warmup=2)
    rows = torch.arange(10)
    trainer.observe_queries(queries[:4])
    values = []
    for _ in range(3):
        trainer.observe(rows, fresh[rows])
        values.append(trainer.step(_cache(stale)))
    # warm-up steps report the MSE drift loss (about 2 - 2 cos), the KL step a far smaller divergence
    expected_mse = float(drift_loss(stale[rows], fresh[rows]))
    assert values[0] == pytest.approx(expected_mse, rel=1e-4) and values[2] < values[0]
    assert trainer.config()["corrector_loss"] == "kl" and trainer.config()["corrector_warmup"] == 2


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"loss": "kl-div"}, "corrector loss (--corrector-loss) 'kl-div'"),
        ({"loss": "kl", "warmup": -1}, "warmup (--corrector-warmup)"),
        ({"loss": "ridge", "buffer": 0}, "buffer >= 1"),
        ({"loss": "ridge", "buffer": 8, "depth": 2}, "CorrectorNetwork(depth=1)"),
    ],
)
def test_bad_objective_settings_are_refused_by_name(options: dict, named: str) -> None:
    depth = options.pop("depth", 1)
    with pytest.raises(ValueError) as error:
        CorrectorTrainer(CorrectorNetwork(8, depth=depth), **options)
    assert named in str(error.value)
