"""ktmoe's six LoRA tensors of a layer <-> PEFT's target_parameters LoRA of the fused expert tensors
(gate_up_proj [E, 2I, H] and down_proj [E, H, I]): the tensor layout both the adapter files and the experts
module's state dict use (see ktmoe.hf.adapter for the layout's description).

Two orientations exist. "Canonical" (peft >= 0.19, e.g. 0.21): for a parameter [E, out, in] lora_A reads `in`
(gate_up A [E*R, H], B [2I, R*E]). "Swapped" (peft 0.18): ParamWrapper takes a 3-D parameter as [E, in, out],
so lora_A reads the parameter's dim 1 (gate_up A [E*R, 2I], B [H, R*E]) and delta_e = (B_e A_e)^T. The same
LoRA converts exactly between them (`swap_orientation`). Which one the installed PEFT uses is probed from PEFT
itself (`peft_swaps`); which one an adapter file holds is read from its tensor shapes (`identify_layer`)."""
from __future__ import annotations

import functools
import math
import warnings
from typing import Dict, Mapping, Optional, Tuple

import torch

from ..lora import LORA_NAMES


def swap_orientation(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A [E*R, in], B [out, R*E]) -> (A' [E*R, out], B' [in, R*E]) with B'_e A'_e = (B_e A_e)^T: the canonical
    <-> swapped orientation (an involution, so it converts both ways)."""
    E = num_experts
    R = a.shape[0] // E
    a2 = b.reshape(b.shape[0], R, E).permute(2, 1, 0).reshape(E * R, b.shape[0])
    b2 = a.reshape(E, R, a.shape[1]).permute(2, 1, 0).reshape(a.shape[1], R * E)
    return a2, b2


@functools.lru_cache(maxsize=None)
def peft_swaps(is_transposed: bool = False) -> bool:
    """Whether the installed PEFT's target_parameters LoRA of a fused experts tensor (`is_transposed` as the
    experts module says) is in the swapped orientation: probed on a [1, 2, 3] parameter through PEFT's public
    `inject_adapter_in_model`, so it follows PEFT's behaviour, not its version number."""
    import peft
    from torch import nn

    root = nn.Module()
    root.experts = nn.Module()
    root.experts.w = nn.Parameter(torch.zeros(1, 2, 3))
    root.experts.is_transposed = is_transposed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.inject_adapter_in_model(peft.LoraConfig(r=1, lora_alpha=1, target_modules=[],
                                                     target_parameters=["experts.w"]), root)
    reads = root.experts.lora_A["default"].weight.shape[1]
    # the parameter's input dim is dim 2 ([E, out, in]), or dim 1 when transposed ([E, in, out])
    return reads != (2 if is_transposed else 3)


def _oriented(pair: Tuple[torch.Tensor, torch.Tensor], E: int, swapped: bool):
    return swap_orientation(*pair, E) if swapped else pair


def identify_layer(p: Tuple[torch.Tensor, torch.Tensor], q: Tuple[torch.Tensor, torch.Tensor], *, hidden: int,
                   intermediate: Optional[int] = None, num_experts: int, prefer_swapped: Optional[bool] = None):
    """Two PEFT (A, B) pairs of one experts module (p: the inner wrapper's, gate_up_proj in PEFT's nesting) ->
    (gate_up, down, swapped), told apart by their shapes against H (and I when known); both in the canonical
    orientation. Raises when the shapes fit no layout."""
    E = num_experts
    for a, b in (p, q):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] % E or b.shape[1] != a.shape[0]:
            raise ValueError(f"expert LoRA shapes do not fit {E} experts: A {tuple(a.shape)}, B {tuple(b.shape)}")
    fits = []
    for gu, dn in ((p, q), (q, p)):
        for swapped in (False, True):
            (ag, bg), (ad, bd) = _oriented(gu, num_experts, swapped), _oriented(dn, num_experts, swapped)
            I = ad.shape[1]
            if (ag.shape[1] == hidden and bd.shape[0] == hidden and bg.shape[0] == 2 * I
                    and (intermediate is None or I == intermediate)):
                fits.append(((ag, bg), (ad, bd), swapped))
    if not fits:
        raise ValueError(f"expert LoRA shapes fit no PEFT layout of hidden size {hidden}"
                         f"{'' if intermediate is None else f', intermediate size {intermediate}'}: "
                         f"{[tuple(t.shape) for t in (*p, *q)]}")
    if prefer_swapped is not None:
        fits.sort(key=lambda f: f[2] != prefer_swapped)  # stable: PEFT's nesting order first
    return fits[0]


@torch.no_grad()
def expert_lora_to_peft(lora: Mapping[str, torch.Tensor], *, swapped: bool = False
                        ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Six ktmoe LoRA tensors of one layer -> {"gate_up_proj": (A [E*2r, H], B [2I, 2r*E]),
    "down_proj": (A [E*r, I], B [H, r*E])} in PEFT's target_parameters layout (linear, exact; works for
    gradients too); with swapped, in the swapped orientation (see the module docstring)."""
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
    if swapped:
        (a_gu, b_gu), (a_d, b_d) = swap_orientation(a_gu, b_gu, E), swap_orientation(a_d, b_d, E)
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


def block_diagonal_mask(b_gu: torch.Tensor, num_experts: int, *, swapped: bool = False) -> torch.Tensor:
    """1 where ktmoe's layout may be non-zero in a PEFT gate_up lora_B [2I, 2r*E], 0 on the off-diagonal blocks.
    With swapped, the tensor given is the swapped orientation's gate_up lora_A [E*2r, 2I] (where those blocks
    live there) and the mask has its shape."""
    if swapped:
        RE, I2 = b_gu.shape
        canon = block_diagonal_mask(b_gu.new_ones(I2, RE), num_experts)
        # the canonical B becomes the swapped A (swap_orientation's first output)
        return canon.reshape(I2, RE // num_experts, num_experts).permute(2, 1, 0).reshape(RE, I2)
    I2, RE = b_gu.shape
    I, rE = I2 // 2, RE // 2
    mask = torch.ones_like(b_gu)
    mask[:I, rE:] = 0
    mask[I:, :rE] = 0
    return mask
