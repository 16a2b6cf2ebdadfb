"""The KTMoEWrapper contract: argument checking with useful messages, devices, layouts, chunking, the
saved-forward life cycle, LoRA binding, inference methods, cpu_info, the shared engine, dtypes."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import ktmoe
from conftest import (THREADS, assert_close_rel, gen, make_expert_weights, make_ids, make_lora,
                      make_routing_weights, make_wrapper, make_x, reference)
from tolerances import REL_L2, SAME_PATH_REL_L2

E, K, H, I, R = 6, 2, 64, 32, 4
T = 11


def _data(seed=0, T=T, E=E, k=K, H=H, I=I, r=R, skip=0.1):
    g = gen(seed)
    weights = make_expert_weights(E, H, I, g)
    lora = make_lora(E, H, I, r, g) if r else None
    x = make_x(T, H, g)
    ids = make_ids(T, E, k, g, skip_frac=skip, all_skipped_rows=(1,) if T > 1 else ())
    rw = make_routing_weights(T, k, g)
    dy = make_x(T, H, g)
    return weights, lora, x, ids, rw, dy


@pytest.fixture
def data():
    return _data()


@pytest.fixture
def layer(data):
    weights, lora, *_ = data
    return make_wrapper(E, K, H, I, R, weights=weights, lora=lora)


def expect_error(fn, *fragments, exc=(ValueError, RuntimeError)):
    """fn() raises `exc` and the message contains every fragment (the argument, expected, actual)."""
    with pytest.raises(exc) as ei:
        fn()
    msg = str(ei.value)
    for f in fragments:
        assert str(f) in msg, f"{f!r} not in error message {msg!r}"
    return msg


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("which,bad_shape,fragments", [
    ("hidden_states", (T, H + 1), ("hidden_states", H, H + 1)),
    ("hidden_states", (T, H, 1), ("hidden_states", H, f"({T}, {H}, 1)")),
    ("hidden_states", (H,), ("hidden_states", H, f"({H},)")),
    ("expert_ids", (T, K + 1), ("expert_ids", K, K + 1, "num_experts_per_tok")),   # k mismatch
    ("expert_ids", (T, K - 1), ("expert_ids", K, f"({T}, {K - 1})")),
    ("expert_ids", (T + 1, K), ("expert_ids", f"({T}, {K})", f"({T + 1}, {K})")),
    ("expert_ids", (T * K,), ("expert_ids", K, f"({T * K},)")),
    ("weights", (T, K + 1), ("weights", f"({T}, {K})", f"({T}, {K + 1})")),
    ("weights", (T - 1, K), ("weights", f"({T}, {K})", f"({T - 1}, {K})")),
    ("weights", (T,), ("weights", f"({T}, {K})", f"({T},)")),
])
def test_wrong_input_shape(layer, data, which, bad_shape, fragments):
    _, _, x, ids, rw, _ = data
    args = dict(hidden_states=x, expert_ids=ids, weights=rw)
    src = args[which]
    args[which] = torch.zeros(bad_shape, dtype=src.dtype)
    expect_error(lambda: layer.forward_sft(args["hidden_states"], args["expert_ids"], args["weights"]), *fragments)


@pytest.mark.parametrize("bad_shape", [(T - 1, H), (T, H + 1), (T,)])
def test_wrong_grad_output_shape(layer, data, bad_shape):
    _, _, x, ids, rw, dy = data
    layer.forward_sft(x, ids, rw)
    expect_error(lambda: layer.backward(torch.zeros(bad_shape, dtype=dy.dtype)),
                 "grad_output", f"({T}, {H})", str(bad_shape))


@pytest.mark.parametrize("which,dtype", [
    ("hidden_states", torch.float64), ("hidden_states", torch.int32), ("hidden_states", torch.int64),
    ("expert_ids", torch.float32), ("expert_ids", torch.int16), ("expert_ids", torch.uint8),
    ("expert_ids", torch.bool),
    ("weights", torch.float64), ("weights", torch.int64), ("weights", torch.float16),
])
def test_wrong_input_dtype(layer, data, which, dtype):
    _, _, x, ids, rw, _ = data
    args = dict(hidden_states=x, expert_ids=ids, weights=rw)
    args[which] = args[which].abs().to(dtype)
    ok = {"hidden_states": "bfloat16", "expert_ids": "int64", "weights": "float32"}[which]
    expect_error(lambda: layer.forward_sft(args["hidden_states"], args["expert_ids"], args["weights"]),
                 which, str(dtype), ok)


def test_wrong_grad_output_dtype(layer, data):
    _, _, x, ids, rw, dy = data
    layer.forward_sft(x, ids, rw)
    expect_error(lambda: layer.backward(dy.double()), "grad_output", "float64", "bfloat16")


@pytest.mark.parametrize("bad", [E, E + 5, -2, -100])
def test_expert_ids_out_of_range(layer, data, bad):
    _, _, x, ids, rw, _ = data
    ids = ids.clone()
    ids[3, 1] = bad
    expect_error(lambda: layer.forward_sft(x, ids, rw), "expert_ids[3, 1]", str(bad), f"[-1, {E})")
    ids32 = ids.to(torch.int32)
    expect_error(lambda: layer.forward_sft(x, ids32, rw), "expert_ids[3, 1]", str(bad), f"[-1, {E})")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_non_finite_hidden_states(layer, data, value, x_dtype):
    _, _, x, ids, rw, _ = data
    x = x.to(x_dtype).clone()
    x[4, 7] = value
    expect_error(lambda: layer.forward_sft(x, ids, rw), "hidden_states", "4")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_non_finite_weights(layer, data, value, w_dtype):
    _, _, x, ids, rw, _ = data
    rw = rw.to(w_dtype).clone()
    ids = ids.clone()
    ids[2, 0] = 1  # a slot that is used
    rw[2, 0] = value
    expect_error(lambda: layer.forward_sft(x, ids, rw), "weights[2, 0]")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_grad_output(layer, data, value):
    _, _, x, ids, rw, dy = data
    layer.forward_sft(x, ids, rw)
    dy = dy.clone()
    dy[5, 0] = value
    expect_error(lambda: layer.backward(dy), "grad_output", "5")


def test_backward_without_forward(layer, data):
    expect_error(lambda: layer.backward(data[5]), "forward_sft", "save_for_backward", exc=RuntimeError)


def test_backward_after_forward_without_save(layer, data):
    _, _, x, ids, rw, dy = data
    layer.forward_sft(x, ids, rw, save_for_backward=True)
    layer.forward_sft(x, ids, rw, save_for_backward=False)  # replaces the saved one with nothing
    assert layer._saved is None
    expect_error(lambda: layer.backward(dy), "save_for_backward", exc=RuntimeError)


def test_forward_before_load_weights(data):
    _, lora, x, ids, rw, _ = data
    w = make_wrapper(E, K, H, I, R)
    expect_error(lambda: w.forward_sft(x, ids, rw), "load_weights", exc=RuntimeError)
    expect_error(lambda: w.forward_sft(x, ids, rw, save_for_backward=False), "load_weights", exc=RuntimeError)


def test_training_forward_without_lora(data):
    weights, _, x, ids, rw, _ = data
    w = make_wrapper(E, K, H, I, R, weights=weights)
    expect_error(lambda: w.forward_sft(x, ids, rw), "init_lora_weights", exc=RuntimeError)


def test_update_lora_before_init(data):
    w = make_wrapper(E, K, H, I, R, weights=data[0])
    expect_error(w.update_lora_weights, "init_lora_weights", exc=RuntimeError)


def test_init_lora_on_rank0_wrapper(data):
    weights, lora, *_ = data
    w = make_wrapper(E, K, H, I, 0, weights=weights)
    expect_error(lambda: w.init_lora_weights(*lora.values()), "lora_rank=0")


def test_unknown_method_lists_valid_names():
    msg = expect_error(lambda: make_wrapper(E, K, H, I, R, method="AMXBF17_SFT"), "AMXBF17_SFT")
    for name in ktmoe.SFT_METHODS:
        assert name in msg
    msg = expect_error(lambda: make_wrapper(E, K, H, I, R, method="nope", mode="inference"), "nope")
    for name in ktmoe.INFERENCE_METHODS:
        assert name in msg


@pytest.mark.parametrize("mode,method", [("sft", "AMXBF16"), ("inference", "AMXBF16_SFT")])
def test_mode_method_mismatch(mode, method):
    expect_error(lambda: make_wrapper(E, K, H, I, R, mode=mode, method=method), method, mode)


def test_unknown_mode():
    expect_error(lambda: make_wrapper(E, K, H, I, R, mode="train"), "mode", "train", "sft", "inference")


def test_registry_consistent():
    assert "AMXBF16_SFT" in ktmoe.SFT_METHODS and "AMXBF16" in ktmoe.INFERENCE_METHODS
    for name, m in ktmoe.REGISTRY.items():
        assert m.mode == ("sft" if name.endswith("_SFT") else "inference")
        assert m.weight_format.bits in REL_L2, f"{name}: no tolerance for {m.weight_format.bits}-bit weights"


def test_num_gpu_experts_must_be_zero():
    expect_error(lambda: make_wrapper(E, K, H, I, R, num_gpu_experts=2), "num_gpu_experts", "2", "0")


def test_intermediate_not_divisible_by_threadpool_count():
    expect_error(lambda: make_wrapper(E, K, H, 30, R, threadpool_count=4),
                 "moe_intermediate_size=30", "threadpool_count=4")


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(num_experts=0), "num_experts"), (dict(hidden_size=-3), "hidden_size"),
    (dict(num_experts_per_tok=E + 1), "num_experts_per_tok"), (dict(lora_rank=-1), "lora_rank"),
    (dict(lora_dropout=0.1), "lora_dropout"), (dict(chunked_prefill_size=0), "chunked_prefill_size"),
    (dict(cpuinfer_threads=0), "cpuinfer_threads"),
])
def test_bad_constructor_arguments(kwargs, fragment):
    args = dict(mode="sft", method="AMXBF16_SFT", layer_idx=0, num_experts=E, num_experts_per_tok=K,
                hidden_size=H, moe_intermediate_size=I, lora_rank=R, cpuinfer_threads=THREADS)
    args.update(kwargs)
    expect_error(lambda: ktmoe.KTMoEWrapper(**args), fragment)


@pytest.mark.parametrize("name", ktmoe.LORA_NAMES)
def test_wrong_lora_shape(data, name):
    weights, lora, *_ = data
    w = make_wrapper(E, K, H, I, R, weights=weights)
    bad = dict(lora)
    good_shape = tuple(bad[name].shape)
    bad[name] = torch.zeros(good_shape[0], good_shape[1] + 1, good_shape[2])
    expect_error(lambda: w.init_lora_weights(*(bad[n] for n in ktmoe.LORA_NAMES)), name, str(good_shape),
                 str(tuple(bad[name].shape)))


def test_wrong_lora_dtype(data):
    weights, lora, *_ = data
    w = make_wrapper(E, K, H, I, R, weights=weights)
    bad = dict(lora, up_lora_b=lora["up_lora_b"].double())
    expect_error(lambda: w.init_lora_weights(*(bad[n] for n in ktmoe.LORA_NAMES)), "up_lora_b", "float64")


@pytest.mark.parametrize("which", ["gate_proj", "up_proj", "down_proj"])
def test_wrong_weight_shape(data, which):
    weights = dict(zip(("gate_proj", "up_proj", "down_proj"), data[0]))
    good = tuple(weights[which].shape)
    weights[which] = weights[which][:, :-1]
    w = make_wrapper(E, K, H, I, R)
    expect_error(lambda: w.load_weights_from_tensors(**weights), which, str(good), str(tuple(weights[which].shape)))


def test_load_weights_without_path():
    w = make_wrapper(E, K, H, I, R)
    expect_error(w.load_weights, "weight_path")


def test_set_isa_unknown_level():
    try:
        expect_error(lambda: ktmoe.set_isa("sse9"), "sse9", "portable", "avx2")
    finally:
        ktmoe.set_isa(None)


FOUR_BIT_METHODS = sorted(m for m in ktmoe.SFT_METHODS if ktmoe.REGISTRY[m].weight_format.bits == 4)
KGROUP_METHODS = sorted(m for m in ktmoe.SFT_METHODS if getattr(ktmoe.REGISTRY[m].weight_format, "per_group", False))


@pytest.mark.parametrize("method", FOUR_BIT_METHODS)
@pytest.mark.parametrize("H_,I_,odd", [(37, 20, 37), (38, 19, 19)], ids=["odd_H", "odd_I"])
def test_int4_needs_even_sizes(method, H_, I_, odd):
    g = gen(1)
    w = make_wrapper(4, 2, H_, I_, 2, method=method, group_size=2)
    expect_error(lambda: w.load_weights_from_tensors(*make_expert_weights(4, H_, I_, g)), str(odd), "even")


@pytest.mark.parametrize("method", KGROUP_METHODS)
def test_kgroup_group_size_must_divide(method):
    g = gen(1)
    w = make_wrapper(4, 2, 64, 32, 2, method=method, group_size=128)
    expect_error(lambda: w.load_weights_from_tensors(*make_expert_weights(4, 64, 32, g)), "group_size=128", "64")
    w = make_wrapper(4, 2, 64, 32, 2, method=method, group_size=0)
    expect_error(lambda: w.load_weights_from_tensors(*make_expert_weights(4, 64, 32, g)), "group_size=0")


@pytest.mark.parametrize("method", KGROUP_METHODS)
def test_kgroup_tp_slice_must_start_on_a_group(method):
    """I=96, P=2: down's column slice starts at 48, not a multiple of group_size=32."""
    g = gen(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        w = make_wrapper(4, 2, 64, 96, 2, method=method, group_size=32, threadpool_count=2)
    expect_error(lambda: w.load_weights_from_tensors(*make_expert_weights(4, 64, 96, g)), "group_size=32",
                 "threadpool_count")


# ------------------------------------------------------------------------------------------ devices
def test_meta_device_rejected(layer, data):
    _, _, x, ids, rw, _ = data
    with pytest.raises((ValueError, RuntimeError)):  # NotImplementedError is a RuntimeError
        layer.forward_sft(x.to("meta"), ids.to("meta"), rw.to("meta"))
    with pytest.raises((ValueError, RuntimeError)):
        layer.forward_sft(x.to("meta"), ids, rw)


def test_meta_device_error_names_argument(layer, data):
    _, _, x, ids, rw, _ = data
    expect_error(lambda: layer.forward_sft(x.to("meta"), ids.to("meta"), rw.to("meta")), "hidden_states", "meta")


@pytest.mark.parametrize("which", ["expert_ids", "weights"])
def test_mixed_devices_rejected(layer, data, which):
    _, _, x, ids, rw, _ = data
    args = dict(hidden_states=x, expert_ids=ids, weights=rw)
    args[which] = args[which].to("meta")
    expect_error(lambda: layer.forward_sft(**args), which, "meta", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_inputs_come_back_on_cuda(layer, data):
    weights, lora, x, ids, rw, dy = data
    y_cpu = layer.forward_sft(x, ids, rw)
    dx_cpu, g_cpu = layer.backward(dy)
    y = layer.forward_sft(x.cuda(), ids.cuda(), rw.cuda())
    assert y.device.type == "cuda"
    dx, g = layer.backward(dy.cuda())
    assert dx.device.type == "cuda" and g["weights"].device.type == "cuda"
    assert torch.equal(y.cpu(), y_cpu) and torch.equal(dx.cpu(), dx_cpu)


# ----------------------------------------------------------------------------------- layouts
def _run(w, x, ids, rw, dy):
    y = w.forward_sft(x, ids, rw)
    dx, g = w.backward(dy)
    return y, dx, g


def _assert_same(a, b, tol=SAME_PATH_REL_L2, what=""):
    (ya, dxa, ga), (yb, dxb, gb) = a, b
    assert_close_rel(f"y{what}", ya, yb, tol)
    assert_close_rel(f"dx{what}", dxa, dxb, tol)
    assert set(ga) == set(gb)
    for n in ga:
        assert_close_rel(f"{n}{what}", ga[n], gb[n], tol)


def test_non_contiguous_inputs(isa, layer, data):
    _, _, x, ids, rw, dy = data
    base = _run(layer, x, ids, rw, dy)
    # transposed storage
    xt, dyt = x.t().contiguous().t(), dy.t().contiguous().t()
    idst, rwt = ids.t().contiguous().t(), rw.t().contiguous().t()
    assert not xt.is_contiguous() and not idst.is_contiguous() and not rwt.is_contiguous()
    _assert_same(_run(layer, xt, idst, rwt, dyt), base, what="_transposed")
    # strided slices (every other column / row of a bigger tensor)
    xs = torch.zeros(T, 2 * H, dtype=x.dtype)
    xs[:, ::2] = x
    ids_s = torch.full((2 * T, K), 0, dtype=ids.dtype)
    ids_s[::2] = ids
    rw_s = torch.zeros(T, 3 * K, dtype=rw.dtype)
    rw_s[:, 1::3] = rw
    dys = torch.zeros(2 * T, H, dtype=dy.dtype)
    dys[1::2] = dy
    _assert_same(_run(layer, xs[:, ::2], ids_s[::2], rw_s[:, 1::3], dys[1::2]), base, what="_strided")


def test_non_contiguous_weights_and_lora(data):
    weights, lora, x, ids, rw, dy = data
    base = _run(make_wrapper(E, K, H, I, R, weights=weights, lora=lora), x, ids, rw, dy)
    w_nc = tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in weights)
    lora_nc = {n: t.transpose(1, 2).contiguous().transpose(1, 2) for n, t in lora.items()}
    assert not any(t.is_contiguous() for t in w_nc)
    _assert_same(_run(make_wrapper(E, K, H, I, R, weights=w_nc, lora=lora_nc), x, ids, rw, dy), base)


@pytest.mark.parametrize("chunk", [1, 8, 20, 21])
def test_chunked_prefill_matches_one_chunk(isa, data, chunk):
    weights, lora, _, _, _, _ = data
    g = gen(7)
    Tn = 21
    x, dy = make_x(Tn, H, g), make_x(Tn, H, g)
    ids = make_ids(Tn, E, K, g, skip_frac=0.1, all_skipped_rows=(8,))
    rw = make_routing_weights(Tn, K, g)
    one = _run(make_wrapper(E, K, H, I, R, weights=weights, lora=lora), x, ids, rw, dy)
    many = _run(make_wrapper(E, K, H, I, R, weights=weights, lora=lora, chunked_prefill_size=chunk),
                x, ids, rw, dy)
    _assert_same(many, one, what=f"_chunk{chunk}")
    # and both match the reference
    yr, dxr, dwr, gr = reference(x, ids, rw, weights, lora, 2.0, dy)
    assert_close_rel("y", many[0], yr, REL_L2[16])
    assert_close_rel("dx", many[1], dxr, REL_L2[16])
    assert_close_rel("weights", many[2]["weights"], dwr, REL_L2[16])
    for n in ktmoe.LORA_NAMES:
        assert_close_rel(n, many[2][n], gr[n], REL_L2[16])


def test_empty_batch(layer, data):
    _, _, x, ids, rw, dy = data
    y = layer.forward_sft(x[:0], ids[:0], rw[:0])
    assert y.shape == (0, H) and y.dtype == x.dtype
    dx, g = layer.backward(dy[:0])
    assert dx.shape == (0, H) and g["weights"].shape == (0, K)
    for n in ktmoe.LORA_NAMES:
        assert (g[n] == 0).all(), f"{n}: an empty batch must give zero LoRA grads"


# ------------------------------------------------------------------------ saved-forward life cycle
def test_save_for_backward_false_keeps_nothing(layer, data):
    _, _, x, ids, rw, _ = data
    y_saved = layer.forward_sft(x, ids, rw, save_for_backward=True)
    assert layer._saved is not None
    y = layer.forward_sft(x, ids, rw, save_for_backward=False)
    assert layer._saved is None
    assert torch.equal(y, y_saved)


def test_second_forward_replaces_saved(isa, layer, data):
    """Gradient checkpointing: forward A, forward B (the recompute), backward(dyB) == B alone."""
    _, _, xa, ids_a, rw_a, _ = data
    g = gen(11)
    xb, dyb = make_x(T + 3, H, g), make_x(T + 3, H, g)
    ids_b = make_ids(T + 3, E, K, g)
    rw_b = make_routing_weights(T + 3, K, g)
    layer.forward_sft(xa, ids_a, rw_a)
    yb = layer.forward_sft(xb, ids_b, rw_b)
    got = (yb, *layer.backward(dyb))
    yb2 = layer.forward_sft(xb, ids_b, rw_b)
    alone = (yb2, *layer.backward(dyb))
    _assert_same(got, alone)
    assert torch.equal(got[0], alone[0]) and torch.equal(got[1], alone[1])


def test_backward_twice_same_result(layer, data):
    _, _, x, ids, rw, dy = data
    layer.forward_sft(x, ids, rw)
    a = layer.backward(dy)
    b = layer.backward(dy)
    assert torch.equal(a[0], b[0])
    for n in a[1]:
        assert torch.equal(a[1][n], b[1][n])


# ------------------------------------------------------------------------------------ LoRA binding
def test_update_lora_weights_sees_in_place_bf16_changes(data):
    weights, lora, x, ids, rw, dy = data
    lora_bf16 = {n: t.to(torch.bfloat16) for n, t in lora.items()}
    w = make_wrapper(E, K, H, I, R, weights=weights, lora=lora_bf16)
    y0 = w.forward_sft(x, ids, rw)
    with torch.no_grad():
        lora_bf16["down_lora_b"].mul_(-2.0)
        lora_bf16["gate_lora_a"].add_(0.25)
    w.update_lora_weights()
    y1, dx1, g1 = _run(w, x, ids, rw, dy)
    new = {n: t.float() for n, t in lora_bf16.items()}
    yr, dxr, dwr, gr = reference(x, ids, rw, weights, new, w.lora_scale, dy)
    assert_close_rel("y", y1, yr, REL_L2[16])
    assert_close_rel("dx", dx1, dxr, REL_L2[16])
    assert_close_rel("down_lora_a", g1["down_lora_a"], gr["down_lora_a"], REL_L2[16])
    assert rel_diff(y1, y0) > 0.05, "the LoRA change did not reach the output"


def rel_diff(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp32_lora_read_in_place(data):
    weights, lora, x, ids, rw, dy = data
    lora32 = {n: t.clone() for n, t in lora.items()}
    w = make_wrapper(E, K, H, I, R, weights=weights, lora=lora32)
    y0 = w.forward_sft(x, ids, rw)
    with torch.no_grad():
        lora32["up_lora_b"].mul_(3.0)
        lora32["down_lora_a"].sub_(0.2)
    y1, dx1, g1 = _run(w, x, ids, rw, dy)  # no update_lora_weights()
    yr, dxr, dwr, gr = reference(x, ids, rw, weights, lora32, w.lora_scale, dy)
    assert rel_diff(y1, y0) > 0.05
    assert_close_rel("y", y1, yr, REL_L2[16])
    assert_close_rel("dx", dx1, dxr, REL_L2[16])
    for n in ktmoe.LORA_NAMES:
        assert_close_rel(n, g1[n], gr[n], REL_L2[16])


# -------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("with_lora", [True, False], ids=["lora", "no_lora"])
def test_inference_forward_equals_forward_sft(isa, data, with_lora):
    weights, lora, x, ids, rw, _ = data
    sft = make_wrapper(E, K, H, I, R if with_lora else 0, weights=weights, lora=lora if with_lora else None)
    inf = make_wrapper(E, K, H, I, R, mode="inference", method="AMXBF16", weights=weights,
                       lora=lora if with_lora else None)
    y_inf = inf.forward(x, ids, rw)
    y_sft = sft.forward_sft(x, ids, rw)
    assert y_inf.dtype == x.dtype and y_inf.shape == (T, H)
    assert_close_rel("y_inference_vs_sft", y_inf, y_sft, SAME_PATH_REL_L2)
    yr, *_ = reference(x, ids, rw, weights, lora if with_lora else None, 2.0)
    assert_close_rel("y_inference", y_inf, yr, REL_L2[16])


@pytest.mark.parametrize("method", sorted(ktmoe.SFT_METHODS))
def test_every_inference_method_equals_its_sft_method(data, method):
    weights, lora, x, ids, rw, _ = data
    kw = dict(group_size=32) if getattr(ktmoe.REGISTRY[method].weight_format, "per_group", False) else {}
    inf_name = method[: -len("_SFT")]
    assert inf_name in ktmoe.INFERENCE_METHODS
    sft = make_wrapper(E, K, H, I, R, method=method, weights=weights, lora=lora, **kw)
    inf = make_wrapper(E, K, H, I, R, mode="inference", method=inf_name, weights=weights, lora=lora, **kw)
    assert_close_rel("y_inference_vs_sft", inf.forward(x, ids, rw), sft.forward_sft(x, ids, rw), SAME_PATH_REL_L2)


def test_inference_method_has_no_training(data):
    weights, lora, x, ids, rw, dy = data
    inf = make_wrapper(E, K, H, I, R, mode="inference", method="AMXBF16", weights=weights, lora=lora)
    expect_error(lambda: inf.forward_sft(x, ids, rw), "inference", "forward", exc=RuntimeError)
    expect_error(lambda: inf.backward(dy), "inference", exc=RuntimeError)


def test_sft_forward_method_saves_nothing(layer, data):
    _, _, x, ids, rw, _ = data
    y = layer.forward(x, ids, rw)
    assert layer._saved is None
    assert torch.equal(y, layer.forward_sft(x, ids, rw))


# ---------------------------------------------------------------------------------- info / engine
def test_cpu_info(layer):
    info = ktmoe.cpu_info()
    for key in ("isa_detected", "isa_active", "engines", "isa_levels", "allowed_cpus"):
        assert key in info, key
    assert info["isa_detected"] in ktmoe.available_isa_levels()
    assert info["isa_active"] in ktmoe.available_isa_levels()
    assert info["isa_levels"] == ktmoe.available_isa_levels()
    assert any(e["threadpool_count"] == 1 and e["threads"] == THREADS for e in info["engines"])


def test_set_isa_levels_and_restore():
    try:
        for level in ktmoe.available_isa_levels():
            assert ktmoe.set_isa(level) == level
            assert ktmoe.cpu_info()["isa_active"] == level
    finally:
        best = ktmoe.set_isa(None)
    assert best == ktmoe.cpu_info()["isa_active"]
    if not os.environ.get("KTMOE_ISA"):
        assert best == ktmoe.cpu_info()["isa_detected"]


def _python(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_env_caps_isa_level():
    levels = ktmoe.available_isa_levels()
    if len(levels) < 2:
        pytest.skip("only one ISA level on this CPU")
    r = _python("import ktmoe; i = ktmoe.cpu_info(); print(i['isa_active'], i['isa_cap_env'])",
                KTMOE_ISA=levels[0])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [levels[0], levels[0]]
    r = _python("import ktmoe", KTMOE_ISA="bogus")
    assert r.returncode != 0 and "KTMOE_ISA" in r.stderr and "bogus" in r.stderr


def test_same_threads_no_warning(layer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_wrapper(E, K, H, I, R)


def test_different_threads_warns(layer):
    with pytest.warns(RuntimeWarning, match="cpuinfer_threads=3"):
        make_wrapper(E, K, H, I, R, cpuinfer_threads=THREADS + 1)


# ---------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_output_dtype_and_device(layer, data, x_dtype):
    _, _, x, ids, rw, dy = data
    y = layer.forward_sft(x.to(x_dtype), ids, rw)
    assert y.dtype == x_dtype and y.device == x.device and y.is_contiguous()
    dx, g = layer.backward(dy.to(x_dtype))
    assert dx.dtype == x_dtype and dx.shape == (T, H)
    assert g["weights"].dtype == torch.float32
    for n in ktmoe.LORA_NAMES:
        assert g[n].dtype == torch.float32 and g[n].shape == layer.lora_shapes()[n]


def test_inputs_not_modified(layer, data):
    _, lora, x, ids, rw, dy = data
    copies = [t.clone() for t in (x, ids, rw, dy)]
    layer.forward_sft(x, ids, rw)
    layer.backward(dy)
    for a, b in zip((x, ids, rw, dy), copies):
        assert torch.equal(a, b)
