"""What every frozen-weight format shares: the packed tensors, the per-TP-part view the kernels read, and
the base class that packs, slices and decodes them.

A format packs each projection once ([E, rows, cols], out x in) and describes a view that starts at a TP
part's slice of the intermediate dimension: rows [i0, ...) of gate/up, columns [i0, ...) of down. The
kernels decode quantized blocks on the fly, and backward reads the same packed bytes (transposed access),
so nothing is stored twice. The byte layouts match enum kt_wfmt in kernels/ktmoe.h; the codes come from
the native module (native_code)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

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
    block_rows: int = 1


@dataclass
class Packed:
    """One projection of all experts in a format: codes, and per-block scales / zeros."""

    data: torch.Tensor                 # bf16 [E, R, C]; int8 [E, R, C]; uint8 [E, R, C // 2] for int4;
                                       # uint8 [E, R, C] float8 e4m3fn bytes for fp8
    scale: Optional[torch.Tensor]      # fp32 [E, R, C // group]; fp8: [E, ceil(R / block_rows), ceil(C / group)]
    zero: Optional[torch.Tensor]       # fp32 [E, R, C // group] (INT4_1 formats)
    shape: Tuple[int, int, int]
    group: int                         # columns per scale block
    block_rows: int = 1                # rows per scale block (> 1 only for the 2-D block formats: fp8)

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
    # scales over 2-D blocks of block_rows x group, partial at the edges (the C traits row's blocks_2d)
    blocks_2d = False

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

    def adopt(self, codes: torch.Tensor, scale: Optional[torch.Tensor] = None, zero: Optional[torch.Tensor] = None,
              *, name: str = "weight") -> Packed:
        """Shipped integer codes and their scales (and zeros) as they are, bit for bit: codes [E, R, C] (or
        [R, C]) in this format's code range (_code_range), scale / zero [E, R, G] with G groups per row (the
        group, C / G, is read off the shape; per-row formats need G = 1). Formats with another storage
        override it."""
        lo, hi = self._code_range()
        c = codes.unsqueeze(0) if codes.dim() == 2 else codes
        if c.dim() != 3 or c.is_floating_point() or c.is_complex():
            raise ValueError(f"{name}: integer codes [E, rows, cols] expected, got {c.dtype} {tuple(codes.shape)}")
        E, R, C = c.shape
        if int(c.min()) < lo or int(c.max()) > hi:
            raise ValueError(f"{name}: {self.name} codes lie in [{lo}, {hi}], got [{int(c.min())}, {int(c.max())}]")
        parts = {}
        for part, t in (("scale", scale), ("zero", zero)):
            if t is not None:
                if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                    raise ValueError(f"{name}_{part} must be float32, bf16 or fp16, got {t.dtype}")
                t = t.unsqueeze(0) if t.dim() == 2 else t
                if t.dim() != 3 or tuple(t.shape[:2]) != (E, R) or t.shape[2] < 1 or C % t.shape[2]:
                    raise ValueError(f"{name}_{part}: shape {tuple(t.shape)} is not [E={E}, R={R}, groups] with the "
                                     f"groups dividing C={C}")
                parts[part] = t.to("cpu", torch.float32).contiguous()  # exact: bf16 / fp16 widen to fp32
        if "scale" not in parts:
            raise ValueError(f"{name}_scale is required for format {self.name!r}")
        groups = parts["scale"].shape[2]
        if "zero" in parts and parts["zero"].shape != parts["scale"].shape:
            raise ValueError(f"{name}_zero: shape {tuple(parts['zero'].shape)} differs from the scale's")
        packed = Packed(self._store_codes(c.to("cpu")), parts["scale"], parts.get("zero"), (E, R, C), C // groups)
        self.check_packed(name, packed, (E, R, C))
        return packed

    def _code_range(self) -> Tuple[int, int]:
        raise ValueError(f"format {self.name!r} has no integer codes to adopt")

    def _store_codes(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def view(self, packed: Packed, which: str, i0: int) -> WeightView:
        E, R, C = packed.shape
        self.check_tp(which, C, packed.group, i0)
        row0, col0 = (i0, 0) if which in ("gate", "up") else (0, i0)
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        return WeightView(self.code, packed.data.data_ptr(), ptr(packed.scale), ptr(packed.zero), R, C, row0, col0,
                          packed.group, packed.block_rows)

    def tensor_spec(self, E: int, R: int, C: int, group: int,
                    block_rows: int = 1) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
        """{"data" / "scale" / "zero": (dtype, shape)} of the packed tensors of [E, R, C] weights with scale
        blocks of block_rows x group. Derived by packing one zero row: right for every format that quantizes
        row by row; the 2-D block formats override it."""
        probe = self.pack(torch.zeros(1, 1, C), group)
        return {part: (t.dtype, (E, R) + tuple(t.shape[2:])) for part in ("data", "scale", "zero")
                for t in [getattr(probe, part)] if t is not None}

    def check_packed(self, name: str, packed: Packed, shape: Tuple[int, int, int]) -> None:
        """Raises ValueError naming `name` unless `packed` holds [E, R, C] = shape weights of this format:
        the tensors' dtypes and shapes, the block shape, and finite scales and zeros."""
        if not isinstance(packed, Packed):
            raise TypeError(f"{name} must be a ktmoe.formats.Packed, got {type(packed).__name__}")
        if tuple(packed.shape) != tuple(shape):
            raise ValueError(f"{name}: packed shape {tuple(packed.shape)}, expected {tuple(shape)}")
        E, R, C = shape
        g, br = packed.group, packed.block_rows
        if not self.blocks_2d and not (br == 1 and 1 <= g <= C and C % g == 0 and (self.per_group or g == C)):
            raise ValueError(f"{name}: {self.name} packs scale blocks of 1 row x a group dividing the {C} "
                             f"columns{'' if self.per_group else ' (all of them)'}; got {br} x {g}")
        if self.blocks_2d and (g < 1 or br < 1):
            raise ValueError(f"{name}: block of {br} x {g} weights; both must be >= 1")
        spec = self.tensor_spec(E, R, C, g, br)
        for part in ("data", "scale", "zero"):
            t = getattr(packed, part)
            if (t is None) != (part not in spec):
                raise ValueError(f"{name}.{part}: {'missing' if t is None else 'unexpected'} for format "
                                 f"{self.name!r}")
            if t is None:
                continue
            dt, shp = spec[part]
            if t.dtype != dt or tuple(t.shape) != shp or t.device.type != "cpu":
                raise ValueError(f"{name}.{part}: got {t.dtype} {tuple(t.shape)} on {t.device}, format "
                                 f"{self.name!r} stores {dt} {shp} on the CPU")
            if part != "data" and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}.{part}: holds non-finite values")
        self.check_codes(f"{name}.data", packed.data)

    def check_codes(self, name: str, data: torch.Tensor) -> None:
        """Refuses stored codes that decode to NaN or Inf (bf16 weights are checked by checks.py; integer codes
        are always finite): formats with float codes (fp8) override it."""

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
