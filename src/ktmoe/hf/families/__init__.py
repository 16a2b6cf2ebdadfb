"""Model families: how to find the routed experts of a transformers v5 MoE model and read their weights.

A family is one small module in this package defining `FAMILY = MoEFamily(...)`, plus one entry in
`_FAMILY_MODULES` below. Everything else (conversion, adapter I/O, training) is family-independent.

All five supported families keep their routed experts fused in one `nn.Module` per layer
(`gate_up_proj` [E, 2I, H] with the gate rows first, `down_proj` [E, H, I]) behind
`transformers.integrations.moe.use_experts_implementation`, called as
`experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`. The routers apply every
scaling (softmax/sigmoid, `norm_topk_prob`, `routed_scaling_factor`, grouped top-k) *before* that call,
so the weights the experts receive are final: the experts compute `sum_j w_j * expert_j(x)` and nothing
else, which is exactly what ktmoe's kernels compute."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

# one entry per family module in this package
_FAMILY_MODULES = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3")


def read_fused_experts(module: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate_proj [E, I, H], up_proj [E, I, H], down_proj [E, H, I] from a transformers v5 fused experts module
    (`gate_up_proj` [E, 2I, H], gate rows first; `down_proj` [E, H, I]); views, no copies where possible."""
    if getattr(module, "has_bias", False):
        raise ValueError(f"{type(module).__name__} has expert biases, which ktmoe does not support")
    if not getattr(module, "has_gate", True) or not hasattr(module, "gate_up_proj"):
        raise ValueError(f"{type(module).__name__} has no fused gate_up_proj (non-gated experts are not supported)")
    if not getattr(module, "is_concatenated", True):
        raise ValueError(f"{type(module).__name__} stores gate/up interleaved, which ktmoe does not support")
    gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
    if getattr(module, "is_transposed", False):  # [E, H, 2I] / [E, I, H]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] % 2:
        raise ValueError(f"unexpected expert shapes gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)}")
    I = gate_up.shape[1] // 2
    return gate_up[:, :I], gate_up[:, I:], down


@dataclass(frozen=True)
class MoEFamily:
    """What ktmoe needs to know about one model family."""

    name: str                                   # the family's config.model_type
    experts_classes: Tuple[str, ...]            # class names of the routed-experts modules
    attention_targets: Tuple[str, ...]          # default PEFT target_modules for attention LoRA
    routing: str = ""                           # where the routing weights get their scaling (documentation)
    model_types: Tuple[str, ...] = ()           # further config.model_type values served by this family
    experts_path: str = "mlp.experts"           # suffix of the experts modules' names (PEFT target_parameters)
    read_weights: Callable[[nn.Module], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default=read_fused_experts)
    tiny: Dict[str, object] = field(default_factory=dict)  # config kwargs of a tiny model for tests / smoke runs
    # raises when the installed transformers cannot run this config (checked by convert_model / from_pretrained)
    check_transformers: Optional[Callable[[object], None]] = None

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)

    def is_experts(self, name: str, module: nn.Module) -> bool:
        return type(module).__name__ in self.experts_classes

    @property
    def target_parameters(self) -> Tuple[str, str]:
        """PEFT `target_parameters` naming the fused expert tensors."""
        return (f"{self.experts_path}.gate_up_proj", f"{self.experts_path}.down_proj")

    def check_config(self, config) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{self.name}: hidden_act={act!r}; ktmoe's expert kernels implement silu only")
        if self.check_transformers is not None:
            self.check_transformers(config)


_FAMILIES: Dict[str, MoEFamily] = {}


def families() -> Dict[str, MoEFamily]:
    """All registered families by model_type (loaded on first use)."""
    if not _FAMILIES:
        for mod in _FAMILY_MODULES:
            fam: MoEFamily = importlib.import_module(f"{__name__}.{mod}").FAMILY
            for t in (fam.name, *fam.model_types):
                _FAMILIES[t] = fam
    return _FAMILIES


def get_family(model_or_config) -> MoEFamily:
    """The family of a transformers model (or its config), by `config.model_type`; a clear error otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    fams = families()
    if model_type not in fams:
        raise ValueError(f"ktmoe has no model family for model_type={model_type!r}; supported: "
                         f"{', '.join(sorted(fams))}")
    return fams[model_type]


def tiny_model(model_type: str, seed: int = 0, bf16_experts: bool = True, **overrides) -> nn.Module:
    """A tiny randomly initialised causal LM of a family (its `tiny` config, updated by overrides), fp32 on the
    CPU. bf16_experts rounds the routed experts' weights to bf16-representable values, as ktmoe stores them,
    so the converted and the unconverted model hold the same numbers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fam = families()[model_type]
    config = AutoConfig.for_model(fam.name, **{**fam.tiny, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if bf16_experts:
        with torch.no_grad():
            for n, m in model.named_modules():
                if fam.is_experts(n, m):
                    for p in (m.gate_up_proj, m.down_proj):
                        p.copy_(p.to(torch.bfloat16).to(p.dtype))
    return model


__all__ = ["MoEFamily", "families", "get_family", "read_fused_experts", "tiny_model"]
