"""int8: symmetric, one scale per row."""
from __future__ import annotations

import torch

from .base import WeightFormat, grouped, native_code


class Int8Format(WeightFormat):
    """Symmetric int8, one scale per row (or per group)."""

    name, code, bits = "int8", native_code("int8"), 8
    int8_activations = True   # W8A8 codes: q

    def _quantize(self, w, group):
        g = grouped(w, group)
        scale = g.abs().amax(-1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(g / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return q.reshape(w.shape), scale, None

    def _code_range(self):
        return -128, 127

    def _store_codes(self, codes):
        return codes.to(torch.int8).contiguous()

    def _decode(self, codes, scale, zero):
        return scale * codes
