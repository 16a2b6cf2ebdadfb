"""DeepSeek-V3 / R1: routed experts plus `mlp.shared_experts`; MLA attention; sigmoid router with grouped
top-k and a score-correction bias; the first `first_k_dense_replace` layers are dense."""
from . import MoEFamily

FAMILY = MoEFamily(
    name="deepseek_v3",
    experts_classes=("DeepseekV3Experts",),
    attention_targets=("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
    routing="sigmoid scores, grouped top-k on scores + e_score_correction_bias, weights gathered from the "
            "uncorrected scores, renormalised when norm_topk_prob, times routed_scaling_factor, all in "
            "DeepseekV3TopkRouter (fp32) before the experts call",
)
