"""What every frozen-weight format shares: the packed tensors, the per-TP-part view the kernels read, and
the base class that packs, slices and decodes them.

A format packs each projection once ([E, rows, cols], out x in) and describes a view that starts at a TP
part's slice of the intermediate dimension: rows [i0, ...) of gate/up, columns [i0, ...) of down. The
kernels decode quantized blocks on the fly, and backward reads the same packed bytes (transposed access),
so nothing is stored twice. The byte layouts match enum kt_wfmt in kernels/ktmoe.h; the codes come from
the native module (native_code)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .. import _core

def native_code(name: str) -> int:
    """The native code of a storage layout ("bf16", "int8", "int4", "int4_1"): what WeightView.fmt carries,
    read from the C format table (kernels/formats/formats.c)."""
    try:
        return _core.WEIGHT_FORMATS[name]
    except KeyError:
        raise ValueError(f"the native module has no weight format {name!r}; it has "
                         f"{', '.join(_core.WEIGHT_FORMATS)}") from None


@dataclass(frozen=True)
class WeightView:
    fmt: int
    data_ptr: int
    scale_ptr: int
    zero_ptr: int
    rows: int
    cols: int
    row0: int
    col0: int
    group: int


@dataclass
class Packed:
    """One projection of all experts in a format: codes, and per-group scales / zeros."""

    data: torch.Tensor                 # bf16 [E, R, C]; int8 [E, R, C]; uint8 [E, R, C // 2] for int4
    scale: Optional[torch.Tensor]      # fp32 [E, R, C // group]
    zero: Optional[torch.Tensor]       # fp32 [E, R, C // group] (INT4_1 formats)
    shape: Tuple[int, int, int]
    group: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero) if t is not None)


def _return_freed_memory() -> None:
    """Hands the per-expert quantization temporaries back to the OS (glibc keeps freed heap otherwise, and the
    process would look 10-20% larger than the packed weights). A no-op where malloc_trim is missing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """[R, C] -> [R, C // group, group]: the blocks that share one scale (and zero)."""
    R, C = w.shape
    return w.reshape(R, C // group, group)


class WeightFormat:
    """Base class; one subclass per storage format. `per_group` formats take the wrapper's group_size."""

    name = "?"   # the registry's key, written to weight folders
    code = -1    # native_code() of the byte layout
    bits = 16
    per_group = False
    # W8A8 (activation_quant="int8"): the forward's int8 products need int8 codes with one scale (and zero)
    # per output row, so that the scale factors out of an exact int32 sum
    int8_activations = False

    def group_for(self, cols: int, group_size: int) -> int:
        if not self.per_group:
            return cols
        if group_size < 1 or cols % group_size != 0:
            raise ValueError(f"{self.name}: group_size={group_size} must divide the input size {cols}")
        return group_size

    def check_tp(self, which: str, cols: int, group: int, i0: int) -> None:
        """A TP slice of down's columns must start on a group boundary for K-group formats."""
        if which == "down" and group < cols and i0 % group != 0:
            raise ValueError(f"{self.name}: the TP slice of moe_intermediate_size starts at column {i0}, "
                             f"not a multiple of group_size={group}; pick a threadpool_count whose slice "
                             f"(moe_intermediate_size / threadpool_count) is a multiple of group_size")

    def pack(self, w: torch.Tensor, group_size: int = 128) -> Packed:
        E, R, C = w.shape
        group = self.group_for(C, group_size)
        out = None
        for e in range(E):  # one expert at a time into preallocated tensors: no list + stack peak, and the
            parts = self._quantize(w[e].detach().to("cpu", torch.float32), group)  # temporaries stay small
            if out is None:
                out = [None if t is None else torch.empty((E, *t.shape), dtype=t.dtype) for t in parts]
            for dst, t in zip(out, parts):
                if dst is not None:
                    dst[e].copy_(t)
        _return_freed_memory()
        return Packed(out[0], out[1], out[2], (E, R, C), group)

    def _quantize(self, w: torch.Tensor, group: int):
        raise NotImplementedError

    def view(self, packed: Packed, which: str, i0: int) -> WeightView:
        E, R, C = packed.shape
        self.check_tp(which, C, packed.group, i0)
        row0, col0 = (i0, 0) if which in ("gate", "up") else (0, i0)
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        return WeightView(self.code, packed.data.data_ptr(), ptr(packed.scale), ptr(packed.zero), R, C, row0, col0,
                          packed.group)

    def nbytes(self, packed: Packed) -> int:
        return packed.nbytes()

    def part_slice(self, packed: Packed, which: str, i0: int, i1: int, gather: Callable) -> Packed:
        """This TP part's slice as its own tensors ([E, i1 - i0, H] for gate/up, [E, H, i1 - i0] for down),
        each filled by `gather(view) -> contiguous tensor` (the engine's first-touch copy)."""
        E, R, C = packed.shape
        per = 2 if packed.data.shape[2] * 2 == C and packed.data.dtype == torch.uint8 else 1  # int4: 2 a byte
        if which in ("gate", "up"):
            data = gather(packed.data[:, i0:i1, :])
            scale, zero = (None if t is None else gather(t[:, i0:i1, :]) for t in (packed.scale, packed.zero))
            return Packed(data, scale, zero, (E, i1 - i0, C), packed.group)
        if (i0 % per) or (i1 % per):
            raise ValueError(f"{self.name}: a TP slice of down's columns must start and end on a byte")
        data = gather(packed.data[:, :, i0 // per:i1 // per])
        if packed.scale is None:
            return Packed(data, None, None, (E, R, i1 - i0), i1 - i0)
        if packed.group == C:  # one scale per row: the slice keeps it
            g0, g1, group = 0, 1, i1 - i0
        else:
            g0, g1, group = i0 // packed.group, i1 // packed.group, packed.group
        scale, zero = (None if t is None else gather(t[:, :, g0:g1]) for t in (packed.scale, packed.zero))
        return Packed(data, scale, zero, (E, R, i1 - i0), group)

    def dequantize(self, packed: Packed, exact: bool = False) -> torch.Tensor:
        """The weights exactly as the kernels use them (bf16 values), as fp32 [E, rows, cols]. exact=True: the
        fp32 values scale * code (+ zero) without the bf16 rounding, what the int8 products of the W8A8
        forward (activation_quant="int8") multiply with."""
        E, R, C = packed.shape
        codes = self._codes(packed).float().reshape(E, R, C // packed.group, packed.group)
        s = packed.scale.unsqueeze(-1)
        w = self._decode(codes, s, None if packed.zero is None else packed.zero.unsqueeze(-1)).reshape(E, R, C)
        return w if exact else w.to(torch.bfloat16).float()

    def _codes(self, packed: Packed) -> torch.Tensor:
        return packed.data

    def _decode(self, codes, scale, zero):
        raise NotImplementedError


class KGroup:
    """Mixin: the same format with one scale (and zero) per `group_size` columns of a row."""

    per_group = True
    int8_activations = False  # the scale varies along K: an int32 sum cannot carry it


def expert_shapes(E: int, H: int, I: int) -> Tuple[Tuple[int, int, int], ...]:
    """Expected (gate, up, down) shapes."""
    return (E, I, H), (E, I, H), (E, H, I)
