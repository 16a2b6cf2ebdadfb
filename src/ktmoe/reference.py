"""The math of a routed-experts layer in plain PyTorch: a per-expert loop, autograd gives every gradient.

This is the yardstick the kernels are tested against (in fp32) and the "PyTorch path" the benchmark and
the training job compare with (in bf16)."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from .lora import LORA_NAMES


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

    gate_proj, up_proj: [E, I, H]; down_proj: [E, H, I]; lora: the six tensors named in ktmoe.lora.LORA_NAMES
    (shapes: ktmoe.lora.lora_shapes); scaling = lora_alpha / r."""
    if lora is not None:
        ga, gb, ua, ub, da, db = (lora[n] for n in LORA_NAMES)
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
            g = g + _lora(xe, ga[e], gb[e], scaling)
            u = u + _lora(xe, ua[e], ub[e], scaling)
        h = F.silu(g) * u
        d = h @ down_proj[e].t()
        if lora is not None:
            d = d + _lora(h, da[e], db[e], scaling)
        y = y.index_add(0, tok, d * weights[tok, slot].unsqueeze(1).to(d.dtype))
    return y
