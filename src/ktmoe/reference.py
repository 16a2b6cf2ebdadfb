"""The math of a routed-experts layer in plain PyTorch: a per-expert loop, autograd gives every gradient.

This is the yardstick the kernels are tested against (in fp32) and the "PyTorch path" the benchmark and
the training job compare with (in bf16)."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F

LORA_NAMES = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")


def _lora(inp: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    return scaling * ((inp @ a.t()) @ b.t())


def moe_reference(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    lora: Optional[Mapping[str, torch.Tensor]] = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]); ids of -1 are skipped.

    gate_proj, up_proj: [E, I, H]; down_proj: [E, H, I]; lora: the six tensors named in LORA_NAMES
    ([E, r, H], [E, I, r], [E, r, H], [E, I, r], [E, r, I], [E, H, r]); scaling = lora_alpha / r."""
    y = torch.zeros_like(x)
    ids = expert_ids.long()
    for e in range(gate_proj.shape[0]):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        g = xe @ gate_proj[e].t()
        u = xe @ up_proj[e].t()
        if lora is not None:
            g = g + _lora(xe, lora["gate_lora_a"][e], lora["gate_lora_b"][e], scaling)
            u = u + _lora(xe, lora["up_lora_a"][e], lora["up_lora_b"][e], scaling)
        h = F.silu(g) * u
        d = h @ down_proj[e].t()
        if lora is not None:
            d = d + _lora(h, lora["down_lora_a"][e], lora["down_lora_b"][e], scaling)
        y = y.index_add(0, tok, d * weights[tok, slot].unsqueeze(1).to(d.dtype))
    return y
