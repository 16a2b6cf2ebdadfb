"""Adopting compressed-tensors `pack-quantized` int4 checkpoints (Kimi-K2's routed experts) bit for bit.

The layout, per linear (checked against compressed-tensors' own packer): `weight_packed` int32
[out, ceil(in / 8)], eight 4-bit codes per int32 along the input dimension, code j of a word in bits
4j .. 4j + 3 (low nibble first), each stored unsigned as value + 8 (symmetric: value = code - 8 in
[-8, 7]); `weight_scale` [out, in / group] (bf16 or fp16); `weight_shape` [2] = (out, in). The checkpoint's
dequantization is value * scale in the scale's dtype; ktmoe's int4 formats compute bf16(fp32(scale) *
value), which is the same number for bf16 scales (the product of an 8-bit significand and a value of at
most 4 bits is exact in fp32, so only the final rounding to bf16 remains)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import Packed, WeightFormat

CODES_PER_WORD = 8


def unpack_int4(weight_packed: torch.Tensor, weight_shape: Sequence[int], *, name: str = "weight_packed"
                ) -> torch.Tensor:
    """int32 [..., out, ceil(in / 8)] -> the signed int4 values, int8 [..., out, in] in [-8, 7]."""
    if weight_packed.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 (eight 4-bit codes a word), got {weight_packed.dtype}")
    shape = [int(v) for v in (weight_shape.tolist() if isinstance(weight_shape, torch.Tensor) else weight_shape)]
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"weight_shape must be (out, in) of positive ints, got {shape}")
    out, cols = shape
    words = -(-cols // CODES_PER_WORD)
    if tuple(weight_packed.shape[-2:]) != (out, words):
        raise ValueError(f"{name} has shape {tuple(weight_packed.shape)}, but weight_shape {tuple(shape)} packs "
                         f"into [..., {out}, {words}] int32 words")
    shifts = torch.arange(CODES_PER_WORD, dtype=torch.int32) * 4
    n = (weight_packed.unsqueeze(-1) >> shifts) & 15   # arithmetic shift of a negative word: masked off
    n = n.reshape(*weight_packed.shape[:-1], words * CODES_PER_WORD)[..., :cols]
    return (n - 8).to(torch.int8)


def adopt_pack_quantized(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_shape: Sequence[int],
                         weight_format: Optional[WeightFormat] = None, *, name: str = "weight") -> Packed:
    """A compressed-tensors symmetric int4 linear (or E of them stacked: [E, out, in / 8] words and
    [E, out, groups] scales) as a Packed of the INT4 K-group format, the group read off the scales (32 for
    Kimi-K2), or of `weight_format` when given (int4 per row needs one scale per row)."""
    from .registry import FORMATS

    fmt = FORMATS["int4_kgroup"] if weight_format is None else weight_format
    codes = unpack_int4(weight_packed, weight_shape, name=f"{name}_packed")
    return fmt.adopt(codes, weight_scale, name=name)


def dequantize_pack_quantized(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                              weight_shape: Sequence[int]) -> torch.Tensor:
    """The checkpoint's own dequantization: value * scale, computed in the scale's dtype (for tests and
    for converting into another format)."""
    codes = unpack_int4(weight_packed, weight_shape)
    group = codes.shape[-1] // weight_scale.shape[-1]
    return codes.to(weight_scale.dtype) * weight_scale.repeat_interleave(group, dim=-1)
