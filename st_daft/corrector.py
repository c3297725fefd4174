"""Corrector networks (Monath et al., ICML 2024): map stale cached document embeddings to the current ones.

A document cache goes stale as the document route trains. Instead of re-embedding the corpus, a small residual
network ``h(e) = e + MLP(e)`` learns online to map each stale embedding to the document's current embedding, from
the documents a training step encodes anyway (its positives and mined negatives), with a "drift" loss between
``h(stale[rows])`` and their fresh, detached embeddings. Its last layer starts at zero, so ``h`` starts as the
identity (the plain stale cache) and only departs from it as far as the observed drift asks.

Drift loss: MSE and cosine were measured side by side on SciFact (two correctors trained on exactly the same
observations, ``benchmarks/corrector_scifact.py``): they end equally good (corrected error 0.062 with MSE, 0.063 with
cosine, against 0.158 for the raw stale cache, on 256 corpus documents in eval mode), with per-step curves that
overlap. MSE is the default: it also pulls the norm of ``h(stale)`` to that of the unit-length fresh embeddings, so
``h(cache)`` needs no re-normalisation to be scored like the fresh embeddings (the miner normalises anyway).

The corrector is a side artefact of training: it is saved beside a checkpoint (:meth:`CorrectorNetwork.save`), never
inside the SentenceTransformer, which keeps loading with plain ``SentenceTransformer(path)``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CorrectorNetwork", "drift_loss", "staleness_error", "CORRECTOR_CITATION"]

CORRECTOR_CITATION = """
@inproceedings{monath2024corrector,
    title={A Fresh Take on Stale Embeddings: Improving Dense Retriever Training with Corrector Networks},
    author={Nicholas Monath and Will Grathwohl and Michael Boratko and Rob Fergus and Andrew McCallum
        and Manzil Zaheer},
    booktitle={International Conference on Machine Learning},
    year={2024},
    url={https://arxiv.org/abs/2409.01890},
}
"""

CONFIG_FILE = "corrector_config.json"
WEIGHTS_FILE = "corrector.pt"

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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise: hidden layers as ``nn.Linear`` does, the last layer at zero (``h`` is the identity)."""
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

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

    def save(self, folder: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Write the configuration, the weights and (optionally) the optimizer state into ``folder``, atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        payload = {"state_dict": self.state_dict()}
        if optimizer is not None:
            payload["optimizer"] = optimizer.state_dict()
        atomic_torch_save(payload, folder / WEIGHTS_FILE)
        atomic_write_text(folder / CONFIG_FILE, json.dumps(self.config(), indent=2))

    @classmethod
    def load(
        cls, folder: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None, map_location: str = "cpu"
    ) -> CorrectorNetwork:
        """A corrector saved by :meth:`save`; its optimizer state goes into ``optimizer`` when given.

        Use :meth:`load_into` to restore into an existing corrector (whose optimizer holds its parameters).
        """
        folder = Path(folder)
        corrector = cls(**json.loads((folder / CONFIG_FILE).read_text()))
        corrector.load_into(folder, optimizer, map_location)
        return corrector

    def load_into(
        self, folder: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None, map_location: str = "cpu"
    ) -> None:
        """Restore weights (and optimizer state) saved by :meth:`save` into this corrector, checking the config."""
        folder = Path(folder)
        saved = json.loads((folder / CONFIG_FILE).read_text())
        if saved != self.config():
            raise ValueError(f"{folder}: corrector configuration {saved} differs from this corrector's {self.config()}")
        payload = torch.load(folder / WEIGHTS_FILE, map_location=map_location, weights_only=True)
        self.load_state_dict(payload["state_dict"])
        if optimizer is not None and "optimizer" in payload:
            optimizer.load_state_dict(payload["optimizer"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then an atomic rename."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def atomic_write_text(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
