"""convert_model(): swap each MoE layer's routed-experts module for a ktmoe-backed one."""
from __future__ import annotations

import copyreg
import os
import re
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from .experts import KTMoEHFExperts
from .model_walk import base_model_of, routed_experts, unwrap_model  # noqa: F401 (re-exported)
from .families import get_family
from ..parallel.expert_parallel import exchange_group, placement

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
DEFAULT_SFT_METHOD = "AMXBF16_SFT"
DEFAULT_INFERENCE_METHOD = "AMXBF16"
MAX_GROUP_SIZE = 128


def _is_peft_wrapped(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def default_group_size(hidden_size: int, intermediate_size: int, threadpool_count: int = 1,
                       method: str = "") -> int:
    """The largest group size <= 128 that a K-group method accepts for these shapes: it divides hidden_size (the
    K of gate/up) and the TP slice moe_intermediate_size / threadpool_count (the K of down, each slice starting on
    a group boundary), and is even (two int4 weights per byte). A clear error when there is none."""
    slice_ = intermediate_size // threadpool_count
    for g in range(min(MAX_GROUP_SIZE, hidden_size, slice_), 1, -1):
        if g % 2 == 0 and hidden_size % g == 0 and slice_ % g == 0:
            return g
    raise ValueError(f"{method or 'K-group method'}: no group size <= {MAX_GROUP_SIZE} fits hidden_size={hidden_size} "
                     f"and moe_intermediate_size / threadpool_count = {slice_} (it must be even and divide both); "
                     "pick a per-row method (e.g. AMXINT4) or pass group_size= explicitly")


# ---------------------------------------------------------------- the converted model's class

_CONVERTED: Dict[type, type] = {}


def _converted_class(cls: type) -> type:
    """A subclass of the model's class, with the same name, whose save_pretrained writes full expert weights
    (see ktmoe.hf.export). Copying and pickling keep it (copyreg below)."""
    if getattr(cls, "_ktmoe_converted", False):
        return cls
    sub = _CONVERTED.get(cls)
    if sub is None:
        from .export import save_pretrained as _save

        def save_pretrained(self, save_directory, *args, **kwargs):
            return _save(self, super(sub, self).save_pretrained, save_directory, *args, **kwargs)

        save_pretrained.__doc__ = _save.__doc__
        sub = type(cls.__name__, (cls,), {"save_pretrained": save_pretrained, "_ktmoe_converted": True,
                                          "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _CONVERTED[cls] = sub
        copyreg.pickle(sub, _reduce_converted)
    return sub


def _reduce_converted(obj):
    state = obj.__getstate__() if hasattr(obj, "__getstate__") else obj.__dict__
    return _new_converted, (type(obj).__mro__[1],), state


def _new_converted(cls: type):
    obj = cls.__new__(cls)
    obj.__class__ = _converted_class(cls)
    return obj


# ---------------------------------------------------------------- convert

_WRAPPER_OPTIONS = ("chunked_prefill_size", "subpool_cpus", "numa_local")
_FROM_MODEL = ("layer_idx", "num_experts", "num_experts_per_tok", "hidden_size", "moe_intermediate_size")


def _check_options(mode, method, lora_rank, lora_alpha, weight_path, group_size, lora_dropout, num_gpu_experts,
                   extra: dict, who: str = "convert_model"):
    from ..methods import REGISTRY, check_method

    bad_shape = sorted(k for k in extra if k in _FROM_MODEL)
    if bad_shape:
        raise TypeError(f"{who}(): {', '.join(bad_shape)} come(s) from the model's config and may not be "
                        "given")
    unknown = sorted(k for k in extra if k not in _WRAPPER_OPTIONS)
    if unknown:
        raise TypeError(f"{who}() got unexpected keyword argument(s) {', '.join(unknown)}; valid: mode, "
                        f"method, lora_rank, lora_alpha, cpuinfer_threads, threadpool_count, "
                        f"{'dtype, progress' if who != 'convert_model' else 'weight_path, mmap'}, group_size, "
                        f"seed, generator, {', '.join(_WRAPPER_OPTIONS)}")
    check_method(mode, method)
    if mode == "sft" and (lora_rank is None or lora_alpha is None):
        raise TypeError(f"{who}(mode='sft') needs lora_rank= and lora_alpha=")
    if lora_rank is not None and (not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank < 0):
        raise ValueError(f"lora_rank must be a non-negative int, got {lora_rank!r}")
    if lora_rank and lora_alpha is None:
        raise TypeError(f"lora_rank={lora_rank} needs lora_alpha=")
    if lora_dropout != 0.0:
        raise ValueError(f"lora_dropout={lora_dropout}: only 0.0 is supported by the CPU experts")
    if num_gpu_experts != 0:
        raise ValueError(f"num_gpu_experts={num_gpu_experts}: only 0 is supported (all routed experts run on "
                         "the CPU)")
    if weight_path is not None:
        if not isinstance(weight_path, (str, os.PathLike)) or not os.path.isdir(weight_path):
            raise FileNotFoundError(f"weight_path={weight_path!r} is not a folder (expected one written by "
                                    "`python -m ktmoe.convert`)")
        from ..weights_io import MANIFEST_NAME

        if not os.path.isfile(os.path.join(weight_path, MANIFEST_NAME)):
            raise FileNotFoundError(f"weight_path={weight_path!r} has no {MANIFEST_NAME} (expected a folder written "
                                    "by `python -m ktmoe.convert`)")
    per_group = getattr(REGISTRY[method].weight_format, "per_group", False)
    if group_size is not None and not per_group:
        raise ValueError(f"group_size={group_size} applies to K-group methods only, not {method}")
    return per_group


def _expert_parallel_group(expert_parallel, process_group):
    """The group the expert-parallel exchanges run on (None: not expert parallel)."""
    if not isinstance(expert_parallel, bool):
        raise TypeError(f"expert_parallel must be True or False, got {expert_parallel!r}")
    if not expert_parallel:
        if process_group is not None:
            raise ValueError("process_group= is for expert_parallel=True")
        return None
    return exchange_group(process_group)


@torch.no_grad()
def convert_model(model: nn.Module, *, lora_rank: Optional[int] = None, lora_alpha: Optional[float] = None,
                  mode: str = "sft", method: Optional[str] = None, cpuinfer_threads: Optional[int] = None,
                  threadpool_count: int = 1, weight_path: Optional[str] = None, group_size: Optional[int] = None,
                  seed: Optional[int] = None, generator: Optional[torch.Generator] = None, lora_dropout: float = 0.0,
                  num_gpu_experts: int = 0, mmap: bool = False, expert_parallel: bool = False, process_group=None,
                  **wrapper_options) -> nn.Module:
    """Replaces, in place, every routed-experts module of a transformers v5 MoE model (qwen3_moe, qwen2_moe,
    mixtral, deepseek_v2, deepseek_v3) by a `KTMoEHFExperts`: the frozen expert weights are packed into the
    ktmoe engine (CPU memory) and the original tensors are released; six trainable fp32 LoRA parameters
    (`gate_lora_a` ... `down_lora_b`, rank `lora_rank`, scale `lora_alpha / lora_rank`) appear in their place.
    The router, shared experts, attention and everything else stay as they are, on their device.

    mode="sft" (default; method default AMXBF16_SFT, any *_SFT method) trains the LoRA; lora_rank and lora_alpha
    are required. mode="inference" (method default AMXBF16; AMXINT8, AMXINT4, AMXINT4_1, AMXINT4_KGroup, ...) is
    forward only, for generate() and serving with quantized experts; lora_rank defaults to 0 (no LoRA), and a
    LoRA given (by `from_adapter`, or loaded into the parameters) is applied, not trained.

    weight_path: a folder written by `python -m ktmoe.convert` for the same method: each layer's experts are
    read from it (the model's own expert tensors are not read, they may be on the meta device). mmap=True (needs
    weight_path): the layers stay memory-mapped (`load_weights(mmap=True)`) instead of copied, so processes on one
    node that convert from the same folder share one copy of the frozen experts in the page cache; every call
    checks that the file is unchanged (a rewritten or replaced file is refused: load again), and TP subpools
    read the shared mapping, with no node-local copies (numa_local=True is refused). group_size
    (K-group methods only): default, the largest valid size <= 128 (`default_group_size`).
    chunked_prefill_size, subpool_cpus, numa_local go to the wrapper as they are; any other keyword is refused.

    expert_parallel=True (torch.distributed initialised; every rank of `process_group`, default the default
    group, calls convert_model on the same model): each rank packs only its contiguous block of every layer's
    experts (`ktmoe.parallel.expert_blocks`; from the model's tensors or from weight_path, which then reads only
    that block) and every layer call exchanges the tokens with the owners (`ktmoe.parallel.expert_parallel`).
    Every rank must then run every layer call (data-parallel training does); `ktmoe.hf.save_adapter` (every rank)
    gathers one whole adapter, `load_adapter` / `from_adapter` give each rank its block. Each rank's LoRA
    parameters are its block: they are not replicated, so keep them out of DDP and of any gradient all-reduce.

    Call it before `get_peft_model` / `ktmoe.hf.add_lora` (PEFT must not wrap the experts) and before moving
    the model to a GPU if the GPU cannot hold the experts (after conversion `model.to("cuda")` moves
    everything except the routed experts). LoRA A matrices are drawn from `generator` (or a new one seeded
    with `seed`, or the global RNG), B matrices start at zero. Returns the model."""
    if method is None:
        method = DEFAULT_SFT_METHOD if mode == "sft" else DEFAULT_INFERENCE_METHOD
    per_group = _check_options(mode, method, lora_rank, lora_alpha, weight_path, group_size, lora_dropout,
                               num_gpu_experts, wrapper_options)
    ep_group = _expert_parallel_group(expert_parallel, process_group)
    if lora_rank is None:
        lora_rank = 0
    if lora_alpha is None:
        lora_alpha = 1.0
    outer = unwrap_model(model)
    base = base_model_of(outer)
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
        if weight_path is None and module.gate_up_proj.device.type == "meta":
            raise ValueError(f"{name} holds meta tensors: load the real weights before converting, or give "
                             "weight_path= (a folder written by `python -m ktmoe.convert`)")
    if per_group and group_size is None:
        gate, _, _ = family.read_weights(targets[0][1])
        E, I, H = gate.shape
        group_size = default_group_size(H, I, threadpool_count, method)
    extra = dict(wrapper_options)
    if group_size is not None:
        extra["group_size"] = group_size
    for i in range(len(targets)):
        name, module = targets[i]
        targets[i] = None  # drop our reference: the original expert tensors go with the module
        m = _LAYER_RE.search("." + name)
        layer_idx = int(m.group(1)) if m else i
        src = module.gate_up_proj
        ep = None if not expert_parallel else placement(family.read_weights(module)[0].shape[0], ep_group)
        new = KTMoEHFExperts.from_module(module, family=family, num_experts_per_tok=k, lora_rank=lora_rank,
                                         lora_alpha=lora_alpha, layer_idx=layer_idx, generator=generator,
                                         cpuinfer_threads=cpuinfer_threads, threadpool_count=threadpool_count,
                                         mode=mode, method=method, weight_path=weight_path, mmap=mmap,
                                         expert_parallel=ep, **extra)
        new.source_dtype = src.dtype if src.is_floating_point() else torch.bfloat16
        new.source_transposed = bool(getattr(module, "is_transposed", False))
        parent_name, _, attr = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, attr, new)
        del module, new, src
    base.__class__ = _converted_class(type(base))
    return model


__all__ = ["convert_model", "routed_experts", "base_model_of", "unwrap_model", "default_group_size"]
