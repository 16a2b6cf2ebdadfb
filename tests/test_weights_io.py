"""Pre-converted weight folders: ktmoe.weights_io (write_layer / read_layer) and python -m ktmoe.convert.

Round trips start from tiny transformers models saved with save_pretrained (v5 fused keys with
save_original_format=False; the default v4-style per-expert keys) and hand-written checkpoints (Mixtral
w1/w3/w2, sharded with an index, bf16/fp16). A converted folder loaded with load_weights() must give
exactly (torch.equal) what load_weights_from_tensors() gives on the same tensors. Bad folders must fail
with an error naming the file and key, leaving the wrapper as it was."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import ktmoe  # noqa: E402
from conftest import SFT_METHODS, THREADS, gen, make_ids, make_lora, make_routing_weights, make_x  # noqa: E402
from ktmoe import weights_io  # noqa: E402
from ktmoe.convert import ConvertError, Checkpoint, convert_checkpoint, find_moe_layers  # noqa: E402
from ktmoe.convert.__main__ import main as convert_main  # noqa: E402
from ktmoe.methods import REGISTRY  # noqa: E402

E, K, H, I, R, L = 8, 2, 64, 32, 4, 2
GS = 16  # K-group size: divides H and I
T = 9


def _qwen3_model(seed=0):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=H, num_hidden_layers=L, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=16, intermediate_size=48, moe_intermediate_size=I,
                         num_experts=E, num_experts_per_tok=K)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _experts_of(model, layer):
    """gate, up [E, I, H], down [E, H, I] of a transformers v5 model (fused gate_up_proj, gate first)."""
    ex = model.model.layers[layer].mlp.experts
    gu = ex.gate_up_proj.detach()
    return gu[:, :I].clone(), gu[:, I:].clone(), ex.down_proj.detach().clone()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The tiny Qwen3-MoE saved in v5 fused and v4 per-expert layouts, and its expert tensors per layer."""
    root = tmp_path_factory.mktemp("hf")
    model = _qwen3_model()
    model.save_pretrained(root / "v5", save_original_format=False)
    model.save_pretrained(root / "v4")
    tensors = {i: _experts_of(model, i) for i in range(L)}
    return dict(root=root, v5=str(root / "v5"), v4=str(root / "v4"), tensors=tensors)


_converted = {}


def _convert(ckpts, method, layout="v5", **kw):
    """Converted folder for (method, layout), cached per test session (read-only in tests: copy to mutate)."""
    key = (method, layout)
    if key not in _converted:
        out = str(ckpts["root"] / f"out_{method}_{layout}")
        convert_checkpoint(ckpts[layout], out, method, GS, progress=False, **kw)
        _converted[key] = out
    return _converted[key]


def _inputs(seed=1):
    g = gen(seed)
    return make_x(T, H, g), make_ids(T, E, K, g, skip_frac=0.1), make_routing_weights(T, K, g), make_x(T, H, g)


def _make(method, layer=0, *, r=R, E=E, mode="sft", weights=None, group_size=GS, **kw):
    """Like conftest.make_wrapper, with a layer index (which picks the layer file)."""
    w = ktmoe.KTMoEWrapper(mode=mode, method=method, layer_idx=layer, num_experts=E, num_experts_per_tok=K,
                           hidden_size=H, moe_intermediate_size=I, lora_rank=r, lora_alpha=2.0 * max(r, 1),
                           cpuinfer_threads=THREADS, group_size=group_size, **kw)
    if weights is not None:
        w.load_weights_from_tensors(*weights)
    return w


def _wrapper(method, layer=0, **kw):
    return _make(method, layer, **kw)


def _run(w, lora, inputs):
    x, ids, rw, dy = inputs
    w.init_lora_weights(*(lora[n] for n in ktmoe.LORA_NAMES))
    y = w.forward_sft(x, ids, rw)
    dx, grads = w.backward(dy)
    return y, dx, grads


def _same_packed(a, b):
    for pa, pb in zip(a, b):
        assert pa.shape == pb.shape and pa.group == pb.group
        for part in ("data", "scale", "zero"):
            ta, tb = getattr(pa, part), getattr(pb, part)
            assert (ta is None) == (tb is None), part
            if ta is not None:
                assert ta.dtype == tb.dtype and torch.equal(ta, tb), part


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("method", SFT_METHODS)
def test_round_trip_fused_v5(ckpts, method):
    out = _convert(ckpts, method)
    lora = make_lora(E, H, I, R, gen(3))
    inputs = _inputs()
    for layer in range(L):
        from_file = _wrapper(method, layer, weight_path=out)
        from_file.load_weights()
        from_tensors = _wrapper(method, layer, weights=ckpts["tensors"][layer])
        _same_packed(from_file._weights, from_tensors._weights)
        y1, dx1, g1 = _run(from_file, lora, inputs)
        y2, dx2, g2 = _run(from_tensors, lora, inputs)
        assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
        for n in g1:
            assert torch.equal(g1[n], g2[n]), n


@pytest.mark.parametrize("method", ["AMXBF16_SFT", "AMXINT4_1KGroup_SFT"])
def test_round_trip_per_expert_v4(ckpts, method):
    """save_pretrained's default (v4-style experts.{e}.gate_proj.weight keys) converts to the same bytes."""
    keys = list(Checkpoint(ckpts["v4"]).keys())
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in keys and not any("gate_up_proj" in k for k in keys)
    out4, out5 = _convert(ckpts, method, "v4"), _convert(ckpts, method, "v5")
    for layer in range(L):
        a = weights_io.read_layer(out4, layer, REGISTRY[method].weight_format, E, H, I, GS)
        b = weights_io.read_layer(out5, layer, REGISTRY[method].weight_format, E, H, I, GS)
        _same_packed(a, b)
    w = _wrapper(method, 1, weight_path=out4)
    w.load_weights()
    ref = _wrapper(method, 1, weights=ckpts["tensors"][1])
    x, ids, rw, _ = _inputs()
    assert torch.equal(w.forward(x, ids, rw), ref.forward(x, ids, rw))


def _write_mixtral_v4(folder, dtype, tensors, shards=2):
    """Hand-written Mixtral v4 checkpoint: block_sparse_moe.experts.{e}.w1/w3/w2, experts spread over shards,
    with model.safetensors.index.json and a few non-expert keys."""
    os.makedirs(folder, exist_ok=True)
    parts = [{} for _ in range(shards)]
    for layer, (gate, up, down) in tensors.items():
        pre = f"model.layers.{layer}.block_sparse_moe"
        parts[0][f"{pre}.gate.weight"] = torch.zeros(E, H, dtype=dtype)
        for e in range(E):
            d = parts[e % shards]
            d[f"{pre}.experts.{e}.w1.weight"] = gate[e].to(dtype).contiguous()
            d[f"{pre}.experts.{e}.w3.weight"] = up[e].to(dtype).contiguous()
            d[f"{pre}.experts.{e}.w2.weight"] = down[e].to(dtype).contiguous()
    parts[0]["model.embed_tokens.weight"] = torch.zeros(16, H, dtype=dtype)
    weight_map = {}
    for s, d in enumerate(parts):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(d, os.path.join(folder, name))
        weight_map.update({k: name for k in d})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "mixtral", "hidden_size": H, "intermediate_size": I, "num_local_experts": E}, f)


@pytest.mark.parametrize("dtype,method", [(torch.bfloat16, "AMXINT8_SFT"), (torch.float16, "AMXINT4_SFT"),
                                          (torch.bfloat16, "AMXBF16_SFT")])
def test_round_trip_mixtral_v4_sharded(ckpts, tmp_path, dtype, method):
    src = {i: tuple(t.to(dtype) for t in ckpts["tensors"][i]) for i in range(L)}
    _write_mixtral_v4(tmp_path / "hf", dtype, src)
    found = find_moe_layers(Checkpoint(str(tmp_path / "hf")))
    assert sorted(found) == [0, 1] and found[0].layout == "per_expert" and (found[0].H, found[0].I) == (H, I)
    convert_checkpoint(str(tmp_path / "hf"), str(tmp_path / "out"), method, GS, progress=False)
    x, ids, rw, _ = _inputs()
    for layer in range(L):
        w = _wrapper(method, layer, weight_path=str(tmp_path / "out"))
        w.load_weights()
        ref = _wrapper(method, layer, weights=src[layer])
        _same_packed(w._weights, ref._weights)
        assert torch.equal(w.forward(x, ids, rw), ref.forward(x, ids, rw))


def _family_models():
    from transformers import DeepseekV2Config, DeepseekV3Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    c = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=48)
    ds = dict(moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
              first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
              n_group=1, topk_group=1)
    return {
        "qwen3_moe": (Qwen3MoeConfig(**c, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                     head_dim=16), [0, 1]),
        "qwen2_moe": (Qwen2MoeConfig(**c, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                     shared_expert_intermediate_size=16), [0, 1]),
        "mixtral": (MixtralConfig(**c, num_local_experts=4, num_experts_per_tok=2), [0, 1]),
        "deepseek_v2": (DeepseekV2Config(**c, q_lora_rank=None, **ds), [1]),   # layer 0 is dense
        "deepseek_v3": (DeepseekV3Config(**c, q_lora_rank=16, **ds), [1]),
    }


@pytest.mark.parametrize("family", list(_family_models()))
def test_families_both_layouts(tmp_path, family):
    """Key names as transformers 5 writes them, fused (v5) and original (v4: experts.{e}.*_proj / w1-w3)."""
    from transformers import AutoModelForCausalLM

    cfg, moe_layers = _family_models()[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    fmt = REGISTRY["AMXBF16_SFT"].weight_format
    for layout, kw in (("v5", dict(save_original_format=False)), ("v4", {})):
        model.save_pretrained(tmp_path / layout, **kw)
        found = find_moe_layers(Checkpoint(str(tmp_path / layout)))
        assert sorted(found) == moe_layers, (layout, sorted(found))
        assert {s.layout for s in found.values()} == {"fused" if layout == "v5" else "per_expert"}
        s = convert_checkpoint(str(tmp_path / layout), str(tmp_path / f"out_{layout}"), "AMXBF16_SFT",
                               progress=False)
        ex = model.model.layers[moe_layers[0]].mlp.experts
        Ei, Ii, Hi = ex.gate_up_proj.shape[0], ex.gate_up_proj.shape[1] // 2, ex.gate_up_proj.shape[2]
        assert (s["num_experts"], s["hidden_size"], s["moe_intermediate_size"]) == (Ei, Hi, Ii)
        gate, up, down = weights_io.read_layer(str(tmp_path / f"out_{layout}"), moe_layers[0], fmt, Ei, Hi, Ii)
        gu = ex.gate_up_proj.detach().to(torch.bfloat16)
        assert torch.equal(gate.data, gu[:, :Ii]) and torch.equal(up.data, gu[:, Ii:])
        assert torch.equal(down.data, ex.down_proj.detach().to(torch.bfloat16))


def test_transposed_fused_layout(ckpts, tmp_path):
    """gate_up_proj [E, H, 2I] / down_proj [E, I, H] (is_transposed experts) is recognised from the shapes."""
    gate, up, down = ckpts["tensors"][0]
    os.makedirs(tmp_path / "hf")
    save_file({"model.layers.0.mlp.experts.gate_up_proj": torch.cat([gate, up], 1).transpose(1, 2).contiguous(),
               "model.layers.0.mlp.experts.down_proj": down.transpose(1, 2).contiguous()},
              str(tmp_path / "hf" / "model.safetensors"))
    convert_checkpoint(str(tmp_path / "hf"), str(tmp_path / "out"), "AMXINT8_SFT", progress=False)
    ref = _wrapper("AMXINT8_SFT", weights=(gate, up, down))
    _same_packed(weights_io.read_layer(str(tmp_path / "out"), 0, REGISTRY["AMXINT8_SFT"].weight_format, E, H, I),
                 ref._weights)


@pytest.mark.parametrize("method", ["AMXBF16_SFT", "AMXINT4_1KGroup_SFT"])
def test_physical_to_logical_map(ckpts, method):
    out = _convert(ckpts, method)
    perm = torch.randperm(E, generator=gen(7))
    w = _wrapper(method, weight_path=out)
    w.load_weights(physical_to_logical_map=perm)
    ref = _wrapper(method)
    ref.load_weights_from_tensors(*ckpts["tensors"][0], physical_to_logical_map=perm)
    _same_packed(w._weights, ref._weights)
    x, ids, rw, _ = _inputs()
    assert torch.equal(w.forward(x, ids, rw), ref.forward(x, ids, rw))
    plain = _wrapper(method, weight_path=out)
    plain.load_weights()
    assert torch.equal(w._weights[0].data[3], plain._weights[0].data[int(perm[3])])
    # a map that repeats an expert is accepted too (index_select semantics)
    dup = torch.tensor([1] * E, dtype=torch.int32)
    w.load_weights(physical_to_logical_map=dup)
    assert all(torch.equal(w._weights[2].data[p], plain._weights[2].data[1]) for p in range(E))


# ------------------------------------------------------------------------------------------ the format
def test_manifest_contents(ckpts):
    out = _convert(ckpts, "AMXINT4_1KGroup_SFT")
    with open(os.path.join(out, weights_io.MANIFEST_NAME)) as f:
        m = json.load(f)
    assert m["format"] == "int4_1_kgroup" and m["format_version"] == 1 and m["layout_version"] == 1
    assert m["group_size"] == GS and (m["num_experts"], m["hidden_size"], m["moe_intermediate_size"]) == (E, H, I)
    assert m["method"] == "AMXINT4_1KGroup_SFT" and m["source"]["path"] == os.path.abspath(ckpts["v5"])
    assert sorted(m["layers"]) == ["0", "1"]
    entry = m["layers"]["1"]
    path = os.path.join(out, entry["file"])
    assert entry["file"] == "layer_001.safetensors" and entry["size"] == os.path.getsize(path)
    assert entry["sha256"] == weights_io.file_sha256(path)
    assert entry["tensors"]["gate.data"] == {"dtype": "uint8", "shape": [E, I, H // 2]}
    assert entry["tensors"]["down.zero"] == {"dtype": "float32", "shape": [E, H, I // GS]}
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == sorted(entry["tensors"])
        assert f.metadata()["format"] == "int4_1_kgroup" and f.metadata()["layer"] == "1"
    bf16 = json.load(open(os.path.join(_convert(ckpts, "AMXBF16_SFT"), weights_io.MANIFEST_NAME)))
    assert bf16["group_size"] is None and sorted(bf16["layers"]["0"]["tensors"]) == ["down.data", "gate.data",
                                                                                       "up.data"]


@pytest.mark.parametrize("method", SFT_METHODS)
def test_write_read_layer_api(tmp_path, method):
    fmt = REGISTRY[method].weight_format
    g = gen(5)
    ws = (torch.randn(3, 8, 32, generator=g), torch.randn(3, 8, 32, generator=g), torch.randn(3, 32, 8, generator=g))
    packed = tuple(fmt.pack(w, 8) for w in ws)
    weights_io.write_layer(tmp_path, 5, fmt, packed, group_size=8)
    back = weights_io.read_layer(tmp_path, 5, fmt, 3, 32, 8, 8)
    _same_packed(back, packed)
    if method == "AMXBF16_SFT":
        assert back[0].scale is None and back[0].zero is None and back[0].group == 32
    assert weights_io.verify_folder(tmp_path) == [5]


def test_inference_method_reads_sft_folder(ckpts):
    out = _convert(ckpts, "AMXINT8_SFT")
    w = _make("AMXINT8", r=0, mode="inference", weight_path=out)
    w.load_weights()
    ref = _make("AMXINT8", r=0, mode="inference", weights=ckpts["tensors"][0])
    x, ids, rw, _ = _inputs()
    assert torch.equal(w.forward(x, ids, rw), ref.forward(x, ids, rw))


# ------------------------------------------------------------------------------------------ bad folders
def _copy(ckpts, tmp_path, method="AMXINT4_1KGroup_SFT"):
    dst = str(tmp_path / "bad")
    shutil.copytree(_convert(ckpts, method), dst)
    return dst


def _edit_manifest(folder, fn):
    p = os.path.join(folder, weights_io.MANIFEST_NAME)
    with open(p) as f:
        m = json.load(f)
    fn(m)
    with open(p, "w") as f:
        json.dump(m, f)


def _rewrite_layer(folder, layer, mutate, fix_manifest=True):
    """Rewrites a layer file with mutate(tensors dict); keeps the file metadata; updates size/sha256."""
    path = os.path.join(folder, weights_io.layer_filename(layer))
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(mutate(tensors), path, metadata=meta)
    if fix_manifest:
        def fix(m):
            m["layers"][str(layer)]["size"] = os.path.getsize(path)
            m["layers"][str(layer)]["sha256"] = weights_io.file_sha256(path)
        _edit_manifest(folder, fix)
    return path


def _expect_load_error(ckpts, folder, *fragments, method="AMXINT4_1KGroup_SFT", layer=0, exc=ValueError,
                       group_size=GS):
    """load_weights fails with a message holding every fragment, both on an empty wrapper (still empty
    after) and on a loaded one (still holds, and computes with, its previous weights)."""
    x, ids, rw, _ = _inputs()
    empty = _make(method, layer, r=0, weight_path=folder, group_size=group_size)
    with pytest.raises(exc) as ei:
        empty.load_weights()
    msg = str(ei.value)
    for frag in fragments:
        assert str(frag) in msg, f"{frag!r} not in {msg!r}"
    assert empty._weights is None and empty.weight_nbytes() == 0
    with pytest.raises(RuntimeError, match="weights are not loaded"):
        empty.forward_sft(x, ids, rw, save_for_backward=False)
    loaded = _make(method, layer, r=0, weight_path=folder, group_size=group_size, weights=ckpts["tensors"][0])
    before_w, before_y = loaded._weights, loaded.forward_sft(x, ids, rw, save_for_backward=False)
    with pytest.raises(exc):
        loaded.load_weights()
    assert loaded._weights is before_w
    assert torch.equal(loaded.forward_sft(x, ids, rw, save_for_backward=False), before_y)
    return msg


def test_bad_missing_key(ckpts, tmp_path):
    folder = _copy(ckpts, tmp_path)
    path = _rewrite_layer(folder, 0, lambda t: {k: v for k, v in t.items() if k != "up.scale"})
    _expect_load_error(ckpts, folder, path, "'up.scale'", "missing")


def test_bad_wrong_shape(ckpts, tmp_path):
    folder = _copy(ckpts, tmp_path)
    path = _rewrite_layer(folder, 0, lambda t: dict(t, **{"down.data": t["down.data"][:, :, :-1].contiguous()}))
    _expect_load_error(ckpts, folder, path, "'down.data'", str((E, H, I // 2)), str((E, H, I // 2 - 1)))


def test_bad_wrong_dtype(ckpts, tmp_path):
    folder = _copy(ckpts, tmp_path)
    path = _rewrite_layer(folder, 0, lambda t: dict(t, **{"gate.scale": t["gate.scale"].half()}))
    _expect_load_error(ckpts, folder, path, "'gate.scale'", "F16", "float32")


def test_bad_extra_key_and_manifest_record(ckpts, tmp_path):
    folder = _copy(ckpts, tmp_path, "AMXINT4_SFT")
    path = _rewrite_layer(folder, 0, lambda t: dict(t, **{"gate.zero": torch.zeros_like(t["gate.scale"])}))
    _expect_load_error(ckpts, folder, path, "gate.zero", "unexpected", method="AMXINT4_SFT")
    folder2 = _copy(ckpts, tmp_path / "b", "AMXINT4_SFT")
    _edit_manifest(folder2, lambda m: m["layers"]["0"]["tensors"]["up.data"].update(shape=[1, 2, 3]))
    _expect_load_error(ckpts, folder2, "manifest record", "'up.data'", method="AMXINT4_SFT")


def test_bad_wrong_format(ckpts):
    folder = _convert(ckpts, "AMXINT8_SFT")
    _expect_load_error(ckpts, folder, weights_io.MANIFEST_NAME, "'format'", "'int8'", "'int4_1_kgroup'",
                       "AMXINT8_SFT")


def test_bad_file_of_other_format_swapped_in(ckpts, tmp_path):
    """A layer file copied from a folder of another format is caught by the file's own metadata / keys."""
    folder = _copy(ckpts, tmp_path)
    src = os.path.join(_convert(ckpts, "AMXINT4_KGroup_SFT"), "layer_000.safetensors")
    dst = os.path.join(folder, "layer_000.safetensors")
    shutil.copyfile(src, dst)
    _edit_manifest(folder, lambda m: m["layers"]["0"].update(size=os.path.getsize(dst)))
    _expect_load_error(ckpts, folder, dst, "metadata 'format'", "int4_kgroup")


def test_bad_layer_file_swapped(ckpts, tmp_path):
    folder = _copy(ckpts, tmp_path)
    shutil.copyfile(os.path.join(folder, "layer_001.safetensors"), os.path.join(folder, "layer_000.safetensors"))
    _expect_load_error(ckpts, folder, "layer_000.safetensors", "metadata 'layer'", "'1'")


@pytest.mark.parametrize("key,value", [("format_version", 99), ("layout_version", 2)])
def test_bad_version(ckpts, tmp_path, key, value):
    folder = _copy(ckpts, tmp_path)
    _edit_manifest(folder, lambda m: m.update({key: value}))
    _expect_load_error(ckpts, folder, weights_io.MANIFEST_NAME, f"'{key}'", str(value))


def test_bad_group_size_and_dims(ckpts, tmp_path):
    folder = _convert(ckpts, "AMXINT4_1KGroup_SFT")
    _expect_load_error(ckpts, folder, weights_io.MANIFEST_NAME, "'group_size'", "16", "32", group_size=32)
    with pytest.raises(ValueError, match="'num_experts' is 8 but the wrapper has num_experts=4"):
        _make("AMXINT4_1KGroup_SFT", E=4, r=0, weight_path=folder).load_weights()


def test_bad_truncated(ckpts, tmp_path):
    folder = _copy(ckpts, tmp_path)
    path = os.path.join(folder, "layer_000.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    _expect_load_error(ckpts, folder, path, "truncated", str(len(data) // 2), str(len(data)))
    # with the manifest's size and checksum made to agree, safetensors' own check still catches it
    _edit_manifest(folder, lambda m: m["layers"]["0"].update(size=len(data) // 2, sha256=weights_io.file_sha256(path)))
    _expect_load_error(ckpts, folder, path, "truncated or corrupt")


def test_bad_corrupt_bytes_checksum(ckpts, tmp_path, monkeypatch):
    folder = _copy(ckpts, tmp_path)
    path = os.path.join(folder, "layer_000.safetensors")
    with open(path, "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"\x55" * 10)
    fmt = REGISTRY["AMXINT4_1KGroup_SFT"].weight_format
    weights_io.read_layer(folder, 0, fmt, E, H, I, GS)  # same size: only the checksum can tell
    with pytest.raises(ValueError, match="sha256"):
        weights_io.read_layer(folder, 0, fmt, E, H, I, GS, checksum=True)
    monkeypatch.setenv(weights_io.CHECKSUM_ENV, "1")
    _expect_load_error(ckpts, folder, path, "sha256")


def test_bad_missing_files(ckpts, tmp_path):
    folder = _copy(ckpts, tmp_path)
    os.unlink(os.path.join(folder, "layer_001.safetensors"))
    _expect_load_error(ckpts, folder, "layer_001.safetensors", "missing", layer=1, exc=FileNotFoundError)
    _expect_load_error(ckpts, folder, "layer 5 is not in this weight folder", "[0, 1]", layer=5,
                       exc=FileNotFoundError)
    os.unlink(os.path.join(folder, weights_io.MANIFEST_NAME))
    _expect_load_error(ckpts, folder, weights_io.MANIFEST_NAME, exc=FileNotFoundError)
    _expect_load_error(ckpts, str(tmp_path / "nope"), "nope", "does not exist", exc=FileNotFoundError)
    with open(os.path.join(folder, weights_io.MANIFEST_NAME), "w") as f:
        f.write("{not json")
    _expect_load_error(ckpts, folder, weights_io.MANIFEST_NAME, "unreadable manifest")


# ------------------------------------------------------------------------------------------ converter
def test_converter_bad_checkpoints(ckpts, tmp_path):
    gate, up, down = ckpts["tensors"][0]
    hf = tmp_path / "hf"
    _write_mixtral_v4(hf, torch.bfloat16, {0: (gate, up, down)}, shards=1)
    shard = str(hf / "model-00001-of-00001.safetensors")
    with safe_open(shard, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    # a missing expert projection
    save_file({k: v for k, v in t.items() if k != "model.layers.0.block_sparse_moe.experts.3.w3.weight"}, shard)
    os.unlink(hf / "model.safetensors.index.json")  # no index: the folder's shards are scanned
    with pytest.raises(ConvertError, match=r"expert 3 .*experts\.3\.up_proj\.weight"):
        convert_checkpoint(str(hf), str(tmp_path / "o1"), "AMXINT8_SFT", progress=False)
    # an unsupported dtype (FP8 checkpoints must be dequantized first)
    t8 = dict(t, **{"model.layers.0.block_sparse_moe.experts.3.w3.weight":
                    t["model.layers.0.block_sparse_moe.experts.3.w3.weight"].to(torch.float8_e4m3fn)})
    save_file(t8, shard)
    with pytest.raises(ConvertError, match=r"experts\.3\.w3\.weight.*F8_E4M3"):
        convert_checkpoint(str(hf), str(tmp_path / "o1"), "AMXINT8_SFT", progress=False)
    # a config that disagrees with the tensors, a wrong shape, a layer without experts, an unknown method
    save_file(t, shard)
    with open(hf / "config.json", "w") as f:
        json.dump({"hidden_size": H * 2}, f)
    with pytest.raises(ConvertError, match="hidden_size=128"):
        convert_checkpoint(str(hf), str(tmp_path / "o1"), "AMXINT8_SFT", progress=False)
    os.unlink(hf / "config.json")
    save_file(dict(t, **{"model.layers.0.block_sparse_moe.experts.5.w2.weight": torch.zeros(H, I + 1)}), shard)
    with pytest.raises(ConvertError, match=r"experts\.5\.w2\.weight.*\[64, 33\].*\[64, 32\]"):
        convert_checkpoint(str(hf), str(tmp_path / "o1"), "AMXINT8_SFT", progress=False)
    save_file(t, shard)
    with pytest.raises(ConvertError, match=r"layer\(s\) \[3\] have no routed experts; MoE layers: \[0\]"):
        convert_checkpoint(str(hf), str(tmp_path / "o1"), "AMXINT8_SFT", layers=[3], progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        convert_checkpoint(str(hf), str(tmp_path / "o1"), "AMXINT9_SFT", progress=False)
    with pytest.raises(ValueError, match="group_size=48 must divide"):
        convert_checkpoint(str(hf), str(tmp_path / "o1"), "AMXINT4_KGroup_SFT", 48, progress=False)
    # into a folder of another format: refused before any work
    out = tmp_path / "o2"
    convert_checkpoint(str(hf), str(out), "AMXINT8_SFT", progress=False)
    with pytest.raises(ConvertError, match="already holds format='int8'"):
        convert_checkpoint(str(hf), str(out), "AMXINT4_SFT", progress=False)


def test_cli(ckpts, tmp_path, capsys):
    out = str(tmp_path / "cli")
    rc = convert_main(["--input", ckpts["v5"], "--output", out, "--method", "AMXINT4_KGroup_SFT",
                       "--group-size", str(GS), "--layers", "1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "\r" in cap.err and "1/1" in cap.err and "ktmoe.convert check" in cap.err
    assert "wrote 1 layer(s)" in cap.out and "int4_kgroup" in cap.out
    assert sorted(json.load(open(os.path.join(out, weights_io.MANIFEST_NAME)))["layers"]) == ["1"]
    rc = convert_main(["--check", out])
    assert rc == 0 and "OK" in capsys.readouterr().out
    rc = convert_main(["--input", ckpts["v5"], "--output", out, "--method", "AMXINT4_KGroup_SFT", "--layers", "0"])
    assert rc == 2 and "group_size" in capsys.readouterr().err  # folder has group 16, asked 128


def test_cli_subprocess(ckpts, tmp_path):
    """The real entry point: python -m ktmoe.convert."""
    out = str(tmp_path / "sub")
    r = subprocess.run([sys.executable, "-m", "ktmoe.convert", "--input", ckpts["v4"], "--output", out,
                        "--method", "AMXBF16_SFT"], capture_output=True, timeout=120)  # bytes: keep the \r
    err, out_text = r.stderr.decode(), r.stdout.decode()
    assert r.returncode == 0, err
    assert "\r" in err and "wrote 2 layer(s)" in out_text
    w = _wrapper("AMXBF16_SFT", 0, weight_path=out)
    w.load_weights()
    assert torch.equal(w._weights[0].data, ckpts["tensors"][0][0].to(torch.bfloat16))
