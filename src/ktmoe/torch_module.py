"""PyTorch binding: an autograd.Function over forward_sft/backward, and an nn.Module owning the LoRA.

`loss.backward()` reaches hidden states, routing weights and the six LoRA parameters. The native side
reads the LoRA parameters in place (fp32, CPU, contiguous), so an optimizer step is seen by the next
forward without any sync call; parameters kept elsewhere (GPU, bf16) are copied at each forward."""
from __future__ import annotations

import itertools
import math
import weakref
from typing import Dict, Optional

import torch
from torch import nn

from .experts import KTMoEWrapper
from .lora import LORA_NAMES
from .sft.base import BaseSFTMoEWrapper


# Activations of forwards waiting for their backward, keyed by the id stored in a small handle tensor.
_SAVED: Dict[int, object] = {}
_KEYS = itertools.count(1)


def _drop(key: int) -> None:
    _SAVED.pop(key, None)


def live_saved_forwards() -> int:
    """How many expert forwards currently hold activations for a backward (tests and diagnostics)."""
    return len(_SAVED)


def stash_saved(saved) -> torch.Tensor:
    """A one-element handle tensor for a forward's native activations: they live as long as the handle (give it to
    ctx.save_for_backward), or until `take_saved` hands them to the backward."""
    key = next(_KEYS)
    handle = torch.tensor([key], dtype=torch.int64)
    _SAVED[key] = saved
    weakref.finalize(handle, _drop, key)
    return handle


def take_saved(handle: torch.Tensor):
    saved = _SAVED.pop(int(handle[0]), None)
    if saved is None:
        raise RuntimeError("ktmoe: backward through the same experts call twice (retain_graph is not "
                           "supported; recompute the forward instead)")
    return saved


def lora_grads_as(grads: Dict[str, torch.Tensor], meta) -> list:
    """The six LoRA grads of a native backward in the dtype / device of the parameters they are for."""
    out = []
    for name, (dtype, device) in zip(LORA_NAMES, meta):
        g = grads.get(name)
        out.append(None if g is None else g.to(dtype=dtype, device=device))
    return out


def flatten_routing(hidden_states: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor):
    """[..., H], [..., k], [..., k] -> [T, H], [T, k] int ids, [T, k] fp32/bf16 weights (what the wrapper takes)."""
    for name, t in (("hidden_states", hidden_states), ("expert_ids", expert_ids), ("weights", weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"{name} must have at least one dimension, got a 0-dim tensor")
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    T = x.shape[0]
    try:  # the last dim is k; the leading dims must hold the same tokens as hidden_states'
        ids = expert_ids.reshape(T, expert_ids.shape[-1]) if T == 0 else expert_ids.reshape(T, -1)
        w = weights.reshape(T, weights.shape[-1]) if T == 0 else weights.reshape(T, -1)
    except RuntimeError:
        raise ValueError(f"expert_ids {tuple(expert_ids.shape)} and weights {tuple(weights.shape)} must have "
                         f"the leading shape of hidden_states {tuple(hidden_states.shape[:-1])} plus k") from None
    if ids.dtype not in (torch.int64, torch.int32):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype is torch.bool:
            raise ValueError(f"expert_ids must be an integer tensor (int64 or int32), got {ids.dtype}: float ids "
                             "would be truncated silently; pass the router's topk indices")
        ids = ids.long()
    if w.dtype not in (torch.float32, torch.bfloat16):
        w = w.float()
    return x, ids, w


class KTMoEFunction(torch.autograd.Function):
    """y = experts(hidden_states); grads for hidden_states, weights and the six LoRA tensors.

    The native activations hang on a one-element handle tensor that goes through save_for_backward, so
    they live exactly as long as autograd keeps the handle: until backward without checkpointing; under
    non-reentrant gradient checkpointing the handle is dropped after the forward (releasing the
    activations) and backward receives the recomputed forward's handle."""

    @staticmethod
    def forward(ctx, wrapper: BaseSFTMoEWrapper, hidden_states, expert_ids, weights, *lora):
        y, saved = wrapper._run_forward(hidden_states, expert_ids, weights, True)
        handle = stash_saved(saved)
        # the LoRA tensors too: backward binds the ones autograd hands back, valid at backward time even when
        # their storage moved since the forward (FSDP2 frees it at reshard and re-gathers it for backward)
        ctx.save_for_backward(handle, *lora)
        ctx.wrapper = wrapper
        ctx.weights_dtype = weights.dtype
        ctx.lora_meta = [(p.dtype, p.device) for p in lora]
        return y

    @staticmethod
    def backward(ctx, grad_output):
        handle, *lora = ctx.saved_tensors
        saved = take_saved(handle)
        grad_input, grads = ctx.wrapper._run_backward(saved, grad_output.contiguous(), lora=lora or None)
        return (None, grad_input, None, grads["weights"].to(ctx.weights_dtype), *lora_grads_as(grads, ctx.lora_meta))


class KTMoEExperts(nn.Module):
    """The routed experts of one layer on the CPU, with trainable LoRA as nn.Parameters.

    gate_proj, up_proj: [E, I, H]; down_proj: [E, H, I] (frozen). forward(hidden_states [T, H],
    expert_ids [T, k], weights [T, k]) -> [T, H]. LoRA A matrices start like PEFT's (Kaiming-uniform),
    B matrices at zero, so the layer starts equal to the frozen experts."""

    def __init__(self, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor, *,
                 num_experts_per_tok: int, lora_rank: int = 16, lora_alpha: float = 32.0,
                 method: str = "AMXBF16_SFT", layer_idx: int = 0, generator: Optional[torch.Generator] = None,
                 **wrapper_kwargs):
        super().__init__()
        if gate_proj.dim() != 3 or down_proj.dim() != 3:
            raise ValueError(f"gate_proj must be [E, I, H] and down_proj [E, H, I], got "
                             f"{tuple(gate_proj.shape)} and {tuple(down_proj.shape)}")
        E, I, H = gate_proj.shape
        self.wrapper = KTMoEWrapper(mode="sft", method=method, layer_idx=layer_idx, num_experts=E,
                                    num_experts_per_tok=num_experts_per_tok, hidden_size=H,
                                    moe_intermediate_size=I, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                    **wrapper_kwargs)
        self.wrapper.load_weights_from_tensors(gate_proj, up_proj, down_proj)
        for name, shape in self.wrapper.lora_shapes().items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=torch.float32)))
        self.reset_lora_parameters(generator)
        self._bound: tuple = ()

    @property
    def lora_parameters(self):
        return [getattr(self, n) for n in LORA_NAMES]

    @torch.no_grad()
    def reset_lora_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        for name in LORA_NAMES:
            p = getattr(self, name)
            if name.endswith("_a"):
                bound = 1.0 / math.sqrt(p.shape[-1])  # kaiming_uniform_(a=sqrt(5)) as nn.Linear / PEFT
                self._draw_uniform(p, bound, generator)
            else:
                p.zero_()

    def _draw_uniform(self, p: torch.Tensor, bound: float, generator: Optional[torch.Generator]) -> None:
        p.uniform_(-bound, bound, generator=generator)

    def _bind(self) -> None:
        if self.wrapper.lora_rank == 0:  # frozen experts: nothing to bind
            return
        params = self.lora_parameters
        in_place = all(p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() for p in params)
        key = tuple(p.data_ptr() for p in params)
        if in_place and key == self._bound:
            return
        self.wrapper.init_lora_weights(*params)
        self._bound = key if in_place else ()

    def forward(self, hidden_states: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [..., H], expert_ids [..., k], weights [..., k] -> [..., H]."""
        shape = hidden_states.shape
        x, ids, w = flatten_routing(hidden_states, expert_ids, weights)
        self._bind()
        params = self.lora_parameters
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or w.requires_grad or any(p.requires_grad for p in params))
        if not needs_grad:
            y, _ = self.wrapper._run_forward(x, ids, w, False)
        else:
            y = KTMoEFunction.apply(self.wrapper, x, ids, w, *params)
        return y.reshape(shape)

    def extra_repr(self) -> str:
        w = self.wrapper
        return f"method={w.method}, E={w.E}, k={w.k}, H={w.H}, I={w.I}, r={w.lora_rank}, alpha={w.lora_alpha}"
