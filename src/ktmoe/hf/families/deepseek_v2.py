"""DeepSeek-V2 (and V2-Lite): routed experts plus `mlp.shared_experts` (an ordinary MLP); MLA attention; the
first `first_k_dense_replace` layers are dense and have no routed experts."""
from . import MoEFamily


def _check_transformers(config) -> None:
    """transformers 5.6's DeepseekV2Moe.route_tokens_to_experts reads `self.num_experts` for
    topk_method="group_limited_greedy" (DeepSeek-V2 / V2-Chat; V2-Lite is "greedy") but never sets it: the
    unconverted model fails in its first forward, and so would the converted one (the router stays
    transformers'). Told by running that router on meta tensors (no memory, no compute); 5.24 routes in a
    DeepseekV2TopkRouter instead and has no such method."""
    if getattr(config, "topk_method", "greedy") != "group_limited_greedy":
        return
    import torch
    import transformers
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as mod

    with torch.device("meta"):
        block = mod.DeepseekV2Moe(config)
        route = getattr(block, "route_tokens_to_experts", None)
        if route is None:
            return
        try:
            route(torch.zeros(1, 1, config.n_routed_experts))
        except AttributeError as e:
            raise ValueError(f"deepseek_v2: transformers {transformers.__version__}'s DeepseekV2Moe cannot route "
                             f"topk_method='group_limited_greedy' ({e}; its forward fails before ktmoe is "
                             "involved): install a newer transformers (5.24 works), or use a config with "
                             "topk_method='greedy'") from None
        except Exception:  # anything else is not this defect; the model's own forward will tell
            return


FAMILY = MoEFamily(
    name="deepseek_v2",
    experts_classes=("DeepseekV2Experts",),
    attention_targets=("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
    routing="softmax, greedy or group_limited_greedy top-k, times routed_scaling_factor, in "
            "DeepseekV2TopkRouter (fp32) before the experts call",
    tiny=dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
              first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
              num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.0,
              topk_method="group_limited_greedy", n_group=2, topk_group=1),
    check_transformers=_check_transformers,
)
