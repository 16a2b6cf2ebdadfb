"""KTMoEWrapper: the one front door. mode= and method= pick the wrapper; everything native stays hidden.

The factory joins the method table (ktmoe.methods, pure data) to the code: the method's mode names the
wrapper class, its format name the weight format, which the class receives through its constructor."""
from __future__ import annotations

from .formats import get_format
from .methods import check_method
from .sft.base import BaseSFTMoEWrapper
from .sft.wrappers import AMXSFTMoEWrapper, InferenceMoEWrapper

WRAPPERS = {"sft": AMXSFTMoEWrapper, "inference": InferenceMoEWrapper}  # mode (ktmoe.methods.MODES) -> class


def KTMoEWrapper(*, mode: str = "sft", method: str = "AMXBF16_SFT", **kwargs) -> BaseSFTMoEWrapper:
    """Creates the routed-experts wrapper of one MoE layer.

    Arguments (see the README for all): layer_idx, num_experts, num_experts_per_tok, hidden_size,
    moe_intermediate_size, num_gpu_experts=0, cpuinfer_threads=None, threadpool_count=1, weight_path=None,
    chunked_prefill_size=4096, lora_rank=16, lora_alpha=32.0, lora_dropout=0.0, group_size=128,
    activation_quant=None ("int8": the W8A8 forward of the per-row int8/int4/int4_1 methods)."""
    spec = check_method(mode, method)
    return WRAPPERS[spec.mode](weight_format=get_format(spec.format_name), method=method, **kwargs)
