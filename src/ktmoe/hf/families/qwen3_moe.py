"""Qwen3-MoE: routed experts only, no shared expert."""
from . import MoEFamily

FAMILY = MoEFamily(
    name="qwen3_moe",
    experts_classes=("Qwen3MoeExperts",),
    attention_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    routing="softmax over all experts, top-k, renormalised when norm_topk_prob, cast to the model dtype; "
            "all in Qwen3MoeTopKRouter before the experts call",
)
