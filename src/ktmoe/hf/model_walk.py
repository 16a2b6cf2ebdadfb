"""Finding things in a (wrapped) transformers model: the model inside DDP / FSDP / accelerate / PEFT wrappers,
and its ktmoe experts modules. Used by the conversion, the adapters and the export."""
from __future__ import annotations

from typing import Dict

from torch import nn

from .experts import KTMoEHFExperts


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / FSDP (v1) / DeepSpeed / accelerate wrappers and
    torch.compile (`.module`, `._orig_mod`), or the model itself."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and not hasattr(model, "config"):
            model = inner
    return model


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT PeftModel (or the model itself), through any DDP / FSDP / accelerate
    wrapper."""
    model = unwrap_model(model)
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def routed_experts(model: nn.Module) -> Dict[str, KTMoEHFExperts]:
    """{name in the transformers model: module} of the ktmoe experts modules, in model order."""
    base = base_model_of(model)
    return {n: m for n, m in base.named_modules() if isinstance(m, KTMoEHFExperts)}
