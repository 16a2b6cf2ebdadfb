"""`python -m ktmoe.convert` from quantized checkpoints the tests write themselves with safetensors: a tiny
DeepSeek-style FP8 checkpoint (per-expert float8_e4m3fn `weight` + fp32 `weight_scale_inv`, 128 x 128 blocks
over sizes that are not multiples of 128, `quantization_config` with `quant_method: fp8`, in 3 shards with an
index) and a tiny compressed-tensors pack-quantized int4 checkpoint (group 32). Converted into their own
formats the folders hold the shipped codes and scales bit for bit; into another method they are converted
from the dequantized values. Bad input (scales missing, mis-shaped, non-finite; NaN codes; an unknown
quantization config) is refused naming the file and key, with nothing written."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402

import ktmoe  # noqa: E402
from ktmoe.convert import ConvertError, convert_checkpoint  # noqa: E402
from ktmoe.formats import FORMATS  # noqa: E402
from test_fp8 import ct_pack, deepseek_dequant, shipped_fp8  # noqa: E402

E, H, I = 4, 200, 136
PROJ = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
LAYERS = (1, 2)  # layer 0 is dense, as in DeepSeek


def _prefix(layer, e, proj):
    return f"model.layers.{layer}.mlp.experts.{e}.{proj}"


def write_fp8_checkpoint(folder, block=(128, 128), mutate=None):
    """DeepSeek's layout, three shards and an index; returns {key: tensor}."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in LAYERS:
        for e in range(E):
            for proj, (R, C) in PROJ.items():
                w, s = shipped_fp8(1, R, C, block, g)
                tensors[_prefix(layer, e, proj) + ".weight"] = w[0].contiguous()
                tensors[_prefix(layer, e, proj) + ".weight_scale_inv"] = s[0].contiguous()
    tensors["model.layers.0.mlp.gate_proj.weight"] = torch.randn(8, H).to(torch.float8_e4m3fn)
    tensors["model.embed_tokens.weight"] = torch.randn(16, H).bfloat16()
    if mutate:
        mutate(tensors)
    shards = [{}, {}, {}]
    for i, (k, v) in enumerate(sorted(tensors.items())):
        shards[i % 3][k] = v
    weight_map = {}
    for i, sh in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file(sh, os.path.join(folder, name))
        weight_map.update({k: name for k in sh})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    cfg = dict(model_type="deepseek_v3", hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
               quantization_config=dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                        weight_block_size=list(block)))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return tensors


def write_ct_checkpoint(folder, mutate=None):
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    tensors, values = {}, {}
    for layer in LAYERS:
        for e in range(E):
            for proj, (R, C) in PROJ.items():
                v = torch.randint(-8, 8, (R, C), generator=g, dtype=torch.int64).to(torch.int8)
                p = _prefix(layer, e, proj)
                values[p] = v
                tensors[p + ".weight_packed"] = ct_pack(v)
                tensors[p + ".weight_scale"] = (torch.rand(R, C // 8, generator=g) * 0.02 + 1e-3).bfloat16()
                tensors[p + ".weight_shape"] = torch.tensor([R, C], dtype=torch.int64)
    if mutate:
        mutate(tensors)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
              "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 8}}}}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(model_type="kimi_k2", hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
                       quantization_config=qc), f)
    return tensors, values


def stacked(tensors, layer, proj, kind):
    return torch.stack([tensors[_prefix(layer, e, proj) + "." + kind] for e in range(E)])


@pytest.mark.parametrize("block", [(128, 128), (64, 32)], ids=lambda b: f"b{b[0]}x{b[1]}")
def test_convert_fp8_checkpoint_adopts_codes_and_scales(tmp_path, block):
    tensors = write_fp8_checkpoint(tmp_path / "ckpt", block)
    out = tmp_path / "out"
    summary = convert_checkpoint(str(tmp_path / "ckpt"), str(out), "AMXFP8_SFT", progress=False)
    assert summary["layers"] == list(LAYERS) and summary["format"] == "fp8"
    for layer in LAYERS:
        wr = ktmoe.KTMoEWrapper(method="AMXFP8_SFT", layer_idx=layer, num_experts=E, num_experts_per_tok=2,
                                hidden_size=H, moe_intermediate_size=I, lora_rank=0, cpuinfer_threads=2,
                                weight_path=str(out))
        wr.load_weights()
        for proj, got in zip(PROJ, wr.dequantized_weights()):
            w, s = stacked(tensors, layer, proj, "weight"), stacked(tensors, layer, proj, "weight_scale_inv")
            assert torch.equal(got, deepseek_dequant(w, s, block).float())


def test_convert_fp8_checkpoint_into_int4(tmp_path):
    tensors = write_fp8_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    convert_checkpoint(str(tmp_path / "ckpt"), str(out), "AMXINT4_SFT", progress=False, layers=[2])
    wr = ktmoe.KTMoEWrapper(method="AMXINT4_SFT", layer_idx=2, num_experts=E, num_experts_per_tok=2, hidden_size=H,
                            moe_intermediate_size=I, lora_rank=0, cpuinfer_threads=2, weight_path=str(out))
    wr.load_weights()
    int4 = FORMATS["int4"]
    for proj, got in zip(PROJ, wr.dequantized_weights()):
        w = deepseek_dequant(stacked(tensors, 2, proj, "weight"), stacked(tensors, 2, proj, "weight_scale_inv"),
                             (128, 128)).float()
        assert torch.equal(got, int4.dequantize(int4.pack(w)))


def test_convert_compressed_tensors_int4(tmp_path):
    tensors, values = write_ct_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    summary = convert_checkpoint(str(tmp_path / "ckpt"), str(out), "AMXINT4_KGroup_SFT", progress=False)
    assert summary["group_size"] == 8  # the checkpoint's group, not the default 128
    wr = ktmoe.KTMoEWrapper(method="AMXINT4_KGroup_SFT", layer_idx=1, num_experts=E, num_experts_per_tok=2,
                            hidden_size=H, moe_intermediate_size=I, lora_rank=0, cpuinfer_threads=2,
                            weight_path=str(out), group_size=8)
    wr.load_weights()
    for proj, got in zip(PROJ, wr.dequantized_weights()):
        v, s = torch.stack([values[_prefix(1, e, proj)] for e in range(E)]), stacked(tensors, 1, proj, "weight_scale")
        assert torch.equal(got, (v.to(s.dtype) * s.repeat_interleave(8, -1)).float())
    # into bf16: the dequantized values themselves
    convert_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "bf16"), "AMXBF16_SFT", progress=False, layers=[1])


BAD_FP8 = [
    ("scale_missing", lambda t: t.pop(_prefix(2, 3, "up_proj") + ".weight_scale_inv"),
     r"layer 2: expert 3's up projection has \['weight'\] but no weight_scale_inv"),
    ("scale_misshaped", lambda t: t.__setitem__(_prefix(1, 1, "down_proj") + ".weight_scale_inv", torch.ones(1, 1)),
     r"tensor key 'model.layers.1.mlp.experts.1.down_proj.weight_scale_inv' has shape \[1, 1\], expected \[2, 2\]"),
    ("scale_inf", lambda t: t[_prefix(2, 0, "gate_proj") + ".weight_scale_inv"].__setitem__((0, 1), float("inf")),
     r"tensor key 'model.layers.2.mlp.experts.0.gate_proj.weight_scale_inv' holds non-finite scales"),
    ("nan_code", lambda t: t[_prefix(2, 1, "gate_proj") + ".weight"].view(torch.uint8).__setitem__((3, 4), 0x7F),
     r"tensor key 'model.layers.2.mlp.experts.0.gate_proj.weight' \(experts 0..3 of gate_proj\): weight holds a "
     r"NaN float8 code at index \(1, 3, 4\)"),
    ("scale_dtype", lambda t: t.__setitem__(_prefix(1, 0, "up_proj") + ".weight_scale_inv",
                                            t[_prefix(1, 0, "up_proj") + ".weight_scale_inv"].double()),
     r"weight_scale_inv' has dtype F64; a fp8 checkpoint's weight_scale_inv is F32 or BF16 or F16"),
]


@pytest.mark.parametrize("case", BAD_FP8, ids=[c[0] for c in BAD_FP8])
def test_convert_refuses_bad_fp8_checkpoints(tmp_path, case):
    _, mutate, msg = case
    write_fp8_checkpoint(tmp_path / "ckpt", mutate=mutate)
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=msg) as ei:
        convert_checkpoint(str(tmp_path / "ckpt"), str(out), "AMXFP8_SFT", progress=False)
    assert "safetensors" in str(ei.value) or "config.json" in str(ei.value)  # names the file
    if case[0] == "nan_code":  # layer 1 is complete and valid; the bad layer 2 is not written
        assert not (out / "layer_002.safetensors").exists()
    else:  # found before any work: nothing written at all
        assert not out.exists() or not any(out.iterdir())


def test_convert_refuses_unknown_quantization(tmp_path):
    write_fp8_checkpoint(tmp_path / "ckpt")
    cfg_path = tmp_path / "ckpt" / "config.json"
    for qc, msg in ((dict(quant_method="gptq", bits=4), r"config.json: key 'quantization_config.quant_method' is "
                                                         r"'gptq'"),
                    (dict(quant_method="fp8", fmt="e4m3"), r"quantization_config.weight_block_size must be two"),
                    (dict(quant_method="compressed-tensors", format="float-quantized", config_groups={"g": {
                        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block"}}}),
                     r"config_groups.g' is format 'float-quantized'")):
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"] = qc
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(ConvertError, match=msg):
            convert_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"), "AMXFP8_SFT", progress=False)
    assert not (tmp_path / "out").exists()


def test_convert_refuses_bad_compressed_tensors(tmp_path):
    key = _prefix(1, 2, "down_proj")
    write_ct_checkpoint(tmp_path / "a", mutate=lambda t: t.__setitem__(key + ".weight_shape",
                                                                        torch.tensor([H, I + 8])))
    with pytest.raises(ConvertError, match=r"weight_shape' is \[200, 144\], expected \[200, 136\]"):
        convert_checkpoint(str(tmp_path / "a"), str(tmp_path / "out"), "AMXINT4_KGroup_SFT", progress=False)
    write_ct_checkpoint(tmp_path / "b", mutate=lambda t: t.pop(key + ".weight_scale"))
    with pytest.raises(ConvertError, match=r"no weight_scale \(tensor key model.layers.1.mlp.experts.2.down_proj"
                                           r".weight_scale missing\)"):
        convert_checkpoint(str(tmp_path / "b"), str(tmp_path / "out"), "AMXINT4_KGroup_SFT", progress=False)
    assert not (tmp_path / "out").exists()
