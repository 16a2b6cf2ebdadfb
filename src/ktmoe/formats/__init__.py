"""Frozen-weight formats: how a method stores gate/up/down (one module per format family), and the
registry that names them. The names below are the package's interface; import them from here."""
from .base import KGroup, Packed, WeightFormat, WeightView, expert_shapes, native_code
from .bf16 import BF16Format
from .fp8 import FP8Format
from .int4 import Int4Format, Int4KGroupFormat, Int4ZeroFormat, Int4ZeroKGroupFormat
from .int8 import Int8Format
from .registry import FORMATS, get_format

__all__ = ["WeightFormat", "Packed", "WeightView", "KGroup", "expert_shapes", "native_code", "BF16Format",
           "Int8Format", "FP8Format", "Int4Format", "Int4ZeroFormat", "Int4KGroupFormat", "Int4ZeroKGroupFormat", "FORMATS",
           "get_format"]
