"""The training job under torchrun: data parallel over a gloo process group (CPU tensors).

Every rank builds the same model (same seeds), takes its rows of the same global batch the single-process run
uses, normalizes its loss by the GLOBAL label-token count and sums the gradients over ranks, so each step
computes what one process computes on the whole batch (up to fp32 summation order). Only rank 0 writes."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch

from ..parallel.grads import all_reduce_grads  # noqa: F401 (the job calls it from here)
from .data import IGNORE_INDEX


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this module initialized the process group, so it tears it down

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def from_env() -> DistContext:
    """A process group for a torchrun launch (WORLD_SIZE > 1 in the environment), or the one the caller already
    initialized; a single process otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), False)
    ws = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if ws <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dist.init_process_group("gloo")  # env:// (MASTER_ADDR/PORT, RANK, WORLD_SIZE from torchrun)
    return DistContext(dist.get_rank(), dist.get_world_size(), True)


def shard_rows(batch: Dict[str, torch.Tensor], rank: int, world_size: int) -> Dict[str, torch.Tensor]:
    """Rank r's contiguous rows of the global batch (sizes differ by at most one). The columns stay as in the
    global batch, so padding (and so every shape the kernels see per row) matches the single-process run."""
    n = batch["input_ids"].shape[0]
    if n < world_size:
        raise ValueError(f"batch_size {n} < world size {world_size}: every rank needs at least one row; raise "
                         "--batch-size")
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    return {k: v[lo:hi] for k, v in batch.items()}


def label_tokens(batch: Dict[str, torch.Tensor]) -> int:
    """The tokens transformers' causal-LM loss averages over: labels shifted by one, IGNORE_INDEX left out."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def check_model(model) -> Optional[str]:
    """Why the model cannot be trained data-parallel exactly here, or None."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "output_router_logits", False):
        return ("the model adds a router auxiliary loss (config.output_router_logits): it is a per-batch mean that "
                "does not split over ranks exactly; set output_router_logits=False to train under torchrun")
    return None
