"""RAM the routed experts of a model need per weight format, computed from ktmoe.formats' own tensor layouts
(WeightFormat.tensor_spec: the packed data, scales and zeros of [E, rows, cols]), not by hand.

    python tools/expert_ram.py            # the README's table (markdown)
"""
from __future__ import annotations

import torch

from ktmoe.formats import FORMATS

MODELS = [  # name, routed experts E, hidden H, expert intermediate I, MoE layers
    ("DeepSeek-V3 / R1", 256, 7168, 2048, 58),
    ("DeepSeek-V2", 160, 5120, 1536, 59),
    ("Qwen3-235B-A22B", 128, 4096, 1536, 94),
    ("Mixtral-8x22B", 8, 6144, 16384, 56),
]
COLUMNS = [  # label, format name, group (K-group) or block cols (fp8), block rows (fp8)
    ("BF16 (`AMXBF16*`)", "bf16", None, 1),
    ("INT8 (`AMXINT8*`)", "int8", None, 1),
    ("FP8 128x128 (`AMXFP8*`)", "fp8", 128, 128),
    ("INT4 (`AMXINT4*`)", "int4", None, 1),
    ("INT4 K-group 32 (`AMXINT4_KGroup*`)", "int4_kgroup", 32, 1),
    ("INT4 K-group 128", "int4_kgroup", 128, 1),
]


def layer_bytes(fmt_name: str, E: int, H: int, I: int, group=None, block_rows: int = 1) -> int:
    """Bytes of one layer's packed gate, up [E, I, H] and down [E, H, I] in a format."""
    fmt = FORMATS[fmt_name]
    total = 0
    for R, C in ((I, H), (I, H), (H, I)):
        g = C if group is None else group
        for dtype, shape in fmt.tensor_spec(E, R, C, g, block_rows).values():
            n = 1
            for s in shape:
                n *= s
            total += n * torch.empty((), dtype=dtype).element_size()
    return total


def table() -> str:
    lines = ["| model (E, H, I, MoE layers) | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, E, H, I, L in MODELS:
        cells = [f"{L * layer_bytes(f, E, H, I, g, br) / 2**30:,.0f} GiB" for _, f, g, br in COLUMNS]
        lines.append(f"| {name} ({E}, {H}, {I}, {L}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
