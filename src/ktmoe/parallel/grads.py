"""Data parallelism done by hand (the training job; expert parallelism beside it): gradient reduction, the global
gradient norm, and optimizer state that holds whole tensors whatever the split."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence

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


def expert_parallel_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The model's expert-parallel experts modules (each holding one rank's block of a layer's experts)."""
    return [m for m in model.modules() if getattr(m, "expert_parallel", None) is not None]


def expert_parallel_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters that are one rank's block of an expert-parallel layer (not replicated over the ranks)."""
    return [p for m in expert_parallel_modules(model) for p in m.parameters(recurse=False)]


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


def clip_grad_norm_(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], max_norm: float,
                    group=None) -> float:
    """torch.nn.utils.clip_grad_norm_ over the whole model when some parameters are expert-parallel blocks: their
    squared norms are summed over the ranks (the replicated ones are equal on every rank after sync_gradients).
    Every rank must call it. Returns the total norm."""
    import torch.distributed as dist

    blocks = {id(p) for p in expert_parallel_parameters(model)}
    if not blocks:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p for p in params if p.grad is not None]
    squares = lambda ps: sum(float(p.grad.double().pow(2).sum()) for p in ps)  # noqa: E731
    block_sq = torch.tensor([squares(p for p in grads if id(p) in blocks)], dtype=torch.float64)
    dist.all_reduce(block_sq, group=group)
    total = math.sqrt(squares(p for p in grads if id(p) not in blocks) + float(block_sq))
    coef = min(1.0, max_norm / (total + 1e-6))
    for p in grads:
        p.grad.mul_(coef)
    return total


def _block_owners(model: torch.nn.Module) -> Dict[int, torch.nn.Module]:
    return {id(p): m for m in expert_parallel_modules(model) for p in m.parameters(recurse=False)}


def whole_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """optimizer.state_dict() with every expert-parallel block's per-parameter state (exp_avg, ...) gathered to the
    whole layer's tensor: the same state one process holds, whatever the number of ranks. A collective (every rank,
    the same order)."""
    from .expert_parallel import gather_blocks

    sd = optimizer.state_dict()
    owners = _block_owners(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        m = owners.get(id(p))
        if m is None or i not in sd["state"]:
            continue
        sd["state"][i] = {k: gather_blocks(v, m.expert_parallel) if torch.is_tensor(v) and v.shape == p.shape else v
                          for k, v in sd["state"][i].items()}
    return sd


def load_whole_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module, sd: dict) -> None:
    """The inverse of whole_optimizer_state: each rank keeps its blocks' part of the whole tensors."""
    owners = _block_owners(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = dict(sd["state"])
    for i, p in enumerate(params):
        m = owners.get(id(p))
        if m is None or i not in state:
            continue
        whole = (m.num_experts,) + tuple(p.shape[1:])
        state[i] = {k: m.own_block(v) if torch.is_tensor(v) and tuple(v.shape) == whole else v
                    for k, v in state[i].items()}
    optimizer.load_state_dict({**sd, "state": state})


__all__ = ["all_reduce_grads", "expert_parallel_modules", "expert_parallel_parameters", "sync_gradients", "clip_grad_norm_",
           "whole_optimizer_state", "load_whole_optimizer_state"]
