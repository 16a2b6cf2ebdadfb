"""Hugging Face checkpoint folder -> ktmoe pre-quantized weight folder (`python -m ktmoe.convert`).

Reads the routed experts of every MoE layer from the checkpoint's safetensors shards (bf16, fp16 or fp32, or
quantized as shipped: DeepSeek-style fp8 with block `weight_scale_inv`, compressed-tensors pack-quantized int4;
with or without `model.safetensors.index.json`) in either layout (quantized checkpoints: per expert):

- transformers v5, fused:   `<prefix>layers.{i}.mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first) and
                            `<prefix>layers.{i}.mlp.experts.down_proj` [E, H, I]
                            (the transposed variant [E, H, 2I] / [E, I, H] is recognised from the shapes);
- v4-style, per expert:     `<prefix>layers.{i}.mlp.experts.{e}.gate_proj.weight` [I, H], `up_proj` [I, H],
                            `down_proj` [H, I]; Mixtral: `block_sparse_moe.experts.{e}.w1/w3/w2` =
                            gate/up/down. (This is what transformers 5 `save_pretrained()` writes by default;
                            `save_pretrained(..., save_original_format=False)` writes the fused layout.)

Layer by layer and projection by projection (only that projection's tensors are in memory, in the
checkpoint's dtype, plus its packed result), it packs with the method's weight format and writes the layer
with `ktmoe.weights_io.write_layer`. Afterwards it re-opens every written file and checks it: manifest,
size, sha256, keys, dtypes and shapes, and for one sample expert per layer that the stored codes decode to
exactly what packing that expert (re-read from the checkpoint) gives. See docs/weight_format.md."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

import torch

from .. import weights_io
from ..formats import Packed, WeightFormat
from ..methods import REGISTRY, Method

__all__ = ["convert_checkpoint", "Checkpoint", "LayerSource", "find_moe_layers", "parse_layers", "ConvertError"]

INDEX_NAME = "model.safetensors.index.json"
_SOURCE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# loose sanity bound on the rel-L2 error of decode(pack(w)) vs w for the sample expert, by weight bits
_SANITY_REL_L2 = {16: 1e-2, 8: 5e-2, 4: 0.3}

_FUSED_RE = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d+)\.(?P<mod>mlp|block_sparse_moe)\.experts\."
                       r"(?P<name>gate_up_proj|down_proj)(?P<suffix>\.weight|_bias|\.bias)?$")
_EXPERT_RE = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d+)\.(?P<mod>mlp|block_sparse_moe)\.experts\."
                        r"(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\."
                        r"(?P<kind>weight|bias|weight_scale_inv|weight_packed|weight_scale|weight_shape|"
                        r"weight_zero_point|weight_g_idx|input_scale)$")
# the tensors of one quantized linear, by quantization (quantization_config.quant_method), main tensor first
_QUANT_KINDS = {"": ("weight",), "fp8": ("weight", "weight_scale_inv"),
                "int4_pack": ("weight_packed", "weight_scale", "weight_shape")}
_QUANT_DTYPES = {"fp8": {"weight": ("F8_E4M3",), "weight_scale_inv": ("F32", "BF16", "F16")},
                 "int4_pack": {"weight_packed": ("I32",), "weight_scale": ("BF16", "F16", "F32"),
                               "weight_shape": ("I64", "I32")}}
_PROJ_ALIASES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


class ConvertError(ValueError):
    """The checkpoint cannot be converted as asked (names the file / key / layer at fault)."""


# -------------------------------------------------------------------------------------------- checkpoint
class Checkpoint:
    """A Hugging Face checkpoint folder of safetensors shards: which shard holds each key, tensor metadata
    from the headers only, and tensors / slices read on demand."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = os.fspath(folder)
        if not os.path.isdir(self.folder):
            raise FileNotFoundError(f"checkpoint folder {self.folder!r} does not exist")
        self.key_file: Dict[str, str] = {}
        self._meta: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
        index = os.path.join(self.folder, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConvertError(f"{index}: unreadable index ({e!r})") from e
            shards = sorted(set(weight_map.values()))
        else:
            weight_map = None
            shards = sorted(n for n in os.listdir(self.folder) if n.endswith(".safetensors"))
        if not shards:
            raise FileNotFoundError(f"{self.folder}: no *.safetensors files (and no {INDEX_NAME})")
        for shard in shards:
            path = os.path.join(self.folder, shard)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: shard listed in {INDEX_NAME} is missing")
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for k in f.keys():
                        if weight_map is not None and weight_map.get(k) != shard:
                            continue
                        if k in self.key_file:
                            raise ConvertError(f"{path}: tensor key {k!r} also in {self.key_file[k]}; which one "
                                               f"is meant? (add a {INDEX_NAME})")
                        sl = f.get_slice(k)
                        self.key_file[k] = shard
                        self._meta[k] = (sl.get_dtype(), tuple(sl.get_shape()))
            except ConvertError:
                raise
            except Exception as e:
                raise ConvertError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
        if weight_map is not None:
            missing = sorted(k for k in weight_map if k not in self.key_file)
            if missing:
                raise ConvertError(f"{index}: {len(missing)} key(s) not found in their shards, e.g. {missing[0]!r} "
                                   f"(expected in {weight_map[missing[0]]})")
        self.config: Dict = {}
        cfg = os.path.join(self.folder, "config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg) as f:
                    self.config = json.load(f)
            except (OSError, ValueError):
                self.config = {}
        self._handles: Dict[str, object] = {}
        self._stack: Optional[contextlib.ExitStack] = None

    def keys(self) -> List[str]:
        return list(self.key_file)

    def dtype(self, key: str) -> str:
        return self._meta[key][0]

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._meta[key][1]

    def where(self, key: str) -> str:
        return os.path.join(self.folder, self.key_file[key])

    # Open shards are cached between `with ckpt.opened():` brackets (one layer at a time).
    @contextlib.contextmanager
    def opened(self):
        self._stack = contextlib.ExitStack()
        try:
            with self._stack:
                yield self
        finally:
            self._handles.clear()
            self._stack = None

    def _handle(self, key: str):
        from safetensors import safe_open

        shard = self.key_file[key]
        h = self._handles.get(shard)
        if h is None:
            h = safe_open(os.path.join(self.folder, shard), framework="pt", device="cpu")
            if self._stack is not None:
                h = self._stack.enter_context(h)
                self._handles[shard] = h
            else:
                h = h.__enter__()
        return h

    def get_tensor(self, key: str) -> torch.Tensor:
        try:
            return self._handle(key).get_tensor(key)
        except Exception as e:
            raise ConvertError(f"{self.where(key)}: cannot read tensor key {key!r}: {e}") from e

    def get_slice(self, key: str, index) -> torch.Tensor:
        try:
            return self._handle(key).get_slice(key)[index]
        except Exception as e:
            raise ConvertError(f"{self.where(key)}: cannot read tensor key {key!r}: {e}") from e


# ------------------------------------------------------------------------------------------ layer finding
@dataclass
class LayerSource:
    """Where one MoE layer's routed experts are in the checkpoint."""

    layer: int
    layout: str                         # "fused" or "per_expert"
    E: int
    H: int
    I: int
    transposed: bool = False            # fused [E, H, 2I] / [E, I, H]
    gate_up_key: str = ""               # fused
    down_key: str = ""                  # fused
    expert_keys: Dict[str, List[str]] = field(default_factory=dict)  # per_expert: gate/up/down -> E keys
    quant: str = ""                     # "" (float), "fp8" (e4m3 + block scale_inv), "int4_pack" (compressed-tensors)
    # per_expert, quantized: tensor kind (weight_scale_inv, ...) -> gate/up/down -> E keys
    aux_keys: Dict[str, Dict[str, List[str]]] = field(default_factory=dict)
    block: Tuple[int, int] = (128, 128)  # fp8: rows x cols per scale (weight_block_size)
    group: int = 0                       # int4_pack: columns per scale (config_groups.*.weights.group_size)

    def keys(self) -> List[str]:
        if self.layout == "fused":
            return [self.gate_up_key, self.down_key]
        return [k for which in ("gate", "up", "down") for k in self.expert_keys[which]] + \
            [k for d in self.aux_keys.values() for which in ("gate", "up", "down") for k in d[which]]

    def shipped_format(self) -> Optional[WeightFormat]:
        """The ktmoe format the checkpoint's codes are adopted into (None for float checkpoints)."""
        from ..formats import FORMATS

        return {"": None, "fp8": FORMATS["fp8"], "int4_pack": FORMATS["int4_kgroup"]}[self.quant]

    def load_shipped(self, ckpt: Checkpoint, which: str, experts: Optional[Sequence[int]] = None) -> Packed:
        """One projection of a quantized checkpoint as it ships, adopted bit for bit (shipped_format()):
        all experts or the given ones. ConvertError naming the file and key for bad scales or codes."""
        from ..formats import compressed_tensors

        idx = list(range(self.E) if experts is None else experts)
        main = self.expert_keys[which]
        shape = (self.I, self.H) if which != "down" else (self.H, self.I)
        first = ckpt.get_tensor(main[idx[0]])
        codes = torch.empty((len(idx),) + tuple(first.shape), dtype=first.dtype)
        for j, e in enumerate(idx):
            codes[j].copy_(first if j == 0 else ckpt.get_tensor(main[e]))
        del first
        aux = {kind: [ckpt.get_tensor(self.aux_keys[kind][which][e]) for e in idx] for kind in self.aux_keys}
        key = main[idx[0]]
        try:
            if self.quant == "fp8":
                return self.shipped_format().adopt(codes, torch.stack(aux["weight_scale_inv"]), self.block,
                                                   name="weight")
            return compressed_tensors.adopt_pack_quantized(codes, torch.stack(aux["weight_scale"]), shape,
                                                           name="weight")
        except ValueError as e:
            raise ConvertError(f"{ckpt.where(key)}: tensor key {key!r} (experts {idx[0]}..{idx[-1]} of "
                               f"{which}_proj): {e}; nothing was written for layer {self.layer}") from e

    def check_scales(self, ckpt: Checkpoint) -> None:
        """Reads every expert's scales (and weight_shape) of a quantized layer, small tensors, and checks
        their shapes and values: ConvertError naming the file and key. Done for every layer before anything
        is written."""
        if not self.quant:
            return
        for which in ("gate", "up", "down"):
            R, C = (self.I, self.H) if which != "down" else (self.H, self.I)
            if self.quant == "fp8":
                br, bc = self.block
                kind, want = "weight_scale_inv", (-(-R // br), -(-C // bc))
            else:
                kind, want = "weight_scale", None
            for e, key in enumerate(self.aux_keys[kind][which]):
                t = ckpt.get_tensor(key)
                if want is None:  # int4 groups: one scale per group of a row (the config's group_size)
                    ok = tuple(t.shape) == (R, C // self.group) and C % self.group == 0
                    what = f"[{R}, {C // self.group}] (group_size {self.group} of [{R}, {C}])"
                else:
                    ok, what = tuple(t.shape) == want, f"{list(want)} ({br} x {bc} blocks of [{R}, {C}])"
                if not ok:
                    raise ConvertError(f"{ckpt.where(key)}: tensor key {key!r} has shape {list(t.shape)}, expected "
                                       f"{what}")
                if not bool(torch.isfinite(t).all()):
                    raise ConvertError(f"{ckpt.where(key)}: tensor key {key!r} holds non-finite scales")
            if self.quant == "int4_pack":
                for key in self.aux_keys["weight_shape"][which]:
                    got = [int(v) for v in ckpt.get_tensor(key).tolist()]
                    if got != [R, C]:
                        raise ConvertError(f"{ckpt.where(key)}: tensor key {key!r} is {got}, expected [{R}, {C}] "
                                           f"(the layer's {which} projection)")

    def load_float(self, ckpt: Checkpoint, which: str, experts: Optional[Sequence[int]] = None) -> torch.Tensor:
        """One projection as float weights [E', R, C]: the checkpoint's own values, dequantized (as the
        checkpoint defines it) for quantized ones."""
        if not self.quant:
            return self.load(ckpt, which, experts)
        return self.shipped_format().dequantize(self.load_shipped(ckpt, which, experts))

    def pack_for(self, ckpt: Checkpoint, which: str, fmt: WeightFormat, group_size: int,
                 experts: Optional[Sequence[int]] = None) -> Packed:
        """One projection in `fmt`: the shipped codes as they are when fmt is the shipped format, else packed
        from the (dequantized) values."""
        shipped = self.shipped_format()
        if shipped is not None and shipped.name == fmt.name:
            return self.load_shipped(ckpt, which, experts)
        w = self.load_float(ckpt, which, experts)
        _check_finite(w, self, which)  # every expert: a quantizer would turn a NaN row into zeros
        return fmt.pack(w, group_size)

    def load(self, ckpt: Checkpoint, which: str, experts: Optional[Sequence[int]] = None) -> torch.Tensor:
        """One projection as [E', R, C] (out x in) in the checkpoint's dtype: all experts, or the given ones."""
        I = self.I
        if self.layout == "fused":
            if which == "down":
                if experts is None:
                    t = ckpt.get_tensor(self.down_key)
                else:
                    t = torch.stack([ckpt.get_slice(self.down_key, e) for e in experts])
                return t.transpose(1, 2) if self.transposed else t
            half = slice(0, I) if which == "gate" else slice(I, 2 * I)
            index = (slice(None), slice(None), half) if self.transposed else (slice(None), half)  # [E, H, 2I]
            if experts is None:
                t = ckpt.get_slice(self.gate_up_key, index)
            else:
                t = torch.stack([ckpt.get_slice(self.gate_up_key, (e,) + index[1:]) for e in experts])
            return t.transpose(1, 2) if self.transposed else t
        keys = self.expert_keys[which]
        idx = range(self.E) if experts is None else experts
        first = ckpt.get_tensor(keys[idx[0]])
        out = torch.empty((len(idx),) + tuple(first.shape), dtype=first.dtype)
        out[0].copy_(first)
        del first
        for j, e in enumerate(idx[1:], start=1):
            out[j].copy_(ckpt.get_tensor(keys[e]))
        return out


def _text_config(config: Dict) -> Dict:
    tc = config.get("text_config")
    return tc if isinstance(tc, dict) else config


def _config_value(config: Dict, *names):
    c = _text_config(config)
    for n in names:
        if isinstance(c.get(n), int) and not isinstance(c.get(n), bool):
            return n, c[n]
    return None, None


def quantization(ckpt: Checkpoint) -> Tuple[str, Dict]:
    """The checkpoint's quantization from config.json's quantization_config: ("", {}) for none; ("fp8",
    {"block": (rows, cols)}) for DeepSeek-style block fp8; ("int4_pack", {"group": g}) for compressed-tensors
    pack-quantized symmetric int4 groups. ConvertError naming config.json and the key otherwise."""
    cfg_path = os.path.join(ckpt.folder, "config.json")
    qc = ckpt.config.get("quantization_config", _text_config(ckpt.config).get("quantization_config"))
    if qc is None:
        return "", {}
    if not isinstance(qc, dict):
        raise ConvertError(f"{cfg_path}: key 'quantization_config' is not an object: {qc!r}")
    method = qc.get("quant_method")
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ConvertError(f"{cfg_path}: key 'quantization_config.fmt' is {fmt!r}; ktmoe reads e4m3 fp8")
        from ..formats.fp8 import check_block_size

        try:
            block = check_block_size(qc.get("weight_block_size"), "quantization_config.weight_block_size")
        except ValueError as e:
            raise ConvertError(f"{cfg_path}: key {e} (per-tensor fp8 scales are not read)") from e
        return "fp8", {"block": block}
    if method == "compressed-tensors":
        fmt = qc.get("format")
        groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), dict) else {}
        for name, grp in groups.items():
            wa = grp.get("weights") if isinstance(grp, dict) else None
            gfmt = grp.get("format", fmt) if isinstance(grp, dict) else fmt
            want = dict(num_bits=4, type="int", symmetric=True, strategy="group")
            got = {k: (wa or {}).get(k) for k in want}
            if gfmt != "pack-quantized" or got != want or not isinstance((wa or {}).get("group_size"), int):
                raise ConvertError(f"{cfg_path}: key 'quantization_config.config_groups.{name}' is format {gfmt!r} "
                                   f"with weights {got} group_size {(wa or {}).get('group_size')!r}; ktmoe adopts "
                                   "pack-quantized symmetric int4 groups (num_bits 4, type int, strategy group)")
            return "int4_pack", {"group": wa["group_size"]}
        raise ConvertError(f"{cfg_path}: key 'quantization_config.config_groups' is missing or empty")
    raise ConvertError(f"{cfg_path}: key 'quantization_config.quant_method' is {method!r}; the converter reads "
                       "unquantized checkpoints, 'fp8' (block-scaled e4m3) and 'compressed-tensors' "
                       "(pack-quantized int4)")


def find_moe_layers(ckpt: Checkpoint, prefix: Optional[str] = None) -> Dict[int, LayerSource]:
    """{layer index: LayerSource} for every MoE layer of the checkpoint (both layouts), checked: complete
    expert sets, consistent shapes and dtypes the converter reads, the config's sizes where it gives them;
    for quantized checkpoints (quantization_config) every expert's scales present, with their dtypes."""
    quant, qinfo = quantization(ckpt)
    fused: Dict[Tuple[str, int], Dict[str, str]] = {}
    per: Dict[Tuple[str, int], Dict[str, Dict[int, Dict[str, str]]]] = {}
    for key in ckpt.keys():
        m = _FUSED_RE.match(key)
        if m:
            if prefix is not None and m["prefix"] != prefix:
                continue
            if m["suffix"] in ("_bias", ".bias"):
                raise ConvertError(f"{ckpt.where(key)}: tensor key {key!r}: expert biases are not supported by "
                                   "ktmoe")
            fused.setdefault((m["prefix"], int(m["layer"])), {})[m["name"]] = key
            continue
        m = _EXPERT_RE.match(key)
        if m:
            if prefix is not None and m["prefix"] != prefix:
                continue
            if m["kind"] == "bias":
                raise ConvertError(f"{ckpt.where(key)}: tensor key {key!r}: expert biases are not supported by "
                                   "ktmoe")
            if m["kind"] not in _QUANT_KINDS[quant]:
                raise ConvertError(f"{ckpt.where(key)}: tensor key {key!r}: a {m['kind']} tensor is not part of "
                                   f"the {'unquantized' if not quant else quant} checkpoint layout ktmoe reads "
                                   f"({', '.join(_QUANT_KINDS[quant])})")
            d = per.setdefault((m["prefix"], int(m["layer"])), {})
            d.setdefault(_PROJ_ALIASES[m["proj"]], {}).setdefault(int(m["e"]), {})[m["kind"]] = key
    found: Dict[int, LayerSource] = {}
    seen_prefix: Dict[int, str] = {}
    for (pre, layer) in sorted(set(fused) | set(per), key=lambda t: (t[1], t[0])):
        if layer in seen_prefix:
            raise ConvertError(f"{ckpt.folder}: layer {layer} has routed experts under two prefixes "
                               f"({seen_prefix[layer]!r} and {pre!r}); pick one with --prefix")
        seen_prefix[layer] = pre
        if (pre, layer) in fused and (pre, layer) in per:
            raise ConvertError(f"{ckpt.folder}: layer {layer} has both fused and per-expert keys "
                               f"(e.g. {next(iter(fused[(pre, layer)].values()))!r}); which one is meant?")
        if (pre, layer) in fused:
            if quant:
                raise ConvertError(f"{ckpt.where(next(iter(fused[(pre, layer)].values())))}: layer {layer}: fused "
                                   f"expert keys in a {quant} checkpoint; ktmoe reads quantized experts per expert")
            src = _fused_layer(ckpt, layer, fused[(pre, layer)])
        else:
            src = _per_expert_layer(ckpt, layer, per[(pre, layer)], quant)
            src.block = qinfo.get("block", src.block)
            src.group = qinfo.get("group", 0)
        for key in src.keys():
            if quant:
                kind = key.rsplit(".", 1)[1]
                if ckpt.dtype(key) not in _QUANT_DTYPES[quant][kind]:
                    raise ConvertError(f"{ckpt.where(key)}: tensor key {key!r} has dtype {ckpt.dtype(key)}; a {quant} "
                                       f"checkpoint's {kind} is {' or '.join(_QUANT_DTYPES[quant][kind])}")
                continue
            if ckpt.dtype(key) not in _SOURCE_DTYPES:
                raise ConvertError(f"{ckpt.where(key)}: tensor key {key!r} has dtype {ckpt.dtype(key)}; the "
                                   f"converter reads {sorted(_SOURCE_DTYPES)}, and fp8 / compressed-tensors int4 "
                                   "checkpoints whose config.json has their quantization_config")
        _check_config(ckpt, src)
        found[layer] = src
    return found


def _fused_layer(ckpt: Checkpoint, layer: int, keys: Dict[str, str]) -> LayerSource:
    for name in ("gate_up_proj", "down_proj"):
        if name not in keys:
            other = next(iter(keys.values()))
            raise ConvertError(f"{ckpt.where(other)}: layer {layer} has {other!r} but no "
                               f"...experts.{name} key")
    gu, dn = keys["gate_up_proj"], keys["down_proj"]
    a, b = ckpt.shape(gu), ckpt.shape(dn)
    if len(a) != 3 or len(b) != 3 or a[0] != b[0]:
        raise ConvertError(f"{ckpt.where(gu)}: layer {layer}: gate_up_proj {a} / down_proj {b} are not "
                           "[E, 2I, H] / [E, H, I]")
    E = a[0]
    if a[2] == b[1] and a[1] == 2 * b[2]:          # [E, 2I, H], [E, H, I]
        return LayerSource(layer, "fused", E, a[2], b[2], False, gu, dn)
    if a[1] == b[2] and a[2] == 2 * b[1]:          # transposed: [E, H, 2I], [E, I, H]
        return LayerSource(layer, "fused", E, a[1], b[1], True, gu, dn)
    raise ConvertError(f"{ckpt.where(gu)}: layer {layer}: tensor keys {gu!r} {a} and {dn!r} {b} are not "
                       "[E, 2I, H] and [E, H, I] (gate rows first)")


def _per_expert_layer(ckpt: Checkpoint, layer: int, kinds: Dict[str, Dict[int, Dict[str, str]]],
                      quant: str = "") -> LayerSource:
    main, *aux_kinds = _QUANT_KINDS[quant]
    aux: Dict[str, Dict[str, List[str]]] = {kind: {} for kind in aux_kinds}
    for which, per_e in kinds.items():  # every expert has every tensor of its quantized linear
        for e, ks in per_e.items():
            for kind in (main, *aux_kinds):
                if kind not in ks:
                    have = next(iter(ks.values()))
                    raise ConvertError(f"{ckpt.where(have)}: layer {layer}: expert {e}'s {which} projection has "
                                       f"{sorted(ks)} but no {kind} (tensor key "
                                       f"{have.rsplit('.', 1)[0]}.{kind} missing)")
    d = {which: {e: ks[main] for e, ks in per_e.items()} for which, per_e in kinds.items()}
    any_key = next(iter(next(iter(d.values())).values()))
    experts = sorted(set().union(*(set(v) for v in d.values())))
    E = len(experts)
    if experts != list(range(E)):
        raise ConvertError(f"{ckpt.where(any_key)}: layer {layer}: expert indices {experts[:8]}... are not "
                           f"0..{E - 1}")
    keys: Dict[str, List[str]] = {}
    for which in ("gate", "up", "down"):
        have = d.get(which, {})
        missing = [e for e in range(E) if e not in have]
        if missing:
            example = any_key.rsplit(".experts.", 1)[0] + f".experts.{missing[0]}"
            raise ConvertError(f"{ckpt.where(any_key)}: layer {layer}: no {which} projection for expert "
                               f"{missing[0]} (tensor key {example}.{which}_proj.weight / w1|w3|w2 missing)")
        keys[which] = [have[e] for e in range(E)]
    for kind in aux_kinds:
        for which in ("gate", "up", "down"):
            aux[kind][which] = [kinds[which][e][kind] for e in range(E)]
    if quant == "int4_pack":  # the logical shape is in weight_shape: read the small tensors now
        I, H = (int(v) for v in ckpt.get_tensor(aux["weight_shape"]["gate"][0]).tolist())
        words = lambda c: -(-c // 8)  # noqa: E731
        want = {"gate": (I, words(H)), "up": (I, words(H)), "down": (H, words(I))}
    else:
        I, H = ckpt.shape(keys["gate"][0]) if len(ckpt.shape(keys["gate"][0])) == 2 else (None, None)
        if I is None:
            raise ConvertError(f"{ckpt.where(keys['gate'][0])}: tensor key {keys['gate'][0]!r} has shape "
                               f"{ckpt.shape(keys['gate'][0])}, expected [I, H]")
        want = {"gate": (I, H), "up": (I, H), "down": (H, I)}
    for which in ("gate", "up", "down"):
        for k in keys[which]:
            if ckpt.shape(k) != want[which]:
                raise ConvertError(f"{ckpt.where(k)}: tensor key {k!r} has shape {list(ckpt.shape(k))}, expected "
                                   f"{list(want[which])} (from {keys['gate'][0]})")
    return LayerSource(layer, "per_expert", E, H, I, expert_keys=keys, quant=quant, aux_keys=aux)


def _check_config(ckpt: Checkpoint, src: LayerSource) -> None:
    cfg_path = os.path.join(ckpt.folder, "config.json")
    for names, got, what in ((("hidden_size",), src.H, "H"),
                             (("num_experts", "n_routed_experts", "num_local_experts"), src.E, "E"),
                             (("moe_intermediate_size",), src.I, "I")):
        name, v = _config_value(ckpt.config, *names)
        if name is not None and v != got:
            raise ConvertError(f"{cfg_path}: {name}={v} but layer {src.layer}'s experts (tensor key "
                               f"{src.keys()[0]!r}) give {what}={got}; the layout is not the one expected")


def parse_layers(spec: Optional[str]) -> Optional[List[int]]:
    """'0,1,5-7' -> [0, 1, 5, 6, 7]; None or '' -> None (all)."""
    if not spec:
        return None
    out: List[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--layers: {part!r} is not an int or a range a-b") from None
    return sorted(set(out))


# ---------------------------------------------------------------------------------------------- progress
class Progress:
    """A one-line progress bar on stderr (carriage return), no dependencies."""

    def __init__(self, total: int, label: str, stream: Optional[TextIO] = None, enabled: bool = True):
        self.total, self.label, self.stream, self.enabled = total, label, stream or sys.stderr, enabled
        self.t0 = time.monotonic()
        self.done = 0

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(self.total, 1))
        el = time.monotonic() - self.t0
        eta = f", eta {el / done * (self.total - done):.0f}s" if 0 < done < self.total else ""
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                          f"{el:.1f}s{eta} {note:<24s}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


# -------------------------------------------------------------------------------------------- conversion
def _method(method: str) -> Method:
    if method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[method]


def _check_finite(w: torch.Tensor, src: LayerSource, which: str) -> None:
    """ConvertError naming the layer, projection, expert and row of the first NaN/Inf in the checkpoint."""
    from ..checks import first_non_finite

    idx = first_non_finite(w)
    if idx is not None:
        raise ConvertError(f"layer {src.layer}: the checkpoint's {which}_proj of expert {idx[0]} holds a non-finite "
                           f"value (NaN/Inf) at row {idx[1]}, column {idx[2]}; nothing was written for this layer")


def _sample_check(ckpt: Checkpoint, src: LayerSource, folder: str, fmt: WeightFormat, group_size: int,
                  e: int, bits: int) -> float:
    """decode(stored expert e) == decode(pack(checkpoint expert e)), and close to the original. Returns the
    worst rel-L2 error vs the original."""
    from safetensors import safe_open

    path = os.path.join(folder, weights_io.layer_filename(src.layer))
    worst = 0.0
    with safe_open(path, framework="pt", device="cpu") as f:
        for which in ("gate", "up", "down"):
            w = src.load_float(ckpt, which, [e]).float()  # the checkpoint's values (dequantized as it defines)
            _, R, C = w.shape
            want_p = src.pack_for(ckpt, which, fmt, group_size, [e])
            parts = {}
            for part in weights_io.PARTS:
                key = f"{which}.{part}"
                parts[part] = f.get_slice(key)[e:e + 1] if key in f.keys() else None
            stored = Packed(parts["data"], parts["scale"], parts["zero"], (1, R, C), want_p.group, want_p.block_rows)
            got = fmt.dequantize(stored)
            want = fmt.dequantize(want_p)
            same = all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                       for a, b in ((stored.data, want_p.data), (stored.scale, want_p.scale),
                                    (stored.zero, want_p.zero)))
            if not same or not torch.equal(got, want):
                raise ConvertError(f"{path}: check failed: expert {e}'s {which} weights read back "
                                   f"(keys {which}.*) differ from packing the checkpoint's expert {e}")
            n = float(w.double().norm())
            if n > 0:
                err = float((got.double() - w.double()).norm()) / n
                worst = max(worst, err)
                if err > _SANITY_REL_L2.get(bits, 0.3):
                    raise ConvertError(f"{path}: check failed: expert {e}'s {which} weights decode with rel-L2 "
                                       f"error {err:.3g} vs the checkpoint (bound {_SANITY_REL_L2.get(bits, 0.3)})")
    return worst


def convert_checkpoint(input_dir: str, output_dir: str, method: str, group_size: int = 128,
                       layers: Optional[Iterable[int]] = None, *, prefix: Optional[str] = None,
                       progress: bool = True, stream: Optional[TextIO] = None, check: bool = True) -> Dict:
    """Converts the routed experts of a Hugging Face checkpoint folder to a ktmoe weight folder for `method`
    (its weight format; SFT and inference methods of one format share folders). Returns a summary dict:
    layers, format, method, group_size, E/H/I, bytes written, seconds, worst sample rel-L2 error."""
    spec = _method(method)
    fmt = spec.weight_format
    t0 = time.monotonic()
    ckpt = Checkpoint(input_dir)
    found = find_moe_layers(ckpt, prefix)
    if not found:
        example = ", ".join(ckpt.keys()[:3])
        raise ConvertError(f"{ckpt.folder}: no routed-experts keys found (looked for ...layers.N.mlp.experts."
                           f"gate_up_proj / ...experts.N.gate_proj.weight / block_sparse_moe.experts.N.w1.weight; "
                           f"keys look like: {example})")
    todo = sorted(found) if layers is None else sorted(set(int(x) for x in layers))
    absent = [x for x in todo if x not in found]
    if absent:
        raise ConvertError(f"{ckpt.folder}: layer(s) {absent} have no routed experts; MoE layers: {sorted(found)}")
    dims = {(found[x].E, found[x].H, found[x].I) for x in todo}
    if len(dims) != 1:
        raise ConvertError(f"{ckpt.folder}: the MoE layers have different (E, H, I) {sorted(dims)}; convert them "
                           "into separate folders with --layers")
    E, H, I = dims.pop()
    shipped = found[todo[0]].shipped_format()
    if shipped is not None and shipped.name == fmt.name and fmt.per_group:
        group_size = found[todo[0]].group  # adopted as shipped: the checkpoint's group (compressed-tensors: 32)
    for C in (H, I):
        fmt.group_for(C, group_size)  # a clear error before any work (K-group needs group | H and I)
    if os.path.isfile(os.path.join(output_dir, weights_io.MANIFEST_NAME)):
        m = weights_io.read_manifest(output_dir)
        want = dict(format=fmt.name, group_size=weights_io.expected_group_size(fmt, group_size), num_experts=E,
                    hidden_size=H, moe_intermediate_size=I)
        for k, v in want.items():
            if m.get(k) != v:
                raise ConvertError(f"{os.path.join(output_dir, weights_io.MANIFEST_NAME)}: the output folder "
                                   f"already holds {k}={m.get(k)!r}, this conversion writes {v!r}; use a new folder")
    source = dict(path=os.path.abspath(ckpt.folder), model_type=_text_config(ckpt.config).get("model_type"),
                  quantization=found[todo[0]].quant or None,
                  layouts=sorted({found[x].layout for x in todo}),
                  dtypes=sorted({ckpt.dtype(k) for x in todo for k in found[x].keys()}))
    for idx in todo:  # a quantized checkpoint's scales, all of them, before anything is written
        with ckpt.opened():
            found[idx].check_scales(ckpt)
    bar = Progress(len(todo), "ktmoe.convert", stream, progress)
    bar.update(0)
    written = 0
    for n, idx in enumerate(todo):
        src = found[idx]
        packed: List[Packed] = []
        with ckpt.opened():
            for which in ("gate", "up", "down"):  # one projection's source tensors in memory at a time
                packed.append(src.pack_for(ckpt, which, fmt, group_size))
        path = weights_io.write_layer(output_dir, idx, fmt, packed, source=source, method=method,
                                      group_size=group_size)
        written += os.path.getsize(path)
        del packed
        bar.update(n + 1, f"layer {idx}")
    bar.close()
    worst = 0.0
    if check:
        bar = Progress(len(todo), "ktmoe.convert check", stream, progress)
        for n, idx in enumerate(todo):
            weights_io.verify_folder(output_dir, fmt, checksum=True, layers=[idx])
            with ckpt.opened():
                worst = max(worst, _sample_check(ckpt, found[idx], output_dir, fmt, group_size, idx % E, fmt.bits))
            bar.update(n + 1, f"layer {idx}")
        bar.close()
    return dict(layers=todo, method=method, format=fmt.name, group_size=weights_io.expected_group_size(fmt, group_size),
                num_experts=E, hidden_size=H, moe_intermediate_size=I, bytes=written,
                seconds=time.monotonic() - t0, sample_rel_l2=worst if check else math.nan, output=output_dir)
