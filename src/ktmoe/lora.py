"""The six LoRA tensors of a routed-experts layer: their names and shapes (out x in, like nn.Linear.weight).

The wrappers, the fp32 reference, the torch module and the Hugging Face adapter all name and size the LoRA
from here."""
from __future__ import annotations

from typing import Dict, Tuple

LORA_NAMES = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")


def lora_shapes(E: int, H: int, I: int, r: int) -> Dict[str, Tuple[int, int, int]]:
    """{name: shape} in LORA_NAMES order for E experts, hidden size H, intermediate size I and rank r."""
    return dict(gate_lora_a=(E, r, H), gate_lora_b=(E, I, r), up_lora_a=(E, r, H), up_lora_b=(E, I, r),
                down_lora_a=(E, r, I), down_lora_b=(E, H, r))
