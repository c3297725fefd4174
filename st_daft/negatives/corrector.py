"""Corrector networks (Monath et al., ICML 2024): map stale cached document embeddings to the current ones.

A document cache goes stale as the document route trains. Instead of re-embedding the corpus, a small residual
network ``h(e) = e + MLP(e)`` learns online to map each stale embedding to the document's current embedding, from
the documents a training step encodes anyway (its positives and mined negatives), with a "drift" loss between
``h(stale[rows])`` and their fresh, detached embeddings. Its last layer starts at zero, so ``h`` starts as the
identity (the plain stale cache) and only departs from it as far as the observed drift asks.

Drift loss: MSE and cosine were measured side by side on SciFact (two correctors trained on exactly the same
observations, ``benchmarks/corrector_scifact.py``): they end equally good, both well under half the raw stale cache's
error on corpus documents they never saw, with per-step curves that overlap (docs/results/corrector.md). MSE is
the default: it also pulls the norm of ``h(stale)`` to that of the unit-length fresh embeddings, so ``h(cache)``
needs no re-normalisation to be scored like the fresh embeddings (the miner normalises anyway).

Two classes, one job each: :class:`CorrectorNetwork` is the map ``h``; :class:`CorrectorTrainer` owns its optimizer
and replay buffer and turns the fresh embeddings a training step observed into drift-loss updates. The corrector is a
side artefact of training: it is saved beside a checkpoint, never inside the SentenceTransformer, which keeps loading
with plain ``SentenceTransformer(path)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from st_daft.citations import CORRECTOR_CITATION
from st_daft.utils.distributed import all_reduce_gradients
from st_daft.utils.io import atomic_torch_save, atomic_write_json, read_json

__all__ = [
    "CorrectorNetwork",
    "CorrectorTrainer",
    "CorrectorFileError",
    "drift_loss",
    "staleness_error",
    "CORRECTOR_CITATION",
]


CONFIG_FILE = "corrector_config.json"
WEIGHTS_FILE = "corrector.pt"
TRAINER_FILE = "corrector_trainer.pt"


class CorrectorFileError(ValueError):
    """A saved corrector file is missing, truncated, corrupt or belongs to another corrector configuration."""


DriftLossName = Literal["mse", "cosine"]
_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


def drift_loss(predicted: Tensor, fresh: Tensor, kind: DriftLossName = "mse") -> Tensor:
    """The corrector's training loss between ``h(stale)`` and fresh embeddings.

    ``"mse"``: squared error summed over dimensions, averaged over rows (for unit vectors ``2 - 2 cos`` plus the
    norm gap); ``"cosine"``: ``1 - cos``, averaged over rows (scale-free).
    """
    if kind == "mse":
        return (predicted - fresh).pow(2).sum(dim=1).mean()
    if kind == "cosine":
        return (1 - F.cosine_similarity(predicted, fresh, dim=1)).mean()
    raise ValueError(f"unknown drift loss {kind!r}: choose 'mse' or 'cosine'")


def staleness_error(approximate: Tensor, fresh: Tensor) -> Tensor:
    """Per-row ``1 - cos(approximate, fresh)``."""
    return 1 - F.cosine_similarity(approximate.float(), fresh.float(), dim=1)


class CorrectorNetwork(nn.Module):
    """``h(e) = e + MLP(e)``: a residual MLP from stale to current document embeddings.

    Args:
        dimension: embedding dimension (input and output).
        hidden: width of the hidden layers (default: ``dimension``).
        depth: number of linear layers of the MLP; 1 is a linear residual map ``e + We + b``.
        activation: ``"gelu"``, ``"relu"``, ``"tanh"`` or ``"silu"`` between the layers.
        normalize: L2-normalise the output (the document route's embeddings are unit vectors).
    """

    def __init__(
        self,
        dimension: int,
        hidden: int | None = None,
        depth: int = 2,
        activation: str = "gelu",
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if dimension < 1 or depth < 1:
            raise ValueError(f"need dimension >= 1 and depth >= 1, got {dimension}, {depth}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: choose from {sorted(_ACTIVATIONS)}")
        self.dimension = dimension
        self.hidden = hidden or dimension
        self.depth = depth
        self.activation = activation
        self.normalize = normalize
        widths = [dimension] + [self.hidden] * (depth - 1) + [dimension]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            if index:
                layers.append(_ACTIVATIONS[activation]())
            layers.append(nn.Linear(width_in, width_out))
        self.mlp = nn.Sequential(*layers)
        self.version = 0  # bumped on every change of the weights, so scorers know when h(cache) must be recomputed
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise: hidden layers as ``nn.Linear`` does, the last layer at zero (``h`` is the identity)."""
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.version += 1

    def forward(self, embeddings: Tensor) -> Tensor:
        corrected = embeddings + self.mlp(embeddings)
        return F.normalize(corrected, dim=-1) if self.normalize else corrected

    @torch.no_grad()
    def correct(self, embeddings: Tensor, chunk_size: int = 65536) -> Tensor:
        """``h`` over a (possibly float16 or memory-mapped) matrix, chunk by chunk, as float32 without gradient."""
        parameter = next(self.parameters())
        chunks = [self(chunk.to(parameter.device, torch.float32)).to("cpu") for chunk in embeddings.split(chunk_size)]
        return torch.cat(chunks) if chunks else embeddings.new_zeros((0, self.dimension), dtype=torch.float32)

    def config(self) -> dict[str, Any]:
        return {
            "dimension": self.dimension,
            "hidden": self.hidden,
            "depth": self.depth,
            "activation": self.activation,
            "normalize": self.normalize,
        }

    @property
    def is_linear(self) -> bool:
        """Whether ``h(e) = e + We + b`` (depth 1, no normalisation): then ``q . h(e) = (q + W^T q) . e + q . b``."""
        return self.depth == 1 and not self.normalize

    def save(self, folder: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Write the configuration, the weights and (optionally) the optimizer state into ``folder``, atomically."""
        folder = Path(folder)
        payload: dict[str, Any] = {"state_dict": self.state_dict()}
        if optimizer is not None:
            payload["optimizer"] = optimizer.state_dict()
        atomic_torch_save(payload, folder / WEIGHTS_FILE)
        atomic_write_json(folder / CONFIG_FILE, self.config())

    @classmethod
    def load(
        cls, folder: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None, map_location: str = "cpu"
    ) -> CorrectorNetwork:
        """A corrector saved by :meth:`save`; its optimizer state goes into ``optimizer`` when given.

        Use :meth:`load_into` to restore into an existing corrector (whose optimizer holds its parameters).
        """
        folder = Path(folder)
        corrector = cls(**_read_config(folder))
        corrector.load_into(folder, optimizer, map_location)
        return corrector

    def load_into(
        self, folder: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None, map_location: str = "cpu"
    ) -> None:
        """Restore weights (and optimizer state) saved by :meth:`save` into this corrector, checking the config."""
        folder = Path(folder)
        saved = _read_config(folder)
        if saved != self.config():
            raise CorrectorFileError(
                f"{folder}: corrector configuration {saved} differs from this corrector's {self.config()}"
            )
        payload = load_torch_file(folder / WEIGHTS_FILE, map_location)
        self.load_state_dict(payload["state_dict"])
        if optimizer is not None and "optimizer" in payload:
            optimizer.load_state_dict(payload["optimizer"])
        self.version += 1


class CorrectorTrainer:
    """Trains a :class:`CorrectorNetwork` online: its own Adam optimizer, a replay buffer, drift-loss updates.

    A training step hands it the fresh (detached) embeddings of the cache rows it encoded anyway (:meth:`observe`);
    at the end of the optimiser step :meth:`step` makes ``steps`` drift-loss updates of ``h(stale[rows])`` towards
    them. With ``buffer > 0`` the updates also replay up to that many of the most recent earlier observations, which
    steadies the corrector when steps encode few documents. After a full re-embedding of the corpus the drift starts
    from zero again: :meth:`reset` returns ``h`` to the identity.

    Args:
        corrector: the network to train.
        lr: learning rate of the Adam optimizer.
        steps: optimizer steps per training step.
        buffer: replayed earlier observations (0: only the current step's).
        drift_loss: ``"mse"`` or ``"cosine"`` (see :func:`drift_loss`).
    """

    def __init__(
        self,
        corrector: CorrectorNetwork,
        lr: float = 1e-3,
        steps: int = 1,
        buffer: int = 0,
        drift_loss: DriftLossName = "mse",
    ) -> None:
        if drift_loss not in ("mse", "cosine"):
            raise ValueError(f"unknown drift loss {drift_loss!r}: choose 'mse' or 'cosine'")
        if steps < 1 or buffer < 0:
            raise ValueError(f"corrector steps must be >= 1 and buffer >= 0, got {steps} and {buffer}")
        self.corrector = corrector
        self.lr = lr
        self.steps = steps
        self.buffer = buffer
        self.drift_loss = drift_loss
        self.optimizer = torch.optim.Adam(corrector.parameters(), lr=lr)
        self._pending_rows: list[Tensor] = []
        self._pending_fresh: list[Tensor] = []
        self._buffer_rows = torch.zeros(0, dtype=torch.long)
        self._buffer_fresh = torch.zeros(0, corrector.dimension)

    @torch.no_grad()
    def observe(self, rows: Tensor, fresh: Tensor) -> None:
        """Record fresh embeddings of cache rows (rows < 0, texts not in the cache, are ignored) for the next step."""
        known = rows >= 0
        if not bool(known.any()):
            return
        self._pending_rows.append(rows[known].cpu())
        self._pending_fresh.append(fresh.detach()[known.to(fresh.device)].to("cpu", torch.float32))

    @property
    def pending(self) -> int:
        return sum(len(rows) for rows in self._pending_rows)

    def discard(self) -> None:
        """Drop the step's observations without training (e.g. while the cache is exact)."""
        self._pending_rows, self._pending_fresh = [], []

    def step(self, cache: Any) -> float | None:
        """Drift-loss updates on the observations since the last call (plus the replay buffer); the last loss value.

        ``cache``: the :class:`~st_daft.embeddings.cache.StaleEmbeddingCache` the observed rows index.
        """
        if not self._pending_rows:
            return None
        rows, fresh = torch.cat(self._pending_rows), torch.cat(self._pending_fresh)
        self.discard()
        if self.buffer > 0:
            rows = torch.cat([self._buffer_rows, rows])[-(self.buffer + len(rows)) :]
            fresh = torch.cat([self._buffer_fresh, fresh])[-len(rows) :]
            self._buffer_rows, self._buffer_fresh = rows[-self.buffer :], fresh[-self.buffer :]
        device = next(self.corrector.parameters()).device
        stale, fresh = cache.float32(rows).to(device), fresh.to(device)
        was_training = self.corrector.training
        self.corrector.train()
        value = 0.0
        with torch.enable_grad():
            for _ in range(self.steps):
                self.optimizer.zero_grad(set_to_none=True)
                loss = drift_loss(self.corrector(stale), fresh, self.drift_loss)
                loss.backward()
                all_reduce_gradients(self.corrector)  # under torchrun every process takes the same update
                self.optimizer.step()
                value = float(loss.detach())
        self.corrector.train(was_training)
        self.corrector.version += 1
        return value

    def reset(self) -> None:
        """Back to the identity with a fresh optimizer state and an empty buffer (after a corpus re-embedding)."""
        self.corrector.reset_parameters()
        self.optimizer.state.clear()
        self.discard()
        self._buffer_rows, self._buffer_fresh = self._buffer_rows[:0], self._buffer_fresh[:0]

    def config(self) -> dict[str, Any]:
        return {
            "corrector": self.corrector.config(),
            "corrector_lr": self.lr,
            "corrector_steps": self.steps,
            "corrector_buffer": self.buffer,
            "drift_loss": self.drift_loss,
        }

    def save(self, folder: str | os.PathLike) -> None:
        """Corrector (weights, configuration, optimizer state) and replay buffer into ``folder``, each file atomic."""
        folder = Path(folder)
        self.corrector.save(folder, self.optimizer)
        atomic_torch_save({"rows": self._buffer_rows, "fresh": self._buffer_fresh}, folder / TRAINER_FILE)

    def load(self, folder: str | os.PathLike) -> None:
        """Restore what :meth:`save` wrote; a missing, truncated or mismatched file is named in the error."""
        folder = Path(folder)
        self.corrector.load_into(folder, self.optimizer)
        buffer = load_torch_file(folder / TRAINER_FILE)
        self._buffer_rows, self._buffer_fresh = buffer["rows"], buffer["fresh"]
        self.discard()


def load_torch_file(path: Path, map_location: str = "cpu") -> dict[str, Any]:
    """``torch.load`` (weights only) of a file st-daft wrote, naming the file when it is missing or unreadable."""
    if not path.is_file():
        raise CorrectorFileError(f"{path}: corrector file not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError ... on a damaged file
        raise CorrectorFileError(
            f"{path}: corrector file is truncated or corrupt ({type(error).__name__}: {error}); "
            "restore it from an earlier checkpoint or start the corrector afresh"
        ) from None
    if not isinstance(payload, dict):
        raise CorrectorFileError(f"{path}: not a corrector file written by st-daft")
    return payload


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return read_json(folder / CONFIG_FILE, "corrector configuration")
    except (FileNotFoundError, ValueError) as error:
        raise CorrectorFileError(str(error)) from None
