"""NUMA tensor parallelism (threadpool_count = P) and inference methods.

P subpools each own 1/P of the intermediate size; the partial outputs and gradients are summed in fp32.
With fp32 inputs and outputs (no final bf16 rounding) every P must agree with P = 1 to fp32 rounding of
the reordered sums, for every gradient (none may be dropped, whatever P is)."""
from __future__ import annotations

import warnings

import pytest
import torch

import ktmoe
from conftest import gen, make_ids, make_lora, make_routing_weights, make_wrapper, make_expert_weights, rel_l2

# fp32 in and out: only the order of fp32 sums over subpools differs from P = 1.
TP_FP32_REL = 1e-5

E, K, H, I, R = 6, 2, 48, 96, 3
METHODS = ["AMXBF16_SFT", "AMXINT8_SFT", "AMXINT4_1KGroup_SFT"]


def _run(method, P, threads, data, **extra):
    weights, lora, x, ids, rw, dy = data
    kw = dict(group_size=4) if "KGroup" in method else {}  # divides every slice I / P tested
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one engine per P, sharing the two cores
        w = make_wrapper(E, K, H, I, R, method=method, weights=weights, lora=lora, threadpool_count=P,
                         cpuinfer_threads=threads, **kw, **extra)
    y = w.forward_sft(x, ids, rw)
    dx, grads = w.backward(dy)
    return y, dx, grads


@pytest.fixture(scope="module")
def data():
    g = gen(21)
    weights = make_expert_weights(E, H, I, g)
    lora = make_lora(E, H, I, R, g)
    T = 19
    x = torch.randn(T, H, generator=g)  # fp32: outputs stay fp32
    ids = make_ids(T, E, K, g, skip_frac=0.2, all_skipped_rows=[4])
    rw = make_routing_weights(T, K, g)
    dy = torch.randn(T, H, generator=g)
    return weights, lora, x, ids, rw, dy


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("P", [2, 3, 4, 6, 8])
def test_subpools_match_one_pool(method, P, data):
    """P = 2..8 (more subpools than cores, and more than 4) give the P = 1 answer for y, dx and all grads."""
    y1, dx1, g1 = _run(method, 1, 2, data)
    yp, dxp, gp = _run(method, P, P, data)
    assert rel_l2(yp, y1) < TP_FP32_REL
    assert rel_l2(dxp, dx1) < TP_FP32_REL
    assert set(gp) == set(g1)
    for n in g1:
        err = rel_l2(gp[n], g1[n])
        assert err < TP_FP32_REL, f"{method} P={P}: {n} differs from P=1 by rel-L2 {err:.2e}"


def test_subpool_cpus_by_hand(data):
    """A topology written by hand is used as given and shown by cpu_info()."""
    y1, dx1, _ = _run("AMXBF16_SFT", 1, 2, data)
    cpus = ktmoe.engine.allowed_cpus()
    pools = [[cpus[i % len(cpus)]] for i in range(3)]
    y3, dx3, _ = _run("AMXBF16_SFT", 3, None, data, subpool_cpus=pools)
    assert rel_l2(y3, y1) < TP_FP32_REL and rel_l2(dx3, dx1) < TP_FP32_REL
    layouts = [e for e in ktmoe.cpu_info()["engines"] if e["threadpool_count"] == 3]
    assert layouts and layouts[0]["subpool_cpus"] == pools


def test_topology_env_parsing(monkeypatch):
    monkeypatch.setenv("KTMOE_TOPOLOGY", "0-1;2,4")
    assert ktmoe.engine._topology_from_env() == [[0, 1], [2, 4]]
    assert ktmoe.engine.parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]


def test_kgroup_slice_must_align():
    """A K-group size that does not divide the TP slice is refused with both numbers named."""
    g = gen(3)
    weights = make_expert_weights(4, 64, 96, g)
    with pytest.raises(ValueError, match="group_size=32"):
        w = make_wrapper(4, 2, 64, 96, 2, method="AMXINT4_KGroup_SFT", group_size=32, threadpool_count=2)
        w.load_weights_from_tensors(*weights)


@pytest.mark.parametrize("method", sorted(ktmoe.INFERENCE_METHODS))
@pytest.mark.parametrize("P", [1, 2])
def test_inference_methods_apply_lora(method, P, data):
    """Each inference method gives its SFT twin's forward, LoRA applied, under TP too."""
    weights, lora, x, ids, rw, _ = data
    kw = dict(group_size=16) if "KGroup" in method else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        inf = make_wrapper(E, K, H, I, R, mode="inference", method=method, weights=weights, lora=lora,
                           threadpool_count=P, cpuinfer_threads=2, **kw)
        sft = make_wrapper(E, K, H, I, R, method=method + "_SFT", weights=weights, lora=lora,
                           threadpool_count=P, cpuinfer_threads=2, **kw)
        plain = make_wrapper(E, K, H, I, R, mode="inference", method=method, weights=weights,
                             threadpool_count=P, cpuinfer_threads=2, **kw)
    y = inf.forward(x, ids, rw)
    assert torch.equal(y, sft.forward_sft(x, ids, rw, save_for_backward=False))
    assert rel_l2(plain.forward(x, ids, rw), y) > 1e-3  # the LoRA really changed the output


@pytest.mark.parametrize("method", sorted(ktmoe.SFT_METHODS))
@pytest.mark.parametrize("P", [2, 3])
def test_node_local_copies(method, P, data):
    """numa_local=True (forced here; automatic when subpools span NUMA nodes): each part gets its own copy of
    its slice, written by its own threads; the answers and the weights the kernels use are unchanged."""
    weights, lora, x, ids, rw, dy = data
    kw = dict(group_size=4) if "KGroup" in method else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        one = make_wrapper(E, K, H, I, R, method=method, weights=weights, lora=lora, cpuinfer_threads=2, **kw)
        loc = make_wrapper(E, K, H, I, R, method=method, weights=weights, lora=lora, threadpool_count=P,
                           cpuinfer_threads=P, numa_local=True, **kw)
    assert loc._part_weights is not None and loc._weights is None
    for a, b in zip(loc.dequantized_weights(), one.dequantized_weights()):
        assert torch.equal(a, b)
    y1, y = one.forward_sft(x, ids, rw), loc.forward_sft(x, ids, rw)
    (dx1, g1), (dx, g) = one.backward(dy), loc.backward(dy)
    assert rel_l2(y, y1) < TP_FP32_REL and rel_l2(dx, dx1) < TP_FP32_REL
    for n in g1:
        assert rel_l2(g[n], g1[n]) < TP_FP32_REL, n
