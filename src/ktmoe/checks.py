"""Non-finite value checks: frozen weights at load, LoRA and lora_alpha at bind, inputs that overflow bf16,
and outputs that turn non-finite (a NaN that an optimizer step put in the LoRA shows at the next call).

All on by default. `set_finite_checks(False)` (or KTMOE_CHECK_FINITE=0 in the environment) turns off the
checks that cost a pass over data: weights at load, LoRA at bind, the bf16-overflow check of fp32 inputs and
the output check. What the kernels reject anyway (NaN/Inf inputs and routing weights) stays rejected."""
from __future__ import annotations

import os
import struct
from typing import Optional

import torch

CHECK_ENV = "KTMOE_CHECK_FINITE"

_enabled = os.environ.get(CHECK_ENV, "1").strip().lower() not in ("0", "false", "no", "off")

# fp32 values at or above this magnitude round (nearest even) to inf in bf16: the midpoint between the
# largest bf16 (0x7F7F) and 2^128.
BF16_OVERFLOW = struct.unpack("<f", struct.pack("<I", 0x7F7F8000))[0]


def set_finite_checks(on: bool) -> bool:
    """Turns the non-finite checks on or off for the whole process; returns the previous setting."""
    global _enabled
    prev, _enabled = _enabled, bool(on)
    return prev


def finite_checks() -> bool:
    """Whether the non-finite checks are on."""
    return _enabled


def max_abs(t: torch.Tensor) -> torch.Tensor:
    """max |t| (NaN when t holds one) without the tensor-sized temporary of t.abs(): one pass, ~8x faster on
    the layer-sized gradients checked after every backward."""
    lo, hi = torch.aminmax(t)
    return torch.maximum(hi, -lo)


def first_non_finite(t: torch.Tensor) -> Optional[tuple]:
    """Index of the first NaN/Inf of a floating tensor, or None; checks one leading slice at a time so a
    layer-sized tensor needs no layer-sized temporary."""
    if not t.is_floating_point():
        return None
    if t.dim() == 0:
        return None if bool(torch.isfinite(t)) else ()
    for e in range(t.shape[0]):
        sl = t[e]
        if not bool(torch.isfinite(sl).all()):
            bad = (~torch.isfinite(sl)).nonzero()
            return (e, *[int(i) for i in bad[0]]) if bad.numel() else (e,)
    return None


def _where(idx: tuple, axes) -> str:
    return ", ".join(f"{a} {i}" for a, i in zip(axes, idx))


def check_finite_weight(name: str, t: torch.Tensor, what: str = "") -> None:
    """ValueError naming the tensor, expert, row and column of the first NaN/Inf of an [E, R, C] weight."""
    idx = first_non_finite(t)
    if idx is not None:
        v = float(t[idx]) if len(idx) == t.dim() else float("nan")
        raise ValueError(f"{name}{what} holds a non-finite value ({v}) at {_where(idx, ('expert', 'row', 'column'))}"
                         f" (set KTMOE_CHECK_FINITE=0 or ktmoe.set_finite_checks(False) to skip this check)")


def check_finite_rows(name: str, t: torch.Tensor, limit: Optional[float] = None) -> None:
    """ValueError naming the first row of a [T, H] tensor that is non-finite, or (with `limit`) has a
    magnitude >= limit (an fp32 value that becomes inf when rounded to bf16)."""
    if t.numel() == 0:
        return
    m = max_abs(t)
    ok = bool(m < limit) if limit is not None else bool(torch.isfinite(m))
    if ok:
        return
    a = t.abs()
    bad = ~torch.isfinite(a) if limit is None else ~(a < limit)
    row, col = (int(i) for i in bad.nonzero()[0])
    v = float(t[row, col])
    if limit is not None and v == v and abs(v) != float("inf"):
        raise ValueError(f"{name}[{row}, {col}] = {v:.6g} overflows bfloat16 (|x| >= {limit:.6g} rounds to inf); "
                         "scale the input down")
    raise ValueError(f"{name}[{row}, {col}] is not finite ({v})")
