"""Frozen-weight formats: how a method stores gate/up/down, and the per-TP-part views the kernels read.

A format packs each projection once ([E, rows, cols], out x in) and hands out views that start at a TP
part's slice of the intermediate dimension: rows [i0, i1) of gate/up, columns [i0, i1) of down. Backward
reads the same storage (transposed access), so nothing is stored twice."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

# Format codes shared with the C side (enum kt_wfmt in kernels/ktmoe.h).
FMT_BF16 = 0


@dataclass(frozen=True)
class WeightView:
    fmt: int
    data_ptr: int
    expert_stride: int  # elements
    row_stride: int     # elements


class WeightFormat:
    """Base class; one subclass per storage format."""

    name = "?"
    code = -1
    bits = 16

    def pack(self, w: torch.Tensor) -> object:
        raise NotImplementedError

    def view(self, packed: object, which: str, i0: int) -> WeightView:
        raise NotImplementedError

    def nbytes(self, packed: object) -> int:
        raise NotImplementedError

    def dequantize(self, packed: object) -> torch.Tensor:
        """The weights the kernels effectively use, as fp32 [E, rows, cols] (for tests)."""
        raise NotImplementedError


class BF16Format(WeightFormat):
    name = "bf16"
    code = FMT_BF16
    bits = 16

    def pack(self, w: torch.Tensor) -> torch.Tensor:
        # A bf16, contiguous CPU tensor is used in place: no second copy of the weights.
        return w.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()

    def view(self, packed: torch.Tensor, which: str, i0: int) -> WeightView:
        E, rows, cols = packed.shape
        offset = i0 * cols if which in ("gate", "up") else i0  # gate/up: rows; down: columns
        return WeightView(self.code, packed.data_ptr() + 2 * offset, rows * cols, cols)

    def nbytes(self, packed: torch.Tensor) -> int:
        return packed.numel() * packed.element_size()

    def dequantize(self, packed: torch.Tensor) -> torch.Tensor:
        return packed.float()


def expert_shapes(E: int, H: int, I: int) -> Tuple[Tuple[int, int, int], ...]:
    """Expected (gate, up, down) shapes."""
    return (E, I, H), (E, I, H), (E, H, I)
