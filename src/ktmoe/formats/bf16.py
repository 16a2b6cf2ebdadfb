"""bf16: the weights as they are, no scales."""
from __future__ import annotations

import torch

from .base import Packed, WeightFormat, native_code


class BF16Format(WeightFormat):
    name, code, bits = "bf16", native_code("bf16"), 16

    def pack(self, w: torch.Tensor, group_size: int = 128) -> Packed:
        # A bf16, contiguous CPU tensor is used in place: no second copy of the weights.
        data = w.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        return Packed(data, None, None, tuple(w.shape), w.shape[2])

    def dequantize(self, packed: Packed, exact: bool = False) -> torch.Tensor:
        return packed.data.float()
