"""Format name -> format instance: the names weight folders record and methods.py refers to."""
from __future__ import annotations

from typing import Dict

from .base import WeightFormat
from .bf16 import BF16Format
from .fp8 import FP8Format
from .int4 import Int4Format, Int4KGroupFormat, Int4ZeroFormat, Int4ZeroKGroupFormat
from .int8 import Int8Format

FORMATS: Dict[str, WeightFormat] = {f.name: f for f in (
    BF16Format(), Int8Format(), Int4Format(), Int4ZeroFormat(), Int4KGroupFormat(), Int4ZeroKGroupFormat(),
    FP8Format())}


def get_format(name: str) -> WeightFormat:
    """The format registered as `name`; KeyError listing the known names otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown weight format {name!r} (known: {sorted(FORMATS)})") from None
