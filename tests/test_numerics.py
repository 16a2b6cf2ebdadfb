"""Kernel output and every gradient vs the fp32 PyTorch reference, per SFT method x ISA level x shape.

Checked for each case: y, grad_input (dx), the routing-weight grad (dw) and the six LoRA grads, with the
named tolerances of tests/tolerances.py keyed by the method's weight bits; plus exact structural facts
(skipped slots get dw = 0, fully skipped tokens get y = dx = 0, experts nobody routes to get zero LoRA
grads, lora_rank=0 returns only the "weights" grad)."""
from __future__ import annotations

import warnings

import pytest
import torch

import ktmoe
from conftest import (SFT_METHODS, assert_close_rel, gen, make_expert_weights, make_ids, make_lora,
                      make_routing_weights, make_wrapper, make_x, reference)
from tolerances import REORDER_REL_L2, rel_l2_tol, rel_l2_vs_original_tol

# id, sizes, and how ids are drawn. `always`: an expert in every token; `pool`: the only experts used;
# `skip_frac`: fraction of -1 slots; `all_skipped`: tokens whose every slot is -1; `dup`: a token may
# name the same expert twice (the math is still well defined: both slots add).
CASES = [
    dict(id="T1", T=1, E=4, k=2, H=64, I=32, r=4),
    dict(id="E1_k1", T=9, E=1, k=1, H=64, I=32, r=4),
    dict(id="k_eq_E", T=10, E=4, k=4, H=64, I=32, r=4),
    dict(id="odd_H37_I19_r3", T=13, E=5, k=2, H=37, I=19, r=3),
    dict(id="nontile_H100_I70_r5", T=30, E=6, k=3, H=100, I=70, r=5),
    dict(id="r1_alpha3", T=12, E=4, k=2, H=48, I=24, r=1, alpha=3.0),
    dict(id="r33_odd_big_rank", T=20, E=4, k=2, H=80, I=40, r=33, alpha=16.0),
    dict(id="one_expert_200_rows", T=200, E=3, k=2, H=64, I=48, r=4, always=0),   # > the 128-row chunk
    dict(id="one_expert_300_rows_k1", T=300, E=2, k=1, H=40, I=24, r=2, pool=(1,)),
    dict(id="empty_experts", T=20, E=16, k=2, H=64, I=32, r=4, pool=(3, 7, 11)),
    dict(id="skip_slots", T=17, E=8, k=3, H=64, I=32, r=4, skip_frac=0.3, all_skipped=(0, 5, 16)),
    dict(id="all_slots_skipped", T=4, E=4, k=2, H=32, I=16, r=2, skip_frac=1.0),
    dict(id="no_lora_r0", T=16, E=4, k=2, H=64, I=32, r=0),
    dict(id="no_lora_odd_skips", T=7, E=3, k=2, H=33, I=17, r=0, skip_frac=0.25, all_skipped=(3,)),
    dict(id="dup_expert_in_token", T=8, E=4, k=3, H=64, I=32, r=4, dup=True),
    dict(id="H256_I256", T=64, E=8, k=2, H=256, I=256, r=16),
    # few rows per expert with H and I wider than one column block: those experts take one backward NN task
    # over whole weight rows (blk.nn_rows_max_m), expert 0 (in every token) the column blocks
    dict(id="few_rows_whole_H600_I300", T=12, E=16, k=3, H=600, I=300, r=8, always=0),
    # the single moderately sized case (several 128-wide K-groups, > 128 rows for some experts)
    dict(id="moderate_H768_I384", T=300, E=8, k=2, H=768, I=384, r=16),
]


def _ids_for(c, g, dtype=torch.int64):
    T, E, k = c["T"], c["E"], c["k"]
    if c.get("dup"):
        ids = torch.randint(0, E, (T, k), generator=g)
        ids[0] = torch.tensor([1, 1, 2][:k])  # make sure one token names an expert twice
        return ids.to(dtype)
    pool = c.get("pool")
    kk = k
    if pool is not None and len(pool) < k:
        kk = k  # pool must cover k; the cases keep len(pool) >= k
    return make_ids(T, E, kk, g, pool=pool, skip_frac=c.get("skip_frac", 0.0),
                    all_skipped_rows=c.get("all_skipped", ()), always=c.get("always"), dtype=dtype)


def method_kwargs(method, H, I, parts=1):
    """Extra wrapper arguments a method needs for this shape (group_size for K-group formats), or a skip:
    int4 formats pack two weights per byte (H and I even); K-group formats need group_size | H and I/P."""
    fmt = ktmoe.REGISTRY[method].weight_format
    if fmt.bits == 4 and (H % 2 or I % 2):
        pytest.skip(f"{method}: int4 needs even H and I (got H={H}, I={I}); the rejection is tested in test_api")
    if getattr(fmt, "per_group", False):
        for gs in (128, 64, 32, 16, 8, 4, 2):
            if H % gs == 0 and (I // parts) % gs == 0:
                return dict(group_size=gs)
        pytest.skip(f"{method}: no group_size in 2..128 divides H={H} and I/P={I // parts}")
    return {}


_REFERENCE_CACHE: dict = {}


def _cached(key, compute):
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = compute()
    return _REFERENCE_CACHE[key]


def run_and_check(method, c, *, seed=0, x_dtype=torch.bfloat16, ids_dtype=torch.int64, w_dtype=torch.float32,
                  group="", extra_kwargs=None):
    T, E, k, H, I, r = c["T"], c["E"], c["k"], c["H"], c["I"], c["r"]
    extra_kwargs = dict(extra_kwargs or {})
    if "group_size" not in extra_kwargs:
        extra_kwargs.update(method_kwargs(method, H, I, extra_kwargs.get("threadpool_count", 1)))
    g = gen(seed)
    weights = make_expert_weights(E, H, I, g)
    lora = make_lora(E, H, I, r, g) if r > 0 else None
    x = make_x(T, H, g) if x_dtype == torch.bfloat16 else torch.randn(T, H, generator=g).to(x_dtype)
    ids = _ids_for(c, g, ids_dtype)
    rw = make_routing_weights(T, k, g, w_dtype)
    dy = make_x(T, H, g) if x_dtype == torch.bfloat16 else torch.randn(T, H, generator=g).to(x_dtype)

    wr = make_wrapper(E, k, H, I, r, alpha=c.get("alpha"), method=method, weights=weights, lora=lora,
                      **extra_kwargs)
    bits = wr.weight_format.bits
    y = wr.forward_sft(x, ids, rw)
    dx, grads = wr.backward(dy)

    # types and shapes of the contract
    assert y.shape == (T, H) and y.dtype == x.dtype and y.device == x.device
    assert dx.shape == (T, H) and dx.dtype == x.dtype
    assert grads["weights"].shape == (T, k) and grads["weights"].dtype == torch.float32
    expected_names = set(ktmoe.LORA_NAMES) | {"weights"} if r > 0 else {"weights"}
    assert set(grads) == expected_names
    for n in ktmoe.LORA_NAMES if r > 0 else ():
        assert grads[n].shape == wr.lora_shapes()[n] and grads[n].dtype == torch.float32, n

    # The reference does not depend on the ISA level or on TP: computed once per case, format and inputs.
    fmt = wr.weight_format
    key = (repr(sorted(c.items())), seed, x_dtype, ids_dtype, w_dtype, wr.lora_scale)
    yr, dxr, dwr, gr = _cached((fmt.name, extra_kwargs.get("group_size")) + key,
                               lambda: reference(x, ids, rw, wr.dequantized_weights(), lora, wr.lora_scale, dy))
    tol = rel_l2_tol(bits)
    grp = group or f"{method}/{ktmoe.cpu_info()['isa_active']}"
    assert_close_rel("y", y, yr, tol, grp)
    assert_close_rel("grad_input", dx, dxr, tol, grp)
    assert_close_rel("weights_grad", grads["weights"], dwr, tol, grp)
    for n in ktmoe.LORA_NAMES if r > 0 else ():
        assert_close_rel(n, grads[n], gr[n], tol, grp)
    if bits < 16:  # quantized: loosely against the original weights as well
        yo, dxo, _, _ = _cached(("original",) + key, lambda: reference(x, ids, rw, weights, lora, wr.lora_scale, dy))
        loose = rel_l2_vs_original_tol(bits, fmt.name)
        assert_close_rel("y_vs_original", y, yo, loose, f"{method}/vs-original")
        assert_close_rel("dx_vs_original", dx, dxo, loose, f"{method}/vs-original")

    # exact structure
    ids64 = ids.long()
    skipped = ids64 < 0
    assert (grads["weights"][skipped] == 0).all(), "routing-weight grad of a -1 slot must be exactly 0"
    dead = skipped.all(dim=1)
    if dead.any():
        assert (y[dead] == 0).all(), "a token with every slot -1 must get y = 0"
        assert (dx[dead] == 0).all(), "a token with every slot -1 must get grad_input = 0"
    if r > 0:
        unused = [e for e in range(E) if not (ids64 == e).any()]
        for n in ktmoe.LORA_NAMES:
            for e in unused:
                assert (grads[n][e] == 0).all(), f"{n}[{e}]: expert {e} has no tokens, its grad must be 0"
    return wr, (x, ids, rw, dy), (y, dx, grads)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_shapes(isa, sft_method, case):
    run_and_check(sft_method, case)


DTYPE_CASE = dict(T=24, E=6, k=2, H=96, I=40, r=4, skip_frac=0.15, all_skipped=(2,))


_DTYPES = [(x, i, w) for x in (torch.bfloat16, torch.float32) for i in (torch.int64, torch.int32)
           for w in (torch.float32, torch.bfloat16)]
# Input dtypes are handled before the weight format matters: every combination for the bf16 method,
# the all-non-default one for the others (the default combination runs in test_shapes).
_DTYPE_PARAMS = [pytest.param(m, x, i, w, id=f"{m}-{str(x)[6:]}-{str(i)[6:]}-w_{str(w)[6:]}")
                 for m in SFT_METHODS for (x, i, w) in _DTYPES
                 if m == "AMXBF16_SFT" or (x, i, w) == (torch.float32, torch.int32, torch.bfloat16)]


@pytest.mark.parametrize("method,x_dtype,ids_dtype,w_dtype", _DTYPE_PARAMS)
def test_input_dtypes(isa, method, x_dtype, ids_dtype, w_dtype):
    run_and_check(method, DTYPE_CASE, seed=1, x_dtype=x_dtype, ids_dtype=ids_dtype, w_dtype=w_dtype)


def test_fp16_hidden_states_accepted(sft_method):
    """fp16 is accepted too (widened to fp32 on the way in); the result comes back as fp16."""
    wr, (x, ids, rw, dy), (y, dx, grads) = run_and_check(sft_method, DTYPE_CASE, seed=2, x_dtype=torch.float16,
                                                         group="fp16")
    assert y.dtype == torch.float16 and dx.dtype == torch.float16


@pytest.mark.parametrize("case", [CASES[4], CASES[10], dict(id="tp_I64", T=40, E=4, k=2, H=64, I=64, r=8)],
                         ids=lambda c: c["id"])
def test_tensor_parallel_two_subpools(isa, sft_method, case):
    """threadpool_count=2 (one thread per subpool here) matches the reference and the P=1 result."""
    if case["I"] % 2:
        case = dict(case, I=case["I"] + 1)
    kw = method_kwargs(sft_method, case["H"], case["I"], parts=2)  # the same group_size for P=1 and P=2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a second engine (P=2) beside the P=1 one
        _, _, (y2, dx2, g2) = run_and_check(sft_method, case, seed=3, extra_kwargs=dict(threadpool_count=2, **kw),
                                            group=f"{sft_method}/tp2")
    _, _, (y1, dx1, g1) = run_and_check(sft_method, case, seed=3, extra_kwargs=kw)
    assert_close_rel("y_tp2_vs_tp1", y2, y1, REORDER_REL_L2)
    assert_close_rel("dx_tp2_vs_tp1", dx2, dx1, REORDER_REL_L2)
    for n in g1:
        assert_close_rel(f"{n}_tp2_vs_tp1", g2[n], g1[n], REORDER_REL_L2)
