"""Adapter I/O in PEFT's target_parameters format, resume, gradient checkpointing, device/dtype handling."""
import copy
import json
import math
import os

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import ktmoe.hf as kh  # noqa: E402
from conftest import THREADS, rel  # noqa: E402  (one engine size for the whole suite)
from ktmoe.lora import LORA_NAMES  # noqa: E402

LOGITS_RTOL = 1e-2  # converted (bf16 activations in the experts) vs plain fp32 PEFT: see test_hf_families.py
E, H, I = 4, 32, 16  # the tiny models' expert shapes


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# DeepSeek-V2 with greedy top-k (V2-Lite's routing): the tests below are not about routing, and transformers 5.6
# cannot route the tiny config's group_limited_greedy (test_hf_families covers that routing where it runs)
DS2_GREEDY = dict(topk_method="greedy")
SWAPPED = kh.peft_swaps()  # the installed PEFT's orientation of 3-D target_parameters LoRA (swapped: peft 0.18)


def random_lora(E=E, H=H, I=I, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = dict(gate_lora_a=(E, r, H), gate_lora_b=(E, I, r), up_lora_a=(E, r, H), up_lora_b=(E, I, r),
                  down_lora_a=(E, r, I), down_lora_b=(E, H, r))
    return {n: torch.randn(shapes[n], generator=g) for n in LORA_NAMES}


def converted(family="qwen3_moe", seed=0, r=4, alpha=8.0, attn=True, randomize=True, **overrides):
    model = kh.tiny_model(family, seed=seed, **overrides)
    kh.convert_model(model, lora_rank=r, lora_alpha=alpha, seed=seed, cpuinfer_threads=THREADS)
    pm = kh.add_lora(model, r=4, lora_alpha=8.0, target_modules=None if attn else [])
    if randomize:
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for _, p in kh.trainable_parameters(pm):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


def ids(seed=5, batch=2, seq=10):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ layout

def test_six_matrices_to_peft_and_back_is_exact():
    lora = random_lora()
    t = kh.expert_lora_to_peft(lora)
    assert t["gate_up_proj"][0].shape == (E * 6, H) and t["gate_up_proj"][1].shape == (2 * I, 6 * E)
    assert t["down_proj"][0].shape == (E * 3, I) and t["down_proj"][1].shape == (H, 3 * E)
    back, r, alpha, exact = kh.peft_to_expert_lora(t["gate_up_proj"], t["down_proj"], num_experts=E,
                                                   gate_up_scale=2.0, down_scale=2.0)
    assert exact and r == 3 and alpha == 6.0
    for n in LORA_NAMES:
        assert torch.equal(back[n], lora[n]), n
    # B is block-diagonal: in PEFT's rank-major column order the off-diagonal blocks are two quadrants
    mask = kh.block_diagonal_mask(t["gate_up_proj"][1], E)
    assert torch.equal(t["gate_up_proj"][1] * mask, t["gate_up_proj"][1])
    assert mask.sum() == t["gate_up_proj"][1].numel() / 2


def test_both_peft_orientations_convert_exactly_and_are_told_apart_by_shape():
    """peft 0.18 keeps a 3-D parameter's LoRA swapped (A reads the parameter's dim 1, delta_e = (B_e A_e)^T):
    the same LoRA converts exactly both ways, and identify_layer tells which one a file holds from the shapes
    alone, here where H == 2I makes gate_up's A and B the same shape in both."""
    lora = random_lora()
    canon = kh.expert_lora_to_peft(lora)
    sw = kh.expert_lora_to_peft(lora, swapped=True)
    for key in ("gate_up_proj", "down_proj"):
        (a, b), (a2, b2) = canon[key], sw[key]
        R = a.shape[0] // E
        for e in range(E):
            d = b[:, [j * E + e for j in range(R)]] @ a[e * R:(e + 1) * R]
            d2 = b2[:, [j * E + e for j in range(R)]] @ a2[e * R:(e + 1) * R]
            assert torch.allclose(d, d2.T, atol=1e-5), (key, e)
        assert all(torch.equal(x, y) for x, y in zip(kh.swap_orientation(a2, b2, E), (a, b)))  # an involution
    for given, swapped in ((canon, False), (sw, True)):
        for p, q in ((given["gate_up_proj"], given["down_proj"]), (given["down_proj"], given["gate_up_proj"])):
            gu, dn, was = kh.identify_layer(p, q, hidden=H, intermediate=I, num_experts=E)
            assert was == swapped
            assert all(torch.equal(x, y) for x, y in zip((*gu, *dn), (*canon["gate_up_proj"], *canon["down_proj"])))
    with pytest.raises(ValueError, match="fit no PEFT layout of hidden size 48"):
        kh.identify_layer(canon["gate_up_proj"], canon["down_proj"], hidden=48, num_experts=E)


def test_the_installed_peft_orientation_is_probed_not_assumed():
    import importlib.metadata as md

    expected = {(0, 18): True, (0, 21): False}.get(tuple(int(x) for x in md.version("peft").split(".")[:2]))
    if expected is None:
        pytest.skip(f"peft {md.version('peft')}: orientation not pinned by this test (0.18 and 0.21 are)")
    assert kh.peft_swaps() is expected  # peft 0.18 swaps, 0.21 does not
    assert kh.peft_swaps(True) is False      # a transposed [E, in, out] parameter: A reads dim 1 in both


def _peft_experts_model(seed=0, r_gu=6, r_d=3, alpha_gu=12.0, alpha_d=6.0, rslora=False):
    model = kh.tiny_model("qwen3_moe", seed=seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=["mlp.experts.gate_up_proj",
                          "mlp.experts.down_proj"], use_rslora=rslora,
                          rank_pattern={"mlp.experts.gate_up_proj": r_gu, "mlp.experts.down_proj": r_d},
                          alpha_pattern={"mlp.experts.gate_up_proj": alpha_gu, "mlp.experts.down_proj": alpha_d})
    return peft.get_peft_model(model, cfg)


def test_peft_block_order_for_fused_3d_parameters():
    """What PEFT does with lora_A [E*R, in] / lora_B [out, R*E] of a 3-D parameter (peft 0.21; peft 0.18:
    lora_A [E*R, out] / lora_B [in, R*E], delta transposed), checked against its own delta weight: A rows are
    expert-major (e*R + j), B columns rank-major (j*E + e)."""
    pm = _peft_experts_model()
    wrappers = kh.peft_expert_wrappers(pm)["model.layers.0.mlp.experts"]
    g = torch.Generator().manual_seed(1)
    for key, (out_f, in_f) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
        w = wrappers[key]
        A, B = w.lora_A["default"].weight, w.lora_B["default"].weight
        with torch.no_grad():
            A.copy_(torch.randn(A.shape, generator=g))
            B.copy_(torch.randn(B.shape, generator=g))
        R = A.shape[0] // E
        a_f, b_f = (out_f, in_f) if SWAPPED else (in_f, out_f)
        assert A.shape == (E * R, a_f) and B.shape == (b_f, R * E)
        delta = w.get_delta_weight("default")  # [E, out, in]
        s = w.scaling["default"]
        orient = (lambda m: m.T) if SWAPPED else (lambda m: m)
        for e in range(E):
            mine = orient(B[:, [j * E + e for j in range(R)]] @ A[e * R:(e + 1) * R])
            assert torch.allclose(delta[e], s * mine, atol=1e-5), (key, e)
        wrong = torch.stack([orient(B[:, e * R:(e + 1) * R] @ A[e * R:(e + 1) * R]) for e in range(E)])
        assert not torch.allclose(delta, s * wrong, atol=1e-3)  # expert-major B would be a different matrix
    # our six-matrix form of a saved ktmoe layer gives PEFT's delta: [s Bg Ag; s Bu Au] and s Bd Ad
    lora = random_lora(r=3, seed=2)
    t = kh.expert_lora_to_peft(lora, swapped=SWAPPED)
    with torch.no_grad():
        for key in ("gate_up_proj", "down_proj"):
            wrappers[key].lora_A["default"].weight.copy_(t[key][0])
            wrappers[key].lora_B["default"].weight.copy_(t[key][1])
    s = 2.0  # 12/6 and 6/3
    d_gu = wrappers["gate_up_proj"].get_delta_weight("default")
    d_d = wrappers["down_proj"].get_delta_weight("default")
    ref_g = s * lora["gate_lora_b"] @ lora["gate_lora_a"]
    ref_u = s * lora["up_lora_b"] @ lora["up_lora_a"]
    assert torch.allclose(d_gu, torch.cat([ref_g, ref_u], dim=1), atol=1e-5)
    assert torch.allclose(d_d, s * lora["down_lora_b"] @ lora["down_lora_a"], atol=1e-5)


def test_any_peft_target_parameters_adapter_maps_exactly(tmp_path):
    """An adapter trained with plain PEFT (rank 5 gate_up, not block-diagonal, rank 3 down, other scales, rsLoRA)
    loads into ktmoe with the same delta weights."""
    pm = _peft_experts_model(seed=3, r_gu=5, r_d=3, alpha_gu=7.0, alpha_d=4.0, rslora=True)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path)
    fresh = kh.tiny_model("qwen3_moe", seed=3)
    ref_logits = pm(input_ids=ids()).logits.detach()
    loaded = kh.from_adapter(fresh, str(tmp_path), cpuinfer_threads=THREADS)
    m = next(iter(kh.routed_experts(loaded).values()))
    assert m.lora_rank == 5
    with torch.no_grad():
        out = loaded(input_ids=ids()).logits
    assert rel(out, ref_logits) < LOGITS_RTOL
    # delta weights agree exactly (up to fp32 rounding), layer by layer
    wr = kh.peft_expert_wrappers(pm)
    for name, mod in kh.routed_experts(loaded).items():
        lo = dict(zip(LORA_NAMES, mod.lora_parameters))
        s = mod.scaling
        dg = s * lo["gate_lora_b"] @ lo["gate_lora_a"]
        du = s * lo["up_lora_b"] @ lo["up_lora_a"]
        dd = s * lo["down_lora_b"] @ lo["down_lora_a"]
        assert torch.allclose(torch.cat([dg, du], 1), wr[name]["gate_up_proj"].get_delta_weight("default"), atol=1e-6)
        assert torch.allclose(dd, wr[name]["down_proj"].get_delta_weight("default"), atol=1e-6)


# ------------------------------------------------------------------ save / load

@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_saved_adapter_loads_in_plain_peft_with_the_same_logits(tmp_path, family):
    pm = converted(family, seed=11)
    kh.save_adapter(pm, str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert cfg["rank_pattern"] == {"mlp.experts.gate_up_proj": 8, "mlp.experts.down_proj": 4}
    assert cfg["alpha_pattern"] == {"mlp.experts.gate_up_proj": 16.0, "mlp.experts.down_proj": 8.0}
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    name = next(iter(kh.routed_experts(pm)))
    pre = f"base_model.model.{name}."
    gu_in, gu_out, d_in, d_out = (2 * I, H, H, I) if SWAPPED else (H, 2 * I, I, H)  # as the installed PEFT has it
    assert sd[pre + "base_layer.lora_A.weight"].shape == (E * 8, gu_in)
    assert sd[pre + "base_layer.lora_B.weight"].shape == (gu_out, 8 * E)
    assert sd[pre + "lora_A.weight"].shape == (E * 4, d_in) and sd[pre + "lora_B.weight"].shape == (d_out, 4 * E)
    assert not any("gate_lora" in k or "up_lora" in k or "down_lora" in k for k in sd)
    assert any("self_attn" in k for k in sd)

    plain = peft.PeftModel.from_pretrained(kh.tiny_model(family, seed=11), str(tmp_path))
    assert not kh.routed_experts(plain)
    # the ranks PEFT built are the ones in the file (its rank_pattern warning is spurious)
    w = kh.peft_expert_wrappers(plain)[name]
    assert w["gate_up_proj"].r["default"] == 8 and w["down_proj"].r["default"] == 4
    with torch.no_grad():
        a = pm(input_ids=ids()).logits
        b = plain(input_ids=ids()).logits
    assert rel(a, b) < LOGITS_RTOL


def test_from_adapter_restores_every_tensor_exactly(tmp_path):
    pm = converted("mixtral", seed=12)
    kh.save_adapter(pm, str(tmp_path))
    back = kh.from_adapter(kh.tiny_model("mixtral", seed=12), str(tmp_path), cpuinfer_threads=THREADS)
    p1, p2 = kh.trainable_parameters(pm), kh.trainable_parameters(back)
    assert [n for n, _ in p1] == [n for n, _ in p2]
    for (n, a), (_, b) in zip(p1, p2):
        assert torch.equal(a, b), n
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids()).logits, back(input_ids=ids()).logits)


def test_experts_only_adapter(tmp_path):
    pm = converted("qwen2_moe", seed=13, attn=False)
    assert hasattr(pm, "peft_config")  # a PeftModel even with no other LoRA: PEFT's own saving paths carry it
    assert not pm.peft_config["default"].target_modules
    kh.save_adapter(pm, str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not cfg["target_modules"]
    back = kh.from_adapter(kh.tiny_model("qwen2_moe", seed=13), str(tmp_path), cpuinfer_threads=THREADS)
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids()).logits, back(input_ids=ids()).logits)
    plain = peft.PeftModel.from_pretrained(kh.tiny_model("qwen2_moe", seed=13), str(tmp_path))
    with torch.no_grad():
        assert rel(pm(input_ids=ids()).logits, plain(input_ids=ids()).logits) < LOGITS_RTOL


def test_load_adapter_errors(tmp_path):
    pm = converted("qwen3_moe", seed=14)
    kh.save_adapter(pm, str(tmp_path))
    other = kh.tiny_model("qwen3_moe", seed=14)
    kh.convert_model(other, lora_rank=2, lora_alpha=8, cpuinfer_threads=THREADS)
    other = kh.add_lora(other)
    with pytest.raises(ValueError, match="needs rank 4"):
        kh.load_adapter(other, str(tmp_path))
    with pytest.raises(FileNotFoundError):
        kh.load_adapter(pm, str(tmp_path / "nope"))
    plain = kh.tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="converted model"):
        kh.load_adapter(plain, str(tmp_path))
    with pytest.raises(ValueError, match="converted model"):
        kh.add_lora(plain)


def test_convert_errors():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="no model family for model_type='llama'"):
        kh.convert_model(dense, lora_rank=2, lora_alpha=4)
    wrapped = peft.get_peft_model(kh.tiny_model("qwen3_moe"), peft.LoraConfig(
        r=2, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]))
    with pytest.raises(ValueError, match="before get_peft_model"):
        kh.convert_model(wrapped, lora_rank=2, lora_alpha=4)


# ------------------------------------------------------------------ resume

def _steps(model, opt, n, start):
    params = [p for _, p in kh.trainable_parameters(model)]
    losses = []
    for s in range(start, start + n):
        x = ids(seed=200 + s)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_resume_gives_the_same_next_steps(tmp_path):
    def fresh():
        m = kh.tiny_model("deepseek_v2", seed=15, **DS2_GREEDY)
        kh.convert_model(m, lora_rank=4, lora_alpha=8, seed=15, cpuinfer_threads=THREADS)
        torch.manual_seed(16)
        return kh.add_lora(m, r=4, lora_alpha=8)

    def adamw(m):
        return torch.optim.AdamW([p for _, p in kh.trainable_parameters(m)], lr=1e-2, weight_decay=0.01)

    a = fresh()
    opt = adamw(a)
    first = _steps(a, opt, 3, 0)
    kh.save_adapter(a, str(tmp_path))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    straight = _steps(a, opt, 3, 3)

    b = kh.from_adapter(kh.tiny_model("deepseek_v2", seed=15, **DS2_GREEDY), str(tmp_path),
                        cpuinfer_threads=THREADS)
    opt_b = adamw(b)
    opt_b.load_state_dict(torch.load(tmp_path / "opt.pt"))
    resumed = _steps(b, opt_b, 3, 3)
    assert resumed == straight, (first, straight, resumed)
    for (n, p), (_, q) in zip(kh.trainable_parameters(a), kh.trainable_parameters(b)):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------ gradient checkpointing

@pytest.mark.parametrize("mode", ["off", "non_reentrant", "reentrant"])
def test_gradient_checkpointing(mode):
    pm = converted("qwen3_moe", seed=17)
    ref = converted("qwen3_moe", seed=17)  # identical twin, never checkpointed
    base = kh.base_model_of(pm)
    if mode != "off":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    pm.train()
    ref.train()
    x = ids(seed=18)
    out = pm(input_ids=x, labels=x)
    if mode == "non_reentrant":
        assert kh.live_saved_forwards() == 0  # the checkpoint dropped the expert activations at once
    out.loss.backward()
    assert kh.live_saved_forwards() == 0
    out_ref = ref(input_ids=x, labels=x)
    assert kh.live_saved_forwards() == len(kh.routed_experts(ref))
    out_ref.loss.backward()
    assert out.loss.item() == out_ref.loss.item()
    for (n, p), (_, q) in zip(kh.trainable_parameters(pm), kh.trainable_parameters(ref)):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), n


def test_backward_twice_is_a_clear_error():
    pm = converted("qwen3_moe", seed=19)
    x = ids()
    loss = pm(input_ids=x, labels=x).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


# ------------------------------------------------------------------ devices and dtypes

def test_model_to_leaves_expert_lora_fp32_on_cpu():
    pm = converted("qwen3_moe", seed=20)
    with torch.no_grad():
        ref = pm(input_ids=ids()).logits
    pm.to(torch.bfloat16)
    for m in kh.routed_experts(pm).values():
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in m.lora_parameters)
    assert kh.base_model_of(pm).lm_head.weight.dtype == torch.bfloat16
    x = ids()
    out = pm(input_ids=x, labels=x)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    m = next(iter(kh.routed_experts(pm).values()))
    assert m.gate_lora_a.grad.dtype == torch.float32 and m.gate_lora_a.grad.norm() > 0
    assert rel(out.logits.float(), ref) < 5e-2  # the whole model in bf16 now


def test_lora_config_is_the_saved_config():
    pm = converted("deepseek_v2", seed=21, **DS2_GREEDY)
    _, saved = kh.adapter_state_dict(pm)
    made = kh.lora_config(kh.tiny_model("deepseek_v2", **DS2_GREEDY), expert_rank=4, expert_alpha=8.0, r=4, lora_alpha=8.0)
    for field in ("r", "lora_alpha", "target_modules", "target_parameters", "rank_pattern", "alpha_pattern"):
        assert getattr(made, field) == getattr(saved, field), field
    with pytest.raises(ValueError, match="got a PEFT model"):
        kh.add_lora(pm)
