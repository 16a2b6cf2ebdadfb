"""The bench's workload: shape presets, seeded inputs, FLOP and byte counts, memory probes.

This file imports only torch and the standard library, never ktmoe: the kt-kernel driver
(`peer_kt_kernel.py`, run by another interpreter in another environment) imports it by path so both
sides time exactly the same data. Keep it that way."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class Preset:
    name: str
    E: int  # routed experts
    k: int  # experts per token
    H: int  # hidden size
    I: int  # moe intermediate size

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: Dict[str, Preset] = {p.name: p for p in (
    Preset("qwen3-30b-a3b", 128, 8, 2048, 768),
    Preset("deepseek-v2-lite", 64, 6, 2048, 1408),
    Preset("mixtral-8x7b", 8, 2, 4096, 14336),
    Preset("deepseek-v3", 256, 8, 7168, 2048),
    # DeepSeek-V3's expert shape with a quarter of its experts: its bf16 weights (5.3 GiB instead of 21) fit the
    # bench's bf16 source tensors on a 24 GiB machine
    Preset("deepseek-v3-e64", 64, 8, 7168, 2048),
    Preset("small", 16, 4, 512, 256),  # the accuracy comparison's default: moderate, runs in seconds
    Preset("tiny", 8, 2, 256, 128),
)}

LORA_ORDER = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")


# ---------------------------------------------------------------- counting
def pair_flops(H: int, I: int, r: int) -> Tuple[int, int]:
    """(forward, backward) FLOPs of one (token, expert) pair; see ktmoe.bench's docstring."""
    fwd = 6 * H * I + 6 * r * (H + I)
    bwd = 6 * H * I + 12 * r * (H + I)
    return fwd, bwd


def step_flops(n_pairs: int, H: int, I: int, r: int) -> Tuple[int, int]:
    f, b = pair_flops(H, I, r)
    return n_pairs * f, n_pairs * b


def weight_bytes_bf16(E: int, H: int, I: int) -> int:
    return 3 * E * H * I * 2


def lora_numel(E: int, H: int, I: int, r: int) -> int:
    return E * r * (2 * H + 2 * I + I + H)


def bandwidth_bytes(n_touched: int, H: int, I: int) -> int:
    """The weights a fwd+bwd step must stream at least: each touched expert's bf16 weights, twice."""
    return 2 * n_touched * 3 * H * I * 2


# ---------------------------------------------------------------- inputs
def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def make_weights(E: int, H: int, I: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate, up [E, I, H] and down [E, H, I], bf16, N(0, 1/fan_in); generated in place (no fp32 copy)."""
    g = _gen(seed)
    out = []
    for shape, fan_in in (((E, I, H), H), ((E, I, H), H), ((E, H, I), I)):
        t = torch.empty(shape, dtype=torch.bfloat16)
        for e in range(E):  # per expert: bounded temporaries, same numbers whatever the dtype support
            t[e].normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
        out.append(t)
    return out[0], out[1], out[2]


def make_lora(E: int, H: int, I: int, r: int, dtype: torch.dtype, seed: int = 1) -> Dict[str, torch.Tensor]:
    """The six LoRA tensors (contract layout). A ~ N(0, 1/fan_in), B ~ N(0, 0.02^2): B is non-zero on
    purpose so the LoRA terms are real work, not multiplications by zero."""
    g = _gen(seed)
    shapes = dict(gate_lora_a=(E, r, H), gate_lora_b=(E, I, r), up_lora_a=(E, r, H), up_lora_b=(E, I, r),
                  down_lora_a=(E, r, I), down_lora_b=(E, H, r))
    lora = {}
    for name in LORA_ORDER:
        shape = shapes[name]
        std = 1.0 / math.sqrt(shape[2]) if name.endswith("_a") else 0.02
        lora[name] = (torch.randn(shape, generator=g) * std).to(dtype).contiguous()
    return lora


def make_inputs(T: int, E: int, k: int, H: int, seed: int = 2
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden_states [T, H] bf16, expert_ids [T, k] int64 (distinct per token, uniform), routing weights
    [T, k] fp32 (softmax of random logits), grad_output [T, H] bf16."""
    g = _gen(seed * 1_000_003 + T)
    x = torch.randn((T, H), generator=g).to(torch.bfloat16)
    ids = torch.rand((T, E), generator=g).topk(k, dim=1).indices.to(torch.int64).contiguous()
    w = torch.softmax(torch.randn((T, k), generator=g), dim=-1).contiguous()
    dy = torch.randn((T, H), generator=g).to(torch.bfloat16)
    return x, ids, w, dy


def touched_experts(ids: torch.Tensor) -> int:
    v = ids[ids >= 0]
    return int(torch.unique(v).numel())


# ---------------------------------------------------------------- memory
def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return -1 if kb is None else kb * 1024


def mem_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def allowed_cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def median(xs):
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
