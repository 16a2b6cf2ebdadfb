"""ktmoe's six LoRA tensors of a layer <-> PEFT's target_parameters LoRA of the fused expert tensors
(gate_up_proj [E, 2I, H] and down_proj [E, H, I]): the tensor layout both the adapter files and the experts
module's state dict use (see ktmoe.hf.adapter for the layout's description)."""
from __future__ import annotations

import math
from typing import Dict, Mapping, Tuple

import torch

from ..lora import LORA_NAMES


@torch.no_grad()
def expert_lora_to_peft(lora: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Six ktmoe LoRA tensors of one layer -> {"gate_up_proj": (A [E*2r, H], B [2I, 2r*E]),
    "down_proj": (A [E*r, I], B [H, r*E])} in PEFT's target_parameters layout (linear, exact; works for
    gradients too)."""
    Ag, Bg, Au, Bu, Ad, Bd = (lora[n].detach() for n in LORA_NAMES)
    E, r, H = Ag.shape
    I = Bg.shape[1]
    a_gu = torch.cat([Ag, Au], dim=1).reshape(E * 2 * r, H)
    b = Bg.new_zeros(E, 2 * I, 2 * r)
    b[:, :I, :r] = Bg
    b[:, I:, r:] = Bu
    b_gu = b.permute(1, 2, 0).reshape(2 * I, 2 * r * E)
    a_d = Ad.reshape(E * r, I)
    b_d = Bd.permute(1, 2, 0).reshape(H, r * E)
    # always fresh storage: a view of a live parameter would follow the training
    return {"gate_up_proj": (a_gu.clone(memory_format=torch.contiguous_format),
                             b_gu.clone(memory_format=torch.contiguous_format)),
            "down_proj": (a_d.clone(memory_format=torch.contiguous_format),
                          b_d.clone(memory_format=torch.contiguous_format))}


def _experts_major_b(b: torch.Tensor, E: int) -> torch.Tensor:
    """PEFT B [out, R*E] (rank-major columns) -> [E, out, R]."""
    out, RE = b.shape
    return b.reshape(out, RE // E, E).permute(2, 0, 1)


def _pad_rank(t: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    if t.shape[dim] == r:
        return t
    shape = list(t.shape)
    shape[dim] = r - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


@torch.no_grad()
def peft_to_expert_lora(gate_up: Tuple[torch.Tensor, torch.Tensor], down: Tuple[torch.Tensor, torch.Tensor], *,
                        num_experts: int, gate_up_scale: float, down_scale: float
                        ) -> Tuple[Dict[str, torch.Tensor], int, float, bool]:
    """PEFT target_parameters LoRA of one layer -> (six ktmoe tensors (fp32), rank, alpha, exact_layout).
    exact_layout: the adapter has ktmoe's own layout (rank 2r block-diagonal gate_up, rank r down, one scale),
    so the six tensors are the ones that were saved; otherwise an equivalent representation (see module doc)."""
    E = num_experts
    (a_gu, b_gu), (a_d, b_d) = [(a.detach().float(), b.detach().float()) for a, b in (gate_up, down)]
    if a_gu.shape[0] % E or a_d.shape[0] % E or b_gu.shape[1] != a_gu.shape[0] or b_d.shape[1] != a_d.shape[0]:
        raise ValueError(f"expert LoRA shapes do not fit {E} experts: gate_up A {tuple(a_gu.shape)}, B "
                         f"{tuple(b_gu.shape)}; down A {tuple(a_d.shape)}, B {tuple(b_d.shape)}")
    R, Rd = a_gu.shape[0] // E, a_d.shape[0] // E
    H, I2 = a_gu.shape[1], b_gu.shape[0]
    I = I2 // 2
    A = a_gu.reshape(E, R, H)
    B = _experts_major_b(b_gu, E)               # [E, 2I, R]
    Ad = a_d.reshape(E, Rd, a_d.shape[1])
    Bd = _experts_major_b(b_d, E)               # [E, H, Rd]
    same_scale = math.isclose(gate_up_scale, down_scale, rel_tol=1e-6)
    if R == 2 * Rd and same_scale and not B[:, :I, Rd:].any() and not B[:, I:, :Rd].any():
        r = Rd
        lora = dict(gate_lora_a=A[:, :r], gate_lora_b=B[:, :I, :r], up_lora_a=A[:, r:], up_lora_b=B[:, I:, r:],
                    down_lora_a=Ad, down_lora_b=Bd)
        exact = True
    else:
        r = max(R, Rd)
        s_ratio = down_scale / gate_up_scale
        lora = dict(gate_lora_a=_pad_rank(A, r, 1), gate_lora_b=_pad_rank(B[:, :I], r, 2),
                    up_lora_a=_pad_rank(A, r, 1), up_lora_b=_pad_rank(B[:, I:], r, 2),
                    down_lora_a=_pad_rank(Ad, r, 1), down_lora_b=_pad_rank(Bd * s_ratio, r, 2))
        exact = False
    lora = {n: lora[n].contiguous().clone() for n in LORA_NAMES}
    return lora, r, gate_up_scale * r, exact


def block_diagonal_mask(b_gu: torch.Tensor, num_experts: int) -> torch.Tensor:
    """1 where ktmoe's layout may be non-zero in a PEFT gate_up lora_B [2I, 2r*E], 0 on the off-diagonal blocks."""
    I2, RE = b_gu.shape
    I, rE = I2 // 2, RE // 2
    mask = torch.ones_like(b_gu)
    mask[:I, rE:] = 0
    mask[I:, :rE] = 0
    return mask
