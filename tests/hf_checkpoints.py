"""Checkpoint folders the from_pretrained tests write themselves (no hub): a tiny DeepSeek-V3 saved the way DeepSeek
ships it (every linear but the router and the embeddings as float8_e4m3fn + fp32 `weight_scale_inv` per 128 x 128
block, per-expert keys, `quantization_config` fp8 / e4m3 / [128, 128], sizes not multiples of 128, several shards
with an index), a tiny Qwen3-MoE whose experts are compressed-tensors pack-quantized int4 (group 32), and a
wide-but-small bf16 Qwen3-MoE for the memory test. Each writer also returns what a plain transformers model needs
to hold the same (dequantized) weights."""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

import ktmoe.hf as kh
from test_fp8 import ct_pack, deepseek_dequant

# a tiny DeepSeek-V3: hidden 200, dense intermediate 136, expert intermediate 136 (none a multiple of 128, both
# over one block so edge blocks are partial), 3 layers of which 2 are MoE, 4 experts top-2
DSV3 = dict(vocab_size=64, hidden_size=200, intermediate_size=136, moe_intermediate_size=136, num_hidden_layers=3,
            first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
            topk_group=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=40,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True,
            tie_word_embeddings=False)
BLOCK = (128, 128)
# the linears DeepSeek ships in fp8: attention, dense MLP, shared and routed experts (not the router, embeddings,
# lm_head or norms)
_FP8_LINEAR = re.compile(r"\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|"
                         r"down_proj)\.weight$")


def _plain_state(model, folder) -> Dict[str, torch.Tensor]:
    """The model's tensors under the checkpoint keys transformers writes (v4 per-expert layout)."""
    model.save_pretrained(folder)
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
            os.remove(os.path.join(folder, name))
    idx = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(idx):
        os.remove(idx)
    return out


def quantize_fp8(w: torch.Tensor, block=BLOCK):
    """float weights [R, C] -> (float8_e4m3fn codes, fp32 scale_inv per block), as DeepSeek's own quantizer does:
    scale = amax / 448 per block."""
    R, C = w.shape
    br, bc = block
    Rb, Cb = -(-R // br), -(-C // bc)
    pad = torch.zeros(Rb * br, Cb * bc)
    pad[:R, :C] = w.float()
    amax = pad.view(Rb, br, Cb, bc).abs().amax(dim=(1, 3)).clamp_min(1e-12)
    s = amax / 448.0
    full = s.repeat_interleave(br, 0)[:R].repeat_interleave(bc, 1)[:, :C]
    return (w.float() / full).to(torch.float8_e4m3fn), s


def write_shards(folder, tensors: Dict[str, torch.Tensor], n_shards: int, config: dict) -> None:
    """Sorted keys in n contiguous shards (so a weight and its scale can land in different shards) + index +
    config.json."""
    os.makedirs(folder, exist_ok=True)
    keys = sorted(tensors)
    per = -(-len(keys) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def _config_dict(model, **extra) -> dict:
    d = model.config.to_dict()
    d.update(extra)
    return d


def write_deepseek_v3_fp8(folder, seed: int = 0, n_shards: int = 4, mutate=None, **overrides):
    """The tiny DeepSeek-V3 as DeepSeek ships it. Returns the path of a second folder holding the same model with
    every fp8 linear dequantized to bf16 (DeepSeek's own math) and no quantization_config: what plain transformers
    loads as the reference. mutate(tensors) may break the quantized checkpoint before it is written."""
    folder = str(folder)
    model = kh.tiny_model("deepseek_v3", seed=seed, **{**DSV3, **overrides})
    plain = _plain_state(model, folder + "_tmp")
    shipped, deq = {}, {}
    for k, v in plain.items():
        if _FP8_LINEAR.search(k) and v.dim() == 2:
            codes, s = quantize_fp8(v)
            shipped[k], shipped[k[:-len("weight")] + "weight_scale_inv"] = codes, s
            deq[k] = deepseek_dequant(codes, s, BLOCK)
        else:
            shipped[k] = v.to(torch.bfloat16)
            deq[k] = shipped[k]
    if mutate is not None:
        mutate(shipped)
    qc = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=list(BLOCK))
    write_shards(folder, shipped, n_shards, _config_dict(model, quantization_config=qc, dtype="bfloat16"))
    ref = folder + "_dequantized"
    write_shards(ref, deq, 2, _config_dict(model, dtype="bfloat16"))
    return ref


QWEN_CT = dict(vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
               norm_topk_prob=True, tie_word_embeddings=False)
_EXPERT_KEY = re.compile(r"\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")


def write_qwen3_compressed_tensors(folder, seed: int = 0, group: int = 32, n_shards: int = 3):
    """A tiny Qwen3-MoE with compressed-tensors pack-quantized int4 experts (symmetric, group 32, bf16 scales),
    everything else bf16. Returns {expert key prefix: the checkpoint's own dequantization (bf16)}."""
    from ktmoe.formats.compressed_tensors import dequantize_pack_quantized

    folder = str(folder)
    model = kh.tiny_model("qwen3_moe", seed=seed, **QWEN_CT)
    plain = _plain_state(model, folder + "_tmp")
    g = torch.Generator().manual_seed(seed + 7)
    tensors, deq = {}, {}
    for k, v in plain.items():
        if _EXPERT_KEY.search(k):
            R, C = v.shape
            vals = torch.randint(-8, 8, (R, C), generator=g, dtype=torch.int64).to(torch.int8)
            scale = (torch.rand(R, C // group, generator=g) * 0.02 + 1e-3).bfloat16()
            base = k[:-len(".weight")]
            tensors[base + ".weight_packed"] = ct_pack(vals)
            tensors[base + ".weight_scale"] = scale
            tensors[base + ".weight_shape"] = torch.tensor([R, C], dtype=torch.int64)
            deq[base] = dequantize_pack_quantized(tensors[base + ".weight_packed"], scale, [R, C])
        else:
            tensors[k] = v.to(torch.bfloat16)
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
              "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}}}}
    write_shards(folder, tensors, n_shards, _config_dict(model, quantization_config=qc, dtype="bfloat16"))
    return deq


WIDE = dict(vocab_size=64, hidden_size=512, intermediate_size=256, moe_intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=32, num_experts_per_tok=2,
            norm_topk_prob=True, tie_word_embeddings=False)


def write_wide_bf16(folder, seed: int = 0, n_shards: int = 4, fused: bool = False) -> None:
    """A wide-but-small bf16 Qwen3-MoE (routed experts ~150 MB of the ~155 MB) in n shards: the memory test's."""
    folder = str(folder)
    model = kh.tiny_model("qwen3_moe", seed=seed, **WIDE).to(torch.bfloat16)
    if fused:  # transformers v5's own layout
        model.save_pretrained(folder, save_original_format=False, max_shard_size="48MB")
        return
    plain = _plain_state(model, folder + "_tmp")
    write_shards(folder, plain, n_shards, _config_dict(model, dtype="bfloat16"))


def read_folder(folder) -> Dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out
