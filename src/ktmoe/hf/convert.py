"""convert_model(): swap each MoE layer's routed-experts module for a ktmoe-backed one."""
from __future__ import annotations

import re
from typing import Dict, Optional

import torch
from torch import nn

from .experts import KTMoEHFExperts
from .families import get_family

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def routed_experts(model: nn.Module) -> Dict[str, KTMoEHFExperts]:
    """{name in the transformers model: module} of the ktmoe experts modules, in model order."""
    base = base_model_of(model)
    return {n: m for n, m in base.named_modules() if isinstance(m, KTMoEHFExperts)}


def _is_peft_wrapped(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


@torch.no_grad()
def convert_model(model: nn.Module, *, lora_rank: int, lora_alpha: float, cpuinfer_threads: Optional[int] = None,
                  threadpool_count: int = 1, method: str = "AMXBF16_SFT", seed: Optional[int] = None,
                  generator: Optional[torch.Generator] = None, **wrapper_kwargs) -> nn.Module:
    """Replaces, in place, every routed-experts module of a transformers v5 MoE model (qwen3_moe, qwen2_moe,
    mixtral, deepseek_v2, deepseek_v3) by a `KTMoEHFExperts`: the frozen expert weights are packed into the
    ktmoe engine (CPU memory) and the original tensors are released; six trainable fp32 LoRA parameters
    (`gate_lora_a` ... `down_lora_b`, rank `lora_rank`, scale `lora_alpha / lora_rank`) appear in their place.
    The router, shared experts, attention and everything else stay as they are, on their device.

    Call it before `get_peft_model` / `ktmoe.hf.add_lora` (PEFT must not wrap the experts) and before moving
    the model to a GPU if the GPU cannot hold the experts (after conversion `model.to("cuda")` moves
    everything except the routed experts). LoRA A matrices are drawn from `generator` (or a new one seeded
    with `seed`, or the global RNG), B matrices start at zero. Returns the model."""
    base = base_model_of(model)
    family = get_family(base)
    family.check_config(base.config)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    k = family.top_k(base.config)
    targets = [(n, m) for n, m in base.named_modules() if family.is_experts(n, m) or
               (_is_peft_wrapped(m) and family.is_experts(n, m.get_base_layer()))]
    if any(isinstance(m, KTMoEHFExperts) for m in base.modules()):
        raise ValueError("this model is already converted to ktmoe experts")
    if not targets:
        raise ValueError(f"no routed-experts modules ({', '.join(family.experts_classes)}) found in this "
                         f"{family.name} model")
    for name, module in targets:
        if _is_peft_wrapped(module):
            raise ValueError(f"{name} is wrapped by PEFT (target_parameters); call ktmoe.hf.convert_model() "
                             "before get_peft_model(), then ktmoe.hf.add_lora() for the other layers")
        if module.gate_up_proj.device.type == "meta":
            raise ValueError(f"{name} holds meta tensors: load the real weights before converting")
    for i in range(len(targets)):
        name, module = targets[i]
        targets[i] = None  # drop our reference: the original expert tensors go with the module
        m = _LAYER_RE.search("." + name)
        layer_idx = int(m.group(1)) if m else i
        new = KTMoEHFExperts.from_module(module, family=family, num_experts_per_tok=k, lora_rank=lora_rank,
                                         lora_alpha=lora_alpha, layer_idx=layer_idx, generator=generator,
                                         cpuinfer_threads=cpuinfer_threads, threadpool_count=threadpool_count,
                                         method=method, **wrapper_kwargs)
        parent_name, _, attr = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, attr, new)
        del module, new
    return model
