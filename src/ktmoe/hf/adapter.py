"""LoRA adapters in PEFT's own format, so that plain transformers + PEFT (no ktmoe) can load them.

Expert LoRA is saved as PEFT `target_parameters` LoRA on the fused expert tensors
(`target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`); attention (or any other module)
LoRA is ordinary PEFT `target_modules` LoRA, in the same adapter, trained by the same optimizer.

The mapping is exact. ktmoe has, per expert e, rank r and scale s = alpha / r:
    dW_gate = s Bg Ag,  dW_up = s Bu Au,  dW_down = s Bd Ad.
PEFT's LoRA on `gate_up_proj` [E, 2I, H] has one A [R, H] and one B [2I, R] per expert, delta = s' B A. With
R = 2r, A = [Ag; Au] (stacked rows) and B = [[Bg, 0], [0, Bu]] (block-diagonal), B A = [Bg Ag; Bu Au].
Scales must match: s' = alpha' / R = s, so the gate_up entry gets rank 2r and alpha 2*alpha (alpha*sqrt(2r)/r
under use_rslora), the down_proj entry rank r and alpha alpha. One LoraConfig carries both through
`rank_pattern` / `alpha_pattern` keyed by the target-parameter names; its `r` / `lora_alpha` are the
attention LoRA's.

PEFT's block order for a 3-D parameter (verified against peft 0.21.2's and 0.18.1's
`ParamWrapper.get_delta_weight` and by tests/test_hf_adapter.py through real PEFT forwards; peft 0.18 has A and B
the other way round, see ktmoe.hf.peft_layout): `lora_A.weight` [E*R, in] is expert-major
(row e*R + j), `lora_B.weight` [out, R*E] is rank-major (column j*E + e). In that layout "block-diagonal"
means the quadrants B[:I, r*E:] and B[I:, :r*E] are zero. PEFT nests the two wrappers of one experts module
in parameter order: the gate_up_proj wrapper is inner, so its keys read `...mlp.experts.base_layer.lora_A.weight`,
the down_proj ones `...mlp.experts.lora_A.weight` (in both versions). Loading identifies the two, and the
orientation, by shape, not by nesting.

peft 0.21.2 warns, when it builds such a model, that the target_parameters keys of rank_pattern/alpha_pattern
"did not match any targeted module and were ignored": it checks them against target_modules only, and does
apply them (tests/test_hf_adapter.py checks the resulting ranks).

Loading accepts any PEFT adapter of this kind: if the gate_up B is not block-diagonal (an adapter trained by
plain PEFT), it is represented exactly with ktmoe rank R (Ag = Au = A), down padded with zeros.
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..lora import LORA_NAMES
from ..sft.base import is_dtensor
from .convert import base_model_of, convert_model, routed_experts, unwrap_model
from .experts import KTMoEHFExperts
from .peft_layout import (block_diagonal_mask, expert_lora_to_peft, identify_layer, peft_swaps,
                          peft_to_expert_lora)
from .families import get_family

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
GATE_UP_SUB = "base_layer."  # gate_up_proj's wrapper is the inner one (see module docstring)


def _peft():
    try:
        import peft  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("ktmoe.hf adapters need PEFT: pip install 'ktmoe[hf]' (transformers, peft, "
                          "safetensors)") from e
    return peft


# ---------------------------------------------------------------- configs

def _expert_alpha(scale: float, rank: int, rslora: bool) -> float:
    return scale * (math.sqrt(rank) if rslora else rank)


def _expert_patterns(family, rank: int, alpha: float, rslora: bool) -> Tuple[dict, dict]:
    gu, dn = family.target_parameters
    s = alpha / rank
    return ({gu: 2 * rank, dn: rank},
            {gu: _expert_alpha(s, 2 * rank, rslora), dn: _expert_alpha(s, rank, rslora)})


def lora_config(model_or_config, *, expert_rank: int, expert_alpha: float, r: int = 8, lora_alpha: float = 16.0,
                target_modules: Optional[Sequence[str]] = None, **lora_kwargs):
    """The PEFT LoraConfig of a ktmoe adapter: expert LoRA (rank `expert_rank`, alpha `expert_alpha`, as
    ktmoe counts them) on the fused expert tensors through target_parameters, plus LoRA of rank `r` on
    `target_modules` (default: the family's attention projections; [] for none). Applied with
    `get_peft_model` to the *unconverted* model it gives the plain-PyTorch equivalent of a converted one."""
    peft = _peft()
    family = get_family(model_or_config)
    targets = list(family.attention_targets if target_modules is None else target_modules)
    rank_pattern, alpha_pattern = _expert_patterns(family, expert_rank, expert_alpha,
                                                   bool(lora_kwargs.get("use_rslora", False)))
    rank_pattern.update(lora_kwargs.pop("rank_pattern", None) or {})
    alpha_pattern.update(lora_kwargs.pop("alpha_pattern", None) or {})
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    return peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets,
                           target_parameters=list(family.target_parameters), rank_pattern=rank_pattern,
                           alpha_pattern=alpha_pattern, lora_dropout=0.0, **lora_kwargs)


def _single_expert_lora(experts: Mapping[str, KTMoEHFExperts]) -> Tuple[int, float]:
    kinds = {(m.lora_rank, m.lora_alpha) for m in experts.values()}
    if len(kinds) != 1:
        raise ValueError(f"the experts modules use different LoRA (rank, alpha): {sorted(kinds)}; a PEFT adapter "
                         "needs one rank per target parameter")
    return kinds.pop()


# ---------------------------------------------------------------- training set-up

def _same_module(target, adapter_name, **kwargs):
    """PEFT custom-module factory: the ktmoe experts module is its own LoRA layer (see KTMoEHFExperts)."""
    return target


def _install_peft(pm, experts: Mapping[str, KTMoEHFExperts], family, adapter_name: str, experts_only: bool) -> None:
    """Makes the expert LoRA part of the PeftModel's adapter: the experts modules become its tuner layers
    (state dict keys in PEFT's target_parameters layout) and its LoraConfig names them (target_parameters,
    rank_pattern, alpha_pattern), so PEFT's own save_pretrained / get_peft_model_state_dict / load_adapter carry
    them, and with them Trainer.save_model, checkpoints and resume_from_checkpoint."""
    cfg = pm.peft_config[adapter_name]
    rank, alpha = _single_expert_lora(experts)
    for m in experts.values():
        m.attach_peft(adapter_name)
    rank_pattern, alpha_pattern = _expert_patterns(family, rank, alpha, bool(cfg.use_rslora))
    cfg.target_parameters = list(family.target_parameters)
    cfg.rank_pattern = {**(cfg.rank_pattern or {}), **rank_pattern}
    cfg.alpha_pattern = {**(cfg.alpha_pattern or {}), **alpha_pattern}
    if experts_only:
        cfg.target_modules = set()
    if getattr(cfg, "_custom_modules", None):
        cfg._custom_modules = None
    for m in experts.values():
        for p in m.lora_parameters:
            p.requires_grad_(m.trains)


def add_lora(model: nn.Module, *, r: int = 8, lora_alpha: float = 16.0, target_modules: Optional[Sequence[str]] = None,
             adapter_name: str = "default", **lora_kwargs):
    """PEFT LoRA on the non-expert layers of a converted model (default: the family's attention projections; []
    for none), next to the expert LoRA, in one PEFT adapter. Returns the PeftModel. Every trainable parameter
    (PEFT's and the experts') is in `trainable_parameters(result)`.

    The expert LoRA is part of that adapter for every PEFT path: `save_pretrained` / `get_peft_model_state_dict`
    write it in PEFT's target_parameters layout (what `save_adapter` writes, loadable by plain PEFT without
    ktmoe), `load_adapter` / `Trainer(resume_from_checkpoint=...)` restore it exactly, `disable_adapter()` turns
    it off, `merge_and_unload()` merges it (see ktmoe.hf.export for saving the merged model)."""
    peft = _peft()
    model = unwrap_model(model)
    experts = routed_experts(model)
    if not experts:
        raise ValueError("add_lora() needs a converted model: call ktmoe.hf.convert_model() first")
    if _is_peft_model(model):
        raise ValueError("add_lora() got a PEFT model: call it once, on the converted transformers model")
    if any(m.lora_rank == 0 for m in experts.values()):
        raise ValueError("add_lora(): the model was converted with lora_rank=0 (no expert LoRA); convert with "
                         "lora_rank > 0 to train the experts")
    family = get_family(base_model_of(model))
    targets = family.attention_targets if target_modules is None else target_modules
    targets = targets if isinstance(targets, str) else list(targets)  # a str is PEFT's regex form
    if lora_kwargs.get("lora_dropout", 0.0):
        raise ValueError("lora_dropout must be 0 (the CPU experts support no dropout; keep the adapter uniform)")
    for k in ("target_parameters", "use_dora"):
        if lora_kwargs.get(k):
            raise ValueError(f"add_lora(): {k}= is not supported (the expert LoRA is ktmoe's own; DoRA cannot "
                             "carry it)")
        lora_kwargs.pop(k, None)
    lora_kwargs.pop("lora_dropout", None)
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    experts_only = not targets
    if experts_only:  # PEFT needs a target: the experts modules stand for themselves
        cfg = peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=[family.experts_path], lora_dropout=0.0,
                              **lora_kwargs)
        cfg._register_custom_module({KTMoEHFExperts: _same_module})
    else:
        cfg = peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=0.0, **lora_kwargs)
    pm = peft.get_peft_model(model, cfg, adapter_name=adapter_name)
    if not _is_peft_model(pm):  # pragma: no cover - PEFT always returns a PeftModel
        raise RuntimeError("get_peft_model() returned no PeftModel")
    _install_peft(pm, experts, family, adapter_name, experts_only)
    return pm


def trainable_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) of everything that trains, in a fixed order (model order): the optimizer's order."""
    return [(n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]


# ---------------------------------------------------------------- save

def _dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The full value of a parameter: a DTensor (FSDP2 shard) is gathered, a collective every rank must join."""
    t = t.detach()
    return t.full_tensor() if is_dtensor(t) else t


def adapter_state_dict(model: nn.Module, adapter_name: str = "default"):
    """(state_dict, LoraConfig) of a converted model's adapter, exactly as PEFT would save them for the
    unconverted model with `lora_config(...)` (fp32 tensors).

    Under FSDP2 (parameters sharded as DTensors) and expert parallelism (each rank holds a block of the experts)
    every rank must call it: the shards are gathered, in model order, and every rank gets the whole state dict."""
    peft = _peft()
    from peft.utils import get_peft_model_state_dict

    model = unwrap_model(model)
    experts = routed_experts(model)
    if not experts:
        raise ValueError("adapter_state_dict() needs a model converted with ktmoe.hf.convert_model()")
    base = base_model_of(model)
    family = get_family(base)
    rank, alpha = _single_expert_lora(experts)
    expert_prefixes = tuple(_PREFIX + n + "." for n in experts)
    if _is_peft_model(model):
        cfg = copy.deepcopy(model.peft_config[adapter_name])
        if getattr(cfg, "use_dora", False):
            raise ValueError("DoRA adapters cannot carry ktmoe expert LoRA")
        sd = {k: _whole(v).to("cpu", torch.float32, copy=True) if v.is_floating_point() else _whole(v).cpu().clone()
              for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()
              if not k.startswith(expert_prefixes)}
        rslora = bool(cfg.use_rslora)
    else:
        cfg = peft.LoraConfig(r=2 * rank, lora_alpha=2 * alpha, target_modules=[], lora_dropout=0.0,
                              task_type="CAUSAL_LM")
        sd, rslora = {}, False
    rank_pattern, alpha_pattern = _expert_patterns(family, rank, alpha, rslora)
    cfg.target_parameters = list(family.target_parameters)
    cfg.rank_pattern = {**(cfg.rank_pattern or {}), **rank_pattern}
    cfg.alpha_pattern = {**(cfg.alpha_pattern or {}), **alpha_pattern}
    cfg.base_model_name_or_path = cfg.base_model_name_or_path or getattr(base.config, "_name_or_path", None) or None
    cfg.inference_mode = True
    for name, m in experts.items():
        peft_t = expert_lora_to_peft(m.whole_lora(),
                                     swapped=peft_swaps(getattr(m, "source_transposed", False)))
        pre = _PREFIX + name + "."
        sd[pre + GATE_UP_SUB + "lora_A.weight"], sd[pre + GATE_UP_SUB + "lora_B.weight"] = peft_t["gate_up_proj"]
        sd[pre + "lora_A.weight"], sd[pre + "lora_B.weight"] = peft_t["down_proj"]
    return sd, cfg


def save_adapter(model: nn.Module, path: str, adapter_name: str = "default") -> None:
    """Writes `adapter_config.json` + `adapter_model.safetensors` to `path`, loadable by
    `peft.PeftModel.from_pretrained(unconverted_model, path)` with no ktmoe involved.
    (`peft_model.save_pretrained` does not know the expert modules: use this.)

    Under torch.distributed only rank 0 writes (one folder, no two ranks writing the same files). Under FSDP2 and
    expert parallelism every rank must call it (the shards are gathered to a whole adapter, a collective); under DDP, where every
    rank holds the whole adapter, calling it on rank 0 alone is enough."""
    sd, cfg = adapter_state_dict(model, adapter_name)
    if _dist_rank() != 0:
        return
    write_adapter(path, sd, cfg)


def write_adapter(path: str, sd: Mapping[str, torch.Tensor], cfg) -> None:
    """Writes what adapter_state_dict returned as a PEFT adapter folder (this process, no collective)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, ADAPTER_WEIGHTS),
              metadata={"format": "pt"})


# ---------------------------------------------------------------- load

def read_adapter(path: str):
    """(LoraConfig, state_dict) of a PEFT adapter folder."""
    peft = _peft()
    from safetensors.torch import load_file

    cfg_file, w_file = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(cfg_file) or not os.path.isfile(w_file):
        raise FileNotFoundError(f"{path} is not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    cfg = peft.LoraConfig.from_pretrained(path)
    return cfg, load_file(w_file)


def _peft_scale(cfg, key: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), key), cfg.r)
    alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), key), cfg.lora_alpha)
    if r != rank:
        raise ValueError(f"adapter config says rank {r} for {key}, its tensors have rank {rank}")
    return alpha / math.sqrt(r) if cfg.use_rslora else alpha / r


def _layer_tensors(sd: Mapping[str, torch.Tensor], name: str, H: int, I: int, E: int, transposed: bool = False):
    """((A, B) of gate_up_proj, (A, B) of down_proj) of the experts module `name`, identified by shape, in the
    canonical orientation whichever PEFT version wrote them."""
    pre = _PREFIX + name + "."
    pairs = []
    for sub in (GATE_UP_SUB, ""):
        a, b = sd.get(pre + sub + "lora_A.weight"), sd.get(pre + sub + "lora_B.weight")
        if a is None or b is None:
            raise KeyError(f"the adapter has no expert LoRA for {name} (expected {pre}{sub}lora_A.weight and "
                           "lora_B.weight)")
        pairs.append((a, b))
    gate_up, down, _ = identify_layer(*pairs, hidden=H, intermediate=I, num_experts=E,
                                      prefer_swapped=peft_swaps(transposed))
    return gate_up, down


def _expert_lora_from_adapter(cfg, sd, name: str, E: int, H: int, I: int, transposed: bool = False):
    gate_up, down = _layer_tensors(sd, name, H, I, E, transposed)
    s_gu = _peft_scale(cfg, f"{name}.gate_up_proj", gate_up[0].shape[0] // E)
    s_d = _peft_scale(cfg, f"{name}.down_proj", down[0].shape[0] // E)
    return peft_to_expert_lora(gate_up, down, num_experts=E, gate_up_scale=s_gu, down_scale=s_d)


def _strip_adapter_keys(sd: Mapping[str, torch.Tensor], names: Iterable[str]) -> Dict[str, torch.Tensor]:
    prefixes = tuple(_PREFIX + n + "." for n in names)
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


@torch.no_grad()
def load_adapter(model: nn.Module, path: str, adapter_name: str = "default") -> None:
    """Loads a PEFT adapter (ktmoe's, or one trained with plain PEFT target_parameters) into a converted model
    set up like the one that saved it (same expert rank/alpha, same PEFT target modules): expert LoRA into
    the experts' parameters, the rest through PEFT. Exact: training resumes from the same numbers."""
    cfg, sd = read_adapter(path)
    model = unwrap_model(model)
    experts = routed_experts(model)
    if not experts:
        raise ValueError("load_adapter() needs a converted model (ktmoe.hf.convert_model), or use "
                         "ktmoe.hf.from_adapter(model, path) on the unconverted one")
    for name, m in experts.items():
        lora, r, alpha, _ = _expert_lora_from_adapter(cfg, sd, name, m.num_experts, m.hidden_dim, m.intermediate_dim,
                                                      getattr(m, "source_transposed", False))
        if r != m.lora_rank or not math.isclose(alpha / r, m.scaling, rel_tol=1e-6):
            raise ValueError(f"{path}: expert LoRA of {name} needs rank {r}, alpha {alpha:g}; the model was "
                             f"converted with rank {m.lora_rank}, alpha {m.lora_alpha:g} (use ktmoe.hf.from_adapter)")
        for n, p in zip(LORA_NAMES, m.lora_parameters):
            p.copy_(m.own_block(lora[n]))  # expert parallel: this rank's experts
    rest = _strip_adapter_keys(sd, experts)
    if not rest:
        return
    if not _is_peft_model(model):
        raise ValueError(f"{path} has LoRA on {len(rest)} non-expert tensors but the model has no PEFT adapter: "
                         "call ktmoe.hf.add_lora() with the adapter's target_modules first")
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, rest, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise ValueError(f"{path}: {len(result.unexpected_keys)} adapter tensors match no LoRA module of this model, "
                         f"e.g. {result.unexpected_keys[:3]}")
    expert_prefixes = tuple(_PREFIX + n + "." for n in experts)  # loaded above
    missing = [k for k in result.missing_keys if f".{adapter_name}." in k and "lora_" in k
               and not k.startswith(expert_prefixes)]
    if missing:
        raise ValueError(f"{path}: the adapter lacks {len(missing)} LoRA tensors of this model, e.g. {missing[:3]}")


def from_adapter(model: nn.Module, path: str, **convert_kwargs) -> nn.Module:
    """Unconverted transformers model + PEFT adapter folder -> converted model with the adapter loaded (expert
    rank/alpha and target modules taken from the adapter), ready to train or run. Returns the PeftModel.

    convert_kwargs go to `convert_model` (not lora_rank / lora_alpha: the adapter's). With mode="inference" and an
    inference method (e.g. method="AMXINT4") the experts are quantized and the expert LoRA is applied, frozen:
    for generate() and serving."""
    for k in ("lora_rank", "lora_alpha"):
        if k in convert_kwargs:
            raise TypeError(f"from_adapter(): {k} comes from the adapter and may not be given")
    cfg, sd = read_adapter(path)
    model = unwrap_model(model)
    base = base_model_of(model)
    family = get_family(base)
    first = next(((n, m) for n, m in base.named_modules() if family.is_experts(n, m)), None)
    if first is None:
        raise ValueError("from_adapter() needs an unconverted model (its experts modules are not found)")
    name, mod = first
    gate, _, _ = family.read_weights(mod)
    _, r, alpha, _ = _expert_lora_from_adapter(cfg, sd, name, gate.shape[0], gate.shape[2], gate.shape[1],
                                               bool(getattr(mod, "is_transposed", False)))
    convert_model(model, lora_rank=r, lora_alpha=alpha, **convert_kwargs)
    expert_keys = set(family.target_parameters)
    targets = cfg.target_modules
    if isinstance(targets, (set, list, tuple)):
        targets = sorted(targets)
    if not targets:
        targets = []
    extra = {k: getattr(cfg, k) for k in ("modules_to_save", "layers_to_transform", "layers_pattern",
                                          "exclude_modules") if getattr(cfg, k, None)}
    for pattern in ("rank_pattern", "alpha_pattern"):  # the non-expert entries, if any
        kept = {k: v for k, v in (getattr(cfg, pattern) or {}).items() if k not in expert_keys}
        if kept:
            extra[pattern] = kept
    model = add_lora(model, r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=targets,
                     use_rslora=cfg.use_rslora, **extra) if targets else add_lora(model, target_modules=[])
    load_adapter(model, path)
    return model


# ---------------------------------------------------------------- the plain-PyTorch equivalent

def peft_reference(model: nn.Module, config, state_dict: Optional[Mapping[str, torch.Tensor]] = None, *,
                   block_diagonal: bool = True):
    """The *unconverted* model with PEFT LoRA per `config` (from `lora_config` / `adapter_state_dict`), loaded with
    `state_dict` when given. With block_diagonal, gradient hooks keep gate_up's lora_B block-diagonal, so that
    training follows exactly ktmoe's six-matrix parameterisation (the off-diagonal blocks stay zero under
    SGD/Adam/AdamW). This is "the plain PyTorch path" the tests and the training job compare with."""
    peft = _peft()
    from peft.utils import set_peft_model_state_dict

    config = copy.deepcopy(config)
    config.inference_mode = False
    with warnings.catch_warnings():
        # peft 0.21 checks rank/alpha_pattern keys against target_modules only, and warns that the
        # target_parameters keys "were ignored" although it applies them (the tests check the ranks)
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
        pm = peft.get_peft_model(model, config)
    if state_dict is not None:
        result = set_peft_model_state_dict(pm, dict(state_dict))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise ValueError(f"state dict does not fit the PEFT reference: unexpected {result.unexpected_keys[:3]}, "
                             f"missing {missing[:3]}")
    if block_diagonal:
        for mod in pm.modules():
            if type(mod).__name__ == "ParamWrapper" and mod.parameter_name == "gate_up_proj":
                # the off-diagonal blocks live in lora_B, or in lora_A in the swapped orientation (peft 0.18)
                swapped = peft_swaps(bool(getattr(mod.get_base_layer(), "is_transposed", False)))
                for adapter, lin in (mod.lora_A if swapped else mod.lora_B).items():
                    w = lin.weight
                    mask = block_diagonal_mask(w.detach(), mod.num_experts, swapped=swapped)
                    w.register_hook(lambda g, mask=mask: g * mask.to(g.dtype))
    return pm


def peft_expert_wrappers(model: nn.Module) -> Dict[str, Dict[str, nn.Module]]:
    """{experts module name (transformers naming): {"gate_up_proj": ParamWrapper, "down_proj": ParamWrapper}} of a
    PEFT target_parameters model; for comparing against a converted model."""
    out: Dict[str, Dict[str, nn.Module]] = {}
    for n, mod in base_model_of(model).named_modules():
        if type(mod).__name__ == "ParamWrapper":
            key = n
            while key.endswith(".base_layer"):
                key = key[: -len(".base_layer")]
            out.setdefault(key, {})[mod.parameter_name] = mod
    return out


__all__ = ["expert_lora_to_peft", "peft_to_expert_lora", "block_diagonal_mask", "lora_config", "add_lora",
           "trainable_parameters", "adapter_state_dict", "save_adapter", "read_adapter", "load_adapter",
           "from_adapter", "peft_reference", "peft_expert_wrappers"]
