"""Qwen2-MoE: routed experts plus a sigmoid-gated shared expert (`mlp.shared_expert`, `mlp.shared_expert_gate`),
which stays an ordinary module on the model's device."""
from . import MoEFamily

FAMILY = MoEFamily(
    name="qwen2_moe",
    experts_classes=("Qwen2MoeExperts",),
    attention_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    routing="softmax, top-k, renormalised when norm_topk_prob (default off), in Qwen2MoeTopKRouter; the "
            "shared expert is added by Qwen2MoeSparseMoeBlock after the experts call",
)
