"""int4, two weights a byte: symmetric (int4) or with a zero point (int4_1), one scale per row or, in the
K-group variants, per `group_size` columns."""
from __future__ import annotations

import torch

from .base import KGroup, WeightFormat, grouped, native_code


def _pack_nibbles(n: torch.Tensor) -> torch.Tensor:
    """[R, C] values in [0, 15] -> [R, C // 2] bytes, low nibble = even column."""
    n = n.to(torch.uint8)
    return (n[:, 0::2] | (n[:, 1::2] << 4)).contiguous()


def _unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    lo, hi = b & 15, b >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)


class Int4Format(WeightFormat):
    """Symmetric int4: w = scale * (n - 8), n in [0, 15]."""

    name, code, bits = "int4", native_code("int4"), 4
    int8_activations = True   # W8A8 codes: n - 8 (int4_1: n, and the zero point's term)

    def group_for(self, cols: int, group_size: int) -> int:
        if cols % 2:
            raise ValueError(f"{self.name}: the input size {cols} must be even (two weights per byte)")
        return super().group_for(cols, group_size)

    def _quantize(self, w, group):
        g = grouped(w, group)
        scale = g.abs().amax(-1) / 7.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(g / scale.unsqueeze(-1)).clamp_(-8, 7) + 8
        return _pack_nibbles(q.reshape(w.shape)), scale, None

    def _codes(self, packed):
        return _unpack_nibbles(packed.data)

    def _code_range(self):  # adopt() takes the signed value n - 8, as symmetric int4 checkpoints store it
        return -8, 7

    def _store_codes(self, codes):
        if codes.shape[-1] % 2:
            raise ValueError(f"{self.name}: the input size {codes.shape[-1]} must be even (two weights per byte)")
        n = (codes.to(torch.int16) + 8).to(torch.uint8)
        return (n[..., 0::2] | (n[..., 1::2] << 4)).contiguous()

    def _decode(self, codes, scale, zero):
        return scale * codes + (-8.0 * scale)


class Int4ZeroFormat(Int4Format):
    """Asymmetric int4 with a zero point: w = scale * n + zero (zero = the group's minimum)."""

    name, code, bits = "int4_1", native_code("int4_1"), 4

    def _quantize(self, w, group):
        g = grouped(w, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo) / 15.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        n = torch.round((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, 15)
        return _pack_nibbles(n.reshape(w.shape)), scale, lo

    def _code_range(self):  # adopt() takes the unsigned n, w = scale * n + zero
        return 0, 15

    def _store_codes(self, codes):
        return super()._store_codes(codes.to(torch.int16) - 8)

    def _decode(self, codes, scale, zero):
        return scale * codes + zero


class Int4KGroupFormat(KGroup, Int4Format):
    name = "int4_kgroup"


class Int4ZeroKGroupFormat(KGroup, Int4ZeroFormat):
    name = "int4_1_kgroup"
