"""The module that replaces a transformers MoE layer's routed experts: ktmoe on the CPU, LoRA as nn.Parameters.

`KTMoEHFExperts` is a `ktmoe.KTMoEExperts` (six fp32 LoRA parameters `gate_lora_a` ... `down_lora_b`, frozen
base weights packed by the native engine) with the call signature of transformers v5 experts modules:
`forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`. Inputs may live on any
device; the experts run on the CPU and the output comes back on the input's device and dtype.

Two differences from the plain `KTMoEExperts`:

* `.to()`, `.cuda()`, `.half()` on the model leave this module alone: the LoRA stays fp32 on the CPU, where the
  kernels read it in place (an optimizer step is seen by the next forward with no copy).
* Gradient checkpointing. transformers' default (`use_reentrant=False`) re-runs the layer in backward and
  hands the *recomputed* saved tensors to the original graph. `KTMoEFunction` keeps the native activations on
  `ctx`, which that mechanism cannot drop, so every checkpointed layer would hold its expert activations
  anyway. Here the activations are registered under a small handle tensor that goes through
  `ctx.save_for_backward`: without checkpointing the graph keeps the handle (and the activations) until
  backward; under checkpointing the handle is dropped at once, which releases the activations, and backward
  receives the recomputed handle. With `use_reentrant=True` the first pass runs without grad and saves nothing.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Dict, Optional

import torch

from ..reference import LORA_NAMES
from ..sft.autograd import KTMoEExperts

_SAVED: Dict[int, object] = {}
_KEYS = itertools.count(1)


def _drop(key: int) -> None:
    _SAVED.pop(key, None)


class _RoutedExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wrapper, hidden_states, expert_ids, weights, *lora):
        y, saved = wrapper._run_forward(hidden_states, expert_ids, weights, True)
        key = next(_KEYS)
        handle = torch.tensor([key], dtype=torch.int64)
        _SAVED[key] = saved
        weakref.finalize(handle, _drop, key)  # graph (or checkpoint) lets the handle go -> activations go
        ctx.save_for_backward(handle)
        ctx.wrapper = wrapper
        ctx.weights_dtype = weights.dtype
        ctx.lora_meta = [(p.dtype, p.device) for p in lora]
        return y

    @staticmethod
    def backward(ctx, grad_output):
        (handle,) = ctx.saved_tensors
        saved = _SAVED.pop(int(handle[0]), None)
        if saved is None:
            raise RuntimeError("ktmoe: backward through the same experts call twice (retain_graph is not "
                               "supported; recompute the forward instead)")
        grad_input, grads = ctx.wrapper._run_backward(saved, grad_output.contiguous())
        lora_grads = []
        for name, (dtype, device) in zip(LORA_NAMES, ctx.lora_meta):
            g = grads.get(name)
            lora_grads.append(None if g is None else g.to(dtype=dtype, device=device))
        return (None, grad_input, None, grads["weights"].to(ctx.weights_dtype), *lora_grads)


def live_saved_forwards() -> int:
    """How many expert forwards currently hold activations for a backward (for tests and diagnostics)."""
    return len(_SAVED)


class KTMoEHFExperts(KTMoEExperts):
    """Drop-in replacement for a transformers v5 routed-experts module (see the module docstring).

    Build it with `KTMoEHFExperts.from_module(experts, family=..., num_experts_per_tok=k, ...)`."""

    def __init__(self, gate_proj, up_proj, down_proj, *, num_experts_per_tok: int, lora_rank: int,
                 lora_alpha: float, source: str = "", **kwargs):
        super().__init__(gate_proj, up_proj, down_proj, num_experts_per_tok=num_experts_per_tok,
                         lora_rank=lora_rank, lora_alpha=lora_alpha, **kwargs)
        self.num_experts = self.wrapper.E
        self.hidden_dim = self.wrapper.H
        self.intermediate_dim = self.wrapper.I
        self.source = source  # class name of the module this replaced

    @classmethod
    def from_module(cls, module: torch.nn.Module, *, family, num_experts_per_tok: int, lora_rank: int,
                    lora_alpha: float, layer_idx: int = 0, generator: Optional[torch.Generator] = None,
                    **kwargs) -> "KTMoEHFExperts":
        gate, up, down = family.read_weights(module)
        gate, up, down = (t.to("cpu") for t in (gate, up, down))
        return cls(gate, up, down, num_experts_per_tok=num_experts_per_tok, lora_rank=lora_rank,
                   lora_alpha=lora_alpha, layer_idx=layer_idx, generator=generator,
                   source=type(module).__name__, **kwargs)

    @property
    def lora_rank(self) -> int:
        return self.wrapper.lora_rank

    @property
    def lora_alpha(self) -> float:
        return self.wrapper.lora_alpha

    @property
    def scaling(self) -> float:
        return self.wrapper.lora_scale

    def _apply(self, fn, recurse=True):
        # model.to(device / dtype) must not move the LoRA off the CPU or out of fp32 (see module docstring)
        return self

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        ids = top_k_index.reshape(x.shape[0], -1)
        w = top_k_weights.reshape(x.shape[0], -1)
        if ids.dtype not in (torch.int64, torch.int32):
            ids = ids.long()
        if w.dtype not in (torch.float32, torch.bfloat16):
            w = w.float()
        self._bind()
        params = self.lora_parameters
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or w.requires_grad or any(p.requires_grad for p in params))
        if not needs_grad:
            y, _ = self.wrapper._run_forward(x, ids, w, False)
        else:
            y = _RoutedExpertsFunction.apply(self.wrapper, x, ids, w, *params)
        return y.reshape(shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", replaces={self.source}" if self.source else "")
