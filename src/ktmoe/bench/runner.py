"""Runs the measurements of `python -m ktmoe.bench` and returns them as one JSON-able dict.

See the package docstring (ktmoe/bench/__init__.py) for what is measured and how it is counted."""
from __future__ import annotations

import datetime
import gc
import os
import platform
import sys
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import _core
from .._version import __version__ as ktmoe_version
from ..engine import cpu_info, get_engine, set_isa
from ..experts import KTMoEWrapper
from ..lora import LORA_NAMES
from ..methods import REGISTRY
from ..reference import moe_reference
from ..sft import base as _sft_base
from . import workload as wl
from .peer import Peer, PeerError

LORA_ALPHA = 32.0
SEED = 1234
MEM_HEADROOM = 0.85  # use at most this fraction of MemAvailable


def log(msg: str) -> None:
    print(f"[ktmoe.bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- python overhead
class _Clock:
    native = 0.0
    calls = 0


def _timed_context_class():
    """_core.Context whose native calls (plan, forward, backward) add their wall time to _Clock.native."""

    def timed(name):
        native = getattr(_core.Context, name)

        def call(self, *a):
            t = time.perf_counter()
            try:
                return native(self, *a)
            finally:
                _Clock.native += time.perf_counter() - t
                _Clock.calls += 1

        return call

    return type("TimedContext", (_core.Context,), {n: timed(n) for n in ("plan", "forward", "backward")})


class _CoreProxy:
    """Stands in for ktmoe._core inside ktmoe.sft.base: the same module, but Context is timed."""

    def __init__(self, context_cls):
        self.Context = context_cls

    def __getattr__(self, name):
        return getattr(_core, name)


@contextmanager
def _timed_native_calls():
    saved = _sft_base._core
    _sft_base._core = _CoreProxy(_timed_context_class())
    try:
        yield
    finally:
        _sft_base._core = saved


def measure_overhead(wrapper, T: int, E: int, k: int, H: int, n: int) -> dict:
    x, ids, wts, dy = wl.make_inputs(T, E, k, H, seed=SEED + 2)
    fwd_over, bwd_over, fwd_tot, bwd_tot = [], [], [], []
    _Clock.calls = 0
    with _timed_native_calls():
        for i in range(n + 2):
            _Clock.native = 0.0
            t0 = time.perf_counter()
            y = wrapper.forward_sft(x, ids, wts, save_for_backward=True)
            t1 = time.perf_counter()
            nf = _Clock.native
            _Clock.native = 0.0
            t2 = time.perf_counter()
            grads = wrapper.backward(dy)
            t3 = time.perf_counter()
            nb = _Clock.native
            del y, grads  # freed outside the timed span: freeing results is the caller's business
            if i < 2:  # warm-up
                continue
            fwd_tot.append((t1 - t0) * 1e6)
            bwd_tot.append((t3 - t2) * 1e6)
            fwd_over.append((t1 - t0 - nf) * 1e6)
            bwd_over.append((t3 - t2 - nb) * 1e6)
    if _Clock.calls < 3 * (n + 2):
        # the wrapper's native calls were not seen (contexts made before the swap?): no honest split
        raise RuntimeError("could not time the native calls (ktmoe.sft.base no longer creates its _core.Context "
                           "per call); Python overhead not measured")
    return dict(T=T, n=n, fwd_total_us=wl.median(fwd_tot), bwd_total_us=wl.median(bwd_tot),
                fwd_overhead_us=wl.median(fwd_over), bwd_overhead_us=wl.median(bwd_over),
                fwd_overhead_min_us=min(fwd_over), bwd_overhead_min_us=min(bwd_over),
                fwd_overhead_max_us=max(fwd_over), bwd_overhead_max_us=max(bwd_over))


# ---------------------------------------------------------------- paths
class Path:
    """One thing timed: a callable doing one fwd+bwd step at the current T, returning (fwd_ms, bwd_ms)."""

    def __init__(self, kind: str, method: Optional[str], fn: Callable[[], Tuple[float, float]]):
        self.kind, self.method, self.fn = kind, method, fn
        self.fwd: List[float] = []
        self.bwd: List[float] = []
        self.error: Optional[str] = None

    @property
    def label(self) -> str:
        return self.kind if self.method is None else f"{self.kind}:{self.method}"

    def run(self, record: bool) -> None:
        if self.error is not None:
            return
        try:
            f, b = self.fn()
        except Exception as exc:  # a failing path is reported, the others go on
            self.error = f"{type(exc).__name__}: {exc}"
            log(f"{self.label} failed: {self.error}")
            return
        if record:
            self.fwd.append(f)
            self.bwd.append(b)

    def summary(self) -> dict:
        if self.error is not None or not self.fwd:
            return dict(error=self.error or "no samples")
        tot = [a + b for a, b in zip(self.fwd, self.bwd)]
        return dict(fwd_ms=wl.median(self.fwd), bwd_ms=wl.median(self.bwd), total_ms=wl.median(tot),
                    total_min_ms=min(tot), total_max_ms=max(tot), samples_fwd_ms=self.fwd, samples_bwd_ms=self.bwd)


def _ktmoe_step(wrapper, inputs) -> Tuple[float, float]:
    x, ids, wts, dy = inputs
    t0 = time.perf_counter()
    y = wrapper.forward_sft(x, ids, wts, save_for_backward=True)
    t1 = time.perf_counter()
    grads = wrapper.backward(dy)
    t2 = time.perf_counter()
    del y, grads
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def _torch_step(weights, lora_t, scaling, inputs) -> Tuple[float, float]:
    x, ids, wts, dy = inputs
    xt = x.detach().clone().requires_grad_(True)
    wt = wts.detach().clone().requires_grad_(True)
    for p in lora_t.values():
        p.grad = None
    t0 = time.perf_counter()
    y = moe_reference(xt, ids, wt, *weights, lora=lora_t, scaling=scaling)
    t1 = time.perf_counter()
    (y * dy).sum().backward()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def _peer_step(peer: Peer, T: int) -> Tuple[float, float]:
    r = peer.step(T, 1)
    return r["fwd_ms"][0], r["bwd_ms"][0]


# ---------------------------------------------------------------- one preset
def _held_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _held_tensors(o)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            if isinstance(v, torch.Tensor):
                yield v


def _aliased(wrapper, tensors) -> bool:
    """Whether the wrapper reads the bench's bf16 tensors in place (then their bytes are the wrapper's).
    Peeks at the wrapper's private `_weights` (packed tensors, or objects holding them)."""
    ptrs = {t.untyped_storage().data_ptr() for t in tensors}
    return any(t.untyped_storage().data_ptr() in ptrs for t in _held_tensors(getattr(wrapper, "_weights", None)))


def _format_bits(method: str) -> int:
    try:
        return int(getattr(REGISTRY[method].weight_format, "bits", 16))
    except Exception:
        return 16


def run_preset(preset: wl.Preset, args, machine: dict) -> dict:
    E, k, H, I, r = preset.E, preset.k, preset.H, preset.I, args.rank
    tokens = args.tokens
    max_T = max(tokens)
    res: dict = dict(preset=preset.as_dict(), rank=r, tokens=tokens, rows=[], overhead=[], memory=[], notes=[],
                     stages=[], _raw=[], _stages=[])  # rows are derived in run(), once the peak is final
    W = wl.weight_bytes_bf16(E, H, I)
    lora_f32 = wl.lora_numel(E, H, I, r) * 4
    act = max_T * k * (2 * H + 4 * I) * 4 * 4 + max_T * H * 2 * 8  # generous: saved activations, torch path
    packed = sum(W * _format_bits(m) // 16 * 9 // 8 for m in args.method if _format_bits(m) != 16)  # +scales
    need = W + packed + 2 * lora_f32 * len(args.method) + lora_f32 // 2 + act
    avail = wl.mem_available_bytes()
    if avail is not None and need > MEM_HEADROOM * avail:
        msg = (f"skipped {preset.name}: needs about {need / 2**30:.1f} GiB (bf16 weights {W / 2**30:.1f} GiB) but "
               f"only {avail / 2**30:.1f} GiB is available (MemAvailable; the bench keeps {100 - 100 * MEM_HEADROOM:.0f}% headroom)")
        log(msg)
        res["skipped"] = msg
        return res

    # kt-kernel first: its load holds the caller's copy and its own (about 3x the weights) for a moment
    peers: Dict[str, Peer] = {}
    peer_info: Dict[str, dict] = {}
    if args.peer_python:
        for method in args.method:
            avail = wl.mem_available_bytes()
            peer_need = 3 * W + wl.lora_numel(E, H, I, r) * 4 + act
            if avail is not None and peer_need + need > MEM_HEADROOM * avail:
                msg = (f"kt-kernel {method} skipped for {preset.name}: it needs about {peer_need / 2**30:.1f} GiB "
                       f"besides ktmoe's {need / 2**30:.1f} GiB; {avail / 2**30:.1f} GiB available")
                log(msg)
                peer_info[method] = dict(error=msg)
                continue
            log(f"starting kt-kernel ({method}) for {preset.name} via {args.peer_python}")
            cfg = dict(E=E, k=k, H=H, I=I, rank=r, alpha=LORA_ALPHA, threads=args.threads,
                       threadpool_count=args.threadpool_count, method=method, seed=SEED, max_tokens=max_T)
            try:
                p = Peer(args.peer_python, cfg)
                peers[method] = p
                peer_info[method] = dict(p.info)
            except (PeerError, OSError) as exc:
                msg = f"{type(exc).__name__}: {exc}"
                log(f"kt-kernel {method} failed to start: {msg}")
                peer_info[method] = dict(error=msg)
    res["kt_kernel"] = peer_info

    try:
        gc.collect()
        rss_before_weights = wl.rss_bytes()
        log(f"{preset.name}: generating bf16 weights ({W / 2**20:.0f} MiB)")
        weights = wl.make_weights(E, H, I, seed=SEED)
        wrappers = {}
        for method in args.method:
            rss_a = wl.rss_bytes()
            lora = wl.make_lora(E, H, I, r, torch.float32, seed=SEED + 1)
            w = KTMoEWrapper(mode="sft", method=method, layer_idx=0, num_experts=E, num_experts_per_tok=k,
                             hidden_size=H, moe_intermediate_size=I, cpuinfer_threads=args.threads,
                             threadpool_count=args.threadpool_count, chunked_prefill_size=max(4096, max_T),
                             lora_rank=r, lora_alpha=LORA_ALPHA)
            w.load_weights_from_tensors(*weights)
            w.init_lora_weights(*(lora[n] for n in LORA_NAMES))
            rss_b = wl.rss_bytes()
            aliased = _aliased(w, weights)
            held_w = w.weight_nbytes()
            held = held_w + sum(t.numel() * t.element_size() for t in lora.values())
            resident = rss_b - rss_a + (W if aliased else 0)
            step_T = max_T
            _ktmoe_step(w, wl.make_inputs(step_T, E, k, H, seed=SEED + 2))
            rss_c = wl.rss_bytes()
            res["memory"].append(dict(side="ktmoe", method=method, weights_bytes=held_w, held_bytes=held,
                                      resident_after_load=resident, rss_before_weights=rss_before_weights,
                                      rss_after_load=rss_b, step_T=step_T, step_delta=rss_c - rss_b,
                                      aliases_bench_weights=aliased))
            wrappers[method] = (w, lora)
        for method, info in peer_info.items():
            if "error" in info:
                continue
            held = info["weights_bytes"] + info["lora_bytes"]
            res["memory"].append(dict(side="kt-kernel", method=method, weights_bytes=info["weights_bytes"],
                                      held_bytes=held,
                                      resident_after_load=info["rss_after_load"] - info["rss_before_weights"],
                                      rss_before_weights=info["rss_before_weights"],
                                      rss_after_load=info["rss_after_load"], step_T=info.get("step_T", max_T),
                                      step_delta=info["rss_after_step"] - info["rss_after_load"]))

        # Python overhead (before the timed runs; nothing else is running)
        n_over = 5 if args.smoke else 30
        for method, (w, _) in wrappers.items():
            for T in (1, 16):
                try:
                    o = measure_overhead(w, T, E, k, H, n_over)
                except RuntimeError as exc:
                    log(str(exc))
                    res["notes"].append(f"{preset.name} {method}: {exc}")
                    break
                o["method"] = method
                res["overhead"].append(o)
                log(f"{preset.name} {method} T={T}: python overhead fwd {o['fwd_overhead_us']:.1f} us, "
                    f"bwd {o['bwd_overhead_us']:.1f} us")

        lora_t = None
        if args.torch:
            src = wrappers[args.method[0]][1]
            lora_t = {n: src[n].detach().to(torch.bfloat16).requires_grad_(True) for n in LORA_NAMES}
        scaling = LORA_ALPHA / r

        for T in tokens:
            inputs = wl.make_inputs(T, E, k, H, seed=SEED + 2)
            n_touched = wl.touched_experts(inputs[1])
            paths: List[Path] = []
            for method, (w, _) in wrappers.items():
                paths.append(Path("ktmoe", method, lambda w=w: _ktmoe_step(w, inputs)))
            if lora_t is not None:
                paths.append(Path("torch", None, lambda: _torch_step(weights, lora_t, scaling, inputs)))
            for method, p in peers.items():
                paths.append(Path("kt-kernel", method, lambda p=p, T=T: _peer_step(p, T)))
            log(f"{preset.name} T={T}: warm-up ({args.warmup}) of {', '.join(p.label for p in paths)}")
            for _ in range(args.warmup):
                for p in paths:
                    p.run(record=False)
            for rep in range(args.repeats):
                order = paths[rep % len(paths):] + paths[:rep % len(paths)]
                for p in order:
                    p.run(record=True)
                    time.sleep(0.01)  # let spinning pool threads of the previous path go to sleep
            summ = {p.label: p.summary() for p in paths}
            ln = ", ".join(f"{lbl} {s['total_ms']:.1f} ms" if "total_ms" in s else f"{lbl} error"
                           for lbl, s in summ.items())
            log(f"{preset.name} T={T}: {ln}")
            expert_bytes = {m: w.weight_nbytes() / E for m, (w, _) in wrappers.items()}
            res["_raw"].append((T, n_touched, summ, expert_bytes))
            for method, (w, _) in wrappers.items():
                res["_stages"].append((method, T, n_touched, expert_bytes[method], profile_stages(w, inputs)))
    finally:
        for p in peers.values():
            p.close()
    return res


# The GEMM stages of the native profile: (FLOPs per (token, expert) pair / (H I), share of an expert's weight
# bytes the stage reads). The other stages (LoRA, activation packing, combine) are timed only.
GEMM_STAGES = {"fwd_gate_up": (4, 2 / 3), "fwd_down": (2, 1 / 3), "bwd_down_act": (2, 1 / 3), "bwd_dx": (4, 2 / 3)}
PROFILE_ROUNDS = 3


def profile_stages(wrapper, inputs) -> Dict[str, Tuple[float, int]]:
    """{stage: (seconds per step, calls)} of the native stage profile over PROFILE_ROUNDS steps."""
    _core.profile_reset()
    _core.profile_enable(True)
    try:
        for _ in range(PROFILE_ROUNDS):
            _ktmoe_step(wrapper, inputs)
    finally:
        _core.profile_enable(False)
    return {name: (sec / PROFILE_ROUNDS, calls) for name, (sec, _, calls) in _core.profile_read().items()}


def _stage_rows(preset, method, T, n_touched, expert_bytes, stages, machine) -> List[dict]:
    H, I, k = preset.H, preset.I, preset.k
    rows = []
    for name, (sec, _) in stages.items():
        row = dict(preset=preset.name, method=method, T=T, stage=name, ms=sec * 1e3)
        if name in GEMM_STAGES and sec > 0:
            per_pair, share = GEMM_STAGES[name]
            gflops = T * k * per_pair * H * I / sec / 1e9
            gbps = n_touched * expert_bytes * share / sec / 1e9
            row.update(gflops=gflops, pct_peak=100 * gflops / machine["peak_gflops"], weight_gbps=gbps,
                       pct_bw=100 * gbps / machine["read_gbps"])
        rows.append(row)
    return rows


def _rows(preset, r, T, n_touched, summ, expert_bytes, machine, peer_info) -> List[dict]:
    """expert_bytes: method -> bytes of one expert's packed weights (3*H*I*2 for bf16)."""
    E, k, H, I = preset.E, preset.k, preset.H, preset.I
    fwd_fl, bwd_fl = wl.step_flops(T * k, H, I, r)
    flops = fwd_fl + bwd_fl
    peak, gbps = machine["peak_gflops"], machine["read_gbps"]
    t_fl = flops / (peak * 1e9) if peak > 0 else float("nan")
    torch_s = summ.get("torch")
    rows = []
    for m, per_expert in expert_bytes.items():
        # each touched expert's weights read once in forward and once in backward
        bw_bytes = int(2 * n_touched * per_expert) if per_expert > 0 else wl.bandwidth_bytes(n_touched, H, I)
        t_bw = bw_bytes / (gbps * 1e9) if gbps > 0 else float("nan")
        bw_bound = t_bw >= t_fl
        ours = summ[f"ktmoe:{m}"]
        peer_s = summ.get(f"kt-kernel:{m}")
        if peer_s is None and m in peer_info and "error" in peer_info[m]:
            peer_s = dict(error=peer_info[m]["error"])
        row = dict(preset=preset.name, method=m, T=T, E=E, k=k, H=H, I=I, r=r, n_pairs=T * k,
                   n_touched=n_touched, fwd_flops=fwd_fl, bwd_flops=bwd_fl, bw_bytes=bw_bytes,
                   t_bw_bound_ms=t_bw * 1e3, t_flop_bound_ms=t_fl * 1e3, bw_bound_regime=bw_bound,
                   ktmoe=ours, torch=torch_s, kt_kernel=peer_s)
        if "total_ms" in ours:
            t = ours["total_ms"] * 1e-3
            row["gflops"] = flops / t * 1e-9
            row["fwd_gflops"] = fwd_fl / (ours["fwd_ms"] * 1e-3) * 1e-9
            row["bwd_gflops"] = bwd_fl / (ours["bwd_ms"] * 1e-3) * 1e-9
            row["pct_peak"] = 100.0 * row["gflops"] / peak if peak > 0 else None
            row["pct_bw_bound"] = 100.0 * t_bw / t
            for key, other in (("x_vs_torch", torch_s), ("x_vs_kt_kernel", peer_s)):
                if other and "total_ms" in other:
                    row[key] = other["total_ms"] / ours["total_ms"]
                    row[key + "_fwd"] = other["fwd_ms"] / ours["fwd_ms"]
                    row[key + "_bwd"] = other["bwd_ms"] / ours["bwd_ms"]
        for key, other in (("torch", torch_s), ("kt_kernel", peer_s)):
            if other and "total_ms" in other:
                other["gflops"] = flops / (other["total_ms"] * 1e-3) * 1e-9
                other["pct_peak"] = 100.0 * other["gflops"] / peak if peak > 0 else None
        rows.append(row)
    return rows


# ---------------------------------------------------------------- whole run
def _measure_peak_bw(args) -> Tuple[float, float]:
    eng = get_engine(args.threads, args.threadpool_count)
    log(f"measuring peak ({'0.2' if args.smoke else '0.5'} s) and read bandwidth on {eng.threads} threads")
    peak = eng.core.measure_peak_gflops(0.2 if args.smoke else 0.5)
    gbps = eng.core.measure_read_gbps((256 << 20) if args.smoke else (1 << 30))
    return peak, gbps


def measure_machine(args) -> dict:
    isa = set_isa(args.isa) if args.isa else set_isa(None)
    eng = get_engine(args.threads, args.threadpool_count)
    log(f"ISA level {isa}")
    peak, gbps = _measure_peak_bw(args)
    info = cpu_info()
    return dict(cpu=info["cpu"], isa_active=info["isa_active"], isa_detected=info["isa_detected"],
                features=info["features"], allowed_cpus=info["allowed_cpus"], numa_nodes=info["numa_nodes"],
                threads=eng.threads, threadpool_count=args.threadpool_count, subpool_cpus=[list(p) for p in eng.subpool_cpus],
                peak_gflops=peak, read_gbps=gbps, peak_gflops_start=peak, read_gbps_start=gbps,
                mem_available=wl.mem_available_bytes())


def _loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    load_start = _loadavg()
    machine = measure_machine(args)
    result = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  command=" ".join([os.path.basename(sys.executable), "-m", "ktmoe.bench"] + list(args.argv)),
                  python=platform.python_version(), torch=torch.__version__, torch_threads=torch.get_num_threads(),
                  ktmoe=ktmoe_version, machine=machine, rank=args.rank, lora_alpha=LORA_ALPHA,
                  repeats=args.repeats, warmup=args.warmup, peer_python=args.peer_python, presets=[],
                  loadavg_start=load_start)
    for name in args.preset:
        result["presets"].append(run_preset(wl.PRESETS[name], args, machine))
        gc.collect()
    # Measured again at the end: on a shared machine either measurement can be depressed by other work, and
    # the higher one is the better estimate of what the machine can do (it also keeps "% peak" honest).
    peak, gbps = _measure_peak_bw(args)
    machine.update(peak_gflops_end=peak, read_gbps_end=gbps, peak_gflops=max(machine["peak_gflops"], peak),
                   read_gbps=max(machine["read_gbps"], gbps))
    for p in result["presets"]:
        preset = wl.PRESETS[p["preset"]["name"]]
        for T, n_touched, summ, expert_bytes in p.pop("_raw", []):
            p["rows"].extend(_rows(preset, p["rank"], T, n_touched, summ, expert_bytes, machine,
                                   p.get("kt_kernel", {})))
        for method, T, n_touched, eb, stages in p.pop("_stages", []):
            p["stages"].extend(_stage_rows(preset, method, T, n_touched, eb, stages, machine))
    result["loadavg_end"] = _loadavg()
    return result
