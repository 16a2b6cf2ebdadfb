"""fp8: float8 e4m3 (fn) codes, one fp32 multiplier per 2-D block of block_rows x block_cols weights: the
layout DeepSeek-V3 / R1 ship (`weight` float8_e4m3fn + `weight_scale_inv` fp32 [ceil(out / 128),
ceil(in / 128)], `weight_block_size` [128, 128] in config.json). Blocks at the bottom and right edges are
partial when a size is not a multiple of the block.

The value of a weight is bf16(float(code) * scale): the fp32 product, then one round to nearest even to
bf16 (DeepSeek's own dequantization); the kernels decode exactly that (kernels/formats/decode.h)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .base import Packed, WeightFormat, _return_freed_memory, native_code

E4M3_MAX = 448.0               # the largest finite float8 e4m3fn value
DEFAULT_BLOCK = (128, 128)     # (rows, cols) per scale: DeepSeek's weight_block_size


def _ceil_div(n: int, b: int) -> int:
    return -(-n // b)


def check_block_size(block_size, name: str = "block_size") -> Tuple[int, int]:
    """(rows, cols) of a scale block, as a checkpoint's weight_block_size [block_n (out), block_k (in)]."""
    try:
        br, bc = (int(v) for v in block_size)
        ok = [br, bc] == [v for v in block_size] and br >= 1 and bc >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be two positive ints (rows, cols) per scale block, got {block_size!r}")
    return br, bc


def expand_block_scales(scale: torch.Tensor, R: int, C: int, block_rows: int, block_cols: int) -> torch.Tensor:
    """[..., ceil(R / block_rows), ceil(C / block_cols)] -> [..., R, C]: every weight's own multiplier."""
    s = scale.repeat_interleave(block_rows, dim=-2)[..., :R, :]
    return s.repeat_interleave(block_cols, dim=-1)[..., :C]


def e4m3_bytes(weight: torch.Tensor, name: str) -> torch.Tensor:
    """The raw bytes of float8 e4m3fn codes (a float8_e4m3fn tensor, or uint8 holding its bits)."""
    if weight.dtype == torch.float8_e4m3fn:
        return weight.view(torch.uint8)
    if weight.dtype == torch.uint8:
        return weight
    raise ValueError(f"{name} must be float8_e4m3fn (or uint8 holding its bytes), got {weight.dtype}")


def check_e4m3_codes(codes: torch.Tensor, name: str) -> None:
    """Refuses NaN codes (0x7f, 0xff: e4m3fn has no infinity), naming the first one's place."""
    bad = (codes & 0x7F) == 0x7F
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} holds a NaN float8 code at index {where}")


class FP8Format(WeightFormat):
    """float8 e4m3fn weights with fp32 block scales; the block shape travels with the packed tensors
    (Packed.block_rows x Packed.group), `block_size` is what pack() uses by default."""

    name, code, bits = "fp8", native_code("fp8"), 8
    blocks_2d = True

    def __init__(self, block_size: Sequence[int] = DEFAULT_BLOCK):
        self.block_size = check_block_size(block_size)

    def group_for(self, cols: int, group_size: int) -> int:
        return self.block_size[1]  # the wrapper's group_size is for K-group formats; fp8 has its block

    def tensor_spec(self, E, R, C, group, block_rows=1):
        return {"data": (torch.uint8, (E, R, C)),
                "scale": (torch.float32, (E, _ceil_div(R, block_rows), _ceil_div(C, group)))}

    def pack(self, w: torch.Tensor, group_size: int = 128, block_size: Optional[Sequence[int]] = None) -> Packed:
        """Quantizes float weights [E, R, C] per block: scale = max |w| / 448 (1 for an all-zero block), codes
        = w / scale rounded to nearest e4m3."""
        br, bc = self.block_size if block_size is None else check_block_size(block_size)
        E, R, C = w.shape
        Rb, Cb = _ceil_div(R, br), _ceil_div(C, bc)
        data = torch.empty((E, R, C), dtype=torch.uint8)
        scale = torch.empty((E, Rb, Cb), dtype=torch.float32)
        for e in range(E):  # one expert's temporaries at a time
            we = w[e].detach().to("cpu", torch.float32)
            padded = torch.zeros(Rb * br, Cb * bc)
            padded[:R, :C] = we
            amax = padded.view(Rb, br, Cb, bc).abs().amax(dim=(1, 3))
            s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
            q = (we / expand_block_scales(s, R, C, br, bc)).clamp_(-E4M3_MAX, E4M3_MAX)
            data[e].copy_(q.to(torch.float8_e4m3fn).view(torch.uint8))
            scale[e].copy_(s)
        _return_freed_memory()
        return Packed(data, scale, None, (E, R, C), bc, br)

    def adopt(self, weight: torch.Tensor, scale_inv: torch.Tensor, block_size: Optional[Sequence[int]] = None, *,
              name: str = "weight") -> Packed:
        """Shipped codes and scales as they are, bit for bit: weight [E, R, C] (or one expert's [R, C])
        float8_e4m3fn (or its uint8 bytes), scale_inv [E, ceil(R / br), ceil(C / bc)] the multipliers (fp32;
        bf16 / fp16 are widened exactly). block_size (br, bc): the checkpoint's weight_block_size (default
        this format's, 128 x 128). The result shares the input's memory where it can."""
        codes = e4m3_bytes(weight, name)
        if codes.dim() == 2:
            codes = codes.unsqueeze(0)
        if codes.dim() != 3:
            raise ValueError(f"{name} must be [E, rows, cols] or [rows, cols], got shape {tuple(weight.shape)}")
        E, R, C = codes.shape
        br, bc = self.block_size if block_size is None else check_block_size(block_size)
        sname = name + "_scale_inv"
        if scale_inv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{sname} must be float32 (or bf16 / fp16), got {scale_inv.dtype}")
        s = scale_inv.unsqueeze(0) if scale_inv.dim() == 2 else scale_inv
        want = (E, _ceil_div(R, br), _ceil_div(C, bc))
        if tuple(s.shape) != want:
            raise ValueError(f"{sname} has shape {tuple(scale_inv.shape)}, but {br} x {bc} blocks of {name} "
                             f"{tuple(weight.shape)} need {want if scale_inv.dim() == 3 else want[1:]}; pass "
                             "block_size= (the checkpoint's weight_block_size)")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"{sname} holds non-finite values")
        check_e4m3_codes(codes, name)
        s = s.to("cpu", torch.float32).contiguous()
        return Packed(codes.to("cpu").contiguous(), s, None, (E, R, C), bc, br)

    def dequantize(self, packed: Packed, exact: bool = False) -> torch.Tensor:
        E, R, C = packed.shape
        out = torch.empty((E, R, C), dtype=torch.float32)
        for e in range(E):
            v = packed.data[e].view(torch.float8_e4m3fn).float()
            v.mul_(expand_block_scales(packed.scale[e], R, C, packed.block_rows, packed.group))
            out[e].copy_(v if exact else v.to(torch.bfloat16))
        return out

    def check_codes(self, name, data):
        check_e4m3_codes(data, name)

    def check_tp(self, which, cols, group, i0):
        pass  # views index scales by absolute row and column: any slice start works

    def part_slice(self, packed, which, i0, i1, gather):
        """The slice's own tensors (node-local TP copies). A slice that starts inside a scale block gets
        smaller blocks, gcd(i0, block) along the sliced axis, each holding its old block's scale: the same
        values, block boundaries that fall on the slice's own multiples (more scales, never other ones)."""
        E, R, C = packed.shape
        br, bc = packed.block_rows, packed.group
        rows = which in ("gate", "up")
        b = br if rows else bc
        nb = math.gcd(i0, b) if i0 % b else b
        picks = torch.tensor([(i0 + j * nb) // b for j in range(_ceil_div(i1 - i0, nb))], dtype=torch.long)
        scale = packed.scale.index_select(1 if rows else 2, picks)  # a new tensor: gather copies it as it is
        if rows:
            return Packed(gather(packed.data[:, i0:i1, :]), gather(scale), None, (E, i1 - i0, C), bc, nb)
        return Packed(gather(packed.data[:, :, i0:i1]), gather(scale), None, (E, R, i1 - i0), nb, br)
