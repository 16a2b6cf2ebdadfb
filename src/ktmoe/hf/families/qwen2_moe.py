"""Qwen2-MoE: routed experts plus a sigmoid-gated shared expert (`mlp.shared_expert`, `mlp.shared_expert_gate`),
which stays an ordinary module on the model's device."""
from . import MoEFamily

FAMILY = MoEFamily(
    name="qwen2_moe",
    experts_classes=("Qwen2MoeExperts",),
    attention_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    routing="softmax, top-k, renormalised when norm_topk_prob (default off), in Qwen2MoeTopKRouter; the "
            "shared expert is added by Qwen2MoeSparseMoeBlock after the experts call",
    tiny=dict(vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
              shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
)
