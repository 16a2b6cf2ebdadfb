"""ktmoe: the routed experts of Mixture-of-Experts LLMs on the CPU, forward and backward with LoRA."""
from ._version import __version__
from .checks import finite_checks, set_finite_checks
from .engine import available_isa_levels, cpu_info, set_isa
from .experts import KTMoEWrapper
from .lora import LORA_NAMES
from .methods import INFERENCE_METHODS, REGISTRY, SFT_METHODS
from .reference import moe_reference
from .sft import BaseSFTMoEWrapper
from .torch_module import KTMoEExperts, KTMoEFunction

__all__ = ["KTMoEWrapper", "KTMoEExperts", "KTMoEFunction", "BaseSFTMoEWrapper", "SFT_METHODS",
           "INFERENCE_METHODS", "REGISTRY", "LORA_NAMES", "cpu_info", "set_isa", "available_isa_levels",
           "moe_reference", "set_finite_checks", "finite_checks"]
