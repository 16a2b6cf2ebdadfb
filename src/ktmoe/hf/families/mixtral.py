"""Mixtral: routed experts only (intermediate_size is the expert size)."""
from . import MoEFamily

FAMILY = MoEFamily(
    name="mixtral",
    experts_classes=("MixtralExperts",),
    attention_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    routing="softmax, top-k, always renormalised (fp32) in MixtralTopKRouter; router jitter noise (training "
            "only) is applied to the block input before routing",
    tiny=dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2),
)
