"""DistributedDataParallel for a model whose routed experts run on the CPU while the rest is on the GPU.

After `model.to("cuda")` the ktmoe experts keep their LoRA parameters in fp32 on the CPU, where the kernels read
them, and `torch.nn.parallel.DistributedDataParallel` refuses a module whose parameters span device types.
`distributed_data_parallel(model, **ddp_kwargs)` builds the DDP with those parameters in its ignore list and
all-reduces their gradients itself, with DDP's semantics:

* averaged over the process group (divided by its size before the sum, as DDP's buckets are), so training equals
  plain DDP and one process on the combined batch with a mean loss;
* launched asynchronously as each gradient is accumulated (overlapping the rest of the backward), in one fixed
  order on every rank, and waited for at the end of the backward: the optimizer step sees reduced gradients;
* skipped under `ddp.no_sync()` (decided at forward time, like DDP): the locally accumulated gradients are
  reduced by the next synced backward;
* broadcast from rank 0 at construction (unless `init_sync=False`), as DDP does with its own parameters.

Gradient checkpointing (reentrant or not) and PEFT-wrapped models work. A parameter that got no gradient on a
rank in a synced backward counts as zeros there (its `.grad` becomes the average of the others').

The gradients are reduced over a gloo group of their own (CPU tensors; and DDP's bucket all-reduces, launched as
the buckets fill, would interleave with these in a rank-dependent order on a shared group). With DDP on the
default group (NCCL or gloo) one is created over all ranks (a collective: every rank calls this function anyway);
with DDP on another group pass `experts_group=dist.new_group(<the same ranks>, backend="gloo")`.
"""
from __future__ import annotations

import weakref
from typing import List, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.parallel.distributed import _find_tensors

from ..torch_module import KTMoEExperts
from .grads import expert_parallel_modules

# model -> the reducer of the last DDP built over it (the reducer holds neither the model nor its DDP)
_REDUCERS: "weakref.WeakKeyDictionary[nn.Module, ExpertGradReducer]" = weakref.WeakKeyDictionary()


def _cpu_expert_tensors(model: nn.Module) -> Tuple[List[Tuple[str, nn.Parameter]], List[str]]:
    """([(name, parameter)], [buffer name]) of the ktmoe experts modules' tensors that live on the CPU, under
    the names DDP sees (`model.named_parameters()`, shared tensors once)."""
    ids = set()
    for m in model.modules():
        if isinstance(m, KTMoEExperts):
            ids.update(id(t) for t in m.parameters())
            ids.update(id(t) for t in m.buffers())
    params = [(n, p) for n, p in model.named_parameters() if id(p) in ids and p.device.type == "cpu"]
    buffers = [n for n, b in model.named_buffers() if id(b) in ids and b.device.type == "cpu"]
    return params, buffers


def _has_cpu_backend(group) -> bool:
    # the config reads "cpu:gloo,cuda:gloo", "cuda:nccl", "cpu:gloo,cuda:nccl", ...
    return any(pair.split(":")[0] == "cpu" for pair in dist.get_backend_config(group).split(","))


def _experts_group(ddp_group, experts_group):
    """A group of the experts' own for DDP's ranks: collectives on one group must come in the same order on every
    rank, and DDP launches its buckets as they fill, so sharing its group would interleave the two rank-dependently."""
    if experts_group is None:
        if ddp_group is not dist.group.WORLD:
            raise ValueError("DDP's process_group is not the default group: pass experts_group=dist.new_group("
                             "<its ranks>, backend='gloo') for the CPU expert LoRA gradients (new_group is a "
                             "collective over all ranks, so it is not made here)")
        return dist.new_group(backend="gloo")
    if experts_group is ddp_group:
        raise ValueError("experts_group must be a group of its own, not DDP's process_group (their collectives "
                         "would interleave in a different order on each rank)")
    if not _has_cpu_backend(experts_group):
        raise ValueError(f"experts_group has no CPU backend ({dist.get_backend_config(experts_group)}): the "
                         "expert LoRA gradients are CPU tensors; pass a gloo group")
    ranks, ddp_ranks = (dist.get_process_group_ranks(g) for g in (experts_group, ddp_group))
    if sorted(ranks) != sorted(ddp_ranks):
        raise ValueError(f"experts_group holds ranks {sorted(ranks)}, DDP's process group {sorted(ddp_ranks)}: they "
                         "must be the same")
    return experts_group


class ExpertGradReducer:
    """All-reduces the gradients of the CPU experts' parameters of one DDP module (see the module docstring).

    `names`: the parameters it reduces (in DDP's ignore list); `group`: the process group it reduces over."""

    def __init__(self, ddp: DistributedDataParallel, params: List[Tuple[str, nn.Parameter]], group):
        self.group = group
        self.names = [n for n, _ in params]
        # the backward reaches the last layer first: launching in reverse model order rarely waits
        self._order = params[::-1]
        self._params = [p for _, p in self._order]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._world = dist.get_world_size(group)
        self._armed = False    # the last forward asked for a synced backward (DDP decides at forward time too)
        self._active = False   # the running backward reduces
        self._ready: List[bool] = []
        self._next = 0         # every rank launches in the same order: index of the next one to launch
        self._works: list = []
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]
        self._handles.append(ddp.register_forward_pre_hook(self._on_forward))
        self._handles.append(ddp.register_forward_hook(self._after_forward))

    def remove(self) -> None:
        """Detaches the hooks: the experts' gradients are no longer reduced (done when the model is wrapped again)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def broadcast_from_rank0(self) -> None:
        for p in self._params:  # in place: the native layers read the parameters' storage
            dist.broadcast(p.data, group=self.group, group_src=0)

    # ------------------------------------------------------------------ hooks
    def _on_forward(self, module, args) -> None:
        if self._active:  # the previous backward stopped before its end (an exception): start afresh
            self._active = False
            self._works = []
        if torch.is_grad_enabled():  # a no_grad forward (evaluation) leaves the pending decision alone
            self._armed = module.require_backward_grad_sync

    def _after_forward(self, module, args, output) -> None:
        if not (torch.is_grad_enabled() and self._armed):
            return
        # the backward through any output starts at the outermost graph task, so the end-of-backward callback is
        # queued there (not inside a reentrant checkpoint's nested backward)
        for t in _find_tensors(output):
            if t.requires_grad:
                t.register_hook(self._begin_hook)

    def _begin_hook(self, grad):
        self._begin()

    def _begin(self) -> None:
        if self._active or not self._armed:
            return
        self._armed = False  # one reduction per synced forward, as DDP
        self._active = True
        self._ready = [False] * len(self._params)
        self._next = 0
        self._works = []
        torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _on_grad(self, p: nn.Parameter) -> None:
        self._begin()  # a loss reached without the output tensors (a custom output type)
        if not self._active:  # no_sync(), or no grad sync asked: the gradients accumulate locally
            return
        i = self._index[id(p)]
        if self._ready[i]:
            raise RuntimeError(f"{self._order[i][0]} got a second gradient in one backward (its experts module "
                               "ran twice in one forward): its all-reduce was already launched")
        self._ready[i] = True
        while self._next < len(self._params) and self._ready[self._next]:
            self._launch(self._next)

    @torch.no_grad()
    def _launch(self, i: int) -> None:
        p = self._params[i]
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
        p.grad.div_(self._world)
        self._works.append(dist.all_reduce(p.grad, group=self.group, async_op=True))
        self._next = i + 1

    def _finish(self) -> None:
        while self._next < len(self._params):  # no gradient this backward (or unused): still reduced, in order
            self._launch(self._next)
        for w in self._works:
            w.wait()
        self._works = []
        self._active = False


def distributed_data_parallel(model: nn.Module, *, experts_group=None, **ddp_kwargs) -> DistributedDataParallel:
    """`DistributedDataParallel(model, **ddp_kwargs)` with the CPU experts' parameters left out of DDP and their
    gradients all-reduced by an `ExpertGradReducer` (the returned module's `expert_grads`), overlapped with the
    backward. `model` is the converted model (a PeftModel from `ktmoe.hf.add_lora` too), with everything but the
    experts on one device type (e.g. `model.to("cuda")`; all on the CPU works too, then it equals plain DDP).

    `ddp_kwargs` go to DDP unchanged (device_ids, process_group, find_unused_parameters, ...). `experts_group`:
    the gloo group the expert gradients are reduced over, with DDP's ranks and not DDP's group itself (default: a
    new one when DDP uses the default group; see the module docstring)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distributed_data_parallel() needs torch.distributed initialised "
                           "(dist.init_process_group) first")
    if isinstance(model, DistributedDataParallel):
        raise ValueError("distributed_data_parallel() got a DistributedDataParallel: pass the model itself")
    if expert_parallel_modules(model):
        raise ValueError("distributed_data_parallel(): the model's experts are expert-parallel (each rank holds a "
                         "different block, whose gradients are complete on their owner): do not all-reduce them; "
                         "reduce the replicated gradients with ktmoe.parallel.sync_gradients(model) instead")
    params, buffers = _cpu_expert_tensors(model)
    if not params:
        raise ValueError("distributed_data_parallel(): the model has no ktmoe experts with parameters on the CPU "
                         "(convert it with ktmoe.hf.convert_model first, or use DistributedDataParallel directly)")
    ignored = {n for n, _ in params} | set(buffers)
    if not any(p.requires_grad for n, p in model.named_parameters() if n not in ignored):
        raise ValueError("distributed_data_parallel(): no parameter outside the routed experts requires a gradient, "
                         "and DistributedDataParallel refuses a module with nothing to train; train something "
                         "besides the expert LoRA (e.g. ktmoe.hf.add_lora's attention LoRA)")
    mesh = ddp_kwargs.get("device_mesh")  # DDP's group, as DDP picks it (checked before anything is built)
    ddp_group = ddp_kwargs.get("process_group") or (mesh.get_group(mesh_dim=0) if mesh is not None
                                                    else dist.group.WORLD)
    group = _experts_group(ddp_group, experts_group)
    ignored |= set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignored))
    ddp = DistributedDataParallel(model, **ddp_kwargs)
    previous = _REDUCERS.get(model)
    if previous is not None:  # wrapped again: the old reducer's hooks would reduce a second time
        previous.remove()
    reducer = ExpertGradReducer(ddp, [(n, p) for n, p in params if p.requires_grad], group)
    if ddp_kwargs.get("init_sync", True):
        reducer.broadcast_from_rank0()
    _REDUCERS[model] = reducer
    ddp.expert_grads = reducer
    return ddp
