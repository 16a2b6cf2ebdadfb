"""The W8A8 forward (activation_quant="int8"): int8 activations x the int8 codes of per-row int8 / int4 /
int4_1 weights in the forward's base-weight GEMMs, the backward unchanged (a straight-through estimator).

Checked per method x ISA level x shape (test_numerics' cases): y against ktmoe.moe_reference(...,
act_quant="int8") on the weights the int8 products use (WeightFormat.dequantize(exact=True): scale * code
(+ zero), not rounded to bf16), every gradient against that reference's autograd at the bf16 tolerance,
and the accuracy cost of the quantization (y against the non-quantized reference, recorded and printed
with the suite's error table under "<method>/w8a8-cost" and "<method>/w8a8-vs-original"). Plus: the C
quantizer against the Python one bit for bit, the same result across levels (bit-identical between the tile
level and its parent), TP, chunking, and the argument checks."""
from __future__ import annotations

import warnings

import pytest
import torch

import ktmoe
from ktmoe import _core
from ktmoe.reference import quantize_int8_per_row
from conftest import (ISA_LEVELS, SFT_METHODS, assert_close_rel, gen, make_expert_weights, make_lora,
                      make_routing_weights, make_wrapper, make_x, record, reference, rel_l2)
from test_numerics import CASES, _ids_for, method_kwargs
from tolerances import (REORDER_REL_L2, W8A8_COST_REL_L2, W8A8_LEVELS_REL_L2, W8A8_REL_L2, rel_l2_tol,
                        rel_l2_vs_original_tol)

W8A8_METHODS = [m for m in SFT_METHODS if ktmoe.REGISTRY[m].weight_format.int8_activations]
REFUSED_METHODS = [m for m in SFT_METHODS if m not in W8A8_METHODS]
TILE_LEVELS = ("amx-model", "amx")  # override only the prepared-operand slots of their parent

# T = 1, E = 1, odd sizes (int8 only: int4 needs even H and I), sizes off the tiles, > 128 rows for one
# expert (and > one GEMM chunk), skipped slots and tokens, every slot skipped, no LoRA, the moderate case
_IDS = ("T1", "E1_k1", "odd_H37_I19_r3", "nontile_H100_I70_r5", "one_expert_200_rows", "one_expert_300_rows_k1",
        "skip_slots", "all_slots_skipped", "no_lora_r0", "no_lora_odd_skips", "H256_I256", "moderate_H768_I384")
W8A8_CASES = [c for c in CASES if c["id"] in _IDS]
assert len(W8A8_CASES) == len(_IDS)


def _data(c, seed):
    T, E, k, H, I, r = c["T"], c["E"], c["k"], c["H"], c["I"], c["r"]
    g = gen(seed)
    weights = make_expert_weights(E, H, I, g)
    lora = make_lora(E, H, I, r, g) if r > 0 else None
    x = make_x(T, H, g)
    ids = _ids_for(c, g)
    rw = make_routing_weights(T, k, g)
    dy = make_x(T, H, g)
    return weights, lora, x, ids, rw, dy


def _wrapper(method, c, weights, lora, **kw):
    kw.update(method_kwargs(method, c["H"], c["I"], kw.get("threadpool_count", 1)))
    return make_wrapper(c["E"], c["k"], c["H"], c["I"], c["r"], alpha=c.get("alpha"), method=method,
                        weights=weights, lora=lora, activation_quant="int8", **kw)


_REFERENCE_CACHE: dict = {}


def run_w8a8(method, c, *, seed=0, group="", **kw):
    """Forward + backward with activation_quant="int8", checked against the references; (y, dx, grads)."""
    weights, lora, x, ids, rw, dy = _data(c, seed)
    wr = _wrapper(method, c, weights, lora, **kw)
    assert wr.activation_quant == "int8"
    y = wr.forward_sft(x, ids, rw)
    dx, grads = wr.backward(dy)
    assert y.shape == x.shape and y.dtype == x.dtype and dx.shape == x.shape

    bits = wr.weight_format.bits
    key = (method, c["id"], seed)
    if key not in _REFERENCE_CACHE:  # the references do not depend on the ISA level or on TP
        _REFERENCE_CACHE[key] = (
            reference(x, ids, rw, wr.dequantized_weights(exact=True), lora, wr.lora_scale, dy, act_quant="int8"),
            reference(x, ids, rw, wr.dequantized_weights(), lora, wr.lora_scale)[0],
            reference(x, ids, rw, weights, lora, wr.lora_scale)[0])
    (yq, dxq, dwq, gq), y_unquantized, y_original = _REFERENCE_CACHE[key]
    grp = group or f"{method}/w8a8/{ktmoe.cpu_info()['isa_active']}"
    assert_close_rel("y", y, yq, W8A8_REL_L2, grp)
    tol = rel_l2_tol(bits)  # backward: bf16 products, as without activation_quant
    assert_close_rel("grad_input", dx, dxq, tol, grp)
    assert_close_rel("weights_grad", grads["weights"], dwq, tol, grp)
    for n in ktmoe.LORA_NAMES if c["r"] > 0 else ():
        assert_close_rel(n, grads[n], gq[n], tol, grp)
    # the accuracy cost: against the reference without activation quantization, on the same (dequantized)
    # weights (the activation quantization alone), and on the original bf16 weights (W8A8 in all)
    assert_close_rel("y", y, y_unquantized, W8A8_COST_REL_L2, f"{method}/w8a8-cost")
    assert_close_rel("y", y, y_original, rel_l2_vs_original_tol(bits), f"{method}/w8a8-vs-original")

    skipped = ids.long() < 0
    assert (grads["weights"][skipped] == 0).all(), "routing-weight grad of a -1 slot must be exactly 0"
    dead = skipped.all(dim=1)
    if dead.any():
        assert (y[dead] == 0).all() and (dx[dead] == 0).all(), "a token with every slot -1 must get y = dx = 0"
    return wr, y, dx, grads


@pytest.mark.parametrize("method", W8A8_METHODS)
@pytest.mark.parametrize("case", W8A8_CASES, ids=[c["id"] for c in W8A8_CASES])
def test_w8a8_shapes(isa, method, case):
    run_w8a8(method, case)


@pytest.mark.parametrize("method", W8A8_METHODS)
@pytest.mark.parametrize("case", [c for c in W8A8_CASES if c["id"] in ("nontile_H100_I70_r5", "skip_slots")]
                         + [dict(id="tp_I64", T=40, E=4, k=2, H=64, I=64, r=8)], ids=lambda c: c["id"])
def test_w8a8_tensor_parallel_two_subpools(isa, method, case):
    """threadpool_count=2: h is quantized over its full intermediate row (both parts' slices, one scale), so
    the result matches the reference and P=1 up to the fp32 order of the parts' partial sums."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a second engine (P=2) beside the P=1 one
        _, y2, dx2, g2 = run_w8a8(method, case, seed=3, threadpool_count=2, group=f"{method}/w8a8/tp2")
    _, y1, dx1, g1 = run_w8a8(method, case, seed=3)
    assert_close_rel("y_tp2_vs_tp1", y2, y1, REORDER_REL_L2)
    assert_close_rel("dx_tp2_vs_tp1", dx2, dx1, REORDER_REL_L2)
    for n in g1:
        assert_close_rel(f"{n}_tp2_vs_tp1", g2[n], g1[n], REORDER_REL_L2)


@pytest.mark.parametrize("method", W8A8_METHODS)
@pytest.mark.parametrize("case", [c for c in W8A8_CASES if c["id"] in
                                  ("T1", "nontile_H100_I70_r5", "one_expert_200_rows", "no_lora_r0", "H256_I256")],
                         ids=lambda c: c["id"])
def test_w8a8_same_result_at_every_level(method, case):
    """The int32 products are exact and every level runs the same fp32 epilogue: a tile level (amx-model,
    amx) gives the bits of its parent, whose LoRA and activation slots it inherits; levels with other LoRA /
    activation kernels differ only by their fp32 rounding (which may move a bf16 h, and so an int8 code)."""
    weights, lora, x, ids, rw, _ = _data(case, 5)
    ys = {}
    try:
        for level in ISA_LEVELS:
            assert ktmoe.set_isa(level) == level
            ys[level] = _wrapper(method, case, weights, lora).forward(x, ids, rw)
    finally:
        ktmoe.set_isa(None)
    parents = {lv["name"]: lv["parent"] for lv in _core.isa_levels()}
    for level, y in ys.items():
        parent = parents[level]
        if level in TILE_LEVELS and parent in ys:
            assert torch.equal(y, ys[parent]), f"{level} differs from its parent {parent}"
        err = rel_l2(y, ys[ISA_LEVELS[0]])
        record(f"{method}/w8a8-levels", f"y_vs_{ISA_LEVELS[0]}", err)
        assert err < W8A8_LEVELS_REL_L2, f"{level} vs {ISA_LEVELS[0]}: rel-L2 {err:.3e}"


def test_w8a8_chunking_gives_the_same_bits(isa):
    """Quantization is per token and per pair: splitting the batch (chunked_prefill_size) changes nothing."""
    case = next(c for c in W8A8_CASES if c["id"] == "nontile_H100_I70_r5")
    weights, lora, x, ids, rw, _ = _data(case, 7)
    y1 = _wrapper("AMXINT8_SFT", case, weights, lora).forward(x, ids, rw)
    y7 = _wrapper("AMXINT8_SFT", case, weights, lora, chunked_prefill_size=7).forward(x, ids, rw)
    assert torch.equal(y1, y7)


def test_w8a8_quantizes(isa):
    """The path is taken: the output moves away from the non-quantized one by about the measured cost."""
    case = next(c for c in W8A8_CASES if c["id"] == "H256_I256")
    weights, lora, x, ids, rw, _ = _data(case, 8)
    yq = _wrapper("AMXINT4_SFT", case, weights, lora).forward(x, ids, rw)
    plain = make_wrapper(case["E"], case["k"], case["H"], case["I"], case["r"], method="AMXINT4_SFT",
                         weights=weights, lora=lora)
    assert plain.activation_quant is None
    err = rel_l2(yq, plain.forward(x, ids, rw))
    assert 2e-3 < err < W8A8_COST_REL_L2, err


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 1e3, 1e30])
def test_quantizer_matches_the_python_reference_bit_for_bit(isa, scale):
    """The C quantizer (the active level's q8_quant slot) and ktmoe.reference.quantize_int8_per_row give the
    same codes and scales: random rows, zero rows, one-value rows, exact ties, bf16 denormals, outliers."""
    g = gen(11)
    a = torch.randn(40, 203, generator=g) * scale
    a[1] = 0
    a[2] = 0
    a[2, 100] = -scale
    a[3] = torch.arange(203) % 127 + 0.5  # with a[3, 0] = 127: sa = 1, every value a tie
    a[3, 0] = 127
    a[4] = torch.randn(203, generator=g) * 1e-39
    a[5, ::7] *= 1e4
    a = a.to(torch.bfloat16).contiguous()
    q = torch.empty(a.shape, dtype=torch.int8)
    s = torch.empty(a.shape[0], dtype=torch.float32)
    _core.q8_quantize_rows(a.shape[0], a.shape[1], a.data_ptr(), q.data_ptr(), s.data_ptr())
    qr, sr = quantize_int8_per_row(a)
    assert torch.equal(s, sr[:, 0]), (s - sr[:, 0]).abs().max()
    assert torch.equal(q.float(), qr), (q.float() - qr).abs().max()
    assert (q[1] == 0).all() and s[1] == 1.0 and q[2, 100] == -127
    assert torch.equal(q[3, 1:5], torch.tensor([2, 2, 4, 4], dtype=torch.int8))  # 1.5 2.5 3.5 4.5: ties to even


def test_activation_quant_argument():
    kw = dict(layer_idx=0, num_experts=4, num_experts_per_tok=2, hidden_size=64, moe_intermediate_size=32,
              lora_rank=4, lora_alpha=8.0, cpuinfer_threads=2)
    with pytest.raises(ValueError, match="activation_quant must be one of None, 'int8', got 'fp8'"):
        ktmoe.KTMoEWrapper(method="AMXINT8_SFT", activation_quant="fp8", **kw)
    for method in REFUSED_METHODS + [m[:-4] for m in REFUSED_METHODS]:  # and the inference names
        mode = "sft" if method.endswith("_SFT") else "inference"
        with pytest.raises(ValueError, match=f"activation_quant='int8'.*method {method} has"):
            ktmoe.KTMoEWrapper(mode=mode, method=method, activation_quant="int8", **kw)
    with pytest.raises(ValueError, match="K-groups"):
        ktmoe.KTMoEWrapper(method="AMXINT4_1KGroup_SFT", activation_quant="int8", group_size=32, **kw)
    with pytest.raises(ValueError, match="bf16 weights"):
        ktmoe.KTMoEWrapper(method="AMXBF16_SFT", activation_quant="int8", **kw)
    wr = ktmoe.KTMoEWrapper(method="AMXINT4_1_SFT", activation_quant="int8", **kw)
    assert wr.activation_quant == "int8" and "activation_quant='int8'" in repr(wr)
    assert ktmoe.KTMoEWrapper(method="AMXINT4_1_SFT", **kw).activation_quant is None


def test_inference_method_and_module_take_it():
    """An inference wrapper runs the W8A8 forward; KTMoEExperts passes the argument through to its wrapper
    and trains through it (autograd reaches the LoRA parameters)."""
    case = next(c for c in W8A8_CASES if c["id"] == "skip_slots")
    weights, lora, x, ids, rw, dy = _data(case, 9)
    inf = make_wrapper(case["E"], case["k"], case["H"], case["I"], case["r"], method="AMXINT8", mode="inference",
                       weights=weights, lora=lora, activation_quant="int8")
    y_inf = inf.forward(x, ids, rw)
    y_sft = _wrapper("AMXINT8_SFT", case, weights, lora).forward(x, ids, rw)
    assert torch.equal(y_inf, y_sft)
    mod = ktmoe.KTMoEExperts(*weights, num_experts_per_tok=case["k"], lora_rank=4, lora_alpha=8.0,
                             method="AMXINT8_SFT", activation_quant="int8", cpuinfer_threads=2)
    assert mod.wrapper.activation_quant == "int8"
    with torch.no_grad():
        for n in ktmoe.LORA_NAMES:
            getattr(mod, n).copy_(lora[n])
    xr = x.clone().requires_grad_()
    y = mod(xr, ids, rw)
    assert torch.equal(y.detach(), y_sft)
    (y.float() * dy.float()).sum().backward()
    assert xr.grad is not None and all(getattr(mod, n).grad is not None for n in ktmoe.LORA_NAMES)


def test_native_layer_refuses_unsuitable_weights():
    """The C entry point checks the weights itself (a layer switched to W8A8 behind the wrapper's back)."""
    case = next(c for c in W8A8_CASES if c["id"] == "T1")
    weights, lora, x, ids, rw, _ = _data(case, 10)
    for method, what in (("AMXBF16_SFT", "are bf16"), ("AMXINT4_KGroup_SFT", "are int4 with K-groups")):
        wr = make_wrapper(case["E"], case["k"], case["H"], case["I"], case["r"], method=method, weights=weights,
                          lora=lora, group_size=32)
        wr._layer.set_act_quant(_core.ACT_QUANT["int8"])
        with pytest.raises(ValueError, match=f"act_quant=int8 \\(W8A8\\) needs .* gate weights of TP part 0 {what}"):
            wr.forward(x, ids, rw)
        wr._layer.set_act_quant(_core.ACT_QUANT[None])
        wr.forward(x, ids, rw)
    with pytest.raises(ValueError, match="act_quant mode must be in"):
        wr._layer.set_act_quant(2)


def test_reference_act_quant_argument():
    x = torch.randn(3, 8)
    w = torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="act_quant must be one of"):
        ktmoe.moe_reference(x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), *w, act_quant="int4")
