"""DeepSeek-V3 / R1: routed experts plus `mlp.shared_experts`; MLA attention; sigmoid router with grouped
top-k and a score-correction bias; the first `first_k_dense_replace` layers are dense."""
from . import MoEFamily

FAMILY = MoEFamily(
    name="deepseek_v3",
    # transformers 5.6 names the same fused module (gate_up_proj [E, 2I, H], down_proj [E, H, I], routed by
    # DeepseekV3MoE before the call) DeepseekV3NaiveMoe
    experts_classes=("DeepseekV3Experts", "DeepseekV3NaiveMoe"),
    attention_targets=("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
    routing="sigmoid scores, grouped top-k on scores + e_score_correction_bias, weights gathered from the "
            "uncorrected scores, renormalised when norm_topk_prob, times routed_scaling_factor, all in "
            "DeepseekV3TopkRouter (fp32) before the experts call",
    tiny=dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
              first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
              n_group=2, topk_group=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
              routed_scaling_factor=2.5, norm_topk_prob=True),
)
