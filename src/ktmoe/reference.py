"""The math of a routed-experts layer in plain PyTorch: a per-expert loop, autograd gives every gradient.

This is the yardstick the kernels are tested against (in fp32) and the "PyTorch path" the benchmark and
the training job compare with (in bf16)."""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from .lora import LORA_NAMES


def _lora(inp: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    return scaling * ((inp @ a.t()) @ b.t())


ACT_QUANT_MODES = (None, "int8")


def quantize_int8_per_row(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The W8A8 activation quantizer exactly as the kernels run it (kt_layer.act_quant in kernels/ktmoe.h),
    per row of `a` (the last dimension), symmetric and dynamic, in fp32: sa = max|a| / 127 (1 for an all-zero
    row), codes = round-half-even(a / sa) clamped to [-127, 127], both divisions fp32 divisions (not
    multiplications by a reciprocal), so that the C quantizer's codes and scales agree bit for bit.
    Returns (codes as fp32 [..., K], sa [..., 1])."""
    a = a.detach().float()
    amax = a.abs().amax(dim=-1, keepdim=True)
    sa = torch.where(amax > 0, amax / torch.tensor(127.0), torch.ones_like(amax))
    return torch.round(a / sa).clamp_(-127, 127), sa


def _int8_fake_quant(a: torch.Tensor) -> torch.Tensor:
    """The values the int8 products see (codes * scale, in a's dtype), detached."""
    q, sa = quantize_int8_per_row(a)
    return (q * sa).to(a.dtype)


def _bf16_stored_h(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The h the kernels store and quantize: bf16(silu(bf16(g)) * bf16(u)), as fp32."""
    gb, ub = g.to(torch.bfloat16).float(), u.to(torch.bfloat16).float()
    return (F.silu(gb) * ub).to(torch.bfloat16).float()


def moe_reference(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    lora: Optional[Mapping[str, torch.Tensor]] = None,
    scaling: float = 1.0,
    act_quant: Optional[str] = None,
) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]); ids of -1 are skipped.

    gate_proj, up_proj: [E, I, H]; down_proj: [E, H, I]; lora: the six tensors named in ktmoe.lora.LORA_NAMES
    (shapes: ktmoe.lora.lora_shapes); scaling = lora_alpha / r.

    act_quant="int8": the kernels' W8A8 forward (the wrappers' activation_quant="int8"). The base-weight
    products take x quantized per token and h quantized per (token, expert) pair over its whole
    intermediate row (quantize_int8_per_row); the LoRA terms take the unquantized x and h. What is
    quantized is what the kernels hold: x as given (the kernels' bf16 copy when the caller rounds x to
    bf16), and h as the kernels store it, bf16(silu(bf16(g)) * bf16(u)) (quantizing the fp32 h instead moves
    values across rounding boundaries: a one-step code difference on a few elements per row, about half
    the size of the whole quantization effect in rel-L2). Autograd sees the
    unquantized function at the quantized forward's g and u, as the kernels' backward does (a
    straight-through estimator): the quantization is the identity in backward, and the routing-weight
    gradient is <dy, the expert output with unquantized h>."""
    if act_quant not in ACT_QUANT_MODES:
        raise ValueError(f"act_quant must be one of {ACT_QUANT_MODES}, got {act_quant!r}")
    if lora is not None:
        ga, gb, ua, ub, da, db = (lora[n] for n in LORA_NAMES)
    y = torch.zeros_like(x)
    ids = expert_ids.long()
    xb = x if act_quant is None else x + (_int8_fake_quant(x) - x).detach()  # the base products' input
    for e in range(gate_proj.shape[0]):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe, xbe = x[tok], xb[tok]
        g = xbe @ gate_proj[e].t()
        u = xbe @ up_proj[e].t()
        if lora is not None:
            g = g + _lora(xe, ga[e], gb[e], scaling)
            u = u + _lora(xe, ua[e], ub[e], scaling)
        h = F.silu(g) * u
        d = h @ down_proj[e].t()
        if lora is not None:
            d = d + _lora(h, da[e], db[e], scaling)
        w = weights[tok, slot].unsqueeze(1).to(d.dtype)
        out = d * w
        if act_quant is not None:  # forward value: the int8 h in the base product; gradients: unquantized
            hd = h.detach()
            hq = _int8_fake_quant(_bf16_stored_h(g.detach(), u.detach())).to(hd.dtype)
            out = out + ((hq - hd) @ down_proj[e].detach().t() * w.detach()).detach()
        y = y.index_add(0, tok, out)
    return y
