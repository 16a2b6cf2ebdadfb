"""ktmoe.hf.from_pretrained: checkpoints as they ship (DeepSeek-V3 fp8, compressed-tensors int4, bf16 in both
layouts) streamed shard by shard into ktmoe's packed experts, checked against plain transformers on the
dequantized weights; bad input refused naming the file and key with no model returned; the memory bound measured
in a subprocess next to transformers' from_pretrained + convert_model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import ktmoe.hf as kh  # noqa: E402
from conftest import THREADS, rel  # noqa: E402
from hf_checkpoints import (QWEN_CT, read_folder, write_deepseek_v3_fp8, write_qwen3_compressed_tensors,  # noqa: E402
                            write_wide_bf16)
from ktmoe.convert import ConvertError  # noqa: E402
from ktmoe.lora import LORA_NAMES  # noqa: E402
from test_fp8 import deepseek_dequant  # noqa: E402
from tolerances import HF_LOGITS_RTOL  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tokens(seed=0, batch=2, seq=10, vocab=64):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dsv3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dsv3") / "ckpt"
    ref = write_deepseek_v3_fp8(folder)
    return str(folder), ref


def _plain(folder, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


# ------------------------------------------------------------------------------------------ DeepSeek-V3 fp8
def test_deepseek_v3_fp8_logits_match_plain_transformers_on_dequantized_weights(dsv3):
    folder, ref_dir = dsv3
    shards = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
    assert len(shards) >= 3 and os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    model = kh.from_pretrained(folder, method="AMXFP8_SFT", lora_rank=4, lora_alpha=8.0, dtype=torch.float32,
                               cpuinfer_threads=THREADS, progress=False)
    ref = _plain(ref_dir)
    experts = kh.routed_experts(model)
    assert sorted(experts) == ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"]
    assert all(m.wrapper.method == "AMXFP8_SFT" for m in experts.values())
    assert getattr(model.config, "quantization_config", None) is None
    # every non-expert parameter is exactly the reference's (fp8 linears dequantized the same way)
    ref_sd = ref.state_dict()
    for n, p in model.named_parameters():
        if n in ref_sd:
            assert p.dtype == ref_sd[n].dtype, n
            assert torch.equal(p, ref_sd[n]), n
    # the experts hold DeepSeek's own dequantization, bit for bit
    shipped = read_folder(folder)
    for name, m in experts.items():
        layer = name.split(".")[2]
        for proj, got in zip(("gate_proj", "up_proj", "down_proj"), m.wrapper.dequantized_weights()):
            keys = [f"model.layers.{layer}.mlp.experts.{e}.{proj}" for e in range(m.num_experts)]
            w = torch.stack([shipped[k + ".weight"] for k in keys])
            s = torch.stack([shipped[k + ".weight_scale_inv"] for k in keys])
            assert torch.equal(got, deepseek_dequant(w, s, (128, 128)).float())
    x = tokens()
    with torch.no_grad():
        got, want = model(x).logits, ref(x).logits
    print(f"from_pretrained vs plain transformers on the dequantized weights: logits rel-L2 {rel(got, want):.2e}")
    assert rel(got, want) < HF_LOGITS_RTOL, rel(got, want)


def test_deepseek_v3_fp8_trains_and_generates(dsv3):
    folder, _ = dsv3
    model = kh.from_pretrained(folder, method="AMXFP8_SFT", lora_rank=4, lora_alpha=8.0, dtype=torch.float32,
                               cpuinfer_threads=THREADS, progress=False, seed=0)
    pm = kh.add_lora(model, r=4, lora_alpha=8.0)
    params = [p for _, p in kh.trainable_parameters(pm)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = tokens(1)
    losses = []
    pm.train()
    for _ in range(3):
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for m in kh.routed_experts(pm).values():
        assert all(p.requires_grad for p in m.lora_parameters)
    pm.eval()
    with torch.no_grad():
        out = pm.generate(x[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_fp8_checkpoint_into_bf16_and_int4(dsv3):
    folder, ref_dir = dsv3
    ref = _plain(ref_dir)
    x = tokens()
    with torch.no_grad():
        want = ref(x).logits
    bf = kh.from_pretrained(folder, method="AMXBF16_SFT", lora_rank=2, lora_alpha=4.0, dtype=torch.float32,
                            cpuinfer_threads=THREADS, progress=False)
    with torch.no_grad():
        assert rel(bf(x).logits, want) < HF_LOGITS_RTOL
    q = kh.from_pretrained(folder, mode="inference", method="AMXINT4", dtype=torch.float32,
                           cpuinfer_threads=THREADS, progress=False)
    m = kh.routed_experts(q)["model.layers.1.mlp.experts"]
    assert m.wrapper.method == "AMXINT4"
    with torch.no_grad():
        assert rel(q(x).logits, want) < 0.3  # int4 re-quantization of the dequantized experts


def test_bf16_dtype_model(dsv3):
    """dtype='auto' takes the config's bf16; the router keeps fp32 (_keep_in_fp32_modules_strict)."""
    folder, ref_dir = dsv3
    model = kh.from_pretrained(folder, method="AMXFP8_SFT", lora_rank=2, lora_alpha=4.0, cpuinfer_threads=THREADS,
                               progress=False)
    ref = _plain(ref_dir, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ref_sd = ref.state_dict()
    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
        if n in ref_sd:
            assert p.dtype == ref_sd[n].dtype and torch.equal(p, ref_sd[n]), n
    x = tokens()
    with torch.no_grad():
        assert rel(model(x).logits.float(), ref(x).logits.float()) < 3e-2  # bf16 model end to end


# ------------------------------------------------------------------------------------- compressed-tensors int4
def test_compressed_tensors_int4_adopted_bit_for_bit(tmp_path):
    deq = write_qwen3_compressed_tensors(tmp_path / "ct")
    model = kh.from_pretrained(str(tmp_path / "ct"), method="AMXINT4_KGroup_SFT", lora_rank=2, lora_alpha=4.0,
                               cpuinfer_threads=THREADS, progress=False, dtype=torch.float32)
    experts = kh.routed_experts(model)
    assert len(experts) == QWEN_CT["num_hidden_layers"]
    for name, m in experts.items():
        assert m.wrapper.group_size == 32 or m.wrapper._weights[0].group == 32
        for proj, got in zip(("gate_proj", "up_proj", "down_proj"), m.wrapper.dequantized_weights()):
            want = torch.stack([deq[f"{name}.{e}.{proj}"] for e in range(m.num_experts)])
            assert torch.equal(got, want.float()), (name, proj)
    with torch.no_grad():
        assert torch.isfinite(model(tokens()).logits).all()


# ----------------------------------------------------------------------------------------------- bf16, v5 fused
@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
def test_bf16_checkpoint_matches_convert_model(tmp_path, fused):
    from transformers import AutoModelForCausalLM

    small = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=48, num_experts=4, head_dim=16,
                 num_hidden_layers=2)
    kh_model = kh.tiny_model("qwen3_moe", seed=3, **{**QWEN_CT, **small}).to(torch.bfloat16)
    folder = tmp_path / "m"
    kh_model.save_pretrained(folder, save_original_format=not fused)
    ours = kh.from_pretrained(str(folder), lora_rank=2, lora_alpha=4.0, seed=5, cpuinfer_threads=THREADS,
                              progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    kh.convert_model(theirs, lora_rank=2, lora_alpha=4.0, seed=5, cpuinfer_threads=THREADS)
    a, b = ours.state_dict(), theirs.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for (n1, m1), (n2, m2) in zip(kh.routed_experts(ours).items(), kh.routed_experts(theirs).items()):
        assert n1 == n2
        for x, y in zip(m1.wrapper.dequantized_weights(), m2.wrapper.dequantized_weights()):
            assert torch.equal(x, y)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(ours(x).logits, theirs(x).logits)


# ---------------------------------------------------------------------------------------------- bad input
_X = "model.layers.2.mlp.experts"
_A = "model.layers.0.self_attn"


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


def _poke(key, index, value):
    def f(t):
        t[key] = t[key].clone()
        t[key].view(torch.uint8 if t[key].dtype == torch.float8_e4m3fn else t[key].dtype)[index] = value
    return f


BAD = [
    ("expert_scale_missing", lambda t: t.pop(f"{_X}.3.up_proj.weight_scale_inv"),
     rf"layer 2: expert 3's up projection has \['weight'\] but no weight_scale_inv \(tensor key {_X}.3.up_proj"),
    ("expert_scale_misshaped", _set(f"{_X}.1.down_proj.weight_scale_inv", torch.ones(1, 1)),
     rf"tensor key '{_X}.1.down_proj.weight_scale_inv' has shape \[1, 1\], expected \[2, 2\]"),
    ("expert_scale_nan", _poke(f"{_X}.0.gate_proj.weight_scale_inv", (0, 1), float("nan")),
     rf"tensor key '{_X}.0.gate_proj.weight_scale_inv' holds non-finite scales"),
    ("expert_nan_code", _poke(f"{_X}.1.gate_proj.weight", (3, 4), 0x7F),
     rf"tensor key '{_X}.1.gate_proj.weight' \(layer 2, expert 1's gate_proj\): weight holds a NaN float8 code"),
    ("attn_scale_missing", lambda t: t.pop(f"{_A}.q_b_proj.weight_scale_inv"),
     rf"tensor key '{_A}.q_b_proj.weight' is fp8 but has no scales \(tensor key '{_A}.q_b_proj.weight_scale_inv'"),
    ("attn_scale_misshaped", _set(f"{_A}.o_proj.weight_scale_inv", torch.ones(3, 3)),
     rf"tensor key '{_A}.o_proj.weight_scale_inv' is F32 \[3, 3\], expected F32 \(or BF16 / F16\) \[2, 1\]"),
    ("attn_scale_inf", _poke(f"{_A}.kv_b_proj.weight_scale_inv", (0, 0), float("inf")),
     rf"tensor key '{_A}.kv_b_proj.weight_scale_inv' holds non-finite scales"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_fp8_checkpoint_is_refused_naming_file_and_key(tmp_path, case):
    _, mutate, msg = case
    write_deepseek_v3_fp8(tmp_path / "ckpt", mutate=mutate)
    model = None
    with pytest.raises(ConvertError, match=msg) as ei:
        model = kh.from_pretrained(str(tmp_path / "ckpt"), method="AMXFP8_SFT", lora_rank=2, lora_alpha=4.0,
                                   cpuinfer_threads=THREADS, progress=False)
    assert model is None
    assert ".safetensors" in str(ei.value)  # the file


def test_unknown_quantization_config_is_refused(tmp_path):
    write_deepseek_v3_fp8(tmp_path / "ckpt")
    cfg_path = tmp_path / "ckpt" / "config.json"
    for qc, msg in ((dict(quant_method="gptq", bits=4), r"config.json: key 'quantization_config.quant_method' is "
                                                         r"'gptq'"),
                    (dict(quant_method="fp8", fmt="e5m2", weight_block_size=[128, 128]),
                     r"config.json: key 'quantization_config.fmt' is 'e5m2'"),
                    (dict(quant_method="fp8", fmt="e4m3"), r"quantization_config.weight_block_size must be two")):
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"] = qc
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(ConvertError, match=msg):
            kh.from_pretrained(str(tmp_path / "ckpt"), method="AMXFP8_SFT", lora_rank=2, lora_alpha=4.0,
                               cpuinfer_threads=THREADS, progress=False)


def test_fp8_tensors_without_quantization_config_are_refused(tmp_path):
    write_deepseek_v3_fp8(tmp_path / "ckpt")
    cfg_path = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["quantization_config"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=r"\.safetensors: tensor key .* (weight_scale_inv tensor is not part|is "
                                           r"float8_e4m3fn but config.json has no fp8)"):
        kh.from_pretrained(str(tmp_path / "ckpt"), method="AMXFP8_SFT", lora_rank=2, lora_alpha=4.0,
                           cpuinfer_threads=THREADS, progress=False)


@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_shard_is_refused(tmp_path, cut):
    write_deepseek_v3_fp8(tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "model-00002-of-00004.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1000] if cut == "data" else data[:100])
    with pytest.raises(ConvertError, match=r"model-00002-of-00004.safetensors: not a readable safetensors file "
                                           r"\(truncated or corrupt\?\)"):
        kh.from_pretrained(str(tmp_path / "ckpt"), method="AMXFP8_SFT", lora_rank=2, lora_alpha=4.0,
                           cpuinfer_threads=THREADS, progress=False)


def test_missing_non_expert_key_is_refused(tmp_path):
    write_deepseek_v3_fp8(tmp_path / "ckpt", mutate=lambda t: t.pop("model.layers.1.input_layernorm.weight"))
    with pytest.raises(ConvertError, match=r"no tensor key loads the model's model.layers.1.input_layernorm.weight"):
        kh.from_pretrained(str(tmp_path / "ckpt"), method="AMXFP8_SFT", lora_rank=2, lora_alpha=4.0,
                           cpuinfer_threads=THREADS, progress=False)


def test_misshaped_non_expert_key_is_refused(tmp_path):
    write_deepseek_v3_fp8(tmp_path / "ckpt", mutate=_set("model.norm.weight", torch.ones(7, dtype=torch.bfloat16)))
    with pytest.raises(ConvertError, match=r"safetensors: tensor key 'model.norm.weight' has shape \[7\], the "
                                           r"model's model.norm.weight is \[200\]"):
        kh.from_pretrained(str(tmp_path / "ckpt"), method="AMXFP8_SFT", lora_rank=2, lora_alpha=4.0,
                           cpuinfer_threads=THREADS, progress=False)


# ------------------------------------------------------------------------------------------------- memory
_MEASURE = textwrap.dedent("""
    import json, sys
    import torch, safetensors.torch, transformers
    from transformers import AutoModelForCausalLM
    import ktmoe, ktmoe.hf as kh
    torch.set_num_threads(1)
    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    how, folder = sys.argv[1], sys.argv[2]
    base = status("VmRSS")
    try:  # the peak so far is the imports': start the high-water mark again from here
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if how == "ktmoe":
        model = kh.from_pretrained(folder, lora_rank=4, lora_alpha=8.0, cpuinfer_threads=2, progress=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
        kh.convert_model(model, lora_rank=4, lora_alpha=8.0, cpuinfer_threads=2)
    peak = status("VmHWM") - base
    experts = kh.routed_experts(model)
    packed = sum(m.wrapper.weight_nbytes() for m in experts.values())
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # non-expert + the expert LoRA
    print(json.dumps(dict(peak=peak, packed=packed, params=params)))
""")


def _measure(how, folder):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", _MEASURE, how, folder], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_peak_rss_within_packed_plus_params_plus_one_shard(tmp_path, capsys):
    folder = tmp_path / "wide"
    write_wide_bf16(folder)
    shard = max(os.path.getsize(folder / n) for n in os.listdir(folder) if n.endswith(".safetensors"))
    ours = _measure("ktmoe", str(folder))
    theirs = _measure("transformers", str(folder))
    bound = ours["packed"] + ours["params"] + shard
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    with capsys.disabled():
        print(f"\npeak RSS growth, wide bf16 Qwen3-MoE (routed experts {mib(ours['packed'])}, other parameters + "
              f"expert LoRA {mib(ours['params'])}, largest shard {mib(shard)}; bound {mib(bound)} + 10%):\n"
              f"  ktmoe.hf.from_pretrained:                          {mib(ours['peak'])}\n"
              f"  transformers from_pretrained + ktmoe convert_model: {mib(theirs['peak'])}")
    assert ours["peak"] <= 1.1 * bound, (ours, shard)


def test_bad_arguments_are_refused_before_reading(dsv3):
    folder, _ = dsv3
    with pytest.raises(TypeError, match=r"from_pretrained\(\) got unexpected keyword argument\(s\) lora_rnak"):
        kh.from_pretrained(folder, lora_rnak=2, lora_alpha=4.0)
    with pytest.raises(TypeError, match=r"from_pretrained\(\): hidden_size come\(s\) from the model's config"):
        kh.from_pretrained(folder, lora_rank=2, lora_alpha=4.0, hidden_size=8)
    with pytest.raises(TypeError, match=r"from_pretrained\(mode='sft'\) needs lora_rank= and lora_alpha="):
        kh.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kh.from_pretrained(folder + "_nope", lora_rank=2, lora_alpha=4.0)
