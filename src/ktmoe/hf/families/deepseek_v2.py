"""DeepSeek-V2 (and V2-Lite): routed experts plus `mlp.shared_experts` (an ordinary MLP); MLA attention; the
first `first_k_dense_replace` layers are dense and have no routed experts."""
from . import MoEFamily

FAMILY = MoEFamily(
    name="deepseek_v2",
    experts_classes=("DeepseekV2Experts",),
    attention_targets=("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
    routing="softmax, greedy or group_limited_greedy top-k, times routed_scaling_factor, in "
            "DeepseekV2TopkRouter (fp32) before the experts call",
)
