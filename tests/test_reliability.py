"""Issue #14: nothing corrupts, nothing is lost.

Thread safety (two threads x 2000 calls on one wrapper and one KTMoEExperts), ownership of weights (the
caller's tensors and the weight file may change after a load), LoRA re-bind checks, non-finite values
refused with the tensor named, and the bad-input table: every case must end in an error that names its
argument (or, for the few valid edge cases, the right answer); cases where a crash is possible run in a
subprocess of their own."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import ktmoe
from ktmoe import checks, weights_io
from ktmoe.engine import _topology_from_env, get_engine

from conftest import THREADS, gen, make_expert_weights, make_ids, make_lora, make_routing_weights, make_wrapper, \
    make_x

E, H, I, K, R = 4, 32, 16, 2, 4
# the ktmoe this test process imported (the installed package, or a source tree on PYTHONPATH)
SRC = os.path.dirname(os.path.dirname(os.path.abspath(ktmoe.__file__)))


def _weights(seed=0, dtype=torch.bfloat16):
    return make_expert_weights(E, H, I, gen(seed), dtype)


def _inputs(T=5, seed=1, dtype=torch.bfloat16):
    g = gen(seed)
    return make_x(T, H, g, dtype), make_ids(T, E, K, g), make_routing_weights(T, K, g)


def _run_subprocess(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter with this checkout's ktmoe; a crash shows as a signal rc."""
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.path.dirname(os.path.abspath(__file__)))
    prelude = "import torch\ntorch.set_num_threads(1)\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _assert_ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr[-3000:]}"
    assert "OK" in p.stdout, p.stdout


# ------------------------------------------------------------------------------------------- thread safety
N_CALLS = 2000


def _hammer(fn, cases, expected, n_threads=2, calls=N_CALLS):
    """n_threads threads x `calls` calls of fn(case) each; every output must equal expected[case]."""
    errors = []
    start = threading.Barrier(n_threads)

    def worker(tid):
        try:
            start.wait()
            for i in range(calls):
                c = (i + tid) % len(cases)
                y = fn(cases[c])
                if not torch.equal(y, expected[c]):
                    errors.append(f"thread {tid} call {i}: case {c} differs")
                    return
        except Exception as e:  # pragma: no cover - reported below
            errors.append(f"thread {tid}: {type(e).__name__}: {e}")

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in ts), "a thread hangs"
    assert not errors, errors[:5]


def test_two_threads_one_wrapper():
    """Inference forward and forward_sft(save_for_backward=False) share one scratch context: two threads on
    one wrapper must give exactly the single-threaded answers (inputs of different T, so a mix-up shows)."""
    w = make_wrapper(E, K, H, I, R, weights=_weights(), lora=make_lora(E, H, I, R, gen(2)))
    cases = [_inputs(T=1 + 3 * c, seed=10 + c) for c in range(4)]
    expected = [w.forward(*c).clone() for c in cases]
    _hammer(lambda c: w.forward(*c), cases, expected)
    _hammer(lambda c: w.forward_sft(*c, save_for_backward=False), cases, expected, calls=200)


def test_two_threads_one_module_no_grad():
    m = ktmoe.KTMoEExperts(*_weights(), num_experts_per_tok=K, lora_rank=R, cpuinfer_threads=THREADS,
                           generator=gen(3))
    with torch.no_grad():
        for name in ktmoe.LORA_NAMES:  # non-zero B so the LoRA path is exercised
            getattr(m, name).normal_(0, 0.05, generator=gen(4))
    cases = [_inputs(T=2 + 2 * c, seed=20 + c) for c in range(4)]
    with torch.no_grad():
        expected = [m(*c).clone() for c in cases]

    def call(c):
        with torch.no_grad():
            return m(*c)
    _hammer(call, cases, expected)


def test_two_threads_one_module_with_grad():
    """Forward + backward through autograd from two threads: every call has its own context."""
    m = ktmoe.KTMoEExperts(*_weights(), num_experts_per_tok=K, lora_rank=R, cpuinfer_threads=THREADS,
                           generator=gen(5))
    cases = [_inputs(T=3 + c, seed=30 + c, dtype=torch.float32) for c in range(3)]

    def grads(c):
        x = c[0].clone().requires_grad_(True)
        y = m(x, c[1], c[2])
        (gx,) = torch.autograd.grad(y.square().sum(), [x])
        return torch.cat([y.flatten(), gx.flatten()])
    expected = [grads(c) for c in cases]
    _hammer(grads, cases, expected, calls=150)


# --------------------------------------------------------------------------------------------- ownership
def test_bf16_weights_are_owned():
    """Loading two layers from one reused staging buffer, then zeroing and shrinking it: both layers keep
    their own weights."""
    w0_src, w1_src = _weights(0), _weights(1)
    staging = [t.clone() for t in w0_src]
    a = make_wrapper(E, K, H, I, 0, weights=staging)
    for s, t in zip(staging, w1_src):
        s.copy_(t)
    b = make_wrapper(E, K, H, I, 0, weights=staging)
    ref0, ref1 = make_wrapper(E, K, H, I, 0, weights=w0_src), make_wrapper(E, K, H, I, 0, weights=w1_src)
    x, ids, rw = _inputs()
    y0, y1 = ref0.forward(x, ids, rw), ref1.forward(x, ids, rw)
    assert not torch.equal(y0, y1)
    assert torch.equal(a.forward(x, ids, rw), y0) and torch.equal(b.forward(x, ids, rw), y1)
    for s in staging:
        s.zero_()
    assert torch.equal(a.forward(x, ids, rw), y0)
    for s in staging:
        s.resize_(0)
    del staging
    assert torch.equal(a.forward(x, ids, rw), y0) and torch.equal(b.forward(x, ids, rw), y1)


def test_caller_resizes_weights_after_load_subprocess():
    """resize_ frees the caller's storage: the kernels must not read it (in a subprocess: a crash is a
    signal, not a failed suite)."""
    p = _run_subprocess("""
        import torch, ktmoe
        from conftest import gen, make_expert_weights, make_x, make_ids, make_routing_weights
        E, H, I, K = 4, 32, 16, 2
        w = [t.contiguous() for t in make_expert_weights(E, H, I, gen(0), torch.bfloat16)]
        g = gen(1); x, ids, rw = make_x(5, H, g), make_ids(5, E, K, g), make_routing_weights(5, K, g)
        ref = ktmoe.KTMoEWrapper(mode="inference", method="AMXBF16", layer_idx=0, num_experts=E,
                                 num_experts_per_tok=K, hidden_size=H, moe_intermediate_size=I, lora_rank=0,
                                 cpuinfer_threads=1)
        ref.load_weights_from_tensors(*[t.clone() for t in w]); y0 = ref.forward(x, ids, rw)
        m = ktmoe.KTMoEWrapper(mode="inference", method="AMXBF16", layer_idx=0, num_experts=E,
                               num_experts_per_tok=K, hidden_size=H, moe_intermediate_size=I, lora_rank=0,
                               cpuinfer_threads=1)
        m.load_weights_from_tensors(*w)
        for t in w:
            t.resize_(0)
        junk = [torch.full((E * H * I * 4,), 7.0) for _ in range(4)]  # reuse what was freed
        assert torch.equal(m.forward(x, ids, rw), y0)
        print("OK")
    """)
    _assert_ok(p)


def _write_folder(folder, method, weights):
    w = make_wrapper(E, K, H, I, 0, method=method, weights=weights)
    weights_io.write_layer(str(folder), 0, w.weight_format, w._weights, method=method)
    return w


@pytest.mark.parametrize("method", ["AMXBF16_SFT", "AMXINT8_SFT"])
def test_weight_file_rewritten_or_truncated_after_load(tmp_path, method):
    """Default load_weights() owns its memory: rewriting, then truncating the file changes nothing (in a
    subprocess: SIGBUS would otherwise end the suite)."""
    ref = _write_folder(tmp_path / "wf", method, _weights(0))
    x, ids, rw = _inputs()
    torch.save((x, ids, rw, ref.forward(x, ids, rw)), tmp_path / "io.pt")
    p = _run_subprocess(f"""
        import os, torch, ktmoe
        from ktmoe import weights_io
        from conftest import gen, make_expert_weights
        folder, io = {str(tmp_path / 'wf')!r}, {str(tmp_path / 'io.pt')!r}
        x, ids, rw, y0 = torch.load(io)
        m = ktmoe.KTMoEWrapper(mode="sft", method={method!r}, layer_idx=0, num_experts={E},
                               num_experts_per_tok={K}, hidden_size={H}, moe_intermediate_size={I}, lora_rank=0,
                               cpuinfer_threads=1, weight_path=folder)
        m.load_weights()
        path = weights_io.layer_path(folder, 0)
        other = ktmoe.KTMoEWrapper(mode="sft", method={method!r}, layer_idx=0, num_experts={E},
                                   num_experts_per_tok={K}, hidden_size={H}, moe_intermediate_size={I},
                                   lora_rank=0, cpuinfer_threads=1)
        other.load_weights_from_tensors(*make_expert_weights({E}, {H}, {I}, gen(9), torch.bfloat16))
        data = open(path, "rb").read()
        with open(path, "r+b") as f:  # rewrite in place (same inode): a private mapping would see it
            f.write(bytes(len(data)))
        assert torch.equal(m.forward(x, ids, rw), y0), "rewritten file changed the output"
        with open(path, "r+b") as f:
            f.truncate(0)
        assert torch.equal(m.forward(x, ids, rw), y0), "truncated file changed the output"
        print("OK")
    """)
    _assert_ok(p)


def test_mmap_load_detects_a_changed_file(tmp_path):
    ref = _write_folder(tmp_path / "wf", "AMXBF16_SFT", _weights(0))
    x, ids, rw = _inputs()
    m = make_wrapper(E, K, H, I, 0, weight_path=str(tmp_path / "wf"))
    m.load_weights(mmap=True)
    assert torch.equal(m.forward(x, ids, rw), ref.forward(x, ids, rw))
    path = weights_io.layer_path(str(tmp_path / "wf"), 0)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(RuntimeError, match="changed since it was loaded"):
        m.forward(x, ids, rw)
    m.load_weights()  # back to owned memory: no more checks
    assert torch.equal(m.forward(x, ids, rw), ref.forward(x, ids, rw))


def test_weights_replaced_between_forward_and_backward():
    w = make_wrapper(E, K, H, I, R, weights=_weights(0), lora=make_lora(E, H, I, R, gen(2)))
    x, ids, rw = _inputs()
    w.forward_sft(x, ids, rw)
    w.load_weights_from_tensors(*_weights(1))
    with pytest.raises(RuntimeError, match="replaced .* between this forward and its backward"):
        w.backward(torch.ones_like(x))
    w.forward_sft(x, ids, rw)
    w.backward(torch.ones_like(x))  # a forward after the load is fine


# ------------------------------------------------------------------------------------------ LoRA re-bind
def test_update_lora_rechecks_shapes():
    lora = {n: t.to(torch.bfloat16) for n, t in make_lora(E, H, I, R, gen(2)).items()}  # copied path
    w = make_wrapper(E, K, H, I, R, weights=_weights(), lora=lora)
    lora["down_lora_b"].resize_(E, H, R - 1)
    with pytest.raises(ValueError, match="down_lora_b must have shape"):
        w.update_lora_weights()
    lora["down_lora_b"].resize_(E, H, R)
    lora["up_lora_a"].data = torch.zeros(E, R, H, dtype=torch.int32)
    with pytest.raises(ValueError, match="up_lora_a must have dtype"):
        w.update_lora_weights()


def test_in_place_lora_resized_is_refused():
    lora = make_lora(E, H, I, R, gen(2))
    w = make_wrapper(E, K, H, I, R, weights=_weights(), lora=lora)
    x, ids, rw = _inputs()
    w.forward(x, ids, rw)
    w._lora[1].resize_(E, I + 64, R)  # grows: new storage, new pointer
    with pytest.raises(ValueError, match="gate_lora_b changed under the wrapper"):
        w.forward(x, ids, rw)


def test_module_lora_parameter_replaced_is_rechecked():
    m = ktmoe.KTMoEExperts(*_weights(), num_experts_per_tok=K, lora_rank=R, cpuinfer_threads=THREADS)
    x, ids, rw = _inputs()
    m(x, ids, rw)
    m.gate_lora_a.data = torch.zeros(E, R, H - 1)
    with pytest.raises(ValueError, match="gate_lora_a must have shape"):
        m(x, ids, rw)


# ------------------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("method", sorted(ktmoe.SFT_METHODS))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_frozen_weights_named(method, bad):
    ws = [t.clone() for t in _weights(dtype=torch.float32)]
    ws[2][1, 5, 3] = bad
    with pytest.raises(ValueError, match=r"down_proj holds a non-finite value .* expert 1, row 5, column 3"):
        make_wrapper(E, K, H, I, 0, method=method, weights=ws, group_size=16)


def test_non_finite_lora_and_alpha_named():
    lora = make_lora(E, H, I, R, gen(2))
    lora["up_lora_b"][2, 3, 1] = math.nan
    with pytest.raises(ValueError, match="up_lora_b holds a non-finite value .* expert 2, row 3"):
        make_wrapper(E, K, H, I, R, weights=_weights(), lora=lora)
    for alpha in (math.nan, math.inf):
        with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
            make_wrapper(E, K, H, I, R, alpha=alpha)


def test_nan_in_lora_after_a_step_reported_at_next_call():
    m = ktmoe.KTMoEExperts(*_weights(), num_experts_per_tok=K, lora_rank=R, cpuinfer_threads=THREADS)
    x, ids, rw = _inputs()
    m(x, ids, rw).sum().backward()
    with torch.no_grad():
        m.down_lora_a[0, 0, 0] = math.nan  # what a diverging optimizer step does, in place
    with pytest.raises(ValueError, match="down_lora_a .*bound LoRA tensor"):
        m(x, ids, rw)


def test_bf16_overflowing_input_refused():
    w = make_wrapper(E, K, H, I, R, weights=_weights(), lora=make_lora(E, H, I, R, gen(2)))
    x, ids, rw = _inputs(dtype=torch.float32)
    x[2, 7] = 3.4e38  # finite in fp32, inf in bf16
    with pytest.raises(ValueError, match=r"hidden_states\[2, 7\] = 3.4e\+38 overflows bfloat16"):
        w.forward(x, ids, rw)
    x[2, 7] = 3.38e38  # rounds to a finite bf16, but the experts overflow: the output check reports it
    with pytest.raises(ValueError, match=r"forward output turned non-finite at \[2, "):
        w.forward(x, ids, rw)
    x[2, 7] = 1.0
    w.forward_sft(x, ids, rw)
    dy = torch.zeros_like(x)
    dy[0, 0] = -3.4e38
    with pytest.raises(ValueError, match=r"grad_output\[0, 0\] .* overflows bfloat16"):
        w.backward(dy)


def test_overflowing_gradients_reported():
    # finite inputs whose products overflow: the kernels flag the results as they write them
    w = make_wrapper(E, K, H, I, R, weights=_weights(), lora=make_lora(E, H, I, R, gen(2)))
    x, ids, rw = _inputs()
    w.forward_sft(x, ids, rw)
    dy = torch.full_like(x, 3.3e38)
    with pytest.raises(ValueError, match=r"(grad_input|gradient) turned non-finite"):
        w.backward(dy)
    prev = ktmoe.set_finite_checks(False)
    try:
        dx, grads = w.backward(dy)  # checks off: returned as computed
        assert not bool(torch.isfinite(dx).all())
    finally:
        ktmoe.set_finite_checks(prev)


def test_finite_checks_switch_off():
    ws = [t.clone() for t in _weights(dtype=torch.float32)]
    ws[0][0, 0, 0] = math.nan
    prev = checks.set_finite_checks(False)
    try:
        w = make_wrapper(E, K, H, I, 0, weights=ws)  # raw speed: no pass over the weights
        assert not bool(torch.isfinite(w.dequantized_weights()[0]).all())
    finally:
        checks.set_finite_checks(prev)
    assert checks.finite_checks()


def test_convert_refuses_a_nan_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from ktmoe.convert import ConvertError, convert_checkpoint
    gate, up, down = (t.float() for t in _weights())
    up = up.clone()
    up[3, 2, 1] = math.nan
    os.makedirs(tmp_path / "hf")
    save_file({"model.layers.0.mlp.experts.gate_up_proj": torch.cat([gate, up], 1).contiguous(),
               "model.layers.0.mlp.experts.down_proj": down.contiguous()},
              str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConvertError, match="up_proj of expert 3 holds a non-finite value .* row 2, column 1"):
        convert_checkpoint(str(tmp_path / "hf"), str(tmp_path / "out"), "AMXINT8_SFT", progress=False)
    assert not os.path.exists(tmp_path / "out" / "layer_000.safetensors")


# ------------------------------------------------------------------------------------------ bad-input table
def _w(**kw):
    args = dict(layer_idx=0, num_experts=E, num_experts_per_tok=K, hidden_size=H, moe_intermediate_size=I,
                lora_rank=R, cpuinfer_threads=THREADS)
    args.update(kw)
    return ktmoe.KTMoEWrapper(**args)


def _loaded(**kw):
    w = _w(**kw)
    w.load_weights_from_tensors(*_weights())
    return w


def _meta_lora():
    lora = make_lora(E, H, I, R, gen(2))
    lora["gate_lora_a"] = torch.empty(E, R, H, device="meta")
    _loaded().init_lora_weights(*(lora[n] for n in ktmoe.LORA_NAMES))


def _meta_grad():
    w = _loaded()
    w.init_lora_weights(*make_lora(E, H, I, R, gen(2)).values())
    x, ids, rw = _inputs()
    w.forward_sft(x, ids, rw)
    w.backward(torch.empty(x.shape, device="meta"))


def _topology_env(monkeypatch_env):
    os.environ["KTMOE_TOPOLOGY"] = monkeypatch_env
    try:
        _topology_from_env()
    finally:
        del os.environ["KTMOE_TOPOLOGY"]


def _module(x, ids, rw):
    m = ktmoe.KTMoEExperts(*_weights(), num_experts_per_tok=K, lora_rank=R, cpuinfer_threads=THREADS)
    return m(x, ids, rw)


_X, _IDS, _RW = _inputs()

# (case name, callable, expected exception, regex the message must match: the argument it names)
BAD_INPUTS = [
    ("layer_idx str", lambda: _w(layer_idx="x"), ValueError, "layer_idx must be a non-negative int"),
    ("layer_idx negative", lambda: _w(layer_idx=-1), ValueError, "layer_idx"),
    ("num_experts over int32", lambda: _w(num_experts=2**31, num_experts_per_tok=1), ValueError,
     "num_experts=2147483648 exceeds"),
    ("hidden_size over int32", lambda: _w(hidden_size=2**40), ValueError, "hidden_size=.* exceeds"),
    ("chunk x k over int32", lambda: _w(chunked_prefill_size=2**30), ValueError, "chunked_prefill_size"),
    ("lora_alpha nan", lambda: _w(lora_alpha=math.nan), ValueError, "lora_alpha"),
    ("lora_alpha str", lambda: _w(lora_alpha="big"), ValueError, "lora_alpha"),
    ("subpool_cpus not ints", lambda: get_engine(None, 1, [["a"]]), ValueError, r"subpool_cpus\[0\]"),
    ("subpool_cpus a string", lambda: get_engine(None, 1, "0-3"), ValueError, "subpool_cpus must be a list"),
    ("KTMOE_TOPOLOGY garbage", lambda: _topology_env("0-x;4"), ValueError, "KTMOE_TOPOLOGY="),
    ("KTMOE_TOPOLOGY descending", lambda: _topology_env("3-1"), ValueError, "KTMOE_TOPOLOGY="),
    ("meta weights", lambda: _w().load_weights_from_tensors(*[torch.empty(t.shape, device="meta")
                                                             for t in _weights()]), ValueError,
     "gate_proj is on device meta"),
    ("meta LoRA", _meta_lora, ValueError, "gate_lora_a is on device meta"),
    ("meta grad_output", _meta_grad, ValueError, "grad_output is on device meta"),
    ("meta hidden_states", lambda: _loaded().forward(torch.empty(5, H, device="meta"), _IDS, _RW), ValueError,
     "hidden_states"),
    ("NaN hidden_states", lambda: _loaded().forward(torch.full((5, H), math.nan), _IDS, _RW), ValueError,
     "hidden_states"),
    ("inf routing weight", lambda: _loaded().forward(_X, _IDS, torch.full((5, K), math.inf)), ValueError,
     "weights"),
    ("expert id out of range", lambda: _loaded().forward(_X, torch.full((5, K), E), _RW), ValueError,
     "expert_ids"),
    ("module float ids", lambda: _module(_X, _IDS.float(), _RW), ValueError, "expert_ids must be an integer"),
    ("module bool ids", lambda: _module(_X, _IDS.bool(), _RW), ValueError, "expert_ids must be an integer"),
    ("module ids of other T", lambda: _module(_X, _IDS[:3], _RW), ValueError, "expert_ids"),
    ("module ids not a tensor", lambda: _module(_X, [[0, 1]] * 5, _RW), TypeError, "expert_ids"),
    ("fp32 input overflowing bf16", lambda: _loaded().forward(torch.full((5, H), 3.4e38), _IDS, _RW), ValueError,
     "hidden_states.* overflows bfloat16"),
    ("NaN weight", lambda: _w().load_weights_from_tensors(
        *[t.float().index_fill(1, torch.tensor([0]), math.nan) for t in _weights()]), ValueError,
     "gate_proj holds a non-finite value"),
    ("NaN int4 weight row", lambda: _w(method="AMXINT4_SFT").load_weights_from_tensors(
        *[t.float().index_fill(1, torch.tensor([2]), math.nan) for t in _weights()]), ValueError,
     "gate_proj holds a non-finite value .* row 2"),
]


@pytest.mark.parametrize("name,fn,exc,pattern", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_table(name, fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


def test_module_accepts_t0():
    m = ktmoe.KTMoEExperts(*_weights(), num_experts_per_tok=K, lora_rank=R, cpuinfer_threads=THREADS)
    x = torch.zeros(0, H, requires_grad=True)
    y = m(x, torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K))
    assert y.shape == (0, H)
    y.sum().backward()
    assert x.grad.shape == (0, H)
    with torch.no_grad():
        assert m(x, torch.zeros(0, K, dtype=torch.int32), torch.zeros(0, K)).shape == (0, H)


# cases where a crash is possible (freed or out-of-bounds memory): each in its own interpreter
CRASHY = {
    "smaller LoRA through the copy path": """
        import torch, ktmoe
        from conftest import gen, make_expert_weights, make_lora
        E, H, I, R = 4, 32, 16, 4
        w = ktmoe.KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=2, hidden_size=H,
                               moe_intermediate_size=I, lora_rank=R, cpuinfer_threads=1)
        w.load_weights_from_tensors(*make_expert_weights(E, H, I, gen(0), torch.bfloat16))
        lora = [t.to(torch.bfloat16) for t in make_lora(E, H, I, R, gen(1)).values()]
        w.init_lora_weights(*lora)
        lora[4].data = torch.zeros(1, 1, 1, dtype=torch.bfloat16)
        try:
            w.update_lora_weights()
        except ValueError as e:
            assert "down_lora_a" in str(e), e
            print("OK")
    """,
    "weights resized between forward and backward": """
        import torch, ktmoe
        from conftest import gen, make_expert_weights, make_lora, make_x, make_ids, make_routing_weights
        E, H, I, R = 4, 32, 16, 4
        w = ktmoe.KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=2, hidden_size=H,
                               moe_intermediate_size=I, lora_rank=R, cpuinfer_threads=1)
        ws = [t.contiguous() for t in make_expert_weights(E, H, I, gen(0), torch.bfloat16)]
        w.load_weights_from_tensors(*ws)
        w.init_lora_weights(*make_lora(E, H, I, R, gen(1)).values())
        g = gen(2); x = make_x(5, H, g)
        y = w.forward_sft(x, make_ids(5, E, 2, g), make_routing_weights(5, 2, g))
        for t in ws:
            t.resize_(0)
        dx, grads = w.backward(torch.ones_like(x))
        assert torch.isfinite(dx).all()
        print("OK")
    """,
}


@pytest.mark.parametrize("name", sorted(CRASHY))
def test_bad_input_table_in_subprocess(name):
    _assert_ok(_run_subprocess(CRASHY[name]))
