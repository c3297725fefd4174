"""Corrector networks (Monath et al., ICML 2024): map stale cached document embeddings to the current ones.

A document cache goes stale as the document route trains. Instead of re-embedding the corpus, a small residual
network ``h(e) = e + MLP(e)`` learns online to map each stale embedding to the document's current embedding, from
the documents a training step encodes anyway (its positives and mined negatives), with a "drift" loss between
``h(stale[rows])`` and their fresh, detached embeddings. Its last layer starts at zero, so ``h`` starts as the
identity (the plain stale cache) and only departs from it as far as the observed drift asks.

Drift loss: MSE and cosine were measured side by side on SciFact (two correctors trained on exactly the same
observations, ``benchmarks/corrector_scifact.py``): they end equally good, both well under half the raw stale cache's
error on corpus documents they never saw, with per-step curves that overlap (docs/results/corrector.md). MSE is the
drift loss's default: it also pulls the norm of ``h(stale)`` to that of the unit-length fresh embeddings, so
``h(cache)`` needs no re-normalisation to be scored like the fresh embeddings (the miner normalises anyway).

Objectives (``CorrectorTrainer(loss=...)``): ``"mse"`` / ``"cosine"``, the drift loss above; ``"kl"``, the loss
Monath et al. train the corrector with: a KL divergence between the softmax of each observed query's scores over the
step's candidate documents under ``h(stale)`` and under the fresh embeddings (mining ranks documents per query, and this
is what it needs to be right about), after ``warmup`` steps of MSE; ``"mse+kl"``, their sum; ``"ridge"``, a closed-form
linear map ``e -> eA + b`` fitted by ridge least squares (shrunk towards the identity) on the whole replay buffer of
(stale, fresh) pairs, refitted every ``ridge_every`` steps: early document drift is close to one linear map of the
space, and a few thousand observed documents determine a ``d x d`` map well. The fine-tuning stage trains ``"ridge"``
unless told otherwise; the objectives' measured trade-offs are on the corrector results page.

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
    "candidate_kl",
    "ridge_fit",
    "staleness_error",
    "CORRECTOR_LOSSES",
    "CORRECTOR_CITATION",
]


CONFIG_FILE = "corrector_config.json"
WEIGHTS_FILE = "corrector.pt"
TRAINER_FILE = "corrector_trainer.pt"


class CorrectorFileError(ValueError):
    """A saved corrector file is missing, truncated, corrupt or belongs to another corrector configuration."""


DriftLossName = Literal["mse", "cosine"]
CorrectorLossName = Literal["mse", "cosine", "kl", "mse+kl", "ridge"]
#: The objectives :class:`CorrectorTrainer` trains with (``loss=``).
CORRECTOR_LOSSES: tuple[str, ...] = ("mse", "cosine", "kl", "mse+kl", "ridge")
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


def candidate_kl(queries: Tensor, predicted: Tensor, fresh: Tensor, scale: float = 20.0) -> Tensor:
    """KL(softmax of ``queries . fresh``  ||  softmax of ``queries . normalize(predicted)``) over the candidates.

    ``queries``: ``(m, d)`` observed query embeddings; ``predicted`` (``h(stale)``) and ``fresh``: ``(n, d)`` candidate
    documents. Scores are cosine similarities times ``scale`` (the inverse temperature of the contrastive loss), as
    the miner scores ``normalize(h(cache))``; averaged over queries (Monath et al. 2024, the corrector's loss on
    the query's logits over the candidates).
    """
    queries = F.normalize(queries, dim=1)
    target = F.log_softmax(scale * queries @ F.normalize(fresh, dim=1).T, dim=1)
    estimate = F.log_softmax(scale * queries @ F.normalize(predicted, dim=1).T, dim=1)
    return F.kl_div(estimate, target, log_target=True, reduction="batchmean")


@torch.no_grad()
def ridge_fit(stale: Tensor, fresh: Tensor, ridge: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(A, b)`` minimising ``|stale A + b - fresh|^2 + ridge |A - I|^2``: a linear map shrunk towards the identity.

    Solved in float64 from the normal equations (a ``(d+1) x (d+1)`` system, whatever the number of rows); the bias
    is not shrunk.
    """
    rows, dimension = stale.shape
    inputs = torch.cat([stale.double(), torch.ones(rows, 1, dtype=torch.float64)], dim=1)
    penalty = torch.eye(dimension + 1, dtype=torch.float64) * ridge
    penalty[dimension, dimension] = 0.0
    prior = torch.eye(dimension + 1, dimension, dtype=torch.float64)  # [I; 0]: the identity map, no bias
    gram = inputs.T @ inputs + penalty
    gram[dimension, dimension] += 1e-9  # an empty buffer still solves (to the identity)
    solution = torch.linalg.solve(gram, inputs.T @ fresh.double() + penalty @ prior)
    return solution[:dimension].float(), solution[dimension].float()


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
        drift_loss: ``"mse"`` or ``"cosine"`` (see :func:`drift_loss`); the objective when ``loss`` is not given.
        loss: the objective, one of :data:`CORRECTOR_LOSSES`: ``"mse"``, ``"cosine"``, ``"kl"`` (query scores over the
            candidates, :func:`candidate_kl`; needs the step's queries, :meth:`observe_queries`), ``"mse+kl"`` or
            ``"ridge"`` (closed-form linear map on the replay buffer, :func:`ridge_fit`; a depth-1 corrector and
            ``buffer >= 1``).
        warmup: first corrector updates trained with MSE only, before the KL term starts (``"kl"``, ``"mse+kl"``).
        query_buffer: most recent observed queries the KL term scores the candidates for.
        scale: inverse temperature of the KL term's softmax.
        ridge: shrinkage of the ridge map towards the identity.
        ridge_every: refit the ridge map every that many training steps.
    """

    def __init__(
        self,
        corrector: CorrectorNetwork,
        lr: float = 1e-3,
        steps: int = 1,
        buffer: int = 0,
        drift_loss: DriftLossName = "mse",
        loss: CorrectorLossName | None = None,
        warmup: int = 0,
        query_buffer: int = 256,
        scale: float = 20.0,
        ridge: float = 1.0,
        ridge_every: int = 1,
    ) -> None:
        if drift_loss not in ("mse", "cosine"):
            raise ValueError(f"unknown drift loss {drift_loss!r}: choose 'mse' or 'cosine'")
        loss = drift_loss if loss is None else loss
        if loss not in CORRECTOR_LOSSES:
            choices = list(CORRECTOR_LOSSES)
            raise ValueError(f"unknown corrector loss (--corrector-loss) {loss!r}: choose from {choices}")
        if steps < 1 or buffer < 0:
            raise ValueError(f"corrector steps must be >= 1 and buffer >= 0, got {steps} and {buffer}")
        if warmup < 0 or query_buffer < 1 or ridge_every < 1 or not ridge >= 0 or not scale > 0:
            raise ValueError(
                f"corrector warmup (--corrector-warmup) must be >= 0, query_buffer and ridge_every >= 1, ridge >= 0 "
                f"and scale > 0, got {warmup}, {query_buffer}, {ridge_every}, {ridge} and {scale}"
            )
        if loss == "ridge" and (corrector.depth != 1 or buffer < 1):
            raise ValueError(
                f"corrector loss 'ridge' fits a linear map on the replay buffer: needs CorrectorNetwork(depth=1) and "
                f"buffer >= 1, got depth {corrector.depth} and buffer {buffer}"
            )
        self.loss = loss
        self.warmup = warmup
        self.query_buffer = query_buffer
        self.scale = scale
        self.ridge = ridge
        self.ridge_every = ridge_every
        self.updates = 0  # training steps taken since the last reset (warm-up and refit schedule)
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
        self._queries = torch.zeros(0, corrector.dimension)

    @torch.no_grad()
    def observe_queries(self, queries: Tensor) -> None:
        """Record the step's query embeddings (the KL term scores the candidates for the most recent ones)."""
        if self.loss in ("kl", "mse+kl"):
            queries = queries.detach().to("cpu", torch.float32)
            self._queries = torch.cat([self._queries, queries])[-self.query_buffer :]

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
        self.updates += 1
        if self.loss == "ridge":
            return self._ridge_step(cache, rows, fresh)
        device = next(self.corrector.parameters()).device
        stale, fresh = cache.float32(rows).to(device), fresh.to(device)
        queries = self._queries.to(device)
        use_kl = self.loss in ("kl", "mse+kl") and self.updates > self.warmup and len(queries) > 0
        was_training = self.corrector.training
        self.corrector.train()
        value = 0.0
        with torch.enable_grad():
            for _ in range(self.steps):
                self.optimizer.zero_grad(set_to_none=True)
                predicted = self.corrector(stale)
                if not use_kl:  # "mse", "cosine", and the KL objectives during warm-up (or before any query)
                    loss = drift_loss(predicted, fresh, "cosine" if self.loss == "cosine" else "mse")
                elif self.loss == "kl":
                    loss = candidate_kl(queries, predicted, fresh, self.scale)
                else:
                    loss = drift_loss(predicted, fresh, "mse") + candidate_kl(queries, predicted, fresh, self.scale)
                loss.backward()
                all_reduce_gradients(self.corrector)  # under torchrun every process takes the same update
                self.optimizer.step()
                value = float(loss.detach())
        self.corrector.train(was_training)
        self.corrector.version += 1
        return value

    @torch.no_grad()
    def _ridge_step(self, cache: Any, rows: Tensor, fresh: Tensor) -> float:
        """Refit ``h(e) = e + We + b`` in closed form on the replay buffer (every ``ridge_every`` steps); its MSE."""
        stale = cache.float32(rows)
        linear = self.corrector.mlp[-1]
        if (self.updates - 1) % self.ridge_every == 0:
            # Under torchrun every process holds the same buffer only if observations are gathered; the map is fitted
            # per process from what it observed, as the gradient objectives would be without their all-reduce.
            matrix, bias = ridge_fit(stale, fresh, self.ridge)
            identity = torch.eye(self.corrector.dimension)
            linear.weight.copy_((matrix - identity).T.to(linear.weight.device))
            linear.bias.copy_(bias.to(linear.bias.device))
            self.corrector.version += 1
        device = linear.weight.device
        return float(drift_loss(self.corrector(stale.to(device)), fresh.to(device), "mse"))

    def reset(self) -> None:
        """Back to the identity with a fresh optimizer state and an empty buffer (after a corpus re-embedding)."""
        self.corrector.reset_parameters()
        self.optimizer.state.clear()
        self.discard()
        self._buffer_rows, self._buffer_fresh = self._buffer_rows[:0], self._buffer_fresh[:0]
        self._queries = self._queries[:0]
        self.updates = 0

    def config(self) -> dict[str, Any]:
        return {
            "corrector": self.corrector.config(),
            "corrector_lr": self.lr,
            "corrector_steps": self.steps,
            "corrector_buffer": self.buffer,
            "drift_loss": self.drift_loss,
            "corrector_loss": self.loss,
            "corrector_warmup": self.warmup,
        }

    def save(self, folder: str | os.PathLike) -> None:
        """Corrector (weights, configuration, optimizer state) and replay buffer into ``folder``, each file atomic."""
        folder = Path(folder)
        self.corrector.save(folder, self.optimizer)
        buffer = {"rows": self._buffer_rows, "fresh": self._buffer_fresh, "queries": self._queries}
        atomic_torch_save({**buffer, "updates": torch.tensor(self.updates)}, folder / TRAINER_FILE)

    def load(self, folder: str | os.PathLike) -> None:
        """Restore what :meth:`save` wrote; a missing, truncated or mismatched file is named in the error."""
        folder = Path(folder)
        self.corrector.load_into(folder, self.optimizer)
        buffer = load_torch_file(folder / TRAINER_FILE)
        self._buffer_rows, self._buffer_fresh = buffer["rows"], buffer["fresh"]
        self._queries = buffer.get("queries", self._queries[:0])  # files written before the KL objective lack them
        self.updates = int(buffer.get("updates", torch.tensor(0)))
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
