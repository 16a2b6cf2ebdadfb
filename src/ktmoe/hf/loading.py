"""from_pretrained(): a transformers MoE model built from a checkpoint folder with its routed experts streamed
straight into ktmoe's packed format, shard by shard, never materialized as float tensors of the whole layer.

How it goes (each step refuses bad input before the next one reads data):

1. The checkpoint's headers are read (`ktmoe.convert.Checkpoint`: every shard opens as safetensors, so a
   truncated one is reported here), its quantization (`quantization_config`: none, block fp8, compressed-tensors
   int4) and its routed-expert keys (`find_moe_layers`, both layouts) are recognised, and every expert's scales
   and every fp8 non-expert linear's `weight_scale_inv` are read and checked (small tensors).
2. The transformers model is built from the config with its *parameters* on the meta device (buffers such as the
   rotary frequencies are computed on the CPU as usual) and transformers' own weight init skipped.
3. Each checkpoint key is mapped to the model's parameter names with transformers' own key renamings (Mixtral's
   `block_sparse_moe.` -> `mlp.`, ...); a key whose shape differs, or a parameter no key fills, is an error
   naming the file and key (or the parameter).
4. The shards are read one at a time (a progress bar over shards): an expert's linear goes into its slot of the
   layer's preallocated packed tensors as soon as its parts are in (fp8 codes and scales adopted bit for bit when
   the method's format is fp8, compressed-tensors int4 when it is int4_kgroup; otherwise packed from the values,
   dequantized as the checkpoint defines them); every other tensor becomes the model's parameter in the model
   dtype (fp8 linears dequantized: bf16(fp32(code) x scale_inv), then cast), `_keep_in_fp32_modules_strict`
   honoured as transformers does.
5. Only when everything is in are the experts modules swapped for `KTMoEHFExperts` (handed the packed tensors,
   no copy), in model order, so LoRA initialisation draws the same numbers as `convert_model` with the same seed.
   An error anywhere raises and returns nothing: no half-loaded model exists outside this function.

Peak memory: the packed experts, the non-expert parameters, and what one shard's reading touches (its memory map
pages while it is open, one expert's temporaries)."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..convert import Checkpoint, ConvertError, LayerSource, Progress, find_moe_layers, quantization
from ..parallel.expert_parallel import placement
from .convert import (DEFAULT_INFERENCE_METHOD, DEFAULT_SFT_METHOD, _LAYER_RE, _check_options, _converted_class,
                      _expert_parallel_group, default_group_size)
from .experts import KTMoEHFExperts
from .families import get_family

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}
_FP8_SCALE_DTYPES = {"F32", "BF16", "F16"}


# ------------------------------------------------------------------------------------------ model skeleton
@contextlib.contextmanager
def _parameters_on_meta():
    """Every nn.Parameter registered inside goes to the meta device (no memory); buffers stay where they are
    created, so values computed in __init__ (rotary inv_freq) are real."""
    orig = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        orig(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext
    with _parameters_on_meta(), no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _resolve_dtype(dtype, config) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(d, torch.dtype):
            return d
        return _DTYPES.get(str(d).replace("torch.", ""), torch.get_default_dtype())
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r}: expected 'auto', a torch dtype or one of {sorted(_DTYPES)}")


def _renamer(model: nn.Module):
    """checkpoint key -> model key with transformers' own renamings for this model (the identity where this
    transformers version does not expose them). Converters (the expert fusing) are not applied: ktmoe reads the
    experts itself."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except Exception:  # noqa: BLE001 - private API of transformers: fall back to plain names
        return lambda key, names: key
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key, names):
        new, _ = rename_source_key(key, renamings, [], prefix, names)
        return new

    return rename


def _dtype_plan(model: nn.Module, dtype: torch.dtype):
    """param name -> dtype override, as transformers' loader applies `_keep_in_fp32_modules(_strict)`."""
    get = getattr(model, "_get_dtype_plan", None)
    plan = get(dtype) if callable(get) else {}
    if not plan:
        return lambda name: None
    pats = [(re.compile(p.replace("*", ".*")), d) for p, d in plan.items()]

    def lookup(name):
        for pat, d in pats:
            if pat.search(name):
                return d
        return None

    return lookup


# ------------------------------------------------------------------------------------- the experts of a layer
class _LayerBuild:
    """The packed tensors of one MoE layer, filled expert by expert as the shards are read."""

    def __init__(self, src: LayerSource, fmt, group_size: int, block: Optional[Tuple[int, int]] = None):
        self.src, self.fmt, self.group_size = src, fmt, group_size
        self.first, self.end = block or (0, src.E)  # the experts this process packs (expert parallel: a block)
        self.slots: Dict[str, object] = {}
        self.pending: Dict[Tuple[str, int], Dict[str, torch.Tensor]] = {}
        self.filled = 0
        shipped = src.shipped_format()
        self.adopt_as_is = shipped is not None and shipped.name == fmt.name
        self.kinds = ("weight",) if not src.quant else (
            ("weight", "weight_scale_inv") if src.quant == "fp8" else ("weight_packed", "weight_scale", "weight_shape"))

    @property
    def complete(self) -> bool:
        return self.filled == 3 * (self.end - self.first)

    def add(self, ckpt: Checkpoint, which: str, e: int, kind: str, key: str, t: torch.Tensor) -> None:
        parts = self.pending.setdefault((which, e), {})
        parts[kind] = (key, t)
        if all(k in parts for k in self.kinds):  # the expert's linear is whole (its parts may span shards)
            del self.pending[(which, e)]
            self._fill(which, e, self._packed(ckpt, which, e, parts))
        else:  # waits for a part in a later shard: an own copy, not a view keeping this shard's map alive
            parts[kind] = (key, t.clone())

    def add_float(self, ckpt: Checkpoint, which: str, e: int, key: str, w: torch.Tensor) -> None:
        self._fill(which, e, self._packed(ckpt, which, e, {"weight": (key, w)}))

    def _packed(self, ckpt, which, e, parts):
        from ..checks import first_non_finite
        from ..formats import compressed_tensors

        src, fmt = self.src, self.fmt
        key = parts[self.kinds[0]][0]
        where = ckpt.where(key)
        try:
            if not src.quant:
                w = parts["weight"][1]
                bad = first_non_finite(w)
                if bad is not None:
                    raise ValueError(f"holds a non-finite value (NaN/Inf) at row {bad[0]}, column {bad[1]}")
                return fmt.pack(w.unsqueeze(0), self.group_size)
            if src.quant == "fp8":
                p = src.shipped_format().adopt(parts["weight"][1], parts["weight_scale_inv"][1], src.block,
                                               name="weight")
            else:
                p = compressed_tensors.adopt_pack_quantized(parts["weight_packed"][1], parts["weight_scale"][1],
                                                            parts["weight_shape"][1], name="weight")
            if self.adopt_as_is:
                return p
            return fmt.pack(src.shipped_format().dequantize(p), self.group_size)
        except ValueError as e_:
            raise ConvertError(f"{where}: tensor key {key!r} (layer {src.layer}, expert {e}'s {which}_proj): {e_}; "
                               "nothing was loaded") from e_

    def _fill(self, which: str, e: int, p) -> None:
        from ..formats import Packed

        slot = self.slots.get(which)
        if slot is None:  # shapes, group and block come from the first expert's packed form
            E = self.end - self.first
            alloc = lambda t: None if t is None else torch.empty((E,) + tuple(t.shape[1:]), dtype=t.dtype)  # noqa
            slot = Packed(alloc(p.data), alloc(p.scale), alloc(p.zero), (E,) + tuple(p.shape[1:]), p.group,
                          p.block_rows)
            self.slots[which] = slot
        for part in ("data", "scale", "zero"):
            dst = getattr(slot, part)
            if dst is not None:
                dst[e - self.first].copy_(getattr(p, part)[0])
        self.filled += 1

    def packed(self):
        return tuple(self.slots[w] for w in ("gate", "up", "down"))


# ------------------------------------------------------------------------------------------------ the plan
class _Plan:
    """What to read from where: checkpoint key -> destination, found from the headers alone."""

    def __init__(self):
        self.expert: Dict[str, Tuple[int, str, int, str]] = {}   # key -> (layer, which, expert, kind)
        self.fused: Dict[str, Tuple[int, str]] = {}              # key -> (layer, "gate_up" | "down")
        self.param: Dict[str, Tuple[str, Optional[str], str]] = {}  # key -> (model name, scale key, kind)
        self.aux: Dict[str, str] = {}                            # scale / shape key -> its main key
        self.unexpected: List[str] = []
        self.done: set = set()                                   # param keys loaded


def _fp8_scale_shape(shape, block):
    R, C = shape
    return (-(-R // block[0]), -(-C // block[1]))


def _plan(ckpt: Checkpoint, layers: Dict[int, LayerSource], quant: str, qinfo: Dict, targets: Dict[str, nn.Module],
          expected: Dict[str, torch.Tensor], rename, blocks: Dict[int, Tuple[int, int]]) -> _Plan:
    plan = _Plan()
    elsewhere = set()  # expert keys of other ranks' blocks (expert parallel): neither read nor unexpected
    for layer, src in layers.items():
        if src.layout == "fused":
            plan.fused[src.gate_up_key] = (layer, "gate_up")
            plan.fused[src.down_key] = (layer, "down")
            continue
        first, end = blocks.get(layer, (0, src.E))
        main = "weight" if src.quant != "int4_pack" else "weight_packed"
        per_kind = [(main, src.expert_keys)] + list(src.aux_keys.items())
        for kind, per in per_kind:
            for which, keys in per.items():
                for e, k in enumerate(keys):
                    if first <= e < end:
                        plan.expert[k] = (layer, which, e, kind)
                    else:
                        elsewhere.add(k)
    moe_keys = set(plan.expert) | set(plan.fused) | elsewhere
    from ..convert import _EXPERT_RE, _FUSED_RE

    for key in ckpt.keys():
        if key in moe_keys:
            continue
        if _EXPERT_RE.match(key) or _FUSED_RE.match(key):  # experts of a layer the model does not have (MTP)
            plan.unexpected.append(key)
            continue
        base, _, kind = key.rpartition(".")
        if quant == "fp8" and kind == "weight_scale_inv":
            if base + ".weight" not in ckpt.key_file:
                plan.unexpected.append(key)
            continue  # read with its weight
        if quant == "int4_pack" and kind in ("weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx"):
            if base + ".weight_packed" not in ckpt.key_file:
                plan.unexpected.append(key)
            continue
        if quant == "int4_pack" and kind == "weight_packed":
            name = rename(base + ".weight", expected)
            kind_ = "int4_pack"
        else:
            name = rename(key, expected)
            kind_ = "plain"
        if name not in expected:
            plan.unexpected.append(key)
            continue
        want = tuple(expected[name].shape)
        dt = ckpt.dtype(key)
        scale_key = None
        if kind_ == "int4_pack":
            for aux in ("weight_scale", "weight_shape"):
                if base + "." + aux not in ckpt.key_file:
                    raise ConvertError(f"{ckpt.where(key)}: tensor key {key!r} has no {aux} (tensor key "
                                       f"{base}.{aux} missing)")
            shape_t = ckpt.get_tensor(base + ".weight_shape")
            got = tuple(int(v) for v in shape_t.tolist())
            if got != want:
                raise ConvertError(f"{ckpt.where(base + '.weight_shape')}: tensor key {base + '.weight_shape'!r} is "
                                   f"{list(got)}, the model's {name} is {list(want)}")
            scale_key = base + ".weight_scale"
        elif dt == "F8_E4M3":
            if quant != "fp8":
                raise ConvertError(f"{ckpt.where(key)}: tensor key {key!r} is float8_e4m3fn but config.json has no "
                                   "fp8 quantization_config (quant_method: fp8, weight_block_size)")
            scale_key = base + ".weight_scale_inv"
            if scale_key not in ckpt.key_file:
                raise ConvertError(f"{ckpt.where(key)}: tensor key {key!r} is fp8 but has no scales (tensor key "
                                   f"{scale_key!r} missing)")
            ws = _fp8_scale_shape(ckpt.shape(key), qinfo["block"]) if len(ckpt.shape(key)) == 2 else None
            if ckpt.dtype(scale_key) not in _FP8_SCALE_DTYPES or ckpt.shape(scale_key) != ws:
                raise ConvertError(f"{ckpt.where(scale_key)}: tensor key {scale_key!r} is {ckpt.dtype(scale_key)} "
                                   f"{list(ckpt.shape(scale_key))}, expected F32 (or BF16 / F16) {list(ws or ())} "
                                   f"({qinfo['block'][0]} x {qinfo['block'][1]} blocks of {list(ckpt.shape(key))})")
            kind_ = "fp8"
        elif dt not in _FLOAT_DTYPES and expected[name].is_floating_point():
            raise ConvertError(f"{ckpt.where(key)}: tensor key {key!r} has dtype {dt}; the model's {name} is "
                               f"{expected[name].dtype}")
        if kind_ != "int4_pack" and tuple(ckpt.shape(key)) != want:
            raise ConvertError(f"{ckpt.where(key)}: tensor key {key!r} has shape {list(ckpt.shape(key))}, the model's "
                               f"{name} is {list(want)}")
        if name in {v[0] for v in plan.param.values()}:
            other = next(k for k, v in plan.param.items() if v[0] == name)
            raise ConvertError(f"{ckpt.where(key)}: tensor keys {key!r} and {other!r} both load {name}")
        plan.param[key] = (name, scale_key, kind_)
        if scale_key is not None:
            plan.aux[scale_key] = key
    return plan


def _check_param_scales(ckpt: Checkpoint, plan: _Plan) -> None:
    """The fp8 / int4 scales of the non-expert linears: finite (small tensors, read before any data)."""
    for key, (name, scale_key, kind) in plan.param.items():
        if scale_key is None:
            continue
        t = ckpt.get_tensor(scale_key)
        if not bool(torch.isfinite(t).all()):
            raise ConvertError(f"{ckpt.where(scale_key)}: tensor key {scale_key!r} holds non-finite scales")


def _dequantized_param(ckpt: Checkpoint, key: str, t: torch.Tensor, scale: torch.Tensor, kind: str, qinfo):
    from ..formats import FORMATS, compressed_tensors

    try:
        if kind == "fp8":
            fp8 = FORMATS["fp8"]
            return fp8.dequantize(fp8.adopt(t, scale, qinfo["block"], name="weight"))[0]
        shape = ckpt.get_tensor(key.rpartition(".")[0] + ".weight_shape")
        return compressed_tensors.dequantize_pack_quantized(t, scale, shape)
    except ValueError as e:
        raise ConvertError(f"{ckpt.where(key)}: tensor key {key!r}: {e}; nothing was loaded") from e


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        old = mod._parameters[attr]
        mod._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad if old is not None else True)
    else:
        mod._buffers[attr] = t


class _ShardBar:
    """tqdm over the shards when it is installed, else convert's one-line bar."""

    def __init__(self, total: int, enabled: bool):
        self.tq = None
        self.plain = None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm

            self.tq = tqdm(total=total, desc="ktmoe.from_pretrained", unit="shard", file=sys.stderr)
        except ImportError:
            self.plain = Progress(total, "ktmoe.from_pretrained")
            self.plain.update(0)

    def step(self, n: int, note: str) -> None:
        if self.tq is not None:
            self.tq.set_postfix_str(note, refresh=False)
            self.tq.update(1)
        elif self.plain is not None:
            self.plain.update(n, note)

    def close(self) -> None:
        if self.tq is not None:
            self.tq.close()
        elif self.plain is not None:
            self.plain.close()


# ------------------------------------------------------------------------------------------------ the entry
@torch.no_grad()
def from_pretrained(model_dir: str, *, method: Optional[str] = None, lora_rank: Optional[int] = None,
                    lora_alpha: Optional[float] = None, mode: str = "sft", dtype="auto",
                    cpuinfer_threads: Optional[int] = None, threadpool_count: int = 1,
                    group_size: Optional[int] = None, seed: Optional[int] = None,
                    generator: Optional[torch.Generator] = None, progress: bool = True, lora_dropout: float = 0.0,
                    num_gpu_experts: int = 0, expert_parallel: bool = False, process_group=None,
                    **wrapper_options) -> nn.Module:
    """A transformers causal LM (qwen3_moe, qwen2_moe, mixtral, deepseek_v2, deepseek_v3) loaded from a local
    checkpoint folder with its routed experts streamed into ktmoe, as `convert_model` would leave it: the same
    `KTMoEHFExperts` modules, LoRA parameters and options (method, lora_rank, lora_alpha, mode, group_size,
    cpuinfer_threads, threadpool_count, seed / generator, chunked_prefill_size, subpool_cpus, numa_local).

    Reads bf16 / fp16 / fp32 checkpoints (transformers v5 fused expert keys, or per-expert keys as shipped and as
    `save_pretrained` writes them), DeepSeek-style fp8 (`quantization_config.quant_method: fp8`, per-expert
    `weight` float8_e4m3fn + `weight_scale_inv`) and compressed-tensors pack-quantized int4 (Kimi-K2). A method of
    the shipped format (AMXFP8*, AMXINT4_KGroup*) keeps the shipped codes and scales bit for bit (K-group: the
    checkpoint's group); any other is packed from the dequantized values. Non-expert fp8 linears (attention,
    dense and shared MLPs) are dequantized to `dtype` ("auto": the config's). The returned model is in eval mode,
    on the CPU, with no `quantization_config` left in its config; next: `ktmoe.hf.add_lora`, training, `generate`.

    expert_parallel=True / process_group: as for `convert_model`; each rank reads and packs only its block of every
    layer's experts (other ranks' expert keys are not read).

    Peak memory: the packed experts + the other parameters + about one shard. Bad input (missing, mis-shaped or
    non-finite scales, NaN codes, an unknown quantization config, a truncated shard, missing keys) raises
    `ktmoe.convert.ConvertError` (a ValueError) naming the file and key; no model is returned."""
    from transformers import AutoConfig

    from ..formats import FORMATS
    from ..methods import REGISTRY

    if method is None:
        method = DEFAULT_SFT_METHOD if mode == "sft" else DEFAULT_INFERENCE_METHOD
    per_group = _check_options(mode, method, lora_rank, lora_alpha, None, group_size, lora_dropout, num_gpu_experts,
                               wrapper_options, who="from_pretrained")
    ep_group = _expert_parallel_group(expert_parallel, process_group)
    lora_rank = 0 if lora_rank is None else lora_rank
    lora_alpha = 1.0 if lora_alpha is None else lora_alpha
    fmt = REGISTRY[method].weight_format

    # 1. headers, quantization, expert keys, scales
    ckpt = Checkpoint(model_dir)
    cfg_path = os.path.join(ckpt.folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no config.json (a Hugging Face checkpoint folder is expected)")
    quant, qinfo = quantization(ckpt)
    layers = find_moe_layers(ckpt)

    # 2. the model, parameters on meta
    config = AutoConfig.from_pretrained(ckpt.folder)
    for c in (config, getattr(config, "text_config", None)):
        if c is not None and getattr(c, "quantization_config", None) is not None:
            del c.quantization_config  # what ktmoe loads is not quantized the transformers way
    family = get_family(config)
    family.check_config(config)
    dt = _resolve_dtype(dtype, config)
    model = _skeleton(config, dt)
    targets = {}
    for name, module in model.named_modules():
        if family.is_experts(name, module):
            m = _LAYER_RE.search("." + name)
            if m is None or int(m.group(1)) in targets:
                raise ValueError(f"{name}: cannot tell this experts module's layer index")
            targets[int(m.group(1))] = (name, module)
    if not targets:
        raise ValueError(f"no routed-experts modules ({', '.join(family.experts_classes)}) in this {family.name} model")
    for layer, (name, module) in targets.items():
        if layer not in layers:
            raise ConvertError(f"{ckpt.folder}: no routed-expert keys for {name} (layer {layer}); MoE layers in the "
                               f"checkpoint: {sorted(layers)}")
        gate, _, down = family.read_weights(module)
        src = layers[layer]
        if (src.E, src.I, src.H) != tuple(gate.shape):
            raise ConvertError(f"{ckpt.where(src.keys()[0])}: tensor key {src.keys()[0]!r}: layer {layer}'s experts "
                               f"are E={src.E}, I={src.I}, H={src.H}, the model's {name} is {list(gate.shape)} "
                               "[E, I, H] (config.json disagrees with the tensors)")
    layers = {i: s for i, s in layers.items() if i in targets}  # e.g. DeepSeek's MTP layer: not in the model
    first = layers[min(layers)]
    shipped = first.shipped_format()
    if shipped is not None and shipped.name == fmt.name and fmt.per_group:
        group_size = first.group  # adopted as shipped: the checkpoint's group
    elif per_group and group_size is None:
        group_size = default_group_size(first.H, first.I, threadpool_count, method)
    for src in layers.values():
        with ckpt.opened():
            src.check_scales(ckpt)
    skip = {n for n, _ in targets.values()}
    in_experts = lambda n: any(n == s or n.startswith(s + ".") for s in skip)  # noqa: E731
    expected = {n: p for n, p in model.named_parameters() if not in_experts(n)}
    persistent = {n for n, _ in model.state_dict(keep_vars=True).items()}
    expected.update({n: b for n, b in model.named_buffers() if n in persistent and not in_experts(n)})
    places = {i: placement(src.E, ep_group) for i, src in layers.items()} if expert_parallel else {}
    blocks = {i: (pl.first, pl.end) for i, pl in places.items()}
    plan = _plan(ckpt, layers, quant, qinfo, targets, expected, _renamer(model), blocks)
    with ckpt.opened():
        _check_param_scales(ckpt, plan)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if getattr(config, "tie_word_embeddings", False) \
        else set()
    loaded = {v[0] for v in plan.param.values()}
    missing = sorted(n for n in expected if n not in loaded and n not in tied and expected[n].device.type == "meta")
    if missing:
        raise ConvertError(f"{ckpt.folder}: no tensor key loads the model's {missing[0]}"
                           f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; checkpoint keys look "
                           f"like {ckpt.keys()[:3]}")
    if plan.unexpected:
        ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
        shown = [k for k in plan.unexpected if not any(p.search(k) for p in ignore)]
        if shown:
            logger.warning("ktmoe.hf.from_pretrained: %d checkpoint key(s) not used by the model, e.g. %s",
                           len(shown), shown[:3])

    # 3. stream the shards
    builds = {i: _LayerBuild(src, fmt, group_size, blocks.get(i)) for i, src in layers.items()}
    dplan = _dtype_plan(model, dt)
    by_shard: Dict[str, List[str]] = {}
    wanted = set(plan.expert) | set(plan.fused) | set(plan.param) | set(plan.aux)
    for key in ckpt.keys():
        if key in wanted:
            by_shard.setdefault(ckpt.key_file[key], []).append(key)
    pending_params: Dict[str, torch.Tensor] = {}   # quantized weights waiting for a scale in a later shard
    scales: Dict[str, torch.Tensor] = {}
    bar = _ShardBar(len(by_shard), progress)
    try:
        for n, shard in enumerate(sorted(by_shard)):
            with ckpt.opened():
                for key in by_shard[shard]:
                    if key in plan.fused:
                        layer, part = plan.fused[key]
                        _read_fused(ckpt, builds[layer], key, part)
                    elif key in plan.expert:
                        layer, which, e, kind = plan.expert[key]
                        builds[layer].add(ckpt, which, e, kind, key, ckpt.get_tensor(key))
                    else:
                        _load_param(ckpt, model, plan, key, expected, dt, dplan, qinfo, pending_params, scales)
            bar.step(n + 1, os.path.basename(shard))
    finally:
        bar.close()
    if pending_params:
        k = next(iter(pending_params))
        raise ConvertError(f"{ckpt.where(k)}: tensor key {k!r}: its scale was never read")
    for layer, b in builds.items():
        if not b.complete:
            (which, e), parts = next(iter(b.pending.items()))
            raise ConvertError(f"{ckpt.folder}: layer {layer}: expert {e}'s {which}_proj is incomplete (has "
                               f"{sorted(parts)}, tensor key {next(iter(parts.values()))[0]!r})")

    # 4. the experts modules, in model order
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    k = family.top_k(config)
    extra = dict(wrapper_options)
    if group_size is not None and per_group:
        extra["group_size"] = group_size
    for layer in targets:  # model order
        name, module = targets[layer]
        new = KTMoEHFExperts(None, None, None, packed=builds[layer].packed(), num_experts_per_tok=k,
                             lora_rank=lora_rank, lora_alpha=lora_alpha, layer_idx=layer, generator=generator,
                             cpuinfer_threads=cpuinfer_threads, threadpool_count=threadpool_count, mode=mode,
                             method=method, source=type(module).__name__, expert_parallel=places.get(layer),
                             **extra)
        new.source_dtype = dt
        new.source_transposed = bool(getattr(module, "is_transposed", False))
        builds[layer] = None
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    if tied:
        model.tie_weights()
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if left:
        raise ConvertError(f"{ckpt.folder}: the model's {left[0]} was not loaded (no tensor key for it)")
    model.__class__ = _converted_class(type(model))
    model.eval()
    return model


def _read_fused(ckpt: Checkpoint, build: _LayerBuild, key: str, part: str) -> None:
    """v5 fused keys, one expert at a time from the shard: gate_up [E, 2I, H] (gate rows first) or [E, H, 2I];
    down [E, H, I] or [E, I, H]."""
    src = build.src
    I = src.I
    for e in range(build.first, build.end):
        t = ckpt.get_slice(key, e)
        if src.transposed:
            t = t.transpose(0, 1)
        if part == "gate_up":
            build.add_float(ckpt, "gate", e, key, t[:I])
            build.add_float(ckpt, "up", e, key, t[I:])
        else:
            build.add_float(ckpt, "down", e, key, t)


def _load_param(ckpt, model, plan, key, expected, dt, dplan, qinfo, pending, scales) -> None:
    if key in plan.aux:  # a scale: its weight is loaded already (same shard), waits for it, or comes later
        main = plan.aux[key]
        if main in pending:
            _finish_param(ckpt, model, plan, main, pending.pop(main), ckpt.get_tensor(key), expected, dt, dplan, qinfo)
        elif ckpt.key_file[main] != ckpt.key_file[key] and main not in plan.done:
            scales[key] = ckpt.get_tensor(key).clone()  # not a view into this shard's map (see _own)
        return
    name, scale_key, kind = plan.param[key]
    t = ckpt.get_tensor(key)
    if scale_key is None:
        _finish_param(ckpt, model, plan, key, t, None, expected, dt, dplan, qinfo)
    elif scale_key in scales:
        _finish_param(ckpt, model, plan, key, t, scales.pop(scale_key), expected, dt, dplan, qinfo)
    elif ckpt.key_file[scale_key] == ckpt.key_file[key]:
        _finish_param(ckpt, model, plan, key, t, ckpt.get_tensor(scale_key), expected, dt, dplan, qinfo)
    else:
        pending[key] = t.clone()


def _own(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, in memory of its own: safetensors hands out views into the shard's memory map, and a parameter
    left as such a view would keep the whole map, with every page this load touched (the experts' too), resident."""
    out = torch.empty(t.shape, dtype=dtype)
    out.copy_(t)
    return out


def _finish_param(ckpt, model, plan, key, t, scale, expected, dt, dplan, qinfo) -> None:
    name, _, kind = plan.param[key]
    if kind != "plain":
        t = _dequantized_param(ckpt, key, t, scale, kind, qinfo)
    meta = expected[name]
    want = t.dtype
    if t.is_floating_point():
        want = dplan(name) or (meta.dtype if meta.dtype != dt and meta.is_floating_point() else dt)
    _set_tensor(model, name, _own(t, want))
    plan.done.add(key)


__all__ = ["from_pretrained"]
