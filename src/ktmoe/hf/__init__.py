"""Hugging Face integration: transformers v5 MoE models with their routed experts on ktmoe, LoRA via PEFT.

    model = AutoModelForCausalLM.from_pretrained(...)            # or any qwen3_moe / qwen2_moe / mixtral /
    ktmoe.hf.convert_model(model, lora_rank=8, lora_alpha=16)    #    deepseek_v2 / deepseek_v3 model
    # or, streaming the experts from the shards (fp8 / compressed-tensors int4 checkpoints as they ship):
    model = ktmoe.hf.from_pretrained(DIR, method="AMXFP8_SFT", lora_rank=8, lora_alpha=16)
    model.to("cuda")                                             # everything but the routed experts
    model = ktmoe.hf.add_lora(model, r=8, lora_alpha=16)         # PEFT LoRA on attention
    ... train: every parameter with requires_grad (attention LoRA + expert LoRA) in one optimizer ...
    ktmoe.hf.save_adapter(model, "out/adapter")                  # PEFT format, loads without ktmoe
    model = ktmoe.hf.from_adapter(fresh_model, "out/adapter")     # back into ktmoe, to train on or serve

Why a module swap and not an `experts_implementation`: transformers' `ExpertsInterface` lets a function replace
the experts' forward, but (1) the function is called with the original experts module as `self`, which keeps
its `gate_up_proj` / `down_proj` parameters: they would stay in the model, be moved to the GPU with it, and
be counted and saved with it, while the point here is that they live only in the CPU engine's packed copy;
(2) the six trainable LoRA tensors need an owning module with stable names next to PEFT's; (3) PEFT's
`target_parameters` LoRA wraps that same module in `ParamWrapper`s that re-parametrise `gate_up_proj` as
W + dW on every call, which a ktmoe forward would have to undo; (4) the implementation is chosen by one
config string for all layers. Swapping the module (`KTMoEHFExperts`, same call signature
`(hidden_states, top_k_index, top_k_weights)`) keeps routers, shared experts and attention untouched,
frees the original expert tensors, and gives PEFT nothing to wrap. The adapter still speaks PEFT's
`target_parameters` format (see `ktmoe.hf.adapter`)."""
from .adapter import (add_lora, adapter_state_dict, block_diagonal_mask, expert_lora_to_peft, from_adapter,
                      load_adapter, lora_config, peft_expert_wrappers, peft_reference, peft_to_expert_lora,
                      read_adapter, save_adapter, trainable_parameters, write_adapter)
from .convert import base_model_of, convert_model, default_group_size, routed_experts, unwrap_model
from .experts import KTMoEHFExperts, live_saved_forwards
from .families import MoEFamily, families, get_family, tiny_model
from .loading import from_pretrained
from .peft_layout import identify_layer, peft_swaps, swap_orientation

__all__ = ["from_pretrained", "convert_model", "routed_experts", "base_model_of", "unwrap_model", "default_group_size", "KTMoEHFExperts", "live_saved_forwards",
           "MoEFamily", "families", "get_family", "tiny_model", "add_lora", "trainable_parameters", "lora_config",
           "expert_lora_to_peft", "peft_to_expert_lora", "block_diagonal_mask", "adapter_state_dict",
           "save_adapter", "write_adapter", "read_adapter", "load_adapter", "from_adapter", "peft_reference",
           "peft_expert_wrappers", "peft_swaps", "swap_orientation", "identify_layer"]
