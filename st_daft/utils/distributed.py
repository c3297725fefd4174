"""What st-daft needs beyond the trainer's own DDP support when it runs in several processes (``torchrun``,
``accelerate launch``): who writes files, the initial cache embedded once across ranks, the corrector kept identical.

sentence-transformers' trainer already wraps the model in DistributedDataParallel, shards the batches, all-reduces
the model's gradients and saves checkpoints from the main process only. What lives beside the model does not go
through it:

- files: the final model, ``daft_summary.json``, the cache, the corrector, the store must be written by one process
  (:func:`is_main_process`), the others wait (:func:`barrier`);
- the corpus cache: every rank would embed the whole corpus; :func:`embed_sharded` embeds ``1/world_size`` of it per
  rank and all-gathers the rows, so each rank holds the same full cache (every rank mines from the same matrix);
  :func:`compute_sharded` does the same for any per-item computation (the vocabulary stage's one-token vectors);
- the corrector network is trained by each rank on its own batch's fresh embeddings: :func:`all_reduce_gradients`
  averages its gradients before each optimizer step (the DDP rule, by hand), and :func:`broadcast_parameters` makes
  every rank start from rank 0's weights, so the correctors stay identical.

Outside a process group (one process) every helper is a no-op or plain encoding. Before the group exists (the
recipe runs before the trainer's arguments initialise it) the rank comes from the ``RANK`` variable torchrun sets.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    pass

T = TypeVar("T")
__all__ = [
    "init_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "compute_sharded",
    "local_shard",
    "all_reduce_gradients",
    "all_reduce_sum",
    "broadcast_parameters",
]


def init_distributed() -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1) now, before the trainer would: the recipe
    embeds the corpus before it builds a trainer, and :func:`embed_sharded` needs the group then. NCCL when CUDA is
    available, else gloo; the trainer (accelerate) later reuses this group. Returns whether training is distributed.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return is_distributed()


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """True in the process that writes files: rank 0, or the only process."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def _communication_device(like: torch.device | None = None) -> torch.device:
    """Tensors handed to a collective must live where its backend works: CUDA for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return like if like is not None and like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_shard(items: list[T]) -> list[T]:
    """This process's contiguous shard of ``items`` (all of them in one process), as :func:`compute_sharded` splits
    them: ``ceil(len(items) / world_size)`` each, the last ones shorter or empty."""
    if not is_distributed():
        return items
    shard_size = math.ceil(len(items) / dist.get_world_size())
    rank = dist.get_rank()
    return items[rank * shard_size : (rank + 1) * shard_size]


def compute_sharded(
    items: list[T],
    compute: Callable[[list[T], bool], Tensor],
    show_progress_bar: bool = False,
    like: torch.device | None = None,
) -> Tensor:
    """``compute(items, show_progress_bar)`` (one row per item), with the work split across the process group.

    In a process group each rank computes one contiguous shard of ``items`` (only rank 0 shows progress) and the
    shards are all-gathered, so every rank returns the full ``(len(items), dim)`` CPU float32 matrix, in order; in
    one process this is ``compute(items, show_progress_bar)``. ``like``: the device the rows are computed on (the
    collective runs where its backend needs).
    """
    if not is_distributed():
        return compute(items, show_progress_bar).to("cpu", torch.float32)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shard_size = math.ceil(len(items) / world_size)
    shard = local_shard(items)
    device = _communication_device(like)
    local = compute(shard, show_progress_bar and rank == 0) if shard else None  # None: more ranks than items
    # Every rank must pass tensors of one shape: learn the dimension, pad the last shard.
    dimension = torch.tensor([local.shape[1] if local is not None else 0], device=device)
    dist.all_reduce(dimension, op=dist.ReduceOp.MAX)
    padded = torch.zeros(shard_size, int(dimension.item()), device=device)
    if local is not None:
        padded[: len(local)] = local.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat(gathered)[: len(items)].to("cpu", torch.float32)


def all_reduce_sum(*tensors: Tensor) -> list[Tensor]:
    """Each tensor summed over the process group (unchanged in one process), on the device it came from."""
    if not is_distributed():
        return list(tensors)
    reduced = []
    for tensor in tensors:
        shared = tensor.to(_communication_device(tensor.device))
        dist.all_reduce(shared)
        reduced.append(shared.to(tensor.device))
    return reduced


def all_reduce_gradients(module: torch.nn.Module) -> None:
    """Average the gradients of ``module`` over the process group (call between ``backward()`` and ``step()``).

    Every rank must call it at the same step: a rank without data for the step still calls it (with zero or no
    gradients, counted as zeros), or the others wait forever.
    """
    if not is_distributed():
        return
    world_size = dist.get_world_size()
    for parameter in module.parameters():
        if not parameter.requires_grad:
            continue
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        gradient = parameter.grad.to(_communication_device(parameter.device))
        dist.all_reduce(gradient, op=dist.ReduceOp.SUM)
        parameter.grad.copy_(gradient.to(parameter.grad.device) / world_size)


def broadcast_parameters(module: torch.nn.Module, source: int = 0) -> None:
    """Copy ``module``'s parameters and buffers from rank ``source`` to every rank (no-op in one process)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            shared = tensor.detach().to(_communication_device(tensor.device))
            dist.broadcast(shared, src=source)
            tensor.copy_(shared.to(tensor.device))
