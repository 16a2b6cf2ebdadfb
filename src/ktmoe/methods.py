"""The method table: a method name picks a mode (training or inference) and a weight format, by name.

Pure data: the factory (experts.py) turns a mode into a wrapper class and a format name into a format
(ktmoe.formats). Adding a method is one `register()` line here plus its format and kernels;
KTMoEWrapper and BaseSFTMoEWrapper never change for it, and the tests iterate over the registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet

MODES = ("sft", "inference")


@dataclass(frozen=True)
class Method:
    name: str
    mode: str          # one of MODES
    format_name: str   # a key of ktmoe.formats.FORMATS

    @property
    def weight_format(self):
        """The format instance, for callers that inspect it (bits, per_group) or read weight folders."""
        from .formats import get_format  # late: the table itself needs nothing but the standard library

        return get_format(self.format_name)


REGISTRY: Dict[str, Method] = {}


def register(name: str, format_name: str) -> None:
    """Registers NAME_SFT (training) and NAME (inference) for one weight format."""
    REGISTRY[name + "_SFT"] = Method(name + "_SFT", "sft", format_name)
    REGISTRY[name] = Method(name, "inference", format_name)


register("AMXBF16", "bf16")
register("AMXINT8", "int8")
register("AMXINT4", "int4")
register("AMXINT4_1", "int4_1")
register("AMXINT4_KGroup", "int4_kgroup")
register("AMXINT4_1KGroup", "int4_1_kgroup")
register("AMXFP8", "fp8")

SFT_METHODS: FrozenSet[str] = frozenset(n for n, m in REGISTRY.items() if m.mode == "sft")
INFERENCE_METHODS: FrozenSet[str] = frozenset(n for n, m in REGISTRY.items() if m.mode == "inference")


def check_method(mode: str, method: str) -> Method:
    """The registry entry of `method` for `mode`; a ValueError that says what fits otherwise."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    valid = SFT_METHODS if mode == "sft" else INFERENCE_METHODS
    if method not in valid:
        hint = ""
        if method in REGISTRY:
            hint = (f": {method} is an inference method, use mode='inference'" if mode == "sft" else
                    f": {method} is a training method, use mode='sft' (or {method[:-4]} for inference)")
        raise ValueError(f"unknown method {method!r} for mode={mode!r}{hint}; valid: {', '.join(sorted(valid))}")
    return REGISTRY[method]
