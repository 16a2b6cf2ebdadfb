"""The module that replaces a transformers MoE layer's routed experts: ktmoe on the CPU, LoRA as nn.Parameters.

`KTMoEHFExperts` is a `ktmoe.KTMoEExperts` (six fp32 LoRA parameters `gate_lora_a` ... `down_lora_b`, frozen
base weights packed by the native engine) with the call signature of transformers v5 experts modules:
`forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`. Inputs may live on any
device; the experts run on the CPU and the output comes back on the input's device and dtype.

Differences from the plain `KTMoEExperts`:

* `.to()`, `.cuda()`, `.half()` on the model leave this module alone: the LoRA stays fp32 on the CPU, where the
  kernels read it in place (an optimizer step is seen by the next forward with no copy).
* It takes transformers' argument names (top_k_index, top_k_weights). Gradient checkpointing works as for
  `KTMoEExperts` (see `ktmoe.torch_module.KTMoEFunction`).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..torch_module import KTMoEExperts, live_saved_forwards  # noqa: F401 (re-exported for tests)


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
        return super().forward(hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", replaces={self.source}" if self.source else "")
