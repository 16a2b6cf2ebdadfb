"""Gradient reduction for data parallelism done by hand (the training job, expert parallelism beside it)."""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch


def all_reduce_grads(params: Iterable[torch.nn.Parameter], *, average: bool = False, group=None) -> None:
    """Sums (average=True: averages) every parameter's gradient over the ranks, one flat buffer per dtype (a
    missing grad counts as zero, so every rank sends the same layout)."""
    import torch.distributed as dist

    groups: Dict[torch.dtype, List[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault(p.grad.dtype, []).append(p)
    world = dist.get_world_size(group)
    for ps in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dist.all_reduce(flat, group=group)
        if average:
            flat /= world
        off = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[off:off + n].view_as(p.grad))
            off += n


def expert_parallel_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters that are one rank's block of an expert-parallel layer (not replicated over the ranks)."""
    out: List[torch.nn.Parameter] = []
    for m in model.modules():
        if getattr(m, "expert_parallel", None) is not None:
            out.extend(m.parameters(recurse=False))
    return out


def sync_gradients(model: torch.nn.Module, *, average: bool = True, group=None) -> None:
    """Data parallelism beside expert parallelism, after `loss.backward()` on every rank: the replicated trainable
    parameters' gradients are summed over the ranks, the expert-parallel blocks' stay where they are (their owner
    already holds every rank's contribution). average=True is DDP's convention (each rank's loss a mean over its
    own batch): every gradient is divided by the world size, the blocks' too. average=False suits a loss already
    normalised by the global token count (as `python -m ktmoe.train` does)."""
    import torch.distributed as dist

    blocks = expert_parallel_parameters(model)
    ids = {id(p) for p in blocks}
    all_reduce_grads([p for p in model.parameters() if p.requires_grad and id(p) not in ids], average=average,
                     group=group)
    if average:
        world = dist.get_world_size(group)
        for p in blocks:
            if p.grad is not None:
                p.grad /= world


__all__ = ["all_reduce_grads", "expert_parallel_parameters", "sync_gradients"]
