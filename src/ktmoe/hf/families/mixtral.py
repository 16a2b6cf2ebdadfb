"""Mixtral: routed experts only (intermediate_size is the expert size)."""
from . import MoEFamily

FAMILY = MoEFamily(
    name="mixtral",
    experts_classes=("MixtralExperts",),
    attention_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    routing="softmax, top-k, always renormalised (fp32) in MixtralTopKRouter; router jitter noise (training "
            "only) is applied to the block input before routing",
)
