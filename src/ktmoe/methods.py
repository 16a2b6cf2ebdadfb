"""The method registry: a method name picks a weight format and a wrapper class.

Adding a method is one `register()` line here plus its format (ktmoe/formats.py) and kernels;
KTMoEWrapper and BaseSFTMoEWrapper never change for it, and the tests iterate over the registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Type

from .formats import (BF16Format, Int4Format, Int4KGroupFormat, Int4ZeroFormat, Int4ZeroKGroupFormat, Int8Format,
                      WeightFormat)
from .sft.amx import AMXSFTMoEWrapper, InferenceMoEWrapper
from .sft.base import BaseSFTMoEWrapper


@dataclass(frozen=True)
class Method:
    name: str
    mode: str                       # "sft" or "inference"
    weight_format: WeightFormat
    wrapper: Type[BaseSFTMoEWrapper]


REGISTRY: Dict[str, Method] = {}


def register(name: str, weight_format: WeightFormat) -> None:
    """Registers NAME_SFT (training) and NAME (inference) for one weight format."""
    REGISTRY[name + "_SFT"] = Method(name + "_SFT", "sft", weight_format, AMXSFTMoEWrapper)
    REGISTRY[name] = Method(name, "inference", weight_format, InferenceMoEWrapper)


register("AMXBF16", BF16Format())
register("AMXINT8", Int8Format())
register("AMXINT4", Int4Format())
register("AMXINT4_1", Int4ZeroFormat())
register("AMXINT4_KGroup", Int4KGroupFormat())
register("AMXINT4_1KGroup", Int4ZeroKGroupFormat())

SFT_METHODS: FrozenSet[str] = frozenset(n for n, m in REGISTRY.items() if m.mode == "sft")
INFERENCE_METHODS: FrozenSet[str] = frozenset(n for n, m in REGISTRY.items() if m.mode == "inference")
