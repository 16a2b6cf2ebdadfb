"""save_pretrained() of a converted model: a full transformers checkpoint, the experts holding W + s B A.

A converted model's routed experts live in the ktmoe engine (packed, possibly quantized), so transformers' own
`save_pretrained` would find no expert weights in the state dict. `convert_model` gives the model a subclass (same
class name) whose `save_pretrained` does this:

1. refuses while PEFT LoRA layers are still in the model (save the adapter with the PeftModel's own
   `save_pretrained`, or `merge_and_unload()` first): never half a model;
2. lets transformers write config, generation config and every non-expert tensor (its sharding, tied-weight
   handling and original-format renaming included);
3. writes the experts one MoE layer at a time, one safetensors shard per layer: the frozen weights as the kernels
   use them (dequantized for quantized methods) plus s B A of the expert LoRA when it applies (after
   `merge_and_unload()`; after `unload()` the LoRA is gone and W alone is written), in the dtype the experts had
   before conversion, in transformers' layout (fused, or reverted to the checkpoint's original per-expert layout
   when `save_original_format=True`, transformers' default). Only one layer's experts are in memory at a time
   (plus a small fp32 chunk of a few experts);
4. numbers every shard `model-0000i-of-0000N.safetensors` and writes `model.safetensors.index.json`.

`AutoModelForCausalLM.from_pretrained(dir)` loads the result with no missing keys."""
from __future__ import annotations

import json
import os
from typing import Callable, Dict

import torch

from .model_walk import routed_experts

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_TMP = "ktmoe-experts-{:05d}.safetensors.tmp"


def _tuner_layers(model) -> list:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return []
    from .experts import KTMoEHFExperts, _GateUpSlot

    return [n for n, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and not isinstance(m, (KTMoEHFExperts, _GateUpSlot))]


def save_pretrained(model, original: Callable, save_directory, *args, state_dict=None, is_main_process: bool = True,
                    variant=None, save_original_format: bool = True, **kwargs):
    """Writes a full transformers checkpoint of this converted model (see ktmoe.hf.export): non-expert tensors as
    transformers writes them, routed experts as W + s B A (merged LoRA), one shard per MoE layer, with an index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if args:
        raise TypeError("save_pretrained() of a converted model takes only save_directory positionally")
    if getattr(model, "_hf_peft_config_loaded", False):
        raise ValueError("this converted model carries a transformers-integrated PEFT adapter (model.add_adapter): "
                         "ktmoe's expert LoRA goes through ktmoe.hf.add_lora() and the PeftModel's save_pretrained")
    tuned = _tuner_layers(model)
    experts = routed_experts(model)
    attached = [n for n, m in experts.items() if m.peft_attached]
    if tuned or attached:
        raise ValueError(f"the model still has PEFT LoRA layers ({(tuned + attached)[0]}, ...): save the adapter "
                         "with the PeftModel's save_pretrained(), or call merge_and_unload() first and save what it "
                         "returns for a full checkpoint")
    if variant is not None:
        raise ValueError("save_pretrained(variant=...) is not supported for converted models")
    if state_dict is None:
        state_dict = model.state_dict()
    prefixes = tuple(n + "." for n in experts)
    rest = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
    import inspect

    if "save_original_format" in inspect.signature(original).parameters:  # transformers versions without it
        kwargs["save_original_format"] = save_original_format           # write the fused layout
    original(save_directory, state_dict=rest, is_main_process=is_main_process, **kwargs)
    if not is_main_process:
        return

    revert = None
    if save_original_format:
        try:
            from transformers.core_model_loading import revert_weight_conversion as revert
        except ImportError:  # older transformers 5.x save the fused layout
            revert = None

    # the shards transformers wrote for the non-expert tensors
    index_file = os.path.join(save_directory, SAFE_INDEX)
    single = os.path.join(save_directory, SAFE_WEIGHTS)
    if os.path.isfile(index_file):
        with open(index_file, encoding="utf-8") as f:
            weight_map: Dict[str, str] = dict(json.load(f)["weight_map"])
    elif os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            weight_map = {k: SAFE_WEIGHTS for k in f.keys()}
    else:
        raise RuntimeError(f"transformers wrote no {SAFE_WEIGHTS} / {SAFE_INDEX} in {save_directory}")
    files = sorted(set(weight_map.values()))

    total = 0
    for v in rest.values():
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    expert_files = []
    for i, (name, m) in enumerate(experts.items()):
        gate_up, down = m.merged_weights(getattr(m, "source_dtype", torch.bfloat16))
        if getattr(m, "source_transposed", False):
            gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
        layer = {f"{name}.gate_up_proj": gate_up, f"{name}.down_proj": down}
        del gate_up, down
        if revert is not None:
            layer = revert(model, layer)
        tmp = _TMP.format(i)
        save_file({k: v.contiguous() for k, v in layer.items()}, os.path.join(save_directory, tmp),
                  metadata={"format": "pt"})
        total += sum(v.numel() * v.element_size() for v in layer.values())
        expert_files.append((tmp, list(layer)))
        del layer

    n = len(files) + len(expert_files)
    names = [f"model-{j + 1:05d}-of-{n:05d}.safetensors" for j in range(n)]
    renames = {}
    for old, new in zip(files, names):
        renames[old] = new
    staged = []
    for old in files:  # two steps: an old name may equal another file's new name
        os.replace(os.path.join(save_directory, old), os.path.join(save_directory, old + ".ktmoe-renaming"))
        staged.append(old)
    for old in staged:
        os.replace(os.path.join(save_directory, old + ".ktmoe-renaming"), os.path.join(save_directory, renames[old]))
    weight_map = {k: renames[v] for k, v in weight_map.items()}
    for (tmp, keys), new in zip(expert_files, names[len(files):]):
        os.replace(os.path.join(save_directory, tmp), os.path.join(save_directory, new))
        for k in keys:
            weight_map[k] = new
    if os.path.isfile(single):
        os.remove(single)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(index_file, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


__all__ = ["save_pretrained"]
