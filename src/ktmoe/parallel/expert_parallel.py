"""Expert parallelism: each rank owns a contiguous block of every layer's routed experts; tokens travel to them.

One layer call on every rank of the group (all ranks call every layer, in the same order, as data-parallel
training does):

1. dispatch: each token goes once to each rank that owns at least one of its k experts, with its k expert ids
   (local to that rank, -1 where another rank owns the expert) and k routing weights (0 there);
   `all_to_all_single` with the row counts exchanged first (uneven splits);
2. the owner runs its experts on what it received (the native kernels skip id -1);
3. combine: each owner's weighted partial sums go back, and the home rank adds a token's partials.

Backward retraces the two exchanges: the output gradients go to the owners, which run the native backward
(their expert LoRA gradients stay with them: no reduction is needed, every rank's tokens contributed), and the
gradients of the inputs and routing weights come home. All of it is one autograd Function per layer call, so
the exchanges of the backward happen in the same order on every rank.

Exchange per layer call: forward, each token's hidden state to each distinct owner (H values in the
activations' dtype, plus k int32 ids and k weights) and back (H values); the backward, the same rows again."""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import torch

from ..torch_module import lora_grads_as, stash_saved, take_saved


def expert_blocks(num_experts: int, world_size: int) -> Tuple[int, ...]:
    """Boundaries (world_size + 1 of them) of contiguous expert blocks, one per rank: sizes differ by at most one,
    the first `num_experts % world_size` ranks one larger. With DeepSeek's group-limited routing (n_group groups
    of num_experts / n_group experts) and world_size dividing n_group, every block is whole groups."""
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if world_size > num_experts:
        raise ValueError(f"expert parallelism over {world_size} ranks needs at least as many experts, the model "
                         f"has {num_experts} per layer")
    base, extra = divmod(num_experts, world_size)
    bounds = [0]
    for r in range(world_size):
        bounds.append(bounds[-1] + base + (r < extra))
    return tuple(bounds)


@dataclasses.dataclass(frozen=True)
class ExpertPlacement:
    """Which rank owns which experts of a layer (global ids), and this rank's place in the group."""

    num_experts: int
    bounds: Tuple[int, ...]
    rank: int
    group: object = None  # the torch.distributed group of the exchange (None: the default group)

    @property
    def world_size(self) -> int:
        return len(self.bounds) - 1

    @property
    def first(self) -> int:
        return self.bounds[self.rank]

    @property
    def end(self) -> int:
        return self.bounds[self.rank + 1]

    @property
    def local_experts(self) -> int:
        return self.end - self.first

    def local_k(self, k: int) -> int:
        """Expert slots of a row this rank computes: of a token's k distinct experts at most local_experts are
        here."""
        return min(k, self.local_experts)

    def exchange_k(self, k: int) -> int:
        """Expert slots per exchanged row, the same for every rank (the largest block's local_k)."""
        return min(k, max(b - a for a, b in zip(self.bounds, self.bounds[1:])))

    def owner(self) -> torch.Tensor:
        """[num_experts] int64: the rank that owns each expert."""
        sizes = torch.tensor([b - a for a, b in zip(self.bounds, self.bounds[1:])])
        return torch.repeat_interleave(torch.arange(self.world_size), sizes)

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}: experts [{self.first}, {self.end}) of {self.num_experts}"


def exchange_group(process_group=None):
    """The group the exchanges run on: `process_group` (or the default group) when its backend moves CPU tensors
    (gloo), else a gloo group of the same ranks (a collective: every rank of the group must call this)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert_parallel=True needs torch.distributed initialised "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    group = process_group if process_group is not None else dist.group.WORLD
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend:
        return process_group
    ranks = dist.get_process_group_ranks(group)
    return dist.new_group(ranks=ranks, backend="gloo")


def placement(num_experts: int, group=None) -> ExpertPlacement:
    import torch.distributed as dist

    return ExpertPlacement(num_experts, expert_blocks(num_experts, dist.get_world_size(group)),
                           dist.get_rank(group), group)


# ------------------------------------------------------------------------------------------------ the exchange
_SENT = {"calls": 0, "bytes": 0, "remote_bytes": 0}  # what this process's exchanges sent (bench, diagnostics)


def exchange_stats(reset: bool = False) -> dict:
    """{"calls", "bytes", "remote_bytes"} sent by this process's all_to_all exchanges so far (remote: to other ranks;
    the rest is this rank's rows to itself, a local copy); reset=True starts the count again."""
    out = dict(_SENT)
    if reset:
        _SENT.update(calls=0, bytes=0, remote_bytes=0)
    return out


def _all_to_all(t: torch.Tensor, send: Sequence[int], recv: Sequence[int], group) -> torch.Tensor:
    import torch.distributed as dist

    out = t.new_empty((sum(recv),) + tuple(t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), list(recv), list(send), group=group)
    row = math.prod(t.shape[1:]) * t.element_size()
    _SENT["calls"] += 1
    _SENT["bytes"] += sum(send) * row
    _SENT["remote_bytes"] += (sum(send) - send[dist.get_rank(group)]) * row
    return out


@dataclasses.dataclass
class _Route:
    """Where one layer call's rows go: `token[s]` is the home token of sent row s, rows grouped by destination."""

    token: torch.Tensor          # [S] int64
    send: List[int]              # rows to each rank
    recv: List[int]              # rows from each rank
    slots: torch.Tensor          # [S, k_local] int64: the token's slot (column of its k) each sent column is
    used: torch.Tensor           # [S, k_local] bool: the column carries an expert (not -1)
    group: object = None


def _route(ids: torch.Tensor, pl: ExpertPlacement, owner: torch.Tensor, k_local: int):
    """(route, local ids [S, k_local] int32, -1 in unused columns) of one call; exchanges the row counts. A row
    carries the token's slots its destination owns, first, in slot order."""
    T, k = ids.shape
    ids = ids.long()
    if T and (int(ids.min()) < -1 or int(ids.max()) >= pl.num_experts):
        bad = ids[(ids < -1) | (ids >= pl.num_experts)][0]
        raise ValueError(f"expert_ids holds {int(bad)}, outside [-1, {pl.num_experts}) (global expert ids)")
    valid = ids >= 0
    own = torch.where(valid, owner[ids.clamp(min=0)], -1)                       # [T, k] rank of each slot
    goes = torch.zeros((T, pl.world_size + 1), dtype=torch.bool)
    goes.scatter_(1, own + 1, True)                                            # column 0: id -1 (nowhere)
    dest, token = goes[:, 1:].t().nonzero(as_tuple=True)                       # grouped by destination rank
    send = torch.bincount(dest, minlength=pl.world_size)
    recv = _all_to_all(send, [1] * pl.world_size, [1] * pl.world_size, pl.group)
    owned = own[token] == dest[:, None]
    n_owned = owned.sum(1)
    if len(token) and int(n_owned.max()) > k_local:
        s = int(n_owned.argmax())
        raise ValueError(f"expert_ids row {int(token[s])} names {int(n_owned[s])} experts of rank {int(dest[s])}, "
                         f"which owns {pl.bounds[int(dest[s]) + 1] - pl.bounds[int(dest[s])]}: the ids of a row must "
                         "be distinct")
    slots = torch.argsort((~owned).to(torch.int8), dim=1, stable=True)[:, :k_local]
    starts = torch.tensor(pl.bounds[:-1])
    keep = torch.gather(owned, 1, slots)
    local = torch.where(keep, torch.gather(ids[token], 1, slots) - starts[dest][:, None], -1).to(torch.int32)
    return _Route(token, send.tolist(), recv.tolist(), slots, keep, pl.group), local


def _dispatch(module, x, ids, w):
    """Step 1 of the module docstring: (route, rows received [R, H], their local ids [R, k], weights [R, k])."""
    pl = module.expert_parallel
    route, local = _route(ids, pl, module._ep_owner, pl.exchange_k(ids.shape[1]))
    send, recv, g = route.send, route.recv, pl.group
    x_in = _all_to_all(x[route.token], send, recv, g)
    w_rows = torch.where(route.used, torch.gather(w[route.token], 1, route.slots), 0)
    # a smaller block than the largest: the columns past its own k are empty (-1)
    k_here = module.wrapper.k
    ids_in = _all_to_all(local, send, recv, g)[:, :k_here].contiguous()
    w_in = _all_to_all(w_rows, send, recv, g)[:, :k_here].contiguous()
    return route, x_in, ids_in, w_in


class ExpertParallelFunction(torch.autograd.Function):
    """y = experts(x) with the experts spread over the group (see the module docstring). Inputs: the experts
    module (its native wrapper holds this rank's block), x [T, H], global ids [T, k], weights [T, k], the six
    local LoRA tensors."""

    @staticmethod
    def forward(ctx, module, x, ids, w, *lora):
        route, x_in, ids_in, w_in = _dispatch(module, x, ids, w)
        y_in, saved = module.wrapper._run_forward(x_in, ids_in, w_in, True)
        y = _combine(_all_to_all(y_in, route.recv, route.send, route.group), route.token, x.shape[0], x.dtype)
        ctx.k = ids.shape[1]
        ctx.save_for_backward(stash_saved(saved), *lora)
        ctx.module, ctx.route = module, route
        ctx.x_meta, ctx.w_dtype = (x.shape[0], x.dtype), w.dtype
        ctx.lora_meta = [(p.dtype, p.device) for p in lora]
        return y

    @staticmethod
    def backward(ctx, dy):
        handle, *lora = ctx.saved_tensors
        module, route = ctx.module, ctx.route
        g = route.group
        dy_in = _all_to_all(dy.contiguous()[route.token], route.send, route.recv, g)
        dx_in, grads = module.wrapper._run_backward(take_saved(handle), dy_in, lora=lora or None)
        T, dtype = ctx.x_meta
        dx = _combine(_all_to_all(dx_in, route.recv, route.send, g), route.token, T, dtype)
        dw_here = grads["weights"].to(torch.float32)
        dw_sent = dw_here.new_zeros((dw_here.shape[0], route.slots.shape[1]))
        dw_sent[:, :dw_here.shape[1]] = dw_here
        dw_back = _all_to_all(dw_sent, route.recv, route.send, g)
        # each slot's weight went to one rank only: its gradient is that rank's (unused columns give 0)
        dw_rows = torch.zeros((len(route.token), ctx.k), dtype=torch.float32)
        dw_rows.scatter_add_(1, route.slots, torch.where(route.used, dw_back, 0))
        dw = _combine(dw_rows, route.token, T, ctx.w_dtype)
        return (None, dx, None, dw, *lora_grads_as(grads, ctx.lora_meta))


def _combine(rows: torch.Tensor, token: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """Sums the rows that came back for each home token (in fp32), in `dtype`."""
    out = torch.zeros((T,) + tuple(rows.shape[1:]), dtype=torch.float32)
    out.index_add_(0, token, rows.float())
    return out if dtype is torch.float32 else out.to(dtype)


def forward_no_grad(module, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, run) -> torch.Tensor:
    """The forward alone (no autograd record): `run(x, local_ids, weights)` computes this rank's block."""
    route, x_in, ids_in, w_in = _dispatch(module, x, ids, w)
    return _combine(_all_to_all(run(x_in, ids_in, w_in), route.recv, route.send, route.group), route.token,
                    x.shape[0], x.dtype)


# ------------------------------------------------------------------------------------------------ LoRA blocks
def gather_blocks(t: torch.Tensor, pl: ExpertPlacement) -> torch.Tensor:
    """This rank's block [local, ...] of a per-expert tensor -> the whole tensor [num_experts, ...] on every rank
    (a collective: every rank of the group must call it, in the same order)."""
    import torch.distributed as dist

    most = max(b - a for a, b in zip(pl.bounds, pl.bounds[1:]))
    pad = t.new_zeros((most,) + tuple(t.shape[1:]))
    pad[:t.shape[0]] = t
    parts = [torch.empty_like(pad) for _ in range(pl.world_size)]
    dist.all_gather(parts, pad.contiguous(), group=pl.group)
    return torch.cat([p[:b - a] for p, a, b in zip(parts, pl.bounds, pl.bounds[1:])])


__all__ = ["exchange_stats", "ExpertPlacement", "ExpertParallelFunction", "expert_blocks", "exchange_group", "placement",
           "gather_blocks", "forward_no_grad"]
