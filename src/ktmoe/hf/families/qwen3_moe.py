"""Qwen3-MoE: routed experts only, no shared expert."""
from . import MoEFamily

FAMILY = MoEFamily(
    name="qwen3_moe",
    experts_classes=("Qwen3MoeExperts",),
    attention_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    routing="softmax over all experts, top-k, renormalised when norm_topk_prob, cast to the model dtype; "
            "all in Qwen3MoeTopKRouter before the experts call",
    tiny=dict(vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
              norm_topk_prob=True),
)
