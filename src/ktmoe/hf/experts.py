"""The module that replaces a transformers MoE layer's routed experts: ktmoe on the CPU, LoRA as nn.Parameters.

`KTMoEHFExperts` is a `ktmoe.KTMoEExperts` (six fp32 LoRA parameters `gate_lora_a` ... `down_lora_b`, frozen
base weights packed by the native engine) with the call signature of transformers v5 experts modules:
`forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`. Inputs may live on any
device; the experts run on the CPU and the output comes back on the input's device and dtype.

Differences from the plain `KTMoEExperts`:

* `.to()`, `.cuda()`, `.half()` on the model leave this module alone: the LoRA stays fp32 on the CPU, where the
  kernels read it in place (an optimizer step is seen by the next forward with no copy).
* It takes transformers' argument names (top_k_index, top_k_weights). Gradient checkpointing works as for
  `KTMoEExperts` (see `ktmoe.torch_module.KTMoEFunction`).
* `mode="inference"` (methods without `_SFT`): forward only, LoRA applied when given (frozen).
* Its state dict is PEFT's: the six matrices appear as the `target_parameters` LoRA of the fused expert
  tensors (`base_layer.lora_A.<adapter>.weight` [E*2r, H] ... `lora_B.<adapter>.weight` [H, r*E], see
  `ktmoe.hf.adapter`; with peft 0.18 the swapped orientation, A [E*2r, 2I] / B [H, 2r*E], see
  `ktmoe.hf.peft_layout`), never under their own names. `load_state_dict` takes that layout (with or without the
  adapter name, either orientation) or the six names.
* For PEFT it is a tuner layer (`peft.tuners.tuners_utils.BaseTunerLayer`): `get_peft_model_state_dict`,
  `PeftModel.save_pretrained` (so `Trainer.save_model` and its checkpoints), `load_adapter` (so
  `resume_from_checkpoint`), `disable_adapter()`, `set_adapter`, `merge_and_unload()` and `unload()` all see the
  expert LoRA. `ktmoe.hf.add_lora` attaches it (`attach_peft`): the containers `lora_A` / `lora_B` and the inner
  `base_layer` (the gate_up_proj wrapper of PEFT's nesting) are empty placeholders that give PEFT the key
  prefixes it selects by; the tensors are computed from the six matrices on every `state_dict()`.
* `copy.deepcopy` gives an independent module (own LoRA, own native layer) that shares the frozen packed
  weights (they are never written; a mapped weight file stays mapped and checked, see `convert_model(mmap=True)`);
  `torch.save(model)` / pickling stores the packed weights (loaded back into owned memory).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..lora import LORA_NAMES
from ..parallel import expert_parallel
from ..parallel.expert_parallel import ExpertPlacement
from .peft_layout import expert_lora_to_peft, identify_layer, peft_swaps, peft_to_expert_lora
from ..sft.base import is_dtensor
from ..torch_module import KTMoEExperts, KTMoEFunction, flatten_routing, live_saved_forwards  # noqa: F401 (re-exported)

try:  # PEFT is part of the [hf] extra; without it the module is an ordinary nn.Module
    from peft.tuners.tuners_utils import BaseTunerLayer as _TunerLayer
except ImportError:  # pragma: no cover - exercised only without peft
    class _TunerLayer:  # type: ignore[no-redef]
        pass

DEFAULT_ADAPTER = "default"
# the four PEFT keys of one experts module, relative to its prefix, without / with the adapter name
GATE_UP_A, GATE_UP_B, DOWN_A, DOWN_B = ("base_layer.lora_A", "base_layer.lora_B", "lora_A", "lora_B")
PEFT_KEYS = (GATE_UP_A, GATE_UP_B, DOWN_A, DOWN_B)


def peft_key(which: str, adapter: Optional[str]) -> str:
    return f"{which}.{adapter}.weight" if adapter else f"{which}.weight"


class _Slot(nn.Module):
    """One adapter's entry in a placeholder `lora_A` / `lora_B` container: holds nothing (the owning experts module
    writes and reads the tensors of its state dict)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        return  # consumed by the experts module

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("a ktmoe LoRA placeholder is not callable")


class _NoWeight:
    """BaseTunerLayer's `weight` / `bias` properties follow `get_base_layer()`, which is the layer itself here."""

    @property
    def weight(self):
        raise AttributeError(f"{type(self).__name__} has no weight (the experts live in the ktmoe engine)")

    @property
    def bias(self):
        raise AttributeError(f"{type(self).__name__} has no bias")


class _GateUpSlot(_NoWeight, nn.Module, _TunerLayer):
    """Stands where PEFT nests the gate_up_proj ParamWrapper (`<experts>.base_layer`), so that PEFT selects the
    gate_up keys; holds nothing."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, adapter: str):
        nn.Module.__init__(self)
        self.lora_A = nn.ModuleDict({adapter: _Slot()})
        self.lora_B = nn.ModuleDict({adapter: _Slot()})
        self._active_adapter = adapter
        self._disable_adapters = False
        self.merged_adapters = []

    def get_base_layer(self):
        return self

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        return

    def unmerge(self) -> None:
        return

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        return  # consumed by the experts module

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("a ktmoe LoRA placeholder is not callable")


class KTMoEHFExperts(_NoWeight, KTMoEExperts):
    """Drop-in replacement for a transformers v5 routed-experts module (see the module docstring).

    Build it with `KTMoEHFExperts.from_module(experts, family=..., num_experts_per_tok=k, ...)`. Inside a PeftModel
    its class is `KTMoEPeftExperts` (the same module, also a PEFT tuner layer): not before, because PEFT treats a
    model that already holds tuner layers as one getting a second adapter and keeps its base weights trainable."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, gate_proj, up_proj, down_proj, *, num_experts_per_tok: int, lora_rank: int,
                 lora_alpha: float, source: str = "", mode: str = "sft", method: str = "AMXBF16_SFT",
                 layer_idx: int = 0, generator: Optional[torch.Generator] = None, weight_path: Optional[str] = None,
                 shape: Optional[Tuple[int, int, int]] = None, packed: Optional[tuple] = None, mmap: bool = False,
                 expert_parallel: Optional[ExpertPlacement] = None, **wrapper_kwargs):
        nn.Module.__init__(self)
        from ..experts import KTMoEWrapper  # late: experts imports the sft package

        if mmap and weight_path is None:
            raise ValueError("mmap=True needs weight_path= (a folder written by `python -m ktmoe.convert`): only "
                             "a weight file can be mapped and shared")
        ep = expert_parallel
        if packed is not None:  # (gate, up, down) Packed in the method's format, handed over (streaming loader)
            E, I, H = packed[0].shape  # (only this rank's block under expert parallelism)
            E = E if ep is None else ep.num_experts
        elif weight_path is None:
            if gate_proj.dim() != 3 or down_proj.dim() != 3:
                raise ValueError(f"gate_proj must be [E, I, H] and down_proj [E, H, I], got "
                                 f"{tuple(gate_proj.shape)} and {tuple(down_proj.shape)}")
            E, I, H = gate_proj.shape
            if ep is not None:  # this rank's block only
                gate_proj, up_proj, down_proj = (t[ep.first:ep.end] for t in (gate_proj, up_proj, down_proj))
        else:
            if shape is None:
                raise ValueError("weight_path= needs shape=(E, I, H)")
            E, I, H = shape
        if ep is not None and ep.num_experts != E:
            raise ValueError(f"expert_parallel places {ep.num_experts} experts, this layer has {E}")
        self.expert_parallel = ep
        self._ep_owner = None if ep is None else ep.owner()
        self._wrapper_args = dict(mode=mode, method=method, layer_idx=layer_idx,
                                  num_experts=E if ep is None else ep.local_experts,
                                  num_experts_per_tok=num_experts_per_tok if ep is None else
                                  ep.local_k(num_experts_per_tok), hidden_size=H, moe_intermediate_size=I,
                                  lora_rank=lora_rank, lora_alpha=lora_alpha, weight_path=weight_path,
                                  **wrapper_kwargs)
        self.wrapper = KTMoEWrapper(**self._wrapper_args)
        if packed is not None:
            self.wrapper.load_packed_weights(*packed, copy=False)
        elif weight_path is None:
            self.wrapper.load_weights_from_tensors(gate_proj, up_proj, down_proj)
        else:
            self.wrapper.load_weights(mmap=mmap, experts=None if ep is None else (ep.first, ep.end))
        for name, sh in (self.wrapper.lora_shapes().items() if lora_rank > 0 else ()):
            self.register_parameter(name, nn.Parameter(torch.empty(sh, dtype=torch.float32),
                                                       requires_grad=mode == "sft"))
        if lora_rank > 0:
            self.reset_lora_parameters(generator)
        self._bound: tuple = ()
        self._zeros: Optional[List[torch.Tensor]] = None
        self.num_experts = E  # all of the layer's, also under expert parallelism (the PEFT layout's E)
        self.hidden_dim = H
        self.intermediate_dim = I
        self.source = source  # class name of the module this replaced
        self.mode = mode
        # PEFT state (see the module docstring)
        self._adapter_name = DEFAULT_ADAPTER
        self._active_adapter = DEFAULT_ADAPTER
        self._disable_adapters = False
        self.merged_adapters: List[str] = []
        self.lora_merged = False    # merge_and_unload(): save_pretrained writes W + s B A (forward is unchanged)
        self.lora_removed = False   # unload(): the LoRA no longer applies

    @classmethod
    def from_module(cls, module: torch.nn.Module, *, family, num_experts_per_tok: int, lora_rank: int,
                    lora_alpha: float, layer_idx: int = 0, generator: Optional[torch.Generator] = None,
                    weight_path: Optional[str] = None, **kwargs) -> "KTMoEHFExperts":
        if weight_path is not None:  # the weights come from the folder: only the shapes are read (meta is fine)
            gate, up, down = family.read_weights(module)
            return cls(None, None, None, num_experts_per_tok=num_experts_per_tok, lora_rank=lora_rank,
                       lora_alpha=lora_alpha, layer_idx=layer_idx, generator=generator, weight_path=weight_path,
                       shape=tuple(gate.shape), source=type(module).__name__, **kwargs)
        gate, up, down = family.read_weights(module)
        gate, up, down = (t.to("cpu") for t in (gate, up, down))
        return cls(gate, up, down, num_experts_per_tok=num_experts_per_tok, lora_rank=lora_rank,
                   lora_alpha=lora_alpha, layer_idx=layer_idx, generator=generator,
                   source=type(module).__name__, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def lora_parameters(self):
        return [getattr(self, n) for n in LORA_NAMES] if self.lora_rank > 0 else []

    @property
    def lora_rank(self) -> int:
        return self.wrapper.lora_rank

    @property
    def lora_alpha(self) -> float:
        return self.wrapper.lora_alpha

    @property
    def scaling(self) -> float:
        return self.wrapper.lora_scale

    @property
    def trains(self) -> bool:
        return self.mode == "sft"

    @property
    def lora_active(self) -> bool:
        """Whether the forward applies the LoRA now (not disabled / inactive in PEFT, not unloaded)."""
        return (self.lora_rank > 0 and not self.lora_removed and not self._disable_adapters
                and self._adapter_name in self.active_adapters)

    def _apply(self, fn, recurse=True):
        # model.to(device / dtype) must not move the LoRA off the CPU or out of fp32 (see module docstring)
        return self

    # ------------------------------------------------------------------ forward
    def _zero_lora(self) -> List[torch.Tensor]:
        if self._zeros is None:
            self._zeros = [torch.zeros(p.shape, dtype=torch.float32) for p in self.lora_parameters]
        return self._zeros

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x, ids, w = flatten_routing(hidden_states, top_k_index, top_k_weights)
        active = self.lora_active
        if self.lora_rank > 0:
            if active:
                self._bind()
                lora = self.lora_parameters
            else:  # disabled / removed: the native layer reads zeros (rebound to the parameters when active again)
                lora = self._zero_lora()
                if self._bound != ("zeros",):
                    self.wrapper.init_lora_weights(*lora)
                    self._bound = ("zeros",)
        else:
            lora = []
        grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or
                                            any(p.requires_grad for p in lora))
        if not self.trains and grad and (x.requires_grad or w.requires_grad):
            raise RuntimeError(f"{self.wrapper.method} is an inference method: the experts compute no "
                               "gradients; run under torch.no_grad() (generate() does), or convert with "
                               "mode='sft' and an *_SFT method to train")
        if self.expert_parallel is not None:
            return self._forward_expert_parallel(x, ids, w, lora, grad).reshape(shape)
        if not self.trains:
            y = self.wrapper.forward(x, ids, w)
        elif not grad:
            y, _ = self.wrapper._run_forward(x, ids, w, False)
        else:
            y = KTMoEFunction.apply(self.wrapper, x, ids, w, *lora)
        return y.reshape(shape)

    def _forward_expert_parallel(self, x, ids, w, lora, grad) -> torch.Tensor:
        """Every rank of the group calls this layer (see ktmoe.parallel.expert_parallel); the exchanges move CPU
        tensors, the result goes back to the input's device."""
        dev = x.device
        x, ids, w = (t.to("cpu") for t in (x, ids, w))
        if not self.trains:
            y = expert_parallel.forward_no_grad(self, x, ids, w, self.wrapper.forward)
        elif not grad:
            y = expert_parallel.forward_no_grad(self, x, ids, w,
                                                lambda a, b, c: self.wrapper._run_forward(a, b, c, False)[0])
        else:
            y = expert_parallel.ExpertParallelFunction.apply(self, x, ids, w, *lora)
        return y.to(dev)

    # ------------------------------------------------------------------ expert parallelism: the LoRA blocks
    def whole_lora(self) -> Dict[str, torch.Tensor]:
        """The six LoRA tensors of all the layer's experts: a sharded (FSDP2) parameter is gathered, and under
        expert parallelism every rank's block; both are collectives every rank must join, in model order."""
        out = {}
        for n, p in zip(LORA_NAMES, self.lora_parameters):
            t = p.detach()
            if is_dtensor(t):
                t = t.full_tensor()
            if self.expert_parallel is not None:
                t = expert_parallel.gather_blocks(t, self.expert_parallel)
            out[n] = t
        return out

    def _draw_uniform(self, p, bound, generator) -> None:
        ep = self.expert_parallel
        if ep is None:
            return super()._draw_uniform(p, bound, generator)
        # the whole layer's draw, of which this rank keeps its block: the same numbers as one process
        whole = torch.empty((ep.num_experts,) + tuple(p.shape[1:]), dtype=p.dtype)
        whole.uniform_(-bound, bound, generator=generator)
        p.copy_(self.own_block(whole))

    def own_block(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's experts of a whole-layer per-expert tensor [num_experts, ...] (itself without expert
        parallelism)."""
        ep = self.expert_parallel
        return t if ep is None else t[ep.first:ep.end]

    def extra_repr(self) -> str:
        w = self.wrapper
        s = (f"method={w.method}, E={w.E}, k={w.k}, H={w.H}, I={w.I}, r={w.lora_rank}, alpha={w.lora_alpha}"
             f"{', mode=inference' if not self.trains else ''}")
        if self.expert_parallel is not None:
            s += f", expert_parallel=({self.expert_parallel.describe()})"
        return s + (f", replaces={self.source}" if self.source else "")

    # ------------------------------------------------------------------ state dict (PEFT layout)
    def peft_tensors(self) -> Dict[str, torch.Tensor]:
        """{key relative to this module (with the adapter name): tensor} in PEFT's target_parameters layout."""
        if self.lora_rank == 0 or self.lora_removed:
            return {}
        # in the installed PEFT's orientation, as PEFT itself would save the unconverted model
        t = expert_lora_to_peft(dict(zip(LORA_NAMES, self.lora_parameters)),
                                swapped=peft_swaps(getattr(self, "source_transposed", False)))
        ad = self._adapter_name
        return {peft_key(GATE_UP_A, ad): t["gate_up_proj"][0], peft_key(GATE_UP_B, ad): t["gate_up_proj"][1],
                peft_key(DOWN_A, ad): t["down_proj"][0], peft_key(DOWN_B, ad): t["down_proj"][1]}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        params = self.lora_parameters
        if params and not self.lora_removed and (is_dtensor(params[0]) or self.expert_parallel is not None):
            # sharded (FSDP2): the parameters under their own names, as DTensors, so that
            # torch.distributed.checkpoint can save, gather (get_model_state_dict) and load them; the PEFT
            # layout needs whole tensors (ktmoe.hf.save_adapter gathers them); expert parallel: this rank's
            # block, likewise
            for n, p in zip(LORA_NAMES, params):
                destination[prefix + n] = p if keep_vars else p.detach()
            return
        for k, v in self.peft_tensors().items():
            destination[prefix + k] = v

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        ad = self._adapter_name
        expected = [prefix + peft_key(w, ad) for w in PEFT_KEYS] if self.lora_rank > 0 and not self.lora_removed \
            else []
        used = set()
        found = None
        for adapter in (ad, None):
            keys = [peft_key(w, adapter) for w in PEFT_KEYS]
            if all(k in mine for k in keys):
                found = [mine[k] for k in keys]
                used.update(keys)
                break
        raw = [n for n in LORA_NAMES if n in mine]
        if found is None and raw:
            if len(raw) != len(LORA_NAMES):
                error_msgs.append(f"{prefix}: only {raw} of the six expert LoRA tensors are given")
            else:
                used.update(raw)
                found = "raw"
        if self.lora_rank == 0 and found is not None:
            error_msgs.append(f"{prefix}: the state dict has expert LoRA but this layer was converted with "
                              "lora_rank=0")
        elif found is not None:
            try:
                lora = self._lora_from(found, mine)
            except ValueError as e:
                error_msgs.append(f"{prefix}: {e}")
            else:
                with torch.no_grad():
                    for n, p in zip(LORA_NAMES, self.lora_parameters):
                        p.copy_(lora[n] if tuple(lora[n].shape) == tuple(p.shape) else self.own_block(lora[n]))
        else:
            missing_keys.extend(expected)
        # anything else under this module (another adapter's tensors, a partial set, plain expert weights) is
        # not this layer's: reported, never dropped silently
        unexpected_keys.extend(prefix + k for k in mine if k not in used)

    def _lora_from(self, found, mine) -> Dict[str, torch.Tensor]:
        shapes = self.wrapper.lora_shapes()
        if found == "raw":  # this rank's block, or (expert parallel) the whole layer's
            out = {}
            for n in LORA_NAMES:
                whole = (self.num_experts,) + tuple(shapes[n][1:])
                if tuple(mine[n].shape) not in (tuple(shapes[n]), whole):
                    raise ValueError(f"{n} has shape {tuple(mine[n].shape)}, this layer needs {tuple(shapes[n])}")
                out[n] = mine[n]
            return out

        a_gu, b_gu, a_d, b_d = found
        s = self.scaling
        # either PEFT orientation, told by shape (a checkpoint may come from another peft version)
        (a_gu, b_gu), (a_d, b_d), _ = identify_layer(
            (a_gu, b_gu), (a_d, b_d), hidden=self.hidden_dim, intermediate=self.intermediate_dim,
            num_experts=self.num_experts, prefer_swapped=peft_swaps(getattr(self, "source_transposed", False)))
        lora, r, _, exact = peft_to_expert_lora((a_gu, b_gu), (a_d, b_d), num_experts=self.num_experts,
                                                gate_up_scale=s, down_scale=s)
        if not exact or r != self.lora_rank:
            raise ValueError(f"the expert LoRA (gate_up rank {a_gu.shape[0] // self.num_experts}, down rank "
                             f"{a_d.shape[0] // self.num_experts}) is not ktmoe's layout of rank {self.lora_rank} "
                             "(block-diagonal gate_up of rank 2r, down of rank r); load such an adapter with "
                             "ktmoe.hf.from_adapter()")
        return lora

    # ------------------------------------------------------------------ PEFT tuner-layer protocol
    @property
    def peft_attached(self) -> bool:
        return "lora_A" in self._modules

    def attach_peft(self, adapter_name: str = DEFAULT_ADAPTER) -> None:
        """Gives PEFT the structure it selects adapter tensors by (see the module docstring)."""
        if self.lora_rank == 0:
            return
        self._adapter_name = adapter_name
        self._active_adapter = adapter_name
        self.__class__ = KTMoEPeftExperts
        self.base_layer = _GateUpSlot(adapter_name)
        self.lora_A = nn.ModuleDict({adapter_name: _Slot()})
        self.lora_B = nn.ModuleDict({adapter_name: _Slot()})

    def detach_peft(self) -> None:
        for n in ("base_layer", "lora_A", "lora_B"):
            self._modules.pop(n, None)
        self.__class__ = KTMoEHFExperts

    def get_base_layer(self):
        return self

    @property
    def active_adapters(self):
        a = self._active_adapter
        return [a] if isinstance(a, str) else list(a)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._active_adapter = names
        on = self._adapter_name in names and not inference_mode and self.trains
        for p in self.lora_parameters:
            p.requires_grad_(on)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        # the forward already computes W + s B A; what merging changes is what save_pretrained writes
        if self.lora_rank > 0 and self._adapter_name not in self.merged_adapters:
            self.merged_adapters.append(self._adapter_name)

    def unmerge(self) -> None:
        self.merged_adapters = []

    def unload_and_optionally_merge_module(self, merge: bool = True, safe_merge: bool = False,
                                           adapter_names=None) -> "KTMoEHFExperts":
        """PEFT's merge_and_unload() / unload() call this: merged, `save_pretrained` writes W + s B A; unloaded,
        the LoRA stops applying. Either way the PEFT placeholders go; the module stays (the experts live here)."""
        if merge:
            self.lora_merged = self.lora_active or self.lora_merged
            if not self.lora_active:
                self.lora_removed = True
        else:
            self.lora_removed = True
        self.merged_adapters = []
        self._disable_adapters = False
        self._active_adapter = self._adapter_name
        for p in self.lora_parameters:
            p.requires_grad_(False)
        self.detach_peft()
        return self

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name == self._adapter_name:
            self.lora_removed = True
            self.detach_peft()

    # ------------------------------------------------------------------ merged weights
    @torch.no_grad()
    def merged_weights(self, dtype: torch.dtype, experts_per_chunk: int = 8
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj [E, 2I, H], down_proj [E, H, I]) in `dtype`: the frozen weights as the kernels see them
        plus s B A when the LoRA applies, computed a few experts at a time (one layer in `dtype` plus a small fp32
        chunk in memory)."""
        if self.expert_parallel is not None:
            raise NotImplementedError("merged weights of an expert-parallel layer: each rank holds only its block; "
                                      "save the adapter (ktmoe.hf.save_adapter, every rank) and merge it in one "
                                      "process (PeftModel.from_pretrained(...).merge_and_unload())")
        self.wrapper._require_weights()
        E, H, I = self.num_experts, self.hidden_dim, self.intermediate_dim
        gate_up = torch.empty((E, 2 * I, H), dtype=dtype)
        down = torch.empty((E, H, I), dtype=dtype)
        with_lora = self.lora_rank > 0 and self.lora_active
        lora = dict(zip(LORA_NAMES, self.lora_parameters)) if with_lora else None
        s = self.scaling
        for e0 in range(0, E, experts_per_chunk):
            e1 = min(E, e0 + experts_per_chunk)
            g, u, d = self._dequantized(e0, e1)
            if lora is not None:
                g = g + s * lora["gate_lora_b"][e0:e1] @ lora["gate_lora_a"][e0:e1]
                u = u + s * lora["up_lora_b"][e0:e1] @ lora["up_lora_a"][e0:e1]
                d = d + s * lora["down_lora_b"][e0:e1] @ lora["down_lora_a"][e0:e1]
            gate_up[e0:e1, :I] = g
            gate_up[e0:e1, I:] = u
            down[e0:e1] = d
        return gate_up, down

    def _dequantized(self, e0: int, e1: int):
        w = self.wrapper
        packed = getattr(w, "_weights", None)
        if packed is None:  # node-local TP copies: the whole layer at once
            g, u, d = w.dequantized_weights()
            return g[e0:e1], u[e0:e1], d[e0:e1]
        fmt = w.weight_format
        out = []
        for p in packed:
            part = dataclasses.replace(p, data=p.data[e0:e1],
                                       scale=None if p.scale is None else p.scale[e0:e1],
                                       zero=None if p.zero is None else p.zero[e0:e1],
                                       shape=(e1 - e0, *p.shape[1:]))
            out.append(fmt.dequantize(part))
        return out

    # ------------------------------------------------------------------ copy / pickle
    def __getstate__(self):
        if self.expert_parallel is not None:
            raise TypeError("an expert-parallel ktmoe layer (a block of the experts and a process group) cannot be "
                            "copied or pickled; save the adapter (ktmoe.hf.save_adapter) and rebuild")
        state = self.__dict__.copy()
        w = state.pop("wrapper")
        packed = getattr(w, "_weights", None)
        if packed is None:
            raise TypeError("this ktmoe experts layer holds node-local TP weight copies and cannot be copied or "
                            "pickled; convert with numa_local=False to copy it, or save the adapter "
                            "(ktmoe.hf.save_adapter / PeftModel.save_pretrained) and rebuild")
        w._require_weights()  # a changed mapped file is refused, not read (past a truncated end: SIGBUS)
        state["_ktmoe_packed"] = tuple(packed)
        state["_bound"] = ()
        state["_zeros"] = None
        return state

    def __setstate__(self, state):
        from ..experts import KTMoEWrapper

        packed = state.pop("_ktmoe_packed")
        mapped = state.pop("_ktmoe_mapped", None)  # set by __deepcopy__ only: unpickled tensors are owned
        args = dict(state["_wrapper_args"])
        wrapper = KTMoEWrapper(**args)
        wrapper._bind_weights(tuple(packed), mapped)
        nn.Module.__setstate__(self, state)
        self.wrapper = wrapper

    def __deepcopy__(self, memo):
        state = self.__getstate__()
        state["_ktmoe_mapped"] = self.wrapper._mapped  # shared views of a mapped file: the copy checks it too
        for p in state["_ktmoe_packed"]:  # frozen and never written: shared, not copied
            for t in (p.data, p.scale, p.zero):
                if t is not None:
                    memo[id(t)] = t
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(state, memo))
        return new


class KTMoEPeftExperts(KTMoEHFExperts, _TunerLayer):
    """A `KTMoEHFExperts` attached to a PeftModel's adapter (`attach_peft`): PEFT sees a tuner layer."""


__all__ = ["KTMoEHFExperts", "KTMoEPeftExperts", "live_saved_forwards", "DEFAULT_ADAPTER", "PEFT_KEYS", "peft_key"]
